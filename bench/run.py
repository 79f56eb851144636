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
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchkit import REPO, SKIPPABLE  # bench/ is sys.path[0]
from benchkit.errors import BenchError, bench_main
from benchkit.pipeline import Run, run_all


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


# ---------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer epochs and iterations (< 5 min on 2 CPU cores)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: train there and add the CUDA rows (CPU rows are always measured)")
    ap.add_argument("--data", default="synth", help="'synth' (or synth:SEED) or an MMSA .pkl")
    ap.add_argument("--out", help="where bench.json, bench.md, pareto.png go (default: the scratch folder "
                    "runs/bench/DEVICE_quick|full; a bench/results folder with files needs --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="allow replacing committed results under bench/results")
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
    e2e = ap.add_argument_group("end to end (--e2e): raw MOSI text + audio in, bench/benchkit/e2e.py")
    e2e.add_argument("--e2e", action="store_true", help="benchmark the end-to-end student instead of the edge path")
    e2e.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="the data pack (its mosi/ folder)")
    e2e.add_argument("--layers", default="3,2", help="shallow encoder depths beside the teacher's 6")
    e2e.add_argument("--encoder-ckpts", help="distilled checkpoints, one per --layers entry (else distilled here)")
    e2e.add_argument("--student-layers", default="3", help="the student the summary reports")
    # for tests and quick experiments
    ap.add_argument("--sizes", help=argparse.SUPPRESS)             # synthetic n_train,n_valid,n_test
    ap.add_argument("--skip", default="", help=argparse.SUPPRESS)  # comma list of SKIPPABLE stages
    ap.add_argument("--cp-kernel-script", default=str(REPO / "bench" / "cp_kernel.py"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


@bench_main
def main(argv=None) -> int:
    a = parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    mode = "quick" if a.quick else "full"
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    bad = skip - set(SKIPPABLE)
    if bad:
        raise BenchError(f"--skip accepts {', '.join(SKIPPABLE)}; got {', '.join(sorted(bad))}")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda but torch sees no CUDA GPU")
    for p, what in ((a.ckpt, "--ckpt"), (a.student_ckpt, "--student-ckpt")):
        if p and not Path(p).is_file():
            raise BenchError(f"{what} {p} not found")
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    from benchkit.outdir import output_dir
    out = output_dir(a.out, f"{'e2e' if a.e2e else a.device}_{mode}", a.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    keep_work = a.work is not None
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="cpsl-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log_file = open(work / "bench.log", "w")
    P = Progress(log_file)
    try:
        if a.e2e:
            from benchkit.e2e import run_e2e
            return run_e2e(a, out, work, P.say)
        return run_all(Run(a, mode, skip, threads, out, work, log_file, P))
    finally:
        log_file.close()
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
