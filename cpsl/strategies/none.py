"""``none``: plain joint training. With ``groups.diagnostics`` it still measures the CP rule's
statistics (ĝ_m, r_m, conflict flags; k stays 1 because nothing is applied) so that the balance
trajectories of every run can be compared."""
from __future__ import annotations

import warnings

from ..cp.penalty import ConflictAwarePenalty
from .base import BaseModulator, Step, StepStats, register
from .plans import PlanCount


@register
class NoModulation(BaseModulator):
    name = "none"

    def __init__(self, groups, cfg, model=None, optimizer=None, device=None):
        super().__init__(groups, cfg, model, optimizer, device)
        self._probe, self.plans = None, None
        if cfg.groups.diagnostics:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._probe = ConflictAwarePenalty(groups, cfg.cp, device=device, apply=False)

    def bind(self, optimizer) -> None:
        super().bind(optimizer)
        self.plans = PlanCount()

    def results(self) -> dict:
        return self.plans.results() if self.plans is not None else {}

    def after_backward(self, step: Step) -> StepStats | None:
        if self._probe is None:
            return None
        return StepStats.of_penalty(self._probe.names, self._probe.step(step.epoch, step.terms))
