"""Read and write the MMSA pickle format (thuiar/MMSA) exactly.

A file is a pickled dict ``{"train": S, "valid": S, "test": S}``; each split ``S`` is a dict:

=====================  ==============================================================
``text``               float32 ``(N, L_t, d_t)`` (BERT features in MMSA), back-padded
``audio``              float32 ``(N, L_a, d_a)``                                  (optional)
``vision``             float32 ``(N, L_v, d_v)``                                  (optional)
``audio_lengths``      ``(N,)`` valid steps (unaligned files)                     (optional)
``vision_lengths``     ``(N,)``                                                   (optional)
``text_bert``          int ``(N, 3, L)``: token ids, attention mask, segment ids   (optional)
``regression_labels``  float ``(N,)`` in [-3, 3]
``id``                 ``(N,)`` segment ids (``video$_$clip`` in MMSA)
``raw_text``           ``(N,)`` transcripts
=====================  ==============================================================

Masks come from the lengths when present (``text_lengths`` for text, a cpsl extension, or
the ``text_bert`` attention mask); aligned files without lengths use every step, as MMSA
does. A modality key may be absent (two- or single-modality data, e.g. text-only MOSEI). Utterance-level features given as
``(N, d)`` are read as ``(N, 1, d)``. ``-inf``/``+inf``/NaN are replaced by 0 and counted; finite values with
``|x| > EXTREME`` are counted too (``data info`` and ``train`` warn about them). Lengths must be
integers in ``[1, L]``. The file is read by :mod:`.safe_pickle`, which never executes code.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import MODALITIES
from ..errors import CPSLError
from ..fileutil import check_output_file
from .safe_pickle import safe_load

SPLITS = ("train", "valid", "test")
REQUIRED_KEYS = ("regression_labels", "id", "raw_text")
EXTREME = 1e6          # |feature| above this is reported: it can swamp the batch statistics


@dataclass
class Split:
    name: str
    features: dict[str, np.ndarray]          # modality -> (N, L, d) float32
    lengths: dict[str, np.ndarray]           # modality -> (N,) int64, 1 <= len <= L
    labels: np.ndarray                       # (N,) float32
    ids: np.ndarray                          # (N,) str
    raw_text: np.ndarray                     # (N,) str
    text_bert: np.ndarray | None = None      # (N, 3, L) int64
    cleaned: int = 0                         # non-finite values replaced by 0
    extreme: int = 0                         # finite values with |x| > EXTREME

    def __len__(self) -> int:
        return len(self.labels)

    def masks(self, mod: str) -> np.ndarray:
        L = self.features[mod].shape[1]
        return np.arange(L)[None, :] < self.lengths[mod][:, None]


@dataclass
class MMSAData:
    splits: dict[str, Split]
    modalities: tuple[str, ...]
    path: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def dims(self) -> dict[str, int]:
        s = next(iter(self.splits.values()))
        return {m: int(s.features[m].shape[2]) for m in self.modalities}

    @property
    def cleaned(self) -> int:
        return sum(s.cleaned for s in self.splits.values())

    @property
    def extreme(self) -> int:
        return sum(s.extreme for s in self.splits.values())

    def warnings(self) -> list[str]:
        """One line per data-quality problem worth a warning (non-finite or extreme features)."""
        out = []
        if self.cleaned:
            out.append(f"{self.cleaned} non-finite values replaced by 0")
        if self.extreme:
            where = ", ".join(f"{s.name} {s.extreme}" for s in self.splits.values() if s.extreme)
            out.append(f"{self.extreme} feature values with |x| > {EXTREME:g} ({where}); check the feature "
                       "extraction (such values dominate the batch statistics)")
        return out

    def __getitem__(self, name: str) -> Split:
        if name not in self.splits:
            raise CPSLError(f"split {name!r} not in {self.path or 'the data'} (has: {', '.join(self.splits)})")
        return self.splits[name]


def _not_numeric(a) -> bool:
    """An array of objects, strings or records: refused rather than converted (``None`` would become NaN or 'None')."""
    return isinstance(a, np.ndarray) and a.dtype.kind not in "biuf"


def _as_3d(a, key: str, split: str, path: str) -> np.ndarray:
    if _not_numeric(a):
        raise CPSLError(f"{path}: {split}/{key} is not a numeric array (dtype {a.dtype})")
    try:
        arr = np.asarray(a, dtype=np.float32)
    except (TypeError, ValueError):
        raise CPSLError(f"{path}: {split}/{key} is not a numeric array") from None
    if arr.ndim == 2:
        arr = arr[:, None, :]
    if arr.ndim != 3:
        raise CPSLError(f"{path}: {split}/{key} must have shape (N, L, d) or (N, d), got {arr.shape}")
    if arr.shape[1] < 1 or arr.shape[2] < 1:
        raise CPSLError(f"{path}: {split}/{key} has an empty sequence or feature axis (shape {arr.shape})")
    return arr


def _numeric(a, dtype, what: str, path: str) -> np.ndarray:
    if _not_numeric(a):
        raise CPSLError(f"{path}: {what} is not a numeric array (dtype {a.dtype})")
    try:
        return np.asarray(a).astype(dtype)
    except (TypeError, ValueError):
        raise CPSLError(f"{path}: {what} is not a numeric array") from None


def _whole(a, what: str, path: str) -> np.ndarray:
    """Whole numbers (lengths, token ids) as int64, refusing NaN, fractions, overflow and booleans instead of coercing."""
    if np.asarray(a).dtype.kind == "b" or (isinstance(a, (list, tuple)) and any(isinstance(x, bool) for x in a)):
        raise CPSLError(f"{path}: {what} must be whole numbers, got booleans")
    f = _numeric(a, np.float64, what, path).reshape(-1)
    bad = ~np.isfinite(f) | (f != np.round(f)) | (np.abs(f) > 2.0 ** 62)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CPSLError(f"{path}: {what} must be whole numbers; {int(bad.sum())} are not (first: item {i}, {f[i]})")
    return f.astype(np.int64)


def _strings(a, what: str, path: str, n: int) -> np.ndarray:
    """``n`` strings (ids, transcripts) as a 1-D str array: str/bytes/integers, nothing else (no None, no nesting)."""
    arr = np.asarray(a) if isinstance(a, (np.ndarray, list, tuple)) else None
    if arr is None or arr.ndim != 1 or (arr.dtype.kind not in "USOiu" and arr.size):
        shape = getattr(arr, "shape", None)
        raise CPSLError(f"{path}: {what} must be a 1-D array of N strings, got a {type(a).__name__}"
                        + (f" of shape {shape} and dtype {arr.dtype}" if shape is not None else ""))
    if arr.shape[0] != n:
        raise CPSLError(f"{path}: {what} has {arr.shape[0]} entries but regression_labels has {n}")
    if arr.dtype.kind == "O":
        bad = [i for i, x in enumerate(arr.tolist()) if not isinstance(x, (str, bytes, int)) or isinstance(x, bool)]
        if bad:
            raise CPSLError(f"{path}: {what} must hold strings; item {bad[0]} is {type(arr[bad[0]]).__name__} "
                            f"({len(bad)} such items)")
    if arr.dtype.kind == "S" or arr.dtype.kind == "O":
        return np.array([x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in arr.tolist()],
                        dtype=str).reshape(-1)
    return arr.astype(str)


def _lengths(raw: dict, mod: str, arr: np.ndarray, split: str, path: str) -> np.ndarray:
    n, L = arr.shape[:2]
    lens = None
    if f"{mod}_lengths" in raw and raw[f"{mod}_lengths"] is not None:
        lens = _whole(raw[f"{mod}_lengths"], f"{split}/{mod}_lengths", path)
    elif mod == "text" and raw.get("text_bert") is not None:
        tb = np.asarray(raw["text_bert"])
        if tb.ndim == 3 and tb.shape[0] == n and tb.shape[2] == L:
            return np.clip(tb[:, 1, :].astype(bool).sum(1).astype(np.int64), 1, L)   # [CLS] always counts
    if lens is None:
        return np.full(n, L, dtype=np.int64)
    if lens.shape[0] != n:
        raise CPSLError(f"{path}: {split}/{mod}_lengths has {lens.shape[0]} entries but {mod} has {n} samples")
    bad = (lens < 1) | (lens > L)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise CPSLError(f"{path}: {split}/{mod}_lengths must be integers in [1, {L}]; "
                        f"{int(bad.sum())} are not (first: item {i}, {lens[i]})")
    return lens


def _read_split(raw, name: str, path: str, bounded: bool = True) -> Split:
    if not isinstance(raw, dict):
        raise CPSLError(f"{path}: split {name!r} is not a dict")
    for k in REQUIRED_KEYS:
        if k not in raw:
            raise CPSLError(f"{path}: split {name!r} has no key {k!r}")
    labels = _numeric(raw["regression_labels"], np.float32, f"{name}/regression_labels", path).reshape(-1)
    n = labels.shape[0]
    if not np.all(np.isfinite(labels)):
        raise CPSLError(f"{path}: {name}/regression_labels holds non-finite values")
    if bounded and n and (labels.min() < -3.0 - 1e-6 or labels.max() > 3.0 + 1e-6):
        raise CPSLError(f"{path}: {name}/regression_labels outside [-3, 3] "
                        f"(min {labels.min():.3f}, max {labels.max():.3f})")
    feats, lens, cleaned, extreme = {}, {}, 0, 0
    for mod in MODALITIES:
        if mod not in raw or raw[mod] is None:
            continue
        arr = _as_3d(raw[mod], mod, name, path)
        if arr.shape[0] != n:
            raise CPSLError(f"{path}: {name}/{mod} has {arr.shape[0]} samples but regression_labels has {n}")
        bad = ~np.isfinite(arr)
        nbad = int(bad.sum())
        if nbad:
            arr = np.where(bad, np.float32(0), arr)
            cleaned += nbad
        extreme += int(np.count_nonzero(np.abs(arr) > EXTREME))
        feats[mod] = np.ascontiguousarray(arr)
        lens[mod] = _lengths(raw, mod, arr, name, path)
    ids = _strings(raw["id"], f"{name}/id", path, n)
    raw_text = _strings(raw["raw_text"], f"{name}/raw_text", path, n)
    tb = raw.get("text_bert")
    if tb is not None:
        tb = _whole(tb, f"{name}/text_bert", path).reshape(np.shape(tb))
        if tb.ndim != 3 or tb.shape[0] != n or tb.shape[1] != 3:
            raise CPSLError(f"{path}: {name}/text_bert must have shape (N, 3, L), got {tb.shape}")
    return Split(name, feats, lens, labels, ids, raw_text, tb, cleaned, extreme)


def load_mmsa(path: str | Path, require_splits=SPLITS, trust_pickle: bool = False) -> MMSAData:
    """Load an MMSA pickle; raises :class:`CPSLError` with one clear line on bad input.

    The file is read without executing code (:func:`.safe_pickle.safe_load`); ``trust_pickle``
    uses plain ``pickle.load`` instead, which runs any code the file carries (unsafe)."""
    path = str(path)
    p = Path(path)
    if not p.exists():
        raise CPSLError(f"data file not found: {path}")
    if p.is_dir():
        raise CPSLError(f"data path is a folder, expected an MMSA .pkl file: {path}")
    if not p.is_file():                         # a FIFO, socket or device: reading it could block forever
        raise CPSLError(f"data path is not a regular file (a pipe or device?): {path}")
    try:
        with open(p, "rb") as f:
            raw = safe_load(f, path, trust=trust_pickle)
    except CPSLError:
        raise
    except Exception as e:  # noqa: BLE001 - anything unpicklable is the user's file
        raise CPSLError(f"{path} is not a readable pickle ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise CPSLError(f"{path}: expected a dict of splits, got {type(raw).__name__}")
    missing = [s for s in require_splits if s not in raw]
    if missing:
        raise CPSLError(f"{path}: missing split(s) {', '.join(missing)} (has: {', '.join(map(str, raw))})")
    meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}
    bounded = meta.get("labels") != "unbounded"   # a regression benchmark's file says so (cpsl data synth)
    splits = {s: _read_split(raw[s], s, path, bounded) for s in SPLITS if s in raw}
    mods = [m for m in MODALITIES if all(m in s.features for s in splits.values())]
    if not mods:
        raise CPSLError(f"{path}: needs at least one modality of {', '.join(MODALITIES)} in every split, found none")
    for m in mods:
        dims = {s.name: s.features[m].shape[2] for s in splits.values()}
        if len(set(dims.values())) != 1:
            raise CPSLError(f"{path}: {m} feature size differs between splits: {dims}")
    return MMSAData(splits, tuple(mods), path, meta={"labels": "unbounded"} if not bounded else {})


def require_splits(counts: dict, where: str, needed=("train", "valid"), minimum: int = 1) -> None:
    """Refuse data whose ``needed`` splits have fewer than ``minimum`` items (``counts``: name -> n)."""
    short = [f"{s} ({counts.get(s, 0)})" for s in needed if counts.get(s, 0) < minimum]
    if short:
        raise CPSLError(f"{where}: split(s) {', '.join(short)} need at least {minimum} item(s); "
                        "training needs a train split and a valid split to select the checkpoint on")


def split_to_raw(s: Split) -> dict:
    raw = {m: s.features[m] for m in s.features}
    for m in s.features:
        if m == "text":
            raw["text_lengths"] = s.lengths[m]
        else:
            raw[f"{m}_lengths"] = s.lengths[m]
    raw["regression_labels"] = s.labels.astype(np.float32)
    raw["id"] = s.ids
    raw["raw_text"] = s.raw_text
    if s.text_bert is not None:
        raw["text_bert"] = s.text_bert
    return raw


def save_mmsa(data: MMSAData | dict, path: str | Path) -> None:
    """Write an MMSA pickle (a plain dict of dicts of numpy arrays, readable by MMSA)."""
    if isinstance(data, MMSAData):
        raw = {name: split_to_raw(s) for name, s in data.splits.items()}
        if data.meta.get("labels") == "unbounded":      # MMSA reads only the splits' keys
            raw["meta"] = {"labels": "unbounded"}
    else:
        raw = data
    check_output_file(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(raw, f, protocol=4)
