"""The reference lines the learnt models are measured against: a ridge regression on the masked
mean-pooled text features (for frozen encoder token states: the sentence embedding)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def pooled_text(split, text_key: str = "text") -> np.ndarray:
    """``(N, D)`` masked mean over time of a split's ``text_key`` features."""
    x, m = split.features[text_key], split.masks(text_key)
    return (x * m[..., None]).sum(1) / m.sum(1, keepdims=True)


def ridge(pkl: str | Path | None = None, text_key: str = "text", split: str = "valid", data=None) -> dict:
    """Ridge on :func:`pooled_text`, fitted on train (alpha by RidgeCV's leave-one-out on train, over
    10^-3 … 10^3), scored on ``split``: the MMSA metrics and the chosen ``alpha``. ``data``: the
    loaded MMSAData (else ``pkl`` is loaded)."""
    from sklearn.linear_model import RidgeCV

    from .data.mmsa import load_mmsa
    from .metrics import mmsa_metrics
    d = data if data is not None else load_mmsa(pkl)
    r = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(pooled_text(d["train"], text_key), d["train"].labels)
    return mmsa_metrics(r.predict(pooled_text(d[split], text_key)), d[split].labels) | {"alpha": float(r.alpha_)}


def ridge_splits(pkl: str | Path, splits=("valid", "test")) -> dict:
    """:func:`ridge` on each of ``splits`` that has rows (the MOSI recipe's ridge line)."""
    from .data.mmsa import load_mmsa
    d = load_mmsa(pkl)
    return {s: ridge(pkl, split=s, data=d) for s in splits if s in d.splits and len(d[s])}
