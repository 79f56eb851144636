// pybind11 boundary of cpsl._C. No libtorch: tensors cross as raw pointers + sizes,
// CUDA streams as integers; Python owns all memory (cpsl/cp/native.py builds the tables
// and workspaces). This is the one C++ checking layer: every argument is checked here, once
// (argument errors raise ValueError naming the argument), and cp_cpu.cpp / cp_cuda.cu trust it.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

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
static constexpr int kCpAbi = 5;  // 3: trailing (state, ema, ema_beta) of the stats entry points;
                                  // 4: trailing ctl (penalty control block), cuda_capture_id;
                                  // 5: one packed penalty argument (PENALTY_FIELDS, mode with ratio),
                                  //    one cp_stats / cp_scale entry for CPU and CUDA

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

// The packed penalty argument (kPenaltyFields order), unpacked and checked once.
cpsl::PenaltyArgs penalty_arg(const std::vector<double>& v) {
  if (static_cast<int>(v.size()) != cpsl::kPenaltySize)
    bad("penalty must hold " + std::to_string(cpsl::kPenaltySize) + " values (PENALTY_FIELDS), got " +
        std::to_string(v.size()));
  const cpsl::PenaltyArgs pa{v[0], v[1], v[2], v[3], v[4], static_cast<int>(v[5]), v[6] != 0.0 ? 1 : 0,
                             v[7] != 0.0 ? 1 : 0, v[8]};
  if (!(v[5] >= 0.0 && v[5] < cpsl::kNumPenaltyModes) || pa.mode != v[5])
    bad("penalty mode must be 0 (tanh), 1 (fixed) or 2 (ratio), got " + std::to_string(v[5]));
  if (pa.ema && !(pa.ema_beta >= 0.0 && pa.ema_beta < 1.0))
    bad("ema_beta must be in [0, 1), got " + std::to_string(pa.ema_beta));
  return pa;
}

int64_t chunks_arg(int64_t n_chunks) {
  if (n_chunks < 0) bad("n_chunks must be >= 0, got " + std::to_string(n_chunks));
  return n_chunks;
}

int groups_arg(int64_t n_groups) {
  if (n_groups < 1 || n_groups > cpsl::kMaxGroups)
    bad("n_groups must be in [1, " + std::to_string(cpsl::kMaxGroups) + "], got " + std::to_string(n_groups));
  return static_cast<int>(n_groups);
}

#ifndef CPSL_WITH_CUDA
[[noreturn]] void no_cuda() { throw std::runtime_error("cpsl._C was built without CUDA (no nvcc at build time)"); }
#endif

int device_arg(int device) {
  if (device < -1) bad("device must be -1 (CPU) or a CUDA device index, got " + std::to_string(device));
#ifndef CPSL_WITH_CUDA
  if (device >= 0) no_cuda();
#endif
  return device;
}

// Validates a host copy of the chunk table; with check_residency (and a CUDA build), also
// where every chunk's memory lives: host memory for device == -1, memory of CUDA device
// `device` otherwise. Returns the total element count.
int64_t validate(uptr table, int64_t n_chunks, uptr group_info, int64_t n_groups, int device, bool check_residency) {
  const int G = groups_arg(n_groups);
  const int64_t* t = ptr_arg<const int64_t>(table, "table", chunks_arg(n_chunks) > 0);
  const int64_t total = cpsl::validate_table(t, n_chunks, ptr_arg<const int64_t>(group_info, "group_info"), G);
  device_arg(device);
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
#endif
  return total;
}

// One step's statistics (and, with scale, the scale pass) on the CPU (device -1) or on CUDA
// device `device` (pointers are then device pointers, `stream` a cudaStream_t as an integer).
void stats_entry(uptr table, int64_t n_chunks, uptr group_info, int64_t n_groups, uptr partials, uptr stats,
                 const std::vector<double>& penalty, int device, uptr stream, uptr counter, uptr state, uptr ctl,
                 bool scale, int n_threads) {
  const int G = groups_arg(n_groups);
  const bool some = chunks_arg(n_chunks) > 0;
  const cpsl::PenaltyArgs pa = penalty_arg(penalty);
  const auto* t = ptr_arg<const int64_t>(table, "table", some);
  const auto* gi = ptr_arg<const int64_t>(group_info, "group_info");
  auto* part = ptr_arg<double>(partials, "partials", some);
  auto* out = ptr_arg<double>(stats, "stats");
  auto* st = ptr_arg<double>(state, "state", pa.ema != 0);
  const auto* c = ptr_arg<const double>(ctl, "ctl", false);
  auto* count = ptr_arg<unsigned int>(counter, "counter", device_arg(device) >= 0);
  py::gil_scoped_release nogil;
  if (device == -1) {
    cpsl::cp_stats_cpu(t, n_chunks, gi, G, part, out, st, c, pa, scale, n_threads);
    return;
  }
#ifdef CPSL_WITH_CUDA
  cpsl::cp_stats_cuda(t, n_chunks, gi, G, part, count, out, st, c, pa, scale, device, stream);
#else
  (void)stream; (void)count;
#endif
}

// grad <- (float)k[group] * grad, on the CPU (device -1) or on CUDA device `device`.
void scale_entry(uptr table, int64_t n_chunks, int64_t n_groups, uptr stats, int device, uptr stream,
                 int n_threads) {
  const int G = groups_arg(n_groups);
  const auto* t = ptr_arg<const int64_t>(table, "table", chunks_arg(n_chunks) > 0);
  const auto* k = ptr_arg<const double>(stats, "stats");
  device_arg(device);
  py::gil_scoped_release nogil;
  if (device == -1) {
    cpsl::cp_scale_cpu(t, n_chunks, G, k, n_threads);
    return;
  }
#ifdef CPSL_WITH_CUDA
  cpsl::cp_scale_cuda(t, n_chunks, G, k, device, stream);
#else
  (void)stream;
#endif
}

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

  m.attr("PENALTY_FIELDS") = py::cast(std::vector<std::string>(cpsl::kPenaltyFields,
                                                                 cpsl::kPenaltyFields + cpsl::kPenaltySize));
  py::dict modes;
  modes["tanh"] = static_cast<int>(cpsl::kPenaltyTanh);
  modes["fixed"] = static_cast<int>(cpsl::kPenaltyFixed);
  modes["ratio"] = static_cast<int>(cpsl::kPenaltyRatio);
  m.attr("PENALTY_MODES") = modes;

  m.def("cp_stats", &stats_entry, py::arg("table"), py::arg("n_chunks"), py::arg("group_info"), py::arg("n_groups"),
        py::arg("partials"), py::arg("stats"), py::arg("penalty"), py::arg("device") = -1, py::arg("stream") = 0,
        py::arg("counter") = 0, py::arg("state") = 0, py::arg("ctl") = 0, py::arg("scale") = false,
        py::arg("n_threads") = 0,
        "stats[5G+1] <- CP statistics of the chunks and the penalty stage; `penalty`: the packed scalars "
        "(PENALTY_FIELDS order). device -1: CPU (OpenMP, n_threads <= 0: its default); device d >= 0: one launch "
        "on CUDA device d's `stream` (device pointers; `counter`: the uint32 last-block-done counter). With ema, "
        "the signal state[2G] is read and updated in place (state may be 0 otherwise); ctl: 0 or the penalty "
        "control block float64 [2] (w, on), read when the kernel runs in place of w (a graph replay follows it). "
        "scale: the scale pass follows (one OpenMP region on CPU, a second launch on CUDA).");

  m.def("cp_scale", &scale_entry, py::arg("table"), py::arg("n_chunks"), py::arg("n_groups"), py::arg("stats"),
        py::arg("device") = -1, py::arg("stream") = 0, py::arg("n_threads") = 0,
        "grad <- (float)k[group] * grad for every chunk, k from stats (device -1: CPU, else CUDA device pointers "
        "on `stream`).");

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
}
