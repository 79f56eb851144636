"""MMSA pickle IO (cpsl.data.mmsa) on hand-made files, and batching (cpsl.data.batch)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from cpsl.data import load_data, load_mmsa, save_mmsa
from cpsl.data.batch import iterate, make_batch, n_batches
from cpsl.errors import CPSLError

SPLITS = ("train", "valid", "test")


# ----------------------------------------------------------------------------- reading

def test_unaligned_lengths_and_features(tiny_raw, tiny_mmsa):
    raw = tiny_raw()
    d = load_mmsa(tiny_mmsa(raw))
    assert d.modalities == ("text", "audio", "vision")
    assert d.dims == {"text": 8, "audio": 5, "vision": 6}
    assert d.cleaned == 0
    for name in SPLITS:
        s, r = d[name], raw[name]
        assert len(s) == len(r["regression_labels"])
        for m in ("audio", "vision"):
            np.testing.assert_array_equal(s.lengths[m], r[f"{m}_lengths"])
            assert s.features[m].dtype == np.float32
            np.testing.assert_array_equal(s.features[m], r[m])
            # the mask is exactly "step < length"
            mk = s.masks(m)
            assert mk.shape == r[m].shape[:2]
            np.testing.assert_array_equal(mk.sum(1), r[f"{m}_lengths"])
            assert mk[np.arange(len(s)), r[f"{m}_lengths"] - 1].all()      # last valid step
        # text has no lengths in MMSA: every step is valid
        np.testing.assert_array_equal(s.lengths["text"], np.full(len(s), r["text"].shape[1]))
        np.testing.assert_array_equal(s.labels, r["regression_labels"])
        assert list(s.ids) == list(r["id"]) and list(s.raw_text) == list(r["raw_text"])


def test_aligned_no_lengths(tiny_raw, tiny_mmsa):
    raw = tiny_raw(aligned=True)
    assert not any(k.endswith("_lengths") for k in raw["train"])
    d = load_mmsa(tiny_mmsa(raw))
    L = raw["train"]["text"].shape[1]
    for m in d.modalities:
        assert d["train"].features[m].shape[1] == L
        assert (d["train"].lengths[m] == L).all() and d["train"].masks(m).all()


def test_two_modalities(tiny_raw, tiny_mmsa):
    d = load_mmsa(tiny_mmsa(tiny_raw(modalities=("text", "audio"))))
    assert d.modalities == ("text", "audio")
    assert "vision" not in d["train"].features and set(d.dims) == {"text", "audio"}
    # vision present in only one split: not a modality of the data set
    raw = tiny_raw()
    del raw["test"]["vision"]
    assert load_mmsa(tiny_mmsa(raw, name="partial.pkl")).modalities == ("text", "audio")


def test_utterance_level_features(tiny_raw, tiny_mmsa):
    raw = tiny_raw(aligned=True)
    for s in raw.values():
        for m in ("text", "audio", "vision"):
            s[m] = s[m][:, 0, :]                  # (N, d)
    d = load_mmsa(tiny_mmsa(raw))
    for name in SPLITS:
        for m in d.modalities:
            f = d[name].features[m]
            assert f.shape == (len(raw[name]["regression_labels"]), 1, raw[name][m].shape[1])
            np.testing.assert_array_equal(f[:, 0], raw[name][m])
            assert (d[name].lengths[m] == 1).all()


def test_nonfinite_cleaned_and_counted(tiny_raw, tiny_mmsa):
    raw = tiny_raw()
    a = raw["train"]["audio"]
    before = a.copy()
    a[0, 0, 0], a[1, 2, 3], a[2, 0, 1] = -np.inf, np.nan, np.inf
    raw["valid"]["vision"][0, 1, :2] = np.nan
    d = load_mmsa(tiny_mmsa(raw))
    assert d["train"].cleaned == 3 and d["valid"].cleaned == 2 and d["test"].cleaned == 0
    assert d.cleaned == 5
    got = d["train"].features["audio"]
    assert np.isfinite(got).all()
    assert got[0, 0, 0] == got[1, 2, 3] == got[2, 0, 1] == 0
    keep = np.isfinite(a)
    np.testing.assert_array_equal(got[keep], before[keep])   # everything else untouched
    assert (d["valid"].features["vision"][0, 1, :2] == 0).all()


def test_text_bert_mask_gives_text_lengths(tiny_raw, tiny_mmsa):
    raw = tiny_raw()
    s = raw["train"]
    n, L = s["text"].shape[:2]
    tl = np.array([3, 7, 1, 5, 2, 4])[:n]
    mask = (np.arange(L)[None, :] < tl[:, None]).astype(np.int64)
    ids = np.where(mask, 100 + np.arange(L)[None, :], 0)
    s["text_bert"] = np.stack([ids, mask, np.zeros_like(mask)], axis=1)   # (N, 3, L)
    d = load_mmsa(tiny_mmsa(raw))
    np.testing.assert_array_equal(d["train"].lengths["text"], tl)
    assert d["train"].text_bert.shape == (n, 3, L) and d["train"].text_bert.dtype == np.int64
    assert (d["valid"].lengths["text"] == raw["valid"]["text"].shape[1]).all()   # no text_bert there
    # explicit text_lengths (cpsl extension) win over the mask
    s["text_lengths"] = np.full(n, 2)
    np.testing.assert_array_equal(load_mmsa(tiny_mmsa(raw, name="b.pkl"))["train"].lengths["text"], 2)


def test_load_data_synth_and_path(tiny_mmsa):
    d = load_data("synth:3")
    assert d.path == "synth" and len(d["train"]) == 1284
    p = tiny_mmsa()
    assert load_data(str(p)).path == str(p)


# ------------------------------------------------------------------------- round trip

def _text_bert(raw):
    for s in raw.values():
        n, L = s["text"].shape[:2]
        m = (np.arange(L)[None, :] < np.arange(1, n + 1)[:, None] % L + 1).astype(np.int64)
        s["text_bert"] = np.stack([m * 7, m, 0 * m], 1)
    return raw


def test_round_trip_exact(tiny_raw, tiny_mmsa, tmp_path):
    d = load_mmsa(tiny_mmsa(_text_bert(tiny_raw())))
    out = tmp_path / "sub" / "round.pkl"
    save_mmsa(d, out)
    e = load_mmsa(out)
    assert e.modalities == d.modalities
    for name in SPLITS:
        a, b = d[name], e[name]
        for m in d.modalities:
            assert b.features[m].dtype == a.features[m].dtype
            np.testing.assert_array_equal(b.features[m], a.features[m])
            np.testing.assert_array_equal(b.lengths[m], a.lengths[m])
        np.testing.assert_array_equal(b.labels, a.labels)
        np.testing.assert_array_equal(b.ids, a.ids)
        np.testing.assert_array_equal(b.raw_text, a.raw_text)
        np.testing.assert_array_equal(b.text_bert, a.text_bert)


def test_saved_file_has_mmsa_structure(tmp_path):
    from cpsl.data.synthetic import SynthSpec, generate
    d = generate(SynthSpec(seed=1, n_train=7, n_valid=3, n_test=4))
    p = tmp_path / "s.pkl"
    save_mmsa(d, p)
    with open(p, "rb") as f:
        raw = pickle.load(f)
    assert type(raw) is dict and set(raw) == set(SPLITS)
    for name, n in (("train", 7), ("valid", 3), ("test", 4)):
        s = raw[name]
        assert type(s) is dict
        assert {"text", "audio", "vision", "regression_labels", "id", "raw_text",
                "audio_lengths", "vision_lengths"} <= set(s)
        for m in ("text", "audio", "vision"):
            assert isinstance(s[m], np.ndarray) and s[m].ndim == 3 and s[m].shape[0] == n
            assert s[m].dtype == np.float32
        assert s["regression_labels"].shape == (n,) and s["regression_labels"].dtype == np.float32
        assert s["audio_lengths"].shape == (n,) and s["id"].shape == (n,) and s["raw_text"].shape == (n,)
        assert "$_$" in str(s["id"][0])
    # a plain dict (as MMSA would build) is written as is
    save_mmsa(raw, tmp_path / "again.pkl")
    with open(tmp_path / "again.pkl", "rb") as f:
        assert set(pickle.load(f)) == set(SPLITS)


# ----------------------------------------------------------------------------- errors

def _bad(mutate):
    """A maker of a tiny MMSA dict with one defect; ``mutate`` edits it in place."""
    def make(tiny_raw):
        raw = tiny_raw()
        mutate(raw)
        return raw
    return make


BAD_CASES = {
    "missing split": (_bad(lambda r: r.pop("test")), "missing split(s) test"),
    "missing key": (_bad(lambda r: r["valid"].pop("regression_labels")),
                    "split 'valid' has no key 'regression_labels'"),
    "label count": (_bad(lambda r: r["train"].__setitem__("regression_labels", r["train"]["regression_labels"][:-1])),
                    "train/text has 6 samples but regression_labels has 5"),
    "feature count": (_bad(lambda r: r["test"].__setitem__("audio", r["test"]["audio"][:-2])),
                      "test/audio has 3 samples"),
    "id count": (_bad(lambda r: r["train"].__setitem__("id", r["train"]["id"][:2])), "train/id has 2 entries"),
    "lengths count": (_bad(lambda r: r["train"].__setitem__("audio_lengths", r["train"]["audio_lengths"][:2])),
                      "train/audio_lengths has 2 entries"),
    "label high": (_bad(lambda r: r["valid"]["regression_labels"].__setitem__(0, 3.4)), "outside [-3, 3]"),
    "label low": (_bad(lambda r: r["test"]["regression_labels"].__setitem__(1, -3.01)), "outside [-3, 3]"),
    "label nan": (_bad(lambda r: r["test"]["regression_labels"].__setitem__(1, np.nan)), "non-finite"),
    "label text": (_bad(lambda r: r["test"].__setitem__("regression_labels", np.array(["a"] * 5))),
                   "test/regression_labels is not a numeric array"),
    "no modality": (_bad(lambda r: [s.pop(m) for s in r.values() for m in ("text", "audio", "vision")]),
                    "needs at least one modality"),   # one modality is fine (text-only MOSEI, issue 14)
    "bad ndim": (_bad(lambda r: r["train"].__setitem__("vision", np.zeros(6))), "train/vision must have shape"),
    "dims differ": (_bad(lambda r: r["valid"].__setitem__("audio", np.zeros((4, 9, 2), np.float32))),
                    "audio feature size differs"),
    "split not dict": (_bad(lambda r: r.__setitem__("valid", [1, 2])), "split 'valid' is not a dict"),
    "list file": (lambda tr: [tr()["train"]], "expected a dict of splits, got list"),
    "text_bert shape": (_bad(lambda r: r["train"].__setitem__("text_bert", np.zeros((6, 2, 7)))), "(N, 3, L)"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_files(case, tiny_raw, tiny_mmsa):
    make, needle = BAD_CASES[case]
    p = tiny_mmsa(make(tiny_raw))
    with pytest.raises(CPSLError) as e:
        load_mmsa(p)
    msg = str(e.value)
    assert needle in msg, msg
    assert "\n" not in msg and str(p) in msg


def test_missing_file_folder_and_non_pickle(tmp_path):
    with pytest.raises(CPSLError, match="data file not found"):
        load_mmsa(tmp_path / "nope.pkl")
    with pytest.raises(CPSLError, match="is a folder"):
        load_mmsa(tmp_path)
    p = tmp_path / "text.pkl"
    p.write_text("this is not a pickle\n")
    with pytest.raises(CPSLError, match="not a readable pickle"):
        load_mmsa(p)
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(CPSLError, match="not a readable pickle"):
        load_mmsa(tmp_path / "empty.pkl")


def test_unknown_split_lookup(tiny_mmsa):
    d = load_mmsa(tiny_mmsa())
    with pytest.raises(CPSLError, match="split 'dev'"):
        d["dev"]


# ----------------------------------------------------------------------------- batching

def test_make_batch_masks_and_trim(tiny_raw, tiny_mmsa):
    d = load_mmsa(tiny_mmsa(_text_bert(tiny_raw())))
    s = d["train"]
    rows = np.array([4, 1, 3])
    b = make_batch(s, rows)
    assert len(b) == 3 and list(b.index) == [4, 1, 3]
    torch.testing.assert_close(b.y, torch.from_numpy(s.labels[rows]))
    for m in d.modalities:
        lens = s.lengths[m][rows]
        L = int(lens.max())
        assert b.x[m].shape == (3, L, s.features[m].shape[2]) and b.x[m].dtype == torch.float32
        assert b.mask[m].dtype == torch.bool
        np.testing.assert_array_equal(b.mask[m].sum(1).numpy(), lens)
        np.testing.assert_array_equal(b.mask[m].numpy(), s.masks(m)[rows, :L])
        np.testing.assert_array_equal(b.x[m].numpy(), s.features[m][rows, :L])
    # the audio lengths of these rows are shorter than the file's padding: the batch is trimmed
    assert b.x["audio"].shape[1] == s.lengths["audio"][rows].max()
    assert b.text_bert.shape[:2] == (3, 3)
    assert b.text_bert.shape[2] == int(s.text_bert[rows, 1].sum(1).max())
    # a subset of modalities
    b2 = make_batch(s, rows, modalities=("text", "vision"))
    assert set(b2.x) == set(b2.mask) == {"text", "vision"}
    assert b.to("cpu").x["text"].shape == b.x["text"].shape


def test_trim_is_per_batch():
    from cpsl.data.synthetic import SynthSpec, generate
    s = generate(SynthSpec(seed=2, n_train=40, n_valid=2, n_test=2))["train"]
    widths = set()
    for b in iterate(s, 8):
        for m in ("text", "audio", "vision"):
            assert b.x[m].shape[1] == int(s.lengths[m][b.index].max())
            assert b.mask[m][:, -1].any()      # the last column is valid for someone
            widths.add(b.x[m].shape[1])
    assert len(widths) > 3


def test_iterate_order_coverage_and_determinism(tiny_raw, tiny_mmsa):
    raw = tiny_raw(sizes={"train": 23, "valid": 2, "test": 2})
    s = load_mmsa(tiny_mmsa(raw))["train"]
    plain = list(iterate(s, 5))
    assert [len(b) for b in plain] == [5, 5, 5, 5, 3] and n_batches(s, 5) == 5
    np.testing.assert_array_equal(np.concatenate([b.index for b in plain]), np.arange(23))

    def order(seed):
        g = torch.Generator().manual_seed(seed)
        return [np.concatenate([b.index for b in iterate(s, 5, shuffle=True, generator=g)]) for _ in range(2)]

    a, b, c = order(0), order(0), order(1)
    for epoch in a + c:                                     # every row exactly once per epoch
        assert sorted(epoch.tolist()) == list(range(23))
    np.testing.assert_array_equal(a[0], b[0])              # same seed, same order
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])                  # another seed, another order
    assert not np.array_equal(a[0], a[1])                  # the generator advances between epochs
    assert not np.array_equal(a[0], np.arange(23))
    # labels travel with their rows
    g = torch.Generator().manual_seed(5)
    for bt in iterate(s, 4, shuffle=True, generator=g):
        np.testing.assert_array_equal(bt.y.numpy(), s.labels[bt.index])


def test_bucket_order_groups_similar_lengths():
    from cpsl.data.batch import bucket_order
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 51, size=203)
    base = torch.randperm(203, generator=torch.Generator().manual_seed(3)).numpy()

    def cost(order):                                        # padded tokens of the batches of 8
        return sum(len(order[i:i + 8]) * lengths[order[i:i + 8]].max() for i in range(0, len(order), 8))

    np.testing.assert_array_equal(bucket_order(base, lengths, 8, 0), base)        # 0: unchanged
    out = [bucket_order(base, lengths, 8, 4, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    windows = [base[i:i + 32] for i in range(0, 203, 32)]
    for o in out:
        assert sorted(o.tolist()) == list(range(203))                             # a permutation
        assert cost(o) < 0.75 * cost(base)                                        # far less padding
        for i in range(0, 200, 8):                                                # a batch: one window's rows
            assert any(set(o[i:i + 8]) <= set(w) for w in windows)
    np.testing.assert_array_equal(out[0], out[1])                                 # same generator, same order
    assert not np.array_equal(out[0], out[2])                                     # the batches are shuffled
    last = base[192:]                                                             # the short batch goes last
    assert set(out[0][200:]) <= set(last) and len(out[0][200:]) == 3


def test_iterate_bucket_uses_text_lengths(tiny_raw, tiny_mmsa):
    from cpsl.data.batch import bucket_order, row_lengths
    raw = _text_bert(tiny_raw(sizes={"train": 40, "valid": 2, "test": 2}))
    s = load_mmsa(tiny_mmsa(raw))["train"]
    L = s.text_bert.shape[2]
    rng = np.random.default_rng(1)
    s.text_bert[:, 1] = 0                                   # real texts of 2..L tokens, right-padded
    for i, n in enumerate(rng.integers(2, L + 1, size=len(s))):
        s.text_bert[i, 1, :n] = 1
    np.testing.assert_array_equal(row_lengths(s), s.text_bert[:, 1].sum(1))

    def widths(bucket):
        g = torch.Generator().manual_seed(0)
        bs = list(iterate(s, 8, shuffle=True, generator=g, bucket=bucket))
        assert sorted(np.concatenate([b.index for b in bs]).tolist()) == list(range(40))
        for b in bs:
            np.testing.assert_array_equal(b.y.numpy(), s.labels[b.index])
        return sum(len(b) * b.text_bert.shape[2] for b in bs)

    assert widths(5) < widths(0)
    g, ref = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)   # bucketed by the text lengths
    got = np.concatenate([b.index for b in iterate(s, 8, shuffle=True, generator=g, bucket=5)])
    want = bucket_order(torch.randperm(40, generator=ref).numpy(), s.text_bert[:, 1].sum(1), 8, 5, ref)
    np.testing.assert_array_equal(got, want)
    g = torch.Generator().manual_seed(0)
    plain = np.concatenate([b.index for b in iterate(s, 8, shuffle=True, generator=g)])
    g = torch.Generator().manual_seed(0)
    np.testing.assert_array_equal(plain, np.concatenate([b.index for b in iterate(s, 8, shuffle=True, generator=g,
                                                                                   bucket=0)]))
