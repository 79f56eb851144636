"""``native`` CP backend: the fused multi-tensor kernels of the ``cpsl._C`` extension (csrc/).

One call computes every group's sum of squares over the whole gradient list *and* the
penalty stage (ghat, r, conflict flags, k factors, guard) into the stats buffer of
:mod:`cpsl.cp.core`; a second light pass scales the gradients by their group's factor.
On CUDA the stats pass is ONE kernel launch (last-block-done reduction, no host
synchronisation, CUDA-graph capturable); on CPU it is one OpenMP region (``step_`` also
fuses the scale pass into it). Results are deterministic: bit-identical run to run and
independent of the number of CPU threads / CUDA blocks.

How to call it::

    from cpsl.cp import native
    ok, why = native.available()                 # (False, reason) when cpsl._C lacks the kernels
    stats = native.cp_stats(grads, group_index, n_groups, p, w)    # float64 [5G+1]
    native.cp_scale_(grads, group_index, stats, n_groups)          # grad <- k[group] * grad
    stats = native.cp_step_(grads, group_index, n_groups, p, w)    # both (one call)
    # cp.signal=ema (p.ema): pass the signal state (core.signal_state), updated in place
    stats = native.cp_stats(grads, group_index, n_groups, p, w, state=state)
    # or as a registered backend: cpsl.cp.get_backend("native").compute(...) / .scale_(...)

The same functions are torch custom ops (``torch.ops.cpsl.cp_stats``, ``cp_scale_``,
``cp_step_``, and ``cp_stats_ema`` / ``cp_step_ema_`` that also mutate the signal state;
they take the present gradients only, no None) with fake kernels, so they
pass ``torch.library.opcheck`` and run inside ``torch.compile(fullgraph=True)``; the
functions above route through them when called under ``torch.compile``.

Contract:

* ``grads``: a list of tensors or ``None`` (frozen / unused parameters); present ones must
  be dense (contiguous, or non-overlapping and dense such as channels-last or a
  transpose: the kernels read the storage span), on one device (CPU or CUDA), of dtype
  float32, float16 or bfloat16 (one call may mix them; accumulation is fp32 over short
  runs, then float64).
* A plan (chunk table, group info, workspaces) is built on the first call for a gradient
  layout and cached, keyed by every gradient's (data pointer, byte size, dtype,
  contiguity) plus the group ids: later steps only compare that key. Gradients that lie
  back to back in memory (a :mod:`cpsl.cp.arena`) are merged into long runs. Up to
  ``MAX_PLANS`` layouts are kept (least recently used evicted); :func:`plan_builds`
  counts the builds. Keep gradient memory stable (``cpsl.cp.arena``) so that one plan
  serves a whole training run: with ``zero_grad(set_to_none=True)`` every step would
  build a new plan (on CUDA a host-to-device copy and a stream synchronisation).
* CUDA graphs: run one step before capturing (building a plan copies the table to the
  device; building one during a capture raises). A plan used during a capture is
  *pinned*: the graph holds raw pointers to its table and workspaces, so neither
  :func:`clear_cache` nor eviction frees it; :func:`release_graph_plans` does, once the
  graphs that used them are gone.
* Aliased gradients (one tensor twice, or overlapping memory, e.g. a shared parameter in
  two groups) are summed once per occurrence, like the reference, but the scale pass
  rejects them (ValueError): concurrent read-modify-writes of one element would race,
  where the reference applies k1 * k2. Use the ``foreach`` backend for such layouts.
* Scaling multiplies by ``(float)k`` in fp32 and rounds once to the gradient's dtype
  (for fp16/bf16 this is one rounding, where ``grad.mul_(k.to(dtype))`` rounds k first);
  chunks whose factor is exactly 1 are not touched.
* One plan's workspace is shared by its calls: do not run two steps over the same
  gradient layout concurrently on different CUDA streams or Python threads. Used on a
  stream other than the one it was built on, its tensors are ``record_stream``-ed there.
* Squares are fp32 on every path (CPU and CUDA, aligned or not): a gradient entry above
  ~1.8e19 overflows to inf and trips the guard (the reference, in float64, would not).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional, Sequence

import torch

from .core import Backend, PenaltyParams, check_state, register_backend, stats_size

CHUNK_CPU = 1 << 16  # elements per chunk-table row on CPU (work unit of one OpenMP iteration)
CHUNK_CUDA = 1 << 15  # elements per row on CUDA (work unit of one thread block)
MAX_PLANS = 8
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_NEEDED = ("cp_validate", "cp_stats_cpu", "cp_scale_cpu", "cp_step_cpu", "cp_stats_cuda", "cp_scale_cuda",
           "cuda_usable")
_ABI = 3

_ext = None
_ext_err: Optional[str] = None
_lock = threading.Lock()


def _load():
    """The extension module, or None (the reason is in ``_ext_err``)."""
    global _ext, _ext_err
    if _ext is not None or _ext_err is not None:
        return _ext
    try:
        from .. import _C  # type: ignore[attr-defined]
    except ImportError as e:
        _ext_err = f"cpsl._C is not importable ({e}); build it with `pip install --no-build-isolation .`"
        return None
    missing = [n for n in _NEEDED if not hasattr(_C, n)]
    if missing or getattr(_C, "CP_ABI", None) != _ABI:
        _ext_err = (f"cpsl._C at {getattr(_C, '__file__', '?')} is stale (missing {', '.join(missing) or 'nothing'}, "
                    f"CP_ABI {getattr(_C, 'CP_ABI', None)} != {_ABI}); reinstall with `pip install --no-build-isolation .`")
        return None
    _ext = _C
    return _ext


def _ext_or_raise():
    C = _load()
    if C is None:
        raise RuntimeError(f"native CP backend unavailable: {_ext_err}")
    return C


def available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(True, "") when the kernels can run (on ``device`` when given), else (False, why)."""
    C = _load()
    if C is None:
        return False, _ext_err or "cpsl._C unavailable"
    if device is not None and torch.device(device).type == "cuda":
        if not C.build_info()["cuda"]:
            return False, "cpsl._C was built without CUDA (no nvcc at build time)"
        dev = torch.device(device)
        why = C.cuda_usable(dev.index if dev.index is not None else 0)
        if why:
            return False, why
        if not torch.cuda.is_available():
            return False, "torch sees no CUDA device (cpsl._C does: torch and cpsl._C disagree on the driver)"
    return True, ""


def cpu_isa() -> str:
    """CPU kernels in use: 'avx2' or 'generic'."""
    return _ext_or_raise().cpu_isa()


def set_cpu_isa(isa: str) -> bool:
    """Force the CPU kernels ('auto', 'generic', 'avx2'); False when the machine lacks AVX2."""
    return _ext_or_raise().set_cpu_isa(isa)


# ------------------------------------------------------------------ plans (cached tables)
def _is_dense(g: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill [data_ptr, data_ptr + nbytes) exactly."""
    if g.is_contiguous():
        return True
    expect = 1
    for st, sz in sorted((st, sz) for st, sz in zip(g.stride(), g.shape) if sz != 1):
        if st != expect:
            return False
        expect *= sz
    return True


def _runs(grads, group_index, n_groups: int):
    """Per group, the memory runs [(address, elements, dtype code)] of its present gradients
    (back-to-back gradients of one dtype merged), the element counts, and a note when two
    gradients overlap in memory ('' otherwise)."""
    runs: list[list[list[int]]] = [[] for _ in range(n_groups)]
    numel = [0] * n_groups
    spans = []
    for i, g in enumerate(grads):
        if g is None or g.numel() == 0:
            continue
        m, n, esize, base, code = group_index[i], g.numel(), g.element_size(), g.data_ptr(), _DTYPE_CODES[g.dtype]
        spans.append((base, base + n * esize, i))
        last = runs[m][-1] if runs[m] else None
        if last is not None and last[2] == code and last[0] + last[1] * esize == base:
            last[1] += n
        else:
            runs[m].append([base, n, code])
        numel[m] += n
    spans.sort()
    alias = ""
    for (b0, e0, i0), (b1, _, i1) in zip(spans, spans[1:]):
        if b1 < e0:
            alias = (f"grads[{min(i0, i1)}] and grads[{max(i0, i1)}] overlap in memory (one parameter in two CP "
                     "groups, or tied weights)")
            break
    return runs, numel, alias


class _Plan:
    """Chunk table + group info + workspaces for one gradient layout (see csrc/cp.h)."""

    __slots__ = ("device", "dev_index", "n_groups", "n_chunks", "total", "table", "group_info", "partials",
                 "counter", "table_host", "group_info_host", "alias", "stream", "pinned")

    def __init__(self, grads, group_index, n_groups: int, device: torch.device):
        C = _ext_or_raise()
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("native CP: no plan for this gradient layout, and one cannot be built during "
                               "CUDA graph capture (it copies the table to the device); run one step on the "
                               "same gradients before capturing")
        chunk = CHUNK_CUDA if device.type == "cuda" else CHUNK_CPU
        runs, numel, self.alias = _runs(grads, group_index, n_groups)
        flat: list[int] = []
        ginfo: list[int] = []
        begin = 0
        for m in range(n_groups):
            rows = 0
            for base, n, code in runs[m]:
                esize = 4 if code == 0 else 2
                for off in range(0, n, chunk):
                    flat.extend((base + off * esize, min(chunk, n - off), code, m))
                    rows += 1
            ginfo.extend((numel[m], begin, begin + rows))
            begin += rows
        self.device = device
        self.dev_index = -1 if device.type == "cpu" else (device.index if device.index is not None
                                                          else torch.cuda.current_device())
        self.n_groups = n_groups
        self.n_chunks = begin
        self.pinned = False
        self.table_host = torch.tensor(flat, dtype=torch.int64).reshape(-1, 4)
        self.group_info_host = torch.tensor(ginfo, dtype=torch.int64).reshape(-1, 3)
        check_residency = device.type == "cuda" or (torch.cuda.is_available() and torch.cuda.is_initialized())
        self.total = C.cp_validate(self.table_host.data_ptr(), self.n_chunks, self.group_info_host.data_ptr(),
                                   n_groups, self.dev_index, check_residency)
        if device.type == "cuda":
            self.stream = torch.cuda.current_stream(device).cuda_stream
            self.table = self.table_host.to(device)
            self.group_info = self.group_info_host.to(device)
            self.counter = torch.zeros(1, dtype=torch.int32, device=device)
        else:
            self.stream = 0
            self.table = self.table_host
            self.group_info = self.group_info_host
            self.counter = None
        self.partials = torch.empty(max(self.n_chunks, 1), dtype=torch.float64, device=device)
        if device.type == "cuda":  # the table copy and the counter's zero-fill are done before any stream uses them
            torch.cuda.current_stream(device).synchronize()

    def on_stream(self) -> int:
        """The current CUDA stream; pins the plan during a graph capture and records its
        tensors on a stream it was not built on (the caching allocator then keeps them)."""
        s = torch.cuda.current_stream(self.device)
        if torch.cuda.is_current_stream_capturing():
            self.pinned = True  # kept until release_graph_plans(): no stream bookkeeping needed
            return s.cuda_stream
        if s.cuda_stream != self.stream:
            for t in (self.table, self.group_info, self.partials, self.counter):
                t.record_stream(s)
        return s.cuda_stream


_plans: "OrderedDict[tuple, _Plan]" = OrderedDict()  # least recently used first
_pinned: dict = {}  # plans used by captured CUDA graphs: never evicted, freed by release_graph_plans()
_builds: dict[str, int] = {}


def clear_cache() -> None:
    """Forget every cached plan (frees the workspaces), except plans a CUDA graph captured."""
    with _lock:
        _sweep_pinned()
        _plans.clear()


def release_graph_plans() -> int:
    """Free the plans pinned by CUDA graph captures (call once those graphs are destroyed:
    replaying one afterwards reads freed memory). Returns how many were released."""
    with _lock:
        _sweep_pinned()
        n = len(_pinned)
        for key, plan in _pinned.items():
            if _plans.get(key) is plan:
                del _plans[key]
            plan.pinned = False
        _pinned.clear()
        return n


def _sweep_pinned() -> None:
    for key, plan in _plans.items():
        if plan.pinned:
            _pinned[key] = plan


def plan_builds(device: torch.device | str | None = None) -> int:
    """How many plans were built in this process (on ``device``, or on every device)."""
    if device is None:
        return sum(_builds.values())
    d = torch.device(device)
    if d.index is None:  # "cuda": every CUDA device
        return sum(n for k, n in _builds.items() if torch.device(k).type == d.type)
    return _builds.get(str(d), 0)


def _check_layout(grads, group_index, n_groups: int) -> torch.device:
    """Python-side argument checks (run when a plan is built); returns the grads' device."""
    if not isinstance(n_groups, int) or n_groups < 1:
        raise ValueError(f"n_groups must be an int >= 1, got {n_groups!r}")
    if len(grads) != len(group_index):
        raise ValueError(f"grads and group_index differ in length ({len(grads)} vs {len(group_index)})")
    device = None
    first = -1
    for i, (g, m) in enumerate(zip(grads, group_index)):
        if not 0 <= int(m) < n_groups:
            raise ValueError(f"group_index[{i}] = {m} is out of range [0, {n_groups})")
        if g is None:
            continue
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"grads[{i}] is a {type(g).__name__}, not a tensor or None")
        if g.layout != torch.strided:
            raise TypeError(f"grads[{i}] has layout {g.layout}; the native backend needs dense tensors")
        if g.dtype not in _DTYPE_CODES:
            raise TypeError(f"grads[{i}] has unsupported dtype {g.dtype} (native supports float32, float16, bfloat16)")
        if g.device.type not in ("cpu", "cuda"):
            raise ValueError(f"grads[{i}] is on {g.device}; the native backend runs on cpu or cuda")
        if device is None:
            device, first = g.device, i
        elif g.device != device:
            raise ValueError(f"grads[{i}] is on {g.device} but grads[{first}] is on {device}: one device per call")
        if not _is_dense(g):
            raise ValueError(f"grads[{i}] is neither contiguous nor dense (strides {tuple(g.stride())} for shape "
                             f"{tuple(g.shape)}: a strided view with gaps or overlaps)")
    return device if device is not None else torch.device("cpu")


def _sig(g):
    if g is None:
        return None
    if g.is_contiguous():
        return (g.data_ptr(), g.nbytes, g.dtype, True)
    return (g.data_ptr(), g.nbytes, g.dtype, g.stride(), tuple(g.shape))


def _plan_for(grads, group_index, n_groups: int) -> _Plan:
    try:
        sig = tuple([_sig(g) for g in grads])
    except (AttributeError, RuntimeError):  # not a tensor, or a tensor without storage (meta)
        _check_layout(grads, group_index, n_groups)
        raise
    key = (n_groups, tuple(group_index), sig)
    with _lock:
        plan = _plans.get(key) or _pinned.get(key)
        if plan is not None:
            if key in _plans:
                _plans.move_to_end(key)  # LRU: a hit is the most recent use
            return plan
    device = _check_layout(grads, group_index, n_groups)
    plan = _Plan(grads, group_index, n_groups, device)
    with _lock:
        _builds[str(device)] = _builds.get(str(device), 0) + 1
        _plans[key] = plan
        _sweep_pinned()
        while len(_plans) > MAX_PLANS:
            _plans.popitem(last=False)
    return plan


def _run_stats(plan: _Plan, stats: torch.Tensor, pa: tuple, fuse_scale: bool,
               state: torch.Tensor | None = None, ema_beta: float = 0.9) -> None:
    C = _ext_or_raise()
    if fuse_scale and plan.alias:
        raise ValueError(f"native CP cannot scale aliased gradients: {plan.alias}; use the 'foreach' backend")
    sig = (state.data_ptr(), True, float(ema_beta)) if state is not None else (0, False, float(ema_beta))
    if plan.device.type == "cpu":
        fn = C.cp_step_cpu if fuse_scale else C.cp_stats_cpu
        fn(plan.table.data_ptr(), plan.n_chunks, plan.group_info.data_ptr(), plan.n_groups,
           plan.partials.data_ptr(), stats.data_ptr(), *pa, torch.get_num_threads(), *sig)
    else:
        stream = plan.on_stream()
        C.cp_stats_cuda(plan.table.data_ptr(), plan.n_chunks, plan.group_info.data_ptr(), plan.n_groups,
                        plan.partials.data_ptr(), plan.counter.data_ptr(), stats.data_ptr(), *pa,
                        plan.dev_index, stream, *sig)
        if fuse_scale:
            C.cp_scale_cuda(plan.table.data_ptr(), plan.n_chunks, plan.n_groups, stats.data_ptr(),
                            plan.dev_index, stream)


def _stats_impl(grads, group_index, n_groups, tau, alpha, k_min, beta, fixed, normalize, w, fuse_scale,
                state=None, ema_beta=0.9):
    plan = _plan_for(grads, group_index, n_groups)
    if state is not None:
        check_state(state, n_groups, plan.device, PenaltyParams(ema=True, ema_beta=ema_beta))
        if not 0.0 <= float(ema_beta) < 1.0:
            raise ValueError(f"ema_beta must be in [0, 1), got {ema_beta}")
    stats = torch.empty(stats_size(n_groups), dtype=torch.float64, device=plan.device)
    _run_stats(plan, stats, (float(tau), float(alpha), float(k_min), float(beta), bool(fixed), bool(normalize),
                             float(w)), fuse_scale, state, ema_beta)
    return stats


def _scale_impl(grads, group_index, stats, n_groups) -> None:
    plan = _plan_for(grads, group_index, n_groups)
    if stats.dtype != torch.float64 or stats.dim() != 1 or stats.numel() != stats_size(n_groups):
        raise ValueError(f"stats must be a float64 vector of length 5*n_groups+1 = {stats_size(n_groups)}, "
                         f"got {stats.dtype} of shape {tuple(stats.shape)}")
    if stats.device != plan.device:
        raise ValueError(f"stats is on {stats.device} but the gradients are on {plan.device}")
    if not stats.is_contiguous():
        raise ValueError("stats is not contiguous")
    if plan.alias:
        raise ValueError(f"native CP cannot scale aliased gradients: {plan.alias}; use the 'foreach' backend")
    C = _ext_or_raise()
    if plan.device.type == "cpu":
        C.cp_scale_cpu(plan.table.data_ptr(), plan.n_chunks, n_groups, stats.data_ptr(), torch.get_num_threads())
    else:
        C.cp_scale_cuda(plan.table.data_ptr(), plan.n_chunks, n_groups, stats.data_ptr(), plan.dev_index,
                        plan.on_stream())


def _fake_device(grads) -> torch.device:
    for g in grads:
        if g is not None:
            return g.device
    return torch.device("cpu")


# ------------------------------------------------------------------ custom ops
@torch.library.custom_op("cpsl::cp_stats", mutates_args=())
def _op_stats(grads: list[torch.Tensor], group_index: list[int], n_groups: int, tau: float,
              alpha: float, k_min: float, beta: float, fixed: bool, normalize: bool, w: float) -> torch.Tensor:
    return _stats_impl(grads, group_index, n_groups, tau, alpha, k_min, beta, fixed, normalize, w, False)


@_op_stats.register_fake
def _(grads, group_index, n_groups, tau, alpha, k_min, beta, fixed, normalize, w):
    return torch.empty(stats_size(n_groups), dtype=torch.float64, device=_fake_device(grads))


@torch.library.custom_op("cpsl::cp_scale_", mutates_args=("grads",))
def _op_scale(grads: list[torch.Tensor], group_index: list[int], stats: torch.Tensor,
              n_groups: int) -> None:
    _scale_impl(grads, group_index, stats, n_groups)


@_op_scale.register_fake
def _(grads, group_index, stats, n_groups):
    return None


@torch.library.custom_op("cpsl::cp_step_", mutates_args=("grads",))
def _op_step(grads: list[torch.Tensor], group_index: list[int], n_groups: int, tau: float,
             alpha: float, k_min: float, beta: float, fixed: bool, normalize: bool, w: float) -> torch.Tensor:
    return _stats_impl(grads, group_index, n_groups, tau, alpha, k_min, beta, fixed, normalize, w, True)


@_op_step.register_fake
def _(grads, group_index, n_groups, tau, alpha, k_min, beta, fixed, normalize, w):
    return torch.empty(stats_size(n_groups), dtype=torch.float64, device=_fake_device(grads))


@torch.library.custom_op("cpsl::cp_stats_ema", mutates_args=("state",))
def _op_stats_ema(grads: list[torch.Tensor], group_index: list[int], n_groups: int, state: torch.Tensor,
                  tau: float, alpha: float, k_min: float, beta: float, fixed: bool, normalize: bool, w: float,
                  ema_beta: float) -> torch.Tensor:
    return _stats_impl(grads, group_index, n_groups, tau, alpha, k_min, beta, fixed, normalize, w, False,
                       state, ema_beta)


@_op_stats_ema.register_fake
def _(grads, group_index, n_groups, state, tau, alpha, k_min, beta, fixed, normalize, w, ema_beta):
    return torch.empty(stats_size(n_groups), dtype=torch.float64, device=_fake_device(grads))


@torch.library.custom_op("cpsl::cp_step_ema_", mutates_args=("grads", "state"))
def _op_step_ema(grads: list[torch.Tensor], group_index: list[int], n_groups: int, state: torch.Tensor,
                 tau: float, alpha: float, k_min: float, beta: float, fixed: bool, normalize: bool, w: float,
                 ema_beta: float) -> torch.Tensor:
    return _stats_impl(grads, group_index, n_groups, tau, alpha, k_min, beta, fixed, normalize, w, True,
                       state, ema_beta)


@_op_step_ema.register_fake
def _(grads, group_index, n_groups, state, tau, alpha, k_min, beta, fixed, normalize, w, ema_beta):
    return torch.empty(stats_size(n_groups), dtype=torch.float64, device=_fake_device(grads))


def _pargs(p: PenaltyParams, w: float) -> tuple:
    return (float(p.tau), float(p.alpha), float(p.k_min), float(p.beta), bool(p.fixed), bool(p.normalize), float(w))


# ------------------------------------------------------------------ public functions
# In eager mode these call the implementations directly (no dispatcher round trip: it costs
# ~1 us per tensor argument); under torch.compile they go through the custom ops, which the
# compiler treats as opaque. The ops take the present gradients only (``Tensor[]``, no None:
# torch's auto-functionalisation of a mutated ``Tensor?[]`` holding None is broken in 2.13).
def _present(grads, group_index):
    pairs = [(g, m) for g, m in zip(grads, group_index) if g is not None]
    return [g for g, _ in pairs], [int(m) for _, m in pairs]


def _need_state(p: PenaltyParams, state) -> bool:
    if p.ema and state is None:
        raise ValueError("signal 'ema' needs a state tensor (cpsl.cp.core.signal_state(n_groups))")
    return p.ema


def cp_stats(grads: Sequence[Optional[torch.Tensor]], group_index: Sequence[int], n_groups: int,
             p: PenaltyParams, w: float = 1.0, state: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The stats buffer (float64 ``[5G+1]``, on the grads' device) of one step; with ``p.ema``
    the signal ``state`` (float64 ``[2G]``) is read and updated in place."""
    if _need_state(p, state):
        if torch.compiler.is_compiling():
            return torch.ops.cpsl.cp_stats_ema(*_present(grads, group_index), n_groups, state, *_pargs(p, w),
                                               float(p.ema_beta))
        return _stats_impl(grads, group_index, n_groups, *_pargs(p, w), False, state, p.ema_beta)
    if torch.compiler.is_compiling():
        return torch.ops.cpsl.cp_stats(*_present(grads, group_index), n_groups, *_pargs(p, w))
    return _stats_impl(grads, group_index, n_groups, *_pargs(p, w), False)


def cp_scale_(grads: Sequence[Optional[torch.Tensor]], group_index: Sequence[int], stats: torch.Tensor,
              n_groups: int) -> None:
    """grad <- (float)k[group] * grad, in place, with k taken from ``stats`` on the device."""
    if torch.compiler.is_compiling():
        torch.ops.cpsl.cp_scale_(*_present(grads, group_index), stats, n_groups)
        return
    _scale_impl(grads, group_index, stats, n_groups)


def cp_step_(grads: Sequence[Optional[torch.Tensor]], group_index: Sequence[int], n_groups: int,
             p: PenaltyParams, w: float = 1.0, state: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``cp_stats`` then ``cp_scale_`` (one OpenMP region on CPU, two launches on CUDA)."""
    if _need_state(p, state):
        if torch.compiler.is_compiling():
            return torch.ops.cpsl.cp_step_ema_(*_present(grads, group_index), n_groups, state, *_pargs(p, w),
                                               float(p.ema_beta))
        return _stats_impl(grads, group_index, n_groups, *_pargs(p, w), True, state, p.ema_beta)
    if torch.compiler.is_compiling():
        return torch.ops.cpsl.cp_step_(*_present(grads, group_index), n_groups, *_pargs(p, w))
    return _stats_impl(grads, group_index, n_groups, *_pargs(p, w), True)


class NativeBackend(Backend):
    name = "native"

    def available(self, device: torch.device | str | None = None) -> tuple[bool, str]:
        return available(device)

    def compute(self, grads, group_index, n_groups, p: PenaltyParams, w: float, state=None) -> torch.Tensor:
        return cp_stats(grads, group_index, n_groups, p, w, state)

    def scale_(self, grads, group_index, stats, n_groups) -> None:
        cp_scale_(grads, group_index, stats, n_groups)

    def step_(self, grads, group_index, n_groups, p: PenaltyParams, w: float, state=None) -> torch.Tensor:
        """compute + scale_ in one call; returns the stats."""
        return cp_step_(grads, group_index, n_groups, p, w, state)


register_backend("native", NativeBackend)
