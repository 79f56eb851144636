"""No code runs from data files, checkpoints or generated scripts (issue 18, security).

Each malicious file carries an object whose unpickling would call ``os.system('touch MARKER')``;
every command that reads it must refuse it (exit 2, one ``error:`` line naming the problem) and
the marker must never appear.
"""
from __future__ import annotations

import sys
from pathlib import Path
import pickle
import subprocess

import pytest
import torch

from cpsl.checkpoint import read_checkpoint, save_checkpoint
from cpsl.config import preset
from cpsl.data.mmsa import load_mmsa
from cpsl.errors import CPSLError
from cpsl.model import CPSLModel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # --import-mode=importlib: find helpers_cli
from helpers_cli import Payload, cli, one_error_line, tiny_dataset, write_pickle  # noqa: E402

torch.set_num_threads(1)
DIMS = {"text": 6, "audio": 4, "vision": 5}


@pytest.fixture
def files(tmp_path):
    """(good.pkl, evil.pkl, good.pt, evil.pt, marker): the evil ones are valid files plus a payload."""
    marker = tmp_path / "PWNED"
    raw = tiny_dataset()
    good_pkl = write_pickle(tmp_path / "good.pkl", raw)
    evil = dict(raw)
    evil["train"] = dict(raw["train"], note=Payload(marker))      # deep inside, like a real attack
    evil_pkl = write_pickle(tmp_path / "evil.pkl", evil)
    cfg = preset("student")
    torch.manual_seed(0)
    model = CPSLModel(DIMS, cfg.model)
    good_pt = tmp_path / "good.pt"
    save_checkpoint(good_pt, model, None, cfg, 0, {"data_path": str(good_pkl)})
    ck = torch.load(good_pt, weights_only=True)
    ck["extra"] = Payload(marker)
    evil_pt = tmp_path / "evil.pt"
    torch.save(ck, evil_pt)
    return good_pkl, evil_pkl, good_pt, evil_pt, marker


def test_payload_really_runs_under_plain_pickle(files):
    """The test payload is real: plain pickle.load creates the marker (so its absence below means something)."""
    _, evil_pkl, _, _, marker = files
    with open(evil_pkl, "rb") as f:
        pickle.load(f)
    assert marker.exists()


PKL_COMMANDS = {
    "data info": lambda g, e, ck, o: ["data", "info", e],
    "train": lambda g, e, ck, o: ["train", "--data", e, "--out", o, "--quiet", "--epochs", "1", "--preset", "student"],
    "eval": lambda g, e, ck, o: ["eval", "--ckpt", ck, "--data", e],
    "export": lambda g, e, ck, o: ["export", "--ckpt", ck, "--onnx", o / "m.onnx", "--data", e, "--quiet"],
    "distill": lambda g, e, ck, o: ["distill", "--teacher", ck, "--data", e, "--out", o, "--quiet", "--epochs", "1"],
    "ablate": lambda g, e, ck, o: ["ablate", "--data", e, "--out", o, "--quiet", "--epochs", "1", "--seeds", "1",
                                   "--variants", "full"],
}


@pytest.mark.parametrize("command", list(PKL_COMMANDS))
def test_malicious_pkl_refused_by_every_command(files, tmp_path, command):
    good_pkl, evil_pkl, good_pt, _, marker = files
    if command == "export":
        pytest.importorskip("onnxruntime")
    res = cli(*PKL_COMMANDS[command](good_pkl, evil_pkl, good_pt, tmp_path / "out"))
    line = one_error_line(res, "posix.system", "refusing")
    assert "--trust-pickle" in line
    assert not marker.exists()


PT_COMMANDS = {
    "eval --ckpt": lambda g, ck, o: ["eval", "--ckpt", ck, "--data", g],
    "export --ckpt": lambda g, ck, o: ["export", "--ckpt", ck, "--onnx", o / "m.onnx", "--data", g, "--quiet"],
    "distill --teacher": lambda g, ck, o: ["distill", "--teacher", ck, "--data", g, "--out", o, "--quiet"],
}


@pytest.mark.parametrize("command", list(PT_COMMANDS))
def test_malicious_checkpoint_refused_by_every_command(files, tmp_path, command):
    good_pkl, _, _, evil_pt, marker = files
    if command == "export --ckpt":
        pytest.importorskip("onnxruntime")
    res = cli(*PT_COMMANDS[command](good_pkl, evil_pt, tmp_path / "out"))
    one_error_line(res, "refusing to load it")
    assert not marker.exists()


def test_malicious_last_pt_refused_by_resume(files, tmp_path):
    good_pkl, _, _, evil_pt, marker = files
    out = tmp_path / "run"
    (out / "seed1").mkdir(parents=True)
    (out / "seed1" / "last.pt").write_bytes(evil_pt.read_bytes())
    res = cli("train", "--data", good_pkl, "--out", out, "--resume", "--quiet", "--epochs", "1", "--preset", "student",
              "--set", "train.num_threads=1")
    one_error_line(res, "last.pt", "refusing to load it")
    assert not marker.exists()


def test_library_loaders_refuse_and_name_the_global(files):
    _, evil_pkl, _, evil_pt, marker = files
    with pytest.raises(CPSLError, match=r"posix\.system"):
        load_mmsa(evil_pkl)
    with pytest.raises(CPSLError, match=r"posix.system"):
        read_checkpoint(evil_pt)
    assert not marker.exists()


def test_trust_pickle_is_the_documented_unsafe_escape_hatch(files, tmp_path):
    """--trust-pickle reads with plain pickle: a file with a foreign (here harmless) class loads."""
    import collections
    raw = tiny_dataset()
    raw["train"] = collections.OrderedDict(raw["train"])          # not MMSA content: refused by default
    p = write_pickle(tmp_path / "od.pkl", raw)
    one_error_line(cli("data", "info", p), "collections.OrderedDict")
    res = cli("data", "info", p, "--trust-pickle")
    assert res.exit_code == 0, res.output
    help_text = cli("train", "--help").output
    assert "--trust-pickle" in help_text and "UNSAFE" in help_text


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_safe_reader_reads_every_numpy_pickle_protocol(tmp_path, protocol):
    raw = tiny_dataset()
    raw["train"]["raw_text"] = raw["train"]["raw_text"].astype(object)   # MMSA stores transcripts as objects
    p = tmp_path / f"p{protocol}.pkl"
    with open(p, "wb") as f:
        pickle.dump(raw, f, protocol=protocol)
    d = load_mmsa(p)
    assert d.dims == DIMS and len(d["train"]) == 24
    assert (d["train"].features["text"] == raw["train"]["text"]).all()


def test_old_format_checkpoint_loads_safely(tmp_path):
    """cpsl-ckpt-1 files (NumPy RNG state as arrays) are read through the weights-only loader."""
    import random

    import numpy as np

    from cpsl.checkpoint import load_model, set_rng_state
    cfg = preset("student")
    m = CPSLModel(DIMS, cfg.model)
    ck = {"format": "cpsl-ckpt-1", "config": cfg.to_dict(), "modalities": list(DIMS), "dims": DIMS,
          "model": m.state_dict(), "optimizer": None, "epoch": 0,
          "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
    torch.save(ck, tmp_path / "old.pt")
    ck["history"] = [{"epoch": 0, "valid": {"MAE": np.float64(0.5)}, "balance": np.array([0.25, 0.75])}]
    torch.save(ck, tmp_path / "old.pt")
    model, _, ck2 = load_model(tmp_path / "old.pt")
    set_rng_state(ck2["rng"])
    assert ck2["history"][0]["valid"]["MAE"] == 0.5 and type(ck2["history"][0]["valid"]["MAE"]) is float
    assert ck2["history"][0]["balance"] == [0.25, 0.75] and torch.is_tensor(ck2["rng"]["numpy"]["keys"])
    for k, v in m.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_build_engine_script_quotes_the_plan_name(tmp_path):
    """A plan name with quotes and $(...) stays data: running the script's echo prints it verbatim."""
    from cpsl.deploy.tensorrt import write_build_script
    evil = "x'; touch PWNED; echo '$(touch PWNED2).plan"
    prof = {"text": {"min": [1, 1, 4], "opt": [1, 2, 4], "max": [2, 3, 4]}}
    script = tmp_path / "b.sh"
    write_build_script(script, "m\n touch PWNED3 .onnx", evil, prof, "fp32")
    body = script.read_text()
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "trtexec").write_text("#!/bin/sh\nexit 0\n")
    (fake / "trtexec").chmod(0o755)
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path,
                       env={"PATH": f"{fake}:/usr/bin:/bin", "TRTEXEC": str(fake / "trtexec")})
    assert r.returncode == 0, r.stderr
    assert f"wrote {evil}" in r.stdout
    assert not any((tmp_path / n).exists() for n in ("PWNED", "PWNED2", "PWNED3")), body


# ---------------------------------------------------------------------------- issue 29: forged arrays, bombs
from forge import (CANONICALISED, FORGED_ARRAYS, deep_list, deep_tuple_key, in_split,  # noqa: E402
                   ndarray_call, shared_bomb)


@pytest.mark.parametrize("attack", list(FORGED_ARRAYS))
@pytest.mark.parametrize("command", ["data info", "train"])
def test_forged_numpy_arrays_refused(tmp_path, attack, command):
    """numpy.ndarray called directly, object arrays from bytes, shapes beyond their data, structured or
    sub-array dtypes: refused by the reader (before numpy builds them), never a crash or a load."""
    p = tmp_path / "forged.pkl"
    p.write_bytes(pickle.dumps(in_split(FORGED_ARRAYS[attack](), tiny_dataset()), protocol=2))
    args = ["data", "info", p] if command == "data info" else [
        "train", "--data", p, "--out", tmp_path / "o", "--quiet", "--epochs", "1", "--preset", "student"]
    one_error_line(cli(*args), "refusing to load it")
    assert not (tmp_path / "o").exists()


def test_forged_dtype_flags_never_reach_numpy(tmp_path):
    """A dtype's state (flags, fields) comes from the file; the reader rebuilds the dtype from its code."""
    import io

    from cpsl.data.safe_pickle import safe_load
    for make in CANONICALISED.values():
        got = safe_load(io.BytesIO(pickle.dumps({"x": make()}, protocol=2)))["x"]
        assert got.dtype == object and got.tolist() == ["a", "b"]


@pytest.mark.parametrize("blob,needle", [
    (deep_tuple_key(), "CPSL_MAX_PICKLE_DEPTH"),      # hashed by the unpickler: a C stack overflow before
    (deep_list(), "CPSL_MAX_PICKLE_DEPTH"),
    (shared_bomb(1000, 3), "CPSL_MAX_PICKLE_ITEMS"),  # 10^9 numbers once np.asarray expands the references
])
def test_pickle_bombs_refused_before_building(tmp_path, blob, needle):
    p = tmp_path / "bomb.pkl"
    p.write_bytes(blob)
    one_error_line(cli("data", "info", p), needle)


def test_pickle_limits_are_overridable(tmp_path, monkeypatch):
    from cpsl.data.safe_pickle import safe_load
    import io
    blob = deep_list(80)
    with pytest.raises(CPSLError, match="CPSL_MAX_PICKLE_DEPTH"):
        safe_load(io.BytesIO(blob))
    monkeypatch.setenv("CPSL_MAX_PICKLE_DEPTH", "200")
    assert isinstance(safe_load(io.BytesIO(blob)), list)
    monkeypatch.setenv("CPSL_MAX_ARRAY_BYTES", "1000")
    one_error_line(cli("data", "info", write_pickle(tmp_path / "g.pkl", tiny_dataset())), "CPSL_MAX_ARRAY_BYTES")


def _ckpt_with(files, tmp_path, name, **changes):
    ck = torch.load(files[2], weights_only=True)
    ck.update(changes)
    torch.save(ck, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("attack", ["object dtype from a buffer (pointers)", "declared shape far beyond its data",
                                    "structured dtype with an object field"])
def test_forged_arrays_in_a_checkpoint_refused(files, tmp_path, attack):
    pt = _ckpt_with(files, tmp_path, "f.pt", extra=FORGED_ARRAYS[attack]())
    one_error_line(cli("eval", "--ckpt", pt, "--data", files[0]), "refusing to load it")


def test_checkpoint_of_this_format_holds_no_numpy(files, tmp_path):
    import numpy as np
    pt = _ckpt_with(files, tmp_path, "n.pt", extra={"a": np.zeros(3)})
    one_error_line(cli("eval", "--ckpt", pt, "--data", files[0]), "NumPy object at /extra/a")


def test_deeply_nested_checkpoint_refused(files, tmp_path):
    import zipfile
    src = zipfile.ZipFile(files[2])
    with zipfile.ZipFile(tmp_path / "deep.pt", "w") as z:
        for n in src.namelist():
            z.writestr(n, deep_tuple_key() if n.endswith("data.pkl") else src.read(n))
    one_error_line(cli("eval", "--ckpt", tmp_path / "deep.pt", "--data", files[0]), "CPSL_MAX_PICKLE_DEPTH")


@pytest.mark.parametrize("rng", [
    {"numpy": ("MT19937", ndarray_call((624,), "u4", b"\0" * 16), 0, 0, 0.0)},   # forged array (ckpt-1 form)
    {"torch": [1, 2, 3]},                                                     # not a tensor
    {"python": (3, (2 ** 40,) * 625, None)},                                  # out of range
    {"numpy": {"kind": "MT19937", "keys": torch.zeros(3), "pos": 0, "has_gauss": 0, "gauss": 0.0}},
])
def test_forged_rng_state_refused_by_resume(files, tmp_path, rng):
    good_pkl, _, good_pt, _, _ = files
    out = tmp_path / "run"
    res = cli("train", "--data", good_pkl, "--out", out, "--quiet", "--epochs", "1", "--preset", "student",
              "--set", "train.num_threads=1")
    assert res.exit_code == 0, res.output
    ck = torch.load(out / "seed1" / "last.pt", weights_only=True)
    ck["rng"] = {**ck["rng"], **rng}
    if isinstance(rng.get("numpy"), tuple):
        ck["format"] = "cpsl-ckpt-1"
    torch.save(ck, out / "seed1" / "last.pt")
    res = cli("train", "--data", good_pkl, "--out", out, "--resume", "--quiet", "--epochs", "3", "--preset",
              "student", "--set", "train.num_threads=1")
    one_error_line(res)
