// cpsl native core: shared declarations between the CPU and CUDA paths.
#pragma once
#include <cstdint>
#include <string>

namespace cpsl {

// Number of OpenMP threads the CPU path would use (1 without OpenMP).
int cpu_num_threads();

#ifdef CPSL_WITH_CUDA
// CUDA devices visible at run time (0 when no driver or no device); never throws.
int cuda_device_count();
// Runtime/driver versions, "" when unavailable.
std::string cuda_runtime_info();
#endif

}  // namespace cpsl
