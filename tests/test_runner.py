"""export/runner.py: the torch-free runner (golden check, benchmark, errors), run in subprocesses."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402

from cpsl.checkpoint import save_checkpoint  # noqa: E402
from cpsl.cli import main  # noqa: E402
from cpsl.config import preset  # noqa: E402
from cpsl.data import SynthSpec, generate  # noqa: E402
from cpsl.data.mmsa import save_mmsa  # noqa: E402
from cpsl.model import CPSLModel  # noqa: E402

RUNNER = Path(__file__).resolve().parents[1] / "export" / "runner.py"
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    """fp32 and int8 exports of an untrained student, with a directory holding a fake `torch`
    package that fails on import (so the runner cannot use torch even by accident)."""
    root = tmp_path_factory.mktemp("runner")
    d = generate(SynthSpec(n_train=48, n_valid=24, n_test=8, seed=5))
    save_mmsa(d, root / "d.pkl")
    torch.manual_seed(0)
    m = CPSLModel(d.dims, preset("student").model).eval()
    save_checkpoint(root / "best.pt", m, None, preset("student"), 0, {"data_path": str(root / "d.pkl")})
    for prec in ("fp32", "int8"):
        r = CliRunner().invoke(main, ["export", "--ckpt", str(root / "best.pt"), "--onnx", str(root / f"{prec}.onnx"),
                                      "--precision", prec, "--quiet", "--calib-batches", "2"])
        assert r.exit_code == 0, r.output
    fake = root / "notorch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the runner must not import torch')\n")
    return root


def runner(root: Path, *args, cwd=None):
    env = {"PYTHONPATH": str(root / "notorch"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(RUNNER), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd or root, timeout=120)


@pytest.mark.parametrize("prec", ["fp32", "int8"])
def test_check_passes_without_torch(artefacts, prec):
    r = runner(artefacts, f"{prec}.onnx", "--check", f"{prec}.golden.npz", "--assert-no-torch", "--threads", "1",
               "--json", f"{prec}.check.json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check passed: 3 golden batches" in r.stdout
    res = json.loads((artefacts / f"{prec}.check.json").read_text())
    sizes = [b["size"] for b in res["check"]["batches"]]
    assert 1 in sizes and 7 in sizes and res["check"]["ok"]
    if prec == "fp32":
        assert res["check"]["atol"] == 1e-4
        assert all(b["max_abs_err_vs_fp32_reference"] <= 1e-4 for b in res["check"]["batches"])


def test_check_fails_on_mismatch_and_respects_atol(artefacts, tmp_path):
    z = dict(np.load(artefacts / "fp32.golden.npz"))
    z["batch1_expected"] = z["batch1_expected"] + np.float32(0.01)
    bad = tmp_path / "bad.golden.npz"
    np.savez(bad, **z)
    r = runner(artefacts, "fp32.onnx", "--check", bad, "--threads", "1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "MISMATCH" in r.stdout and "check FAILED" in r.stdout
    r = runner(artefacts, "fp32.onnx", "--check", bad, "--threads", "1", "--atol", "0.02")
    assert r.returncode == 0, r.stdout + r.stderr


def test_bench_writes_percentiles(artefacts, tmp_path):
    out = tmp_path / "bench.json"
    r = runner(artefacts, "int8.onnx", "--bench", "--batch", "1,4", "--iters", "5", "--warmup", "1",
               "--threads", "1", "--json", out, "--assert-no-torch")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())["bench"]
    assert [b["batch"] for b in res] == [1, 4]
    for b in res:
        assert 0 < b["p50_ms"] <= b["p90_ms"] <= b["p99_ms"]
        # lengths default to the manifest's engine-profile opt lengths
    man = json.loads((artefacts / "int8.manifest.json").read_text())
    assert res[0]["lengths"]["audio"] == man["engine_profile"]["audio"]["opt"][1]
    assert "p50" in r.stdout and "p99" in r.stdout


def test_bad_input_exit_2(artefacts, tmp_path):
    cases = [
        (["missing.onnx", "--check", "fp32.golden.npz"], "model file not found"),
        (["fp32.golden.npz", "--bench"], "unknown model extension"),
        (["fp32.onnx", "--check", "missing.npz"], "golden file not found"),
        (["fp32.onnx", "--check", "fp32.manifest.json"], "not a cpsl golden file"),
        (["fp32.onnx"], "nothing to do"),
    ]
    for args, msg in cases:
        r = runner(artefacts, *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], (args, r.stderr)
    # a .plan without TensorRT: a clear line, not a traceback
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"\0" * 16)
    r = runner(artefacts, plan, "--bench")
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def _golden_with(artefacts, tmp_path, name, **meta_changes):
    z = dict(np.load(artefacts / "fp32.golden.npz"))
    meta = json.loads(str(z["meta"]))
    meta.update(meta_changes)
    z["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / name, **z)
    return tmp_path / name


@pytest.mark.parametrize("change,needle", [
    ({"n_batches": 0}, "n_batches"),                       # a check over nothing must not pass
    ({"n_batches": "3"}, "n_batches"),
    ({"tolerance": {"atol": float("inf")}}, "atol"),       # nor one that accepts anything
    ({"tolerance": {"rtol": 1e308}}, "rtol"),
    ({"tolerance": [1]}, "atol"),
    ({"inputs": "text"}, "inputs"),
    ({"inputs": []}, "inputs"),
])
def test_golden_meta_of_the_wrong_kind_is_refused(artefacts, tmp_path, change, needle):
    bad = _golden_with(artefacts, tmp_path, "g.npz", **change)
    r = runner(artefacts, "fp32.onnx", "--check", bad, "--threads", "1")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
    assert "check passed" not in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--check", "fp32.golden.npz", "--atol", "inf"], "atol"),
    (["--check", "fp32.golden.npz", "--json", "."], "is a folder"),
    (["--check", "fp32.golden.npz", "--json", "/dev/full"], "pipe or device"),
    (["--bench", "--batch", "100000000", "--iters", "1"], "CPSL_MAX_ARRAY_BYTES"),
    (["--bench", "--batch", "1", "--len", "1000000000", "--iters", "1"], "CPSL_MAX_ARRAY_BYTES"),
    (["--bench", "--iters", "1000000000000"], "--iters"),
])
def test_runner_bad_values_and_outputs(artefacts, args, needle):
    r = runner(artefacts, "fp32.onnx", "--threads", "1", *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr


def test_malformed_manifest_profile_is_one_line(artefacts, tmp_path):
    import shutil
    shutil.copy(artefacts / "fp32.onnx", tmp_path / "m.onnx")
    man = json.loads((artefacts / "fp32.manifest.json").read_text())
    man["engine_profile"] = {m: {"opt": "x"} for m in man["modalities"]}
    (tmp_path / "m.manifest.json").write_text(json.dumps(man))
    r = runner(artefacts, tmp_path / "m.onnx", "--bench", "--iters", "1", "--threads", "1")
    assert r.returncode == 2 and "engine_profile" in r.stderr and "Traceback" not in r.stderr, r.stderr


def _predict(root: Path, *args):
    env = {"PYTHONPATH": str(root / "notorch"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
           "LC_ALL": "C.UTF-8"}
    return subprocess.run([sys.executable, str(RUNNER), "predict", *args], capture_output=True, env=env, cwd=root,
                          timeout=120)


@pytest.mark.parametrize("tok,needle", [
    ({"file": "../outside.json", "max_length": 16}, "only from a plain file beside the model"),
    ({"file": "/etc/hostname", "max_length": 16}, "only from a plain file beside the model"),
    ({"file": "t.json", "max_length": "16"}, "max_length"),
    ("t.json", "'tokenizer' must"),
])
def test_predict_reads_a_tokenizer_only_beside_the_model(artefacts, tmp_path, tok, needle):
    import shutil
    shutil.copy(artefacts / "fp32.onnx", tmp_path / "m.onnx")
    (tmp_path.parent / "outside.json").write_text("{}")
    man = {"graph": "tokens", "tokenizer": tok, "modalities": ["text"], "dims": {"text": 8}}
    (tmp_path / "m.manifest.json").write_text(json.dumps(man))
    r = _predict(artefacts, "--model", str(tmp_path / "m.onnx"), "--text", "good")
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error:") and needle in err[0], r.stderr


def test_predict_refuses_non_utf8_text(artefacts):
    r = _predict(artefacts, "--model", "fp32.onnx", "--text", b"caf\xe9 \xff")
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and "not valid UTF-8" in err[0], r.stderr
