// pybind11 boundary of cpsl._C. No libtorch: tensors cross as raw pointers + sizes,
// CUDA streams as integers; Python owns all memory.
#include <pybind11/pybind11.h>
#include "cp.h"
#ifdef CPSL_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

#ifndef CPSL_VERSION_INFO
#define CPSL_VERSION_INFO "dev"
#endif

static py::dict build_info() {
  py::dict d;
  d["version"] = CPSL_VERSION_INFO;
#ifdef CPSL_WITH_CUDA
  d["cuda"] = true;
  d["cuda_compiled_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
  d["cuda_devices"] = cpsl::cuda_device_count();
  d["cuda_runtime"] = cpsl::cuda_runtime_info();
#else
  d["cuda"] = false;
  d["cuda_compiled_version"] = py::none();
  d["cuda_devices"] = 0;
  d["cuda_runtime"] = py::none();
#endif
#ifdef CPSL_WITH_OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["cpu_threads"] = cpsl::cpu_num_threads();
  return d;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "cpsl native core (Conflict-aware Penalty kernels)";
  m.def("build_info", &build_info,
        "How this extension was built: CUDA compiled in, OpenMP, CUDA devices visible now.");
}
