"""torch.distributed training (cpsl/distributed.py): `torchrun --nproc_per_node 2 -m cpsl train` with gloo on
the CPU against one process on the same global batches; resume 2 → 1; the refusals.

World 2 vs world 1 on the same global batches: with every loss term a per-sample mean and no
per-rank statistics (``model.ame=false``: no masked BatchNorm; ``loss.div=0``, ``loss.sl=0``: no
batch-level terms; dropout 0) the weighted all-reduce gives the single-process gradient up to float
summation order; measured: |Δ| ≤ 1.3e-8 on valid/test MAE and Corr and ≤ 5e-9 on CP's mean k after
3 epochs (2-vCPU EPYC VM). Asserted: 1e-5. With AME's masked BatchNorm (per-rank statistics) and the
batch-level terms on, the same runs differ by up to 0.008 in valid MAE (docs/distributed.md); the
strategies test below runs that path and checks the ranks stay identical.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cpsl.cli import main
from cpsl.data.batch import make_batch
from cpsl.data.synthetic import SynthSpec, generate
from cpsl.distributed import Context, check_world, config_digest, rows_of
from cpsl.errors import CPSLError

import cpsl

PKG_ROOT = Path(cpsl.__file__).resolve().parents[1]     # the cpsl these tests import (installed or the tree)
# 33 training rows in global batches of 16: 16, 16, 1 (the last one leaves rank 1 an empty share)
SYNTH = ('data.synth={"n_train": 33, "n_valid": 13, "n_test": 13, "text_len": [2, 5], "audio_len": [2, 5], '
         '"vision_len": [2, 5]}')
ARGS = ["--data", "synth", "--preset", "student", "--quiet", "--set", SYNTH, "--set", "data.batch_size=16",
        "--set", "model.dropout=0", "--set", "train.num_threads=1", "--set", "cp.tau=1.01",
        "--set", "cp.ge_noise=0.5", "--cp-backend", "foreach",
        "--set", "model.ame=false", "--set", "loss.div=0", "--set", "loss.sl=0"]
TOL = 1e-5


def torchrun(tmp_path, *args, nproc=2, script=None):
    """`python -m torch.distributed.run --nproc_per_node N -m cpsl ...` (or a script), 1 thread per rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(PKG_ROOT), os.environ.get("PYTHONPATH", "")]))
    port = str(29500 + (os.getpid() * 7 + len(str(tmp_path))) % 2000)
    target = [str(script)] if script else ["-m", "cpsl"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", port, *target, *[str(a) for a in args]]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)   # a hang fails, a slow machine not


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def log(out):
    return [json.loads(x) for x in (Path(out) / "seed1" / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    r = cli("train", "--out", d / "w1", "--epochs", 3, *ARGS)
    assert r.exit_code == 0, r.output
    p = torchrun(d, "train", "--out", d / "w2", "--epochs", 3, *ARGS)
    assert p.returncode == 0, p.stdout + p.stderr
    return d, p


def test_two_ranks_see_the_single_process_global_batches_and_stay_identical(runs):
    d, p = runs
    assert p.stdout.count("wrote ") == 1                         # rank 0 speaks, rank 1 is quiet
    res1, res2 = (json.loads((d / w / "results.json").read_text()) for w in ("w1", "w2"))
    assert res1["distributed"] == {"world_size": 1, "backend": None}
    assert res2["distributed"] == {"world_size": 2, "backend": "gloo"}
    l1, l2 = log(d / "w1"), log(d / "w2")
    assert len(l1) == len(l2) == 3
    penalised = 0
    for a, b in zip(l1, l2):
        # the global batches (rows, in order) of every epoch, gathered from what each rank trained on
        assert a["distributed"]["batches_crc"] == b["distributed"]["batches_crc"]
        rd = b["distributed"]
        assert len(rd["rank_params"]) == 2 and rd["rank_params"][0] == rd["rank_params"][1]   # identical weights
        assert len(rd["rank_k"]) == 2 and rd["rank_k"][0] == rd["rank_k"][1]                 # identical CP factors
        penalised += sum(v < 1 for v in b["balance"]["k"].values())
        for m, k in a["balance"]["k"].items():                   # the same CP factors as one process
            assert abs(k - b["balance"]["k"][m]) < TOL
        assert abs(a["train"]["task"] - b["train"]["task"]) < TOL   # the global mean loss, logged
        assert abs(a["valid"]["MAE"] - b["valid"]["MAE"]) < TOL
    assert penalised > 0                                          # CP acted (k < 1), so equal k is a real check
    for split in ("valid", "test"):
        for key in ("MAE", "Corr"):
            assert abs(res1[split][key]["mean"] - res2[split][key]["mean"]) < TOL


def test_resume_from_two_ranks_in_one_process(runs, tmp_path):
    d, _ = runs
    p = torchrun(tmp_path, "train", "--out", tmp_path / "r", "--epochs", 1, *ARGS)
    assert p.returncode == 0, p.stdout + p.stderr
    r = cli("train", "--out", tmp_path / "r", "--epochs", 3, "--resume", *ARGS)
    assert r.exit_code == 0 and "resuming after epoch 0" in r.output, r.output
    lr, l2 = log(tmp_path / "r"), log(d / "w2")
    assert [x["epoch"] for x in lr] == [0, 1, 2]
    a, b = dict(lr[0]), dict(l2[0])
    a.pop("time_s"), b.pop("time_s")
    assert a == b                                                 # the 2-rank epoch is deterministic
    assert lr[1]["distributed"]["world_size"] == 1
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    ref = json.loads((d / "w2" / "results.json").read_text())
    assert res["distributed"]["world_size"] == 1
    assert abs(res["test"]["MAE"]["mean"] - ref["test"]["MAE"]["mean"]) < TOL     # 2 → 1 continues the same run


def test_ranks_with_different_configs_fail_with_one_line_each(tmp_path):
    script = tmp_path / "launch.py"
    script.write_text(
        "import os, sys\nfrom cpsl.cli import main\n"
        f"sys.argv = ['cpsl', 'train', '--out', {str(tmp_path / 'o')!r}, '--epochs', '1', *{ARGS!r},\n"
        "            '--set', 'train.lr=' + ('0.001' if os.environ['RANK'] == '0' else '0.002')]\n"
        "main(prog_name='cpsl')\n")
    p = torchrun(tmp_path, script=script)
    assert p.returncode != 0
    lines = [x for x in (p.stdout + p.stderr).splitlines() if x.startswith("error:")]
    # every rank raises it (torchrun may stop the second before it prints)
    assert 1 <= len(lines) <= 2 and all("different configs" in x for x in lines), p.stdout + p.stderr
    assert not (tmp_path / "o" / "results.json").exists()


def test_shards_partition_every_global_batch_in_order():
    split = generate(SynthSpec(n_train=11, n_valid=2, n_test=2)).splits["train"]
    for n in (11, 5, 2, 1):
        batch = make_batch(split, np.arange(n)[::-1].copy())
        for world in (1, 2, 3):
            if world > 1 and n < 2:
                continue
            parts = [Context(world, r, r, "gloo").shard(batch) for r in range(world)]
            sizes = [b - a for a, b in (rows_of(n, world, r) for r in range(world))]
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
            got = np.concatenate([p.index[:s] for p, s in zip(parts, sizes)])
            np.testing.assert_array_equal(got, batch.index)          # the global batch, in order
            for p, s in zip(parts, sizes):
                assert len(p) == max(s, 1)                            # an empty share runs one row, weight 0
                torch.testing.assert_close(p.y[:s], batch.y[torch.as_tensor(np.isin(batch.index, p.index[:s]))])


def test_world_size_and_config_digest_rules():
    check_world(2, 33, 16)
    with pytest.raises(CPSLError, match="larger than the training split"):
        check_world(4, 3, 16)
    with pytest.raises(CPSLError, match="larger than the global batch"):
        check_world(4, 100, 2)
    from cpsl.config import preset
    a, b = preset("student"), preset("student")
    b.train.device = "cuda"
    b.data.path = "/elsewhere/same.pkl"
    assert config_digest(a.to_dict(), "f") == config_digest(b.to_dict(), "f")   # device and path may differ
    b.train.lr = 0.5
    assert config_digest(a.to_dict(), "f") != config_digest(b.to_dict(), "f")
    assert config_digest(a.to_dict(), "f") != config_digest(a.to_dict(), "g")   # other data


def test_amp_fp16_on_cpu_is_one_error_and_bf16_trains(tmp_path):
    r = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "a"), "--epochs", "1", "--amp", "fp16", *ARGS])
    assert r.exit_code == 2 and r.output.startswith("error:") and "fp16" in r.output
    assert r.output.strip().count("\n") == 0
    r = cli("train", "--out", tmp_path / "b", "--epochs", 1, "--amp", "bf16", *ARGS)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res["config"]["train"]["amp"] == "bf16" and np.isfinite(res["test"]["MAE"]["mean"])


SUPPORTED = ("cp", "none", "ogm_ge", "ags", "inforeg", "moddrop")
REFUSED = ("mmpareto", "cggm")                                 # extra backward passes: one process only


def test_every_strategy_keeps_the_ranks_identical_or_is_refused(tmp_path):
    """One torchrun launch trains each strategy one epoch (dropout on: per-rank streams) through the library;
    each epoch all-gathers a parameter checksum and the factors k (a mismatch raises)."""
    script = tmp_path / "strategies.py"
    script.write_text(
        "import os, sys\nfrom pathlib import Path\nfrom cpsl.config import preset\nfrom cpsl.data import load_data\n"
        "from cpsl.errors import CPSLError\nfrom cpsl.train import run\n"
        f"for m in {SUPPORTED + REFUSED!r}:\n"
        "    cfg = preset('student')\n"
        "    cfg.train.modulation, cfg.train.epochs, cfg.train.progress, cfg.train.num_threads = m, 1, False, 1\n"
        f"    cfg.data.synth = {json.loads(SYNTH.split('=', 1)[1])!r}\n"
        "    cfg.data.batch_size, cfg.ogm_ge.ge, cfg.cp.ge_noise = 15, True, 0.5   # shards of 8 and 7 rows\n"
        "    data = load_data('synth', cfg.data.synth_seed, cfg.data.synth)\n"
        "    try:\n"
        f"        run(cfg, data, Path({str(tmp_path)!r}) / m, log=lambda *a, **k: None)\n"
        "        msg = 'ok'\n"
        "    except CPSLError as e:\n"
        "        msg = f'refused: {e}'\n"
        f"    with open(Path({str(tmp_path)!r}) / ('rank' + os.environ['RANK'] + '.txt'), 'a') as f:\n"
        "        f.write(f'rank {os.environ[\"RANK\"]} {m} {msg}\\n')\n")
    p = torchrun(tmp_path, script=script)
    assert p.returncode == 0, p.stdout + p.stderr
    said = (tmp_path / "rank0.txt").read_text() + (tmp_path / "rank1.txt").read_text()   # one file per rank
    for m in SUPPORTED:
        assert f"rank 0 {m} ok" in said and f"rank 1 {m} ok" in said, said
        for rec in log(tmp_path / m):
            d = rec["distributed"]
            assert d["world_size"] == 2 and d["rank_params"][0] == d["rank_params"][1]
            assert d["rank_k"][0] == d["rank_k"][1]
    for m in REFUSED:
        for r in (0, 1):
            assert f"rank {r} {m} refused: modulation {m!r} cannot run with world size 2" in said, said
