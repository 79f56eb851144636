"""``cp``: the Conflict-aware Penalty (docs/method.md §5) as a plug-in. The rule and its backends
(reference, foreach, native) stay in :mod:`cpsl.cp`; this module only wires
:class:`~cpsl.cp.penalty.ConflictAwarePenalty` to the loop's hook points and gives CP's groups a
gradient arena (one native plan per run)."""
from __future__ import annotations

from ..cp.arena import GradArena
from ..cp.penalty import ConflictAwarePenalty
from .base import BaseModulator, Step, register


@register
class CPModulator(ConflictAwarePenalty, BaseModulator):
    name = "cp"
    needs = frozenset({"optimizer"})
    effects = frozenset({"scale_lr", "scale_grad", "grad_noise"})
    section = "cp"

    def __init__(self, groups, cfg, model=None, optimizer=None, device=None):
        ConflictAwarePenalty.__init__(self, groups, cfg.cp,
                                      optimizer=optimizer if cfg.cp.mode == "update" else None, device=device)
        self.groups, self.model, self.device = groups, model, device
        self.arena = None
        self.effects = frozenset({"scale_lr" if cfg.cp.mode == "update" else "scale_grad"}
                                 | ({"grad_noise"} if cfg.cp.ge_noise > 0 else set()))

    def bind(self, optimizer) -> None:
        # CP groups' grads live in a stable arena (zero_grad goes through it): one native plan per run
        self.arena = GradArena.for_modulator(self, optimizer)

    def after_backward(self, step: Step):
        return ConflictAwarePenalty.step(self, step.epoch, step.terms)
