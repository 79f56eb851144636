"""The knobs of distillation, declared once (``cpsl distill`` derives its options from them)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DistillSettings:
    lambda_kd: float = field(default=1.0, metadata={"help": "λ_kd: weight of MSE(ŷ_s, ŷ_t)."})
    lambda_hint: float = field(default=0.1, metadata={"help": "λ_hint: weight of MSE(P z_s, z_t)."})
    max_ratio: float = field(default=0.15, metadata={
        "help": "Largest allowed student/teacher parameter ratio (frozen text backbone excluded)."})
