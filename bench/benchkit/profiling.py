"""Operator profiles (ONNX Runtime, torch.profiler) and the subprocess stages (CP kernel, train step, runner)."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path


from cpsl.proc import child_env

from . import BATCHES
from .report import rel_path


def _subprocess_env(threads: int) -> dict:
    """A bench child's environment: this cpsl on PYTHONPATH, ``threads`` OpenMP threads."""
    return dict(child_env(), OMP_NUM_THREADS=str(threads))


def _tail(text: str, n: int = 6) -> str:
    return "\n".join((text or "").strip().splitlines()[-n:])


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
def stderr_to(f):
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
    with stderr_to(log_file):
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
def _run_script(cmd: list, res: dict, timeout: int, threads: int):
    """Run a bench subprocess; record its return code (or the timeout) in ``res``; the process or None."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_subprocess_env(threads))
    except subprocess.TimeoutExpired:
        res["error"] = f"timed out after {timeout} s"
        return None
    res["returncode"] = p.returncode
    return p


def run_cp_kernel(script: Path, device: str, threads: int, work: Path, timeout: int) -> dict:
    if not script.is_file():
        return {"error": f"unavailable: {script} not found"}
    out = work / "cp_kernel.json"
    cmd = [sys.executable, str(script), "--quick", "--json", str(out), "--device", device]
    if device == "cpu":
        cmd += ["--threads", str(threads)]
    res = {"command": " ".join(["python", rel_path(script), "--quick", "--device", device]
                               + (["--threads", str(threads)] if device == "cpu" else []))}
    p = _run_script(cmd, res, timeout, threads)
    if p is None:
        return res
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
    res = {"command": f"OMP_NUM_THREADS={threads} python {rel_path(script)} --device {device} --steps {steps} "
                      f"--warmup {warmup}"}
    p = _run_script(cmd, res, timeout, threads)
    if p is None:
        return res
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
    p = _run_script(cmd, res, timeout, threads)
    if p is None:
        return res
    if out.is_file():
        j = json.loads(out.read_text())
        res["check_ok"] = j.get("check", {}).get("ok")
        res["bench"] = j.get("bench")
    if p.returncode != 0:
        res["error"] = f"exit {p.returncode}: {_tail(p.stderr or p.stdout, 3)}"
    return res
