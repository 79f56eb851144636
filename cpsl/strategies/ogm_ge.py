"""``ogm_ge``: OGM-GE (Peng et al., "Balanced Multimodal Learning via On-the-fly Gradient
Modulation", CVPR 2022; public code github.com/GeWu-Lab/OGM-GE_CVPR2022).

Published rule (classification, two modalities): ``s_m = Σ_i softmax(out_m)_i[y_i]``,
``ρ_m = s_m / s_other``, and the dominant modality's encoder gradient is multiplied by
``k_m = 1 − tanh(α · relu(ρ_m − 1))``, plus Gaussian noise with the gradient's own std (GE).

**Adaptation to regression and N modalities:** ``s_m = Σ_i exp(−ℓ(ŷ_m,i, y_i))`` from the
modality's auxiliary head (1 for a perfect prediction, decaying with the error: the analogue of
the true class's probability); ``ρ_m = s_m / mean_{n≠m} s_n``, which for N = 2 is exactly the
published ``s_m / s_other``. Mode ``grad`` is the published action (right for SGD; Adam/AdamW
divide a constant factor away, so it warns); mode ``update`` (default, we train with AdamW)
applies ``k_m`` to the group's learning rate instead. GE noise goes on the gradient in both modes.
"""
from __future__ import annotations

import torch

from .base import ScalingModulator, Step, register, regression_scores, stats


def ogm_ge_coefficients(scores: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (G,) → (ρ, k) with ρ_m = s_m / mean_{n≠m} s_n, k_m = 1 − tanh(α relu(ρ_m − 1))."""
    g = scores.numel()
    others = (scores.sum() - scores) / max(g - 1, 1)
    rho = scores / others.clamp(min=1e-12)
    k = 1.0 - torch.tanh(alpha * torch.relu(rho - 1.0))
    return rho, k


@register
class OGMGE(ScalingModulator):
    name = "ogm_ge"
    needs = frozenset({"unimodal_heads", "optimizer"})
    effects = frozenset({"scale_grad", "scale_lr", "grad_noise"})
    section = "ogm_ge"

    def after_backward(self, step: Step):
        s = regression_scores(step.out.aux, step.batch.y, self.cfg.loss.task, self.names)
        rho, k = ogm_ge_coefficients(s, self.scfg.alpha)
        noise = []
        if self.scfg.ge:       # N(0, std(∇p)²) of the unscaled gradient on every encoder, as published
            noise = [(p, torch.randn_like(p.grad) * (p.grad.std() + 1e-8)) for n in self.names
                     for p in self.groups[n] if p.grad is not None and p.grad.numel() > 1]
        self.scale.apply(k)
        for p, e in noise:
            p.grad.add_(e)
        return stats(self.names, self.groups, k, rho > 1.0)
