"""Run folders are never silently mixed.

* :func:`prepare_out`: ``--out`` holding a run is refused unless ``resume`` (continue it) or
  ``overwrite`` (its artefacts are removed first, so no seed of the old run survives).
* :func:`run_identity` / :func:`resume_differences`: every checkpoint records what makes a run
  the same run (a fingerprint of the data's content, the model, loss and strategy sections,
  the optimizer settings and the batch size); ``--resume`` compares them with the current
  ones and names each difference.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np

from .config import Config
from .data.mmsa import MMSAData
from .errors import CPSLError

RUN_FILES = ("results.json", "config.json")
SEED_FILES = ("best.pt", "last.pt", "log.jsonl", "curves.png", "balance.png", "best.tmp", "last.tmp")
# settings a resumed run may change: how long it runs and where, not what it learns
RESUMABLE = {"train.epochs", "train.patience", "train.progress", "train.num_threads", "train.device",
             "train.seeds", "train.skip_limit", "data.path", "data.eval_batch_size", "cp.backend", "cp.diagnostics"}


def data_fingerprint(data: MMSAData) -> str:
    """blake2b of every split's features, lengths, labels and ids (the content, not the path)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(data.splits):
        s = data.splits[name]
        h.update(name.encode())
        for m in sorted(s.features):
            h.update(m.encode())
            h.update(str(s.features[m].shape).encode())
            h.update(np.ascontiguousarray(s.features[m]).tobytes())
            h.update(np.ascontiguousarray(s.lengths[m]).tobytes())
        h.update(np.ascontiguousarray(s.labels).tobytes())
        h.update("\0".join(map(str, s.ids)).encode())
    return h.hexdigest()


def run_identity(cfg: Config, fingerprint: str) -> dict:
    """Flat ``{key: value}`` of what a resumed run must share with the checkpoint."""
    flat = {"data.fingerprint": fingerprint}
    for sec, vals in cfg.to_dict().items():
        for k, v in vals.items():
            key = f"{sec}.{k}"
            if key not in RESUMABLE:
                flat[key] = v
    return flat


def resume_differences(ck: dict, cfg: Config, fingerprint: str) -> list[str]:
    """``key (checkpoint → now)`` for every identity value that differs."""
    old = ck.get("identity")
    if not isinstance(old, dict):   # older checkpoints: the config alone
        old = run_identity(Config.from_dict(ck["config"]), fingerprint)
    new = run_identity(cfg, fingerprint)
    diffs = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            if k == "data.fingerprint":
                diffs.append("the data (content fingerprint differs)")
            else:
                diffs.append(f"{k} ({old.get(k)!r} -> {new.get(k)!r})")
    return diffs


def holds_run(out: Path) -> list[str]:
    """Names of run artefacts in ``out`` (empty when it holds no run)."""
    if not out.is_dir():
        return []
    found = [f for f in RUN_FILES if (out / f).is_file()]
    for d in sorted(out.glob("seed*")):
        if d.is_dir():
            found += [f"{d.name}/{f}" for f in SEED_FILES if (d / f).is_file()]
    return found


def check_out(out: str | Path, resume: bool = False, overwrite: bool = False) -> list[str]:
    """Raise unless ``out`` may be used; returns the run artefacts it holds. Changes nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CPSLError(f"--out {out} exists and is not a folder")
    if resume and overwrite:
        raise CPSLError("--resume and --overwrite exclude each other")
    found = holds_run(out)
    if found and not resume and not overwrite:
        raise CPSLError(f"--out {out} already holds a run ({', '.join(found[:3])}"
                        f"{', ...' if len(found) > 3 else ''}); pass --resume to continue it or "
                        "--overwrite to replace it")
    return found


def prepare_out(out: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """:func:`check_out`, then (``overwrite``) remove the old run's artefacts; create the folder."""
    out = Path(out)
    if check_out(out, resume, overwrite) and not resume:
        for f in RUN_FILES:
            (out / f).unlink(missing_ok=True)
        for d in out.glob("seed*"):
            if d.is_dir() and any((d / f).exists() for f in SEED_FILES):
                shutil.rmtree(d)
    out.mkdir(parents=True, exist_ok=True)
    return out
