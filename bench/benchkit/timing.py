"""Latency measurement: percentiles, the Variant wrapper (PyTorch / ONNX Runtime / CUDA graph) and interleaved timing rounds."""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import numpy as np
import torch

from .stages import onnx_graph_params, torch_inputs




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
