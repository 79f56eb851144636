#!/usr/bin/env python
"""The edge-path benchmark in one command: teacher → distilled student → fp32/fp16/int8 ONNX,
measured on one machine in one run.

    python bench/run.py [--quick] [--device cpu|cuda] [--data synth|F.pkl] [--out DIR]
                        [--ckpt TEACHER_best.pt] [--student-ckpt STUDENT_best.pt] [--work DIR]

Stages (one progress line each, with the elapsed time):

1. data: the evaluation split is ``test`` when it holds usable labels, else ``valid``; the
   latency inputs are real rows of that split cut/padded to a fixed length per modality, the
   split's 95th percentile of valid lengths (rounded up).
2. teacher: trained (``cpsl.train.run``, teacher preset) or loaded with ``--ckpt``.
3. student: distilled (``cpsl.compress.distill``, student preset) or loaded with ``--student-ckpt``.
4. export: ``cpsl export`` of the student at fp32, fp16 and int8 and of the teacher at fp32
   (manifest, golden batches, engine script beside each ``.onnx``; ``--trt`` where TensorRT imports).
5. accuracy: MMSA metrics of every variant on the evaluation split; retention vs the teacher.
6. latency: p50/p90/p99 at batch 1 and 32, host-to-host, variants interleaved in rounds so that
   a change of machine load hits all of them alike. PyTorch and ONNX Runtime use the same number
   of threads (``--threads``, default ``torch.get_num_threads()``). On CUDA also PyTorch fp16
   (autocast), a CUDA-graph replay of the student and TensorRT (``export/runner.py --bench``).
7. profiles: ONNX Runtime per-op profile of the int8 student and PyTorch profiler top ops of the
   teacher and student at batch 1; where the int8 accuracy comes from (distillation vs
   quantization); the largest tensors of the int8 file.
8. runner: ``export/runner.py`` (torch-free, separate process) checks the int8 golden batches and
   re-measures the int8 latency.
9. cp_kernel / train_step: ``bench/cp_kernel.py --quick`` and ``bench/train_step.py`` as
   subprocesses (a failure or absence is recorded, not fatal).

Writes ``OUT/bench.json`` (``summary`` block first), ``OUT/bench.md`` (tables, targets with
PASS/MISS, profiles and next steps for every miss) and ``OUT/pareto.png``. Heavy artefacts
(checkpoints, .onnx) go to ``--work`` (default: a temporary folder, removed at the end).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
try:  # an installed cpsl wins; a plain checkout works too
    import cpsl  # noqa: F401
    _EXTRA_PATH = None
except ImportError:
    sys.path.insert(0, str(REPO))
    _EXTRA_PATH = str(REPO)

import torch  # noqa: E402

BATCHES = (1, 32)
# Targets (bench.md reports PASS/MISS for each)
TARGET_SPEEDUP = 5.0            # student int8 ORT b1 vs teacher fp32 eager PyTorch b1, same CPU
TARGET_RETENTION = 0.97         # int8 Non0_acc_2 / teacher Non0_acc_2
TARGET_MAE_INCREASE = 0.05      # int8 MAE / teacher MAE - 1
TARGET_INT8_BYTES = 1_000_000   # 1 MB (decimal) on disk
TEACHER_EPOCHS = {"quick": 8, "full": 30}
STUDENT_EPOCHS = {"quick": 12, "full": 40}
ITERS = {"quick": 100, "full": 400}
SKIPPABLE = ("cp_kernel", "train_step", "profiles", "runner", "tensorrt")


# ---------------------------------------------------------------------------- small helpers
class Progress:
    """Prints ``[elapsed] stage: message`` and keeps the duration of each stage."""

    def __init__(self, log_file):
        self.t0 = time.perf_counter()
        self.stages: list[dict] = []
        self.log_file = log_file

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def say(self, msg: str) -> None:
        line = f"[{self.elapsed():7.1f}s] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    @contextlib.contextmanager
    def stage(self, name: str):
        t = time.perf_counter()
        rec = {"stage": name, "note": ""}
        try:
            yield rec
        finally:
            rec["seconds"] = round(time.perf_counter() - t, 2)
            self.stages.append(rec)
            self.say(f"{name}: {rec['note']} ({rec['seconds']:.1f} s)")


def _percentiles(ms: list[float], cpu_ms: list[float] | None = None) -> dict:
    a = np.asarray(ms, dtype=np.float64)
    out = {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
           "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean()), "min_ms": float(a.min()),
           "iters": int(a.size)}
    if cpu_ms:
        c = np.asarray(cpu_ms, dtype=np.float64)
        out["cpu_p50_ms"] = float(np.percentile(c, 50))
        # wall / CPU time of the same calls: > 1 when the process waited (other jobs, I/O, idle workers)
        out["wall_over_cpu"] = float(np.median(a / np.maximum(c, 1e-6)))
    return out


def machine_info(device: str, threads: int) -> dict:
    import onnx
    import onnxruntime as ort
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "threads": threads,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": ort.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
            "gpu": None, "loadavg_start": _loadavg()}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    try:
        import tensorrt as trt  # noqa: F401
        info["tensorrt"] = getattr(trt, "__version__", "?")
    except Exception as e:  # noqa: BLE001 - ImportError or a broken install
        info["tensorrt"] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return info


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe_machine(info: dict) -> str:
    s = (f"{info['cpu']}, {info['usable_cores']} cores, {info['threads']} threads; torch {info['torch']}, "
         f"onnxruntime {info['onnxruntime']}")
    if info.get("gpu"):
        s += f"; GPU {info['gpu']}"
    return s


def _subprocess_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if _EXTRA_PATH:
        env["PYTHONPATH"] = _EXTRA_PATH + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _tail(text: str, n: int = 6) -> str:
    return "\n".join((text or "").strip().splitlines()[-n:])


# ---------------------------------------------------------------------------- data
def load_bench_data(spec: str, sizes: str | None, synth_seed: int, work: Path):
    """-> (MMSAData, data argument for ``cpsl export``)."""
    from cpsl.data import generate, load_data, synth_spec_from_args
    from cpsl.data.mmsa import save_mmsa
    if spec == "synth" or spec.startswith("synth:"):
        seed = int(spec.split(":", 1)[1]) if ":" in spec else synth_seed
        data = generate(synth_spec_from_args(seed=seed, sizes=sizes))
        if sizes:  # not reproducible from a "synth:N" string: write it for cpsl export
            p = work / "synth.pkl"
            save_mmsa(data, p)
            return data, str(p)
        return data, f"synth:{seed}"
    if sizes:
        from cpsl.errors import CPSLError
        raise CPSLError("--sizes applies to synthetic data only")
    return load_data(spec), spec


def eval_split_name(data) -> str:
    """``test`` when it has usable labels (non-empty, finite, not constant), else ``valid``."""
    s = data.splits.get("test")
    if s is not None and len(s) >= 2:
        y = np.asarray(s.labels, dtype=np.float64)
        if np.isfinite(y).all() and y.std() > 0:
            return "test"
    return "valid"


def bench_lengths(split, modalities, rule: str = "p95") -> dict:
    out = {}
    for m in modalities:
        ln = np.asarray(split.lengths[m])
        L = int(ln.max()) if rule == "max" else int(math.ceil(np.percentile(ln, 95)))
        out[m] = max(1, min(L, int(split.features[m].shape[1])))
    return out


def bench_inputs(split, modalities, lengths: dict, batch: int, seed: int = 0) -> dict:
    """Real rows of ``split`` cut/padded to ``lengths``: ``{m: (B, L, d) float32, m_mask: (B, L) float32}``."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(split), size=batch, replace=len(split) < batch)
    feeds = {}
    for m in modalities:
        L = lengths[m]
        x = np.zeros((batch, L, split.features[m].shape[2]), np.float32)
        n = min(L, split.features[m].shape[1])
        x[:, :n] = split.features[m][rows, :n]
        valid = np.minimum(np.asarray(split.lengths[m])[rows], L)
        mask = (np.arange(L)[None, :] < valid[:, None])
        x *= mask[:, :, None]
        feeds[m] = np.ascontiguousarray(x)
        feeds[f"{m}_mask"] = mask.astype(np.float32)
    return feeds


def torch_inputs(feeds: dict, modalities, device="cpu"):
    x = {m: torch.from_numpy(feeds[m]).to(device) for m in modalities}
    mask = {m: torch.from_numpy(feeds[f"{m}_mask"] > 0.5).to(device) for m in modalities}
    return x, mask


# ---------------------------------------------------------------------------- train / distill / export
def train_teacher(data, data_arg: str, synth_seed: int, epochs: int, device: str, out: Path, log) -> dict:
    from cpsl.config import build_config
    from cpsl.train import run
    cfg = build_config("teacher")
    cfg.train.epochs, cfg.train.seeds, cfg.train.progress, cfg.train.device = epochs, [1], False, device
    cfg.data.path, cfg.data.synth_seed = data_arg, synth_seed
    res = run(cfg, data, out, log=log, overwrite=True)     # --work is scratch: a rerun replaces it
    return {"source": "trained", "epochs": epochs, "epochs_run": res["per_seed"][0]["epochs_run"],
            "best_epoch": res["per_seed"][0]["best_epoch"], "ckpt": out / "seed1" / "best.pt"}


def distill_student(teacher_ckpt: Path, data, data_arg: str, synth_seed: int, epochs: int, device: str,
                    out: Path, log) -> dict:
    from cpsl.compress.distill import distill
    from cpsl.config import build_config
    cfg = build_config("student")
    cfg.train.epochs, cfg.train.seeds, cfg.train.progress, cfg.train.device = epochs, [1], False, device
    cfg.data.path, cfg.data.synth_seed = data_arg, synth_seed
    res = distill(teacher_ckpt, data, cfg, out, log=log, overwrite=True)
    return {"source": "distilled", "epochs": epochs, "epochs_run": res["per_seed"][0]["epochs_run"],
            "best_epoch": res["per_seed"][0]["best_epoch"], "ckpt": out / "seed1" / "best.pt",
            "param_ratio": res["distill"]["params"]["ratio"]}


def export_artefact(ckpt: Path, onnx_path: Path, precision: str, data_arg: str, log_file) -> dict:
    """``cpsl export`` in-process (its output goes to the log); returns its manifest."""
    from cpsl.deploy.cli import export
    args = ["--ckpt", str(ckpt), "--onnx", str(onnx_path), "--precision", precision, "--data", data_arg]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        export.main(args=args, standalone_mode=False)
    log_file.write(f"$ cpsl export {shlex.join(args)}\n{buf.getvalue()}\n")
    return json.loads(onnx_path.with_name(f"{onnx_path.stem}.manifest.json").read_text())


def onnx_graph_params(path: Path) -> int:
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(path))
    return int(sum(numpy_helper.to_array(t).size for t in m.graph.initializer))


def size_breakdown(path: Path, k: int = 8) -> dict:
    """Where the bytes of an ONNX file are: initializers, Constant nodes, the rest (graph structure,
    names); and the largest tensors of either kind."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(path))
    rows = []
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        rows.append({"name": t.name, "kind": "initializer", "dtype": str(a.dtype), "shape": list(a.shape),
                     "bytes": int(a.nbytes)})
    for n in m.graph.node:
        if n.op_type == "Constant":
            for at in n.attribute:
                if at.name == "value":
                    a = numpy_helper.to_array(at.t)
                    rows.append({"name": n.output[0], "kind": "Constant", "dtype": str(a.dtype),
                                 "shape": list(a.shape), "bytes": int(a.nbytes)})
    file_bytes = path.stat().st_size
    init = sum(r["bytes"] for r in rows if r["kind"] == "initializer")
    const = sum(r["bytes"] for r in rows if r["kind"] == "Constant")
    by_dtype: dict[str, int] = {}
    for r in rows:
        by_dtype[r["dtype"]] = by_dtype.get(r["dtype"], 0) + r["bytes"]
    rows.sort(key=lambda r: -r["bytes"])
    return {"file_bytes": file_bytes, "initializer_bytes": init, "constant_bytes": const,
            "other_bytes": file_bytes - init - const, "nodes": len(m.graph.node), "tensor_bytes_by_dtype": by_dtype,
            "largest": [dict(r, share=r["bytes"] / file_bytes) for r in rows[:k]]}


# ---------------------------------------------------------------------------- variants
class Variant:
    """One thing to measure: a row of the tables plus the callables that run it."""

    def __init__(self, name, model, runtime, precision, device, path=None, params=None, graph_params=None,
                 run_fn=None, predict_fn=None, sync=None, note=""):
        self.row = {"name": name, "model": model, "runtime": runtime, "precision": precision, "device": device,
                    "file": None, "bytes": None, "params": params, "graph_params": graph_params,
                    "latency": {}, "metrics": None, "retention": None, "note": note, "errors": []}
        if path is not None:
            path = Path(path)
            self.row["file"] = path.name
            self.row["bytes"] = path.stat().st_size
        self.path = path
        self.run_fn = run_fn            # run_fn(batch) -> makes a callable timed by measure()
        self.predict_fn = predict_fn    # predict_fn(split) -> (N,) predictions
        self.sync = sync or (lambda: None)


def torch_variant(name, model, precision, device, weights_path, autocast=False):
    from cpsl.data.batch import iterate
    mods = model.modalities
    dev = torch.device(device)

    def ctx():
        if autocast:
            return torch.autocast(dev.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def make(feeds):
        x, mask = torch_inputs(feeds, mods, dev)

        def call():
            with torch.inference_mode(), ctx():
                return model.predict(x, mask)
        return call

    @torch.inference_mode()
    def predict(split):
        out = []
        for b in iterate(split, 64, modalities=mods):
            b = b.to(dev)
            with ctx():
                out.append(model.predict(b.x, b.mask).float().cpu().numpy())
        return np.concatenate(out)

    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    return Variant(name, "teacher" if name.startswith("teacher") else "student", "pytorch-eager", precision, device,
                   weights_path, params=model.num_parameters(), run_fn=make, predict_fn=predict, sync=sync,
                   note="autocast float16" if autocast else "")


def ort_variant(name, model_kind, precision, path: Path, mods, threads: int):
    from cpsl.deploy import onnx as ox
    sess = ox.ort_session(path, threads=threads)

    def make(feeds):
        f = {k: feeds[k] for k in ox.input_names(mods)}
        return lambda: sess.run([ox.OUTPUT_NAME], f)

    return Variant(name, model_kind, "onnxruntime", precision, "cpu", path, graph_params=onnx_graph_params(path),
                   run_fn=make, predict_fn=lambda split: ox.ort_predict(sess, split, mods, batch_size=64))


def cuda_graph_variant(name, model, eager_metrics_from: str):
    """The student's predict captured once per input shape in a CUDA graph and replayed."""
    mods = model.modalities
    graphs, keep = {}, {}

    def make(feeds):
        x, mask = torch_inputs(feeds, mods, "cuda")
        with torch.inference_mode():
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    model.predict(x, mask)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = model.predict(x, mask)
            ref = model.predict(x, mask)
            g.replay()
            torch.cuda.synchronize()
            B = len(next(iter(feeds.values())))
            graphs[B] = float((out - ref).abs().max())
        keep[B] = (g, x, mask, out)     # the graph reads and writes these addresses: keep them alive
        return g.replay

    v = Variant(name, "student", "cuda-graph", "fp32", "cuda", None, params=model.num_parameters(), run_fn=make,
                predict_fn=None, sync=torch.cuda.synchronize,
                note=f"replay only (inputs resident on the GPU); metrics of {eager_metrics_from}")
    v.graph_diffs = graphs
    return v


def measure_all(variants: list[Variant], inputs: dict, iters: int, warmup: int, rounds: int,
                budget_s: float, say) -> None:
    """Latency of every variant at every batch size. Per batch size: warm-up, then ``rounds``
    rounds in which every variant runs its share of iterations (interleaved)."""
    for B, feeds in inputs.items():
        calls, n_iter, times, cpu = {}, {}, {}, {}
        for v in variants:
            try:
                fn = v.run_fn(feeds)
                for _ in range(warmup):
                    fn()
                    v.sync()
                t0 = time.perf_counter()
                fn()
                v.sync()
                est = max(time.perf_counter() - t0, 1e-6)
                n_iter[v.row["name"]] = int(min(iters, max(10, budget_s / est)))
                calls[v.row["name"]] = (fn, v)
                times[v.row["name"]], cpu[v.row["name"]] = [], []
            except Exception as e:  # noqa: BLE001 - one failing variant must not sink the run
                v.row["errors"].append(f"batch {B}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        for r in range(rounds):
            for name, (fn, v) in calls.items():
                share = math.ceil(n_iter[name] / rounds)
                for _ in range(share):
                    c0, t0 = time.process_time(), time.perf_counter()
                    fn()
                    v.sync()
                    t1, c1 = time.perf_counter(), time.process_time()
                    times[name].append((t1 - t0) * 1e3)
                    cpu[name].append((c1 - c0) * 1e3)
        for name, (fn, v) in calls.items():
            v.row["latency"][f"b{B}"] = _percentiles(times[name], cpu[name] if v.row["device"] == "cpu" else None)
        say(f"  batch {B}: " + ", ".join(f"{n} {v.row['latency'][f'b{B}']['p50_ms']:.2f}"
                                           for n, (_, v) in calls.items()) + " ms p50")


# ---------------------------------------------------------------------------- profiles
def ort_profile(path: Path, feeds: dict, mods, threads: int, runs: int, prefix: Path, top: int = 10) -> dict:
    """Per-op time of an ONNX Runtime session (CPU), averaged over ``runs`` runs after 3 warm-up runs."""
    import onnxruntime as ort

    from cpsl.deploy import onnx as ox
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    so.enable_profiling = True
    so.profile_file_prefix = str(prefix)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    f = {k: feeds[k] for k in ox.input_names(mods)}
    for _ in range(3 + runs):
        sess.run([ox.OUTPUT_NAME], f)
    prof_file = sess.end_profiling()
    events = json.loads(Path(prof_file).read_text())
    run_ev = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                    key=lambda e: e["ts"])
    start = run_ev[3]["ts"] if len(run_ev) > 3 else 0
    run_ev = [e for e in run_ev if e["ts"] >= start]
    by_op: dict[str, list] = {}
    for e in events:
        if e.get("cat") != "Node" or e["ts"] < start or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        s = by_op.setdefault(op, [0.0, 0])
        s[0] += e["dur"]
        s[1] += 1
    n = max(len(run_ev), 1)
    node_us = sum(v[0] for v in by_op.values()) / n
    run_us = sum(e["dur"] for e in run_ev) / n
    ops = sorted(({"op": k, "ms_per_run": v[0] / n / 1e3, "calls_per_run": v[1] / n,
                   "share_of_node_time": (v[0] / n) / node_us if node_us else 0.0} for k, v in by_op.items()),
                 key=lambda r: -r["ms_per_run"])
    Path(prof_file).unlink(missing_ok=True)
    # the fused graph ORT actually runs: how many nodes of each type
    return {"model": path.name, "runs": n, "run_ms": run_us / 1e3, "node_ms": node_us / 1e3,
            "framework_overhead_share": 1 - node_us / run_us if run_us else None, "top_ops": ops[:top],
            "node_types_executed": {k: round(v[1] / n, 1) for k, v in by_op.items()}}


@contextlib.contextmanager
def _stderr_to(f):
    """Redirect file descriptor 2 (the profiler's native library prints there) into ``f``."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        os.dup2(f.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def torch_profile(fn, runs: int, log_file, top: int = 10) -> dict:
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    log_file.flush()
    with _stderr_to(log_file):
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                fn()
        wall = (time.perf_counter() - t0) / runs
    ka = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total_self = sum(e.self_cpu_time_total for e in ka)
    rows = [{"op": e.key, "self_ms_per_run": e.self_cpu_time_total / runs / 1e3, "calls_per_run": e.count / runs,
             "share_of_self_time": e.self_cpu_time_total / total_self if total_self else 0.0} for e in ka[:top]]
    n_ops = sum(e.count for e in ka) / runs
    return {"runs": runs, "wall_ms_per_run_profiled": wall * 1e3, "ops_per_run": n_ops, "top_ops": rows}


# ---------------------------------------------------------------------------- subprocess benches
def run_cp_kernel(script: Path, device: str, threads: int, work: Path, timeout: int) -> dict:
    if not script.is_file():
        return {"error": f"unavailable: {script} not found"}
    out = work / "cp_kernel.json"
    cmd = [sys.executable, str(script), "--quick", "--json", str(out), "--device", device]
    if device == "cpu":
        cmd += ["--threads", str(threads)]
    res = {"command": " ".join(["python", _rel(script), "--quick", "--device", device]
                               + (["--threads", str(threads)] if device == "cpu" else []))}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_subprocess_env(threads))
    except subprocess.TimeoutExpired:
        return dict(res, error=f"timed out after {timeout} s")
    res["returncode"] = p.returncode
    if out.is_file():
        try:
            j = json.loads(out.read_text())
            res.update(rows=j.get("rows", []), checks=j.get("checks", {}), machine=j.get("machine"))
        except ValueError as e:
            res["error"] = f"unreadable JSON: {e}"
    if p.returncode != 0:
        res["error"] = (res.get("error", "") + f" exit {p.returncode}: {_tail(p.stderr or p.stdout, 3)}").strip()
    elif "rows" not in res:
        res["error"] = "no JSON written"
    return res


def run_train_step(script: Path, device: str, threads: int, steps: int, warmup: int, work: Path,
                   timeout: int) -> dict:
    if not script.is_file():
        return {"error": f"unavailable: {script} not found"}
    out = work / "train_step.json"
    cmd = [sys.executable, str(script), "--device", device, "--steps", str(steps), "--warmup", str(warmup),
           "--json", str(out)]
    res = {"command": f"OMP_NUM_THREADS={threads} python {_rel(script)} --device {device} --steps {steps} "
                      f"--warmup {warmup}"}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_subprocess_env(threads))
    except subprocess.TimeoutExpired:
        return dict(res, error=f"timed out after {timeout} s")
    res["returncode"] = p.returncode
    if p.returncode != 0 or not out.is_file():
        return dict(res, error=f"exit {p.returncode}: {_tail(p.stderr or p.stdout, 3)}")
    j = json.loads(out.read_text())
    res.update(rows=j.get("rows", []), meta=j.get("meta", {}))
    return res


def run_runner(runner: Path, model: Path, golden: Path, lengths: dict, threads: int, iters: int,
               work: Path, timeout: int = 300) -> dict:
    """``export/runner.py MODEL --check GOLDEN --bench`` in a separate, torch-free process."""
    out = work / f"runner_{model.stem}.json"
    ln = ",".join(f"{m}={L}" for m, L in lengths.items())
    cmd = [sys.executable, str(runner), str(model), "--bench", "--batch", ",".join(map(str, BATCHES)),
           "--iters", str(iters), "--len", ln, "--json", str(out), "--assert-no-torch"]
    if golden is not None and golden.is_file():
        cmd += ["--check", str(golden)]
    if model.suffix == ".onnx":
        cmd += ["--threads", str(threads)]
    res = {"command": f"python export/runner.py {model.name}"
                      + (f" --check {golden.name}" if golden is not None and golden.is_file() else "")
                      + f" --bench --batch {','.join(map(str, BATCHES))} --iters {iters} --len {ln}"
                      + (f" --threads {threads}" if model.suffix == ".onnx" else "") + " --assert-no-torch"}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_subprocess_env(threads))
    except subprocess.TimeoutExpired:
        return dict(res, error=f"timed out after {timeout} s")
    res["returncode"] = p.returncode
    if out.is_file():
        j = json.loads(out.read_text())
        res["check_ok"] = j.get("check", {}).get("ok")
        res["bench"] = j.get("bench")
    if p.returncode != 0:
        res["error"] = f"exit {p.returncode}: {_tail(p.stderr or p.stdout, 3)}"
    return res


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return str(p)


# ---------------------------------------------------------------------------- report
def _f(v, fmt="{:.3f}", none="—"):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return fmt.format(v)


def _row_label(r: dict) -> str:
    return f"{r['name']} ({r['device']})"


def compute_summary(rows: list[dict], info: dict, eval_split: str) -> tuple[dict, list[dict]]:
    def find(name, device="cpu"):
        return next((r for r in rows if r["name"] == name and r["device"] == device), None)

    t, s8 = find("teacher pytorch-fp32"), find("student ort-int8")

    def lat(r, b="b1"):
        return (r or {}).get("latency", {}).get(b, {}).get("p50_ms")

    def met(r, k):
        return ((r or {}).get("metrics") or {}).get(k)

    def cpu(r, b="b1"):
        return (r or {}).get("latency", {}).get(b, {}).get("cpu_p50_ms")

    sp = lat(t) / lat(s8) if lat(t) and lat(s8) else None
    sp_cpu = cpu(t) / cpu(s8) if cpu(t) and cpu(s8) else None
    woc = [r["latency"][b]["wall_over_cpu"] for r in rows if r["device"] == "cpu"
           for b in ("b1", "b32") if "wall_over_cpu" in r["latency"].get(b, {})]
    sp32 = lat(t, "b32") / lat(s8, "b32") if lat(t, "b32") and lat(s8, "b32") else None
    ret = met(s8, "Non0_acc_2") / met(t, "Non0_acc_2") if met(s8, "Non0_acc_2") and met(t, "Non0_acc_2") else None
    mae = met(s8, "MAE") / met(t, "MAE") - 1 if met(s8, "MAE") is not None and met(t, "MAE") else None
    summary = {
        "speedup_int8_vs_teacher_b1": sp,
        "retention_non0_acc2": ret,
        "mae_increase": mae,
        "student_int8_bytes": (s8 or {}).get("bytes"),
        "speedup_int8_vs_teacher_b32": sp32,
        "speedup_int8_vs_teacher_b1_cpu_time": sp_cpu,
        "max_wall_over_cpu": max(woc) if woc else None,
        "teacher_fp32_eager_b1_p50_ms": lat(t), "student_int8_ort_b1_p50_ms": lat(s8),
        "teacher_Non0_acc_2": met(t, "Non0_acc_2"), "student_int8_Non0_acc_2": met(s8, "Non0_acc_2"),
        "teacher_MAE": met(t, "MAE"), "student_int8_MAE": met(s8, "MAE"),
        "eval_split": eval_split, "threads": info["threads"],
        "machine": describe_machine(info),
    }
    targets = [
        {"key": "speedup_int8_vs_teacher_b1", "what": "student int8 ORT batch-1 speed-up vs teacher fp32 eager "
         "PyTorch (p50, same CPU)", "value": sp, "op": ">=", "threshold": TARGET_SPEEDUP, "fmt": "{:.2f}x"},
        {"key": "retention_non0_acc2", "what": "int8 Non0_acc_2 / teacher Non0_acc_2", "value": ret, "op": ">=",
         "threshold": TARGET_RETENTION, "fmt": "{:.2%}"},
        {"key": "mae_increase", "what": "int8 MAE / teacher MAE - 1", "value": mae, "op": "<=",
         "threshold": TARGET_MAE_INCREASE, "fmt": "{:+.2%}"},
        {"key": "student_int8_bytes", "what": "int8 student .onnx on disk (1 MB = 10^6 bytes)",
         "value": summary["student_int8_bytes"], "op": "<=", "threshold": TARGET_INT8_BYTES, "fmt": "{:,} B"},
    ]
    for tg in targets:
        v = tg["value"]
        ok = v is not None and (v >= tg["threshold"] if tg["op"] == ">=" else v <= tg["threshold"])
        tg["status"] = "PASS" if ok else "MISS"
    summary["targets"] = {tg["key"]: tg["status"] for tg in targets}
    return summary, targets


def next_steps(targets, rows, profiles, breakdown, sizes) -> dict:
    """Per missed target: an explanation built from the measured profile and a next step."""
    out = {}
    by = {(r["name"], r["device"]): r for r in rows}
    st = {t["key"]: t for t in targets}
    if st["speedup_int8_vs_teacher_b1"]["status"] == "MISS":
        lines = []
        op = profiles.get("ort_int8_b1") or {}
        s32, s8 = by.get(("student ort-fp32", "cpu")), by.get(("student ort-int8", "cpu"))
        t = by.get(("teacher pytorch-fp32", "cpu"))
        if st["speedup_int8_vs_teacher_b1"]["value"] is None:
            lines.append("the speed-up could not be measured (see the errors in the latency table).")
        else:
            l8 = s8["latency"]["b1"]["p50_ms"]
            lines.append(f"teacher eager b1 p50 {t['latency']['b1']['p50_ms']:.3f} ms vs student int8 ORT "
                         f"{l8:.3f} ms.")
            tc, qc = t["latency"]["b1"].get("cpu_p50_ms"), s8["latency"]["b1"].get("cpu_p50_ms")
            if tc and qc:
                lines.append(f"In CPU time {tc:.3f} vs {qc:.3f} ms ({tc / qc:.2f}x); wall/CPU "
                             f"{t['latency']['b1']['wall_over_cpu']:.2f} and {s8['latency']['b1']['wall_over_cpu']:.2f}.")
            if s32 and s32["latency"].get("b1"):
                l32 = s32["latency"]["b1"]["p50_ms"]
                lines.append(f"student fp32 ORT b1 p50 {l32:.3f} ms: int8 is {l32 / l8:.2f}x of fp32 "
                             + ("(quantization buys nothing at batch 1 here)." if l32 / l8 < 1.1 else "."))
            if op.get("top_ops"):
                top = ", ".join(f"{o['op']} {o['share_of_node_time']:.0%}" for o in op["top_ops"][:5])
                lines.append(f"ORT int8 b1 profile (times inflated by the profiler; read the shares): "
                             f"{op['node_ms']:.3f} ms in kernels of {op['run_ms']:.3f} ms per run; top ops: {top}.")
                qdq = sum(o["share_of_node_time"] for o in op["top_ops"]
                          if o["op"] in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"))
                if qdq > 0.2:
                    lines.append(f"(De)QuantizeLinear alone take {qdq:.0%} of the kernel time: at this size the "
                                 "int8 conversions cost more than the int8 MatMuls save.")
            tp = profiles.get("torch_teacher_b1") or {}
            if tp.get("top_ops"):
                top = ", ".join(f"{o['op']} {o['share_of_self_time']:.0%}" for o in tp["top_ops"][:4])
                lines.append(f"PyTorch teacher b1: {tp['ops_per_run']:.0f} operator calls per run; top: {top}.")
        steps = []
        if s32 and s8 and t and s32["latency"].get("b1") and s8["latency"].get("b1"):
            tb1, f32, i8 = t["latency"]["b1"]["p50_ms"], s32["latency"]["b1"]["p50_ms"], s8["latency"]["b1"]["p50_ms"]
            if f32 < i8:
                steps.append(f"at batch 1 the fp32 student on ONNX Runtime is the faster CPU artefact "
                             f"({tb1 / f32:.1f}x the teacher vs {tb1 / i8:.1f}x for int8): the student is too small "
                             "for int8 arithmetic to pay for the (de)quantization around it")
            b32_32, b32_8 = s32["latency"].get("b32", {}).get("p50_ms"), s8["latency"].get("b32", {}).get("p50_ms")
            if b32_32 and b32_8:
                steps.append(f"at batch 32 int8 runs at {b32_32 / b32_8:.2f}x of fp32")
        steps.append("quantize only the large projection MatMuls (the attention MatMuls QK^T and AV already "
                     "stay in float by default) or ship the fp32 student on CPU")
        steps.append("rerun on an idle machine with all cores (`--threads` = core count); on the Jetson the "
                     "number that decides is TensorRT's (`--device cuda`)")
        out["speedup_int8_vs_teacher_b1"] = {"explanation": lines, "next_step": "; ".join(steps) + "."}
    for key in ("retention_non0_acc2", "mae_increase"):
        if st[key]["status"] != "MISS":
            continue
        b = breakdown or {}
        lines = []
        if b:
            lines.append(f"Non0_acc_2 teacher {_f(b.get('teacher_Non0_acc_2'), '{:.4f}')} → student fp32 "
                         f"{_f(b.get('student_fp32_Non0_acc_2'), '{:.4f}')} (distillation) → int8 "
                         f"{_f(b.get('student_int8_Non0_acc_2'), '{:.4f}')} (quantization); MAE "
                         f"{_f(b.get('teacher_MAE'), '{:.4f}')} → {_f(b.get('student_fp32_MAE'), '{:.4f}')} → "
                         f"{_f(b.get('student_int8_MAE'), '{:.4f}')}.")
            lines.append(f"int8 vs student fp32 predictions: mean |Δ| {_f(b.get('int8_vs_fp32_mean_abs'), '{:.4f}')}, "
                         f"max |Δ| {_f(b.get('int8_vs_fp32_max_abs'), '{:.4f}')}.")
        dom = b.get("dominant_loss")
        if dom == "quantization":
            step = ("the loss is in quantization: more calibration "
                    "batches or `--calib-method entropy|minmax`, or keep the first projection in float; "
                    "quantization-aware fine-tuning if that is not enough.")
        elif dom == "distillation":
            step = ("the loss is in distillation: train the student longer (the --quick run uses few epochs), "
                    "raise --lambda-kd, or a wider student (--set model.d=48, still under the 15% parameter cap).")
        else:
            step = "compare on more data (the evaluation split is small) and rerun without --quick."
        out[key] = {"explanation": lines, "next_step": step}
    if st["student_int8_bytes"]["status"] == "MISS" and sizes:
        lines = [f"{sizes['file_bytes']:,} bytes: initializers {sizes['initializer_bytes']:,}, Constant nodes "
                 f"{sizes['constant_bytes']:,}, graph structure {sizes['other_bytes']:,}; largest: " + ", ".join(
                     f"{x['name']} {x['dtype']}{x['shape']} {x['bytes'] / 1024:.0f} KiB" for x in sizes["largest"][:5])]
        out["student_int8_bytes"] = {"explanation": lines, "next_step": (
            "quantize the remaining float tensors, cut the positional table (model.max_len) to the data's longest "
            "sequence, or choose a smaller student.")}
    return out


def write_markdown(path: Path, res: dict) -> None:
    s, info, st = res["summary"], res["machine"], res["settings"]
    L = []
    L.append("# cpsl edge benchmark\n")
    L.append(f"Command: `{res['command']}`  ")
    L.append(f"Written {res['created']} in {res['total_s']:.0f} s.  ")
    L.append(f"Machine: {describe_machine(info)}; load average at start {info.get('loadavg_start')}, "
             f"at end {info.get('loadavg_end')} "
             + ("(the CPU was shared with other jobs: timings are noisy" if res.get("shared_machine")
                else "(no other load seen")
             + (f"; calls took up to {s['max_wall_over_cpu']:.2f}x their CPU time" if s.get("max_wall_over_cpu") else "")
             + ").  ")
    L.append(f"TensorRT: {info.get('tensorrt')}.  ")
    L.append(f"Data: `{st['data']}`; evaluation split **{st['eval_split']}** ({st['eval_n']} samples). "
             f"Latency inputs: real rows of that split at fixed lengths "
             f"{', '.join(f'{m}={v}' for m, v in st['lengths'].items())} ({st['length_rule']}); "
             f"batch {', '.join(map(str, BATCHES))}; {st['threads']} threads for PyTorch and ONNX Runtime "
             f"(intra-op; inter-op 1); up to {st['iters']} iterations per variant and batch in "
             f"{st['rounds']} interleaved rounds; host-to-host wall time.\n")
    L.append("## Targets\n")
    L.append("| target | value | threshold | status |")
    L.append("|---|---:|---:|---|")
    for t in res["targets"]:
        L.append(f"| {t['what']} | {_f(t['value'], t['fmt'])} | {t['op']} {t['fmt'].format(t['threshold'])} | "
                 f"**{t['status']}** |")
    L.append("")
    for key, ns in res.get("misses", {}).items():
        L.append(f"**{key} — MISS.** " + " ".join(ns["explanation"]) + f"  \n*Next step:* {ns['next_step']}\n")
    L.append("## Latency (ms)\n")
    L.append("| variant | device | b1 p50 | b1 p90 | b1 p99 | b1 CPU p50 | b32 p50 | b32 p90 | b32 p99 | b32 CPU p50 "
             "| b32 samples/s | wall/CPU b1, b32 | iters b1/b32 |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in res["rows"]:
        a, b = r["latency"].get("b1", {}), r["latency"].get("b32", {})
        thr = 32 / (b["p50_ms"] / 1e3) if b.get("p50_ms") else None
        L.append(f"| {r['name']} | {r['device']} | {_f(a.get('p50_ms'))} | {_f(a.get('p90_ms'))} | "
                 f"{_f(a.get('p99_ms'))} | {_f(a.get('cpu_p50_ms'))} | {_f(b.get('p50_ms'))} | {_f(b.get('p90_ms'))} | "
                 f"{_f(b.get('p99_ms'))} | {_f(b.get('cpu_p50_ms'))} | {_f(thr, '{:,.0f}')} | "
                 f"{_f(a.get('wall_over_cpu'), '{:.2f}')}, {_f(b.get('wall_over_cpu'), '{:.2f}')} | "
                 f"{a.get('iters', '—')}/{b.get('iters', '—')} |")
    L.append("\np50/p90/p99: wall time of one call, host inputs to host output (CUDA rows: inputs already on the "
             "GPU). CPU p50: process CPU time of the same calls (all threads). wall/CPU: median ratio per call; "
             f"with {st['threads']} thread(s) on an idle machine it is about "
             f"{'1' if st['threads'] == 1 else 'at most 1 (parallel) or above 1 (threads waiting)'}"
             "; above that the process was waiting for the CPU, which stretches long calls more than short ones. "
             "p99 over fewer than 100 iterations is close to the maximum.\n")
    if s.get("speedup_int8_vs_teacher_b1_cpu_time"):
        L.append(f"CPU-time speed-up (teacher eager / int8 ORT, batch 1): "
                 f"{s['speedup_int8_vs_teacher_b1_cpu_time']:.2f}x "
                 f"(wall-clock: {_f(s['speedup_int8_vs_teacher_b1'], '{:.2f}x')}).\n")
    L.append("## Accuracy, size\n")
    L.append(f"MMSA metrics on **{st['eval_split']}**; retention = variant / teacher fp32 (PyTorch).\n")
    L.append("| variant | device | MAE | Corr | Non0_acc_2 | Has0_acc_2 | Mult_acc_7 | Non0 retention | MAE change "
             "| params | graph elems | file | bytes |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in res["rows"]:
        m, rt = r.get("metrics") or {}, r.get("retention") or {}
        L.append(f"| {r['name']} | {r['device']} | {_f(m.get('MAE'), '{:.4f}')} | {_f(m.get('Corr'), '{:.4f}')} | "
                 f"{_f(m.get('Non0_acc_2'), '{:.4f}')} | {_f(m.get('Has0_acc_2'), '{:.4f}')} | "
                 f"{_f(m.get('Mult_acc_7'), '{:.4f}')} | {_f(rt.get('Non0_acc_2'), '{:.2%}')} | "
                 f"{_f(rt.get('MAE_increase_rel'), '{:+.2%}')} | {_f(r.get('params'), '{:,}')} | "
                 f"{_f(r.get('graph_params'), '{:,}')} | {r.get('file') or '—'} | {_f(r.get('bytes'), '{:,}')} |")
    L.append("\nparams: trainable parameters of the checkpoint (all heads); graph elems: elements of the ONNX "
             "initializers (the deployment path only: fused prediction, no auxiliary heads). PyTorch files "
             "hold the state_dict only (no optimizer).\n")
    errs = [(r["name"], r["device"], e) for r in res["rows"] for e in r.get("errors", [])]
    if errs:
        L.append("Errors: " + "; ".join(f"{n} ({d}): {e}" for n, d, e in errs) + "\n")
    L.append("![latency vs MAE](pareto.png)\n")
    b = res.get("accuracy_breakdown")
    if b:
        L.append("## Where the accuracy goes\n")
        L.append("| step | Non0_acc_2 | MAE |")
        L.append("|---|---:|---:|")
        for k, lab in (("teacher", "teacher fp32"), ("student_fp32", "student fp32 (distillation)"),
                       ("student_int8", "student int8 (quantization)")):
            L.append(f"| {lab} | {_f(b.get(f'{k}_Non0_acc_2'), '{:.4f}')} | {_f(b.get(f'{k}_MAE'), '{:.4f}')} |")
        L.append(f"\nint8 vs fp32 student predictions on {st['eval_split']}: mean |Δ| "
                 f"{_f(b.get('int8_vs_fp32_mean_abs'), '{:.4f}')}, max |Δ| {_f(b.get('int8_vs_fp32_max_abs'), '{:.4f}')}. "
                 f"Largest loss: {b.get('dominant_loss') or '—'}.\n")
    pr = res.get("profiles", {})
    if pr and not pr.get("skipped"):
        L.append("## Profiles (batch 1)\n")
        op = pr.get("ort_int8_b1")
        if op and "top_ops" in op:
            un = next((r["latency"].get("b1", {}).get("p50_ms") for r in res["rows"]
                       if r["name"] == "student ort-int8" and r["device"] == "cpu"), None)
            L.append(f"ONNX Runtime, student int8 (`SessionOptions.enable_profiling`, {op['runs']} runs): "
                     f"{op['run_ms']:.3f} ms per run under the profiler ({_f(un)} ms p50 without it), "
                     f"{op['node_ms']:.3f} ms of it in kernels. Shares are of the kernel time.\n")
            L.append("| op | ms/run | calls/run | share |")
            L.append("|---|---:|---:|---:|")
            for o in op["top_ops"]:
                L.append(f"| {o['op']} | {o['ms_per_run']:.4f} | {o['calls_per_run']:.0f} | {o['share_of_node_time']:.1%} |")
            L.append("")
        for key, lab in (("torch_teacher_b1", "PyTorch profiler, teacher fp32 eager"),
                         ("torch_student_b1", "PyTorch profiler, student fp32 eager")):
            tp = pr.get(key)
            if tp and "top_ops" in tp:
                L.append(f"{lab} ({tp['runs']} runs, {tp['ops_per_run']:.0f} operator calls per run, "
                         f"{tp['wall_ms_per_run_profiled']:.3f} ms per run under the profiler):\n")
                L.append("| op | self ms/run | calls/run | share |")
                L.append("|---|---:|---:|---:|")
                for o in tp["top_ops"]:
                    L.append(f"| `{o['op']}` | {o['self_ms_per_run']:.4f} | {o['calls_per_run']:.0f} | "
                             f"{o['share_of_self_time']:.1%} |")
                L.append("")
        for key in ("ort_int8_b1", "torch_teacher_b1", "torch_student_b1"):
            if isinstance(pr.get(key), dict) and "error" in pr[key]:
                L.append(f"{key}: {pr[key]['error']}\n")
    sz = res.get("int8_size_breakdown")
    if sz:
        L.append(f"Size of the int8 file ({sz['file_bytes']:,} bytes, {sz['nodes']} nodes): initializers "
                 f"{sz['initializer_bytes']:,} B, Constant nodes {sz['constant_bytes']:,} B, graph structure and names "
                 f"{sz['other_bytes']:,} B. Tensor bytes by type: "
                 + ", ".join(f"{k} {v:,} B" for k, v in sz["tensor_bytes_by_dtype"].items()) + ". Largest: "
                 + ", ".join(f"`{x['name']}` ({x['kind']}, {x['dtype']} {x['shape']}, {x['bytes'] / 1024:.1f} KiB)"
                             for x in sz["largest"][:4]) + ".\n")
    rc = res.get("runner", {})
    L.append("## Torch-free runner (`export/runner.py`, separate process)\n")
    L.append("The runner times its own inputs: random features with all-ones masks (no padding) at the same "
             "lengths, where the table above uses real rows with their padding. Not the same workload: compare "
             "runner numbers with runner numbers.\n")
    if rc.get("skipped"):
        L.append(f"skipped ({rc['skipped']})\n")
    else:
        for k, v in rc.items():
            if not isinstance(v, dict):
                continue
            line = f"- `{k}`: "
            if v.get("error"):
                line += f"error: {v['error']}"
            else:
                ok = v.get("check_ok")
                line += f"golden check {'passed' if ok else 'FAILED' if ok is False else '—'}"
                for bb in v.get("bench") or []:
                    line += f"; batch {bb['batch']} p50 {bb['p50_ms']:.3f} ms (p99 {bb['p99_ms']:.3f})"
            L.append(line)
        L.append("")
    L.append("## TensorRT\n")
    trt = res.get("tensorrt", {})
    L.append((trt.get("status") or "—") + "\n")
    L.append("## CP kernel (`bench/cp_kernel.py --quick`)\n")
    ck = res.get("cp_kernel", {})
    if ck.get("skipped"):
        L.append(f"skipped ({ck['skipped']})\n")
    else:
        if ck.get("error"):
            L.append(f"error: {ck['error']}\n")
        if ck.get("rows"):
            L.append(f"`{ck.get('command')}`\n")
            L.append("| set | backend | device | ms | vs foreach | params | tensors |")
            L.append("|---|---|---|---:|---:|---:|---:|")
            for r in ck["rows"]:
                base = next((x["ms"] for x in ck["rows"] if x["set"] == r["set"] and x["backend"] == "foreach"), None)
                spd = f"{base / r['ms']:.2f}x" if base and r["backend"] != "bandwidth_floor" and r["ms"] else ""
                L.append(f"| {r['set']} | {r['backend']} | {r['device']} | {r['ms']:.3f} | {spd} | "
                         f"{r.get('params', 0):,} | {r.get('tensors', '')} |")
            L.append("")
    L.append("## CP inside a training step (`bench/train_step.py`)\n")
    ts = res.get("train_step", {})
    if ts.get("skipped"):
        L.append(f"skipped ({ts['skipped']})\n")
    else:
        if ts.get("error"):
            L.append(f"error: {ts['error']}\n")
        if ts.get("rows"):
            L.append(f"`{ts.get('command')}` (teacher model, batch {ts.get('meta', {}).get('batch_size')})\n")
            L.append("| variant | ms/step (median) | overhead vs none | steps |")
            L.append("|---|---:|---:|---:|")
            for r in ts["rows"]:
                L.append(f"| {r['variant']} | {r['ms_median']:.2f} | {_f(r.get('overhead_pct'), '{:+.1f}%')} | "
                         f"{r['steps']} |")
            L.append("\nFew steps in --quick: the overhead column is within the step-to-step noise.\n")
    L.append("## Run\n")
    t, sd = res["teacher"], res["student"]
    L.append(f"Teacher: {t['source']} ({t.get('epochs_run', '—')} epochs, best {t.get('best_epoch', '—')}), "
             f"{_f(t.get('params'), '{:,}')} parameters. Student: {sd['source']} ({sd.get('epochs_run', '—')} epochs, "
             f"best {sd.get('best_epoch', '—')}), {_f(sd.get('params'), '{:,}')} parameters.  ")
    L.append("Stages: " + ", ".join(f"{x['stage']} {x['seconds']:.0f} s" for x in res["stages"]) + ".\n")
    path.write_text("\n".join(L) + "\n")


def write_pareto(path: Path, rows: list[dict], subtitle: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, ScalarFormatter

    def xy(r):
        return r["latency"]["b1"]["p50_ms"], r["metrics"]["MAE"]

    pts = [r for r in rows if r["latency"].get("b1", {}).get("p50_ms") and (r.get("metrics") or {}).get("MAE") is not None]
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    colors = {"teacher": "tab:red", "student": "tab:blue"}
    markers = {"cpu": "o", "cuda": "s"}
    # labels: alternate above/below along x so that neighbours do not overprint each other
    for i, r in enumerate(sorted(pts, key=lambda r: xy(r)[0])):
        x, y = xy(r)
        ax.scatter([x], [y], c=colors.get(r["model"], "k"), marker=markers.get(r["device"], "^"), s=45, zorder=3)
        dy = 10 + 9 * (i % 3)
        ax.annotate(_row_label(r), (x, y), textcoords="offset points", xytext=(4, dy if i % 2 == 0 else -dy - 6),
                    fontsize=8, arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "gray"})
    # Pareto front: points that no other point beats on both latency and MAE (MAE within 1e-4
    # relative counts as equal: fp32 PyTorch and ONNX Runtime differ only by rounding)
    def beats(q, p):
        return q is not p and xy(q)[0] <= xy(p)[0] and xy(q)[1] <= xy(p)[1] * (1 + 1e-4) and xy(q) != xy(p)

    front = sorted((p for p in pts if not any(beats(q, p) for q in pts)), key=lambda p: xy(p)[0])
    if len(front) > 1:
        ax.plot([xy(p)[0] for p in front], [xy(p)[1] for p in front], "--", c="gray", lw=1, zorder=2,
                label="Pareto front")
        ax.legend(loc="upper center", fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(LogLocator(subs=(2, 3, 5)))
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.margins(x=0.25, y=0.35)
    ax.set_xlabel("latency, batch 1, p50 (ms, log scale)")
    ax.set_ylabel("MAE (lower is better)")
    ax.set_title("latency vs MAE, one point per variant\n" + subtitle, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer epochs and iterations (< 5 min on 2 CPU cores)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: train there and add the CUDA rows (CPU rows are always measured)")
    ap.add_argument("--data", default="synth", help="'synth' (or synth:SEED) or an MMSA .pkl")
    ap.add_argument("--out", help="where bench.json, bench.md, pareto.png go (default: bench/results/DEVICE_quick|full)")
    ap.add_argument("--work", help="heavy artefacts (checkpoints, .onnx); default: a temporary folder removed at the end")
    ap.add_argument("--ckpt", help="teacher best.pt to use instead of training one")
    ap.add_argument("--student-ckpt", help="student best.pt to use instead of distilling one")
    ap.add_argument("--threads", type=int, default=0, help="PyTorch and ONNX Runtime threads (0: torch.get_num_threads())")
    ap.add_argument("--lengths", default="p95", choices=("p95", "max"),
                    help="latency sequence length per modality: the eval split's 95th percentile or max")
    ap.add_argument("--epochs", type=int, help="teacher epochs (default 8 quick / 30)")
    ap.add_argument("--student-epochs", type=int, help="student epochs (default 12 quick / 40)")
    ap.add_argument("--iters", type=int, help="max timed iterations per variant and batch (default 100 quick / 400)")
    ap.add_argument("--budget", type=float, help="seconds per variant and batch size (default 2 quick / 8)")
    # for tests and quick experiments
    ap.add_argument("--sizes", help=argparse.SUPPRESS)             # synthetic n_train,n_valid,n_test
    ap.add_argument("--skip", default="", help=argparse.SUPPRESS)  # comma list of SKIPPABLE stages
    ap.add_argument("--cp-kernel-script", default=str(REPO / "bench" / "cp_kernel.py"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    mode = "quick" if a.quick else "full"
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    bad = skip - set(SKIPPABLE)
    if bad:
        print(f"error: --skip accepts {', '.join(SKIPPABLE)}; got {', '.join(sorted(bad))}", file=sys.stderr)
        return 2
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    for p, what in ((a.ckpt, "--ckpt"), (a.student_ckpt, "--student-ckpt")):
        if p and not Path(p).is_file():
            print(f"error: {what} {p} not found", file=sys.stderr)
            return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    out = Path(a.out) if a.out else REPO / "bench" / "results" / f"{a.device}_{mode}"
    out.mkdir(parents=True, exist_ok=True)
    keep_work = a.work is not None
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="cpsl-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log_file = open(work / "bench.log", "w")
    P = Progress(log_file)
    from cpsl.errors import CPSLError
    try:
        return _run(a, mode, skip, threads, out, work, log_file, P)
    except CPSLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        log_file.close()
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)


def _run(a, mode, skip, threads, out, work, log_file, P) -> int:
    from cpsl.deploy import onnx as ox
    from cpsl.metrics import METRIC_KEYS, mmsa_metrics
    from cpsl.train import check_compatible, load_model, read_checkpoint

    def log(msg):
        log_file.write(str(msg) + "\n")
        log_file.flush()

    iters = a.iters or ITERS[mode]
    budget = a.budget or (2.0 if a.quick else 8.0)
    rounds = 4 if iters >= 20 else 1
    argv_str = " ".join(shlex.quote(x) for x in a.argv)
    info = machine_info(a.device, threads)
    P.say(f"machine: {describe_machine(info)}; load average {info['loadavg_start']}; work folder {work}")

    # 1. data
    with P.stage("data") as st:
        synth_seed = 0
        if a.ckpt:
            synth_seed = int(read_checkpoint(a.ckpt).get("config", {}).get("data", {}).get("synth_seed", 0))
        data, data_arg = load_bench_data(a.data, a.sizes, synth_seed, work)
        ev_name = eval_split_name(data)
        ev = data[ev_name]
        mods = data.modalities
        lengths = bench_lengths(ev, mods, a.lengths)
        inputs = {B: bench_inputs(ev, mods, lengths, B, seed=B) for B in BATCHES}
        st["note"] = (f"{a.data} ({'/'.join(str(len(s)) for s in data.splits.values())} train/valid/test), "
                      f"eval on {ev_name}, lengths {lengths}")

    # 2. teacher
    with P.stage("teacher") as st:
        if a.ckpt:
            teacher_info = {"source": f"loaded {a.ckpt}", "ckpt": Path(a.ckpt)}
            ck = read_checkpoint(a.ckpt)
            teacher_info.update(epochs_run=len(ck.get("history", [])) or None, best_epoch=ck.get("best_epoch"))
        else:
            P.say(f"teacher: training ({a.epochs or TEACHER_EPOCHS[mode]} epochs max) ...")
            teacher_info = train_teacher(data, data_arg, synth_seed, a.epochs or TEACHER_EPOCHS[mode], a.device,
                                         work / "teacher", log)
        teacher, tcfg, _ = load_model(teacher_info["ckpt"], "cpu")
        teacher.eval()
        check_compatible(teacher, data, str(teacher_info["ckpt"]))
        teacher_info["params"] = teacher.num_parameters()
        st["note"] = f"{teacher_info['source']}, {teacher_info['params']:,} parameters"

    # 3. student
    with P.stage("student") as st:
        if a.student_ckpt:
            student_info = {"source": f"loaded {a.student_ckpt}", "ckpt": Path(a.student_ckpt)}
            ck = read_checkpoint(a.student_ckpt)
            student_info.update(epochs_run=len(ck.get("history", [])) or None, best_epoch=ck.get("best_epoch"))
        else:
            P.say(f"student: distilling ({a.student_epochs or STUDENT_EPOCHS[mode]} epochs max) ...")
            student_info = distill_student(teacher_info["ckpt"], data, data_arg, synth_seed,
                                           a.student_epochs or STUDENT_EPOCHS[mode], a.device, work / "student", log)
        student, scfg, _ = load_model(student_info["ckpt"], "cpu")
        student.eval()
        check_compatible(student, data, str(student_info["ckpt"]))
        student_info["params"] = student.num_parameters()
        st["note"] = (f"{student_info['source']}, {student_info['params']:,} parameters "
                      f"({student_info['params'] / teacher_info['params']:.1%} of the teacher)")

    # 4. export (+ weights-only PyTorch files so that sizes compare like for like)
    arts = work / "artefacts"
    arts.mkdir(parents=True, exist_ok=True)
    with P.stage("export") as st:
        torch.save(teacher.state_dict(), arts / "teacher_fp32.pt")
        torch.save(student.state_dict(), arts / "student_fp32.pt")
        manifests, export_errors = {}, {}
        tck, sck = teacher_info["ckpt"], student_info["ckpt"]
        for key, ckpt, prec in (("teacher_fp32", tck, "fp32"), ("student_fp32", sck, "fp32"),
                                ("student_fp16", sck, "fp16"), ("student_int8", sck, "int8")):
            try:
                manifests[key] = export_artefact(Path(ckpt), arts / f"{key}.onnx", prec, data_arg, log_file)
            except Exception as e:  # noqa: BLE001 - recorded; the rows of that artefact are skipped
                export_errors[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log(traceback.format_exc())
        st["note"] = ", ".join(f"{k} {(arts / f'{k}.onnx').stat().st_size / 1024:.0f} KiB" for k in manifests)
        if export_errors:
            st["note"] += "; FAILED: " + ", ".join(f"{k} ({v})" for k, v in export_errors.items())

    # variants
    variants: list[Variant] = [
        torch_variant("teacher pytorch-fp32", teacher, "fp32", "cpu", arts / "teacher_fp32.pt"),
        torch_variant("student pytorch-fp32", student, "fp32", "cpu", arts / "student_fp32.pt"),
    ]
    for key, name, kind, prec in (("teacher_fp32", "teacher ort-fp32", "teacher", "fp32"),
                                  ("student_fp32", "student ort-fp32", "student", "fp32"),
                                  ("student_fp16", "student ort-fp16", "student", "fp16"),
                                  ("student_int8", "student ort-int8", "student", "int8")):
        if key in manifests:
            v = ort_variant(name, kind, prec, arts / f"{key}.onnx", mods, threads)
            v.row["params"] = (teacher_info if kind == "teacher" else student_info)["params"]
            variants.append(v)
        else:
            v = Variant(name, kind, "onnxruntime", prec, "cpu")
            v.row["errors"].append(f"export failed: {export_errors.get(key)}")
            variants.append(v)
    cuda_variants: list[Variant] = []
    if a.device == "cuda":
        import copy
        t_cuda = copy.deepcopy(teacher).to("cuda").eval()
        s_cuda = copy.deepcopy(student).to("cuda").eval()
        cuda_variants = [
            torch_variant("teacher pytorch-fp32", t_cuda, "fp32", "cuda", arts / "teacher_fp32.pt"),
            torch_variant("student pytorch-fp32", s_cuda, "fp32", "cuda", arts / "student_fp32.pt"),
            torch_variant("teacher pytorch-fp16", t_cuda, "fp16", "cuda", arts / "teacher_fp32.pt", autocast=True),
            torch_variant("student pytorch-fp16", s_cuda, "fp16", "cuda", arts / "student_fp32.pt", autocast=True),
            cuda_graph_variant("student cuda-graph-fp32", s_cuda, "student pytorch-fp32 (cuda)"),
        ]

    # 5. accuracy
    with P.stage("accuracy") as st:
        y = ev.labels.astype(np.float32)
        preds = {}
        for v in variants + cuda_variants:
            if v.predict_fn is None:
                continue
            try:
                p = np.asarray(v.predict_fn(ev), dtype=np.float32).reshape(-1)
                preds[(v.row["name"], v.row["device"])] = p
                v.row["metrics"] = {k: mmsa_metrics(p, y)[k] for k in METRIC_KEYS}
            except Exception as e:  # noqa: BLE001
                v.row["errors"].append(f"accuracy: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        tm = next(v.row["metrics"] for v in variants if v.row["name"] == "teacher pytorch-fp32")
        if tm is None:
            raise RuntimeError(f"the teacher could not be evaluated: {variants[0].row['errors']}")
        for v in variants + cuda_variants:
            if v.row["runtime"] == "cuda-graph":
                src = next((c for c in cuda_variants if c.row["name"] == "student pytorch-fp32"), None)
                v.row["metrics"] = src.row["metrics"] if src else None
            m = v.row["metrics"]
            if m and tm:
                v.row["retention"] = {
                    "Non0_acc_2": m["Non0_acc_2"] / tm["Non0_acc_2"] if tm["Non0_acc_2"] else None,
                    "MAE_increase_rel": m["MAE"] / tm["MAE"] - 1 if tm["MAE"] else None}
        s8 = next(v.row for v in variants if v.row["name"] == "student ort-int8")
        st["note"] = (f"teacher MAE {tm['MAE']:.4f} Non0_acc_2 {tm['Non0_acc_2']:.4f}; int8 student "
                      + (f"MAE {s8['metrics']['MAE']:.4f} Non0_acc_2 {s8['metrics']['Non0_acc_2']:.4f}"
                         if s8.get("metrics") else "—"))

    # 6. latency
    with P.stage("latency cpu") as st:
        measure_all([v for v in variants if v.run_fn], inputs, iters, 5, rounds, budget, P.say)
        st["note"] = f"{len(variants)} variants x batch {', '.join(map(str, BATCHES))}, {threads} threads"
    if cuda_variants:
        with P.stage("latency cuda") as st:
            measure_all(cuda_variants, inputs, iters * 2, 10, rounds, budget, P.say)
            g = getattr(cuda_variants[-1], "graph_diffs", {})
            cuda_variants[-1].row["graph_vs_eager_max_abs"] = g
            st["note"] = f"{len(cuda_variants)} variants on {info.get('gpu')}; graph vs eager max |Δ| {g}"

    # TensorRT (through export/runner.py)
    trt_rows, trt_res = [], {}
    with P.stage("tensorrt") as st:
        if "tensorrt" in skip:
            trt_res["status"] = "skipped (--skip tensorrt)"
        elif a.device != "cuda":
            trt_res["status"] = f"not measured: CPU run (--device cpu); tensorrt here: {info['tensorrt']}"
        elif str(info["tensorrt"]).startswith("unavailable"):
            trt_res["status"] = info["tensorrt"]
        else:
            from cpsl.deploy.tensorrt import build_engine
            msgs = []
            for key in ("student_fp32", "student_fp16", "student_int8"):
                plan = arts / f"{key}.plan"
                if key not in manifests:
                    msgs.append(f"{key}: no ONNX artefact")
                    continue
                try:  # the engine profile cpsl export wrote into the manifest (opt batch 1, max batch 64)
                    with _stderr_to(log_file):
                        build_engine(arts / f"{key}.onnx", plan, manifests[key]["engine_profile"], key.split("_")[1])
                except Exception as e:  # noqa: BLE001 - recorded
                    why = str(e).splitlines()[0] if str(e) else ""
                    msgs.append(f"{key}: engine build failed ({type(e).__name__}: {why})")
                    continue
                r = run_runner(REPO / "export" / "runner.py", plan, arts / f"{key}.golden.npz", lengths, threads,
                               iters * 2, work)
                row = Variant(f"student trt-{key.split('_')[1]}", "student", "tensorrt", key.split("_")[1], "cuda",
                              plan, params=student_info["params"]).row
                for bb in r.get("bench") or []:
                    row["latency"][f"b{bb['batch']}"] = {k: bb[k] for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms")}
                    row["latency"][f"b{bb['batch']}"]["iters"] = bb["iters"]
                if r.get("error"):
                    row["errors"].append(r["error"])
                row["note"] = f"export/runner.py; golden check {r.get('check_ok')}; metrics: the ONNX artefact's (CPU ORT)"
                onnx_row = next((v.row for v in variants if v.row["name"] == f"student ort-{key.split('_')[1]}"), None)
                row["metrics"], row["retention"] = (onnx_row or {}).get("metrics"), (onnx_row or {}).get("retention")
                trt_rows.append(row)
                msgs.append(f"{key}: {'ok' if not r.get('error') else r['error']}")
            trt_res["status"] = f"TensorRT {info['tensorrt']}: " + "; ".join(msgs)
        st["note"] = trt_res["status"]

    rows = [v.row for v in variants] + [v.row for v in cuda_variants] + trt_rows

    # 7. profiles and breakdowns
    profiles = {}
    with P.stage("profiles") as st:
        if "profiles" in skip:
            profiles = {"skipped": "--skip profiles"}
        else:
            if "student_int8" in manifests:
                try:
                    profiles["ort_int8_b1"] = ort_profile(arts / "student_int8.onnx", inputs[1], mods, threads,
                                                          min(iters, 200), work / "ort_profile")
                except Exception as e:  # noqa: BLE001
                    profiles["ort_int8_b1"] = {"error": f"{type(e).__name__}: {e}"}
            for key, model in (("torch_teacher_b1", teacher), ("torch_student_b1", student)):
                x, mask = torch_inputs(inputs[1], mods)
                try:
                    with torch.inference_mode():
                        profiles[key] = torch_profile(lambda: model.predict(x, mask), min(iters, 10 if a.quick else 50),
                                                      log_file)
                except Exception as e:  # noqa: BLE001
                    profiles[key] = {"error": f"{type(e).__name__}: {e}"}
        st["note"] = ", ".join(profiles) if "skipped" not in profiles else "skipped"
    breakdown = None
    tr, s32r, s8r = (next((r for r in rows if r["name"] == n and r["device"] == "cpu"), {}) for n in
                     ("teacher pytorch-fp32", "student pytorch-fp32", "student ort-int8"))
    if tr.get("metrics") and s32r.get("metrics") and s8r.get("metrics"):
        d = np.abs(preds[("student ort-int8", "cpu")] - preds[("student pytorch-fp32", "cpu")])
        breakdown = {f"{k}_{m}": r["metrics"][m] for k, r in (("teacher", tr), ("student_fp32", s32r),
                                                              ("student_int8", s8r)) for m in ("Non0_acc_2", "MAE")}
        breakdown.update(int8_vs_fp32_mean_abs=float(d.mean()), int8_vs_fp32_max_abs=float(d.max()))
        dist = tr["metrics"]["Non0_acc_2"] - s32r["metrics"]["Non0_acc_2"]
        quant = s32r["metrics"]["Non0_acc_2"] - s8r["metrics"]["Non0_acc_2"]
        dist_mae = s32r["metrics"]["MAE"] - tr["metrics"]["MAE"]
        quant_mae = s8r["metrics"]["MAE"] - s32r["metrics"]["MAE"]
        # larger relative loss of the two steps (accuracy and MAE together)
        sd = dist / max(tr["metrics"]["Non0_acc_2"], 1e-9) + dist_mae / max(tr["metrics"]["MAE"], 1e-9)
        sq = quant / max(tr["metrics"]["Non0_acc_2"], 1e-9) + quant_mae / max(tr["metrics"]["MAE"], 1e-9)
        if max(sd, sq) <= 0.005:
            breakdown["dominant_loss"] = "none (neither step loses more than 0.5%)"
        else:
            breakdown["dominant_loss"] = "quantization" if sq > sd else "distillation"
    sizes = size_breakdown(arts / "student_int8.onnx") if "student_int8" in manifests else {}

    # 8. the torch-free runner
    runner_res = {}
    with P.stage("runner") as st:
        if "runner" in skip:
            runner_res = {"skipped": "--skip runner"}
        elif "student_int8" in manifests:
            runner_res["student_int8.onnx"] = run_runner(REPO / "export" / "runner.py", arts / "student_int8.onnx",
                                                         arts / "student_int8.golden.npz", lengths, threads,
                                                         iters, work)
        st["note"] = "; ".join(f"{k}: check {v.get('check_ok')}" + (f", error {v['error']}" if v.get("error") else "")
                               for k, v in runner_res.items() if isinstance(v, dict)) or runner_res.get("skipped", "—")

    # 9. subprocess benches
    with P.stage("cp_kernel") as st:
        if "cp_kernel" in skip:
            cpk = {"skipped": "--skip cp_kernel"}
        else:
            cpk = run_cp_kernel(Path(a.cp_kernel_script), a.device, threads, work, 240 if a.quick else 900)
        st["note"] = cpk.get("skipped") or cpk.get("error") or f"{len(cpk.get('rows', []))} rows"
    with P.stage("train_step") as st:
        if "train_step" in skip:
            tsr = {"skipped": "--skip train_step"}
        else:
            steps, warm = (5, 2) if a.quick else (30, 5)
            tsr = run_train_step(REPO / "bench" / "train_step.py", a.device, threads, steps, warm, work,
                                 240 if a.quick else 900)
        st["note"] = tsr.get("skipped") or tsr.get("error") or ", ".join(
            f"{r['variant']} {r['ms_median']:.1f} ms" for r in tsr.get("rows", []))

    # report
    info["loadavg_end"] = _loadavg()
    summary, targets = compute_summary(rows, info, ev_name)
    misses = next_steps(targets, rows, profiles, breakdown, sizes)
    # other jobs: load before we started, or calls that waited for the CPU (single-threaded runs)
    start_load = (info.get("loadavg_start") or [0.0])[0]
    shared = start_load > 0.5 or (threads == 1 and (summary.get("max_wall_over_cpu") or 1.0) > 1.15)
    res = {
        "format": "cpsl-bench-1",
        "summary": summary,
        "command": "python bench/run.py" + (f" {argv_str}" if argv_str else ""),
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": info,
        "shared_machine": shared,
        "settings": {"mode": mode, "device": a.device, "data": a.data, "sizes": a.sizes, "eval_split": ev_name,
                     "eval_n": len(ev), "lengths": lengths,
                     "length_rule": f"{a.lengths} of the {ev_name} split's valid lengths",
                     "batches": list(BATCHES), "threads": threads, "ort_intra_op_threads": threads,
                     "ort_inter_op_threads": 1, "iters": iters, "budget_s_per_variant_and_batch": budget,
                     "rounds": rounds, "work": str(work) if a.work else "(temporary, removed)"},
        "targets": targets,
        "misses": misses,
        "rows": rows,
        "teacher": {k: (str(v) if isinstance(v, Path) else v) for k, v in teacher_info.items()},
        "student": {k: (str(v) if isinstance(v, Path) else v) for k, v in student_info.items()},
        "export_errors": export_errors,
        "accuracy_breakdown": breakdown,
        "int8_size_breakdown": sizes,
        "profiles": profiles,
        "runner": runner_res,
        "tensorrt": trt_res,
        "cp_kernel": cpk,
        "train_step": tsr,
        "stages": P.stages,
        "total_s": P.elapsed(),
    }
    res["teacher"]["ckpt"] = (_rel(teacher_info["ckpt"]) if a.ckpt
                              else f"<work>/{Path(teacher_info['ckpt']).relative_to(work)}")
    res["student"]["ckpt"] = (_rel(student_info["ckpt"]) if a.student_ckpt
                              else f"<work>/{Path(student_info['ckpt']).relative_to(work)}")
    for r in rows:
        if r.get("file"):
            r["path"] = f"<work>/artefacts/{r['file']}"
    (out / "bench.json").write_text(json.dumps(res, indent=2, default=str))
    try:
        write_pareto(out / "pareto.png", rows, f"MAE on {ev_name}; {describe_machine(info)}")
    except Exception as e:  # noqa: BLE001 - the plot must never sink a finished run
        P.say(f"warning: pareto.png not written ({type(e).__name__}: {e})")
    write_markdown(out / "bench.md", res)
    (out / "bench.json").write_text(json.dumps(res, indent=2, default=str))
    P.say(f"summary: speed-up int8 vs teacher b1 {_f(summary['speedup_int8_vs_teacher_b1'], '{:.2f}x')}, "
          f"Non0_acc_2 retention {_f(summary['retention_non0_acc2'], '{:.2%}')}, MAE change "
          f"{_f(summary['mae_increase'], '{:+.2%}')}, int8 {_f(summary['student_int8_bytes'], '{:,}')} bytes")
    P.say("targets: " + ", ".join(f"{t['key']} {t['status']}" for t in targets))
    P.say(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'pareto.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
