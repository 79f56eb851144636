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

from .config import Config, flatten, upgrade_keys
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


# Keys absent from a checkpoint were added to the config after the run was written. The run then
# behaved as the value below; every key not listed kept the old behaviour at its default
# (docs/architecture.md, "a config value"). train.ema: added off (0.0), default 0.99
# since 6148a2a. ogm_ge.mode: OGM-GE scaled gradients ("grad") before its section existed (9f17298).
LEGACY_VALUES = {"train.ema": 0.0, "ogm_ge.mode": "grad"}


def absent_value(key: str):
    """What a run written before ``key`` existed behaved as."""
    return LEGACY_VALUES[key] if key in LEGACY_VALUES else flatten(Config().to_dict()).get(key)


def run_identity(cfg: Config, fingerprint: str) -> dict:
    """Flat ``{key: value}`` of what a resumed run must share with the checkpoint."""
    return {"data.fingerprint": fingerprint, **{k: v for k, v in flatten(cfg.to_dict()).items() if k not in RESUMABLE}}


def resume_differences(ck: dict, cfg: Config, fingerprint: str) -> list[str]:
    """``key (checkpoint → now)`` for every identity value that differs."""
    old = ck.get("identity")
    if not isinstance(old, dict):   # older checkpoints: the config alone (only the keys it recorded)
        recorded = set(flatten(upgrade_keys(ck["config"]))) | {"data.fingerprint"}
        old = {k: v for k, v in run_identity(Config.from_dict(ck["config"]), fingerprint).items() if k in recorded}
    new = run_identity(cfg, fingerprint)
    diffs = []
    for k in sorted(set(old) | set(new)):
        was = old[k] if k in old else absent_value(k)
        if was != new.get(k):
            if k == "data.fingerprint":
                diffs.append("the data (content fingerprint differs)")
            else:
                diffs.append(f"{k} ({'' if k in old else 'not recorded, ran as '}{was!r} -> {new.get(k)!r})")
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
