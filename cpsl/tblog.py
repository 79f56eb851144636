"""TensorBoard output of a training run (``--tensorboard`` / config ``train.tensorboard``): every
scalar of the epoch record that goes to ``log.jsonl`` (loss terms, valid metrics, per-modality
ĝ/r/k/conflict rate...) is written through ``torch.utils.tensorboard`` under ``OUT/seed*/tb``.
The ``tensorboard`` package is optional (``pip install 'cpsl[tensorboard]'``)."""
from __future__ import annotations

import math
from pathlib import Path

from .errors import CPSLError


def flatten(rec: dict, prefix: str = "") -> dict[str, float]:
    """``{"valid": {"MAE": 0.8}, "balance": {"text": {"r": 1.2}}}`` → ``{"valid/MAE": 0.8, "balance/text/r": 1.2}``
    (numbers only; lists of numbers get an index)."""
    out: dict[str, float] = {}
    items = rec.items() if isinstance(rec, dict) else enumerate(rec)
    for k, v in items:
        tag = f"{prefix}{k}"
        if isinstance(v, bool):
            out[tag] = float(v)
        elif isinstance(v, (int, float)):
            if math.isfinite(v):
                out[tag] = float(v)
        elif isinstance(v, (dict, list, tuple)):
            out.update(flatten(v, f"{tag}/"))
    return out


class ScalarLog:
    """A SummaryWriter when enabled, else nothing; ``add(rec, step)`` writes the record's scalars."""

    def __init__(self, log_dir: Path, enabled: bool):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise CPSLError("--tensorboard needs the tensorboard package: pip install 'cpsl[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def add(self, rec: dict, step: int) -> None:
        if self.writer is None:
            return
        for tag, v in flatten({k: v for k, v in rec.items() if k != "epoch"}).items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
