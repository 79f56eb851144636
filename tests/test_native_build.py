"""Build and GPU-check tooling of the native core, checked without a GPU: the aarch64
cross-compile, the GPU script's test collection (pytest + torch only), its time budget,
and the sanitizer driver."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("hypothesis", "click", "yaml", "sklearn", "scipy", "pandas", "matplotlib", "tqdm")


def _env(**extra):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update(extra)
    return env


def test_gpu_check_collects_cuda_tests_with_pytest_and_torch_only(tmp_path):
    """The GPU machine may lack every test extra: with them unimportable, the CUDA tests
    are still collected (all of them, >= MIN_CUDA_TESTS)."""
    for m in BLOCKED:
        (tmp_path / m).mkdir()
        (tmp_path / m / "__init__.py").write_text(f"raise ImportError('{m} is blocked by the test')\n")
    r = subprocess.run(["bash", "bench/gpu_check.sh", "collect"], cwd=ROOT, capture_output=True, text=True,
                       env=_env(PYTHONPATH=str(tmp_path)), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith("collected "))
    n, need = int(line.split()[1]), int(line.split(">= ")[1].rstrip(")"))
    assert n >= need >= 19


def test_gpu_check_stops_at_its_budget(tmp_path):
    """With no budget left every step is skipped and reported, and the call fails fast."""
    r = subprocess.run(["bash", "bench/gpu_check.sh", "check", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, env=_env(BUDGET_S="0"), timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    summary = (tmp_path / "summary_check.txt").read_text()
    for name in ("preflight", "install", "pytest-cuda", "pytest-count"):
        assert f"FAILED  {name} (no time left)" in summary
    assert "FAILED  memcheck (no time left)" in summary  # the sanitizers are listed too
    bad = subprocess.run(["bash", "bench/gpu_check.sh", "nonsense"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: usage")
    if not (ROOT / "build" / "gpu_check_passed").exists():  # no check passed on this machine: no bench
        r = subprocess.run(["bash", "bench/gpu_check.sh", "bench", str(tmp_path / "b")], cwd=ROOT,
                           capture_output=True, text=True, env=_env(), timeout=60)
        assert r.returncode == 2 and r.stderr.startswith("error: no passing 'check'"), r.stdout + r.stderr


_FAKE_SANITIZER = """#!/bin/sh
# stands in for compute-sanitizer: $FAKE_SAY, then exit $FAKE_RC (a kernel filter it 'does not know' when asked)
case "$*" in *kernel-name*) [ -n "$FAKE_NO_FILTER" ] && { echo "Unrecognized option --kernel-name"; exit 1; } ;; esac
echo "$*" >> "$FAKE_CALLS"
echo "$FAKE_SAY"
exit "$FAKE_RC"
"""


def _sanitizers(tmp_path, say, rc, no_filter=""):
    """bench/gpu_sanitizers.sh on its own, with a fake compute-sanitizer and nvidia-smi on PATH."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "compute-sanitizer").write_text(_FAKE_SANITIZER)
    (bin_ / "nvidia-smi").write_text("#!/bin/sh\necho Default\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    script = ('log() { echo "$@"; }; left_s() { echo 300; }; FAILED=(); SUMMARY="$OUTDIR/summary.txt"; '
              ': > "$SUMMARY"; source bench/gpu_sanitizers.sh; sanitizers; echo "failed: ${FAILED[*]}"')
    env = _env(PATH=f"{bin_}:/usr/bin:/bin", OUTDIR=str(tmp_path), PY=sys.executable, FAKE_SAY=say,
               FAKE_RC=str(rc), FAKE_CALLS=str(tmp_path / "calls"), FAKE_NO_FILTER=no_filter, SAN_PARALLEL="1")
    r = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return (tmp_path / "summary.txt").read_text(), r.stdout


def test_sanitizers_are_na_where_the_device_is_unsupported(tmp_path):
    """'Device not supported' is N/A (listed, not a failure); a clean run needs the tool's
    'ERROR SUMMARY: 0 errors'; a tool without the kernel filter is rerun without it."""
    summary, out = _sanitizers(tmp_path / "a", "========= Error: Device not supported", 1)
    assert summary.count("N/A") == 3 and "failed: \n" in out, summary
    summary, out = _sanitizers(tmp_path / "b", "========= ERROR SUMMARY: 0 errors", 0, no_filter="1")
    assert [l.split()[0] for l in summary.splitlines()] == ["ok"] * 3, summary
    assert "retrying without it" in out and "kernel-name" not in (tmp_path / "b" / "calls").read_text()
    summary, out = _sanitizers(tmp_path / "c", "nothing checked", 0)
    assert summary.count("FAILED") == 3 and "did the tool check anything" in summary
    assert "--kernel-name kns=cpsl" in (tmp_path / "c" / "calls").read_text()


def test_sanitizer_driver_runs_on_cpu():
    r = subprocess.run([sys.executable, "bench/cuda_driver.py", "--device", "cpu"], cwd=ROOT, capture_output=True,
                       text=True, env=_env(), timeout=300)
    assert r.returncode == 0 and "driver ok (cpu" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="no aarch64 cross compiler (apt-get install -y g++-aarch64-linux-gnu)")
def test_csrc_cross_compiles_for_aarch64():
    r = subprocess.run(["bash", "scripts/check_aarch64.sh"], cwd=ROOT, capture_output=True, text=True,
                       env=_env(), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "aarch64 OpenMP off: AArch64" in r.stdout and "aarch64 OpenMP on: AArch64" in r.stdout


def _cmake_configure(tmp_path, **env):
    pybind11 = pytest.importorskip("pybind11", reason="pybind11 (its CMake config) is not installed")
    r = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), f"-DPython_EXECUTABLE={sys.executable}",
                        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"], capture_output=True, text=True,
                       env=_env(**env), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None or not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()),
                    reason="needs cmake and nvcc")
def test_cmake_cuda_archs_option(tmp_path):
    """CPSL_CUDA_ARCHS picks the targets (e.g. Orin only); without it a default this nvcc can build."""
    out = _cmake_configure(tmp_path / "orin", CPSL_CUDA_ARCHS="87")
    assert "cpsl._C: CUDA architectures 87\n" in out and "CUDA path ON" in out
    out = _cmake_configure(tmp_path / "default", CPSL_CUDA_ARCHS="")
    line = next(l for l in out.splitlines() if "CUDA architectures" in l)
    assert "87-real" in line and "75-real" in line
