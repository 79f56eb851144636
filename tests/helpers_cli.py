"""Helpers for the reliability/security/fuzz tests: run a cpsl command in-process and check that
it either succeeded or failed the house way (exit 2, exactly one ``error:`` line, no traceback)."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from cpsl.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(res, *needles) -> str:
    """Exit 2, one ``error: ...`` line on stderr, no exception escaped; returns the line."""
    assert res.exception is None or isinstance(res.exception, SystemExit), (
        f"uncaught {type(res.exception).__name__}: {res.exception}\n{res.output}")
    assert res.exit_code == 2, f"exit {res.exit_code}\n{res.output}"
    err = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(err) == 1, res.stderr
    assert "Traceback" not in res.output
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def ok_or_one_error(res) -> None:
    """The fuzz oracle: exit 0, or the one-line failure."""
    if res.exit_code == 0 and res.exception is None:
        return
    one_error_line(res)


class Payload:
    """Unpickling this calls ``os.system('touch <marker>')``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_pickle(path: Path, obj) -> Path:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)
    return path


def tiny_dataset(seed: int = 0, n=(24, 12, 12), dims=(6, 4, 5), lens=(5, 7, 6)) -> dict:
    """A small MMSA dict (every modality with explicit lengths)."""
    rng = np.random.default_rng(seed)
    raw = {}
    for name, size in zip(("train", "valid", "test"), n):
        s = {}
        for m, d, L in zip(("text", "audio", "vision"), dims, lens):
            s[m] = rng.standard_normal((size, L, d)).astype(np.float32)
            s[f"{m}_lengths"] = rng.integers(1, L + 1, size).astype(np.int64)
        s["regression_labels"] = (np.round(rng.uniform(-3, 3, size) * 5) / 5).astype(np.float32)
        s["id"] = np.array([f"v{i // 3}$_${i}" for i in range(size)])
        s["raw_text"] = np.array([f"segment {i}" for i in range(size)])
        raw[name] = s
    return raw


TRAIN_ARGS = ["--preset", "student", "--quiet", "--set", "train.num_threads=1"]


def train_tiny(out: Path, pkl: Path, epochs: int = 1) -> Path:
    """A finished one-seed run of the student on ``pkl`` in ``out``; its ``seed1/best.pt``."""
    res = cli("train", "--data", pkl, "--out", out, "--epochs", epochs, *TRAIN_ARGS)
    assert res.exit_code == 0, res.output
    return Path(out) / "seed1" / "best.pt"
