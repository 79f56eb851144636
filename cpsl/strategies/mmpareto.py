"""``mmpareto``: MMPareto (Wei & Hu, "MMPareto: Boosting Multimodal Learning with Innocent
Unimodal Assistance", ICML 2024; public code github.com/GeWu-Lab/MMPareto_ICML2024,
``code/MMPareto.py``).

Published rule, per step, for each modality encoder's parameters (two modalities, SGD or Adam):
``g_mm`` = gradient of the multimodal loss, ``g_u`` = gradient of the encoder's own unimodal loss.
If ``cos(g_mm, g_u) > 0`` the weights are ``(½, ½)``; otherwise the min-norm (MGDA) weights of the
two, ``a* = clamp(((g_u − g_mm)·g_u) / ‖g_mm − g_u‖², 0, 1)`` on ``g_mm`` and ``1 − a*`` on ``g_u``.
Per parameter tensor the new gradient is ``γ · 2(a g_mm + (1−a) g_u)``, first scaled up to the
norm of the plain sum ``g_mm + g_u`` when it is smaller (``γ = 1.5``).

**Adaptation to regression, N ≥ 2 modalities and our objective:** the multimodal loss is our
whole objective minus its unimodal (aux) term; the unimodal loss of modality ``m`` is
``ℓ(ŷ_m, y)`` with weight ``mmpareto.uni_weight`` (published: 1). Since ``ℓ(ŷ_m, y)`` reaches only
encoder ``m`` (through its aux head), one backward of the objective plus one cheap backward per
modality through its aux head and encoder gives both gradients:
``g_u = ∇ℓ_m``, ``g_mm = ∇L − (λ_aux/M) ∇ℓ_m``. Heads, fusion and decoders keep ``∇L``.
Under Adam the constant ``γ`` cancels but the Pareto direction does not: the update changes
whenever the two gradients conflict (tests/test_strategies.py shows it under AdamW).
"""
from __future__ import annotations

import torch

from ..losses import task_loss
from .base import BaseModulator, Step, register, stats


def pareto_weights(g_mm: torch.Tensor, g_u: torch.Tensor) -> tuple[float, float, float]:
    """(a on g_mm, b on g_u, cos) for flattened gradients: (½, ½) without conflict, else min-norm."""
    cos = float(torch.nn.functional.cosine_similarity(g_mm, g_u, dim=0, eps=1e-12))
    if cos > 0:
        return 0.5, 0.5, cos
    diff = g_mm - g_u
    den = float(diff.dot(diff))
    a = 0.5 if den <= 0 else min(1.0, max(0.0, float((g_u - g_mm).dot(g_u)) / den))
    return a, 1.0 - a, cos


def combine(gmm: list, gu: list, a: float, b: float, gamma: float) -> list:
    """Per tensor: γ · 2(a g_mm + b g_u), scaled up to ‖g_mm + g_u‖ when smaller (published)."""
    out = []
    for x, y in zip(gmm, gu):
        new = 2 * a * x + 2 * b * y
        three, nn_ = (x + y).norm(), new.norm()
        if nn_ > 0 and three / nn_ > 1:
            new = new * (three / nn_)
        out.append(new * gamma)
    return out


@register
class MMPareto(BaseModulator):
    name = "mmpareto"
    needs = frozenset({"unimodal_heads", "extra_backward"})
    effects = frozenset({"replace_grad"})
    section = "mmpareto"

    def backward(self, loss, step: Step) -> None:
        loss.backward(retain_graph=True)
        M = len(self.names)
        self._cos = []
        for gi, m in enumerate(self.names):
            params = [p for p in self.groups[m] if p.grad is not None]
            if not params:
                continue
            lu = task_loss(step.out.aux[m], step.batch.y, self.cfg.loss.task)
            gu = torch.autograd.grad(lu, params, retain_graph=gi < M - 1, allow_unused=True)
            gu = [torch.zeros_like(p) if g is None else g for g, p in zip(gu, params)]
            gmm = [p.grad - (self.cfg.loss.aux / M) * g for p, g in zip(params, gu)]
            gu = [self.scfg.uni_weight * g for g in gu]
            a, b, cos = pareto_weights(torch.cat([g.flatten() for g in gmm]), torch.cat([g.flatten() for g in gu]))
            for p, g in zip(params, combine(gmm, gu, a, b, self.scfg.gamma)):
                p.grad.copy_(g)
            self._cos.append(cos)

    def after_backward(self, step: Step):
        cos = torch.tensor(getattr(self, "_cos", [1.0] * len(self.names)), dtype=torch.float64)
        return stats(self.names, self.groups, torch.ones(len(self.names), dtype=torch.float64), cos <= 0)
