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
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchkit import BATCHES, ITERS, REPO, SKIPPABLE, STUDENT_EPOCHS, TEACHER_EPOCHS  # noqa: E402 - bench/ is sys.path[0]
from benchkit.machine import _loadavg, describe_machine, machine_info  # noqa: E402
from benchkit.profiling import (_stderr_to, ort_profile, run_cp_kernel, run_runner, run_train_step,  # noqa: E402
                                torch_profile)
from benchkit.report import _f, _rel, compute_summary, next_steps, write_markdown, write_pareto  # noqa: E402
from benchkit.stages import (bench_inputs, bench_lengths, distill_student, eval_split_name,  # noqa: E402
                             artefact_plan, export_all, load_bench_data, size_breakdown, torch_inputs, train_teacher)
from benchkit.timing import Variant, cuda_graph_variant, measure_all, ort_variant, torch_variant  # noqa: E402

import torch  # noqa: E402



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
        plan = artefact_plan(teacher_info["ckpt"], student_info["ckpt"])   # the precision registry
        manifests, export_errors = export_all(plan, arts, data_arg, log_file, log)
        st["note"] = ", ".join(f"{k} {(arts / f'{k}.onnx').stat().st_size / 1024:.0f} KiB" for k in manifests)
        if export_errors:
            st["note"] += "; FAILED: " + ", ".join(f"{k} ({v})" for k, v in export_errors.items())

    # variants
    variants: list[Variant] = [
        torch_variant("teacher pytorch-fp32", teacher, "fp32", "cpu", arts / "teacher_fp32.pt"),
        torch_variant("student pytorch-fp32", student, "fp32", "cpu", arts / "student_fp32.pt"),
    ]
    for key, kind, _ckpt, prec in plan:
        name = f"{kind} ort-{prec}"
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
            for key, _kind, _ckpt, prec in plan[1:]:
                plan_path = arts / f"{key}.plan"
                if key not in manifests:
                    msgs.append(f"{key}: no ONNX artefact")
                    continue
                try:  # the engine profile cpsl export wrote into the manifest (opt batch 1, max batch 64)
                    with _stderr_to(log_file):
                        build_engine(arts / f"{key}.onnx", plan_path, manifests[key]["engine_profile"], prec)
                except Exception as e:  # noqa: BLE001 - recorded
                    why = str(e).splitlines()[0] if str(e) else ""
                    msgs.append(f"{key}: engine build failed ({type(e).__name__}: {why})")
                    continue
                r = run_runner(REPO / "export" / "runner.py", plan_path, arts / f"{key}.golden.npz", lengths, threads,
                               iters * 2, work)
                row = Variant(f"student trt-{prec}", "student", "tensorrt", prec, "cuda",
                              plan_path, params=student_info["params"]).row
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
