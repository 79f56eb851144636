"""Modulation strategies as plug-ins: a :class:`~cpsl.strategies.base.Modulator` protocol, a
registry, and one module per strategy (see docs/architecture.md, "How to add a strategy")."""
from __future__ import annotations

from .base import (EFFECTS, NEEDS, BaseModulator, Modulator, Step, StepStats, build, check, get, model_groups, names,
                   register, unregister)
from . import none, cp, ogm_ge, cggm, ags, mmpareto, inforeg, moddrop  # noqa: F401,E401  (registration order)

__all__ = ["EFFECTS", "NEEDS", "BaseModulator", "Modulator", "Step", "StepStats", "build", "check", "get",
           "model_groups", "names", "register", "unregister"]
