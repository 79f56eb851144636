// CPU path of the cpsl native core: Conflict-aware Penalty statistics and scaling.
//
// Work decomposition: the chunk table (see cp.h) is processed with OpenMP, one chunk at a
// time per thread (dynamic schedule). Each chunk's sum of squares lands in its own slot of
// the `partials` workspace, and the per-group sums add those slots in table order, so the
// result is the same bits whatever the number of threads. Inner loops run 64 fp32 lanes
// over runs of 8 elements per lane and flush them into 64 float64 lanes (accurate to about
// 1e-7 relative even for very large groups, and vectorised by the compiler). On x86-64 the
// kernels are compiled twice, for the baseline ISA and for AVX2+FMA+F16C, and the best one
// the machine supports is picked at run time (override: CPSL_CPU_ISA=generic|avx2 or
// set_cpu_isa()).
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cp.h"
#ifdef CPSL_WITH_OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__)
#define CPSL_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define CPSL_ALWAYS_INLINE inline
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define CPSL_X86_DISPATCH 1
#define CPSL_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace cpsl {

int cpu_num_threads() {
#ifdef CPSL_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

namespace {

// ------------------------------------------------------------------ element access
struct F32 {
  using T = float;
  static CPSL_ALWAYS_INLINE float get(const T* p, int64_t i) { return p[i]; }
  static CPSL_ALWAYS_INLINE void put(T* p, int64_t i, float v) { p[i] = v; }
};
struct F16 {
  using T = uint16_t;
  static CPSL_ALWAYS_INLINE float get(const T* p, int64_t i) { return half_to_float(p[i]); }
  static CPSL_ALWAYS_INLINE void put(T* p, int64_t i, float v) { p[i] = float_to_half(v); }
};
struct BF16 {
  using T = uint16_t;
  static CPSL_ALWAYS_INLINE float get(const T* p, int64_t i) { return bf16_to_float(p[i]); }
  static CPSL_ALWAYS_INLINE void put(T* p, int64_t i, float v) { p[i] = float_to_bf16(v); }
};

constexpr int kLanes = 64;  // independent accumulators (8 AVX2 registers of fp32): loads in flight
constexpr int kRun = 8;     // fp32 terms per lane before the flush into float64

template <class A>
CPSL_ALWAYS_INLINE double sumsq_impl(const typename A::T* x, int64_t n) {
  double dacc[kLanes];
  for (int l = 0; l < kLanes; ++l) dacc[l] = 0.0;
  constexpr int64_t kBlock = int64_t(kLanes) * kRun;
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    float acc[kLanes];
    for (int l = 0; l < kLanes; ++l) acc[l] = 0.0f;
    for (int r = 0; r < kRun; ++r) {
      const typename A::T* p = x + i + r * kLanes;
      for (int l = 0; l < kLanes; ++l) {
        const float v = A::get(p, l);
        acc[l] += v * v;
      }
    }
    for (int l = 0; l < kLanes; ++l) dacc[l] += static_cast<double>(acc[l]);
  }
  // squares are float32 everywhere (as in the blocks above and on CUDA), so the overflow
  // threshold of the guard (an entry above ~1.8e19) does not depend on where an entry sits
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = A::get(x + i, l);
      dacc[l] += static_cast<double>(v * v);
    }
  }
  double tail = 0.0;
  for (; i < n; ++i) {
    const float v = A::get(x, i);
    tail += static_cast<double>(v * v);
  }
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) dacc[l] += dacc[l + w];
  return dacc[0] + tail;
}

template <class A>
CPSL_ALWAYS_INLINE void scale_impl(typename A::T* x, int64_t n, float k) {
  for (int64_t i = 0; i < n; ++i) A::put(x, i, A::get(x, i) * k);
}

using SumsqFn = double (*)(const void*, int64_t, int64_t);
using ScaleFn = void (*)(void*, int64_t, int64_t, float);

#define CPSL_SUMSQ_BODY                                                   \
  switch (dtype) {                                                        \
    case kFloat32: return sumsq_impl<F32>(static_cast<const float*>(p), n); \
    case kFloat16: return sumsq_impl<F16>(static_cast<const uint16_t*>(p), n); \
    default: return sumsq_impl<BF16>(static_cast<const uint16_t*>(p), n); \
  }
#define CPSL_SCALE_BODY                                                     \
  switch (dtype) {                                                          \
    case kFloat32: scale_impl<F32>(static_cast<float*>(p), n, k); break;    \
    case kFloat16: scale_impl<F16>(static_cast<uint16_t*>(p), n, k); break; \
    default: scale_impl<BF16>(static_cast<uint16_t*>(p), n, k); break;      \
  }

double sumsq_generic(const void* p, int64_t n, int64_t dtype) { CPSL_SUMSQ_BODY }
void scale_generic(void* p, int64_t n, int64_t dtype, float k) { CPSL_SCALE_BODY }
#ifdef CPSL_X86_DISPATCH
CPSL_TARGET_AVX2 double sumsq_avx2(const void* p, int64_t n, int64_t dtype) { CPSL_SUMSQ_BODY }
CPSL_TARGET_AVX2 void scale_avx2(void* p, int64_t n, int64_t dtype, float k) { CPSL_SCALE_BODY }
#endif

bool machine_has_avx2() {
#ifdef CPSL_X86_DISPATCH
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// 0 generic, 1 avx2
int default_isa() {
  const char* env = std::getenv("CPSL_CPU_ISA");
  if (env && std::string(env) == "generic") return 0;
  return machine_has_avx2() ? 1 : 0;
}
std::atomic<int> g_isa{-1};

int current_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = default_isa();
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return isa;
}

SumsqFn sumsq_fn() {
#ifdef CPSL_X86_DISPATCH
  if (current_isa() == 1) return &sumsq_avx2;
#endif
  return &sumsq_generic;
}
ScaleFn scale_fn() {
#ifdef CPSL_X86_DISPATCH
  if (current_isa() == 1) return &scale_avx2;
#endif
  return &scale_generic;
}

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument(msg); }

constexpr int64_t kParallelMin = 1 << 15;  // below this many elements, one thread

int resolve_threads(int n_threads, const int64_t* table, int64_t n_chunks) {
  int64_t total = 0;
  for (int64_t c = 0; c < n_chunks; ++c) total += table[kRowSize * c + 1];
  if (total < kParallelMin) return 1;
  if (n_threads <= 0) n_threads = cpu_num_threads();
  return n_threads < 1 ? 1 : n_threads;
}

// The whole CPU step. do_stats / do_scale select the passes.
void run_cpu(const int64_t* table, int64_t n_chunks, const int64_t* group_info, int G,
             double* partials, double* stats, double* state, const double* ctl, const PenaltyArgs* pa,
             int n_threads, bool do_stats, bool do_scale) {
  const SumsqFn fsum = sumsq_fn();
  const ScaleFn fscale = scale_fn();
  const int nt = resolve_threads(n_threads, table, n_chunks);
  std::atomic<int64_t> bad_row{-1};
  (void)nt;
#ifdef CPSL_WITH_OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
  {
    if (do_stats) {
#ifdef CPSL_WITH_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t* row = table + kRowSize * c;
        const int64_t dt = row[2];
        if (dt < 0 || dt >= kNumDTypes || row[3] < 0 || row[3] >= G || row[0] == 0 || row[1] < 0) {
          bad_row.store(c);
          partials[c] = 0.0;
          continue;
        }
        partials[c] = fsum(reinterpret_cast<const void*>(static_cast<std::uintptr_t>(row[0])), row[1], dt);
      }
#ifdef CPSL_WITH_OPENMP
#pragma omp single
#endif
      {
        for (int m = 0; m < G; ++m) {
          const int64_t b = group_info[kGroupInfoSize * m + 1];
          const int64_t e = group_info[kGroupInfoSize * m + 2];
          double s = 0.0;
          for (int64_t c = b; c < e && c < n_chunks; ++c) s += partials[c];
          stats[m] = s;
        }
        penalty_stage(stats, group_info, G, *pa, stats, state, ctl);
      }  // implicit barrier: every thread sees the factors
    }
    if (do_scale) {
#ifdef CPSL_WITH_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
      for (int64_t i = 0; i < n_chunks; ++i) {
        // last chunk first: right after the stats pass, the chunks it read last are the
        // ones most likely still in cache
        const int64_t c = n_chunks - 1 - i;
        const int64_t* row = table + kRowSize * c;
        const int64_t dt = row[2], g = row[3];
        if (dt < 0 || dt >= kNumDTypes || g < 0 || g >= G || row[0] == 0 || row[1] < 0) {
          bad_row.store(c);
          continue;
        }
        const float k = static_cast<float>(stats[3 * G + g]);
        if (k == 1.0f) continue;  // x * 1.0f == x: nothing to write
        fscale(reinterpret_cast<void*>(static_cast<std::uintptr_t>(row[0])), row[1], dt, k);
      }
    }
  }
  const int64_t b = bad_row.load();
  if (b >= 0)
    bad("table row " + std::to_string(b) +
        ": invalid entry (null pointer, negative size, dtype code or group id out of range)");
}

}  // namespace

const char* cpu_isa() { return current_isa() == 1 ? "avx2" : "generic"; }

bool set_cpu_isa(const std::string& isa) {
  if (isa == "auto") {
    g_isa.store(default_isa());
  } else if (isa == "generic") {
    g_isa.store(0);
  } else if (isa == "avx2") {
    if (!machine_has_avx2()) return false;
    g_isa.store(1);
  } else {
    bad("isa must be 'auto', 'generic' or 'avx2', got '" + isa + "'");
  }
  return true;
}

int64_t validate_table(const int64_t* table, int64_t n_chunks, const int64_t* group_info, int G) {
  static const int64_t esize[kNumDTypes] = {4, 2, 2};
  int64_t prev_group = 0, total = 0;
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t* row = table + kRowSize * c;
    const std::string where = "table row " + std::to_string(c);
    if (row[2] < 0 || row[2] >= kNumDTypes)
      bad(where + ": bad dtype code " + std::to_string(row[2]) + " (0 float32, 1 float16, 2 bfloat16)");
    if (row[3] < 0 || row[3] >= G)
      bad(where + ": group id " + std::to_string(row[3]) + " out of range [0, " + std::to_string(G) + ")");
    if (row[0] == 0) bad(where + ": null data pointer");
    if (row[0] % esize[row[2]] != 0) bad(where + ": data pointer not aligned to its dtype");
    if (row[1] <= 0) bad(where + ": chunk length must be > 0, got " + std::to_string(row[1]));
    if (row[3] < prev_group) bad(where + ": rows must be ordered by group id");
    prev_group = row[3];
    total += row[1];
  }
  int64_t expect_begin = 0;
  for (int m = 0; m < G; ++m) {
    const int64_t* gi = group_info + kGroupInfoSize * m;
    const std::string where = "group_info row " + std::to_string(m);
    if (gi[1] != expect_begin || gi[2] < gi[1] || gi[2] > n_chunks)
      bad(where + ": chunk range [" + std::to_string(gi[1]) + ", " + std::to_string(gi[2]) +
          ") does not continue the previous group's range (sizes mismatch with the table)");
    int64_t n = 0;
    for (int64_t c = gi[1]; c < gi[2]; ++c) {
      if (table[kRowSize * c + 3] != m) bad(where + ": chunk " + std::to_string(c) + " belongs to another group");
      n += table[kRowSize * c + 1];
    }
    if (n != gi[0])
      bad(where + ": element count " + std::to_string(gi[0]) + " does not match its chunks (" +
          std::to_string(n) + ")");
    expect_begin = gi[2];
  }
  if (expect_begin != n_chunks) bad("group_info: chunk ranges cover " + std::to_string(expect_begin) +
                                    " rows but the table has " + std::to_string(n_chunks));
  return total;
}

void cp_stats_cpu(const int64_t* table, int64_t n_chunks, const int64_t* group_info, int G,
                  double* partials, double* stats, double* state, const double* ctl, const PenaltyArgs& pa,
                  bool scale, int n_threads) {
  run_cpu(table, n_chunks, group_info, G, partials, stats, state, ctl, &pa, n_threads, true, scale);
}

void cp_scale_cpu(const int64_t* table, int64_t n_chunks, int G, const double* stats, int n_threads) {
  run_cpu(table, n_chunks, nullptr, G, nullptr, const_cast<double*>(stats), nullptr, nullptr, nullptr, n_threads,
          false, true);
}

}  // namespace cpsl
