"""Where a bench script writes: its --out, else a scratch folder, never silently over committed results."""
from __future__ import annotations

from pathlib import Path

from . import REPO
from .errors import BenchError

SCRATCH = REPO / "runs" / "bench"          # git-ignored (runs/)
COMMITTED = REPO / "bench" / "results"


def output_dir(out: str | Path | None, name: str, overwrite: bool = False) -> Path:
    """``out``, or ``runs/bench/<name>`` when it is not given. A folder under bench/results that
    already holds files is refused unless ``overwrite``: committed results change only on purpose."""
    p = Path(out) if out else SCRATCH / name
    inside = p.resolve() == COMMITTED.resolve() or COMMITTED.resolve() in p.resolve().parents
    if inside and p.is_dir() and any(p.iterdir()) and not overwrite:
        raise BenchError(f"{p} holds committed results: pass --overwrite to replace them "
                         f"(or choose another --out; without --out the scratch folder {SCRATCH / name} is used)")
    return p
