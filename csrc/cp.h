// cpsl native core: shared declarations between the CPU and CUDA paths.
//
// Conflict-aware Penalty (docs/method.md §5, cpsl/cp/core.py). The gradients of one step
// cross the boundary as a *chunk table* that Python builds once per gradient layout:
//
//   table      int64 [n_chunks, 4]  rows (data pointer of the chunk's first element,
//                                   element count > 0, dtype code, group id), ordered
//                                   group-major: every chunk of group 0, then group 1, ...
//   group_info int64 [n_groups, 3]  rows (element count n_m, first chunk, end chunk); a
//                                   group is *active* when n_m > 0.
//   partials   float64 [n_chunks]   workspace: the sum of squares of each chunk.
//   counter    uint32 [1]           CUDA only: last-block-done counter, zero before a launch
//                                   and left at zero by the kernel (CUDA-graph capturable).
//   stats      float64 [5 G + 1]    output: sumsq | ghat | r | k | conflict | guard.
//   state      float64 [2 G]        signal state (cp.signal=ema only, else may be null): the
//                                   EMA e of r and the count t of active finite steps per
//                                   group, read and updated in place by the penalty stage;
//                                   the r field of stats then holds e / (1 - beta^t).
//   ctl        float64 [2]          penalty control (may be null): (w, on). When given, the
//                                   penalty stage reads the schedule weight from it, as
//                                   on != 0 ? w : 0, at run time, instead of PenaltyArgs::w:
//                                   a captured CUDA graph then follows later writes to it.
//
// Every chunk's sum of squares is accumulated in fp32 over short runs that are flushed to
// float64, then reduced in a fixed order (per chunk, then chunks in table order per group),
// so the result does not depend on the number of threads or blocks: bit-identical run to
// run for the same chunk table, i.e. the same gradient memory. It is NOT promised for a copy
// of the gradients elsewhere: the chunk table follows the memory (back-to-back gradients are
// merged into one run and re-chunked), and the CUDA kernel splits each chunk at its first
// 16-byte boundary, so a copy at another alignment sums in another order (last-bit
// differences). The CPU kernels do not depend on the alignment.
// The penalty stage runs in float64 and is the exact transcription of core.penalty_scalar.
// A single call may mix fp32, fp16 and bf16 tensors (the dtype is per chunk).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#if defined(__CUDACC__)
#define CPSL_HD __host__ __device__ __forceinline__
#else
#define CPSL_HD inline
#endif

namespace cpsl {

// ------------------------------------------------------------------ layout constants
constexpr int kRowSize = 4;        // int64 per chunk-table row
constexpr int kGroupInfoSize = 3;  // int64 per group-info row
constexpr int kNFields = 5;        // stats fields before the guard slot
enum DType : int64_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
constexpr int kNumDTypes = 3;
constexpr int kMaxGroups = 1 << 16;
constexpr int kCtlSize = 2;        // float64 per penalty control block: (w, on)

// The factor rule of a conflicting group (cp.penalty).
enum PenaltyMode : int {
  kPenaltyTanh = 0,   // clamp(1 - tanh(alpha (r - 1)), k_min, 1)
  kPenaltyFixed = 1,  // beta
  kPenaltyRatio = 2,  // clamp(min over the other active groups of ghat / own ghat, k_min, 1)
};
constexpr int kNumPenaltyModes = 3;

// The penalty scalars. They cross the Python boundary as ONE packed float64 sequence in the
// order of kPenaltyFields (bindings.cpp unpacks and checks it; cpsl/cp/native.py packs it by
// these names).
struct PenaltyArgs {
  double tau, alpha, k_min, beta, w;
  int mode;         // PenaltyMode
  int normalize;
  int ema;          // 1: conflict signal = bias-corrected EMA of r (needs a state buffer)
  double ema_beta;  // its beta
};
constexpr int kPenaltySize = 9;
constexpr const char* kPenaltyFields[kPenaltySize] = {"tau", "alpha", "k_min", "beta", "w",
                                                      "mode", "normalize", "ema", "ema_beta"};

// ------------------------------------------------------------------ scalar conversions
// Bit-exact with torch's (c10) conversions, round to nearest even; branch-free so the
// compilers vectorise them.
CPSL_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
CPSL_HD float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

CPSL_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = static_cast<uint32_t>(h & 0x7fffu);
  const uint32_t exp = em & 0x7c00u;
  // normal: rebias the exponent (15 -> 127)
  const uint32_t o = (em << 13) + (112u << 23);
  // inf / nan: one more rebias puts the exponent at 255, mantissa kept (as c10 does)
  const uint32_t special = o + (112u << 23);
  // subnormal / zero: m * 2^-24 computed as (1.m * 2^-14) - 2^-14 with normal floats only,
  // so it is exact even when denormals are flushed (torch.set_flush_denormal)
  const uint32_t sub = f32_bits(f32_from_bits(o + (1u << 23)) - f32_from_bits(113u << 23));
  return f32_from_bits(sign | (exp == 0x7c00u ? special : (exp == 0u ? sub : o)));
}

CPSL_HD uint16_t float_to_half(float f) {
  uint32_t u = f32_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  // overflow / inf / nan
  const uint32_t o_special = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // result subnormal or zero: a magic add aligns the 10 mantissa bits (RNE by the FPU)
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t o_sub = f32_bits(f32_from_bits(u) + f32_from_bits(denorm_magic)) - denorm_magic;
  // normal: rebias the exponent and round to nearest even on the 13 dropped bits
  const uint32_t mant_odd = (u >> 13) & 1u;
  const uint32_t o_norm = (u + (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mant_odd) >> 13;
  const uint32_t o = u >= (143u << 23) ? o_special : (u < (113u << 23) ? o_sub : o_norm);
  return static_cast<uint16_t>(o | (sign >> 16));
}

CPSL_HD float bf16_to_float(uint16_t b) { return f32_from_bits(static_cast<uint32_t>(b) << 16); }

CPSL_HD uint16_t float_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7fc0u : rounded);  // c10 returns 0x7fc0 for any nan
}

// ------------------------------------------------------------------ penalty stage
CPSL_HD bool finite_d(double x) { return (x - x) == 0.0; }  // false for inf and nan

// The schedule weight of a step: from the control block when there is one (read when the
// kernel runs, so a graph replay sees the value written before it), else the argument.
CPSL_HD double schedule_weight(const PenaltyArgs& pa, const double* ctl) {
  return ctl ? (ctl[1] != 0.0 ? ctl[0] : 0.0) : pa.w;
}

// The transcription of core.penalty_scalar. `sumsq` may alias stats[0:G] (it is read
// before stats[m] is written for the same m). float64 throughout. `state` ([2 G], see
// above) is read and written only when pa.ema, and left unchanged by a guarded step.
// `ctl` (null or [2], see above) overrides pa.w.
CPSL_HD void penalty_stage(const double* sumsq, const int64_t* group_info, int G,
                           const PenaltyArgs& pa, double* stats, double* state, const double* ctl) {
  const double w = schedule_weight(pa, ctl);
  int n_act = 0;
  bool guard = false;
  for (int m = 0; m < G; ++m) {
    const bool act = group_info[kGroupInfoSize * m] > 0;
    const double s = act ? sumsq[m] : 0.0;
    stats[m] = s;
    n_act += act ? 1 : 0;
    guard = guard || (act && !finite_d(s));
  }
  if (guard) {
    for (int m = 0; m < G; ++m) {
      const bool act = group_info[kGroupInfoSize * m] > 0;
      stats[G + m] = act ? sqrt(stats[m]) : 0.0;
      stats[2 * G + m] = 0.0;
      stats[3 * G + m] = 1.0;
      stats[4 * G + m] = 0.0;
    }
    stats[5 * G] = 1.0;
    return;
  }
  double gsum = 0.0;
  for (int m = 0; m < G; ++m) {
    const int64_t n = group_info[kGroupInfoSize * m];
    double gh = 0.0;
    if (n > 0) gh = pa.normalize ? sqrt(stats[m] / static_cast<double>(n)) : sqrt(stats[m]);
    stats[G + m] = gh;
    if (n > 0) gsum += gh;
  }
  const double gbar = n_act ? gsum / static_cast<double>(n_act) : 0.0;
  for (int m = 0; m < G; ++m) {
    const bool act = group_info[kGroupInfoSize * m] > 0;
    double r = (act && gbar > 0.0) ? stats[G + m] / gbar : 0.0;
    if (pa.ema && act) {
      state[m] = pa.ema_beta * state[m] + (1.0 - pa.ema_beta) * r;
      state[G + m] = state[G + m] + 1.0;
      r = state[m] / (1.0 - pow(pa.ema_beta, state[G + m]));
    }
    const bool conflict = act && n_act >= 2 && r > pa.tau;
    double k = 1.0;
    if (conflict) {
      if (pa.mode == kPenaltyFixed) {
        k = pa.beta;
      } else if (pa.mode == kPenaltyRatio) {
        double ref = -1.0;  // min ghat of the other active groups (there is one: n_act >= 2)
        for (int n = 0; n < G; ++n)
          if (n != m && group_info[kGroupInfoSize * n] > 0 && (ref < 0.0 || stats[G + n] < ref)) ref = stats[G + n];
        const double gm = stats[G + m];
        k = ref / (gm > 0.0 ? gm : 1.0);
        k = k > pa.k_min ? k : pa.k_min;
        k = k < 1.0 ? k : 1.0;
      } else {
        const double t = 1.0 - tanh(pa.alpha * (r - 1.0));
        k = t > pa.k_min ? t : pa.k_min;  // max(t, k_min), then min(., 1)
        k = k < 1.0 ? k : 1.0;
      }
    }
    stats[2 * G + m] = r;
    stats[3 * G + m] = 1.0 + w * (k - 1.0);
    stats[4 * G + m] = conflict ? 1.0 : 0.0;
  }
  stats[5 * G] = 0.0;
}

// ------------------------------------------------------------------ CPU path (cp_cpu.cpp)
// Number of OpenMP threads the CPU path would use (1 without OpenMP).
int cpu_num_threads();
// "avx2" when the AVX2/FMA/F16C kernels are used on this machine, else "generic".
const char* cpu_isa();
// Force the CPU kernels: "auto", "generic" or "avx2"; false when the machine lacks AVX2.
bool set_cpu_isa(const std::string& isa);

// Checks a host-side chunk table and group info (throws std::invalid_argument naming the
// argument). Returns the total element count.
int64_t validate_table(const int64_t* table, int64_t n_chunks, const int64_t* group_info, int G);

// The compute entry points below trust their arguments: bindings.cpp checks them once.
// stats <- CP statistics; partials[n_chunks] is a workspace; with `scale`, the scale pass
// follows in the same OpenMP region. n_threads <= 0: OpenMP default.
void cp_stats_cpu(const int64_t* table, int64_t n_chunks, const int64_t* group_info, int G,
                  double* partials, double* stats, double* state, const double* ctl, const PenaltyArgs& pa,
                  bool scale, int n_threads);
// grad <- (float)k[group] * grad for every chunk (chunks whose factor is exactly 1 are skipped).
void cp_scale_cpu(const int64_t* table, int64_t n_chunks, int G, const double* stats, int n_threads);

// ------------------------------------------------------------------ CUDA path (cp_cuda.cu)
#ifdef CPSL_WITH_CUDA
// CUDA devices visible at run time (0 when no driver or no device); never throws.
int cuda_device_count();
// Runtime/driver versions, "" when unavailable.
std::string cuda_runtime_info();

// "" when the kernels can run on CUDA device `device` (a device is visible, the driver
// supports the runtime cpsl._C was linked with, and the binary holds SASS or PTX for the
// device's compute capability); otherwise the reason. Never throws.
std::string cuda_usable(int device);

// Where a pointer lives: -1 plain host memory (or no CUDA context), -2 pinned host memory,
// -3 managed memory, d >= 0 device memory of CUDA device d.
int cuda_pointer_location(const void* p);

// A nonzero number unique to the stream capture `stream` is part of (its capture id + 1), 0
// when it is not capturing (or is the legacy default stream, which cannot capture). Throws on
// a CUDA error.
unsigned long long cuda_capture_id(std::uintptr_t stream);

// All pointers are device pointers (table, group_info: device copies of validated tables).
// With `scale`, the scale kernel is launched after the stats kernel on the same stream.
void cp_stats_cuda(const int64_t* table, int64_t n_chunks, const int64_t* group_info, int G,
                   double* partials, unsigned int* counter, double* stats, double* state,
                   const double* ctl, const PenaltyArgs& pa, bool scale, int device, std::uintptr_t stream);
void cp_scale_cuda(const int64_t* table, int64_t n_chunks, int G, const double* stats, int device,
                   std::uintptr_t stream);
#endif

}  // namespace cpsl
