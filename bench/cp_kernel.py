#!/usr/bin/env python
"""Benchmark of one full CP step (norms + penalty + scale) per backend.

    python bench/cp_kernel.py [--device cpu|cuda] [--json FILE] [--reps N] [--quick] [--threads N]

Backends: ``naive`` (a per-tensor loop of fp32 torch ops, as a user would write it, no
``.item()``), ``foreach`` (``cpsl.cp.foreach``: compute + scale_), ``native``
(``cpsl.cp.native`` through the Backend API: compute + scale_), ``native_fused``
(``native.cp_step_``: one call), and on CUDA the ``foreach`` and ``native`` steps replayed
from a CUDA graph. Two parameter sets: ``small`` (feature-level MSA model, d=128
transformer layers, ~1.3 M params in 78 tensors, 3 groups) and ``bert_like`` (BERT-base
as the text group + two small encoders, ~110 M params in ~240 tensors).

The gradients are drawn so that the text group is in conflict (k < 1: it is really
scaled) and restored from a pristine copy before every timed step, outside the timed
window (a step that scales them would otherwise shrink them towards denormals); like
gradients fresh from backward(), they are then warm in cache. Each backend's stats are
checked against the float64 reference before timing. Timings are medians over reps
after warm-up, taken in interleaved rounds (CUDA: events around each step).
``bandwidth_floor`` is the time to read the gradients once (norms) and read+write them
once (scale) at the best streaming bandwidth measured here (copy, sum, in-place mul_) on
a buffer of the same size. The load average is recorded: on a shared machine, other
processes slow every multi-threaded torch op (each OpenMP region waits for a core).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from cpsl.cp import core
from cpsl.cp.core import CPStats, PenaltyParams, get_backend, penalty_tensor, stats_size
from cpsl.cp.reference import reference_stats

from benchkit.machine import base_info  # bench/ is sys.path[0]

GROUPS = ("text", "audio", "visual")


# ------------------------------------------------------------------ parameter sets
def _encoder_layer(d: int, ff: int) -> list[tuple[int, ...]]:
    """Parameter shapes of nn.TransformerEncoderLayer(d, nhead, ff): 12 tensors."""
    return [(3 * d, d), (3 * d,), (d, d), (d,), (ff, d), (ff,), (d, ff), (d,), (d,), (d,), (d,), (d,)]


def _small_encoder(d_in: int, d: int, layers: int) -> list[tuple[int, ...]]:
    shapes = [(d, d_in), (d,)]
    for _ in range(layers):
        shapes += _encoder_layer(d, 4 * d)
    return shapes


def _bert_base() -> list[tuple[int, ...]]:
    d, ff = 768, 3072
    shapes = [(30522, d), (512, d), (2, d), (d,), (d,)]
    for _ in range(12):
        shapes += [(d, d), (d,)] * 4 + [(d,), (d,), (ff, d), (ff,), (d, ff), (d,), (d,), (d,)]
    shapes += [(d, d), (d,)]  # pooler
    return shapes


def param_set(name: str) -> list[tuple[list[tuple[int, ...]], float]]:
    """Per group (text, audio, visual): parameter shapes and the gradients' std."""
    if name == "small":  # d=128 AME encoders: text 768->128 x3 layers, audio 74->128 x2, visual 35->128 x1
        return [(_small_encoder(768, 128, 3), 2e-3), (_small_encoder(74, 128, 2), 1e-3),
                (_small_encoder(35, 128, 1), 1e-3)]
    if name == "bert_like":
        return [(_bert_base(), 1e-3), (_small_encoder(74, 128, 2), 1e-3), (_small_encoder(35, 128, 1), 1e-3)]
    raise ValueError(name)


def make_grads(name: str, device: torch.device, seed: int = 0, layout: str = "separate"):
    """``layout``: ``separate`` (one allocation per tensor, as after ``zero_grad(set_to_none=True)``)
    or ``arena`` (views into one 16-byte-aligned buffer per group: cpsl.cp.arena, as in training)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    grads, gidx = [], []
    for m, (shapes, std) in enumerate(param_set(name)):
        for s in shapes:
            grads.append((torch.randn(s, generator=gen) * std).to(device))
            gidx.append(m)
    if layout == "arena":
        from cpsl.cp.arena import GradArena
        params = [torch.nn.Parameter(torch.empty(g.shape, device=device)) for g in grads]
        GradArena({GROUPS[m]: [p for p, gm in zip(params, gidx) if gm == m] for m in range(len(GROUPS))})
        for p, g in zip(params, grads):
            p.grad.copy_(g)
        grads = [p.grad for p in params]
    return grads, gidx


# ------------------------------------------------------------------ backends
class NaiveStep:
    """What a user writes: a loop over tensors with fp32 torch ops, penalty as tensor ops."""

    def __init__(self, grads, gidx, n_groups):
        dev = grads[0].device
        numel = [0] * n_groups
        for g, m in zip(grads, gidx):
            numel[m] += g.numel()
        self.numel = torch.tensor(numel, dtype=torch.float64, device=dev)
        self.active = self.numel > 0
        self.members = [[g for g, m in zip(grads, gidx) if m == i] for i in range(n_groups)]

    def __call__(self, grads, gidx, n_groups, p, w):
        sq = [torch.stack([g.float().pow(2).sum() for g in mem]).sum() for mem in self.members]
        sumsq = torch.stack(sq).double()
        stats = penalty_tensor(sumsq, self.numel, self.active, p, w)
        k = CPStats.unpack(stats, n_groups).k.float()
        for i, mem in enumerate(self.members):
            for g in mem:
                g.mul_(k[i])
        return stats


def backend_step(name: str):
    be = get_backend(name)

    def step(grads, gidx, n_groups, p, w):
        stats = be.compute(grads, gidx, n_groups, p, w)
        be.scale_(grads, gidx, stats, n_groups)
        return stats

    return step


def native_fused_step():
    from cpsl.cp import native

    def step(grads, gidx, n_groups, p, w):
        return native.cp_step_(grads, gidx, n_groups, p, w)

    return step


class GraphStep:
    """A step captured once in a CUDA graph, replayed per call (static gradient buffers)."""

    def __init__(self, fn, grads, gidx, n_groups, p, w):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):  # warm-up: builds caches / plans outside the capture
                fn(grads, gidx, n_groups, p, w)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.stats = fn(grads, gidx, n_groups, p, w)

    def __call__(self, grads, gidx, n_groups, p, w):
        self.graph.replay()
        return self.stats


# ------------------------------------------------------------------ timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step, grads, pristine, gidx, n_groups, p, w, device, reps: int) -> list[float]:
    """Per-rep milliseconds of `step`; gradients restored before each rep (not timed)."""
    out = []
    if device.type == "cuda":
        events = []
        for _ in range(reps):
            torch._foreach_copy_(grads, pristine)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step(grads, gidx, n_groups, p, w)
            b.record()
            events.append((a, b))
        torch.cuda.synchronize(device)
        out = [a.elapsed_time(b) for a, b in events]
    else:
        for _ in range(reps):
            torch._foreach_copy_(grads, pristine)
            t0 = time.perf_counter()
            step(grads, gidx, n_groups, p, w)
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def bandwidth(nbytes: int, device, reps: int = 20) -> dict:
    """Bytes/s of three streaming passes over a buffer of `nbytes`: copy (read + write into a
    second buffer), sum (read), mul_ (read + write in place). The best is the machine's."""
    n = max(nbytes // 4, 1024)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ops = {"copy": (lambda: dst.copy_(src), 2 * n * 4), "sum": (lambda: src.sum(), n * 4),
           "mul_": (lambda: dst.mul_(1.0), 2 * n * 4)}
    out = {}
    for name, (fn, moved) in ops.items():
        for _ in range(3):
            fn()
        _sync(device)
        ts = []
        for _ in range(reps):
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize(device)
                ts.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        out[name] = moved / statistics.median(ts)
    return out


def machine_info(device) -> dict:
    from cpsl.native_info import extension_info
    info = base_info(str(device))
    ext = extension_info()
    info["cpsl_C"] = {k: v for k, v in ext.items() if k != "available"} if ext["available"] else \
        f"unavailable: {ext['reason']}"
    return info


def _steps(device, grads, pristine, gidx, G, p, w, ok_native, why) -> dict:
    """The timed variants of one set: naive loop, registered backends, native fused, CUDA graphs."""
    steps = {"naive": NaiveStep(grads, gidx, G)}
    if "foreach" in core.backend_names():
        steps["foreach"] = backend_step("foreach")
    else:
        print("   foreach backend not registered (cpsl.cp.foreach missing)")
    if ok_native:
        steps["native"] = backend_step("native")
        steps["native_fused"] = native_fused_step()
    else:
        print(f"   native unavailable: {why}")
    if device.type == "cuda":
        for name in ("foreach", "native"):
            if name in steps:
                torch._foreach_copy_(grads, pristine)
                steps[f"{name}+graph"] = GraphStep(steps[name], grads, gidx, G, p, w)
    return steps


def _check_steps(steps, set_name, grads, pristine, gidx, G, p, w, ref, device, max_reps, budget_s,
                 checks) -> dict:
    """Correctness of what is timed (stats vs the float64 reference, scaled grads), warm-up, and a
    per-step time estimate that bounds the reps of slow backends: -> {name: reps}."""
    n_reps = {}
    for name, step in steps.items():
        torch._foreach_copy_(grads, pristine)
        _sync(device)
        t0 = time.perf_counter()
        stats = step(grads, gidx, G, p, w)
        _sync(device)
        t_est = time.perf_counter() - t0
        st = stats.detach().cpu()
        rel = ((st[:G] - ref[:G]).abs() / ref[:G].abs().clamp(min=1e-300)).max().item()
        kerr = (st[3 * G:4 * G] - ref[3 * G:4 * G]).abs().max().item()
        same_flags = bool(torch.equal(st[4 * G:], ref[4 * G:]))
        kf = st[3 * G:4 * G].float()
        every = max(1, len(grads) // 16)
        scale_err = max((g.float() - pg.float() * kf[m]).abs().max().item()
                        for g, pg, m in zip(grads[::every], pristine[::every], gidx[::every]))
        checks[f"{set_name}/{name}"] = {"sumsq_rel_err": rel, "k_abs_err": kerr, "flags_equal": same_flags,
                                        "scale_abs_err": scale_err}
        time_step(step, grads, pristine, gidx, G, p, w, device, 2)  # warm-up
        n_reps[name] = max(3, min(max_reps, int(budget_s / max(t_est, 1e-6))))
    return n_reps


# ------------------------------------------------------------------ main
def run(device: torch.device, reps: dict, budget_s: float, quick: bool,
        layout: str = "separate") -> tuple[list[dict], dict]:
    from cpsl.cp import native
    try:
        import cpsl.cp.foreach  # noqa: F401  (registers "foreach")
    except ImportError:
        pass
    p = PenaltyParams()
    w = 1.0
    G = len(GROUPS)
    rows = []
    checks = {}
    ok_native, why = native.available(device)
    for set_name in ("small", "bert_like"):
        grads, gidx = make_grads(set_name, device, layout=layout)
        pristine = [g.clone() for g in grads]
        params = sum(g.numel() for g in grads)
        nbytes = sum(g.numel() * g.element_size() for g in grads)
        ref = reference_stats(pristine, gidx, G, p, w)
        kk = CPStats.unpack(ref, G).k.tolist()
        print(f"\n== {set_name} ({layout}): {params / 1e6:.2f} M params in {len(grads)} tensors, {G} groups; "
              f"reference k = {[round(x, 4) for x in kk]} (conflict {CPStats.unpack(ref, G).conflict.tolist()})")
        steps = _steps(device, grads, pristine, gidx, G, p, w, ok_native, why)
        n_reps = _check_steps(steps, set_name, grads, pristine, gidx, G, p, w, ref, device,
                              reps[set_name], budget_s, checks)
        # interleaved rounds, so that drifts of a shared machine hit every backend alike
        times: dict = {name: [] for name in steps}
        rounds = 5
        for r in range(rounds):
            for name, step in steps.items():
                k = n_reps[name] // rounds + (1 if r < n_reps[name] % rounds else 0)
                if k:
                    times[name] += time_step(step, grads, pristine, gidx, G, p, w, device, k)
        for name, ms in times.items():
            med = statistics.median(ms)
            c = checks[f"{set_name}/{name}"]
            rows.append({"set": set_name, "backend": name, "device": device.type, "layout": layout, "ms": med,
                         "ms_p10": sorted(ms)[len(ms) // 10], "ms_p90": sorted(ms)[(9 * len(ms)) // 10],
                         "reps": len(ms), "params": params, "tensors": len(grads)})
            print(f"   {name:14s} {med:10.3f} ms  [p10 {rows[-1]['ms_p10']:.3f}, p90 {rows[-1]['ms_p90']:.3f}, "
                  f"{len(ms)} reps]  sumsq rel err {c['sumsq_rel_err']:.1e}, k err {c['k_abs_err']:.1e}, "
                  f"flags {'ok' if c['flags_equal'] else 'DIFFER'}")
        steps.clear()
        bw = bandwidth(nbytes, device, reps=5 if quick else 20)
        best = max(bw.values())
        floor_ms = 3 * nbytes / best * 1e3
        rows.append({"set": set_name, "backend": "bandwidth_floor", "device": device.type, "ms": floor_ms,
                     "params": params, "tensors": len(grads), "bytes_moved": 3 * nbytes,
                     "bandwidth_GBps": best / 1e9, "bandwidth_by_op_GBps": {k: v / 1e9 for k, v in bw.items()}})
        print(f"   {'bandwidth_floor':14s} {floor_ms:10.3f} ms  (3 x {nbytes / 1e6:.1f} MB at {best / 1e9:.1f} GB/s; "
              + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bw.items()) + " GB/s)")
        del grads, pristine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, checks


def print_table(rows: list[dict]) -> None:
    print("\n| set | backend | device | ms | vs foreach | params | tensors |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        base = next((x["ms"] for x in rows if x["set"] == r["set"] and x["backend"] == "foreach"), None)
        sp = f"{base / r['ms']:.2f}x" if base and r["backend"] != "bandwidth_floor" else ""
        print(f"| {r['set']} | {r['backend']} | {r['device']} | {r['ms']:.3f} | {sp} | {r['params']:,} | {r['tensors']} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--json", default=None, help="write the rows + machine description here")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed reps on the small set (default 200 cpu / 500 cuda; bert_like: a tenth, >= 5)")
    ap.add_argument("--quick", action="store_true", help="fewer reps (a fifth)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--layout", default="separate", choices=("separate", "arena"),
                    help="gradient memory: one allocation per tensor, or views into a gradient arena")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("cuda requested but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    small = args.reps or (500 if device.type == "cuda" else 200)
    if args.quick:
        small = max(10, small // 5)
    big = max(5, small // 10)
    budget_s = 4.0 if args.quick else 15.0  # per backend and set: slow backends get fewer reps (>= 3)
    info = machine_info(device)
    print(f"machine: {info.get('gpu') or info['cpu']}; torch {info['torch']}, {info['threads']} threads")
    rows, checks = run(device, {"small": small, "bert_like": big}, budget_s, args.quick, args.layout)
    if hasattr(os, "getloadavg"):  # other processes on the machine skew the timings: say so
        info["loadavg_at_end"] = os.getloadavg()
        print(f"load average at start {info['loadavg_start']}, at end {info['loadavg_at_end']}")
    print_table(rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"command": "python bench/cp_kernel.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                       "machine": info, "rows": rows, "checks": checks}, f, indent=1)
        print(f"wrote {args.json}")
    off = {k: v for k, v in checks.items()
           if not (v["flags_equal"] and v["sumsq_rel_err"] < 1e-6 and v["k_abs_err"] < 1e-6)}
    for k, v in off.items():
        print(f"note: {k} differs from the float64 reference beyond 1e-6: {v}", file=sys.stderr)
    # only the native backend's own accuracy decides the exit status
    return 1 if any(k.split("/")[1].startswith("native") for k in off) else 0


if __name__ == "__main__":
    sys.exit(main())
