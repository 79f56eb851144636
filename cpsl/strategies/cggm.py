"""``cggm``: Classifier-Guided Gradient Modulation (Guo et al., NeurIPS 2024; public code
github.com/zrguo/CGGM, ``src/msatrain.py``).

Published rule (per step ``t``, unimodal classifiers ``f_m`` on the encoders' features):
* utilisation improvement ``Δ_m = acc_m(t) − acc_m(t−1)`` of each classifier on the batch;
* magnitude: ``c_m = (Σ_k Δ_k − Δ_m) / Σ_k Δ_k`` and the encoder's gradient ``∇θ_m ← ρ · c_m ∇θ_m``
  (a modality that improves faster than the others gets a smaller factor);
* direction: ``L_gm = (1/M) Σ_m (|c_m| − c_m · cos(g_m, g_f))`` with ``g_m`` the gradient of the
  unimodal classifier and ``g_f`` the fused classifier's, added to the objective with weight λ.

**Adaptation to regression and N ≥ 2 modalities (our model):**
* the classifiers are the model's auxiliary heads and utilisation is the negative unimodal loss:
  ``Δ_m = ℓ̄_m(t−1) − ℓ̄_m(t)``, with ``ℓ̄`` an EMA over steps (``cggm.ema``; 0 = the published
  per-batch difference, which on regression batches is mostly noise);
* ``c_m`` is the published formula, clamped to ``[0, M−1]`` (with all Δ > 0 it already lies
  there, so the clamp only acts when some modality got worse) and set to 1 when ``Σ Δ ≤ 0`` (no
  improvement to share out, where the published formula divides by ~0);
* the factor ``ρ c_m`` acts on the gradient (mode ``grad``, published; warns under Adam) or on
  the group's learning rate (mode ``update``, default);
* direction: the gradients compared are taken with respect to each modality's pooled
  representation ``h_m`` (the published code compares the heads' last-layer weight gradients;
  ours are of different inputs): ``g_f,m = ∂ℓ(ŷ, y)/∂h_m`` (kept differentiable, so ``L_gm`` moves
  the fusion, the head and the encoders) and ``g_m = ∂ℓ(ŷ_m, y)/∂h_m`` (the target, detached),
  weighted by the previous step's ``c_m``. One extra (double-)backward through the fusion and heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import task_loss
from .base import ScalingModulator, Step, register, stats, unimodal_losses


def cggm_coefficients(delta: torch.Tensor) -> torch.Tensor:
    """Δ (G,) → c (G,): (ΣΔ − Δ_m) / ΣΔ clamped to [0, G−1]; all ones when ΣΔ ≤ 0."""
    total = delta.sum()
    if total <= 1e-12:
        return torch.ones_like(delta)
    return ((total - delta) / total).clamp(0.0, delta.numel() - 1.0)


def direction_loss(c: torch.Tensor, g_fused: list, g_uni: list) -> torch.Tensor:
    """(1/M) Σ_m (|c_m| − c_m cos(g_f,m, g_m)) over flattened gradients."""
    terms = [c[i].abs() - c[i] * F.cosine_similarity(gf.flatten(), gu.flatten(), dim=0, eps=1e-12)
             for i, (gf, gu) in enumerate(zip(g_fused, g_uni))]
    return torch.stack(terms).mean()


@register
class CGGM(ScalingModulator):
    name = "cggm"
    needs = frozenset({"unimodal_heads", "optimizer", "extra_backward"})
    effects = frozenset({"scale_grad", "scale_lr", "loss_term"})
    section = "cggm"

    def __init__(self, groups, cfg, model=None, optimizer=None, device=None):
        super().__init__(groups, cfg, model, optimizer, device)
        self.ema: torch.Tensor | None = None      # ℓ̄_m
        self.c: torch.Tensor | None = None        # the previous step's coefficients

    def objective(self, loss, step: Step):
        if self.scfg.lam <= 0 or self.c is None:
            return loss
        h = [step.out.h[m] for m in self.names]
        fused = task_loss(step.out.pred, step.batch.y, self.cfg.loss.task)
        g_f = torch.autograd.grad(fused, h, create_graph=True, retain_graph=True)
        uni = sum(task_loss(step.out.aux[m], step.batch.y, self.cfg.loss.task) for m in self.names)
        g_u = [g.detach() for g in torch.autograd.grad(uni, h, retain_graph=True)]
        return loss + self.scfg.lam * direction_loss(self.c.to(loss.dtype).to(loss.device), g_f, g_u)

    def after_backward(self, step: Step):
        cur = unimodal_losses(step.terms, self.names).cpu()
        prev = self.ema
        self.ema = cur if prev is None else self.scfg.ema * prev + (1 - self.scfg.ema) * cur
        c = torch.ones_like(cur) if prev is None else cggm_coefficients(prev - self.ema)
        k = self.scfg.rho * c
        self.scale.apply(k)
        self.c = c
        return stats(self.names, self.groups, k)

    def state_dict(self) -> dict:
        return {"ema": self.ema, "c": self.c}

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.c = state.get("ema"), state.get("c")
