"""Regression tests for every case of issue 18 (training integrity, mixed runs, one-line errors)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cpsl.checkpoint import read_checkpoint, save_checkpoint
from cpsl.config import build_config, preset
from cpsl.data import SynthSpec, generate
from cpsl.data.mmsa import save_mmsa
from cpsl.errors import CPSLError
from cpsl.model import CPSLModel
from cpsl.model.ame import MaskedBatchNorm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # --import-mode=importlib: find helpers_cli
from helpers_cli import cli, one_error_line, tiny_dataset, write_pickle  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--preset", "student", "--quiet", "--set", "train.num_threads=1"]


@pytest.fixture(scope="module")
def pkl(tmp_path_factory):
    p = tmp_path_factory.mktemp("rel") / "tiny.pkl"
    return write_pickle(p, tiny_dataset())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, pkl):
    root = tmp_path_factory.mktemp("ck")
    res = cli("train", "--data", pkl, "--out", root / "run", "--epochs", "1", *TRAIN)
    assert res.exit_code == 0, res.output
    return root / "run" / "seed1" / "best.pt"


# ---------------------------------------------------------------------------- 4. the guard
def _poisoned(tmp_path, value=1e30):
    d = generate(SynthSpec(seed=0, n_train=96, n_valid=48, n_test=8))
    save_mmsa(d, tmp_path / "clean.pkl")
    d.splits["train"].features["audio"][3, 2, 1] = value
    save_mmsa(d, tmp_path / "poison.pkl")
    return tmp_path / "clean.pkl", tmp_path / "poison.pkl"


@pytest.mark.parametrize("modulation", ["cp", "none", "cggm", "mmpareto", "inforeg"])
def test_one_1e30_value_training_stays_finite_and_reports_skips(tmp_path, modulation):
    clean, poison = _poisoned(tmp_path)
    runs = {}
    for name, data in (("clean", clean), ("poison", poison)):
        res = cli("train", "--data", data, "--out", tmp_path / name, "--epochs", "3", "--modulation", modulation, *TRAIN)
        assert res.exit_code == 0, res.output
        runs[name] = (res.output, json.loads((tmp_path / name / "results.json").read_text()))
    out, res = runs["poison"]
    assert "1 feature values with |x| > 1e+06" in out                     # the loader's warning in train
    assert res["skipped_steps"] >= 3 and "steps skipped" in out            # the sample's batch, once per epoch
    log = [json.loads(ln) for ln in (tmp_path / "poison" / "seed1" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in log] == [1, 1, 1]
    ck = read_checkpoint(tmp_path / "poison" / "seed1" / "best.pt")
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    clean_mae, poison_mae = runs["clean"][1]["valid"]["MAE"]["mean"], res["valid"]["MAE"]["mean"]
    assert abs(poison_mae - clean_mae) < 0.15, (clean_mae, poison_mae)


def test_masked_batchnorm_does_not_overflow_and_keeps_running_stats():
    bn = MaskedBatchNorm(3).train()
    x = torch.randn(4, 5, 3)
    x[1, 2, 0] = 1e30
    mask = torch.ones(4, 5, dtype=torch.bool)
    y = bn(x, mask)
    assert torch.isfinite(y).all()
    assert not bool(bn.stats_ok)                                 # variance does not fit float32: flagged
    assert torch.equal(bn.running_var, torch.ones(3)) and torch.equal(bn.running_mean, torch.zeros(3))
    x[1, 2, 0] = 1e15                                            # large but representable: used
    bn(x, mask)
    assert bool(bn.stats_ok) and torch.isfinite(bn.running_var).all() and bn.running_var[0] > 1e20


def test_guard_skips_the_whole_step_and_stops_after_the_limit(tmp_path):
    """Every batch non-finite: no weight or optimizer state changes, then one line naming the cause."""
    clean, _ = _poisoned(tmp_path)
    d = generate(SynthSpec(seed=0, n_train=96, n_valid=48, n_test=8))
    d.splits["train"].features["audio"][:, 0, 0] = 1e30                  # in every batch
    save_mmsa(d, tmp_path / "all.pkl")
    res = cli("train", "--data", tmp_path / "all.pkl", "--out", tmp_path / "r", "--epochs", "5", *TRAIN,
              "--set", "train.skip_limit=4")
    line = one_error_line(res, "4 consecutive training steps", "feature statistics", "|x| > 1e6")
    assert "checkpoint not found" not in line


def test_no_finite_validation_loss_is_one_clear_line(tmp_path, monkeypatch):
    """The old misleading 'checkpoint not found' is replaced by the reason."""
    import cpsl.train as T
    clean, _ = _poisoned(tmp_path)
    monkeypatch.setattr(T, "evaluate", lambda *a, **k: {"metrics": {"loss": float("nan"), "MAE": float("nan")},
                                                        "aux": {}, "aux_loss": {}, "pred": None,
                                                            "aux_pred": None})
    res = cli("train", "--data", clean, "--out", tmp_path / "r", "--epochs", "1", *TRAIN)
    one_error_line(res, "no epoch reached a finite validation loss")


# ---------------------------------------------------------------------------- 5. config values
BAD_SETS = ["data.batch_size=-1", "model.heads=0", "model.d=0", "model.d=-8", "model.dropout=2",
            "train.device=gpu", "train.num_threads=-1", "train.seeds=abc", "train.lr=nan", "train.lr=-1",
            "train.patience=0", "cp.tau=-1", "train.epochs=0", "model.audio_kernel=2", "loss.eps=0",
            "cp.k_min=1.5", "train.clip=inf", "model.norm_momentum=-0.1", "train.skip_limit=0"]


@pytest.mark.parametrize("item", BAD_SETS)
def test_bad_config_value_is_one_line_naming_the_key(pkl, tmp_path, item):
    res = cli("train", "--data", pkl, "--out", tmp_path / "r", "--set", item, "--quiet")
    one_error_line(res, item.split("=")[0])
    assert not (tmp_path / "r").exists()


def test_epochs_zero_is_an_error_not_the_default(pkl, tmp_path):
    one_error_line(cli("train", "--data", pkl, "--out", tmp_path / "r", "--epochs", "0", "--quiet"), "train.epochs")


def test_binary_config_file(pkl, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(bytes(range(256)) * 4)
    one_error_line(cli("train", "--data", pkl, "--out", tmp_path / "r", "--config", cfg), "not UTF-8")


def test_every_preset_passes_the_rules():
    for name in ("teacher", "student"):
        build_config(name)


# ---------------------------------------------------------------------------- 6. non-finite weights
def test_nan_weights_refused_by_eval_and_export(ckpt, pkl, tmp_path):
    ck = torch.load(ckpt, weights_only=True)
    k = next(k for k, v in ck["model"].items() if v.is_floating_point() and v.numel() > 1)
    ck["model"][k][0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(ck, bad)
    one_error_line(cli("eval", "--ckpt", bad, "--data", pkl), "NaN/inf", k)
    pytest.importorskip("onnxruntime")
    one_error_line(cli("export", "--ckpt", bad, "--onnx", tmp_path / "m.onnx", "--data", pkl), "NaN/inf")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("drop", ["dims", "config", "model"])
def test_checkpoint_without_an_entry(ckpt, pkl, tmp_path, drop):
    ck = torch.load(ckpt, weights_only=True)
    del ck[drop]
    torch.save(ck, tmp_path / "x.pt")
    one_error_line(cli("eval", "--ckpt", tmp_path / "x.pt", "--data", pkl), f"no {drop!r} entry")


def test_checkpoint_with_an_invalid_config(ckpt, pkl, tmp_path):
    ck = torch.load(ckpt, weights_only=True)
    ck["config"]["model"]["heads"] = 0
    torch.save(ck, tmp_path / "x.pt")
    one_error_line(cli("eval", "--ckpt", tmp_path / "x.pt", "--data", pkl), "model.heads")


# ---------------------------------------------------------------------------- 7. mixed runs
def test_out_on_an_existing_run_refuses_then_overwrite_replaces(ckpt, pkl, tmp_path):
    run = ckpt.parent.parent
    before = (run / "seed1" / "best.pt").read_bytes()
    res = cli("train", "--data", pkl, "--out", run, "--epochs", "1", *TRAIN, "--set", "model.d=16")
    one_error_line(res, "already holds a run", "--overwrite")
    assert (run / "seed1" / "best.pt").read_bytes() == before
    other = tmp_path / "copy"
    import shutil
    shutil.copytree(run, other)
    (other / "seed7").mkdir()
    (other / "seed7" / "last.pt").write_bytes(before)                  # not written by this run: not its to delete
    res = cli("train", "--data", pkl, "--out", other, "--epochs", "1", *TRAIN, "--overwrite", "--set", "model.d=16")
    one_error_line(res, "seed7/", "not listed")
    assert (other / "seed7" / "last.pt").read_bytes() == before
    import shutil
    shutil.rmtree(other / "seed7")
    assert cli("train", "--data", pkl, "--out", other, "--epochs", "1", *TRAIN, "--overwrite", "--seeds", "1,2",
               "--set", "model.d=16").exit_code == 0
    res = cli("train", "--data", pkl, "--out", other, "--epochs", "1", *TRAIN, "--overwrite", "--set", "model.d=8")
    assert res.exit_code == 0, res.output
    assert not (other / "seed2").exists()                              # no seed of the old run survives
    assert read_checkpoint(other / "seed1" / "best.pt")["config"]["model"]["d"] == 8
    one_error_line(cli("train", "--data", pkl, "--out", other, "--resume", "--overwrite"), "exclude each other")


@pytest.mark.parametrize("change,needle", [
    (["--set", "train.lr=0.01"], "train.lr (0.001 -> 0.01)"),
    (["--modulation", "none"], "train.modulation ('cp' -> 'none')"),
    (["--data", "OTHER"], "the data (content fingerprint differs)"),
    (["--set", "loss.task=mse"], "loss.task"),
    (["--set", "data.batch_size=8"], "data.batch_size"),
])
def test_resume_names_what_differs(ckpt, pkl, tmp_path, change, needle):
    if "OTHER" in change:
        change = ["--data", write_pickle(tmp_path / "other.pkl", tiny_dataset(seed=1))]
    args = ["train", "--out", ckpt.parent.parent, "--resume", "--epochs", "2", *TRAIN]
    if "--data" not in change:
        args += ["--data", pkl]
    one_error_line(cli(*args, *change), "cannot resume", needle)


def test_resume_of_the_same_run_continues(ckpt, pkl, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(ckpt.parent.parent, run)
    res = cli("train", "--data", pkl, "--out", run, "--resume", "--epochs", "2", *TRAIN)
    assert res.exit_code == 0, res.output
    assert "resuming after epoch 0" in res.output


@pytest.mark.parametrize("entry", ["identity", "config"])
def test_resume_of_a_run_written_before_a_config_key(ckpt, pkl, tmp_path, entry):
    """A key the checkpoint predates counts as the value the run behaved as: its default where the
    key kept the old behaviour (cp.signal), resumes; train.ema ran as 0.0 and cp.stop as never before
    they existed, so their new defaults (0.99, plateau) are refused by name and explicit old values
    continue."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(ckpt.parent.parent, run)
    last = run / "seed1" / "last.pt"
    ck = torch.load(last, weights_only=True)
    if entry == "identity":
        del ck["identity"]["cp.signal"], ck["identity"]["cp.stop"], ck["identity"]["train.ema"]
    else:                                                  # older still: no identity, the config alone
        del ck["identity"], ck["config"]["cp"]["signal"], ck["config"]["cp"]["stop"], ck["config"]["train"]["ema"]
    torch.save(ck, last)
    args = ["train", "--data", pkl, "--out", run, "--resume", "--epochs", "2", *TRAIN]
    line = one_error_line(cli(*args), "cannot resume")
    assert "train.ema (not recorded, ran as 0.0 -> 0.99)" in line and "cp.stop (not recorded, ran as 'never' -> 'plateau')" in line, line
    res = cli(*args, "--set", "train.ema=0", "--set", "cp.stop=never")
    assert res.exit_code == 0, res.output
    assert "resuming after epoch 0" in res.output


# ---------------------------------------------------------------------------- 8. silent coercions
@pytest.mark.parametrize("lens", [0, -2, float("nan"), 4.5, 99])
def test_bad_sequence_lengths_are_refused(tmp_path, lens):
    raw = tiny_dataset()
    ln = raw["train"]["audio_lengths"].astype(np.float64)
    ln[3] = lens
    raw["train"]["audio_lengths"] = ln
    res = cli("data", "info", write_pickle(tmp_path / "l.pkl", raw))
    one_error_line(res, "train/audio_lengths")


def test_data_info_and_train_report_extreme_and_cleaned_values(tmp_path):
    raw = tiny_dataset()
    raw["train"]["text"][0, 0, :2] = np.nan
    raw["train"]["audio"][1, 0, 0] = 5e7
    p = write_pickle(tmp_path / "x.pkl", raw)
    res = cli("data", "info", p)
    assert res.exit_code == 0
    assert "warning: 2 non-finite values replaced by 0" in res.output
    assert "warning: 1 feature values with |x| > 1e+06 (train 1)" in res.output
    res = cli("train", "--data", p, "--out", tmp_path / "r", "--epochs", "1", *TRAIN)
    assert res.exit_code == 0, res.output
    assert "2 non-finite values replaced by 0" in res.output and "|x| > 1e+06" in res.output


# ---------------------------------------------------------------------------- tracebacks -> one line
@pytest.mark.parametrize("empty", ["train", "valid"])
def test_empty_split_is_refused_where_read(tmp_path, empty):
    raw = tiny_dataset(n=(0 if empty == "train" else 24, 0 if empty == "valid" else 12, 12))
    p = write_pickle(tmp_path / "e.pkl", raw)
    one_error_line(cli("train", "--data", p, "--out", tmp_path / "r", "--epochs", "1", *TRAIN), f"{empty} (0)")


def test_empty_sequence_axis(tmp_path):
    raw = tiny_dataset()
    raw["train"]["audio"] = np.zeros((24, 0, 4), np.float32)
    one_error_line(cli("data", "info", write_pickle(tmp_path / "z.pkl", raw)), "empty sequence or feature axis")


@pytest.mark.parametrize("args,needle", [
    (["--sizes", "-5,10,10"], "n_train"), (["--sizes", "0,0,0"], "n_train"), (["--sizes", "50,1,0"], "n_valid"),
    (["--set", "text_len=8,2"], "text_len"), (["--set", "d_text=0"], "d_text"), (["--set", "cue_frac=2"], "cue_frac"),
    (["--set", "text_len=abc"], "text_len"),
])
def test_data_synth_refuses_unusable_specs(tmp_path, args, needle):
    out = tmp_path / "s.pkl"
    one_error_line(cli("data", "synth", "--out", out, *args), needle)
    assert not out.exists()


def test_train_with_bad_synth_knob(tmp_path):
    res = cli("train", "--data", "synth", "--out", tmp_path / "r", "--set", 'data.synth={"d_text": 0}', "--quiet")
    one_error_line(res, "d_text")


def test_build_bclstm_valid_frac_zero(tmp_path):
    hdr = ["video_id", "clip_id", "label", "t0", "a0", "v0"]
    rows = [[f"v{i // 2}", str(i), "0.4", "1", "2", "3"] for i in range(8)]
    p = tmp_path / "tr.csv"
    p.write_text("\n".join(",".join(r) for r in [hdr] + rows) + "\n")
    res = cli("data", "build-bclstm", "--train", p, "--valid-frac", "0", "--out", tmp_path / "o.pkl")
    one_error_line(res, "valid-frac")
    assert not (tmp_path / "o.pkl").exists()


def test_build_mosi_with_only_train_rows(tmp_path):
    labels = tmp_path / "labels.csv"
    audio = tmp_path / "audio.csv"
    labels.write_text("video_id,clip_id,text,label,annotation,mode\n"
                      + "".join(f"v{i},1,hello,0.4,Positive,train\n" for i in range(4)))
    audio.write_text("video_id,clip_id," + ",".join(f"a{i}" for i in range(73)) + "\n"
                     + "".join(f"v{i},1," + ",".join(["0.5"] * 73) + "\n" for i in range(4)))
    res = cli("data", "build-mosi", "--labels", labels, "--audio", audio, "--out", tmp_path / "o.pkl", "--quiet")
    one_error_line(res, "valid (0)")
    assert not (tmp_path / "o.pkl").exists()


# ---------------------------------------------------------------------------- export/runner.py
@pytest.fixture(scope="module")
def exported(tmp_path_factory, pkl):
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("runner18")
    cfg = preset("student")
    torch.manual_seed(0)
    m = CPSLModel({"text": 6, "audio": 4, "vision": 5}, cfg.model).eval()
    save_checkpoint(root / "best.pt", m, None, cfg, 0, {"data_path": str(pkl)})
    r = cli("export", "--ckpt", root / "best.pt", "--onnx", root / "m.onnx", "--quiet")
    assert r.exit_code == 0, r.output
    return root


def _runner(root, *args):
    return subprocess.run([sys.executable, str(REPO / "export" / "runner.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=root, timeout=120)


def _golden_variant(root, name, fn):
    z = dict(np.load(root / "m.golden.npz"))
    fn(z)
    np.savez(root / name, **z)
    return name


@pytest.mark.parametrize("case,edit,needle", [
    ("shape", lambda z: z.update(batch0_text=z["batch0_text"][:, :, :3]), "has shape"),
    ("rank", lambda z: z.update(batch0_audio=z["batch0_audio"][0]), "has shape"),
    ("dtype", lambda z: z.update(batch0_text=z["batch0_text"].astype("U")), "not a numeric array"),
    ("mask", lambda z: z.update(batch0_text_mask=z["batch0_text_mask"][:, :1]), "does not match"),
])
def test_runner_golden_with_wrong_inputs_exits_2(exported, case, edit, needle):
    name = _golden_variant(exported, f"{case}.npz", edit)
    r = _runner(exported, "m.onnx", "--check", name)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--bench", "--len", "abc"], "--len must be"), (["--bench", "--len", "0"], ">= 1"),
    (["--bench", "--len", "smell=3"], "unknown modality"),
    (["--bench", "--iters", "1", "--json", "missing/dir/x.json"], "does not exist"),
])
def test_runner_bad_options_exit_2(exported, args, needle):
    r = _runner(exported, "m.onnx", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr


def test_library_refuses_lengths_directly(tmp_path):
    from cpsl.data.mmsa import load_mmsa
    raw = tiny_dataset()
    raw["valid"]["text_lengths"] = np.zeros(12)
    with pytest.raises(CPSLError, match="valid/text_lengths"):
        load_mmsa(write_pickle(tmp_path / "t.pkl", raw))
