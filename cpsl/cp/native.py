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

The same three functions are torch custom ops with fake kernels: ``torch.ops.cpsl.cp_stats``
and ``cp_step_`` (stats + scale) take ``(grads, group_index, n_groups, penalty, state, ctl)``
where ``penalty`` is the packed penalty argument (:func:`pack_penalty`: the scalars of
:class:`PenaltyParams`, the mode and ``w``, as floats in ``cpsl._C.PENALTY_FIELDS`` order),
``state`` the signal state (mutated; an empty float64 tensor when ``p.ema`` is off) and
``ctl`` None or the control block; ``cp_scale_`` takes ``(grads, group_index, stats,
n_groups)``. They take the present gradients only (no None), pass
``torch.library.opcheck`` and run inside ``torch.compile(fullgraph=True)``; the functions
above route through them when called under ``torch.compile``.

Arguments are checked once, where a call enters (:func:`_checked`, used by the functions and
the ops alike); the call helper below it and the kernels trust them (the C++ entry checks
only what it unpacks: pointers, sizes, the packed scalars).

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

from functools import lru_cache
from typing import Optional, Sequence

import torch

from .. import native_info
from . import plans
from .core import Backend, PenaltyParams, _check_vector, check_control, check_state, register_backend, stats_size
from .plans import (CHUNK_CPU, CHUNK_CUDA, MAX_PLANS, GraphHandle, _builds, _pinned, _plans,  # noqa: F401
                    clear_cache, graph_handles, plan_builds, release_graph_plans)


def _load():
    """The extension module (:func:`cpsl.native_info.load`: the one loader), or None."""
    return native_info.load()[0]


def _ext_or_raise():
    C, why = native_info.load()
    if C is None:
        raise RuntimeError(f"native CP backend unavailable: {why}")
    return C


def available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(True, "") when the kernels can run (on ``device`` when given), else (False, why)."""
    C, why = native_info.load()
    if C is None:
        return False, why
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


@lru_cache(maxsize=64)
def pack_penalty(p: PenaltyParams, w: float = 0.0) -> tuple[float, ...]:
    """The packed penalty argument of the ops and of ``cpsl._C.cp_stats``: ``p``'s scalars, its
    mode (tanh / fixed / ratio) and the schedule weight ``w``, in ``cpsl._C.PENALTY_FIELDS`` order
    (csrc/cp.h ``PenaltyArgs``; the C++ entry unpacks and checks it)."""
    C = _ext_or_raise()
    vals = {"tau": p.tau, "alpha": p.alpha, "k_min": p.k_min, "beta": p.beta, "w": w, "mode": C.PENALTY_MODES[p.penalty],
            "normalize": p.normalize, "ema": p.ema, "ema_beta": p.ema_beta}
    return tuple(float(vals[f]) for f in C.PENALTY_FIELDS)


def _plan_for(grads, group_index, n_groups: int) -> plans.Plan:
    return plans.plan_for(_ext_or_raise(), grads, group_index, n_groups)


def _checked(grads, group_index, n_groups: int, scale: bool, penalty=None, state=None, ctl=None,
             stats=None) -> plans.Plan:
    """THE argument checks of every entry (functions and ops): the layout (on a plan miss,
    :func:`cpsl.cp.plans.check_layout`), the signal state when ``penalty`` asks for the EMA, the
    control block, the stats buffer, and aliasing when the call scales. Returns the plan."""
    plan = _plan_for(grads, group_index, n_groups)
    if penalty is not None and penalty[_field("ema")]:
        check_state(state, n_groups, plan.device, PenaltyParams(ema=True))
    if ctl is not None:
        check_control(ctl, plan.device)
    if stats is not None:
        _check_vector(stats, "stats", "of length 5*n_groups+1", stats_size(n_groups), plan.device)
    if scale and plan.alias:
        raise ValueError(f"native CP cannot scale aliased gradients: {plan.alias}; use the 'foreach' backend")
    return plan


@lru_cache(maxsize=None)
def _field(name: str) -> int:
    return list(_ext_or_raise().PENALTY_FIELDS).index(name)


def _where(C, plan: plans.Plan) -> dict:
    """Where the kernels run: the device (-1: CPU), its current stream, the CPU thread count."""
    if plan.device.type == "cpu":
        return {"device": -1, "n_threads": torch.get_num_threads()}
    return {"device": plan.dev_index, "stream": plan.on_stream(C)}


# ------------------------------------------------------------------ implementations (checked)
def _stats_impl(grads, group_index, n_groups: int, penalty, state=None, ctl=None, scale: bool = False):
    """The stats buffer of one step (and, with ``scale``, the scale pass): one call of ``cp_stats``."""
    plan = _checked(grads, group_index, n_groups, scale, penalty, state, ctl)
    C = _ext_or_raise()
    stats = torch.empty(stats_size(n_groups), dtype=torch.float64, device=plan.device)
    C.cp_stats(plan.table.data_ptr(), plan.n_chunks, plan.group_info.data_ptr(), n_groups, plan.partials.data_ptr(),
               stats.data_ptr(), penalty, counter=0 if plan.counter is None else plan.counter.data_ptr(),
               state=state.data_ptr() if penalty[_field("ema")] else 0, ctl=0 if ctl is None else ctl.data_ptr(),
               scale=scale, **_where(C, plan))
    return stats


def _scale_impl(grads, group_index, stats, n_groups: int) -> None:
    plan = _checked(grads, group_index, n_groups, True, stats=stats)
    C = _ext_or_raise()
    C.cp_scale(plan.table.data_ptr(), plan.n_chunks, n_groups, stats.data_ptr(), **_where(C, plan))


# ------------------------------------------------------------------ custom ops
def _fake_stats(grads, group_index, n_groups, penalty, state, ctl=None) -> torch.Tensor:
    dev = next((g.device for g in grads if g is not None), torch.device("cpu"))
    return torch.empty(stats_size(n_groups), dtype=torch.float64, device=dev)


def _stats_op(name: str, scale: bool, mutates: tuple[str, ...]):
    """``cpsl::cp_stats`` / ``cpsl::cp_step_``: ``state`` is a tensor (empty without the EMA signal:
    auto-functionalisation of a mutated optional tensor that is None breaks torch.compile 2.13);
    ``ctl``: None, or the control block (core.penalty_control) that the kernel reads in place of w."""
    def impl(grads: list[torch.Tensor], group_index: list[int], n_groups: int, penalty: list[float],
             state: torch.Tensor, ctl: Optional[torch.Tensor] = None) -> torch.Tensor:
        return _stats_impl(grads, group_index, n_groups, penalty, state, ctl, scale)
    op = torch.library.custom_op(f"cpsl::{name}", impl, mutates_args=mutates)
    op.register_fake(_fake_stats)
    return op


_op_stats = _stats_op("cp_stats", False, ("state",))
_op_step = _stats_op("cp_step_", True, ("grads", "state"))


@torch.library.custom_op("cpsl::cp_scale_", mutates_args=("grads",))
def _op_scale(grads: list[torch.Tensor], group_index: list[int], stats: torch.Tensor, n_groups: int) -> None:
    _scale_impl(grads, group_index, stats, n_groups)


@_op_scale.register_fake
def _(grads, group_index, stats, n_groups):
    return None


# ------------------------------------------------------------------ the call helper
# In eager mode the functions call the implementations directly (no dispatcher round trip: it
# costs ~1 us per tensor argument); under torch.compile they go through the custom ops, which
# the compiler treats as opaque. The ops take the present gradients only (``Tensor[]``, no None:
# torch's auto-functionalisation of a mutated ``Tensor?[]`` holding None is broken in 2.13).
_IMPLS = {"cp_stats": lambda *a: _stats_impl(*a, scale=False), "cp_step_": lambda *a: _stats_impl(*a, scale=True),
          "cp_scale_": _scale_impl}


def _call(name: str, grads, group_index, *args):
    if torch.compiler.is_compiling():
        pairs = [(g, int(m)) for g, m in zip(grads, group_index) if g is not None]
        return getattr(torch.ops.cpsl, name)([g for g, _ in pairs], [m for _, m in pairs], *args)
    return _IMPLS[name](grads, group_index, *args)


def _stats_call(name: str, grads, group_index, n_groups: int, p: PenaltyParams, w, state) -> torch.Tensor:
    """cp_stats / cp_step_: ``w`` is a float, or the control block the kernel reads (no host read)."""
    wv, ctl = (0.0, w) if isinstance(w, torch.Tensor) else (float(w), None)
    if not p.ema:  # no signal state: None in eager mode, an empty tensor for the op
        state = torch.empty(0, dtype=torch.float64) if torch.compiler.is_compiling() else None
    pack = pack_penalty.__wrapped__ if torch.compiler.is_compiling() else pack_penalty  # dynamo: no cache
    return _call(name, grads, group_index, n_groups, pack(p, wv), state, ctl)


# ------------------------------------------------------------------ public functions
def cp_stats(grads: Sequence[Optional[torch.Tensor]], group_index: Sequence[int], n_groups: int,
             p: PenaltyParams, w: float | torch.Tensor = 1.0, state: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The stats buffer (float64 ``[5G+1]``, on the grads' device) of one step; with ``p.ema``
    the signal ``state`` (float64 ``[2G]``) is read and updated in place. ``w``: the schedule
    weight, or a control block (``core.penalty_control``) read on the device when the kernel
    runs (what a captured CUDA graph needs to follow a changing schedule)."""
    return _stats_call("cp_stats", grads, group_index, n_groups, p, w, state)


def cp_scale_(grads: Sequence[Optional[torch.Tensor]], group_index: Sequence[int], stats: torch.Tensor,
              n_groups: int) -> None:
    """grad <- (float)k[group] * grad, in place, with k taken from ``stats`` on the device."""
    _call("cp_scale_", grads, group_index, stats, n_groups)


def cp_step_(grads: Sequence[Optional[torch.Tensor]], group_index: Sequence[int], n_groups: int,
             p: PenaltyParams, w: float | torch.Tensor = 1.0, state: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``cp_stats`` then ``cp_scale_`` (one OpenMP region on CPU, two launches on CUDA)."""
    return _stats_call("cp_step_", grads, group_index, n_groups, p, w, state)


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
