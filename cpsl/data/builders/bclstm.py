"""bc-LSTM's utterance-level feature CSVs (video_id, clip_id, label, t*, a*, v*): text/audio/vision
(N, 1, d); validation carved from the train file by video id."""
from __future__ import annotations

import warnings

import numpy as np

from ...errors import CPSLError
from ...fileutil import sha256_file
from ..mmsa import MMSAData, Split, require_splits
from .table import (feature_cols, make_split, mmsa_id, read_csv, read_floats, read_keys, read_labels, require_columns,
                    video_overlap)

BCLSTM_GROUPS = (("text", "t"), ("audio", "a"), ("vision", "v"))


def _read_bclstm(path, what: str, dims: dict | None = None) -> dict:
    t = read_csv(path, what)
    require_columns(t, ("video_id", "clip_id", "label"), what)
    cols = {m: feature_cols(t, p, what) for m, p in BCLSTM_GROUPS}
    if dims is not None:
        for m, c in cols.items():
            if len(c) != dims[m]:
                raise CPSLError(f"{what} file {path}: {m} has {len(c)} feature columns, the train file has {dims[m]}")
    if not t.rows:
        raise CPSLError(f"{what} file {path} has no data rows")
    keys = read_keys(t, what)
    labels = read_labels(t, keys, what)
    feats, bad = {}, np.zeros(len(t.rows), dtype=np.int64)
    for m, c in cols.items():
        arr, b = read_floats(t, c)
        feats[m] = arr[:, None, :]                                    # (N, 1, d)
        bad += b
    text = t.col("text") if "text" in t.header else [""] * len(t.rows)   # no transcripts in bc-LSTM's CSV
    return {"keys": keys, "ids": [mmsa_id(k) for k in keys], "labels": labels, "feats": feats,
            "bad": bad, "text": text, "has_text": "text" in t.header, "dims": {m: len(c) for m, c in cols.items()}}


def _take(d: dict, idx: np.ndarray, name: str) -> Split:
    return make_split(name, {m: np.ascontiguousarray(a[idx]) for m, a in d["feats"].items()},
                  d["labels"][idx], [d["ids"][i] for i in idx], [d["text"][i] for i in idx],
                  cleaned=int(d["bad"][idx].sum()))


def _empty(d: dict, name: str) -> Split:
    return _take(d, np.zeros(0, dtype=np.int64), name)


def valid_videos(videos, valid_frac: float, seed: int) -> list[str]:
    """The video ids held out for validation: ``round(valid_frac * #videos)`` of them (at least 1
    when ``valid_frac > 0``, never all), drawn with ``seed`` from the sorted unique ids."""
    vids = sorted(set(videos))
    if valid_frac <= 0:
        return []
    if len(vids) < 2:
        raise CPSLError(f"a validation split by video needs at least 2 videos, the train file has {len(vids)}")
    k = min(max(1, int(round(valid_frac * len(vids)))), len(vids) - 1)
    order = np.random.default_rng(int(seed)).permutation(len(vids))
    return sorted(vids[i] for i in order[:k])


def build_bclstm(train_csv, test_csv=None, valid_frac: float = 0.15, seed: int = 0) -> tuple[MMSAData, dict]:
    """MMSA data (text, audio, vision; utterance level) from bc-LSTM's feature CSV(s).

    Validation = a seeded ``valid_frac`` of the train file's *videos* (every segment of a video
    lands in one split). Test = ``test_csv`` when given, else an empty split.
    """
    valid_frac = float(valid_frac)
    if not (0.0 < valid_frac < 1.0):
        raise CPSLError(f"--valid-frac must be in (0, 1) (training needs a valid split), got {valid_frac}")
    tr = _read_bclstm(train_csv, "train")
    te = _read_bclstm(test_csv, "test", dims=tr["dims"]) if test_csv is not None else None

    videos = [k[0] for k in tr["keys"]]
    held = set(valid_videos(videos, valid_frac, seed))
    is_valid = np.asarray([v in held for v in videos], dtype=bool)
    splits = {
        "train": _take(tr, np.flatnonzero(~is_valid), "train"),
        "valid": _take(tr, np.flatnonzero(is_valid), "valid"),
        "test": _take(te, np.arange(len(te["labels"])), "test") if te is not None else _empty(tr, "test"),
    }
    require_splits({n: len(sp) for n, sp in splits.items()}, f"{train_csv} with --valid-frac {valid_frac}")
    overlap = video_overlap(splits)
    if "train&test" in overlap or "valid&test" in overlap:
        n = sum(overlap[k]["count"] for k in overlap if k.endswith("&test"))
        warnings.warn(f"{n} test video(s) also appear in the train file", stacklevel=2)
    inputs = {"train": str(train_csv), "train_sha256": sha256_file(train_csv)}
    if test_csv is not None:
        inputs |= {"test": str(test_csv), "test_sha256": sha256_file(test_csv)}
    report = {
        "builder": "bclstm",
        "inputs": inputs,
        "valid_frac": valid_frac, "seed": int(seed),
        "valid_videos": sorted(held),
        "valid_segment_frac": float(is_valid.mean()),
        "splits": {n: len(s) for n, s in splits.items()},
        "videos": {n: len({i.split("$_$")[0] for i in s.ids}) for n, s in splits.items()},
        "dims": dict(tr["dims"]),
        "shapes": {n: {m: list(s.features[m].shape) for m in s.features} for n, s in splits.items()},
        "nonfinite_replaced": int(sum(s.cleaned for s in splits.values())),
        "raw_text": "from the 'text' column" if tr["has_text"] else "empty strings (no transcripts in the CSV)",
        "videos_in_several_splits": overlap,
        "note": "bc-LSTM text/vision features were trained with labels on bc-LSTM's own split: "
                "use them only with that split, never with the standard MOSI folds",
    }
    return MMSAData(splits, ("text", "audio", "vision"), path="", meta=report), report
