"""``reference`` CP backend: a plain Python loop with float64 accumulation. The ground truth."""
from __future__ import annotations

import torch

from .core import Backend, PenaltyParams, penalty_scalar, register_backend


def reference_stats(grads, group_index, n_groups, p: PenaltyParams, w: float) -> torch.Tensor:
    sumsq = [0.0] * n_groups
    numel = [0] * n_groups
    active = [False] * n_groups
    device = None
    for gi, grad in zip(group_index, grads):
        if grad is None or grad.numel() == 0:
            continue
        device = grad.device
        sumsq[gi] += float(grad.detach().double().pow(2).sum())
        numel[gi] += grad.numel()
        active[gi] = True
    out = penalty_scalar(sumsq, numel, active, p, w)
    return torch.tensor(out, dtype=torch.float64, device=device or "cpu")


class ReferenceBackend(Backend):
    name = "reference"

    def compute(self, grads, group_index, n_groups, p, w):
        return reference_stats(grads, group_index, n_groups, p, w)


register_backend("reference", ReferenceBackend)
