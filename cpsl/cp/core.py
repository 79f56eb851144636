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
* factor of a conflicting group: ``clamp(1 − tanh(α (r − 1)), k_min, 1)`` (``fixed=False``)
  or ``β`` (``fixed=True``); 1 otherwise; then the schedule ``k ← 1 + w (k − 1)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..config import CPConfig

N_FIELDS = 5  # sumsq, ghat, r, k, conflict (then one guard slot)


_CP = CPConfig()


@dataclass(frozen=True)
class PenaltyParams:
    """Scalars of the penalty rule (a view of :class:`cpsl.config.CPConfig`)."""

    tau: float = _CP.tau                      # defaults: those of CPConfig (declared once there)
    alpha: float = _CP.alpha
    k_min: float = _CP.k_min
    beta: float = _CP.beta
    fixed: bool = _CP.penalty == "fixed"      # penalty mode: False = tanh, True = fixed beta
    normalize: bool = _CP.normalize

    @classmethod
    def from_config(cls, cfg) -> "PenaltyParams":
        return cls(tau=float(cfg.tau), alpha=float(cfg.alpha), k_min=float(cfg.k_min),
                   beta=float(cfg.beta), fixed=(cfg.penalty == "fixed"), normalize=bool(cfg.normalize))


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


def penalty_scalar(sumsq: Sequence[float], numel: Sequence[int], active: Sequence[bool],
                   p: PenaltyParams, w: float) -> list[float]:
    """The penalty stage in plain Python floats (float64): the definition itself."""
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
        conflict = act[m] and n_act >= 2 and r > p.tau
        k = 1.0
        if conflict:
            k = p.beta if p.fixed else min(max(1.0 - math.tanh(p.alpha * (r - 1.0)), p.k_min), 1.0)
        out[g + m] = ghat[m]
        out[2 * g + m] = r
        out[3 * g + m] = 1.0 + w * (k - 1.0)
        out[4 * g + m] = 1.0 if conflict else 0.0
    return out


def penalty_tensor(sumsq: torch.Tensor, numel: torch.Tensor, active: torch.Tensor,
                   p: PenaltyParams, w: float) -> torch.Tensor:
    """The penalty stage with device tensor ops only (no host sync); float64 in and out."""
    g = sumsq.numel()
    sumsq = torch.where(active, sumsq, torch.zeros_like(sumsq))
    finite = torch.isfinite(sumsq) | ~active
    guard = ~finite.all()
    n_act = active.sum()
    denom = numel.clamp(min=1).to(sumsq.dtype)
    ghat = torch.sqrt(sumsq / denom) if p.normalize else torch.sqrt(sumsq)
    ghat = torch.where(active, ghat, torch.zeros_like(ghat))
    gbar = torch.where(n_act > 0, ghat.sum() / n_act.clamp(min=1), torch.zeros((), dtype=ghat.dtype, device=ghat.device))
    r = torch.where(active & (gbar > 0) & ~guard, ghat / torch.where(gbar > 0, gbar, torch.ones_like(gbar)), torch.zeros_like(ghat))
    conflict = active & (n_act >= 2) & (r > p.tau) & ~guard
    if p.fixed:
        kc = torch.full_like(r, p.beta)
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
                p: PenaltyParams, w: float) -> torch.Tensor:
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
