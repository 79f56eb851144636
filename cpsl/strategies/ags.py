"""``ags``: AGS-style adaptive gradient scaling (Actual-cause-Guided Adaptive Gradient Scaling for
balanced multimodal sentiment analysis, 2025; public code github.com/TheShy-Dream/AGS-SMoE,
``solver.py``: ``calculate_average_gradient_l2_norm``, ``apply_grad_input_modifier``).

Published rule (MOSI/MOSEI regression, three encoders, every ``update_batch`` steps until
``end_epoch``): per encoder the average gradient L2 norm ``ḡ_m = sqrt(Σ_p ‖∇p‖² / #p)`` (over its
parameter tensors); for the dominant encoder ``d = argmax ḡ``, ``ratio = ḡ_d / mean_{n≠d} ḡ_n``,
``r = ratio / (1 + ratio)`` and its gradient is multiplied by ``k_d = 1 − tanh(α · r)``; the
others keep ``k = 1``.

**Adaptation:** N ≥ 2 groups (``mean_{n≠d}`` is the published mean of the two others for N = 3 and
the other one for N = 2); applied every step. Mode ``grad`` is the published action (warns under
Adam/AdamW, which divide a constant factor away); mode ``update`` (default) scales the dominant
group's learning rate.

**How it differs from CP** (docs/method.md §5), its closest relative: AGS always throttles exactly
one encoder (the argmax), with no threshold, by a factor that never falls below ``1 − tanh(α)``
and never reaches 1 (``r ≥ ½``, so even a perfectly balanced step is throttled by
``1 − tanh(α/2)``); its statistic is the RMS of per-tensor norms (a many-small-tensor encoder
looks weaker). CP compares each group's total norm with the mean of all groups, acts only
above ``τ`` (conflict), on every group above it, is 1 at balance and floors at ``k_min``, with an
epoch schedule and a non-finite guard.
"""
from __future__ import annotations

import torch

from .base import ScalingModulator, Step, register, stats


def average_grad_norm(params) -> torch.Tensor:
    """sqrt(Σ_p ‖∇p‖² / #p) over the tensors with a gradient (0 when none)."""
    sq = [(p.grad.double() ** 2).sum() for p in params if p.grad is not None]
    if not sq:
        return torch.zeros((), dtype=torch.float64)
    return torch.sqrt(torch.stack(sq).sum() / len(sq))


def ags_coefficients(gbar: torch.Tensor, alpha: float) -> torch.Tensor:
    """gbar (G,) → k (G,): k_d = 1 − tanh(α · ratio / (1 + ratio)) for d = argmax, 1 elsewhere."""
    g = gbar.numel()
    d = int(torch.argmax(gbar))
    others = (gbar.sum() - gbar[d]) / max(g - 1, 1)
    k = torch.ones_like(gbar)
    if others > 0:
        ratio = gbar[d] / others
        k[d] = 1.0 - torch.tanh(alpha * ratio / (1.0 + ratio))
    return k


@register
class AGS(ScalingModulator):
    name = "ags"
    needs = frozenset({"optimizer"})
    effects = frozenset({"scale_grad", "scale_lr"})
    section = "ags"

    def after_backward(self, step: Step):
        if step.epoch > self.scfg.end_epoch:
            k = torch.ones(len(self.names), dtype=torch.float64)
        else:
            k = ags_coefficients(torch.stack([average_grad_norm(self.groups[n]) for n in self.names]), self.scfg.alpha)
        self.scale.apply(k)
        return stats(self.names, self.groups, k)
