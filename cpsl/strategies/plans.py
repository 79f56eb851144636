"""Native CP plans built during a run, for the strategies that drive CP's backend (``cp``, and
``none``'s diagnostics probe): ``cp_plan_builds`` of results.json, 1 a run (docs/native.md)."""
from __future__ import annotations

from ..cp import native


class PlanCount:
    """Plans built since it was made (when the modulator is bound)."""

    def __init__(self):
        self.start = native.plan_builds()

    def results(self) -> dict:
        return {"cp_plan_builds": native.plan_builds() - self.start}
