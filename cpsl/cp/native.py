"""``native`` CP backend: the fused multi-tensor kernels of the ``cpsl._C`` extension (csrc/).

One call computes every group's sum of squares over the whole gradient list *and* the
penalty stage (ghat, r, conflict flags, k factors, guard) into the stats buffer of
:mod:`cpsl.cp.core`; a second light pass scales the gradients by their group's factor.
On CUDA the stats pass is ONE kernel launch (last-block-done reduction, no host
synchronisation, CUDA-graph capturable); on CPU it is one OpenMP region (``step_`` also
fuses the scale pass into it). Results are deterministic for the same gradient memory:
bit-identical run to run and independent of the number of CPU threads / CUDA blocks. A
copy of the gradients elsewhere may differ in the last bits: the chunk
table follows the memory (back-to-back gradients are merged), and on CUDA each chunk is
split at its first 16-byte boundary, so a copy at another alignment sums in another order.

How to call it::

    from cpsl.cp import native
    ok, why = native.available()                 # (False, reason) when cpsl._C lacks the kernels
    stats = native.cp_stats(grads, group_index, n_groups, p, w)    # float64 [5G+1]
    native.cp_scale_(grads, group_index, stats, n_groups)          # grad <- k[group] * grad
    stats = native.cp_step_(grads, group_index, n_groups, p, w)    # both (one call)
    # cp.signal=ema (p.ema): pass the signal state (core.signal_state), updated in place
    stats = native.cp_stats(grads, group_index, n_groups, p, w, state=state)
    # a schedule that changes between CUDA graph replays: w as a device control block
    ctl = core.penalty_control(w, on=True, device="cuda")   # float64 [2] = (w, on)
    stats = native.cp_step_(grads, group_index, n_groups, p, ctl)  # read by the kernel at run time
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
  layout and cached (:mod:`cpsl.cp.plans`): later steps only compare the layout's key.
  Gradients that lie back to back in memory (a :mod:`cpsl.cp.arena`) are merged into long
  runs. Up to ``MAX_PLANS`` layouts are kept; :func:`plan_builds` counts the builds. Keep
  gradient memory stable (``cpsl.cp.arena``) so that one plan serves a whole training run:
  with ``zero_grad(set_to_none=True)`` every step would build a new plan (on CUDA a
  host-to-device copy and a stream synchronisation).
* CUDA graphs: run one step before capturing (building a plan copies the table to the
  device; building one while the gradients' device captures raises). A plan used during a
  capture is pinned under that capture's handle (:func:`capture_handle`, called inside the
  capture): the graph holds raw pointers to its table and workspaces, so neither
  :func:`clear_cache` nor eviction frees it; ``release_graph_plans(handle)`` unpins that
  capture's plans once its graph is gone (plans another live graph uses stay pinned).
  A captured launch keeps the scalars it was given by value: pass ``w`` as a control
  block (``core.penalty_control``) and write the block between replays (outside the
  capture) for a schedule or an on/off switch to take effect on replay.
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

from typing import Optional, Sequence

import torch

from . import plans
from .core import Backend, PenaltyParams, check_control, check_state, register_backend, stats_size
from .plans import (CHUNK_CPU, CHUNK_CUDA, MAX_PLANS, GraphHandle, _builds, _pinned, _plans,  # noqa: F401
                    clear_cache, graph_handles, plan_builds, release_graph_plans)

_NEEDED = ("cp_validate", "cp_stats_cpu", "cp_scale_cpu", "cp_step_cpu", "cp_stats_cuda", "cp_scale_cuda",
           "cuda_usable", "cuda_capture_id")
_ABI = 4

_ext = None
_ext_err: Optional[str] = None


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


def capture_handle(device: torch.device | str | int | None = None) -> GraphHandle:
    """The handle of the CUDA graph capture under way on ``device``'s current stream (default:
    the current CUDA device); call it inside the capture, and pass it to
    :func:`release_graph_plans` once that graph is destroyed."""
    C = _ext_or_raise()
    if not torch.cuda.is_available():
        raise RuntimeError("native.capture_handle: torch sees no CUDA device, so no graph capture is under way")
    d = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    if d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    cid = plans.capture_id(C, d)
    if not cid:
        raise RuntimeError(f"native.capture_handle: no CUDA graph capture is under way on {d}'s current stream")
    return GraphHandle(d.index, cid)


def _plan_for(grads, group_index, n_groups: int) -> plans.Plan:
    return plans.plan_for(_ext_or_raise(), grads, group_index, n_groups)


def _run_stats(plan: plans.Plan, stats: torch.Tensor, pa: tuple, fuse_scale: bool,
               state: torch.Tensor | None = None, ema_beta: float = 0.9, ctl: torch.Tensor | None = None) -> None:
    C = _ext_or_raise()
    if fuse_scale and plan.alias:
        raise ValueError(f"native CP cannot scale aliased gradients: {plan.alias}; use the 'foreach' backend")
    sig = (state.data_ptr(), True, float(ema_beta)) if state is not None else (0, False, float(ema_beta))
    sig += (0 if ctl is None else ctl.data_ptr(),)
    if plan.device.type == "cpu":
        fn = C.cp_step_cpu if fuse_scale else C.cp_stats_cpu
        fn(plan.table.data_ptr(), plan.n_chunks, plan.group_info.data_ptr(), plan.n_groups,
           plan.partials.data_ptr(), stats.data_ptr(), *pa, torch.get_num_threads(), *sig)
    else:
        stream = plan.on_stream(C)
        C.cp_stats_cuda(plan.table.data_ptr(), plan.n_chunks, plan.group_info.data_ptr(), plan.n_groups,
                        plan.partials.data_ptr(), plan.counter.data_ptr(), stats.data_ptr(), *pa,
                        plan.dev_index, stream, *sig)
        if fuse_scale:
            C.cp_scale_cuda(plan.table.data_ptr(), plan.n_chunks, plan.n_groups, stats.data_ptr(),
                            plan.dev_index, stream)


def _stats_impl(grads, group_index, n_groups, tau, alpha, k_min, beta, fixed, normalize, w, fuse_scale,
                state=None, ema_beta=0.9, ctl=None):
    plan = _plan_for(grads, group_index, n_groups)
    if state is not None:
        check_state(state, n_groups, plan.device, PenaltyParams(ema=True, ema_beta=ema_beta))
        if not 0.0 <= float(ema_beta) < 1.0:
            raise ValueError(f"ema_beta must be in [0, 1), got {ema_beta}")
    if ctl is not None:
        check_control(ctl, plan.device)
    stats = torch.empty(stats_size(n_groups), dtype=torch.float64, device=plan.device)
    _run_stats(plan, stats, (float(tau), float(alpha), float(k_min), float(beta), bool(fixed), bool(normalize),
                             float(w)), fuse_scale, state, ema_beta, ctl)
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
                        plan.on_stream(C))


def _fake_device(grads) -> torch.device:
    for g in grads:
        if g is not None:
            return g.device
    return torch.device("cpu")


def _fake_stats(grads, n_groups) -> torch.Tensor:
    return torch.empty(stats_size(n_groups), dtype=torch.float64, device=_fake_device(grads))


# ------------------------------------------------------------------ custom ops
# ``ctl``: None, or the penalty control block (float64 [2] = (w, on), core.penalty_control)
# that the kernel reads in place of ``w``.
@torch.library.custom_op("cpsl::cp_stats", mutates_args=())
def _op_stats(grads: list[torch.Tensor], group_index: list[int], n_groups: int, tau: float,
              alpha: float, k_min: float, beta: float, fixed: bool, normalize: bool, w: float,
              ctl: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _stats_impl(grads, group_index, n_groups, tau, alpha, k_min, beta, fixed, normalize, w, False, ctl=ctl)


@_op_stats.register_fake
def _(grads, group_index, n_groups, tau, alpha, k_min, beta, fixed, normalize, w, ctl=None):
    return _fake_stats(grads, n_groups)


@torch.library.custom_op("cpsl::cp_scale_", mutates_args=("grads",))
def _op_scale(grads: list[torch.Tensor], group_index: list[int], stats: torch.Tensor,
              n_groups: int) -> None:
    _scale_impl(grads, group_index, stats, n_groups)


@_op_scale.register_fake
def _(grads, group_index, stats, n_groups):
    return None


@torch.library.custom_op("cpsl::cp_step_", mutates_args=("grads",))
def _op_step(grads: list[torch.Tensor], group_index: list[int], n_groups: int, tau: float,
             alpha: float, k_min: float, beta: float, fixed: bool, normalize: bool, w: float,
             ctl: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _stats_impl(grads, group_index, n_groups, tau, alpha, k_min, beta, fixed, normalize, w, True, ctl=ctl)


@_op_step.register_fake
def _(grads, group_index, n_groups, tau, alpha, k_min, beta, fixed, normalize, w, ctl=None):
    return _fake_stats(grads, n_groups)


@torch.library.custom_op("cpsl::cp_stats_ema", mutates_args=("state",))
def _op_stats_ema(grads: list[torch.Tensor], group_index: list[int], n_groups: int, state: torch.Tensor,
                  tau: float, alpha: float, k_min: float, beta: float, fixed: bool, normalize: bool, w: float,
                  ema_beta: float, ctl: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _stats_impl(grads, group_index, n_groups, tau, alpha, k_min, beta, fixed, normalize, w, False,
                       state, ema_beta, ctl)


@_op_stats_ema.register_fake
def _(grads, group_index, n_groups, state, tau, alpha, k_min, beta, fixed, normalize, w, ema_beta, ctl=None):
    return _fake_stats(grads, n_groups)


@torch.library.custom_op("cpsl::cp_step_ema_", mutates_args=("grads", "state"))
def _op_step_ema(grads: list[torch.Tensor], group_index: list[int], n_groups: int, state: torch.Tensor,
                 tau: float, alpha: float, k_min: float, beta: float, fixed: bool, normalize: bool, w: float,
                 ema_beta: float, ctl: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _stats_impl(grads, group_index, n_groups, tau, alpha, k_min, beta, fixed, normalize, w, True,
                       state, ema_beta, ctl)


@_op_step_ema.register_fake
def _(grads, group_index, n_groups, state, tau, alpha, k_min, beta, fixed, normalize, w, ema_beta, ctl=None):
    return _fake_stats(grads, n_groups)


def _pargs(p: PenaltyParams, w: float) -> tuple:
    if p.ratio:
        raise ValueError("cp.penalty=ratio is not in the native kernel yet: use cp.backend=foreach")
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


_OPS = {(False, False): "cp_stats", (True, False): "cp_step_", (False, True): "cp_stats_ema",
        (True, True): "cp_step_ema_"}


def _call(fuse_scale: bool, grads, group_index, n_groups: int, p: PenaltyParams, w, state) -> torch.Tensor:
    """cp_stats / cp_step_: ``w`` is a float, or the control block the kernel reads (no host read)."""
    ema = _need_state(p, state)
    wv, ctl = (0.0, w) if isinstance(w, torch.Tensor) else (float(w), None)
    if torch.compiler.is_compiling():
        op = getattr(torch.ops.cpsl, _OPS[(fuse_scale, ema)])
        g, m = _present(grads, group_index)
        if ema:
            return op(g, m, n_groups, state, *_pargs(p, wv), float(p.ema_beta), ctl)
        return op(g, m, n_groups, *_pargs(p, wv), ctl)
    return _stats_impl(grads, group_index, n_groups, *_pargs(p, wv), fuse_scale, state if ema else None,
                       p.ema_beta, ctl)


def cp_stats(grads: Sequence[Optional[torch.Tensor]], group_index: Sequence[int], n_groups: int,
             p: PenaltyParams, w: float | torch.Tensor = 1.0, state: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The stats buffer (float64 ``[5G+1]``, on the grads' device) of one step; with ``p.ema``
    the signal ``state`` (float64 ``[2G]``) is read and updated in place. ``w``: the schedule
    weight, or a control block (``core.penalty_control``) read on the device when the kernel
    runs (what a captured CUDA graph needs to follow a changing schedule)."""
    return _call(False, grads, group_index, n_groups, p, w, state)


def cp_scale_(grads: Sequence[Optional[torch.Tensor]], group_index: Sequence[int], stats: torch.Tensor,
              n_groups: int) -> None:
    """grad <- (float)k[group] * grad, in place, with k taken from ``stats`` on the device."""
    if torch.compiler.is_compiling():
        torch.ops.cpsl.cp_scale_(*_present(grads, group_index), stats, n_groups)
        return
    _scale_impl(grads, group_index, stats, n_groups)


def cp_step_(grads: Sequence[Optional[torch.Tensor]], group_index: Sequence[int], n_groups: int,
             p: PenaltyParams, w: float | torch.Tensor = 1.0, state: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``cp_stats`` then ``cp_scale_`` (one OpenMP region on CPU, two launches on CUDA)."""
    return _call(True, grads, group_index, n_groups, p, w, state)


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
