"""Peer strategies behind the same interface as CP: ``none`` and ``ogm_ge``.

OGM-GE (Peng et al., CVPR 2022) for classification with two modalities scores each modality
by ``s_m = Σ_i softmax(out_m)_i[y_i]``, takes ``ρ_m = s_m / s_other`` and multiplies the
gradient of the dominant modality's encoder by ``1 − tanh(α · relu(ρ_m − 1))``, adding
Gaussian noise with the gradient's own std (GE). **Our adaptation to regression and N
modalities:** the score of modality ``m`` is ``s_m = Σ_i exp(−ℓ(ŷ_m,i, y_i))`` from its auxiliary
head (the analogue of the summed probability of the true class: 1 for a perfect prediction,
decaying with the error); ``ρ_m = s_m / mean_{n≠m} s_n``, which for N = 2 is exactly the
published ``s_m / s_other``. Coefficients act on gradients (OGM-GE's own mode) during the CP
schedule's epochs.
"""
from __future__ import annotations

import torch

from .penalty import StepStats, schedule_weight


def ogm_ge_coefficients(scores: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (G,) → (ρ, k) with ρ_m = s_m / mean_{n≠m} s_n, k_m = 1 − tanh(α relu(ρ_m − 1))."""
    g = scores.numel()
    others = (scores.sum() - scores) / max(g - 1, 1)
    rho = scores / others.clamp(min=1e-12)
    k = 1.0 - torch.tanh(alpha * torch.relu(rho - 1.0))
    return rho, k


class NoModulation:
    """Plain joint training. With ``diagnostics`` it still measures the CP rule's statistics
    (``ĝ_m``, ``r_m``, conflict flags; ``k`` stays 1 because nothing is applied) so that the
    balance trajectories of every run can be compared."""

    backend_name = "none"

    def __init__(self, groups: dict, cfg=None, diagnostics: bool = True, device=None):
        self.names = tuple(groups)
        self._probe = None
        if diagnostics and cfg is not None:
            from .penalty import ConflictAwarePenalty
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._probe = ConflictAwarePenalty(groups, cfg, optimizer=None, device=device, apply=False)

    def step(self, epoch: int, terms: dict | None = None):
        return None if self._probe is None else self._probe.step(epoch, terms)


class OGMGE:
    backend_name = "ogm_ge"

    def __init__(self, groups: dict, cfg):
        self.names = tuple(groups)
        self.groups = groups
        self.cfg = cfg
        self.alpha = cfg.ogm_alpha
        self.ge = True

    def step(self, epoch: int, terms: dict) -> StepStats | None:
        w = schedule_weight(epoch, self.cfg.start_epoch, self.cfg.ramp_epochs, self.cfg.end_epoch)
        scores = torch.stack([terms[f"ogm_score_{m}"] for m in self.names]).double()
        rho, k = ogm_ge_coefficients(scores, self.alpha)
        k = 1.0 + w * (k - 1.0)
        conflict = (rho > 1.0).to(k.dtype)
        for gi, name in enumerate(self.names):
            kg = k[gi].float()
            for p in self.groups[name]:
                if p.grad is None:
                    continue
                noise = None
                if self.ge and w > 0 and p.grad.numel() > 1:  # N(0, std(∇p)²) of the unscaled gradient
                    noise = torch.randn_like(p.grad) * (p.grad.std() + 1e-8)
                p.grad.mul_(kg.to(p.grad.dtype))
                if noise is not None:
                    p.grad.add_(noise)
        norms = torch.stack([torch.sqrt(sum((p.grad.double() ** 2).sum() for p in self.groups[n] if p.grad is not None)
                                        if any(p.grad is not None for p in self.groups[n]) else torch.zeros((), dtype=torch.float64))
                             for n in self.names])
        r = norms / norms.mean().clamp(min=1e-30)   # same r as CP's (ρ, the score ratio, drives k)
        return StepStats(self.names, norms, r, k, conflict, torch.zeros((), dtype=k.dtype), w)


def ogm_scores(aux: dict, y: torch.Tensor, kind: str = "l1") -> dict[str, torch.Tensor]:
    """s_m = Σ_i exp(−ℓ(ŷ_m,i, y_i)) per modality (detached)."""
    out = {}
    for m, pred in aux.items():
        d = (pred.detach() - y)
        err = d.abs() if kind == "l1" else d ** 2 if kind == "mse" else torch.where(d.abs() < 1, 0.5 * d ** 2, d.abs() - 0.5)
        out[f"ogm_score_{m}"] = torch.exp(-err).sum()
    return out
