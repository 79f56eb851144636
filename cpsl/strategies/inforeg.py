"""``inforeg``: InfoReg (Huang et al., "Adaptive Unimodal Regulation for Balanced Multimodal
Information Acquisition", CVPR 2025; public code github.com/GeWu-Lab/InfoReg_CVPR2025, ``main.py``).

Published rule (audio-visual classification, two encoders):
* every epoch, the trace of the diagonal Fisher information of each encoder is estimated as
  ``tr F_m = Σ_layers mean((Σ_steps ∇W)²)``-style sums of squared weight gradients, and kept in a
  list; the *prime learning window* is open while the dominant encoder's information still
  grows fast: ``κ = (tr̄₁ − tr̄₂) / tr̄₁ > 0.04`` with ``tr̄₁``, ``tr̄₂`` the means of the last 10
  traces and of the 10 before the last one (``κ = 1`` in epoch 0);
* inside the window, on each step, the dominant modality ``d`` (larger ``s_m = Σ_i p_m,i[y_i]``)
  gets a proximal term towards its parameters at the start of the epoch:
  ``∇θ_d += β (θ_d − θ_d⁰)`` with ``β = 0.95 · exp(tanh(s_d − s_other))``.

**Adaptation to regression and N ≥ 2 modalities:** ``s_m = Σ_i exp(−ℓ(ŷ_m,i, y_i))`` (as for
OGM-GE); ``d = argmax s`` and ``s_other = mean_{n≠d} s_n``; the Fisher trace uses every weight
tensor (dim ≥ 2) of the group: ``tr F_m = Σ_p mean_p(Σ_steps (∇p)²)`` (the published code uses
Conv2d/Linear weights), accumulated after the proximal term, as published; the window test uses
the trace history of the modality that is dominant in the step, with means over the epochs
available (the published code divides by 10 from epoch 1 on). ``β`` and the 0.04 threshold and the
10-epoch horizon are ``inforeg.beta``, ``inforeg.threshold``, ``inforeg.horizon``.
Under AdamW the proximal term changes the update's direction, not just its scale (a restoring
force towards θ⁰ that Adam does not divide away): the regulated group moves less
(tests/test_strategies.py).
"""
from __future__ import annotations

import math

import torch

from .base import BaseModulator, Step, register, regression_scores, stats


def window_kappa(history: list[float], horizon: int) -> float:
    """κ = (tr̄₁ − tr̄₂) / tr̄₁ over the last ``horizon`` traces and the ``horizon`` before the last
    one; 1 with fewer than two traces (epoch 0: the window is open)."""
    if len(history) < 2:
        return 1.0
    t1 = sum(history[-horizon:]) / len(history[-horizon:])
    prev = history[-horizon - 1:-1]
    t2 = sum(prev) / len(prev)
    return (t1 - t2) / t1 if t1 > 0 else 0.0


def proximal_beta(scores: torch.Tensor, beta: float) -> tuple[int, float]:
    """(d, β_d): d = argmax s, β_d = β exp(tanh(s_d − mean_{n≠d} s_n))."""
    d = int(torch.argmax(scores))
    others = (scores.sum() - scores[d]) / max(scores.numel() - 1, 1)
    return d, beta * math.exp(math.tanh(float(scores[d] - others)))


@register
class InfoReg(BaseModulator):
    name = "inforeg"
    needs = frozenset({"unimodal_heads"})
    effects = frozenset({"loss_term"})      # ∇ of β/2 ‖θ_d − θ_d⁰‖², added to the gradient directly
    section = "inforeg"

    def __init__(self, groups, cfg, model=None, optimizer=None, device=None):
        super().__init__(groups, cfg, model, optimizer, device)
        self.history: dict[str, list[float]] = {m: [] for m in self.names}
        self.anchor: dict[str, list[torch.Tensor]] = {}
        self.kappa = {m: 1.0 for m in self.names}
        self._trace = None
        self._active = 0

    def begin_epoch(self, epoch: int) -> None:
        self.anchor = {m: [p.detach().clone() for p in self.groups[m]] for m in self.names}
        self.kappa = {m: window_kappa(self.history[m], self.scfg.horizon) for m in self.names}
        self._trace = torch.zeros(len(self.names), dtype=torch.float64)
        self._active = 0

    def after_backward(self, step: Step):
        s = regression_scores(step.out.aux, step.batch.y, self.cfg.loss.task, self.names)
        d, beta = proximal_beta(s, self.scfg.beta)
        k = torch.ones(len(self.names), dtype=torch.float64)
        m = self.names[d]
        if self.kappa[m] > self.scfg.threshold and self.anchor:
            for p, p0 in zip(self.groups[m], self.anchor[m]):
                if p.grad is not None:
                    p.grad.add_(p.detach() - p0, alpha=beta)
            k[d] = 0.0          # logged as "regulated" (k < 1); nothing is scaled
            self._active += 1
        for gi, n in enumerate(self.names):
            sq = [(p.grad.double() ** 2).mean() for p in self.groups[n] if p.grad is not None and p.dim() >= 2]
            if sq:
                self._trace[gi] += torch.stack(sq).sum().cpu()
        return stats(self.names, self.groups, k)

    def end_epoch(self, epoch: int) -> dict:
        if self._trace is None:
            return {}
        for gi, m in enumerate(self.names):
            self.history[m].append(float(self._trace[gi]))
        return {"fisher_trace": {m: self.history[m][-1] for m in self.names}, "kappa": dict(self.kappa),
                "regulated_steps": self._active}

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = {m: list(v) for m, v in state.get("history", {}).items()} or self.history
