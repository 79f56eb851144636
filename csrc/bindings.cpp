// pybind11 boundary of cpsl._C. No libtorch: tensors cross as raw pointers + sizes,
// CUDA streams as integers; Python owns all memory (cpsl/cp/native.py builds the tables
// and workspaces). Argument errors raise ValueError naming the argument.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cp.h"
#ifdef CPSL_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;
using uptr = std::uintptr_t;

#ifndef CPSL_CUDA_ARCHS_STR
#define CPSL_CUDA_ARCHS_STR "?"
#endif
#ifndef CPSL_VERSION_INFO
#define CPSL_VERSION_INFO "dev"
#endif

// Bumped when the table layout or a function signature below changes.
static constexpr int kCpAbi = 4;  // 3: trailing (state, ema, ema_beta) of the stats entry points;
                                  // 4: trailing ctl (penalty control block), cuda_capture_id

static py::dict build_info() {
  py::dict d;
  d["version"] = CPSL_VERSION_INFO;
#ifdef CPSL_WITH_CUDA
  d["cuda"] = true;
  d["cuda_compiled_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
  d["cuda_devices"] = cpsl::cuda_device_count();
  d["cuda_runtime"] = cpsl::cuda_runtime_info();
  d["cuda_archs"] = CPSL_CUDA_ARCHS_STR;
#else
  d["cuda"] = false;
  d["cuda_compiled_version"] = py::none();
  d["cuda_devices"] = 0;
  d["cuda_runtime"] = py::none();
  d["cuda_archs"] = py::none();
#endif
#ifdef CPSL_WITH_OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["cpu_threads"] = cpsl::cpu_num_threads();
  d["cp_abi"] = kCpAbi;
  d["cpu_isa"] = std::string(cpsl::cpu_isa());
  return d;
}

namespace {

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument(msg); }

template <class T>
T* ptr_arg(uptr p, const char* name, bool required = true) {
  if (required && p == 0) bad(std::string(name) + " is a null pointer");
  return reinterpret_cast<T*>(p);
}

cpsl::PenaltyArgs penalty(double tau, double alpha, double k_min, double beta, bool fixed, bool normalize, double w,
                          bool ema, double ema_beta) {
  if (ema && !(ema_beta >= 0.0 && ema_beta < 1.0)) bad("ema_beta must be in [0, 1), got " + std::to_string(ema_beta));
  return cpsl::PenaltyArgs{tau, alpha, k_min, beta, w, fixed ? 1 : 0, normalize ? 1 : 0, ema ? 1 : 0, ema_beta};
}

int groups_arg(int64_t n_groups) {
  if (n_groups < 1 || n_groups > cpsl::kMaxGroups)
    bad("n_groups must be in [1, " + std::to_string(cpsl::kMaxGroups) + "], got " + std::to_string(n_groups));
  return static_cast<int>(n_groups);
}

// Validates a host copy of the chunk table; with check_residency (and a CUDA build), also
// where every chunk's memory lives: host memory for device == -1, memory of CUDA device
// `device` otherwise. Returns the total element count.
int64_t validate(uptr table, int64_t n_chunks, uptr group_info, int64_t n_groups, int device, bool check_residency) {
  const int G = groups_arg(n_groups);
  const int64_t* t = ptr_arg<const int64_t>(table, "table", n_chunks > 0);
  const int64_t total = cpsl::validate_table(t, n_chunks, ptr_arg<const int64_t>(group_info, "group_info"), G);
  if (device < -1) bad("device must be -1 (CPU) or a CUDA device index, got " + std::to_string(device));
#ifdef CPSL_WITH_CUDA
  if (check_residency) {
    for (int64_t c = 0; c < n_chunks; ++c) {
      const void* p = reinterpret_cast<const void*>(static_cast<uptr>(t[cpsl::kRowSize * c]));
      const int loc = cpsl::cuda_pointer_location(p);
      const std::string where = "table row " + std::to_string(c);
      if (device == -1 && loc >= 0)
        bad(where + ": data pointer is memory of CUDA device " + std::to_string(loc) +
            " but the CPU path was asked for");
      if (device >= 0 && loc != device && loc != -3)
        bad(where + ": data pointer is not memory of CUDA device " + std::to_string(device) +
            (loc >= 0 ? " (it is on device " + std::to_string(loc) + ")" : " (it is host memory)"));
    }
  }
#else
  (void)check_residency;
  if (device >= 0) bad("cpsl._C was built without CUDA: device must be -1");
#endif
  return total;
}

#ifndef CPSL_WITH_CUDA
[[noreturn]] void no_cuda() { throw std::runtime_error("cpsl._C was built without CUDA (no nvcc at build time)"); }
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cpsl native core (Conflict-aware Penalty kernels)";
  m.def("build_info", &build_info,
        "How this extension was built: CUDA compiled in, OpenMP, CUDA devices visible now, CPU kernels.");

  m.attr("CP_ABI") = kCpAbi;
  m.attr("ROW_SIZE") = cpsl::kRowSize;
  m.attr("GROUP_INFO_SIZE") = cpsl::kGroupInfoSize;
  m.attr("MAX_GROUPS") = cpsl::kMaxGroups;
  m.attr("CTL_SIZE") = cpsl::kCtlSize;
  py::dict codes;
  codes["float32"] = static_cast<int>(cpsl::kFloat32);
  codes["float16"] = static_cast<int>(cpsl::kFloat16);
  codes["bfloat16"] = static_cast<int>(cpsl::kBFloat16);
  m.attr("DTYPE_CODES") = codes;

  m.def(
      "cuda_usable",
      [](int device) -> std::string {
#ifdef CPSL_WITH_CUDA
        return cpsl::cuda_usable(device);
#else
        (void)device;
        return "cpsl._C was built without CUDA (no nvcc at build time)";
#endif
      },
      py::arg("device"),
      "'' when the CUDA kernels can run on `device` (device visible, driver new enough, code for its "
      "compute capability compiled in); otherwise the reason.",
      py::call_guard<py::gil_scoped_release>());

  m.def("cpu_isa", []() { return std::string(cpsl::cpu_isa()); }, "CPU kernels in use: 'avx2' or 'generic'.");
  m.def("set_cpu_isa", &cpsl::set_cpu_isa, py::arg("isa"),
        "Force the CPU kernels ('auto', 'generic', 'avx2'); False when the machine lacks AVX2.");

  m.def("cp_validate", &validate, py::arg("table"), py::arg("n_chunks"), py::arg("group_info"),
        py::arg("n_groups"), py::arg("device") = -1, py::arg("check_residency") = false,
        "Check a host chunk table + group info (and, optionally, where the chunks' memory lives). "
        "Returns the total element count.",
        py::call_guard<py::gil_scoped_release>());

  m.def(
      "cp_stats_cpu",
      [](uptr table, int64_t n_chunks, uptr group_info, int64_t n_groups, uptr partials, uptr stats, double tau,
         double alpha, double k_min, double beta, bool fixed, bool normalize, double w, int n_threads, uptr state,
         bool ema, double ema_beta, uptr ctl) {
        const int G = groups_arg(n_groups);
        cpsl::cp_stats_cpu(ptr_arg<const int64_t>(table, "table", n_chunks > 0), n_chunks,
                           ptr_arg<const int64_t>(group_info, "group_info"), G,
                           ptr_arg<double>(partials, "partials", n_chunks > 0), ptr_arg<double>(stats, "stats"),
                           ptr_arg<double>(state, "state", ema), ptr_arg<const double>(ctl, "ctl", false),
                           penalty(tau, alpha, k_min, beta, fixed, normalize, w, ema, ema_beta), n_threads);
      },
      py::arg("table"), py::arg("n_chunks"), py::arg("group_info"), py::arg("n_groups"), py::arg("partials"),
      py::arg("stats"), py::arg("tau"), py::arg("alpha"), py::arg("k_min"), py::arg("beta"), py::arg("fixed"),
      py::arg("normalize"), py::arg("w"), py::arg("n_threads") = 0, py::arg("state") = 0, py::arg("ema") = false,
      py::arg("ema_beta") = 0.9, py::arg("ctl") = 0,
      "stats[5G+1] <- CP statistics of the chunks (CPU, OpenMP); with ema, the signal state[2G] "
      "(EMA | count) is read and updated in place (state may be 0 otherwise); ctl: 0 or the penalty control "
      "block float64 [2] (w, on), read in place of w.", py::call_guard<py::gil_scoped_release>());

  m.def(
      "cp_scale_cpu",
      [](uptr table, int64_t n_chunks, int64_t n_groups, uptr stats, int n_threads) {
        const int G = groups_arg(n_groups);
        cpsl::cp_scale_cpu(ptr_arg<const int64_t>(table, "table", n_chunks > 0), n_chunks, G,
                           ptr_arg<const double>(stats, "stats"), n_threads);
      },
      py::arg("table"), py::arg("n_chunks"), py::arg("n_groups"), py::arg("stats"), py::arg("n_threads") = 0,
      "grad <- (float)k[group] * grad for every chunk (CPU, OpenMP).", py::call_guard<py::gil_scoped_release>());

  m.def(
      "cp_step_cpu",
      [](uptr table, int64_t n_chunks, uptr group_info, int64_t n_groups, uptr partials, uptr stats, double tau,
         double alpha, double k_min, double beta, bool fixed, bool normalize, double w, int n_threads, uptr state,
         bool ema, double ema_beta, uptr ctl) {
        const int G = groups_arg(n_groups);
        cpsl::cp_step_cpu(ptr_arg<const int64_t>(table, "table", n_chunks > 0), n_chunks,
                          ptr_arg<const int64_t>(group_info, "group_info"), G,
                          ptr_arg<double>(partials, "partials", n_chunks > 0), ptr_arg<double>(stats, "stats"),
                          ptr_arg<double>(state, "state", ema), ptr_arg<const double>(ctl, "ctl", false),
                          penalty(tau, alpha, k_min, beta, fixed, normalize, w, ema, ema_beta), n_threads);
      },
      py::arg("table"), py::arg("n_chunks"), py::arg("group_info"), py::arg("n_groups"), py::arg("partials"),
      py::arg("stats"), py::arg("tau"), py::arg("alpha"), py::arg("k_min"), py::arg("beta"), py::arg("fixed"),
      py::arg("normalize"), py::arg("w"), py::arg("n_threads") = 0, py::arg("state") = 0, py::arg("ema") = false,
      py::arg("ema_beta") = 0.9, py::arg("ctl") = 0,
      "cp_stats_cpu then cp_scale_cpu in one OpenMP region.", py::call_guard<py::gil_scoped_release>());

  m.def(
      "cp_stats_cuda",
      [](uptr table, int64_t n_chunks, uptr group_info, int64_t n_groups, uptr partials, uptr counter, uptr stats,
         double tau, double alpha, double k_min, double beta, bool fixed, bool normalize, double w, int device,
         uptr stream, uptr state, bool ema, double ema_beta, uptr ctl) {
        const int G = groups_arg(n_groups);
#ifdef CPSL_WITH_CUDA
        cpsl::cp_stats_cuda(ptr_arg<const int64_t>(table, "table", n_chunks > 0), n_chunks,
                            ptr_arg<const int64_t>(group_info, "group_info"), G,
                            ptr_arg<double>(partials, "partials", n_chunks > 0),
                            ptr_arg<unsigned int>(counter, "counter"), ptr_arg<double>(stats, "stats"),
                            ptr_arg<double>(state, "state", ema), ptr_arg<const double>(ctl, "ctl", false),
                            penalty(tau, alpha, k_min, beta, fixed, normalize, w, ema, ema_beta), device, stream);
#else
        (void)table; (void)n_chunks; (void)group_info; (void)G; (void)partials; (void)counter; (void)stats;
        (void)tau; (void)alpha; (void)k_min; (void)beta; (void)fixed; (void)normalize; (void)w; (void)device;
        (void)stream; (void)state; (void)ema; (void)ema_beta; (void)ctl;
        no_cuda();
#endif
      },
      py::arg("table"), py::arg("n_chunks"), py::arg("group_info"), py::arg("n_groups"), py::arg("partials"),
      py::arg("counter"), py::arg("stats"), py::arg("tau"), py::arg("alpha"), py::arg("k_min"), py::arg("beta"),
      py::arg("fixed"), py::arg("normalize"), py::arg("w"), py::arg("device"), py::arg("stream"),
      py::arg("state") = 0, py::arg("ema") = false, py::arg("ema_beta") = 0.9, py::arg("ctl") = 0,
      "One launch on `stream`: every group's sum of squares and the penalty factors into stats (device pointers); "
      "with ema, the signal state[2G] is updated in place on the device; ctl: 0 or the device penalty control "
      "block float64 [2] (w, on), read by the kernel in place of w (a graph replay follows it).");

  m.def(
      "cuda_capture_id",
      [](uptr stream) -> unsigned long long {
#ifdef CPSL_WITH_CUDA
        return cpsl::cuda_capture_id(stream);
#else
        (void)stream;
        return 0ull;
#endif
      },
      py::arg("stream"),
      "A nonzero number unique to the CUDA stream capture `stream` (an integer handle) is part of; 0 when it "
      "is not capturing (always 0 without CUDA).");

  m.def(
      "cp_scale_cuda",
      [](uptr table, int64_t n_chunks, int64_t n_groups, uptr stats, int device, uptr stream) {
        const int G = groups_arg(n_groups);
#ifdef CPSL_WITH_CUDA
        cpsl::cp_scale_cuda(ptr_arg<const int64_t>(table, "table", n_chunks > 0), n_chunks, G,
                            ptr_arg<const double>(stats, "stats"), device, stream);
#else
        (void)table; (void)n_chunks; (void)G; (void)stats; (void)device; (void)stream;
        no_cuda();
#endif
      },
      py::arg("table"), py::arg("n_chunks"), py::arg("n_groups"), py::arg("stats"), py::arg("device"),
      py::arg("stream"), "grad <- (float)k[group] * grad on `stream` (device pointers).");
}
