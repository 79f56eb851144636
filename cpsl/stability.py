"""Training stability: a resume-safe learning-rate schedule and an exponential moving average
(EMA) of the weights, both driven by the global step count (issue 13).

Why: with a constant lr of 1e-3 and selection on one epoch's validation loss, the synthetic
data's valid MAE swung by ~0.1 between consecutive epochs, so two runs that differ only in float
rounding picked checkpoints 0.05 MAE apart. ``docs/stability.md`` has the measurements.

* :class:`LRSchedule` (``train.lr_schedule``): ``constant`` or ``cosine`` — a linear warm-up over
  ``train.warmup_epochs`` then a cosine decay to ``train.lr_min`` × lr at ``train.lr_horizon``
  epochs, flat after it. The horizon is its own config key (not ``train.epochs``), so the same
  run stopped early, extended with more epochs or resumed follows the same curve, and it lives in
  the checkpoint's config (``--resume`` refuses another value). The factor is written into every
  optimizer param group's ``lr`` *and* ``base_lr`` tensors in place, so a strategy that scales a
  group's learning rate (CP's ``update`` mode, AGS, ...) multiplies the scheduled value.
* :class:`WeightEMA` (``train.ema`` = decay, 0 = off): ``θ̄ ← θ̄ + (1 − d_t)(θ − θ̄)`` after every
  optimizer step, with the usual warm-up ``d_t = min(d, (1 + t) / (10 + t))``; float buffers
  (the masked BatchNorm's running statistics) are averaged the same way. Validation, checkpoint
  selection, ``best.pt`` and everything downstream (eval, distill, export) use the averaged weights;
  ``last.pt`` also holds the raw weights (``train_model``) so that ``--resume`` continues exactly.
"""
from __future__ import annotations

import copy
import math

import torch


def lr_factor(step: int, steps_per_epoch: int, schedule: str, warmup_epochs: float, horizon_epochs: float,
              lr_min: float) -> float:
    """The multiplier of the configured learning rates at optimisation step ``step`` (0-based)."""
    if schedule == "constant":
        return 1.0
    t = step / max(steps_per_epoch, 1)                  # epochs elapsed, fractional
    if warmup_epochs > 0 and t < warmup_epochs:
        return (step + 1) / (warmup_epochs * steps_per_epoch)
    span = max(horizon_epochs - warmup_epochs, 1e-9)
    p = min(max((t - warmup_epochs) / span, 0.0), 1.0)
    return lr_min + (1.0 - lr_min) * 0.5 * (1.0 + math.cos(math.pi * p))


class LRSchedule:
    """Writes ``lr_factor`` × each param group's configured lr before every step (no host sync:
    ``fill_`` of the lr tensors with a Python float)."""

    def __init__(self, tcfg, optimizer, steps_per_epoch: int):
        self.tcfg, self.optimizer, self.steps_per_epoch = tcfg, optimizer, steps_per_epoch
        self.active = tcfg.lr_schedule != "constant"
        self.bind()

    def bind(self) -> None:
        """(Re)attach to the optimizer's param groups (again after ``optimizer.load_state_dict``)."""
        for pg in self.optimizer.param_groups:
            pg.setdefault("init_lr", float(pg["lr"]))
            if torch.is_tensor(pg["lr"]) and "base_lr" not in pg:
                pg["base_lr"] = pg["lr"].detach().clone()  # the strategies' GroupScale reads this tensor

    def factor(self, epoch: int, i: int) -> float:
        c = self.tcfg
        return lr_factor(epoch * self.steps_per_epoch + i, self.steps_per_epoch, c.lr_schedule, c.warmup_epochs,
                         c.lr_horizon, c.lr_min)

    def apply(self, epoch: int, i: int) -> None:
        if not self.active:
            return
        f = self.factor(epoch, i)
        for pg in self.optimizer.param_groups:
            v = pg["init_lr"] * f
            if torch.is_tensor(pg["lr"]):
                pg["lr"].fill_(v)
                if torch.is_tensor(pg.get("base_lr")):
                    pg["base_lr"].fill_(v)
            else:
                pg["lr"] = v


class WeightEMA:
    """An exponential moving average of a model's parameters and float buffers (a frozen copy in
    eval mode; ``model`` is what validation and checkpoints use)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._pairs(model)

    def _pairs(self, model):
        src = dict(model.named_parameters())
        dst = dict(self.model.named_parameters())
        self._p = ([dst[n] for n in src], [src[n] for n in src])
        sb, db = dict(model.named_buffers()), dict(self.model.named_buffers())
        self._bf = ([db[n] for n in sb if sb[n].is_floating_point()], [sb[n] for n in sb if sb[n].is_floating_point()])
        self._bo = [(db[n], sb[n]) for n in sb if not sb[n].is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for dst, src in (self._p, self._bf):
            if dst:
                torch._foreach_lerp_(dst, [s.detach() for s in src], 1.0 - d)
        for dst, src in self._bo:
            dst.copy_(src)

    def state_dict(self) -> dict:
        return {"updates": self.updates}

    def load(self, weights: dict, updates: int) -> None:
        self.model.load_state_dict(weights)
        self.updates = int(updates)
