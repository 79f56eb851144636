"""``moddrop``: modality dropout (ModDrop, Neverova et al., "ModDrop: adaptive multi-modal gesture
recognition", TPAMI 2016; the "modality dropout" baseline of the balancing literature, e.g.
BalanceBenchmark). The simple baseline every balancing method should beat, and a direct remedy
for shortcut learning through one modality: a model that cannot count on the dominant modality
being present has to learn the others.

Published rule: during training each modality of each sample is dropped (its input zeroed) with a
fixed probability ``p``.

**Adaptation (dominant dropped more often, never all of a sample):** the dominant modality is the
one with the lowest EMA of its unimodal loss ``ℓ̄_m`` (``moddrop.ema``); it is dropped with
probability ``moddrop.p_dominant``, every other one with ``moddrop.p`` (before the first step:
``p`` for all). A sample whose draw removes every modality keeps one of them, chosen uniformly.
A dropped modality becomes what ``cpsl eval --mask-modality`` feeds the model: one zero frame
marked valid. Random draws come from torch's global generator, whose state ``last.pt`` saves, so
``--resume`` repeats them exactly. Under AdamW it changes the data, not a gradient factor, so the
optimizer cannot divide it away.
"""
from __future__ import annotations

import torch

from .base import BaseModulator, Step, register, stats, unimodal_losses


def drop_probabilities(ema: torch.Tensor | None, n: int, p: float, p_dominant: float) -> torch.Tensor:
    """(G,) drop probability per modality: p_dominant for argmin ℓ̄, p for the rest."""
    probs = torch.full((n,), float(p), dtype=torch.float64)
    if ema is not None:
        probs[int(torch.argmin(ema))] = float(p_dominant)
    return probs


def draw_drops(probs: torch.Tensor, batch_size: int, generator=None) -> torch.Tensor:
    """(B, G) bool: True = drop; no row drops every modality."""
    drop = torch.rand(batch_size, probs.numel(), generator=generator, dtype=torch.float64) < probs
    full = drop.all(1)
    if full.any():
        keep = torch.randint(probs.numel(), (int(full.sum()),), generator=generator)
        drop[full.nonzero().squeeze(1), keep] = False
    return drop


@register
class ModDrop(BaseModulator):
    name = "moddrop"
    needs = frozenset({"unimodal_heads", "per_sample"})
    effects = frozenset({"mask_inputs"})
    section = "moddrop"

    def __init__(self, groups, cfg, model=None, optimizer=None, device=None):
        super().__init__(groups, cfg, model, optimizer, device)
        self.ema: torch.Tensor | None = None
        self.probs = drop_probabilities(None, len(self.names), self.scfg.p, self.scfg.p_dominant)

    def prepare_batch(self, batch, epoch: int):
        self.probs = drop_probabilities(self.ema, len(self.names), self.scfg.p, self.scfg.p_dominant)
        drop = draw_drops(self.probs, len(batch.y))
        for gi, m in enumerate(self.names):
            rows = drop[:, gi].nonzero().squeeze(1).to(batch.x[m].device)
            if rows.numel():
                x, mask = batch.x[m].clone(), batch.mask[m].clone()
                x[rows] = 0
                mask[rows] = False
                mask[rows, 0] = True                   # one zero frame, marked valid
                batch.x[m], batch.mask[m] = x, mask
        return batch

    def after_backward(self, step: Step):
        cur = unimodal_losses(step.terms, self.names).cpu()
        self.ema = cur if self.ema is None else self.scfg.ema * self.ema + (1 - self.scfg.ema) * cur
        return stats(self.names, self.groups, 1.0 - self.probs)   # k logged = keep probability

    def state_dict(self) -> dict:
        return {"ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        self.ema = state.get("ema")
