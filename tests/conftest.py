"""Shared fixtures: tiny hand-made MMSA pickles and the location of the real data pack."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

SPLIT_SIZES = {"train": 6, "valid": 4, "test": 5}
DIMS = {"text": 8, "audio": 5, "vision": 6}
MAX_LEN = {"text": 7, "audio": 9, "vision": 11}


def make_raw(sizes=SPLIT_SIZES, modalities=("text", "audio", "vision"), aligned=False, seed=0) -> dict:
    """An MMSA-format dict ``{split: {text, audio, vision, *_lengths, regression_labels, id, raw_text}}``.

    Unaligned (default): per-modality lengths in ``audio_lengths``/``vision_lengths``
    (``text`` uses every step, as in MMSA), zeros beyond each length. Aligned: one
    length for all modalities and no ``*_lengths`` keys.
    """
    rng = np.random.default_rng(seed)
    raw = {}
    for name, n in sizes.items():
        s = {}
        L_al = max(MAX_LEN.values())
        for m in modalities:
            L = L_al if aligned else MAX_LEN[m]
            x = rng.standard_normal((n, L, DIMS[m])).astype(np.float32)
            if m != "text" and not aligned:
                lens = rng.integers(1, L + 1, n).astype(np.int64)
                lens[0] = L  # the longest item fills the array
                x *= (np.arange(L)[None, :] < lens[:, None])[:, :, None]
                s[f"{m}_lengths"] = lens
            s[m] = x
        s["regression_labels"] = np.round(rng.uniform(-3, 3, n) * 5) / 5
        s["regression_labels"] = s["regression_labels"].astype(np.float32)
        s["id"] = np.array([f"vid{i // 2}$_${i}" for i in range(n)])
        s["raw_text"] = np.array([f"segment {name} {i}" for i in range(n)])
        raw[name] = s
    return raw


@pytest.fixture
def tiny_raw():
    """The :func:`make_raw` factory (keyword arguments as there)."""
    return make_raw


@pytest.fixture
def tiny_mmsa(tmp_path):
    """``write(raw=None, name="tiny.pkl", **make_raw_kwargs) -> Path``: pickle an MMSA dict into tmp_path."""

    def write(raw=None, name: str = "tiny.pkl", **kw) -> Path:
        if raw is None:
            raw = make_raw(**kw)
        p = tmp_path / name
        with open(p, "wb") as f:
            pickle.dump(raw, f, protocol=4)
        return p

    return write


@pytest.fixture
def shared_data_dir():
    """The real data pack (``$CPSL_DATA_DIR`` or ``../shared/data`` beside the repo), or None."""
    env = os.environ.get("CPSL_DATA_DIR")
    p = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return p if p.is_dir() else None


@pytest.fixture(scope="session")
def tiny_pkl(tmp_path_factory):
    """A small synthetic MMSA pickle (64/24/24 segments, three modalities) for training tests."""
    from cpsl.data.mmsa import save_mmsa
    from cpsl.data.synthetic import SynthSpec, generate
    p = tmp_path_factory.mktemp("d") / "tiny.pkl"
    save_mmsa(generate(SynthSpec(n_train=64, n_valid=24, n_test=24, d_text=12, d_audio=5, d_vision=7,
                                 text_len=(3, 9), audio_len=(4, 12), vision_len=(4, 12))), p)
    return p
