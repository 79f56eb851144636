"""The Conflict-aware Penalty API (docs/method.md §5): architecture-agnostic gradient modulation.

    cp = ConflictAwarePenalty(model.modality_parameters(), cfg.cp, lr_slots=slots)
    loss.backward()
    rec = cp.step(epoch)            # after backward, before clipping and optimizer.step()

``cp.step`` returns CP's own record, a :class:`PenaltyStep` (the rule's :class:`~cpsl.cp.core.CPStats`
and the schedule weight ``w``), whose tensors stay on the device (no host sync). The strategy layer
wraps it into the loop's ``StepStats`` (:mod:`cpsl.strategies.base`, which also binds the learning
rates: ``slots = bind_group_lrs(opt, groups)``; :class:`cpsl.strategies.cp.CPModulator` does both).
With ``cp.signal=ema`` the instance owns the signal state (``self.state``, float64 ``[2G]`` on the
device, updated in place by the backend); ``self.stopped`` (set by the ``plateau`` stop rule of
:mod:`cpsl.strategies.cp`) makes every later step's schedule weight 0, i.e. ``k = 1``.
The schedule weight and the on/off switch live in a device control block (``self.control``,
``core.penalty_control``) that the backend reads when the step runs: ``step(epoch)`` (or
``set_epoch(epoch)``) and ``stopped = True`` write it, outside a CUDA graph capture. A graph
that captured ``cp.step`` therefore follows the schedule on replay when ``cp.set_epoch(epoch)``
(and the stop rule) run between replays; changing the weight *inside* a capture raises.
Mode ``grad`` scales the gradients of penalised groups; mode ``update`` (the default with
Adam/AdamW) scales the learning rate of the group's optimizer param groups instead, kept as
device tensors, because an adaptive optimizer divides a constant gradient factor away. Which
learning rates those are is the caller's to say (``lr_slots``): this layer knows no optimizer.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .core import CPStats, PenaltyParams, get_backend, penalty_control, signal_state


def schedule_weight(epoch: int, start_epoch: int, ramp_epochs: int, end_epoch: int) -> float:
    """w(e): 0 before ``start_epoch``; ``(e − start + 1) / ramp_epochs`` during the ramp (so the
    first penalised epoch has weight 1/ramp and epoch ``start + ramp − 1`` reaches 1); 1 until
    ``end_epoch`` (inclusive); 0 after."""
    if epoch < start_epoch or epoch > end_epoch:
        return 0.0
    if ramp_epochs <= 0:
        return 1.0
    return min(1.0, (epoch - start_epoch + 1) / ramp_epochs)


@dataclass(frozen=True)
class PenaltyStep:
    """One :meth:`ConflictAwarePenalty.step`: the rule's statistics of the step (ĝ, r, k, conflict
    flags, guard; device tensors) and the epoch's effective schedule weight ``w``."""
    stats: CPStats
    w: float


def resolve_backend(name: str, device: torch.device | str = "cpu") -> tuple[str, str]:
    """``auto`` → ``native`` when the extension has the path for ``device``, else ``foreach``.
    Returns (backend name, a note: '' or why it fell back)."""
    if name != "auto":
        return name, ""
    try:
        be = get_backend("native")
        ok, why = be.available(device) if _takes_device(be) else be.available()
    except ValueError:
        ok, why = False, "cpsl._C has no CP kernels in this build"
    if ok:
        return "native", ""
    return "foreach", why


def _shared_parameter(params, group_index, names) -> str:
    """'' or a note naming a parameter that sits in two CP groups (e.g. a shared embedding)."""
    first: dict[int, int] = {}
    for p, gi in zip(params, group_index):
        if id(p) in first and first[id(p)] != gi:
            return f"a parameter of shape {tuple(p.shape)} is in CP groups {names[first[id(p)]]!r} and {names[gi]!r}"
        first.setdefault(id(p), gi)
    return ""


def _takes_device(be) -> bool:
    import inspect
    try:
        return len(inspect.signature(be.available).parameters) >= 1
    except (TypeError, ValueError):
        return False


class ConflictAwarePenalty:
    def __init__(self, groups: dict[str, list[torch.nn.Parameter]], cfg, lr_slots: dict | None = None,
                 backend: str | None = None, device=None, apply: bool = True):
        """``lr_slots`` (mode ``update``): ``{group index: [(optimizer param group, its base lr
        tensor), ...]}``, the learning rates that ``step`` sets to ``base · k`` (built by
        ``cpsl.strategies.base.bind_group_lrs``)."""
        self.names = tuple(groups)
        self.params: list[torch.nn.Parameter] = []
        self.group_index: list[int] = []
        for gi, name in enumerate(self.names):
            for p in groups[name]:
                self.params.append(p)
                self.group_index.append(gi)
        self.cfg = cfg
        self.p = PenaltyParams.from_config(cfg)
        dev = device or (self.params[0].device if self.params else "cpu")
        self.mode = cfg.mode if apply else "measure"   # "measure": statistics only (k reported as 1)
        requested = backend or cfg.backend
        name, why = resolve_backend(requested, dev)
        shared = _shared_parameter(self.params, self.group_index, self.names)
        if shared and self.mode == "grad" and name == "native":
            # the native scale pass cannot scale one tensor twice (it would race); foreach
            # applies k1 then k2, as the reference does
            if requested != "auto":
                raise ValueError(f"CP backend 'native' cannot scale aliased gradients ({shared}); use 'foreach'")
            name, why = "foreach", f"{shared}: the native scale pass cannot scale aliased gradients"
        if why:
            warnings.warn(f"CP backend 'native' unavailable ({why}); using 'foreach'", stacklevel=2)
        self.backend_name = name
        self.backend = get_backend(name)
        self._lr_slots: dict[int, list[tuple[dict, torch.Tensor]]] = {}
        if self.mode == "update":
            if lr_slots is None:
                raise ValueError("CP mode 'update' needs the optimizer's per-group learning rates (lr_slots)")
            self._lr_slots = lr_slots
        self.state = signal_state(len(self.names), dev) if self.p.ema else None
        self._w, self._stopped = 0.0, False     # schedule weight of the current epoch; stop rule (sticky)
        # (w, on), read by the backend where the gradients live (the parameters' device)
        self.control = penalty_control(0.0, self.mode != "measure", self.params[0].device if self.params else dev)
        self._written = (0.0, self.mode != "measure")

    # ------------------------------------------------------------------ schedule (control block)
    @property
    def stopped(self) -> bool:
        """The stop rule switched the penalty off (every later step has weight 0)."""
        return self._stopped

    @stopped.setter
    def stopped(self, value: bool) -> None:
        self._stopped = bool(value)
        self._write_control()

    @property
    def weight(self) -> float:
        """The effective schedule weight of the current epoch (0 when stopped or measuring)."""
        return self._w if self._written[1] else 0.0

    def set_epoch(self, epoch: int) -> float:
        """Write ``epoch``'s schedule weight into the control block (call it between CUDA graph
        replays; ``step`` calls it); returns the effective weight."""
        self._w = schedule_weight(epoch, self.cfg.start_epoch, self.cfg.ramp_epochs, self.cfg.end_epoch)
        self._write_control()
        return self.weight

    def _write_control(self) -> None:
        want = (self._w, not self._stopped and self.mode != "measure")
        if want == self._written:
            return
        dev = self.control.device
        if dev.type == "cuda":
            with torch.cuda.device(dev):
                capturing = torch.cuda.is_current_stream_capturing()
            if capturing:
                raise RuntimeError(f"CP schedule changed to w={want[0]}, on={want[1]} during a CUDA graph capture: "
                                   "the graph would replay the write; call cp.set_epoch(epoch) before capturing "
                                   "and between replays")
        self.control[0].fill_(want[0])
        self.control[1].fill_(1.0 if want[1] else 0.0)
        self._written = want

    # ------------------------------------------------------------------ the step
    def _grads(self) -> list[torch.Tensor | None]:
        return [p.grad for p in self.params]

    def compute(self, epoch: int) -> tuple[torch.Tensor, float]:
        w = self.set_epoch(epoch)
        return self.backend.compute(self._grads(), self.group_index, len(self.names), self.p, self.control,
                                    self.state), w

    def step(self, epoch: int, terms: dict | None = None) -> PenaltyStep:
        stats, w = self.compute(epoch)
        st = CPStats.unpack(stats, len(self.names))
        grads = self._grads()
        if self.mode == "measure":
            return PenaltyStep(st, w)
        if self.cfg.ge_noise > 0:
            self._ge_noise(grads, st)
        if self.mode == "grad":
            self.backend.scale_(grads, self.group_index, stats, len(self.names))
        else:
            for gi, slots in self._lr_slots.items():
                for pg, base in slots:
                    pg["lr"].copy_(base * st.k[gi].to(base.dtype))
        return PenaltyStep(st, w)

    def _ge_noise(self, grads, st: CPStats) -> None:
        """OGM-GE-style generalisation noise N(0, σ_GE² var(∇p)) on penalised groups (device-side)."""
        for g, gi in zip(grads, self.group_index):
            if g is None or g.numel() < 2:
                continue
            on = (st.conflict[gi] * (st.k[gi] < 1).to(st.k.dtype)).to(g.dtype)
            g.add_(torch.randn_like(g) * (self.cfg.ge_noise * g.std() * on))

