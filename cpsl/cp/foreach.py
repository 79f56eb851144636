"""``foreach`` CP backend: ``torch._foreach_norm`` + the device-side penalty + ``torch._foreach_mul_``.

No host synchronisation: per-step constants (group index, element counts, active groups) are
cached device tensors keyed by the step's gradient layout.

On CPU, ``torch._foreach_norm`` accumulates each tensor serially in fp32 (relative error ~1e-4
on a 23 M-element embedding), so tensors are viewed as chunks of ``CPU_CHUNK`` elements whose
fp32 norms are accurate, and the chunks' squares are summed in float64.
"""
from __future__ import annotations

import torch

from .core import Backend, CPStats, PenaltyParams, check_state, penalty_tensor, register_backend

CPU_CHUNK = 1 << 16


class ForeachBackend(Backend):
    name = "foreach"

    def __init__(self):
        self._cache: dict = {}

    def _layout(self, grads, group_index, n_groups):
        present = tuple(i for i, g in enumerate(grads) if g is not None and g.numel() > 0)
        device = grads[present[0]].device if present else torch.device("cpu")
        key = (present, tuple(group_index), n_groups, str(device),
               tuple(grads[i].numel() for i in present))
        hit = self._cache.get(key)
        if hit is None:
            split = device.type == "cpu"
            pieces = [(-(-grads[i].numel() // CPU_CHUNK) if split else 1) for i in present]
            gidx = [group_index[i] for i, n in zip(present, pieces) for _ in range(n)]
            numel = [0] * n_groups
            for i in present:
                numel[group_index[i]] += grads[i].numel()
            by_group = [[j for j, i in enumerate(present) if group_index[i] == m] for m in range(n_groups)]
            hit = {
                "present": present,
                "pieces": pieces,
                "gidx": torch.tensor(gidx, dtype=torch.long, device=device),
                "numel": torch.tensor(numel, dtype=torch.float64, device=device),
                "active": torch.tensor([n > 0 for n in numel], dtype=torch.bool, device=device),
                "by_group": by_group,
                "device": device,
            }
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = hit
        return hit

    def compute(self, grads, group_index, n_groups, p: PenaltyParams, w: float, state=None) -> torch.Tensor:
        lay = self._layout(grads, group_index, n_groups)
        if p.ema:
            check_state(state, n_groups, lay["device"] if lay["present"] else None, p)
        tensors = []
        for i, n in zip(lay["present"], lay["pieces"]):
            g = grads[i]
            tensors.extend(g.reshape(-1).split(CPU_CHUNK) if n > 1 else (g,))
        sumsq = torch.zeros(n_groups, dtype=torch.float64, device=lay["device"])
        if tensors:
            norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
            sq = torch.stack(norms).double().square()
            sumsq.index_add_(0, lay["gidx"], sq)
        return penalty_tensor(sumsq, lay["numel"], lay["active"], p, w, state)

    def scale_(self, grads, group_index, stats, n_groups) -> None:
        lay = self._layout(grads, group_index, n_groups)
        k = CPStats.unpack(stats, n_groups).k.to(torch.float32)
        present = [grads[i] for i in lay["present"]]
        for m, members in enumerate(lay["by_group"]):
            if not members:
                continue
            by_dtype: dict = {}
            for j in members:
                by_dtype.setdefault(present[j].dtype, []).append(present[j])
            for dt, ts in by_dtype.items():
                torch._foreach_mul_(ts, k[m].to(dt))


register_backend("foreach", ForeachBackend)
