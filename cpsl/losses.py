"""Every loss term of docs/method.md §4, one function each, plus the weighted objective."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from .config import LossConfig


def task_loss(pred: torch.Tensor, y: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """ℓ(ŷ, y) with ℓ ∈ {l1, mse, smoothl1, half_mse (0.5 · mse)}."""
    if kind == "l1":
        return F.l1_loss(pred, y)
    if kind == "mse":
        return F.mse_loss(pred, y)
    if kind == "smoothl1":
        return F.smooth_l1_loss(pred, y)
    if kind == "half_mse":
        return 0.5 * F.mse_loss(pred, y)
    raise ValueError(f"unknown task loss {kind!r}")


def aux_loss(aux: dict, y: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """L_aux = mean_m ℓ(ŷ_m, y)."""
    return torch.stack([task_loss(p, y, kind) for p in aux.values()]).mean()


def rec_loss(rec: dict, target: dict) -> torch.Tensor:
    """L_rec = mean_m MSE(Dec_m(h_m), sg(x̄_m)); x̄_m is the normalised masked-mean input."""
    return torch.stack([F.mse_loss(rec[m], target[m].detach()) for m in rec]).mean()


def statistical_loss(mu_hat: dict, log_sigma_hat: dict, mu: dict, sigma: dict,
                     pred: torch.Tensor, y: torch.Tensor, lambda_out: float = 0.1, eps: float = 1e-4) -> torch.Tensor:
    """L_SL = mean_m [MSE(μ̂, sg μ) + MSE(log σ̂, sg log(σ + ε))] + λ_out [(Δ mean)² + (Δ std)²]."""
    per_mod = [F.mse_loss(mu_hat[m], mu[m].detach()) +
               F.mse_loss(log_sigma_hat[m], torch.log(sigma[m].detach() + eps)) for m in mu_hat]
    out_term = (pred.mean() - y.mean()) ** 2 + (pred.std(unbiased=False) - y.std(unbiased=False)) ** 2
    return torch.stack(per_mod).mean() + lambda_out * out_term


def diversity_loss(h: dict, eps: float = 1e-8) -> torch.Tensor:
    """L_div = mean_{m<n} mean_B cos²(h̃_m, h̃_n) with h̃ centred over the batch (0 for one modality)."""
    hc = {m: v - v.mean(0, keepdim=True) for m, v in h.items()}
    terms = []
    for m, n in itertools.combinations(hc, 2):
        cos = (hc[m] * hc[n]).sum(-1) / (hc[m].norm(dim=-1) * hc[n].norm(dim=-1)).clamp(min=eps)
        terms.append((cos ** 2).mean())
    if not terms:
        return next(iter(h.values())).sum() * 0.0
    return torch.stack(terms).mean()


def ramp(epoch: int, warmup_epochs: int) -> float:
    """Linear ramp from 0 (epoch 0) to 1 (epoch >= warmup_epochs)."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, epoch / warmup_epochs)


def total_loss(out, y: torch.Tensor, cfg: LossConfig, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = L_task + λ_aux L_aux + λ_rec L_rec + r(e) λ_SL L_SL + r(e) λ_div L_div.

    Returns the objective and every term (unweighted, detached) for logging."""
    terms = {"task": task_loss(out.pred, y, cfg.task)}
    total = terms["task"]
    r = ramp(epoch, cfg.warmup_epochs)
    if cfg.aux > 0:
        terms["aux"] = aux_loss(out.aux, y, cfg.task)
        total = total + cfg.aux * terms["aux"]
    if cfg.rec > 0:
        terms["rec"] = rec_loss(out.rec, out.mu)
        total = total + cfg.rec * terms["rec"]
    if cfg.sl > 0:
        terms["sl"] = statistical_loss(out.mu_hat, out.log_sigma_hat, out.mu, out.sigma, out.pred, y, cfg.sl_out, cfg.eps)
        total = total + r * cfg.sl * terms["sl"]
    if cfg.div > 0:
        terms["div"] = diversity_loss(out.h)
        total = total + r * cfg.div * terms["div"]
    # per-modality auxiliary losses: the modulation strategies score modalities with them
    terms.update({f"aux_{m}": task_loss(p, y, cfg.task) for m, p in out.aux.items()})
    return total, {k: v.detach() for k, v in terms.items()}
