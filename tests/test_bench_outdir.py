"""Bench scripts write to a scratch folder unless --out is given, and never over committed results
without --overwrite (bench/benchkit/outdir.py, used by bench/run.py, bench/mosi.py, bench/distributed.py)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def outdir(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from benchkit import outdir
    return outdir


def test_default_is_the_scratch_folder(outdir):
    assert outdir.output_dir(None, "cpu_quick") == outdir.SCRATCH / "cpu_quick"
    assert outdir.SCRATCH.parts[-2:] == ("runs", "bench")


def test_a_committed_results_folder_is_refused_unless_overwrite(outdir, tmp_path):
    committed = REPO / "bench" / "results" / "cpu_quick"
    assert any(committed.iterdir())
    from benchkit.errors import BenchError
    with pytest.raises(BenchError, match="committed results"):
        outdir.output_dir(committed, "x")
    assert outdir.output_dir(committed, "x", overwrite=True) == committed
    assert outdir.output_dir(tmp_path / "mine", "x") == tmp_path / "mine"             # elsewhere: as given


def test_bench_run_refuses_before_any_work():
    r = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out",
                        str(REPO / "bench" / "results" / "cpu_quick")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ") \
        and "committed results" in r.stderr
