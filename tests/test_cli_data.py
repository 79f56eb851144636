"""The ``cpsl`` command line: help, info, data synth/info, and one-line errors (exit 2) on bad input."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cpsl.cli import main
from cpsl.native_info import extension_info

REPO = Path(__file__).resolve().parents[1]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _cpsl_cmd() -> list[str]:
    """The installed console script (beside this Python, else on PATH), else ``python -m cpsl``."""
    exe = Path(sys.executable).parent / "cpsl"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("cpsl")
    return [found] if found else [sys.executable, "-m", "cpsl"]


def run_cpsl(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(_cpsl_cmd() + [str(a) for a in args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def assert_one_line_error(stderr: str, stdout: str = "", needle: str = ""):
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr + stdout
    assert needle in lines[0], (needle, lines[0])


# --------------------------------------------------------------------------- help / info

def test_help_lists_commands():
    r = cli("--help")
    assert r.exit_code == 0
    for word in ("info", "data", "Usage"):
        assert word in r.stdout
    r = cli("data", "--help")
    assert r.exit_code == 0 and "synth" in r.stdout and "info" in r.stdout


def test_info_shows_extension_build():
    r = cli("info")
    assert r.exit_code == 0, r.output
    ext = extension_info()
    assert "extension:" in r.stdout and "torch:" in r.stdout
    for k, v in ext.items():
        assert f"  {k}: {v}" in r.stdout
    j = json.loads(cli("info", "--json").stdout)
    assert j["extension"] == ext
    assert j["cpsl"] == __import__("cpsl").__version__


# ------------------------------------------------------------------------------- data

def test_synth_then_info(tmp_path):
    out = tmp_path / "s.pkl"
    r = cli("data", "synth", "--out", out, "--sizes", "50,20,30", "--seed", "3")
    assert r.exit_code == 0, r.output
    assert "50/20/30" in r.stdout and out.is_file()
    side = json.loads(Path(str(out) + ".json").read_text())
    assert side["sizes"] == {"train": 50, "valid": 20, "test": 30} and side["spec"]["seed"] == 3

    r = cli("data", "info", out)
    assert r.exit_code == 0, r.output
    assert "modalities text, audio, vision" in r.stdout
    for name, n in (("train", 50), ("valid", 20), ("test", 30)):
        assert f"{name:5s} n={n:5d}" in r.stdout
    for m in ("text", "audio", "vision"):
        assert r.stdout.count(f"        {m}") == 3

    j = json.loads(cli("data", "info", out, "--json").stdout)
    assert j["modalities"] == ["text", "audio", "vision"]
    assert {k: v["n"] for k, v in j["splits"].items()} == {"train": 50, "valid": 20, "test": 30}
    assert j["splits"]["train"]["modalities"]["text"]["shape"][0] == 50


def test_synth_knobs(tmp_path):
    out = tmp_path / "k.pkl"
    r = cli("data", "synth", "--out", out, "--sizes", "10,5,5", "--set", "d_text=12",
            "--set", "audio_len=3,4", "--imbalance", "2.5")
    assert r.exit_code == 0, r.output
    with open(out, "rb") as f:
        raw = pickle.load(f)
    assert raw["train"]["text"].shape[2] == 12
    assert set(np.unique(raw["train"]["audio_lengths"])) <= {3, 4}
    spec = json.loads(Path(str(out) + ".json").read_text())["spec"]
    assert spec["imbalance"] == 2.5 and spec["d_text"] == 12


def test_default_sizes(tmp_path):
    r = cli("data", "synth", "--out", tmp_path / "d.pkl")
    assert r.exit_code == 0, r.output
    assert "1284/229/686" in r.stdout
    r = cli("data", "info", "synth")
    assert r.exit_code == 0, r.output
    for name, n in (("train", 1284), ("valid", 229), ("test", 686)):
        assert f"{name:5s} n={n:5d}" in r.stdout


def test_info_reports_cleaned_values(tiny_raw, tiny_mmsa):
    raw = tiny_raw()
    raw["train"]["audio"][0, 0, :3] = -np.inf
    r = cli("data", "info", tiny_mmsa(raw))
    assert r.exit_code == 0, r.output
    assert "3 non-finite values replaced by 0" in r.stdout


# ------------------------------------------------------------------------- bad input

def _write(tmp_path, obj, name="bad.pkl"):
    p = tmp_path / name
    with open(p, "wb") as f:
        pickle.dump(obj, f)
    return p


def _case(tmp_path, tiny_raw, kind):
    raw = tiny_raw()
    if kind == "missing file":
        return ["data", "info", tmp_path / "nope.pkl"], "not found"
    if kind == "not a pickle":
        p = tmp_path / "text.pkl"
        p.write_text("hello\n")
        return ["data", "info", p], "not a readable pickle"
    if kind == "pickle of a list":
        return ["data", "info", _write(tmp_path, [1, 2, 3])], "expected a dict of splits, got list"
    if kind == "missing split":
        del raw["valid"]
        return ["data", "info", _write(tmp_path, raw)], "missing split(s) valid"
    if kind == "missing key":
        del raw["test"]["raw_text"]
        return ["data", "info", _write(tmp_path, raw)], "has no key 'raw_text'"
    if kind == "count mismatch":
        raw["train"]["vision"] = raw["train"]["vision"][:3]
        return ["data", "info", _write(tmp_path, raw)], "train/vision has 3 samples"
    if kind == "shape mismatch":
        raw["train"]["audio"] = np.zeros(6, np.float32)
        return ["data", "info", _write(tmp_path, raw)], "must have shape (N, L, d)"
    if kind == "labels outside":
        raw["valid"]["regression_labels"][2] = -4.0
        return ["data", "info", _write(tmp_path, raw)], "outside [-3, 3]"
    if kind == "unknown knob":
        return ["data", "synth", "--out", tmp_path / "x.pkl", "--set", "bogus=1"], "unknown synthetic knob 'bogus'"
    if kind == "bad knob value":
        return ["data", "synth", "--out", tmp_path / "x.pkl", "--set", "d_text=wide"], "d_text"
    if kind == "bad sizes":
        return ["data", "synth", "--out", tmp_path / "x.pkl", "--sizes", "10,20"], "--sizes"
    raise AssertionError(kind)


BAD = ["missing file", "not a pickle", "pickle of a list", "missing split", "missing key",
       "count mismatch", "shape mismatch", "labels outside", "unknown knob", "bad knob value", "bad sizes"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_one_line_exit_2(kind, tmp_path, tiny_raw):
    args, needle = _case(tmp_path, tiny_raw, kind)
    r = cli(*args)
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert r.stdout == ""
    assert_one_line_error(r.stderr, r.stdout, needle)
    assert not (tmp_path / "x.pkl").exists()


# ------------------------------------------------------------------ the real console script

def test_console_script_end_to_end(tmp_path, tiny_raw):
    r = run_cpsl("--help")
    assert r.returncode == 0 and "data" in r.stdout, r.stderr
    r = run_cpsl("data", "synth", "--out", "s.pkl", "--sizes", "50,20,30", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cpsl("data", "info", "s.pkl", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "modalities text, audio, vision" in r.stdout
    assert "train n=   50" in r.stdout and "valid n=   20" in r.stdout and "test  n=   30" in r.stdout
    args, needle = _case(tmp_path, tiny_raw, "labels outside")
    r = run_cpsl(*args)
    assert r.returncode == 2
    assert r.stdout == ""
    assert_one_line_error(r.stderr, r.stdout, needle)


def test_python_dash_m(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "cpsl", "data", "info", tmp_path / "nope.pkl"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert_one_line_error(r.stderr, r.stdout, "not found")
