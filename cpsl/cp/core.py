"""The function every CP backend computes (docs/method.md §5), and the backend registry.

A backend maps the gradients of one step to a *stats buffer*: a float64 tensor of
length ``5 * G + 1`` on the gradients' device, laid out as

    [ sumsq (G) | ghat (G) | r (G) | k (G) | conflict (G, 0/1) | guard (1, 0/1) ]

Semantics (shared by ``reference``, ``foreach`` and ``native``; the reference is the oracle):

* group ``m`` is *active* when at least one of its gradient tensors is present with
  ``numel > 0``; ``n_m`` is the element count of its present gradients. Frozen groups and
  groups with no gradient this step are inactive: ``ghat = r = 0``, ``k = 1``, not in conflict.
* ``s_m = Σ ‖∇p‖²`` (fp32 or wider accumulation, final sum in float64);
  ``ĝ_m = √s_m`` or ``√(s_m / n_m)`` when ``normalize``.
* guard: any non-finite ``s_m`` of an active group → every ``k = 1``, every ``r = 0``, no conflicts,
  guard = 1 (``sumsq``/``ghat`` still report the non-finite values).
* ``ḡ = mean`` of ``ĝ`` over active groups; ``r_m = ĝ_m / ḡ`` when ``ḡ > 0`` else 0.
* conflict: active, at least two active groups, and ``r_m > τ``.
* factor of a conflicting group (``penalty``): ``clamp(min_{n≠m} ĝ_n / ĝ_m, k_min, 1)`` over the other
  active groups (``ratio``, the default; ``ĝ_m = 0`` divides by 1), ``clamp(1 − tanh(α (r − 1)), k_min, 1)``
  (``tanh``) or ``β`` (``fixed``); 1 otherwise; then the schedule ``k ← 1 + w (k − 1)``.

Conflict signal (``cp.signal``, :class:`PenaltyParams` ``ema``):

* ``step`` (default): the signal is ``r`` of this step, as above.
* ``ema``: the signal is ``r̃_m``, an exponential moving average of ``r_m`` over steps with bias
  correction. The state is a float64 tensor ``[e (G) | t (G)]`` on the gradients' device, owned by
  the caller and updated in place by the backend (no host sync). On a step that is not guarded,
  every *active* group does ``e_m ← β_s e_m + (1 − β_s) r_m``, ``t_m ← t_m + 1`` and
  ``r̃_m = e_m / (1 − β_s^{t_m})`` (``β_s`` = ``signal_beta``); inactive groups keep their state and
  get ``r̃ = 0``; a guarded step leaves the whole state unchanged. Conflict and ``k`` use ``r̃`` in
  place of ``r``, and the ``r`` field of the stats buffer reports ``r̃`` (the signal compared with τ;
  the raw ``r`` is ``ĝ_m / mean ĝ`` over active groups, from the ``ghat`` field). The state starts
  at zeros (:func:`signal_state`).
* A stopped penalty (``cp.stop = plateau``) is a schedule weight ``w = 0`` (``k = 1``); the
  statistics and the signal state are still updated.

Schedule weight: every backend takes ``w`` as a float, or as a *control block*, a float64
tensor ``[w, on]`` on the gradients' device (:func:`penalty_control`) whose effective weight is
``w`` when ``on != 0`` and 0 otherwise. The block is read when the step runs (the native
kernel reads it on the device), so a captured CUDA graph follows values written into it
between replays; a float is baked into the capture.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch

from ..config import CPConfig

PENALTIES = next(f for f in fields(CPConfig) if f.name == "penalty").metadata["choices"]   # declared once there
N_FIELDS = 5  # sumsq, ghat, r, k, conflict (then one guard slot)


_CP = CPConfig()


@dataclass(frozen=True)
class PenaltyParams:
    """Scalars of the penalty rule (a view of :class:`cpsl.config.CPConfig`)."""

    tau: float = _CP.tau                      # defaults: those of CPConfig (declared once there)
    alpha: float = _CP.alpha
    k_min: float = _CP.k_min
    beta: float = _CP.beta
    penalty: str = _CP.penalty                # ratio | tanh | fixed (cp.penalty; see the module docstring)
    normalize: bool = _CP.normalize
    ema: bool = _CP.signal == "ema"           # conflict signal: False = this step's r, True = EMA of r
    ema_beta: float = _CP.signal_beta         # β_s of the EMA (cp.signal_beta)

    def __post_init__(self):
        if self.penalty not in PENALTIES:
            raise ValueError(f"unknown penalty {self.penalty!r} (known: {', '.join(PENALTIES)})")

    @property
    def fixed(self) -> bool:
        return self.penalty == "fixed"

    @property
    def ratio(self) -> bool:
        return self.penalty == "ratio"

    @classmethod
    def from_config(cls, cfg) -> "PenaltyParams":
        return cls(tau=float(cfg.tau), alpha=float(cfg.alpha), k_min=float(cfg.k_min),
                   beta=float(cfg.beta), penalty=str(cfg.penalty), normalize=bool(cfg.normalize),
                   ema=(cfg.signal == "ema"), ema_beta=float(cfg.signal_beta))


@dataclass
class CPStats:
    """Unpacked view of a stats buffer (tensors stay on their device: no host sync)."""

    sumsq: torch.Tensor
    ghat: torch.Tensor
    r: torch.Tensor
    k: torch.Tensor
    conflict: torch.Tensor
    guard: torch.Tensor

    @classmethod
    def unpack(cls, stats: torch.Tensor, n_groups: int) -> "CPStats":
        g = n_groups
        return cls(stats[0:g], stats[g:2 * g], stats[2 * g:3 * g], stats[3 * g:4 * g],
                   stats[4 * g:5 * g], stats[5 * g])


def stats_size(n_groups: int) -> int:
    return N_FIELDS * n_groups + 1


STATE_FIELDS = 2  # signal state: EMA e (G), active-step count t (G)


def signal_state(n_groups: int, device=None) -> torch.Tensor:
    """A fresh EMA signal state ``[e (G) | t (G)]`` (float64 zeros) for ``PenaltyParams(ema=True)``."""
    return torch.zeros(STATE_FIELDS * n_groups, dtype=torch.float64, device=device)


def _check_vector(t: torch.Tensor, what: str, shape_desc: str, n: int, device) -> None:
    """ValueError unless ``t`` is a contiguous float64 vector of ``n`` elements on ``device``."""
    if t.dtype != torch.float64 or t.dim() != 1 or t.numel() != n:
        raise ValueError(f"{what} must be a float64 vector {shape_desc} = {n}, got {t.dtype} of shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{what} is not contiguous")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{what} is on {t.device} but the gradients are on {device}")


def check_state(state: torch.Tensor | None, n_groups: int, device, p: PenaltyParams) -> None:
    """ValueError naming the problem when ``state`` does not fit ``p`` / the gradients."""
    if not p.ema:
        return
    if state is None:
        raise ValueError("signal 'ema' needs a state tensor (cpsl.cp.core.signal_state(n_groups))")
    _check_vector(state, "state", "of length 2*n_groups", STATE_FIELDS * n_groups, device)


CTL_FIELDS = 2  # penalty control block: schedule weight w, on/off


def penalty_control(w: float = 1.0, on: bool = True, device=None) -> torch.Tensor:
    """A control block ``[w, on]`` (float64) for the backends' ``w`` argument (see above)."""
    return torch.tensor([float(w), 1.0 if on else 0.0], dtype=torch.float64, device=device)


def check_control(ctl: torch.Tensor, device) -> None:
    """ValueError naming the problem when ``ctl`` (``w`` given as a tensor) is not a control block
    on ``device``."""
    _check_vector(ctl, "the control block", "[w, on] of length", CTL_FIELDS, device)


def weight_value(w) -> float:
    """The effective schedule weight as a Python float (reads a control block: a host sync)."""
    if isinstance(w, torch.Tensor):
        wv, on = w.tolist()
        return float(wv) if on != 0.0 else 0.0
    return float(w)


def penalty_scalar(sumsq: Sequence[float], numel: Sequence[int], active: Sequence[bool],
                   p: PenaltyParams, w: float, state: list[float] | None = None) -> list[float]:
    """The penalty stage in plain Python floats (float64): the definition itself. With
    ``p.ema``, ``state`` (a list ``[e (G) | t (G)]``) is read and updated in place."""
    g = len(sumsq)
    out = [0.0] * stats_size(g)
    act = [bool(a) for a in active]
    n_act = sum(act)
    for m in range(g):
        out[m] = float(sumsq[m]) if act[m] else 0.0
        out[3 * g + m] = 1.0
    if any(act[m] and not math.isfinite(sumsq[m]) for m in range(g)):
        for m in range(g):
            if act[m]:
                out[g + m] = math.sqrt(sumsq[m]) if sumsq[m] >= 0 or math.isnan(sumsq[m]) else float("nan")
        out[5 * g] = 1.0
        return out
    ghat = [0.0] * g
    for m in range(g):
        if act[m]:
            s = float(sumsq[m])
            ghat[m] = math.sqrt(s / numel[m]) if p.normalize else math.sqrt(s)
    gbar = (sum(ghat[m] for m in range(g) if act[m]) / n_act) if n_act else 0.0
    for m in range(g):
        r = ghat[m] / gbar if (act[m] and gbar > 0) else 0.0
        if p.ema and act[m]:
            state[m] = p.ema_beta * state[m] + (1.0 - p.ema_beta) * r
            state[g + m] = state[g + m] + 1.0
            r = state[m] / (1.0 - math.pow(p.ema_beta, state[g + m]))
        conflict = act[m] and n_act >= 2 and r > p.tau
        k = 1.0
        if conflict:
            if p.fixed:
                k = p.beta
            elif p.ratio:
                ref = min(ghat[n] for n in range(g) if act[n] and n != m)
                k = min(max(ref / (ghat[m] if ghat[m] > 0 else 1.0), p.k_min), 1.0)  # as penalty_tensor
            else:
                k = min(max(1.0 - math.tanh(p.alpha * (r - 1.0)), p.k_min), 1.0)
        out[g + m] = ghat[m]
        out[2 * g + m] = r
        out[3 * g + m] = 1.0 + w * (k - 1.0)
        out[4 * g + m] = 1.0 if conflict else 0.0
    return out


def penalty_tensor(sumsq: torch.Tensor, numel: torch.Tensor, active: torch.Tensor,
                   p: PenaltyParams, w: float, state: torch.Tensor | None = None) -> torch.Tensor:
    """The penalty stage with device tensor ops only (no host sync); float64 in and out.
    With ``p.ema``, ``state`` (float64 ``[e (G) | t (G)]``) is updated in place; ``w`` may be a
    control block, read with tensor ops."""
    g = sumsq.numel()
    if isinstance(w, torch.Tensor):
        check_control(w, sumsq.device)
        w = torch.where(w[1] != 0, w[0], torch.zeros_like(w[0]))
    sumsq = torch.where(active, sumsq, torch.zeros_like(sumsq))
    finite = torch.isfinite(sumsq) | ~active
    guard = ~finite.all()
    n_act = active.sum()
    denom = numel.clamp(min=1).to(sumsq.dtype)
    ghat = torch.sqrt(sumsq / denom) if p.normalize else torch.sqrt(sumsq)
    ghat = torch.where(active, ghat, torch.zeros_like(ghat))
    gbar = torch.where(n_act > 0, ghat.sum() / n_act.clamp(min=1), torch.zeros((), dtype=ghat.dtype, device=ghat.device))
    r = torch.where(active & (gbar > 0) & ~guard, ghat / torch.where(gbar > 0, gbar, torch.ones_like(gbar)), torch.zeros_like(ghat))
    if p.ema:
        upd = active & ~guard
        e, t = state[:g], state[g:]
        e_new = torch.where(upd, p.ema_beta * e + (1.0 - p.ema_beta) * r, e)
        t_new = torch.where(upd, t + 1.0, t)
        corr = 1.0 - torch.pow(torch.full_like(t_new, p.ema_beta), t_new)
        r = torch.where(upd, e_new / torch.where(upd, corr, torch.ones_like(corr)), torch.zeros_like(r))
        e.copy_(e_new)
        t.copy_(t_new)
    conflict = active & (n_act >= 2) & (r > p.tau) & ~guard
    if p.fixed:
        kc = torch.full_like(r, p.beta)
    elif p.ratio:
        others = torch.where(active, ghat, torch.full_like(ghat, math.inf))          # row m: every group but m
        ref = others.expand(g, g).masked_fill(torch.eye(g, dtype=torch.bool, device=ghat.device), math.inf).amin(1)
        kc = (ref / torch.where(ghat > 0, ghat, torch.ones_like(ghat))).clamp(p.k_min, 1.0)
    else:
        kc = (1.0 - torch.tanh(p.alpha * (r - 1.0))).clamp(p.k_min, 1.0)
    k = torch.where(conflict, kc, torch.ones_like(kc))
    k = 1.0 + w * (k - 1.0)
    return torch.cat([sumsq, ghat, r, k, conflict.to(sumsq.dtype), guard.to(sumsq.dtype).reshape(1)])


# ---------------------------------------------------------------- backend registry
class Backend:
    """A CP backend: ``compute`` (stats of one step) and ``scale_`` (grad ← k[group]·grad)."""

    name = "base"

    def available(self) -> tuple[bool, str]:
        return True, ""

    def compute(self, grads: list[torch.Tensor | None], group_index: list[int], n_groups: int,
                p: PenaltyParams, w: float, state: torch.Tensor | None = None) -> torch.Tensor:
        """The stats buffer of one step; with ``p.ema`` it reads and updates ``state`` in place."""
        raise NotImplementedError

    def scale_(self, grads: list[torch.Tensor | None], group_index: list[int], stats: torch.Tensor,
               n_groups: int) -> None:
        k = CPStats.unpack(stats, n_groups).k
        for gi, grad in zip(group_index, grads):
            if grad is not None and grad.numel():
                grad.mul_(k[gi].to(grad.dtype))


_REGISTRY: dict[str, Callable[[], Backend]] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    _REGISTRY[name] = factory


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def get_backend(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown CP backend {name!r} (known: {', '.join(backend_names())})")
    return _REGISTRY[name]()
