#!/usr/bin/env python3
"""Run a cpsl model on the target: a TensorRT engine (``.plan``) or an ONNX model (``.onnx``).

Needs Python 3.10+, numpy, and onnxruntime (for ``.onnx``) or TensorRT 10.x + the CUDA runtime
(for ``.plan``; JetPack 6.x ships both). It never imports torch or cpsl: copy this one file
beside the artefacts.

    python3 runner.py model.onnx --check model.golden.npz          # (or model.plan) vs golden outputs
    python3 runner.py model.plan --bench --batch 1,32 --iters 200 --json bench.json
    python3 runner.py predict --model model.onnx --text "a great movie" [--audio-features a.csv]

``predict`` (end-to-end exports) tokenizes raw text with ``tokenizers`` and the exported
``model.tokenizer.json`` (predict.py and frontend.py, beside this file; no torch, no transformers).
Exit codes: 0 ok, 1 golden mismatch, 2 bad input (missing file or runtime, inputs that do not fit,
a golden file with no batches or a non-finite tolerance, an unwritable output), 3
``--assert-no-torch`` failed. ``--bench`` refuses inputs beyond ``CPSL_MAX_ARRAY_BYTES`` (4 GiB).

TensorRT buffers are plain device allocations made through ``libcudart`` with ctypes (no
pycuda / cuda-python needed). The TensorRT path is written against the TensorRT 10.x Python
API (set_input_shape / set_tensor_address / execute_async_v3) and was NOT run where this file
was written (no GPU there); see export/README.md.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

OUTPUT = "sentiment"
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
TOKEN_INPUTS = ("input_ids", "attention_mask")


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------- golden file
def load_golden(path: str):
    """-> (meta dict, [(feeds, expected, reference)]) from a ``*.golden.npz`` written by cpsl export."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"golden file not found: {path}")
    try:
        z = np.load(p, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        _check_meta(meta, path)
        batches = []
        for i in range(meta["n_batches"]):
            feeds = {n: z[f"batch{i}_{n}"] for n in meta["inputs"]}
            batches.append((feeds, z[f"batch{i}_expected"], z[f"batch{i}_reference"]))
            if any(a.dtype.kind not in "fiub" for a in (*feeds.values(), *batches[-1][1:])):
                raise UsageError(f"{path}: batch {i}: an array is not a numeric array")
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - zip/npz/JSON/key errors: not a golden file
        raise UsageError(f"{path} is not a cpsl golden file ({type(e).__name__}: {str(e)[:120]})") from None
    return meta, batches


def _check_meta(meta, path) -> None:
    """The golden file's meta: input names, >= 1 batch, finite tolerances (a check of nothing proves nothing)."""
    if not isinstance(meta, dict) or not isinstance(meta.get("inputs"), list) or not meta["inputs"] or not all(
            isinstance(n, str) and n for n in meta["inputs"]):
        raise UsageError(f"{path}: meta 'inputs' must be a non-empty list of input names")
    nb = meta.get("n_batches")
    if isinstance(nb, bool) or not isinstance(nb, int) or not 1 <= nb <= 10_000:
        raise UsageError(f"{path}: meta 'n_batches' must be an integer in [1, 10000], got {str(nb)[:20]}")
    tol = meta.get("tolerance", {})
    for k in ("atol", "rtol"):
        _tolerance(tol.get(k, 0.0) if isinstance(tol, dict) else None, f"{path}: meta tolerance {k}")


def _tolerance(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or not 0 <= v < 1e3:
        raise UsageError(f"{what} must be a finite number in [0, 1000), got {str(v)[:20]}")
    return float(v)


def find_manifest(model: Path) -> dict | None:
    p = model.with_name(f"{model.stem}.manifest.json")
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except ValueError:
            return None
    return None


# ---------------------------------------------------------------------------- ONNX Runtime
class OrtBackend:
    name = "onnxruntime"

    def __init__(self, path: Path, threads: int = 0, provider: str = "cpu"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UsageError("running .onnx needs onnxruntime (pip install onnxruntime, or onnxruntime-gpu "
                             "for Jetson from the Jetson Zoo); or build a .plan and use TensorRT") from None
        prov = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                "tensorrt": "TensorrtExecutionProvider"}[provider]
        if prov not in ort.get_available_providers():
            raise UsageError(f"onnxruntime here has no {prov} (available: {', '.join(ort.get_available_providers())})")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        try:
            self.sess = ort.InferenceSession(str(path), so, providers=[prov] + (["CPUExecutionProvider"] if prov != "CPUExecutionProvider" else []))
        except Exception as e:  # noqa: BLE001 - corrupt / foreign file
            raise UsageError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None
        self.version = ort.__version__
        self.device = prov
        self.inputs = {i.name: [d if isinstance(d, int) else None for d in i.shape] for i in self.sess.get_inputs()}
        self.dtypes = {i.name: _ORT_DTYPES.get(i.type, np.float32) for i in self.sess.get_inputs()}

    def opt_lengths(self) -> dict:
        return {}

    def run(self, feeds: dict) -> np.ndarray:
        return self.sess.run([OUTPUT], {k: feeds[k] for k in self.inputs})[0]


# ---------------------------------------------------------------------------- TensorRT
def _cudart():
    cands = ["libcudart.so", "libcudart.so.12"]
    for pat in ("/usr/local/cuda/lib64/libcudart.so*", "/usr/local/cuda/targets/*/lib/libcudart.so*",
                "/usr/lib/aarch64-linux-gnu/libcudart.so*", "/usr/lib/x86_64-linux-gnu/libcudart.so*"):
        cands += sorted(glob.glob(pat))
    for c in cands:
        try:
            lib = ctypes.CDLL(c)
            break
        except OSError:
            continue
    else:
        raise UsageError("running .plan needs the CUDA runtime library libcudart.so (JetPack: /usr/local/cuda/lib64)")
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    lib.cudaMalloc.argtypes, lib.cudaMalloc.restype = [ctypes.POINTER(vp), sz], ctypes.c_int
    lib.cudaFree.argtypes, lib.cudaFree.restype = [vp], ctypes.c_int
    lib.cudaMemcpyAsync.argtypes, lib.cudaMemcpyAsync.restype = [vp, vp, sz, ctypes.c_int, vp], ctypes.c_int
    lib.cudaStreamCreate.argtypes, lib.cudaStreamCreate.restype = [ctypes.POINTER(vp)], ctypes.c_int
    lib.cudaStreamSynchronize.argtypes, lib.cudaStreamSynchronize.restype = [vp], ctypes.c_int
    lib.cudaStreamDestroy.argtypes, lib.cudaStreamDestroy.restype = [vp], ctypes.c_int
    lib.cudaGetErrorString.argtypes, lib.cudaGetErrorString.restype = [ctypes.c_int], ctypes.c_char_p
    return lib


class TrtBackend:
    name = "tensorrt"
    H2D, D2H = 1, 2

    def __init__(self, path: Path):
        try:
            import tensorrt as trt
        except ImportError:
            raise UsageError("running .plan needs TensorRT's Python bindings (JetPack 6.x: "
                             "sudo apt install python3-libnvinfer); or run the .onnx with onnxruntime") from None
        self.trt = trt
        self.cuda = _cudart()
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UsageError(f"TensorRT could not deserialize {path} (built for another GPU or TensorRT version? "
                             "rebuild it on this device with the build_engine.sh script)")
        self.ctx = self.engine.create_execution_context()
        self.version = trt.__version__
        self.device = "cuda"
        self.inputs, self.outputs, self.dtypes = {}, [], {}
        for i in range(self.engine.num_io_tensors):
            n = self.engine.get_tensor_name(i)
            self.dtypes[n] = np.dtype(trt.nptype(self.engine.get_tensor_dtype(n)))
            if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT:
                self.inputs[n] = [d if d >= 0 else None for d in self.engine.get_tensor_shape(n)]
            else:
                self.outputs.append(n)
        self.stream = ctypes.c_void_p()
        self._check(self.cuda.cudaStreamCreate(ctypes.byref(self.stream)), "cudaStreamCreate")
        self.buffers: dict[str, tuple[int, int]] = {}     # name -> (device pointer, capacity bytes)

    def _check(self, err: int, what: str) -> None:
        if err != 0:
            raise RuntimeError(f"{what} failed: {self.cuda.cudaGetErrorString(err).decode()}")

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, cap = self.buffers.get(name, (0, 0))
        if nbytes > cap:
            if ptr:
                self._check(self.cuda.cudaFree(ctypes.c_void_p(ptr)), "cudaFree")
            p = ctypes.c_void_p()
            self._check(self.cuda.cudaMalloc(ctypes.byref(p), max(nbytes, 256)), "cudaMalloc")
            ptr, cap = int(p.value), max(nbytes, 256)
            self.buffers[name] = (ptr, cap)
        return ptr

    def opt_lengths(self) -> dict:
        out = {}
        for n in self.inputs:
            if not n.endswith("_mask"):
                mn, opt, mx = self.engine.get_tensor_profile_shape(n, 0)
                out[n] = int(opt[1])
        return out

    def run(self, feeds: dict) -> np.ndarray:
        host = {}
        for n in self.inputs:
            a = np.ascontiguousarray(feeds[n], dtype=self.dtypes[n])
            host[n] = a
            if not self.ctx.set_input_shape(n, a.shape):
                raise UsageError(f"input {n} shape {a.shape} is outside the engine's optimization profile")
            ptr = self._buffer(n, a.nbytes)
            self._check(self.cuda.cudaMemcpyAsync(ptr, a.ctypes.data, a.nbytes, self.H2D, self.stream), "cudaMemcpyAsync")
            self.ctx.set_tensor_address(n, ptr)
        outs = {}
        for n in self.outputs:
            o = np.empty(tuple(self.ctx.get_tensor_shape(n)), dtype=self.dtypes[n])
            outs[n] = o
            self.ctx.set_tensor_address(n, self._buffer(n, o.nbytes))
        if not self.ctx.execute_async_v3(self.stream.value):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        for n, o in outs.items():
            self._check(self.cuda.cudaMemcpyAsync(o.ctypes.data, self.buffers[n][0], o.nbytes, self.D2H, self.stream),
                        "cudaMemcpyAsync")
        self._check(self.cuda.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        del host
        return outs[OUTPUT].astype(np.float32)


def open_backend(model: str, threads: int = 0, provider: str = "cpu"):
    p = Path(model)
    if not p.is_file():
        raise UsageError(f"model file not found: {model}")
    ext = p.suffix.lower()
    if ext == ".onnx":
        return OrtBackend(p, threads, provider)
    if ext in (".plan", ".engine", ".trt"):
        return TrtBackend(p)
    raise UsageError(f"unknown model extension {ext or '(none)'!r} of {p.name}: expected .onnx or .plan")


# ---------------------------------------------------------------------------- check / bench
def check(backend, golden: str, atol: float | None, rtol: float | None) -> tuple[bool, dict]:
    meta, batches = load_golden(golden)
    tol = meta.get("tolerance", {})
    atol = _tolerance(tol.get("atol", 1e-4) if atol is None else atol, "atol")
    rtol = _tolerance(tol.get("rtol", 0.0) if rtol is None else rtol, "rtol")
    missing = [n for n in backend.inputs if n not in meta["inputs"]]
    if missing:
        raise UsageError(f"{golden} has no inputs {missing} that the model needs (was it written for another model?)")
    rows, ok = [], True
    for i, (feeds, expected, reference) in enumerate(batches):
        check_feeds(backend, feeds, f"{golden} batch {i}")
        out = np.asarray(run_checked(backend, feeds, f"{golden} batch {i}"), dtype=np.float32).reshape(-1)
        if out.shape != expected.reshape(-1).shape:
            rows.append({"batch": i, "ok": False, "error": f"output shape {out.shape} != {expected.shape}"})
            ok = False
            continue
        err = np.abs(out - expected.reshape(-1))
        good = bool(np.all(err <= atol + rtol * np.abs(expected.reshape(-1))))
        ok &= good
        lens = {n: int(v.shape[1]) for n, v in feeds.items() if not n.endswith("_mask")}
        rows.append({"batch": i, "size": int(out.shape[0]), "lengths": lens, "max_abs_err": float(err.max()),
                     "max_abs_err_vs_fp32_reference": float(np.abs(out - reference.reshape(-1)).max()), "ok": good})
    return ok, {"golden": str(golden), "precision": meta.get("precision"), "atol": atol, "rtol": rtol,
                "batches": rows, "ok": ok}


def check_feeds(backend, feeds: dict, what: str) -> None:
    """Inputs the model cannot take (dtype, rank, fixed sizes, batch/length mismatch) -> UsageError."""
    batch = None
    for n, shape in backend.inputs.items():
        a = feeds[n]
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiub":
            raise UsageError(f"{what}: input {n} is not a numeric array (dtype {getattr(a, 'dtype', type(a).__name__)})")
        if a.ndim != len(shape) or any(d is not None and d != s for d, s in zip(shape, a.shape)):
            want = "x".join("?" if d is None else str(d) for d in shape)
            raise UsageError(f"{what}: input {n} has shape {a.shape}, the model takes {want}")
        if a.ndim and a.shape[0] < 1:
            raise UsageError(f"{what}: input {n} has an empty batch")
        batch = a.shape[0] if batch is None else batch
        if a.ndim and a.shape[0] != batch:
            raise UsageError(f"{what}: input {n} has batch {a.shape[0]}, another input has {batch}")
    for n in backend.inputs:
        if n.endswith("_mask") and n[:-5] in feeds and feeds[n].shape[:2] != feeds[n[:-5]].shape[:2]:
            raise UsageError(f"{what}: {n} shape {feeds[n].shape} does not match {n[:-5]} {feeds[n[:-5]].shape}")


def run_checked(backend, feeds: dict, what: str) -> np.ndarray:
    try:
        return backend.run(feeds)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - the runtime refused these inputs
        msg = str(e).strip().splitlines()
        raise UsageError(f"{what}: {backend.name} refused the inputs ({type(e).__name__}: "
                         f"{msg[0][:160] if msg else ''})") from None


def parse_lengths(text: str, mods: list[str]) -> dict:
    """``--len N`` or ``--len text=40,audio=50`` -> {modality: length >= 1}."""
    out = {}
    try:
        if "=" in text:
            for kv in text.split(","):
                k, v = kv.split("=", 1)
                if k.strip() not in mods:
                    raise UsageError(f"--len: unknown modality {k.strip()!r} (the model has {', '.join(mods)})")
                out[k.strip()] = int(v)
        else:
            out = {m: int(text) for m in mods}
    except ValueError:
        raise UsageError(f"--len must be N or modality=N,... with integers, got {text!r}") from None
    if any(v < 1 for v in out.values()):
        raise UsageError(f"--len lengths must be >= 1, got {text!r}")
    return out


def max_bytes() -> int:
    """``CPSL_MAX_ARRAY_BYTES`` (default 4 GiB here): the inputs one --bench batch may allocate."""
    v = os.environ.get("CPSL_MAX_ARRAY_BYTES", "")
    return int(v) if v.isdigit() and int(v) > 0 else 4 << 30


def bench_inputs(backend, batch: int, lens: dict, rng) -> dict:
    need = 0
    for n, shape in backend.inputs.items():
        m = n[:-5] if n.endswith("_mask") else n
        d = shape[2] if len(shape) > 2 and shape[2] else 1
        need += batch * int(lens.get("seq" if n in TOKEN_INPUTS else m, 32)) * d * 8
    if need > max_bytes():
        raise UsageError(f"--batch {batch} with lengths {lens or 32} needs {need / 2**30:.3g} GiB of inputs, beyond "
                         f"the limit CPSL_MAX_ARRAY_BYTES={max_bytes() / 2**30:.3g} GiB (raise it to allow more)")
    feeds = {}
    for n, shape in backend.inputs.items():
        m = n[:-5] if n.endswith("_mask") else n
        L = int(lens.get("seq" if n in TOKEN_INPUTS else m, 32))
        if n == "input_ids":                            # [CLS] random word pieces [SEP]
            ids = rng.integers(1000, 29000, (batch, L))
            ids[:, 0], ids[:, -1] = 101, 102
            feeds[n] = ids.astype(backend.dtypes.get(n, np.int64))
        elif n.endswith("_mask"):
            feeds[n] = np.ones((batch, L), dtype=backend.dtypes.get(n, np.float32))
        else:
            d = shape[2]
            if d is None:
                raise UsageError(f"input {n} has no fixed feature size")
            feeds[n] = rng.standard_normal((batch, L, d)).astype(backend.dtypes.get(n, np.float32))
    return feeds


def bench(backend, batches: list[int], iters: int, warmup: int, lens: dict) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for b in batches:
        feeds = bench_inputs(backend, b, lens, rng)
        run_checked(backend, feeds, f"bench batch {b}")
        for _ in range(warmup):
            backend.run(feeds)
        t = np.empty(iters)
        for i in range(iters):
            t0 = time.perf_counter()
            backend.run(feeds)
            t[i] = (time.perf_counter() - t0) * 1e3
        p50, p90, p99 = (float(np.percentile(t, q)) for q in (50, 90, 99))
        out.append({"batch": b, "lengths": {m: int(lens.get(m, 32)) for m in _mods(backend)}, "iters": iters,
                    "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "mean_ms": float(t.mean()),
                    "samples_per_s": b / (p50 / 1e3) if p50 > 0 else None})
    return out


def _mods(backend) -> list[str]:
    return [("seq" if n == "input_ids" else n) for n in backend.inputs if not n.endswith("_mask")]


def manifest_lengths(man: dict, model: str) -> dict:
    """The bench lengths of the manifest's ``engine_profile`` (its opt shapes); UsageError when malformed."""
    try:
        prof = man["engine_profile"]
        names = [m for m in man.get("modalities", []) if m in prof] + (["input_ids"] if "input_ids" in prof else [])
        lens = {("seq" if m == "input_ids" else m): prof[m]["opt"][1] for m in names}
    except (KeyError, TypeError, IndexError, AttributeError):
        raise UsageError(f"the manifest beside {model} has a malformed engine_profile") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1 << 20 for v in lens.values()):
        raise UsageError(f"the manifest beside {model}: engine_profile lengths must be integers in [1, 2**20]")
    return lens


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="runner.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="model.onnx (ONNX Runtime) or model.plan (TensorRT)")
    ap.add_argument("--check", metavar="GOLDEN.npz", help="compare with the golden outputs (exit 1 on mismatch)")
    ap.add_argument("--atol", type=float, help="absolute tolerance (default: the golden file's)")
    ap.add_argument("--rtol", type=float, help="relative tolerance (default: the golden file's)")
    ap.add_argument("--bench", action="store_true", help="measure latency (p50/p90/p99 ms, host-to-host)")
    ap.add_argument("--batch", default="1,32", help="bench batch sizes, comma-separated (default 1,32)")
    ap.add_argument("--iters", type=int, default=100, help="timed iterations per batch size (default 100)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed iterations first (default 10)")
    ap.add_argument("--len", dest="length", help="bench sequence length: N, or text=40,audio=50 "
                    "(default: the manifest's / engine's opt lengths, else 32)")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"], help="onnxruntime provider")
    ap.add_argument("--json", metavar="OUT.json", help="write the results as JSON")
    ap.add_argument("--assert-no-torch", action="store_true", help="fail (exit 3) if torch got imported")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["predict"]:
        here = str(Path(__file__).resolve().parent)
        if here not in sys.path:
            sys.path.insert(0, here)
        try:
            if __package__:                                   # cpsl.edge.runner (the installed package)
                from . import predict
            else:                                             # runner.py copied onto the device
                import predict
        except ImportError as e:
            print(f"error: predict needs frontend.py and predict.py beside runner.py (copy export/*.py): {e}",
                  file=sys.stderr)
            return 2
        return predict.main(argv[1:], sys.modules[__name__])
    args = parse_args(argv)
    try:
        if not args.check and not args.bench:
            raise UsageError("nothing to do: pass --check GOLDEN.npz and/or --bench")
        if args.check and not Path(args.check).is_file():
            raise UsageError(f"golden file not found: {args.check}")
        try:
            batches = [int(b) for b in args.batch.split(",") if b.strip()]
            if not batches or min(batches) < 1:
                raise ValueError
        except ValueError:
            raise UsageError(f"--batch must be positive integers like 1,32, got {args.batch!r}") from None
        if not 1 <= args.iters <= 10**6 or not 0 <= args.warmup <= 10**6:
            raise UsageError("--iters must be in [1, 1000000] and --warmup in [0, 1000000]")
        if args.json and not Path(args.json).resolve().parent.is_dir():
            raise UsageError(f"--json: folder {Path(args.json).parent} does not exist")
        if args.json and Path(args.json).exists() and not Path(args.json).is_file():
            raise UsageError(f"--json {args.json} is a folder, pipe or device; give a regular file name")
        backend = open_backend(args.model, args.threads, args.provider)
        result = {"model": str(args.model), "backend": backend.name, "runtime_version": backend.version,
                  "device": backend.device, "host": platform.node(), "machine": platform.machine(),
                  "python": platform.python_version()}
        code = 0
        if args.check:
            ok, res = check(backend, args.check, args.atol, args.rtol)
            result["check"] = res
            for r in res["batches"]:
                if "error" in r:
                    print(f"batch {r['batch']}: {r['error']}")
                else:
                    print(f"batch {r['batch']}: size {r['size']} lengths {r['lengths']} max abs err {r['max_abs_err']:.3g} "
                          f"(vs fp32 reference {r['max_abs_err_vs_fp32_reference']:.3g}) {'ok' if r['ok'] else 'MISMATCH'}")
            print(f"check {'passed' if ok else 'FAILED'}: {len(res['batches'])} golden batches, "
                  f"atol {res['atol']:g}, rtol {res['rtol']:g} ({backend.name})")
            code = 0 if ok else 1
        if args.bench:
            lens = {}
            man = find_manifest(Path(args.model))
            if man and "engine_profile" in man:
                lens = manifest_lengths(man, args.model)
            lens.update(backend.opt_lengths())
            if args.length:
                lens.update(parse_lengths(args.length, _mods(backend)))
            res = bench(backend, batches, args.iters, args.warmup, lens)
            result["bench"] = res
            for r in res:
                print(f"batch {r['batch']:3d} lengths {r['lengths']}: p50 {r['p50_ms']:.3f} ms  p90 {r['p90_ms']:.3f} ms  "
                      f"p99 {r['p99_ms']:.3f} ms  ({r['samples_per_s']:.0f} samples/s, {backend.name} {backend.device})")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
            print(f"wrote {args.json}")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                       # an unreadable input or unwritable output (/dev/full, read-only)
        print(f"error: {e.strerror or e}: {e.filename or ''}", file=sys.stderr)
        return 2
    if args.assert_no_torch and "torch" in sys.modules:
        print("error: torch was imported by the runner", file=sys.stderr)
        return 3
    return code


def console() -> None:  # pragma: no cover - the cpsl-runner console script
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
