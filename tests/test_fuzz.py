"""Fuzz suite (hypothesis): malformed MMSA dicts, pickle bytes, configs, overrides, CSVs and
checkpoints, fed to the commands that read them; and (issue 29) forged numpy arrays and deep or
shared nesting inside data files, resource-bomb configs, and hostile output paths (FIFOs, devices,
symlinks, user folders, too-long names). For every generated case the oracle is:

* exit 0, or exit 2 with exactly one ``error:`` line and no exception escaping (no traceback);
* no file written outside the case's own folder (and only ``--out`` paths inside it);
* nothing executed: some cases carry a pickled ``os.system('touch MARKER')`` payload, and the
  marker never appears.

Example counts are sized so the whole module takes about a minute on a 2-vCPU machine (the
generators that train or build cost most and run fewer cases; hypothesis is derandomized: the same
cases run every time; ``CPSL_FUZZ_SCALE=10`` runs ten times more). The module prints how many cases
ran (by kind and exit code).
"""
from __future__ import annotations

import copy
import dataclasses
import io
import math
import os
import pickle
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from cpsl.checkpoint import save_checkpoint
from cpsl.config import Config, preset, sections
from cpsl.model import CPSLModel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # --import-mode=importlib: find helpers_cli
from helpers_cli import Payload, cli, ok_or_one_error, tiny_dataset, write_pickle  # noqa: E402

hyp = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")
from hypothesis import HealthCheck, given, settings  # noqa: E402

torch.set_num_threads(1)
SCALE = float(os.environ.get("CPSL_FUZZ_SCALE", "1"))
CASES: Counter = Counter()
EXITS: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    """After the module: how many generated cases ran, by kind and exit code (in the terminal summary)."""
    yield
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is not None and capman is not None and CASES:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(CASES.items()))
        with capman.global_and_fixture_disabled():
            tr.write_line(f"\nfuzz cases run: {sum(CASES.values())} ({kinds}); exit codes {dict(sorted(EXITS.items()))}")


def fuzz(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


class Case:
    """A fresh folder per example; on exit: the marker is absent and nothing else appeared outside ``allowed``."""

    def __init__(self, kind: str):
        self.kind = kind

    def __enter__(self):
        self.td = tempfile.TemporaryDirectory(prefix="fuzz18-")
        self.root = Path(self.td.name)
        self.marker = self.root / "PWNED"
        self.cwd = self.root / "cwd"              # the command runs here: it must stay empty
        self.cwd.mkdir()
        self.old_cwd = os.getcwd()
        os.chdir(self.cwd)
        return self

    def check(self, res, inputs=(), allowed=()) -> None:
        ok_or_one_error(res)
        assert not self.marker.exists(), "a payload ran"
        keep = {Path(p).name for p in inputs} | {Path(p).name for p in allowed} | {"cwd"}
        stray = [p.name for p in self.root.iterdir() if p.name not in keep]
        assert not stray, f"files written outside --out: {stray}"
        assert not os.listdir(self.cwd), f"files written in the working folder: {os.listdir(self.cwd)}"
        CASES[self.kind] += 1
        EXITS[res.exit_code] += 1

    def __exit__(self, *exc):
        os.chdir(self.old_cwd)
        self.td.cleanup()
        return False


# ---------------------------------------------------------------------------- value pools
ODD = [None, 0, -1, 1, 2.5, float("nan"), float("inf"), -1e30, 1e30, "x", "", b"\x00", [], [1, "a"], {}, {"a": 1},
       True, (1, 2), np.float32(1.5), np.zeros(0), np.zeros((2, 0, 3), np.float32), np.array(["a", "b"]),
       np.full((3, 2), np.nan, np.float32), np.ones((24, 5, 6), np.float64), np.ones(24) * 7]
odd_values = st.sampled_from(range(len(ODD))).map(lambda i: copy.deepcopy(ODD[i]))
SPLITS = ["train", "valid", "test"]
KEYS = ["text", "audio", "vision", "text_lengths", "audio_lengths", "vision_lengths", "regression_labels", "id",
        "raw_text", "text_bert"]


@st.composite
def mmsa_dicts(draw):
    """A valid tiny MMSA dict with 1-4 mutations (drop / replace / reshape / payload / retype a split)."""
    raw = tiny_dataset(seed=draw(st.integers(0, 3)))
    payload = False
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["drop", "replace", "reshape", "scale", "payload", "split", "lengths"]))
        split = draw(st.sampled_from(SPLITS))
        key = draw(st.sampled_from(KEYS))
        s = raw.get(split)
        if not isinstance(s, dict):
            continue
        if op == "drop":
            s.pop(key, None)
        elif op == "replace":
            s[key] = draw(odd_values)
        elif op == "reshape" and isinstance(s.get(key), np.ndarray) and s[key].ndim >= 1:
            s[key] = s[key][: draw(st.integers(0, 30))]
        elif op == "scale" and key in ("text", "audio", "vision") and isinstance(s.get(key), np.ndarray) \
                and s[key].dtype.kind == "f":
            with np.errstate(over="ignore", invalid="ignore"):
                s[key] = (s[key] * draw(st.sampled_from([1e30, -1e38, 0.0, float("nan"), float("inf")]))).astype(np.float32)
        elif op == "payload":
            payload = True
        elif op == "split":
            raw[split] = draw(odd_values)
        elif op == "lengths" and key.endswith("_lengths"):
            s[key] = draw(st.lists(st.sampled_from([0, -3, 1, 2, 4.5, 1e9]), min_size=0, max_size=30)).copy()
    return raw, payload


@given(mmsa_dicts())
@fuzz(150)
def test_fuzz_mmsa_dicts_data_info(case):
    raw, payload = case
    with Case("mmsa dict -> data info") as c:
        if payload:
            raw["valid" if isinstance(raw.get("valid"), dict) else "x"] = {"p": Payload(c.marker)}
        p = write_pickle(c.root / "d.pkl", raw)
        c.check(cli("data", "info", p), inputs=[p])


@given(st.binary(max_size=400), st.integers(0, 3))
@fuzz(200)
def test_fuzz_pickle_bytes(blob, how):
    """Random bytes, or a valid file truncated / with random bytes spliced in."""
    good = pickle.dumps(tiny_dataset(n=(4, 3, 2)), protocol=[2, 3, 4, 5][how])
    data = [blob, good[: len(blob) % len(good)], good[:100] + blob + good[100 + len(blob):], blob + good][how]
    with Case("pickle bytes -> data info") as c:
        p = c.root / "d.pkl"
        p.write_bytes(data)
        c.check(cli("data", "info", p), inputs=[p])


SECTIONS = {name: [f.name for f in dataclasses.fields(obj)] for name, obj in sections(Config())}
config_keys = st.sampled_from([(s, k) for s, ks in SECTIONS.items() for k in ks] + [("nope", "x"), ("train", "nope")])
yaml_values = st.one_of(st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True, width=32),
                        st.sampled_from(["x", "", "cuda:0", "gpu", "1,2", "nan", "true", "l1", "[1, 2]", "{a: 1}"]),
                        st.lists(st.integers(-2, 3), max_size=3), st.none(), st.booleans())


@given(st.lists(st.tuples(config_keys, yaml_values), min_size=1, max_size=4), st.sampled_from([".yaml", ".json"]))
@fuzz(120)
def test_fuzz_config_files(items, suffix):
    import json

    import yaml
    d: dict = {}
    for (sec, k), v in items:
        d.setdefault(sec, {})[k] = v
    text = yaml.safe_dump(d) if suffix == ".yaml" else json.dumps(d, allow_nan=True)
    with Case("config file -> train") as c:
        cfg = c.root / f"c{suffix}"
        cfg.write_text(text)
        # a missing data file ends any run whose config is valid, before training
        res = cli("train", "--config", cfg, "--data", c.root / "missing.pkl", "--out", c.root / "out", "--quiet")
        c.check(res, inputs=[cfg], allowed=["out"])
        assert res.exit_code == 2


@given(st.lists(st.tuples(config_keys, yaml_values), min_size=1, max_size=3))
@fuzz(300)
def test_fuzz_set_overrides(items):
    sets = []
    for (sec, k), v in items:
        sets += ["--set", f"{sec}.{k}={v}"]
    with Case("--set -> train") as c:
        res = cli("train", *sets, "--data", c.root / "missing.pkl", "--out", c.root / "out", "--quiet")
        c.check(res, allowed=["out"])


cells = st.one_of(st.sampled_from(["", "0.4", "-3", "4", "nan", "inf", "abc", "1e30", "v1", "\"", "1,2"]),
                  st.text(max_size=4))


@given(st.lists(st.lists(cells, min_size=0, max_size=8), min_size=0, max_size=10), st.booleans())
@fuzz(100)
def test_fuzz_bclstm_csv(rows, keep_header):
    import csv
    hdr = ["video_id", "clip_id", "label", "t0", "a0", "v0"]
    with Case("csv -> build-bclstm") as c:
        p = c.root / "tr.csv"
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            if keep_header:
                w.writerow(hdr)
            w.writerows([[f"v{i % 3}", str(i), "0.4", "1", "2", "3"] for i in range(4)] + rows)
        res = cli("data", "build-bclstm", "--train", p, "--out", c.root / "o.pkl")
        c.check(res, inputs=[p], allowed=["o.pkl", "o.pkl.json"])


@pytest.fixture(scope="module")
def ckpt_parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzck")
    raw = tiny_dataset(n=(6, 4, 4))
    pkl = write_pickle(root / "d.pkl", raw)
    cfg = preset("student")
    torch.manual_seed(0)
    save_checkpoint(root / "best.pt", CPSLModel({"text": 6, "audio": 4, "vision": 5}, cfg.model), None, cfg, 0, {})
    return pkl, torch.load(root / "best.pt", weights_only=True)


@st.composite
def checkpoints(draw):
    ops = draw(st.lists(st.sampled_from(["drop", "retype", "tensor", "nan", "config", "dims", "format", "payload"]),
                        min_size=1, max_size=3))
    key = draw(st.sampled_from(["format", "config", "dims", "model", "modalities", "epoch", "rng", "optimizer"]))
    return ops, key, draw(odd_values), draw(config_keys), draw(st.integers(0, 10_000))


@given(checkpoints())
@fuzz(80)
def test_fuzz_checkpoints_eval(ckpt_parts, case):
    pkl, good = ckpt_parts
    ops, key, value, (sec, k), pick = case
    ck = copy.deepcopy(good)
    with Case("checkpoint -> eval") as c:
        names = list(ck["model"])
        for op in ops:
            if op == "drop":
                ck.pop(key, None)
            elif op == "retype":
                ck[key] = value                                  # numpy values exercise the allowlisted path
            elif op == "tensor" and isinstance(ck.get("model"), dict) and names:
                ck["model"][names[pick % len(names)]] = torch.zeros(pick % 5 + 1)
            elif op == "nan" and isinstance(ck.get("model"), dict) and names:
                t = ck["model"][names[pick % len(names)]]
                if torch.is_tensor(t) and t.is_floating_point() and t.numel():
                    t.view(-1)[0] = math.nan
            elif op == "config" and isinstance(ck.get("config"), dict):
                ck["config"].setdefault(sec, {})
                if isinstance(ck["config"][sec], dict):
                    ck["config"][sec][k] = value if not isinstance(value, (np.ndarray, np.generic, bytes, tuple)) else 1
            elif op == "dims" and isinstance(ck.get("dims"), dict):
                ck["dims"][draw_mod(pick)] = value if isinstance(value, (int, float, str)) else 0
            elif op == "format":
                ck["format"] = value if isinstance(value, (str, int, float)) else "cpsl-ckpt-9"
            elif op == "payload":
                ck["evil"] = Payload(c.marker)
        buf = io.BytesIO()
        torch.save(ck, buf)
        blob = buf.getvalue()
        if pick % 7 == 0:
            blob = blob[: pick % len(blob)]                      # truncated file
        p = c.root / "x.pt"
        p.write_bytes(blob)
        c.check(cli("eval", "--ckpt", p, "--data", pkl), inputs=[p])


def draw_mod(i: int) -> str:
    return ["text", "audio", "vision", "smell"][i % 4]


TRAIN_POOL = {
    "model.d": [1, 2, 4, 8], "model.heads": [1, 2, 3], "model.dropout": [0.0, 0.5, 0.99], "model.text_layers": [0, 2],
    "model.audio_kernel": [1, 5], "model.max_len": [1, 7, 512], "model.ame": [False, True],
    "model.fusion": ["gcf", "concat"], "model.head_hidden": [0, 1, 3], "model.norm_momentum": [0.0, 1.0],
    "loss.task": ["l1", "mse", "smoothl1"], "loss.aux": [0, 1e3], "loss.rec": [0, 1e3], "loss.sl": [0, 1e3],
    "loss.div": [0, 1e3], "loss.warmup_epochs": [0, 5], "loss.eps": [1e-8, 1.0],
    "train.modulation": ["cp", "ogm_ge", "none", "cggm", "ags", "mmpareto", "inforeg", "moddrop"], "cp.mode": ["update", "grad"], "cp.penalty": ["tanh", "fixed", "ratio"],
    "cp.tau": [1e-6, 100], "cp.alpha": [0, 50], "cp.k_min": [0, 1], "cp.normalize": [True], "cp.ge_noise": [0, 10],
    "cp.start_epoch": [0, 5], "cp.ramp_epochs": [3], "train.lr": [1e-6, 10, 1e6], "train.clip": [0, 1e-6],
    "train.weight_decay": [0, 10], "train.seeds": ["1,2"], "train.patience": [1], "data.batch_size": [1, 1000],
}


@given(st.lists(st.sampled_from(sorted(TRAIN_POOL)), min_size=1, max_size=4, unique=True), st.integers(0, 99))
@fuzz(6)
def test_fuzz_train_with_edge_configs(ckpt_parts, keys, pick):
    """Valid-looking but extreme configs really train (2 epochs on tiny data): exit 0 or one line."""
    pkl, _ = ckpt_parts
    sets = []
    for i, k in enumerate(keys):
        v = TRAIN_POOL[k][(pick + i) % len(TRAIN_POOL[k])]
        sets += ["--set", f"{k}={v}"]
    with Case("edge config -> train") as c:
        res = cli("train", "--data", pkl, "--out", c.root / "out", "--epochs", "2", "--preset", "student", "--quiet",
                  "--set", "train.num_threads=1", *sets)
        c.check(res, allowed=["out"])


# ---------------------------------------------------------------------------- issue 29: forged arrays, bombs, paths
from forge import Reduce, dumps, reconstructed  # noqa: E402

try:
    from numpy._core import multiarray as _ma
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _ma

DTYPE_CODES = ["f4", "f8", "i8", "u1", "b1", "O", "U3", "S2", "V8", "c8", "M8[s]", ("f8", (4,)), [("a", "O")],
               [("a", "f4"), ("b", "i2")]]
shapes = st.lists(st.sampled_from([0, 1, 2, 3, 7, 1 << 20, 1 << 31, 2 ** 62]), min_size=0, max_size=4).map(tuple)


@st.composite
def forged_arrays(draw):
    """A numpy array as a hostile file could describe it: numpy.ndarray(...) with any buffer/offset/strides,
    _reconstruct + a state of any shape/dtype/data, a scalar or _frombuffer of any size."""
    code = draw(st.sampled_from(DTYPE_CODES))
    dt = np.dtype(code) if not isinstance(code, tuple) else np.dtype(code)
    shape = draw(shapes)
    data = draw(st.one_of(st.binary(max_size=64), st.lists(st.sampled_from(["a", 1, 2.5, None, b"x"]), max_size=8)))
    how = draw(st.sampled_from(["ndarray", "state", "scalar", "frombuffer"]))
    if how == "ndarray":
        args = (shape, dt, bytes(data) if isinstance(data, bytes) else b"\0" * 8, draw(st.sampled_from([0, 8, 1 << 30])))
        return Reduce(np.ndarray, args + ((tuple(draw(st.integers(-8, 1 << 20)) for _ in shape),) if draw(st.booleans())
                                          else ()))
    if how == "state":
        return reconstructed(shape, dt, data, draw(st.booleans()))
    if how == "scalar":
        return Reduce(_ma.scalar, (dt, data if isinstance(data, bytes) else b""))
    return Reduce(getattr(np._core.numeric if hasattr(np, "_core") else np.core.numeric, "_frombuffer"),
                  (data if isinstance(data, bytes) else b"", dt, shape, "C"))


@st.composite
def nested(draw):
    """Lists/tuples/dicts up to 300 deep, sometimes sharing one child many times (expanded by np.asarray)."""
    depth, width = draw(st.integers(1, 300)), draw(st.sampled_from([1, 2, 50, 400]))
    leaf = draw(st.sampled_from([0.5, "a", None, (1, 2)]))
    node = leaf
    for i in range(depth):
        kind = draw(st.sampled_from(["list", "tuple", "dict", "shared"]))
        node = {"list": lambda n: [n], "tuple": lambda n: (n,), "dict": lambda n: {"k": n},
                "shared": lambda n: [n] * width}[kind](node)
    return node


@given(st.one_of(forged_arrays(), nested()), st.sampled_from(["text", "regression_labels", "id", "audio_lengths",
                                                               "note"]))
@fuzz(150)
def test_fuzz_forged_arrays_and_nesting(obj, key):
    """Forged arrays and deep/shared nesting anywhere in a split: exit 0 or one line, never a crash."""
    raw = tiny_dataset(n=(4, 3, 2))
    raw["train"][key] = obj
    try:
        blob = dumps(raw)
    except (RecursionError, ValueError, TypeError, pickle.PicklingError):
        return                                      # pickle itself cannot write this one
    with Case("forged array / nesting -> data info") as c:
        p = c.root / "d.pkl"
        p.write_bytes(blob)
        c.check(cli("data", "info", p), inputs=[p])


BOMB_POOL = {"model.max_len": [1, 10 ** 5, 10 ** 9, 2 ** 63], "model.d": [4, 4096, 10 ** 6, -1],
             "model.heads": [1, 2, 10 ** 6], "model.text_layers": [0, 64, 10 ** 6],
             "model.head_hidden": [0, 10 ** 5, 10 ** 9], "train.num_threads": [1, 10 ** 8, -1],
             "train.seeds": ["1", "4294967296", "-1", "1,1"], "data.batch_size": [1, 10 ** 12],
             "data.eval_batch_size": [1, 10 ** 12], "data.synth_seed": [0, 2 ** 40, -5]}
SYNTH_POOL = ["n_train: 1000000000", "d_text: 100000000", "text_len: [1, 1000000000]", "n_test: -1", "seed: -1"]


@given(st.lists(st.sampled_from(sorted(BOMB_POOL)), min_size=1, max_size=3, unique=True), st.integers(0, 99),
       st.sampled_from([None] + SYNTH_POOL))
@fuzz(15)
def test_fuzz_resource_bomb_configs(ckpt_parts, keys, pick, synth):
    """Configs asking for absurd memory (with CPSL_MAX_ARRAY_BYTES at 256 MiB): refused by name before allocating,
    or a tiny run that finishes."""
    pkl, _ = ckpt_parts
    sets = []
    for i, k in enumerate(keys):
        sets += ["--set", f"{k}={BOMB_POOL[k][(pick + i) % len(BOMB_POOL[k])]}"]
    data = ["--data", "synth", "--set", f"data.synth={{{synth}}}"] if synth else ["--data", pkl]
    with Case("resource-bomb config -> train") as c:
        old = os.environ.get("CPSL_MAX_ARRAY_BYTES")
        os.environ["CPSL_MAX_ARRAY_BYTES"] = str(256 << 20)
        try:
            res = cli("train", *data, "--out", c.root / "out", "--epochs", "1", "--preset", "student", "--quiet",
                      "--set", "train.num_threads=1", *sets)
        finally:
            os.environ.pop("CPSL_MAX_ARRAY_BYTES") if old is None else os.environ.__setitem__("CPSL_MAX_ARRAY_BYTES", old)
        c.check(res, allowed=["out"])


def _hostile_out(root: Path, kind: str) -> Path:
    """An --out path of the given hostile kind (the victim folder outside must stay untouched)."""
    victim = root / "victim"
    if kind == "file":
        (root / "f").write_text("mine")
        return root / "f"
    if kind == "fifo":
        os.mkfifo(root / "p")
        return root / "p"
    if kind == "symlink-out":
        (root / "l").symlink_to(victim)
        return root / "l"
    if kind == "symlink-seed":
        (root / "o").mkdir()
        (root / "o" / "seed1").symlink_to(victim)
        return root / "o"
    if kind == "user-files":
        (root / "o" / "seed1").mkdir(parents=True)
        (root / "o" / "seed1" / "log.jsonl").write_text("mine")
        (root / "o" / "config.json").write_text("{}")
        return root / "o"
    return {"long": root / ("y" * 300), "dev-full": Path("/dev/full"), "nested": root / "a" / "b" / "c",
            "odd-name": root / "é 😀\n;$(x)"}[kind]


@given(st.sampled_from(["file", "fifo", "symlink-out", "symlink-seed", "user-files", "long", "dev-full", "nested",
                        "odd-name"]), st.sampled_from(["train", "synth", "eval"]), st.booleans())
@fuzz(30)
def test_fuzz_hostile_output_paths(ckpt_parts, kind, command, overwrite):
    pkl, _ = ckpt_parts
    with Case("hostile --out -> train/synth/eval") as c:
        victim = c.root / "victim"
        victim.mkdir()
        (victim / "keep.txt").write_text("keep")
        out = _hostile_out(c.root, kind)
        before = {p.name: p.read_bytes() for p in c.root.rglob("*") if p.is_file() and not p.is_symlink()}
        if command == "train":
            args = ["train", "--data", pkl, "--out", out, "--epochs", "1", "--preset", "student", "--quiet",
                    "--set", "train.num_threads=1"] + (["--overwrite"] if overwrite else [])
        elif command == "synth":
            args = ["data", "synth", "--out", out, "--sizes", "8,4,2"]
        else:
            args = ["eval", "--ckpt", Path(pkl).parent / "best.pt", "--data", pkl, "--out", out]
        res = cli(*args)
        c.check(res, inputs=[pkl], allowed=[p.name for p in c.root.iterdir()])
        assert (victim / "keep.txt").read_text() == "keep"
        if kind != "symlink-out":                   # --out a link to a folder: the run lives there, beside keep.txt
            assert [p.name for p in victim.iterdir()] == ["keep.txt"]
        after = {p.name: p.read_bytes() for p in c.root.rglob("*") if p.is_file() and not p.is_symlink()}
        named = Path(out).name if command != "train" else None      # the output file named: the user's to replace
        assert all(after.get(k) == v for k, v in before.items() if k != named), "a file there before changed or vanished"
