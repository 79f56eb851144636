"""Issue 13: ``python bench/balance.py`` — the imbalance grid as one command: cells are ``cpsl ablate``
folders, finished cells are skipped, MOSI cells skip without the data pack, MOSI k-fold folds are
video-grouped over train + valid."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def balance(*args, check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "balance.py"), *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=900)
    if check:
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return r


def test_bad_cell_is_one_error_line(tmp_path):
    r = balance("--out", tmp_path, "--cells", "synth_sc1,bogus", check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: unknown cell(s) bogus")


def test_mosi_cell_skips_without_the_data_pack(tmp_path):
    r = balance("--out", tmp_path / "o", "--cells", "mosi_frozen", "--quick", "--data-dir", tmp_path / "absent")
    assert "mosi_frozen: skipped:" in r.stdout and "not found" in r.stdout
    res = json.loads((tmp_path / "o" / "balance.json").read_text())
    assert res["cells"]["mosi_frozen"]["status"] == "unavailable"
    assert "Not run:" in (tmp_path / "o" / "balance.md").read_text()
    assert not (tmp_path / "o" / "mosi_frozen").exists()


def test_kfold_cells_chooses_which_mosi_cells_get_the_kfold():
    import balance as B
    a = B.parse(["--out", "o", "--cells", "synth_sc1,mosi_frozen,mosi_ft", "--kfold", "5"])
    assert a.kfold_cells == ["mosi_frozen", "mosi_ft"]                 # default: every MOSI cell asked for
    a = B.parse(["--out", "o", "--cells", "synth_sc1,mosi_frozen,mosi_ft", "--kfold", "5", "--kfold-cells", "mosi_frozen"])
    assert a.kfold_cells == ["mosi_frozen"]
    assert B.parse(["--out", "o", "--cells", "mosi_frozen"]).kfold_cells == []
    with pytest.raises(B.BenchError, match="synth_sc1 not among the MOSI cells"):
        B.parse(["--out", "o", "--cells", "synth_sc1,mosi_ft", "--kfold", "5", "--kfold-cells", "synth_sc1"])
    with pytest.raises(B.BenchError, match="needs --kfold"):
        B.parse(["--out", "o", "--cells", "mosi_ft", "--kfold-cells", "mosi_ft"])


@pytest.mark.slow
def test_quick_two_cells_end_to_end_and_resume(tmp_path):
    out = tmp_path / "o"
    args = ("--out", out, "--quick", "--cells", "synth_sc1,synth_slow", "--variants", "none,cp", "--jobs", "1")
    r = balance(*args)
    assert "synth_sc1: started" in r.stdout and "synth_slow: finished (ran)" in r.stdout
    res = json.loads((out / "balance.json").read_text())
    for cell in ("synth_sc1", "synth_slow"):
        abl = json.loads((out / cell / "ablation.json").read_text())          # a cpsl ablate folder
        assert abl["seeds"] == [1, 2] and set(abl["variants"]) == {"none", "cp"} and abl["reference"] == "none"
        t = res["cells"][cell]["table"]
        assert t["split"] == "test" and t["weak"] == ["audio", "vision"]
        cp, none = t["variants"]["cp"], t["variants"]["none"]
        # the paired difference is the mean of the per-seed differences of the ablation's values
        a, b = abl["variants"]["cp"]["test"]["MAE"]["values"], abl["variants"]["none"]["test"]["MAE"]["values"]
        assert cp["vs_none"]["mean"] == pytest.approx(np.mean(np.subtract(a, b)))
        assert cp["vs_none"]["ci95"][0] <= cp["vs_none"]["mean"] <= cp["vs_none"]["ci95"][1]
        assert set(cp["heads"]) == {"audio", "vision"} and set(none["shapley"]) == {"text", "audio", "vision"}
    cfg = json.loads((out / "synth_slow" / "none" / "config.json").read_text())
    assert cfg["data"]["synth"]["audio_xor"] == 1 and cfg["train"]["num_threads"] == 1
    md = (out / "balance.md").read_text()
    assert "| synth_sc1 | cp |" in md and "python bench/balance.py" in md and "cores" in md
    assert (out / "balance.png").stat().st_size > 1000
    stamp = (out / "synth_sc1" / "ablation.json").stat().st_mtime_ns
    r = balance(*args)                                                           # resume: nothing to do
    assert r.stdout.count("finished (skipped)") == 2
    assert (out / "synth_sc1" / "ablation.json").stat().st_mtime_ns == stamp


@pytest.mark.data
@pytest.mark.slow
def test_mosi_kfold_folds_are_video_grouped(tmp_path, shared_data_dir):
    """The k-fold split of a MOSI cell on the --quick cut (the MOSI pickle from the recipe's cache;
    built from the data pack when absent, which takes minutes)."""
    if shared_data_dir is None or not (shared_data_dir / "mosi" / "labels.csv").is_file():
        pytest.skip("the data pack (../shared/data) is not here")
    import balance as B
    from cpsl.data.mmsa import load_mmsa
    from cpsl.kfold import fold_pickles
    from cpsl.recipes.mosi import default_cache
    a = B.parse(["--out", str(tmp_path), "--quick", "--data-dir", str(shared_data_dir), "--threads", "1"])
    cut = B.mosi_pickle(a, default_cache())
    src = load_mmsa(cut, require_splits=("train", "valid"))
    pool = set(src["train"].ids) | set(src["valid"].ids)
    assert len(src["train"]) == B.QUICK_MOSI[0] and len(src["valid"]) == B.QUICK_MOSI[1]
    paths = fold_pickles(cut, 3, tmp_path / "cache")
    folds = [load_mmsa(p, require_splits=("train", "valid")) for p in paths]
    valid_ids = [set(f["valid"].ids) for f in folds]
    assert set().union(*valid_ids) == pool and sum(map(len, valid_ids)) == len(pool)      # a partition
    video = lambda ids: {i.split("$_$")[0] for i in ids}                                 # noqa: E731
    for f in folds:
        assert not video(f["train"].ids) & video(f["valid"].ids)                         # grouped by video
        assert len(f["test"]) == 0 and len(f["train"]) + len(f["valid"]) == len(pool)
    stamp = paths[0].stat().st_mtime_ns
    assert fold_pickles(cut, 3, tmp_path / "cache") == paths and paths[0].stat().st_mtime_ns == stamp


def _fake_finished_cell(out: Path, argv: list[str]):
    """A finished cell as ``cpsl ablate`` leaves it (ablation.json + each variant's config.json), made
    with the settings of ``argv`` and no training."""
    import balance as B
    from cpsl.ablate import variant_config, variant_dir
    from cpsl.config import build_config
    a = B.parse(argv)
    extra = B.synth_sets(a, "synth_sc1")
    base = build_config("student", None, [*extra, *a.sets, "train.num_threads=1", f"train.epochs={a.epochs}"])
    for n in a.names:
        (out / variant_dir(n)).mkdir(parents=True)
        variant_config(base, n, {}).save(out / variant_dir(n) / "config.json")
    (out / "ablation.json").write_text(json.dumps({"data": "synth", "seeds": a.seed_list,
                                                   "variants": {n: {} for n in a.names}}))
    return B, a, extra


def test_finished_cell_with_other_settings_is_refused_not_reused(tmp_path):
    """A finished cell is reused only when its configs match what the command would run; otherwise one
    error line names the differing key and the folder is left as it was."""
    out = tmp_path / "o"
    argv = ["--out", str(out), "--quick", "--cells", "synth_sc1", "--variants", "none,cp", "--jobs", "1"]
    B, a, extra = _fake_finished_cell(out / "synth_sc1", argv)
    assert B.finished(out / "synth_sc1", a, "synth", extra)                  # same settings (threads aside)
    assert B.finished(out / "synth_sc1", B.parse(argv + ["--threads", "2"]), "synth", extra)
    assert not B.finished(out / "synth_sc1", B.parse(argv[:-4] + ["--variants", "none,cp,-SL"]), "synth", extra)
    with pytest.raises(B.BenchError, match=r"data = 'synth' \(this command: 'other.pkl'\)"):
        B.finished(out / "synth_sc1", a, "other.pkl", extra)
    with pytest.raises(B.BenchError, match=r"cp: cp\.alpha = .*\(this command: 3\.0\)"):
        B.finished(out / "synth_sc1", B.parse(argv + ["--set", "cp.alpha=3"]), "synth", extra)
    stamp = (out / "synth_sc1" / "ablation.json").stat().st_mtime_ns
    r = balance(*argv, "--epochs", "5", check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "train.epochs = 2 (this command: 5)" in last
    assert (out / "synth_sc1" / "ablation.json").stat().st_mtime_ns == stamp
