// CUDA path of the cpsl native core.
#include <cuda_runtime.h>
#include <string>
#include "cp.h"

namespace cpsl {

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device / no driver" error
    return 0;
  }
  return n;
}

std::string cuda_runtime_info() {
  int rt = 0, drv = 0;
  cudaRuntimeGetVersion(&rt);
  if (cudaDriverGetVersion(&drv) != cudaSuccess) { cudaGetLastError(); drv = 0; }
  return "runtime " + std::to_string(rt / 1000) + "." + std::to_string((rt % 1000) / 10) +
         ", driver " + (drv ? std::to_string(drv / 1000) + "." + std::to_string((drv % 1000) / 10) : std::string("none"));
}

}  // namespace cpsl
