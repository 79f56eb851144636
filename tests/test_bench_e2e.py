"""bench/run.py --e2e: its input errors and the summary's checks. The measured run itself needs the
data pack and MiniLM fine-tuning (minutes): its output is committed under bench/results/e2e_quick."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "bench" / "run.py"


def _run(tmp_path, *args):
    return subprocess.run([sys.executable, str(RUN), "--e2e", "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"),
                           *args], capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin",
                           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})


def test_missing_data_pack_is_one_error_line(tmp_path):
    r = _run(tmp_path, "--data-dir", str(tmp_path / "nowhere"), "--quick")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "mosi" in r.stderr
    assert "Traceback" not in r.stderr


def _row(L, p, b1, b32, b1_2, b32_2, acc, mae, mb=10.0):
    lat = lambda v: {"total": {"p50_ms": v, "p90_ms": v, "p99_ms": v}, "tokenize": {"p50_ms": 0.1}}  # noqa: E731
    return {"layers": L, "precision": p, "bytes": int(mb * 1e6), "metrics": {"Non0_acc_2": acc, "MAE": mae},
            "retention_vs_teacher_fp32": {"Non0_acc_2": acc / 0.8, "MAE_increase_rel": mae / 0.9 - 1},
            "latency": {"t1_b1": lat(b1), "t1_b32": lat(b32), "t2_b1": lat(b1_2), "t2_b32": lat(b32_2)}}


def test_summary_checks_follow_the_measured_values():
    sys.path.insert(0, str(REPO / "bench"))
    from benchkit.e2e_report import summarize
    teacher = {"Non0_acc_2": 0.8, "MAE": 0.9}
    good = [_row(2, "int8", 3.0, 80, 2.5, 60, 0.79, 0.925, 19.4), _row(2, "fp32", 3.5, 120, 3.0, 90, 0.8, 0.92, 66.3)]
    s = summarize(good, 2, teacher)
    assert all(s["checks"].values()) and s["e2e_int8_b1_p50_ms"] == 3.0 and s["e2e_int8_mb"] == 19.4
    bad = [_row(2, "int8", 4.5, 130, 5.0, 140, 0.77, 0.96, 20.1), _row(2, "fp32", 3.5, 120, 3.0, 90, 0.8, 0.9)]
    c = summarize(bad, 2, teacher)["checks"]
    assert not any(c.values()), c
