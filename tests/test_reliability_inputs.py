"""Regression tests for issue 29 (reliability): files cpsl did not write are never deleted or
replaced (run manifest, lock), bad paths and absurd values end in one line, odd arrays are refused
rather than converted, undefined metrics say why, a resume past the epochs says so."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # --import-mode=importlib: find helpers_cli
from helpers_cli import TRAIN_ARGS as TRAIN  # noqa: E402
from helpers_cli import cli, one_error_line, tiny_dataset, train_tiny, write_pickle  # noqa: E402


@pytest.fixture(scope="module")
def pkl(tmp_path_factory):
    return write_pickle(tmp_path_factory.mktemp("rel29") / "tiny.pkl", tiny_dataset())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, pkl):
    return train_tiny(tmp_path_factory.mktemp("ck29") / "run", pkl)


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("layout", [
    {"seed1/log.jsonl": b"mine", "seed1/notes.txt": b"n", "seed1/data.csv": b"1,2"},   # a user's seed* folder
    {"config.json": b'{"my": "own config"}'},                                      # a user's config.json
])
@pytest.mark.parametrize("flag", [[], ["--overwrite"]])
def test_files_cpsl_did_not_write_are_never_replaced(pkl, tmp_path, layout, flag):
    out = tmp_path / "user"
    for name, data in layout.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    before = _tree(out)
    one_error_line(cli("train", "--data", pkl, "--out", out, "--epochs", "1", *TRAIN, *flag), "cpsl-run.json")
    assert _tree(out) == before


def test_overwrite_deletes_only_what_the_manifest_lists(pkl, tmp_path):
    out = tmp_path / "run"
    assert cli("train", "--data", pkl, "--out", out, "--epochs", "1", *TRAIN).exit_code == 0
    man = json.loads((out / "cpsl-run.json").read_text())
    assert man["format"] == "cpsl-run-1" and "seed1/best.pt" in man["files"]
    (out / "notes.txt").write_text("mine")                                 # beside the run: kept
    (out / "seed1" / "mine.txt").write_text("mine")                        # inside a run folder: refused by name
    one_error_line(cli("train", "--data", pkl, "--out", out, "--epochs", "1", *TRAIN, "--overwrite"),
                   "seed1/mine.txt")
    assert (out / "seed1" / "best.pt").is_file() and (out / "seed1" / "mine.txt").read_text() == "mine"
    (out / "seed1" / "mine.txt").unlink()
    assert cli("train", "--data", pkl, "--out", out, "--epochs", "1", *TRAIN, "--overwrite").exit_code == 0
    assert (out / "notes.txt").read_text() == "mine"


def test_symlinked_seed_folder_is_refused(pkl, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    out = tmp_path / "run"
    out.mkdir()
    (out / "seed1").symlink_to(target)
    one_error_line(cli("train", "--data", pkl, "--out", out, "--epochs", "1", *TRAIN), "seed1")
    out2 = tmp_path / "run2"
    assert cli("train", "--data", pkl, "--out", out2, "--epochs", "1", *TRAIN).exit_code == 0
    import shutil
    shutil.rmtree(out2 / "seed1")
    (out2 / "seed1").symlink_to(target)
    one_error_line(cli("train", "--data", pkl, "--out", out2, "--epochs", "1", *TRAIN, "--overwrite"), "seed1")
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


def test_a_second_process_on_the_same_out_is_refused(pkl, tmp_path):
    import fcntl
    import os
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".cpsl-lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)                 # what a running `cpsl train` holds
    try:
        one_error_line(cli("train", "--data", pkl, "--out", out, "--epochs", "1", *TRAIN), "in use by another")
    finally:
        os.close(fd)
    assert cli("train", "--data", pkl, "--out", out, "--epochs", "1", *TRAIN).exit_code == 0


def test_two_concurrent_trains_one_refused(pkl, tmp_path):
    """Two real processes started together on one --out: one runs, the other is refused (by the lock while
    the first runs, or as a folder holding a run once it has finished); never two runs mixed in one folder."""
    import os
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cpsl", "train", "--data", str(pkl), "--out", str(tmp_path / "run"), "--epochs", "2",
           *TRAIN]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    err = next(e for p, (_, e) in zip(procs, outs) if p.returncode == 2)
    assert err.startswith("error:") and ("in use by another" in err or "already holds a run" in err), err


@pytest.fixture
def fifo(tmp_path):
    import os
    p = tmp_path / "fifo.pkl"
    os.mkfifo(p)
    return p


def test_bad_paths_one_line(pkl, ckpt, tmp_path, fifo):
    long = tmp_path / ("x" * 300)
    cases = [
        (["data", "info", fifo], "not a regular file"),                     # used to hang
        (["train", "--data", fifo, "--out", tmp_path / "o1", "--epochs", "1", *TRAIN], "not a regular file"),
        (["eval", "--ckpt", fifo, "--data", pkl], "not a file"),
        (["data", "info", f"{long}.pkl"], "File name too long"),
        (["train", "--data", pkl, "--out", long / "x", "--epochs", "1", *TRAIN], "File name too long"),
        (["data", "synth", "--out", "/dev/full", "--sizes", "20,10,5"], "a pipe or device"),
        (["eval", "--ckpt", ckpt, "--data", pkl, "--out", "/dev/full"], "a pipe or device"),
        (["data", "synth", "--out", fifo, "--sizes", "20,10,5"], "a pipe or device"),        # used to hang
        (["train", "--data", pkl, "--out", pkl, "--epochs", "1", *TRAIN], "is a file"),
    ]
    for args, needle in cases:
        one_error_line(cli(*args), needle)


@pytest.mark.parametrize("args,needle", [
    (["--seeds", "4294967296"], "train.seeds"),
    (["--data", "synth:-1"], "synth:SEED"),
    (["--set", "model.max_len=1000000000"], "model.max_len"),
    (["--set", "model.d=1048576", "--set", "model.heads=1"], "model.d"),
    (["--set", "model.max_len=10000000", "--set", "model.d=4096", "--set", "model.heads=1"], "CPSL_MAX_ARRAY_BYTES"),
    (["--set", "train.num_threads=100000000"], "train.num_threads"),            # used to crash the process
    (["--data", "synth", "--set", "data.synth={n_train: 100000000, d_text: 1000}"], "CPSL_MAX_ARRAY_BYTES"),
    (["--set", "groups.prefixes={video: [encoders.text.]}"], "groups.prefixes"),
    (["--set", "cp.groups={text: [nosuch.]}"], "groups.prefixes.text"),   # the old key still loads
])
def test_absurd_or_wrong_values_one_line(pkl, tmp_path, args, needle):
    data = [] if "--data" in args else ["--data", pkl]
    one_error_line(cli("train", *data, "--out", tmp_path / "o", "--epochs", "1", *TRAIN, *args), needle)


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s.__setitem__("id", np.array([None] * 12, dtype=object)), "object array holding something other than"),
    (lambda s: s.__setitem__("id", s["id"].reshape(6, 2)), "1-D array"),
    (lambda s: s.__setitem__("id", {"a": 1}), "1-D array"),
    (lambda s: s.__setitem__("audio_lengths", np.ones(12, bool)), "booleans"),
    (lambda s: s.__setitem__("audio", s["audio"].astype(object)), "not a numeric array"),
])
def test_odd_arrays_refused_not_converted(tmp_path, edit, needle):
    raw = tiny_dataset()
    edit(raw["valid"])
    one_error_line(cli("data", "info", write_pickle(tmp_path / "odd.pkl", raw)), needle)


def test_undefined_metrics_say_why(tmp_path):
    raw = tiny_dataset()
    raw["valid"]["regression_labels"][:] = 0.4                           # constant labels
    res = cli("train", "--data", write_pickle(tmp_path / "c.pkl", raw), "--out", tmp_path / "o", "--epochs", "1",
              *TRAIN)
    assert res.exit_code == 0 and "Corr is undefined: the labels are constant" in res.output, res.output
    r = json.loads((tmp_path / "o" / "results.json").read_text())
    assert "labels are constant" in r["valid_undefined"]["1"]["Corr"]
    assert "test_undefined" not in r


def test_resume_past_the_epochs_says_so(pkl, tmp_path):
    out = tmp_path / "run"
    assert cli("train", "--data", pkl, "--out", out, "--epochs", "3", *TRAIN).exit_code == 0
    one_error_line(cli("train", "--data", pkl, "--out", out, "--epochs", "1", "--resume", *TRAIN),
                   "past train.epochs=1")


def test_pipe_outputs_refused_not_blocking(ckpt, pkl, tmp_path, fifo):
    """export and compare used to block forever writing into a FIFO given as their output."""
    pytest.importorskip("onnxruntime")
    import os
    onnx = tmp_path / "m.onnx"
    os.mkfifo(onnx)
    one_error_line(cli("export", "--ckpt", ckpt, "--onnx", onnx, "--data", pkl, "--quiet"), "a pipe or device")
    run = ckpt.parent.parent
    one_error_line(cli("compare", f"a={run}", f"b={run}", "--out", fifo), "a pipe or device")
