"""Video-grouped k-fold cross-validation over the train + valid splits (never the test split).

``video_folds(data, k, seed)`` pools ``train`` and ``valid``, deals the *videos* (the part of an
MMSA id before ``$_$``) into ``k`` groups of near-equal segment counts (videos in a seeded random
order, each to the group with the fewest segments so far) and returns ``k`` datasets: fold ``i``
validates on group ``i`` and trains on the others; its ``test`` split is empty. Every segment of
a video lands in one fold, so no speaker is seen in training and validation of the same fold.
"""
from __future__ import annotations

import numpy as np

from ..errors import CPSLError
from .mmsa import MMSAData, Split

POOLED = ("train", "valid")


def _take(s: Split, idx: np.ndarray, name: str) -> Split:
    return Split(name, {m: a[idx] for m, a in s.features.items()}, {m: a[idx] for m, a in s.lengths.items()},
                 s.labels[idx], s.ids[idx], s.raw_text[idx],
                 None if s.text_bert is None else s.text_bert[idx])


def _concat(a: Split, b: Split) -> Split:
    if (a.text_bert is None) != (b.text_bert is None):
        raise CPSLError("train and valid disagree on text_bert (one split has it, the other not)")
    L = {m: max(a.features[m].shape[1], b.features[m].shape[1]) for m in a.features}

    def pad(x, n):
        return np.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    tb = None
    if a.text_bert is not None:
        n = max(a.text_bert.shape[2], b.text_bert.shape[2])
        tb = np.concatenate([np.pad(t, [(0, 0), (0, 0), (0, n - t.shape[2])]) for t in (a.text_bert, b.text_bert)])
    return Split("pool", {m: np.concatenate([pad(a.features[m], L[m]), pad(b.features[m], L[m])]) for m in a.features},
                 {m: np.concatenate([a.lengths[m], b.lengths[m]]) for m in a.lengths},
                 np.concatenate([a.labels, b.labels]), np.concatenate([a.ids, b.ids]),
                 np.concatenate([a.raw_text, b.raw_text]), tb)


def video_groups(ids, k: int, seed: int = 0) -> np.ndarray:
    """``(N,)`` fold index of each segment id (``video$_$clip``), grouped by video."""
    vids = np.asarray([str(i).split("$_$")[0] for i in ids])
    uniq, counts = np.unique(vids, return_counts=True)
    if not 2 <= k <= len(uniq):
        raise CPSLError(f"k-fold needs 2 <= k <= the number of videos ({len(uniq)}), got k={k}")
    order = np.random.default_rng(int(seed)).permutation(len(uniq))
    load, group = np.zeros(k, dtype=np.int64), {}
    for j in order:
        g = int(np.argmin(load))                          # the lightest group so far (first on ties)
        group[uniq[j]] = g
        load[g] += counts[j]
    return np.asarray([group[v] for v in vids], dtype=np.int64)


def video_folds(data: MMSAData, k: int = 5, seed: int = 0) -> list[MMSAData]:
    """``k`` datasets over ``train`` + ``valid``: fold ``i`` validates on video group ``i``."""
    pool = _concat(data["train"], data["valid"])
    g = video_groups(pool.ids, k, seed)
    folds = []
    for i in range(k):
        tr, va = np.flatnonzero(g != i), np.flatnonzero(g == i)
        splits = {"train": _take(pool, tr, "train"), "valid": _take(pool, va, "valid"),
                  "test": _take(pool, np.zeros(0, dtype=np.int64), "test")}
        folds.append(MMSAData(splits, data.modalities, path=f"{data.path}#fold{i}of{k}",
                              meta={"fold": i, "k": k, "seed": int(seed), "source": data.path}))
    return folds
