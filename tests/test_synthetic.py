"""The embedded synthetic generator: format, determinism, and the story it is meant to tell."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score

from cpsl.data.synthetic import SynthSpec, generate

MODS = ("text", "audio", "vision")
SMALL = dict(n_train=120, n_valid=40, n_test=30)


@pytest.fixture(scope="module")
def default_data():
    return generate()


def test_default_sizes_and_modalities(default_data):
    d = default_data
    assert {k: len(s) for k, s in d.splits.items()} == {"train": 1284, "valid": 229, "test": 686}
    assert d.modalities == MODS
    spec = SynthSpec()
    assert d.dims == {"text": spec.d_text, "audio": spec.d_audio, "vision": spec.d_vision}
    for s in d.splits.values():
        for m in MODS:
            assert s.features[m].dtype == np.float32 and s.features[m].shape[0] == len(s)
            assert np.isfinite(s.features[m]).all()
        assert len(set(s.ids)) == len(s) and all("$_$" in i for i in s.ids)
    assert not set(d["train"].ids) & set(d["test"].ids)


def _assert_same(a, b):
    for name in ("train", "valid", "test"):
        for m in MODS:
            np.testing.assert_array_equal(a[name].features[m], b[name].features[m])
            np.testing.assert_array_equal(a[name].lengths[m], b[name].lengths[m])
        np.testing.assert_array_equal(a[name].labels, b[name].labels)
        np.testing.assert_array_equal(a[name].ids, b[name].ids)


def test_determinism():
    a, b = generate(SynthSpec(seed=7, **SMALL)), generate(SynthSpec(seed=7, **SMALL))
    _assert_same(a, b)
    c = generate(SynthSpec(seed=8, **SMALL))
    for name in ("train", "valid", "test"):
        assert not np.array_equal(a[name].labels, c[name].labels)
        for m in MODS:
            fa, fc = a[name].features[m], c[name].features[m]
            assert fa.shape != fc.shape or not np.array_equal(fa, fc)
    # keyword overrides are the same as setting the spec
    _assert_same(generate(SynthSpec(seed=7), **SMALL), a)
    with pytest.raises(ValueError, match="unknown synthetic knob 'bogus'"):
        generate(SynthSpec(**SMALL), bogus=1)


def test_padding_and_lengths(default_data):
    spec = SynthSpec()
    for s in default_data.splits.values():
        for m in MODS:
            lo, hi = getattr(spec, f"{m}_len")
            x, lens = s.features[m], s.lengths[m]
            assert lens.dtype == np.int64
            assert lens.min() >= lo and lens.max() <= hi
            assert x.shape[1] == lens.max()                        # padded to the split's longest item
            assert lens.min() < lens.max()                         # lengths really vary
            mask = s.masks(m)
            assert (x[~mask] == 0).all()                           # zero beyond every length
            assert (np.abs(x[np.arange(len(s)), lens - 1]).sum(-1) > 0).all()   # last valid step is data
    s = generate(SynthSpec(seed=1, text_len=(5, 6), audio_len=(2, 2), **SMALL))["train"]
    assert set(s.lengths["text"].tolist()) == {5, 6} and (s.lengths["audio"] == 2).all()
    assert s.features["audio"].shape[1] == 2


def test_labels(default_data):
    for s in default_data.splits.values():
        y = s.labels.astype(np.float64)
        assert y.dtype == np.float64 and s.labels.dtype == np.float32
        assert y.min() >= -3 and y.max() <= 3
        assert np.abs(y * 5 - np.round(y * 5)).max() < 1e-5       # multiples of 0.2
        assert (s.labels == 0).sum() > 0                           # exact zeros occur
        assert 0.3 < (y > 0).mean() < 0.7
        assert 1.0 < y.std() < 1.6                                 # scaled to std ~1.3 before rounding/clipping
    assert len(np.unique(default_data["train"].labels)) > 20


# ------------------------------------------------------------------------------ the story

def _pooled(s, mods):
    """Masked mean over time per modality, concatenated: (N, sum d_m)."""
    out = []
    for m in mods:
        mk = s.masks(m)[:, :, None]
        out.append((s.features[m] * mk).sum(1) / mk.sum(1))
    return np.hstack(out)


def _valid_r2(d, mods, alpha=10.0):
    tr, va = d["train"], d["valid"]
    r = Ridge(alpha=alpha).fit(_pooled(tr, mods), tr.labels)
    return r2_score(va.labels, r.predict(_pooled(va, mods)))


@pytest.mark.parametrize("seed", [0, 1])
def test_text_dominant_and_av_complementary(seed):
    d = generate(SynthSpec(seed=seed, n_train=600, n_valid=400, n_test=2))
    r2 = {m: _valid_r2(d, (m,)) for m in MODS}
    r2["all"] = _valid_r2(d, MODS)
    r2["av"] = _valid_r2(d, ("audio", "vision"))
    # text alone explains the most label variance...
    assert r2["text"] > r2["audio"] + 0.1 and r2["text"] > r2["vision"] + 0.1, r2
    # ...but audio and vision each carry real signal...
    assert r2["audio"] > 0.05 and r2["vision"] > 0.05, r2
    # ...that text lacks: adding them to text improves held-out R^2 substantially
    assert r2["all"] > r2["text"] + 0.2, r2
    assert r2["all"] > r2["av"] + 0.2, r2


def test_imbalance_knob_moves_the_balance():
    lo = generate(SynthSpec(seed=3, imbalance=0.5, n_train=600, n_valid=400, n_test=2))
    hi = generate(SynthSpec(seed=3, imbalance=3.0, n_train=600, n_valid=400, n_test=2))
    assert _valid_r2(hi, ("text",)) > _valid_r2(lo, ("text",)) + 0.2
    assert _valid_r2(hi, ("audio",)) < _valid_r2(lo, ("audio",))


def test_text_memo_code_carries_no_label_signal():
    # The identity code lets a big model memorise training labels, but by itself it is
    # uninformative on held-out data: with the cue removed (imbalance 0) text predicts nothing.
    d = generate(SynthSpec(seed=4, imbalance=0.0, n_train=600, n_valid=400, n_test=2))
    assert _valid_r2(d, ("text",)) < 0.05


def _pooled_audio(s, products: bool):
    """Masked mean over frames of the audio features, or of their pairwise products per frame."""
    a, m = s.features["audio"], s.masks("audio")[..., None]
    if products:
        a = (a[..., :, None] * a[..., None, :]).reshape(*a.shape[:2], -1)
    return (a * m).sum(1) / m.sum(1)


def test_audio_xor_is_a_nonlinear_code():
    """The slow-audio family (audio_xor): with the knob on, no linear read-out of pooled audio
    predicts the label (what a freshly initialised encoder starts from), while frame-wise products
    (the multiplicative code a trained encoder must learn) still do. A data-statistics test: a
    training-based one (few vs many steps) is too slow for the test budget on this machine."""
    kw = dict(seed=3, n_train=600, n_valid=40, n_test=300, imbalance=0.0)

    def r2(x, products):
        d = generate(SynthSpec(audio_xor=x, **kw))
        fit = Ridge(alpha=1.0).fit(_pooled_audio(d["train"], products), d["train"].labels)
        return r2_score(d["test"].labels, fit.predict(_pooled_audio(d["test"], products)))
    off, on, half = r2(0.0, False), r2(1.0, False), r2(0.5, False)
    assert off > 0.3                                 # off: audio is linearly readable
    assert on < 0.05                                 # on: linear read-out sees nothing
    assert r2(1.0, True) > 0.2                       # ... yet the label information is all there
    assert on < half < off                           # in between: a partial linear part


def test_audio_xor_leaves_the_rest_alone():
    base, slow = generate(SynthSpec(seed=5, **SMALL)), generate(SynthSpec(seed=5, audio_xor=1.0, **SMALL))
    for name in ("train", "valid", "test"):
        for m in ("text", "vision"):
            np.testing.assert_array_equal(base[name].features[m], slow[name].features[m])
        np.testing.assert_array_equal(base[name].labels, slow[name].labels)
        np.testing.assert_array_equal(base[name].lengths["audio"], slow[name].lengths["audio"])
        assert not np.array_equal(base[name].features["audio"], slow[name].features["audio"])
    with pytest.raises(Exception, match="audio_xor must be in"):
        generate(SynthSpec(audio_xor=1.5, **SMALL))
