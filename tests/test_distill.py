"""Distillation: the KD/hint loss, teacher caching and freezing, and `cpsl distill` end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cpsl.checkpoint import load_model, read_checkpoint
from cpsl.cli import main
from cpsl.compress.distill import DistillLoss, teacher_targets
from cpsl.config import preset
from cpsl.data import SynthSpec, generate
from cpsl.data.batch import make_batch
from cpsl.data.mmsa import save_mmsa
from cpsl.model import CPSLModel
from cpsl.train import run

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A teacher checkpoint (teacher preset, 1 epoch on tiny data) and the data as a pickle."""
    root = tmp_path_factory.mktemp("distill")
    d = generate(SynthSpec(n_train=64, n_valid=32, n_test=32, seed=2))
    pkl = root / "d.pkl"
    save_mmsa(d, pkl)
    d.path = str(pkl)
    cfg = preset("teacher")
    cfg.train.epochs, cfg.train.seeds, cfg.train.progress, cfg.train.num_threads = 1, [1], False, 1
    cfg.data.path = str(pkl)
    run(cfg, d, root / "teacher", log=lambda *a: None)
    return root, root / "teacher" / "seed1" / "best.pt", pkl, d


def _loss(teacher, d, cache):
    torch.manual_seed(0)
    return DistillLoss(teacher, 32, lambda_kd=1.0, lambda_hint=0.1, cache=cache)


def test_loss_is_kd_plus_hint_and_cache_matches_live_teacher(setup):
    _, ckpt, _, d = setup
    teacher, _, _ = load_model(ckpt)
    tr = d["train"]
    p, z = teacher_targets(teacher, tr, batch_size=16)
    cache = (p, z, torch.from_numpy(tr.labels.astype(np.float32)))
    torch.manual_seed(1)
    student = CPSLModel(d.dims, preset("student").model).train()
    rows = np.array([3, 17, 40, 41, 63])             # a batch of its own: other padding than the cache's
    b = make_batch(tr, rows, student.modalities)
    out = student(b.x, b.mask)
    cached, live = _loss(teacher, d, cache), _loss(teacher, d, None)
    lc, tc = cached(out, b)
    ll, tl = live(out, b)
    assert cached.cache_hits == 1 and live.cache_misses == 1
    torch.testing.assert_close(lc, ll, rtol=1e-5, atol=1e-6)
    # the value is λ_kd·MSE(ŷ_s, ŷ_t) + λ_hint·MSE(P z_s, z_t)
    with torch.no_grad():
        to = teacher(b.x, b.mask)
    kd = F.mse_loss(out.pred, to.pred)
    hint = F.mse_loss(live.proj(out.z), to.z)
    torch.testing.assert_close(ll, kd + 0.1 * hint, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tl["kd"], kd)
    # a batch from another split does not silently use the training cache
    vb = make_batch(d["valid"], np.arange(4), student.modalities)
    cached(student(vb.x, vb.mask), vb)
    assert cached.cache_misses == 1


def test_teacher_frozen_in_eval_and_not_saved(setup):
    _, ckpt, _, d = setup
    teacher, _, _ = load_model(ckpt)
    loss = _loss(teacher, d, None)
    loss.train()                                      # what the trainer does every step
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert [n for n, p in loss.named_parameters()] == ["proj.weight", "proj.bias"]
    assert set(loss.state_dict()) == {"proj.weight", "proj.bias"}
    student = CPSLModel(d.dims, preset("student").model).train()
    b = make_batch(d["train"], np.arange(8), student.modalities)
    total, _ = loss(student(b.x, b.mask), b)
    total.backward()
    assert loss.proj.weight.grad is not None and loss.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_cli_distill_results_layout(setup):
    root, ckpt, pkl, d = setup
    out = root / "student"
    r = CliRunner().invoke(main, ["distill", "--teacher", str(ckpt), "--data", str(pkl), "--out", str(out),
                                  "--epochs", "2", "--quiet", "--set", "train.num_threads=1"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    # cpsl train's layout
    assert (out / "seed1" / "best.pt").is_file() and "valid" in res and "test" in res and res["per_seed"]
    student, cfg, ck = load_model(out / "seed1" / "best.pt")
    assert cfg.model.d == 32
    # the student is small: ratio computed independently
    teacher, _, _ = load_model(ckpt)
    ratio = student.num_parameters() / teacher.num_parameters()
    assert ratio <= 0.15
    assert res["distill"]["params"]["ratio"] == pytest.approx(ratio)
    assert res["distill"]["lambda_kd"] == 1.0 and res["distill"]["lambda_hint"] == 0.1
    # teacher metrics and retention
    for s in ("valid", "test"):
        t = res["teacher"][s]
        assert {"MAE", "Corr", "Non0_acc_2"} <= set(t)
        ret = res["retention"][s]
        assert ret["Non0_acc_2"] == pytest.approx(res[s]["Non0_acc_2"]["mean"] / t["Non0_acc_2"])
        assert ret["Corr"] == pytest.approx(res[s]["Corr"]["mean"] / t["Corr"])
        assert ret["MAE_increase"] == pytest.approx(res[s]["MAE"]["mean"] - t["MAE"])
    # the distillation terms were trained and logged; the student's checkpoint holds P, not the teacher
    log = [json.loads(x) for x in (out / "seed1" / "log.jsonl").read_text().splitlines()]
    assert {"kd", "hint", "task", "sl"} <= set(log[0]["train"])
    assert set(read_checkpoint(out / "seed1" / "best.pt")["extra_loss"]) == {"proj.weight", "proj.bias"}
    assert "retention (valid)" in r.output and "student/teacher parameters" in r.output


def test_cli_distill_bad_input_exit_2(setup, tmp_path):
    root, ckpt, pkl, _ = setup
    runner = CliRunner()
    base = ["distill", "--out", str(tmp_path / "o"), "--epochs", "1", "--quiet"]
    # a student as big as the teacher breaks the 15% budget
    r = runner.invoke(main, base + ["--teacher", str(ckpt), "--data", str(pkl), "--preset", "teacher"])
    assert r.exit_code == 2 and "parameters" in r.output and "15%" in r.output, r.output
    # data that does not match the teacher
    other = tmp_path / "other.pkl"
    save_mmsa(generate(SynthSpec(n_train=8, n_valid=8, n_test=8, d_audio=7)), other)
    r = runner.invoke(main, base + ["--teacher", str(ckpt), "--data", str(other)])
    assert r.exit_code == 2 and "audio features of size" in r.output, r.output
    # unreadable / missing teacher
    bad = tmp_path / "bad.pt"
    bad.write_text("nope")
    for t in (bad, tmp_path / "missing.pt"):
        r = runner.invoke(main, base + ["--teacher", str(t), "--data", str(pkl)])
        assert r.exit_code == 2 and r.output.strip().startswith("error:") and "Traceback" not in r.output
