// CUDA path of the cpsl native core: Conflict-aware Penalty statistics and scaling.
//
// cp_stats: ONE launch. Blocks grid-stride over the chunk table (cp.h); each block reduces
// a chunk's sum of squares (float32 within a thread's share of the chunk, at most 64
// terms; float64 from the block reduction on) with a fixed-order block reduction into
// partials[chunk]. The last block to finish (atomic
// counter + __threadfence) sums the partials of each group in table order, runs the
// float64 penalty stage (the same code as the CPU path; with signal ema it also updates the
// state buffer in place) and writes the stats buffer, then
// resets the counter to zero: no host synchronisation, CUDA-graph capturable, and the
// result does not depend on the grid size (bit-identical run to run on the same gradient
// memory; a copy at another 16-byte alignment is split differently by the alignment peel
// below and may differ in the last bits). The schedule weight comes from the control block
// `ctl` when given (read by the last block at run time: a graph replay follows it).
// cp_scale: grad *= (float)k[group], grid-stride over chunks; chunks whose factor is
// exactly 1 are skipped (the factor is read on the device).
// 16-byte vector loads/stores on every chunk: a scalar head peels the elements before the
// first 16-byte boundary (misaligned views: DDP bucket slices, flat buffers, x[1:]).
#include <cuda_runtime.h>

#include <stdexcept>
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

int cuda_pointer_location(const void* p) {
  cudaPointerAttributes a;
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  switch (a.type) {
    case cudaMemoryTypeDevice: return a.device;
    case cudaMemoryTypeHost: return -2;
    case cudaMemoryTypeManaged: return -3;
    default: return -1;
  }
}

namespace {

constexpr int kBlock = 512;
constexpr int kWarps = kBlock / 32;

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

struct DeviceGuard {
  int prev = -1, want = -1;
  explicit DeviceGuard(int device) : want(device) {
    check_cuda(cudaGetDevice(&prev), "cudaGetDevice");
    if (prev != want) check_cuda(cudaSetDevice(want), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (prev >= 0 && prev != want) cudaSetDevice(prev);
  }
};

// ------------------------------------------------------------------ element access
// Each accessor decodes / encodes one 16-byte vector (kPer elements).
struct F32 {
  static constexpr int kPer = 4;
  __device__ static __forceinline__ float get(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
  __device__ static __forceinline__ void put(void* p, int64_t i, float v) { static_cast<float*>(p)[i] = v; }
  __device__ static __forceinline__ void decode(const uint4& u, float* f) {
    f[0] = __uint_as_float(u.x); f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z); f[3] = __uint_as_float(u.w);
  }
  __device__ static __forceinline__ uint4 encode(const float* f) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};

template <bool kBF>
struct Half16 {  // float16 (kBF false) or bfloat16 (kBF true), both stored as 16 bits
  static constexpr int kPer = 8;
  __device__ static __forceinline__ float to_f(uint16_t h) { return kBF ? bf16_to_float(h) : half_to_float(h); }
  __device__ static __forceinline__ uint16_t from_f(float f) { return kBF ? float_to_bf16(f) : float_to_half(f); }
  __device__ static __forceinline__ float get(const void* p, int64_t i) { return to_f(static_cast<const uint16_t*>(p)[i]); }
  __device__ static __forceinline__ void put(void* p, int64_t i, float v) { static_cast<uint16_t*>(p)[i] = from_f(v); }
  __device__ static __forceinline__ void decode(const uint4& u, float* f) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      f[2 * j] = to_f(static_cast<uint16_t>(w[j] & 0xffffu));
      f[2 * j + 1] = to_f(static_cast<uint16_t>(w[j] >> 16));
    }
  }
  __device__ static __forceinline__ uint4 encode(const float* f) {
    unsigned w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
      w[j] = static_cast<unsigned>(from_f(f[2 * j])) | (static_cast<unsigned>(from_f(f[2 * j + 1])) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};
using F16 = Half16<false>;
using BF16 = Half16<true>;

// ------------------------------------------------------------------ reductions
// Fixed-order block reduction; the result is valid in thread 0.
__device__ __forceinline__ double block_sum(double v, double* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // smem is free (previous use finished)
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? smem[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

// A chunk is split into a scalar head (the elements before its first 16-byte boundary: the
// alignment peel, so views such as DDP bucket slices or x[1:] still take the vector path),
// a 16-byte vector body and a scalar tail. Thread t always gets the same elements of a
// given chunk, so the result does not depend on timing.
template <class A>
__device__ __forceinline__ int64_t head_elems(const void* x, int64_t n) {
  constexpr unsigned kEsize = 16 / A::kPer;
  const unsigned mis = static_cast<unsigned>(reinterpret_cast<std::uintptr_t>(x) & 15u);
  const int64_t head = static_cast<int64_t>(((16u - mis) & 15u) / kEsize);  // pointer is dtype-aligned (validated)
  return head < n ? head : n;
}

// This thread's share of a chunk's sum of squares, in float32 only: squares and sums of
// at most kPer * ceil(n / (kPer * kBlock)) terms (64 for a full chunk), so no FP64 unit is
// touched per element (sm_86/87/89 run FP64 at 1/64 of the FP32 rate). float64 starts at
// the block reduction. Every element's square is a float32, whatever the alignment: an
// entry above ~1.8e19 overflows to inf and trips the guard on every path.
template <class A>
__device__ __forceinline__ double thread_sumsq(const void* x, int64_t n) {
  const int64_t head = head_elems<A>(x, n);
  float s = 0.0f, t = 0.0f;
  if (threadIdx.x < head) {
    const float v = A::get(x, threadIdx.x);
    s = v * v;
  }
  const void* body = static_cast<const char*>(x) + head * (16 / A::kPer);
  const uint4* xv = static_cast<const uint4*>(body);
  const int64_t nv = (n - head) / A::kPer;
  int64_t j = threadIdx.x;
  for (; j + kBlock < nv; j += 2 * kBlock) {  // two loads in flight per thread
    const uint4 ua = __ldg(xv + j), ub = __ldg(xv + j + kBlock);
    float fa[A::kPer], fb[A::kPer];
    A::decode(ua, fa);
    A::decode(ub, fb);
    float pa = 0.0f, pb = 0.0f;
#pragma unroll
    for (int e = 0; e < A::kPer; ++e) pa = fmaf(fa[e], fa[e], pa);
#pragma unroll
    for (int e = 0; e < A::kPer; ++e) pb = fmaf(fb[e], fb[e], pb);
    s += pa;
    t += pb;
  }
  for (; j < nv; j += kBlock) {
    float fa[A::kPer];
    A::decode(__ldg(xv + j), fa);
    float pa = 0.0f;
#pragma unroll
    for (int e = 0; e < A::kPer; ++e) pa = fmaf(fa[e], fa[e], pa);
    s += pa;
  }
  for (int64_t i = head + nv * A::kPer + threadIdx.x; i < n; i += kBlock) {
    const float v = A::get(x, i);
    t = fmaf(v, v, t);
  }
  return static_cast<double>(s) + static_cast<double>(t);
}

template <class A>
__device__ __forceinline__ void thread_scale(void* x, int64_t n, float k) {
  const int64_t head = head_elems<A>(x, n);
  if (threadIdx.x < head) A::put(x, threadIdx.x, A::get(x, threadIdx.x) * k);
  uint4* xv = reinterpret_cast<uint4*>(static_cast<char*>(x) + head * (16 / A::kPer));
  const int64_t nv = (n - head) / A::kPer;
  for (int64_t j = threadIdx.x; j < nv; j += kBlock) {
    float f[A::kPer];
    A::decode(xv[j], f);
#pragma unroll
    for (int e = 0; e < A::kPer; ++e) f[e] *= k;
    xv[j] = A::encode(f);
  }
  for (int64_t i = head + nv * A::kPer + threadIdx.x; i < n; i += kBlock) A::put(x, i, A::get(x, i) * k);
}

// ------------------------------------------------------------------ kernels
__global__ void __launch_bounds__(kBlock)
    cp_stats_kernel(const int64_t* __restrict__ table, int64_t n_chunks, const int64_t* __restrict__ group_info,
                    int G, double* __restrict__ partials, unsigned int* __restrict__ counter,
                    double* __restrict__ stats, double* __restrict__ state, const double* __restrict__ ctl,
                    PenaltyArgs pa) {
  __shared__ double smem[kWarps];
  __shared__ bool is_last;
  for (int64_t c = blockIdx.x; c < n_chunks; c += gridDim.x) {
    const int64_t* row = table + kRowSize * c;
    const void* p = reinterpret_cast<const void*>(static_cast<std::uintptr_t>(row[0]));
    const int64_t n = row[1];
    double acc = 0.0;
    switch (row[2]) {
      case kFloat32: acc = thread_sumsq<F32>(p, n); break;
      case kFloat16: acc = thread_sumsq<F16>(p, n); break;
      case kBFloat16: acc = thread_sumsq<BF16>(p, n); break;
      default: break;  // validated on the host; never reached
    }
    acc = block_sum(acc, smem);
    if (threadIdx.x == 0) partials[c] = acc;
  }
  // last-block-done: publish this block's partials, then count it
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int m = 0; m < G; ++m) {
    const int64_t b = group_info[kGroupInfoSize * m + 1], e = group_info[kGroupInfoSize * m + 2];
    double s = 0.0;
    for (int64_t c = b + threadIdx.x; c < e; c += kBlock) s += __ldcg(partials + c);  // L2, not a stale L1
    s = block_sum(s, smem);
    if (threadIdx.x == 0) stats[m] = s;
  }
  if (threadIdx.x == 0) {
    penalty_stage(stats, group_info, G, pa, stats, state, ctl);
    *counter = 0u;  // ready for the next launch / graph replay
  }
}

__global__ void __launch_bounds__(kBlock)
    cp_scale_kernel(const int64_t* __restrict__ table, int64_t n_chunks, int G, const double* __restrict__ stats) {
  for (int64_t c = blockIdx.x; c < n_chunks; c += gridDim.x) {
    const int64_t* row = table + kRowSize * c;
    const int64_t g = row[3];
    if (g < 0 || g >= G) continue;
    const float k = static_cast<float>(stats[3 * G + g]);
    if (k == 1.0f) continue;  // x * 1.0f == x: nothing to write
    void* p = reinterpret_cast<void*>(static_cast<std::uintptr_t>(row[0]));
    switch (row[2]) {
      case kFloat32: thread_scale<F32>(p, row[1], k); break;
      case kFloat16: thread_scale<F16>(p, row[1], k); break;
      case kBFloat16: thread_scale<BF16>(p, row[1], k); break;
      default: break;
    }
  }
}

// Enough blocks to fill the device once (resident blocks per SM from the occupancy
// calculator), never more than there are chunks. The result does not depend on it.
template <class Kernel>
int grid_for(Kernel kernel, int64_t n_chunks, int device) {
  int sms = 0, per_sm = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kBlock, 0),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  int64_t g = static_cast<int64_t>(sms > 0 ? sms : 1) * (per_sm > 0 ? per_sm : 1);
  if (n_chunks < g) g = n_chunks;
  return static_cast<int>(g < 1 ? 1 : g);
}

}  // namespace

unsigned long long cuda_capture_id(std::uintptr_t stream) {
  if (stream == 0) return 0;  // the legacy default stream cannot capture
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long id = 0;
  check_cuda(cudaStreamGetCaptureInfo(reinterpret_cast<cudaStream_t>(stream), &status, &id),
             "cudaStreamGetCaptureInfo");
  return status == cudaStreamCaptureStatusNone ? 0ull : id + 1;  // never 0 while capturing
}

void cp_stats_cuda(const int64_t* table, int64_t n_chunks, const int64_t* group_info, int G, double* partials,
                   unsigned int* counter, double* stats, double* state, const double* ctl, const PenaltyArgs& pa,
                   bool scale, int device, std::uintptr_t stream) {
  DeviceGuard guard(device);
  const int grid = grid_for(cp_stats_kernel, n_chunks, device);
  cp_stats_kernel<<<grid, kBlock, 0, reinterpret_cast<cudaStream_t>(stream)>>>(table, n_chunks, group_info, G,
                                                                               partials, counter, stats, state, ctl,
                                                                               pa);
  check_cuda(cudaGetLastError(), "cp_stats kernel launch");
  if (scale) cp_scale_cuda(table, n_chunks, G, stats, device, stream);
}

void cp_scale_cuda(const int64_t* table, int64_t n_chunks, int G, const double* stats, int device,
                   std::uintptr_t stream) {
  if (n_chunks == 0) return;
  DeviceGuard guard(device);
  const int grid = grid_for(cp_scale_kernel, n_chunks, device);
  cp_scale_kernel<<<grid, kBlock, 0, reinterpret_cast<cudaStream_t>(stream)>>>(table, n_chunks, G, stats);
  check_cuda(cudaGetLastError(), "cp_scale kernel launch");
}

#ifndef CPSL_CUDA_ARCHS_STR
#define CPSL_CUDA_ARCHS_STR "?"
#endif

std::string cuda_usable(int device) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    int drv = 0;
    if (cudaDriverGetVersion(&drv) != cudaSuccess || drv == 0) {
      cudaGetLastError();
      return "no CUDA driver on this machine (libcuda not found)";
    }
    return std::string("no usable CUDA device: ") + cudaGetErrorString(e) + " (" + cuda_runtime_info() +
           "; cpsl._C links the CUDA " + std::to_string(CUDART_VERSION / 1000) + "." +
           std::to_string((CUDART_VERSION % 1000) / 10) + " runtime statically and needs a driver that supports it)";
  }
  if (n == 0) return "no CUDA device visible";
  if (device < 0 || device >= n)
    return "CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(n) + " visible)";
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  try {
    DeviceGuard guard(device);
    cudaFuncAttributes a;
    cudaError_t fe = cudaFuncGetAttributes(&a, cp_stats_kernel);
    if (fe == cudaSuccess) fe = cudaFuncGetAttributes(&a, cp_scale_kernel);
    if (fe != cudaSuccess) {
      cudaGetLastError();
      const std::string sm = std::to_string(major) + std::to_string(minor);
      return "CUDA device " + std::to_string(device) + " has compute capability " + std::to_string(major) + "." +
             std::to_string(minor) + " but cpsl._C holds no code for it (built for CMAKE_CUDA_ARCHITECTURES " +
             CPSL_CUDA_ARCHS_STR + "): " + cudaGetErrorString(fe) + "; rebuild with CPSL_CUDA_ARCHS=" + sm;
    }
  } catch (const std::exception& ex) {
    cudaGetLastError();
    return std::string("CUDA device ") + std::to_string(device) + " is not usable: " + ex.what();
  }
  return "";
}

}  // namespace cpsl
