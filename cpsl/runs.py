"""Run folders are never silently mixed.

* :func:`prepare_out`: ``--out`` holding a run is refused unless ``resume`` (continue it) or
  ``overwrite`` (its artefacts are removed first, so no seed of the old run survives). A run is
  recognised by ``OUT/cpsl-run.json`` (format ``cpsl-run-1``), which cpsl writes before anything
  else and which lists every file and folder the run may write; ``--overwrite`` deletes only
  those, and refuses by name anything else it finds in them (or run-like names with no manifest).
  ``OUT/.cpsl-lock`` (``flock``) refuses a second process writing the same folder.
* :func:`run_identity` / :func:`resume_differences`: every checkpoint records what makes a run
  the same run (a fingerprint of the data's content, the model, loss and strategy sections,
  the optimizer settings and the batch size); ``--resume`` compares them with the current
  ones and names each difference.
* :func:`config_differences`: the one comparison of two configs (``cpsl compare``, ``--resume``,
  the MOSI recipe, bench/balance.py), :func:`cpsl.config.non_identity_keys` aside;
  :func:`kept_run_differences`: does a finished run match what this command would train.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .config import Config, flatten, non_identity_keys, upgrade_flat, upgrade_keys
from .data.mmsa import MMSAData
from .errors import CPSLError

RUN_FILES = ("results.json", "config.json")
SEED_FILES = ("best.pt", "last.pt", "log.jsonl", "curves.png", "balance.png", "best.tmp", "last.tmp")
# settings a resumed run may change: where it runs and how fast (non_identity_keys), and how long
RESUMABLE = non_identity_keys() | {"train.epochs", "train.patience"}


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
# cp.stop: added as "never", default "plateau" since the unimodal-bias evidence (docs/cp_rules.md).
LEGACY_VALUES = {"train.ema": 0.0, "ogm_ge.mode": "grad", "cp.stop": "never"}


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
    old = upgrade_flat(old)         # keys that moved since (cp.groups -> groups.prefixes, ...)
    new = run_identity(cfg, fingerprint)
    diffs = []
    for k in config_differences(old, new, ignore=RESUMABLE, absent=absent_value):
        if k == "data.fingerprint":
            diffs.append("the data (content fingerprint differs)")
        else:
            was = old[k] if k in old else absent_value(k)
            diffs.append(f"{k} ({'' if k in old else 'not recorded, ran as '}{was!r} -> {new.get(k)!r})")
    return diffs


def config_differences(a: dict, b: dict, ignore=frozenset(), absent=None) -> list[str]:
    """The sorted ``section.key`` where the flat configs ``a`` and ``b`` (:func:`cpsl.config.flatten`)
    differ, leaving out :func:`cpsl.config.non_identity_keys` (where and how fast a run went) and
    ``ignore``. A key one side lacks counts as ``absent(key)`` (e.g. :func:`absent_value`), else None."""
    skip = non_identity_keys() | set(ignore)

    def value(d, k):
        return d[k] if k in d else (absent(k) if absent else None)
    return sorted(k for k in set(a) | set(b) if k not in skip and value(a, k) != value(b, k))


def kept_run_differences(kept: dict, want) -> tuple[list[str], list[str]]:
    """Does a finished run match what this command would train? ``kept``: the nested config it
    recorded (``results.json``, ``config.json``); ``want``: this command's (a Config or its dict).
    Returns ``key = kept (this command: want)`` for each identity key recorded with another value,
    and the identity keys it did not record (written before they existed: noted, not compared)."""
    have = flatten(json.loads(json.dumps(upgrade_keys(kept))))
    now = flatten(json.loads(json.dumps(want.to_dict() if isinstance(want, Config) else want)))
    diffs = [f"{k} = {have[k]!r} (this command: {now.get(k)!r})" for k in config_differences(have, now) if k in have]
    return diffs, sorted(k for k in set(now) - set(have) if k not in non_identity_keys())


def epoch_times(run_dir: Path) -> list[float]:
    """The ``time_s`` of every logged epoch of every seed of a ``cpsl train`` folder."""
    out = []
    for p in sorted(Path(run_dir).glob("seed*/log.jsonl")):
        out += [json.loads(x)["time_s"] for x in p.read_text().splitlines()]
    return out


MANIFEST, MANIFEST_FORMAT, LOCK = "cpsl-run.json", "cpsl-run-1", ".cpsl-lock"
_LOCKS: dict[str, int] = {}          # resolved --out -> the open lock file of this process


def _seed_dirs(out: Path) -> list[Path]:
    return sorted(d for d in out.glob("seed*") if d.name[4:].isdigit() and (d.is_dir() or d.is_symlink()))


def holds_run(out: Path) -> list[str]:
    """Names of run artefacts in ``out`` (empty when it holds no run): the manifest, and what a run writes."""
    if not out.is_dir():
        return []
    found = [f for f in (MANIFEST, *RUN_FILES) if (out / f).exists() or (out / f).is_symlink()]
    for d in _seed_dirs(out):
        found += [f"{d.name}/{f}" for f in SEED_FILES if (d / f).exists()] or [f"{d.name}/"]
    return found


def read_manifest(out: Path) -> dict | None:
    """``OUT/cpsl-run.json`` when cpsl wrote it (format, and files/folders as plain relative names); else None."""
    p = out / MANIFEST
    if not p.is_file() or p.is_symlink():
        return None
    try:
        m = json.loads(p.read_text())
    except (ValueError, OSError, UnicodeDecodeError):
        return None
    ok = isinstance(m, dict) and m.get("format") == MANIFEST_FORMAT and all(
        isinstance(m.get(k), list) and all(isinstance(x, str) and _plain_rel(x) for x in m[k])
        for k in ("files", "folders"))
    return m if ok else None


def _plain_rel(x: str) -> bool:
    parts = Path(x).parts
    return bool(parts) and not Path(x).is_absolute() and ".." not in parts and len(parts) <= 3


def _owned(out: Path, seeds) -> dict:
    """What a run of ``seeds`` writes in ``out``: files and the folders cpsl creates for them."""
    folders = [f"seed{int(s)}" for s in seeds]
    files = [*RUN_FILES, LOCK] + [f"{d}/{f}" for d in folders for f in SEED_FILES]
    return {"format": MANIFEST_FORMAT, "files": files, "folders": folders + [f"{d}/tb" for d in folders]}


def _unowned(out: Path, man: dict) -> list[str]:
    """Entries inside the manifest's folders that it does not list (TensorBoard event files count as listed)."""
    files, folders, found = set(man["files"]), set(man["folders"]), []
    for d in man["folders"]:
        p = out / d
        if p.is_symlink():
            found.append(f"{d} (a symbolic link)")
        elif p.is_dir():
            found += [f"{d}/{e.name}" for e in p.iterdir() if f"{d}/{e.name}" not in files | folders
                      and not (d.endswith("/tb") and e.name.startswith("events.out.tfevents.") and e.is_file())]
    return found


def check_out(out: str | Path, resume: bool = False, overwrite: bool = False) -> list[str]:
    """Raise unless ``out`` may be used; returns the run artefacts it holds. Changes nothing.

    A folder holding run-like names but no manifest (a user's own ``config.json``, a ``seed1/``) is
    never replaced or deleted; ``--resume`` alone may continue a run written before manifests."""
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise CPSLError(f"--out {out} exists and is not a folder")
    if resume and overwrite:
        raise CPSLError("--resume and --overwrite exclude each other")
    found = holds_run(out)
    if not found:
        return found
    listed = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
    man = read_manifest(out)
    legacy = resume and any((d / "last.pt").is_file() for d in _seed_dirs(out))
    if man is None and not legacy:
        raise CPSLError(f"--out {out} holds {listed} but no {MANIFEST} written by cpsl, so cpsl did not write "
                        "them; it neither replaces nor deletes them: move them or choose another --out")
    if not resume and not overwrite:
        raise CPSLError(f"--out {out} already holds a run ({listed}); pass --resume to continue it or "
                        "--overwrite to replace it")
    if overwrite:
        stray = _unowned(out, man) + [f for f in man["files"] if (out / f).is_symlink()]
        stray += [f"{d.name}/" for d in _seed_dirs(out) if d.name not in man["folders"]]
        if stray:
            raise CPSLError(f"--out {out}: --overwrite deletes only what its {MANIFEST} lists, and these are not "
                            f"listed: {', '.join(stray[:4])}{' ...' if len(stray) > 4 else ''}; move them first")
    return found


def lock_out(out: Path) -> None:
    """Hold ``OUT/.cpsl-lock`` (``flock``, released when the process ends or :func:`release_out`): a second
    process writing the same run is refused at once, with no window between the check and the lock."""
    key = str(out.resolve())
    if key in _LOCKS:
        return
    try:
        fd = os.open(out / LOCK, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise CPSLError(f"--out {out}: cannot create its lock file {LOCK} ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise CPSLError(f"--out {out} is in use by another cpsl process (lock {out / LOCK}); wait for it to "
                        "finish or choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _LOCKS[key] = fd


def release_out(out: Path) -> None:
    fd = _LOCKS.pop(str(Path(out).resolve()), None)
    if fd is not None:
        os.close(fd)


def _remove_listed(out: Path, man: dict) -> None:
    for f in man["files"]:
        p = out / f
        if f != LOCK and (p.is_file() or p.is_symlink()):
            p.unlink()
    for d in sorted(man["folders"], key=lambda x: -len(Path(x).parts)):
        p = out / d
        if p.is_dir() and not p.is_symlink():
            for e in p.glob("events.out.tfevents.*"):
                e.unlink()
            if not any(p.iterdir()):
                p.rmdir()


def _write_manifest(out: Path, man: dict) -> None:
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(man, indent=1))
    tmp.replace(out / MANIFEST)


def prepare_out(out: str | Path, resume: bool = False, overwrite: bool = False, seeds=()) -> Path:
    """Lock ``out``, :func:`check_out` it, (``overwrite``) remove what the old run's manifest lists, and
    write the manifest of the run about to start (``seeds``: the seed folders it will write)."""
    out = Path(out)
    check_out(out, resume, overwrite)                  # before creating anything
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CPSLError(f"--out {out}: cannot create the folder ({e.strerror})") from None
    lock_out(out)
    try:
        check_out(out, resume, overwrite)              # again, now that no one else can change it
        old = read_manifest(out)
        if old is not None and overwrite:
            _remove_listed(out, old)
            old = None
        man = _owned(out, seeds)
        if old is not None:
            man = {k: sorted(set(old[k]) | set(man[k])) if k != "format" else v for k, v in man.items()}
        links = [f for f in man["files"] + man["folders"] if (out / f).is_symlink()]
        if links:
            raise CPSLError(f"--out {out}: {links[0]} is a symbolic link; cpsl writes a run only into files "
                            "and folders it creates")
        _write_manifest(out, man)
    except BaseException:
        release_out(out)
        raise
    return out
