"""Throughput and scaling of `cpsl train` under torchrun: 1 process vs N processes (same global batch).

Each variant is one real `cpsl train` run (student preset, synthetic data, the same config and seed):
``1p x 1t`` (one process, one thread), ``1p x Nt`` (one process, N threads) and ``Np x 1t``
(``python -m torch.distributed.run --nproc_per_node N -m cpsl train``, gloo on CPU; on CUDA one
process per GPU with NCCL). Reported: training samples/s (``results.json`` → ``ms_per_step``: the
training steps only, measured on rank 0, without start-up and evaluation), the command's wall time,
and the test metrics of each run (dropout 0, so N processes differ from one only through the
per-rank masked-BatchNorm statistics and float summation order: docs/distributed.md).

    python bench/distributed.py [--nproc 2] [--device cpu|cuda] [--n-train 2048] [--epochs 3]
                                [--batch-size 64] [--out bench/results/distributed_cpu]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit.errors import BenchError, bench_main
from benchkit.machine import base_info  # bench/ is sys.path[0]

from cpsl.proc import child_env


def train_cmd(a, out: Path, threads: int) -> list[str]:
    synth = json.dumps({"n_train": a.n_train, "n_valid": a.n_eval, "n_test": a.n_eval})
    return ["train", "--data", "synth", "--preset", "student", "--out", str(out), "--epochs", str(a.epochs),
            "--quiet", "--device", a.device, "--modulation", a.modulation,
            "--set", f"data.synth={synth}", "--set", f"data.batch_size={a.batch_size}",
            "--set", "model.dropout=0", "--set", f"train.num_threads={threads}", "--set", "train.patience=100"]


def run_variant(a, work: Path, name: str, nproc: int, threads: int) -> dict:
    out = work / name
    env = child_env(threads)
    if nproc == 1:
        cmd = [sys.executable, "-m", "cpsl", *train_cmd(a, out, threads)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(a.port), "-m", "cpsl", *train_cmd(a, out, threads)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        print(f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}", file=sys.stderr)      # the run's own last words
        raise BenchError(f"{name} failed (exit {p.returncode}); its output is above")
    res = json.loads((out / "results.json").read_text())
    ms = res["per_seed"][0]["ms_per_step"]
    steps_per_epoch = math.ceil(a.n_train / a.batch_size)
    return {"variant": name, "processes": nproc, "threads_per_process": threads, "distributed": res["distributed"],
            "ms_per_global_step": ms, "train_samples_per_s": a.n_train / (ms * steps_per_epoch / 1e3),
            "wall_s": wall, "test_MAE": res["test"]["MAE"]["mean"], "test_Corr": res["test"]["Corr"]["mean"],
            "valid_MAE": res["valid"]["MAE"]["mean"], "command": " ".join(cmd[1:])}


def markdown(info: dict, rows: list[dict], a) -> str:
    base = rows[0]["train_samples_per_s"]
    lines = [f"# `cpsl train` under torchrun: {a.device}, 1 vs {a.nproc} processes", "",
             f"Machine: {info['cpu']}, {info['usable_cores']} usable cores; torch {info['torch']}"
             + (f"; GPU {info['gpu']}" if info.get("gpu") else "") + f"; load average at start {info['loadavg_start']}, "
             f"at end {info['loadavg_end']}.", "",
             f"Student preset, synthetic data ({a.n_train} train / {a.n_eval} valid / {a.n_eval} test), global batch "
             f"{a.batch_size}, {a.epochs} epochs, modulation {a.modulation}, dropout 0, seed 1.", "",
             "| variant | processes × threads | train samples/s | speed-up vs 1p×1t | ms / global step | wall s "
             "(incl. start-up, eval) | test MAE | test Corr |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['processes']} × {r['threads_per_process']} | "
                     f"{r['train_samples_per_s']:.0f} | {r['train_samples_per_s'] / base:.2f}× | "
                     f"{r['ms_per_global_step']:.1f} | {r['wall_s']:.1f} | {r['test_MAE']:.4f} | {r['test_Corr']:.4f} |")
    lines += ["", "Rerun: `python bench/distributed.py " + " ".join(sys.argv[1:]) + "`", ""]
    return "\n".join(lines)


@bench_main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-train", type=int, default=2048)
    ap.add_argument("--n-eval", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--modulation", default="cp")
    ap.add_argument("--port", type=int, default=29533)
    ap.add_argument("--out", default=None, help="default: the scratch folder runs/bench/distributed_DEVICE")
    ap.add_argument("--overwrite", action="store_true", help="allow replacing committed results under bench/results")
    a = ap.parse_args(argv)
    from benchkit.outdir import output_dir
    out = output_dir(a.out, f"distributed_{a.device}", a.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    info = base_info(a.device, 1)
    variants = [("1p x 1t", 1, 1), (f"1p x {a.nproc}t", 1, a.nproc), (f"{a.nproc}p x 1t", a.nproc, 1)]
    if a.device.startswith("cuda"):                 # one process per GPU; threads matter little there
        variants = [("1 GPU", 1, 1), (f"{a.nproc} GPUs", a.nproc, 1)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, nproc, threads in variants:
            r = run_variant(a, Path(tmp), name.replace(" ", ""), nproc, threads)
            r["variant"] = name
            rows.append(r)
            print(f"{name}: {r['train_samples_per_s']:.0f} samples/s, {r['ms_per_global_step']:.1f} ms/step, "
                  f"test MAE {r['test_MAE']:.4f}", flush=True)
    info["loadavg_end"] = base_info(a.device, 1)["loadavg_start"]
    (out / "bench.json").write_text(json.dumps({"machine": info, "args": vars(a), "rows": rows}, indent=2))
    (out / "bench.md").write_text(markdown(info, rows, a))
    print(f"wrote {out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
