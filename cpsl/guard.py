"""The training step guard: a step whose loss, gradients or batch statistics are not finite is
skipped entirely (no modulation, no clipping, no optimizer step: the weights and the optimizer
state stay as they were), counted, and after ``limit`` consecutive skips the run stops with one
line naming the likely cause.

One host sync per step (the finiteness flag); the total gradient norm it computes is reused
for clipping, so the guard costs one fused norm over the gradients.
"""
from __future__ import annotations

import math

import torch

from .errors import CPSLError
from .model.ame import MaskedBatchNorm


class StepGuard:
    def __init__(self, model: torch.nn.Module, params: list, limit: int, lr: float, extreme: int = 0,
                 extra_params=()):
        self.params = params                  # clipped (the model's)
        self.extra = list(extra_params)       # checked only (e.g. a distillation projection)
        self.bns = [m for m in model.modules() if isinstance(m, MaskedBatchNorm)]
        self.limit, self.lr, self.extreme = int(limit), float(lr), int(extreme)
        self.skipped = 0          # whole run
        self.epoch_skipped = 0
        self.consecutive = 0
        self.norm: torch.Tensor | None = None

    def new_epoch(self) -> None:
        self.epoch_skipped = 0

    def check(self, loss: torch.Tensor) -> bool:
        """After ``backward``: True when the step may run; False (counted) when it must be skipped."""
        grads = [p.grad for p in self.params if p.grad is not None]
        self.norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=loss.device)
        ok = torch.isfinite(loss.detach()) & torch.isfinite(self.norm)
        extra = [p.grad for p in self.extra if p.grad is not None]
        if extra:
            ok = ok & torch.isfinite(torch.nn.utils.get_total_norm(extra))
        for bn in self.bns:
            st = getattr(bn, "stats_ok", None)
            if st is not None:
                ok = ok & st
        if bool(ok):                                       # the one host sync of the step
            self.consecutive = 0
            return True
        self.skipped += 1
        self.epoch_skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.limit:
            raise CPSLError(f"{self.consecutive} consecutive training steps had a non-finite loss, gradient or "
                            f"batch statistic (train.skip_limit={self.limit}); likely cause: {self.cause()}")
        return False

    def clip(self, max_norm: float) -> None:
        """Clip with the norm :meth:`check` already measured."""
        if max_norm > 0 and self.norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, max_norm, self.norm)

    def cause(self) -> str:
        if self.extreme:
            return (f"the feature statistics: the training data holds {self.extreme} values with |x| > 1e6 "
                    "(see `cpsl data info`); fix or rescale those features")
        if not math.isfinite(self.lr) or self.lr > 1e-2:
            return f"the learning rate train.lr={self.lr:g} is too high; lower it"
        return (f"the learning rate (train.lr={self.lr:g}) or the feature statistics "
                "(see `cpsl data info`); lower train.lr or check the data")
