"""Trainer and train/eval CLI: determinism, resume, results layout, eval CSV, bad input."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cpsl.cli import main
from cpsl.data.mmsa import save_mmsa
from cpsl.data.synthetic import SynthSpec, generate

TINY = ["--set", "model.d=16", "--set", "model.heads=2", "--set", "model.audio_layers=1",
        "--set", "model.vision_layers=1", "--set", "data.batch_size=16", "--quiet"]


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r


def read(p):
    return json.loads(p.read_text())


def strip_volatile(res):
    """results.json minus paths and timings."""
    res = json.loads(json.dumps(res))
    for r in res["per_seed"]:
        r.pop("ckpt")
        r.pop("ms_per_step")
    res["config"]["data"].pop("path", None)
    return res


@pytest.fixture(scope="module")
def run_a(tiny_pkl, tmp_path_factory):
    out = tmp_path_factory.mktemp("a")
    r = cli("train", "--data", tiny_pkl, "--out", out, "--epochs", 3, "--seeds", "1,2", "--cp-backend", "foreach", *TINY)
    assert r.exit_code == 0, r.output
    return out


def test_results_layout(run_a):
    res = read(run_a / "results.json")
    assert res["seeds"] == [1, 2]
    for split in ("valid", "test"):
        for k in ("Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score", "Mult_acc_5", "Mult_acc_7", "MAE", "Corr"):
            v = res[split][k]
            assert set(v) == {"mean", "std", "values"} and len(v["values"]) == 2
            assert v["mean"] == pytest.approx(np.mean(v["values"]))
    assert res["config"]["train"]["modulation"] == "cp" and res["modulation"] == "cp"
    for s in (1, 2):
        d = run_a / f"seed{s}"
        assert (d / "best.pt").is_file() and (d / "curves.png").is_file() and (d / "balance.png").is_file()
        lines = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
        assert [x["epoch"] for x in lines] == [0, 1, 2]
        for x in lines:
            assert {"task", "aux", "rec", "sl", "div"} <= set(x["train"])
            assert set(x["valid_aux"]) == {"text", "audio", "vision"}
            assert set(x["balance"]["ghat"]) == {"text", "audio", "vision"}
        ck = torch.load(d / "best.pt", weights_only=True)
        assert {"config", "model", "optimizer", "epoch", "rng"} <= set(ck)


def test_same_seed_gives_identical_results(run_a, tiny_pkl, tmp_path):
    r = cli("train", "--data", tiny_pkl, "--out", tmp_path, "--epochs", 3, "--seeds", "1,2", "--cp-backend", "foreach", *TINY)
    assert r.exit_code == 0, r.output
    assert strip_volatile(read(tmp_path / "results.json")) == strip_volatile(read(run_a / "results.json"))


def test_resume_equals_uninterrupted(run_a, tiny_pkl, tmp_path):
    r = cli("train", "--data", tiny_pkl, "--out", tmp_path, "--epochs", 1, "--seeds", "1,2", "--cp-backend", "foreach", *TINY)
    assert r.exit_code == 0, r.output
    r = cli("train", "--data", tiny_pkl, "--out", tmp_path, "--epochs", 3, "--seeds", "1,2", "--cp-backend", "foreach",
            "--resume", *TINY)
    assert r.exit_code == 0, r.output
    assert "resuming after epoch 0" in r.output
    assert strip_volatile(read(tmp_path / "results.json")) == strip_volatile(read(run_a / "results.json"))
    a = [json.loads(x) for x in (run_a / "seed2" / "log.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "seed2" / "log.jsonl").read_text().splitlines()]
    for x, y in zip(a, b):
        x.pop("time_s"), y.pop("time_s")
    assert a == b


def _independent_metrics(pred, label):
    """A second implementation of MMSA's metrics (no sklearn) for the eval cross-check."""
    pred, label = np.asarray(pred, float), np.asarray(label, float)

    def wf1(t, p):
        f = 0.0
        for c in (False, True):
            tp = np.sum((p == c) & (t == c)); fp = np.sum((p == c) & (t != c)); fn = np.sum((p != c) & (t == c))
            f1 = 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
            f += f1 * np.sum(t == c) / len(t)
        return f

    nz = label != 0
    return {
        "MAE": np.abs(pred - label).mean(),
        "Corr": np.sum((pred - pred.mean()) * (label - label.mean())) / math.sqrt(np.sum((pred - pred.mean()) ** 2) * np.sum((label - label.mean()) ** 2)),
        "Has0_acc_2": np.mean((pred >= 0) == (label >= 0)),
        "Has0_F1_score": wf1(label >= 0, pred >= 0),
        "Non0_acc_2": np.mean((pred[nz] > 0) == (label[nz] > 0)),
        "Non0_F1_score": wf1(label[nz] > 0, pred[nz] > 0),
        "Mult_acc_5": np.mean(np.round(np.clip(pred, -2, 2)) == np.round(np.clip(label, -2, 2))),
        "Mult_acc_7": np.mean(np.round(np.clip(pred, -3, 3)) == np.round(np.clip(label, -3, 3))),
    }


def test_eval_csv_recomputes_to_the_printed_metrics(run_a, tiny_pkl, tmp_path):
    csv_path = tmp_path / "preds.csv"
    r = cli("eval", "--ckpt", run_a / "seed1" / "best.pt", "--data", tiny_pkl, "--split", "test", "--out", csv_path)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(csv_path)))
    assert list(rows[0]) == ["id", "label", "pred", "pred_text", "pred_audio", "pred_vision"]
    assert len(rows) == 24
    got = json.loads((tmp_path / "preds.csv.json").read_text())["metrics"]
    mine = _independent_metrics([float(x["pred"]) for x in rows], [float(x["label"]) for x in rows])
    for k, v in mine.items():
        assert got[k] == pytest.approx(v, abs=1e-4), k
    # and the selected checkpoint's test metrics in results.json are the same numbers
    res = read(run_a / "results.json")
    assert res["per_seed"][0]["test"]["MAE"] == pytest.approx(got["MAE"], abs=1e-6)


def test_eval_mask_modality_reports_the_drop(run_a, tiny_pkl):
    r = cli("eval", "--ckpt", run_a / "seed1" / "best.pt", "--data", tiny_pkl, "--split", "valid",
            "--mask-modality", "text", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["mask_modality"] == "text"
    assert d["drop"]["MAE"] == pytest.approx(d["unmasked"]["MAE"] - d["metrics"]["MAE"])
    assert d["metrics"]["MAE"] != d["unmasked"]["MAE"]


@pytest.mark.parametrize("case", ["corrupt", "missing", "split", "dims", "mods", "maskmod"])
def test_eval_bad_input_exits_2(run_a, tiny_pkl, tmp_path, case):
    ck = run_a / "seed1" / "best.pt"
    data = tiny_pkl
    args = {"split": "test"}
    if case == "corrupt":
        bad = tmp_path / "c.pt"; bad.write_bytes(ck.read_bytes()[:1000]); ck = bad
    elif case == "missing":
        ck = tmp_path / "nope.pt"
    elif case == "split":
        args["split"] = "bogus"
    elif case == "dims":
        data = tmp_path / "d.pkl"
        save_mmsa(generate(SynthSpec(n_train=8, n_valid=8, n_test=8, d_text=13)), data)
    elif case == "mods":
        from cpsl.data.mmsa import load_mmsa
        d = load_mmsa(tiny_pkl)
        for s in d.splits.values():
            s.features.pop("vision"); s.lengths.pop("vision")
        d.modalities = ("text", "audio")
        data = tmp_path / "two.pkl"; save_mmsa(d, data)
    extra = ["--mask-modality", "smell"] if case == "maskmod" else []
    r = CliRunner().invoke(main, ["eval", "--ckpt", str(ck), "--data", str(data), "--split", args["split"], *extra])
    assert r.exit_code == 2, r.output
    assert r.output.strip().count("\n") == 0 and r.output.startswith("error:"), r.output


def test_train_bad_input_exits_2(tmp_path):
    for args in (["--data", tmp_path / "missing.pkl"], ["--set", "model.bogus=1"], ["--seeds", "a,b"],
                 ["--set", "cp.mode=sideways"]):
        r = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "o"), *[str(a) for a in args]])
        assert r.exit_code == 2, (args, r.output)
        assert r.output.startswith("error:") and r.output.strip().count("\n") == 0, r.output


def test_two_modality_training(two_pkl, tmp_path):
    r = cli("train", "--data", two_pkl, "--out", tmp_path / "o", "--epochs", 1, *TINY)
    assert r.exit_code == 0, r.output
    res = read(tmp_path / "o" / "results.json")
    assert res["modalities"] == ["text", "audio"] and set(res["test_aux"]) == {"text", "audio"}


@pytest.mark.parametrize("modulation", ["none", "ogm_ge"])
def test_every_run_logs_balance_diagnostics(tiny_pkl, tmp_path, modulation):
    r = cli("train", "--data", tiny_pkl, "--out", tmp_path, "--epochs", 1, "--modulation", modulation,
            "--cp-backend", "foreach", *TINY)
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "seed1" / "log.jsonl").read_text().splitlines()[0])
    b = rec["balance"]
    assert set(b["ghat"]) == {"text", "audio", "vision"} and all(v > 0 for v in b["ghat"].values())
    assert sum(b["r"].values()) == pytest.approx(3.0, rel=1e-6)     # r = ĝ / mean ĝ
    if modulation == "none":
        assert all(v == 1.0 for v in b["k"].values())               # measured, never applied


# ---------------------------------------------------------------------------- every strategy
ALL = ("none", "cp", "ogm_ge", "cggm", "ags", "mmpareto", "inforeg", "moddrop")
SYNTH = ["--data", "synth", "--set", 'data.synth={"n_train": 48, "n_valid": 16, "n_test": 16, "text_len": [2, 6], '
         '"audio_len": [2, 6], "vision_len": [2, 6]}']


@pytest.fixture(scope="module")
def two_pkl(tmp_path_factory):
    d = generate(SynthSpec(n_train=32, n_valid=16, n_test=16, d_text=6, d_audio=4, d_vision=4,
                           text_len=(2, 5), audio_len=(2, 5), vision_len=(2, 5)))
    for s in d.splits.values():
        s.features.pop("vision"); s.lengths.pop("vision")
    d.modalities = ("text", "audio")
    p = tmp_path_factory.mktemp("two") / "two.pkl"
    save_mmsa(d, p)
    return p


@pytest.mark.parametrize("modulation", ALL)
def test_every_strategy_trains_on_synth_and_on_two_modalities(modulation, two_pkl, tmp_path):
    r = cli("train", *SYNTH, "--out", tmp_path / "s", "--epochs", 1, "--modulation", modulation, *TINY)
    assert r.exit_code == 0, r.output
    assert read(tmp_path / "s" / "results.json")["modulation"] == modulation
    r = cli("train", "--data", two_pkl, "--out", tmp_path / "t", "--epochs", 1, "--modulation", modulation, *TINY)
    assert r.exit_code == 0, r.output
    res = read(tmp_path / "t" / "results.json")
    assert res["modalities"] == ["text", "audio"] and math.isfinite(res["test"]["MAE"]["mean"])
    rec = json.loads((tmp_path / "t" / "seed1" / "log.jsonl").read_text().splitlines()[0])
    if modulation != "none":
        assert set(rec["balance"]["k"]) == {"text", "audio"}


@pytest.mark.parametrize("modulation", ALL)
def test_every_strategy_resumes_to_the_uninterrupted_result(modulation, tiny_pkl, tmp_path):
    args = ["--data", tiny_pkl, "--modulation", modulation, "--cp-backend", "foreach", *TINY]
    r = cli("train", "--out", tmp_path / "a", "--epochs", 3, *args)
    assert r.exit_code == 0, r.output
    r = cli("train", "--out", tmp_path / "b", "--epochs", 1, *args)
    assert r.exit_code == 0, r.output
    r = cli("train", "--out", tmp_path / "b", "--epochs", 3, "--resume", *args)
    assert r.exit_code == 0 and "resuming after epoch 0" in r.output, r.output
    assert strip_volatile(read(tmp_path / "b" / "results.json")) == strip_volatile(read(tmp_path / "a" / "results.json"))


@pytest.mark.parametrize("modulation", ["cggm", "mmpareto", "ogm_ge", "inforeg", "moddrop"])
def test_a_strategy_without_its_unimodal_heads_exits_2(modulation, tiny_pkl, tmp_path):
    r = CliRunner().invoke(main, ["train", "--data", str(tiny_pkl), "--out", str(tmp_path), "--modulation", modulation,
                                  "--set", "loss.aux=0", "--quiet"])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error:") and "unimodal heads" in r.output and r.output.strip().count("\n") == 0


def test_eval_contributions_sum_to_the_error_drop(run_a, tiny_pkl, tmp_path):
    csv_path = tmp_path / "p.csv"
    r = cli("eval", "--ckpt", run_a / "seed1" / "best.pt", "--data", tiny_pkl, "--contributions", "--out", csv_path)
    assert r.exit_code == 0, r.output
    c = json.loads((tmp_path / "p.csv.json").read_text())["contributions"]
    assert set(c["shapley"]) == {"text", "audio", "vision"} and len(c["coalitions"]) == 8
    assert sum(c["shapley"].values()) == pytest.approx(c["error_none"] - c["error_all"], abs=1e-9)
    got = json.loads((tmp_path / "p.csv.json").read_text())["metrics"]["MAE"]
    assert c["error_all"] == pytest.approx(got)
    # the one-modality-masked coalition is what --mask-modality measures
    r = cli("eval", "--ckpt", run_a / "seed1" / "best.pt", "--data", tiny_pkl, "--mask-modality", "text", "--json")
    assert c["coalitions"]["audio+vision"] == pytest.approx(json.loads(r.output)["metrics"]["MAE"])


def test_ablate_runs_strategies_in_parallel_jobs(tiny_pkl, tmp_path):
    r = cli("ablate", "--data", tiny_pkl, "--out", tmp_path, "--variants", "none,ags", "--seeds", "1,2", "--epochs", 1,
            "--jobs", 2, "--cost-steps", 2, "--set", "train.num_threads=1", *TINY)
    assert r.exit_code == 0, r.output
    s = read(tmp_path / "ablation.json")
    assert set(s["variants"]) == {"none", "ags"} and s["jobs"] == 2 and s["reference"] == "none"
    d = s["variants"]["ags"]["vs_none"]["MAE"]
    a, n = s["variants"]["ags"]["test"]["MAE"]["values"], s["variants"]["none"]["test"]["MAE"]["values"]
    assert d["mean"] == pytest.approx(np.mean(np.subtract(a, n))) and d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    assert all(v > 0 for v in s["variants"]["ags"]["ms_per_step"])
    assert all(s["variants"][n]["step_cost"]["ms_median"] > 0 and s["variants"][n]["step_cost"]["steps"] == 2
               for n in ("none", "ags"))
    md = (tmp_path / "ablation.md").read_text()
    assert "isolated ms/step" in md and "φ text" in md and "Paired difference" in md and "cores" in md
    # --cost-only re-times the steps into the existing tables
    r = cli("ablate", "--data", tiny_pkl, "--out", tmp_path, "--variants", "none,mmpareto", "--cost-only",
            "--cost-steps", 3, "--set", "train.num_threads=1", *TINY)
    assert r.exit_code == 0 and "mmpareto" in r.output, r.output
    s2 = read(tmp_path / "ablation.json")
    assert s2["variants"]["none"]["step_cost"]["steps"] == 3 and "mmpareto" not in s2["variants"]
    assert read(tmp_path / "step_cost.json")["costs"]["mmpareto"]["ms_median"] > 0
    # the same run in one process gives the same numbers (the jobs are independent)
    r = cli("ablate", "--data", tiny_pkl, "--out", tmp_path / "one", "--variants", "none,ags", "--seeds", "1,2",
            "--epochs", 1, "--set", "train.num_threads=1", *TINY)
    assert read(tmp_path / "one" / "ablation.json")["variants"]["ags"]["test"] == s["variants"]["ags"]["test"]


def test_ablate_unknown_variant_exits_2(tmp_path):
    r = CliRunner().invoke(main, ["ablate", "--out", str(tmp_path), "--variants", "none,bogus"])
    assert r.exit_code == 2 and r.output.startswith("error:") and "bogus" in r.output, r.output
