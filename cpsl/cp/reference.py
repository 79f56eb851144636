"""``reference`` CP backend: a plain Python loop with float64 accumulation. The ground truth."""
from __future__ import annotations

import torch

from .core import Backend, PenaltyParams, check_control, check_state, penalty_scalar, register_backend, weight_value


def reference_stats(grads, group_index, n_groups, p: PenaltyParams, w: float | torch.Tensor,
                    state: torch.Tensor | None = None) -> torch.Tensor:
    """The stats buffer; with ``p.ema`` the signal ``state`` is read and written back in place.
    ``w``: a float or a control block (read on the host)."""
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
    check_state(state, n_groups, device, p)
    if isinstance(w, torch.Tensor):
        check_control(w, device)
    st = [float(v) for v in state.tolist()] if p.ema else None
    out = penalty_scalar(sumsq, numel, active, p, weight_value(w), st)
    if p.ema:
        state.copy_(torch.tensor(st, dtype=torch.float64))
    return torch.tensor(out, dtype=torch.float64, device=device or "cpu")


class ReferenceBackend(Backend):
    name = "reference"

    def compute(self, grads, group_index, n_groups, p, w, state=None):
        return reference_stats(grads, group_index, n_groups, p, w, state)


register_backend("reference", ReferenceBackend)
