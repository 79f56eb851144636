"""The stages of bench/run.py as functions over one :class:`Run` (settings, progress, log, the
values the stages produce). ``run.py`` calls them in order; each stage prints one progress line."""
from __future__ import annotations

import copy
import datetime as _dt
import json
import shlex
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cpsl.errors import CPSLError

from . import BATCHES, ITERS, REPO, STUDENT_EPOCHS, TEACHER_EPOCHS
from .machine import describe_machine, loadavg, machine_info
from .markdown import write_markdown
from .profiling import ort_profile, run_cp_kernel, run_runner, run_train_step, stderr_to, torch_profile
from .report import compute_summary, fmt_num, misses, rel_path, write_pareto
from .stages import (artefact_plan, bench_inputs, bench_lengths, distill_student, eval_split_name, export_all,
                     load_bench_data, size_breakdown, torch_inputs, train_teacher)
from .timing import Variant, cuda_graph_variant, measure_all, ort_variant, torch_variant


@dataclass
class Run:
    a: object                  # parsed arguments
    mode: str
    skip: set
    threads: int
    out: Path
    work: Path
    log_file: object
    P: object                  # Progress
    v: dict = field(default_factory=dict)   # what the stages produce

    def log(self, msg) -> None:
        self.log_file.write(str(msg) + "\n")
        self.log_file.flush()

    @property
    def iters(self) -> int:
        return self.a.iters or ITERS[self.mode]


def stage_data(R: Run) -> None:
    from cpsl.checkpoint import read_checkpoint
    a = R.a
    with R.P.stage("data") as st:
        synth_seed = 0
        if a.ckpt:
            synth_seed = int(read_checkpoint(a.ckpt).get("config", {}).get("data", {}).get("synth_seed", 0))
        data, data_arg = load_bench_data(a.data, a.sizes, synth_seed, R.work)
        ev_name = eval_split_name(data)
        ev = data[ev_name]
        lengths = bench_lengths(ev, data.modalities, a.lengths)
        R.v.update(data=data, data_arg=data_arg, synth_seed=synth_seed, ev_name=ev_name, ev=ev,
                   mods=data.modalities, lengths=lengths,
                   inputs={B: bench_inputs(ev, data.modalities, lengths, B, seed=B) for B in BATCHES})
        st["note"] = (f"{a.data} ({'/'.join(str(len(s)) for s in data.splits.values())} train/valid/test), "
                      f"eval on {ev_name}, lengths {lengths}")


def stage_model(R: Run, kind: str) -> None:
    """The teacher (trained or --ckpt) or the student (distilled or --student-ckpt)."""
    from cpsl.checkpoint import check_compatible, load_model, read_checkpoint
    a, data = R.a, R.v["data"]
    given = a.ckpt if kind == "teacher" else a.student_ckpt
    with R.P.stage(kind) as st:
        if given:
            ck = read_checkpoint(given)
            if ck.get("config", {}).get("model", {}).get("text_encoder"):
                # the edge path measures feature graphs; a model that runs its text encoder on
                # token ids (e.g. the MOSI recipe's best.pt) is benchmarked end to end
                raise CPSLError(f"{given} runs a text encoder on token ids ({ck['config']['model']['text_encoder']}): "
                                f"benchmark it with bench/run.py --e2e --ckpt {given} --data-dir DIR")
            info = {"source": f"loaded {given}", "ckpt": Path(given),
                    "epochs_run": len(ck.get("history", [])) or None, "best_epoch": ck.get("best_epoch")}
        elif kind == "teacher":
            epochs = a.epochs or TEACHER_EPOCHS[R.mode]
            R.P.say(f"teacher: training ({epochs} epochs max) ...")
            info = train_teacher(data, R.v["data_arg"], R.v["synth_seed"], epochs, a.device, R.work / "teacher", R.log)
        else:
            epochs = a.student_epochs or STUDENT_EPOCHS[R.mode]
            R.P.say(f"student: distilling ({epochs} epochs max) ...")
            info = distill_student(R.v["teacher_info"]["ckpt"], data, R.v["data_arg"], R.v["synth_seed"], epochs,
                                   a.device, R.work / "student", R.log)
        model, _, _ = load_model(info["ckpt"], "cpu")
        model.eval()
        check_compatible(model, data, str(info["ckpt"]))
        info["params"] = model.num_parameters()
        R.v[kind], R.v[f"{kind}_info"] = model, info
        st["note"] = f"{info['source']}, {info['params']:,} parameters"
        if kind == "student":
            st["note"] += f" ({info['params'] / R.v['teacher_info']['params']:.1%} of the teacher)"


def stage_export(R: Run) -> None:
    """Every artefact of the precision registry (+ weights-only PyTorch files so sizes compare)."""
    arts = R.work / "artefacts"
    arts.mkdir(parents=True, exist_ok=True)
    with R.P.stage("export") as st:
        torch.save(R.v["teacher"].state_dict(), arts / "teacher_fp32.pt")
        torch.save(R.v["student"].state_dict(), arts / "student_fp32.pt")
        plan = artefact_plan(R.v["teacher_info"]["ckpt"], R.v["student_info"]["ckpt"])
        manifests, errors = export_all(plan, arts, R.v["data_arg"], R.log_file, R.log)
        st["note"] = ", ".join(f"{k} {(arts / f'{k}.onnx').stat().st_size / 1024:.0f} KiB" for k in manifests)
        if errors:
            st["note"] += "; FAILED: " + ", ".join(f"{k} ({v})" for k, v in errors.items())
    R.v.update(arts=arts, plan=plan, manifests=manifests, export_errors=errors)


def build_variants(R: Run) -> None:
    arts, mods = R.v["arts"], R.v["mods"]
    variants = [torch_variant(f"{k} pytorch-fp32", R.v[k], "fp32", "cpu", arts / f"{k}_fp32.pt")
                for k in ("teacher", "student")]
    for key, kind, _ckpt, prec in R.v["plan"]:
        if key in R.v["manifests"]:
            v = ort_variant(f"{kind} ort-{prec}", kind, prec, arts / f"{key}.onnx", mods, R.threads)
            v.row["params"] = R.v[f"{kind}_info"]["params"]
        else:
            v = Variant(f"{kind} ort-{prec}", kind, "onnxruntime", prec, "cpu")
            v.row["errors"].append(f"export failed: {R.v['export_errors'].get(key)}")
        variants.append(v)
    cuda_variants = []
    if R.a.device == "cuda":
        on = {k: copy.deepcopy(R.v[k]).to("cuda").eval() for k in ("teacher", "student")}
        cuda_variants = [torch_variant(f"{k} pytorch-{p}", on[k], p, "cuda", arts / f"{k}_fp32.pt",
                                       autocast=p == "fp16") for p in ("fp32", "fp16") for k in ("teacher", "student")]
        cuda_variants.append(cuda_graph_variant("student cuda-graph-fp32", on["student"],
                                                "student pytorch-fp32 (cuda)"))
    R.v.update(variants=variants, cuda_variants=cuda_variants)


def stage_accuracy(R: Run) -> None:
    from cpsl.metrics import METRIC_KEYS, mmsa_metrics, retention
    ev, variants, cuda_variants = R.v["ev"], R.v["variants"], R.v["cuda_variants"]
    with R.P.stage("accuracy") as st:
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
        tm = variants[0].row["metrics"]
        if tm is None:
            raise RuntimeError(f"the teacher could not be evaluated: {variants[0].row['errors']}")
        for v in variants + cuda_variants:
            if v.row["runtime"] == "cuda-graph":
                src = next((c for c in cuda_variants if c.row["name"] == "student pytorch-fp32"), None)
                v.row["metrics"] = src.row["metrics"] if src else None
            if v.row["metrics"]:
                r = retention(v.row["metrics"], tm)
                v.row["retention"] = {k: r[k] for k in ("Non0_acc_2", "MAE_increase_rel")}
        s8 = next(v.row for v in variants if v.row["name"] == "student ort-int8")
        st["note"] = (f"teacher MAE {tm['MAE']:.4f} Non0_acc_2 {tm['Non0_acc_2']:.4f}; int8 student "
                      + (f"MAE {s8['metrics']['MAE']:.4f} Non0_acc_2 {s8['metrics']['Non0_acc_2']:.4f}"
                         if s8.get("metrics") else "—"))
    R.v["preds"] = preds


def stage_latency(R: Run, info: dict) -> None:
    a, iters = R.a, R.iters
    budget = a.budget or (2.0 if a.quick else 8.0)
    rounds = 4 if iters >= 20 else 1
    R.v.update(budget=budget, rounds=rounds)
    variants, cuda_variants = R.v["variants"], R.v["cuda_variants"]
    with R.P.stage("latency cpu") as st:
        measure_all([v for v in variants if v.run_fn], R.v["inputs"], iters, 5, rounds, budget, R.P.say)
        st["note"] = f"{len(variants)} variants x batch {', '.join(map(str, BATCHES))}, {R.threads} threads"
    if cuda_variants:
        with R.P.stage("latency cuda") as st:
            measure_all(cuda_variants, R.v["inputs"], iters * 2, 10, rounds, budget, R.P.say)
            g = getattr(cuda_variants[-1], "graph_diffs", {})
            cuda_variants[-1].row["graph_vs_eager_max_abs"] = g
            st["note"] = f"{len(cuda_variants)} variants on {info.get('gpu')}; graph vs eager max |Δ| {g}"


def _trt_one(R: Run, key: str, prec: str, build_engine) -> tuple[dict | None, str]:
    """Build one engine from its manifest's profile and time it through export/runner.py."""
    arts, plan_path = R.v["arts"], R.v["arts"] / f"{key}.plan"
    if key not in R.v["manifests"]:
        return None, f"{key}: no ONNX artefact"
    try:
        with stderr_to(R.log_file):
            build_engine(arts / f"{key}.onnx", plan_path, R.v["manifests"][key]["engine_profile"], prec)
    except Exception as e:  # noqa: BLE001 - recorded
        why = str(e).splitlines()[0] if str(e) else ""
        return None, f"{key}: engine build failed ({type(e).__name__}: {why})"
    r = run_runner(REPO / "export" / "runner.py", plan_path, arts / f"{key}.golden.npz", R.v["lengths"], R.threads,
                   R.iters * 2, R.work)
    row = Variant(f"student trt-{prec}", "student", "tensorrt", prec, "cuda", plan_path,
                  params=R.v["student_info"]["params"]).row
    for bb in r.get("bench") or []:
        row["latency"][f"b{bb['batch']}"] = {k: bb[k] for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "iters")}
    if r.get("error"):
        row["errors"].append(r["error"])
    row["note"] = f"export/runner.py; golden check {r.get('check_ok')}; metrics: the ONNX artefact's (CPU ORT)"
    onnx_row = next((v.row for v in R.v["variants"] if v.row["name"] == f"student ort-{prec}"), {})
    row["metrics"], row["retention"] = onnx_row.get("metrics"), onnx_row.get("retention")
    return row, f"{key}: {'ok' if not r.get('error') else r['error']}"


def stage_tensorrt(R: Run, info: dict) -> None:
    trt_rows, res = [], {}
    with R.P.stage("tensorrt") as st:
        if "tensorrt" in R.skip:
            res["status"] = "skipped (--skip tensorrt)"
        elif R.a.device != "cuda":
            res["status"] = f"not measured: CPU run (--device cpu); tensorrt here: {info['tensorrt']}"
        elif str(info["tensorrt"]).startswith("unavailable"):
            res["status"] = info["tensorrt"]
        else:
            from cpsl.deploy.tensorrt import build_engine
            msgs = []
            for key, _kind, _ckpt, prec in R.v["plan"][1:]:
                row, msg = _trt_one(R, key, prec, build_engine)
                trt_rows += [row] if row else []
                msgs.append(msg)
            res["status"] = f"TensorRT {info['tensorrt']}: " + "; ".join(msgs)
        st["note"] = res["status"]
    R.v.update(trt_rows=trt_rows, tensorrt=res,
               rows=[v.row for v in R.v["variants"] + R.v["cuda_variants"]] + trt_rows)


def stage_profiles(R: Run) -> None:
    profiles, arts, inputs, mods = {}, R.v["arts"], R.v["inputs"], R.v["mods"]
    with R.P.stage("profiles") as st:
        if "profiles" in R.skip:
            profiles = {"skipped": "--skip profiles"}
        else:
            if "student_int8" in R.v["manifests"]:
                try:
                    profiles["ort_int8_b1"] = ort_profile(arts / "student_int8.onnx", inputs[1], mods, R.threads,
                                                          min(R.iters, 200), R.work / "ort_profile")
                except Exception as e:  # noqa: BLE001
                    profiles["ort_int8_b1"] = {"error": f"{type(e).__name__}: {e}"}
            x, mask = torch_inputs(inputs[1], mods)
            for key, model in (("torch_teacher_b1", R.v["teacher"]), ("torch_student_b1", R.v["student"])):
                try:
                    with torch.inference_mode():
                        profiles[key] = torch_profile(lambda: model.predict(x, mask),
                                                      min(R.iters, 10 if R.a.quick else 50), R.log_file)
                except Exception as e:  # noqa: BLE001
                    profiles[key] = {"error": f"{type(e).__name__}: {e}"}
        st["note"] = ", ".join(profiles) if "skipped" not in profiles else "skipped"
    R.v["profiles"] = profiles
    R.v["breakdown"] = accuracy_breakdown(R.v["rows"], R.v["preds"])
    R.v["sizes"] = size_breakdown(arts / "student_int8.onnx") if "student_int8" in R.v["manifests"] else {}


def accuracy_breakdown(rows: list[dict], preds: dict) -> dict | None:
    """Teacher → student fp32 (distillation) → student int8 (quantization), and which step loses more."""
    tr, s32r, s8r = (next((r for r in rows if r["name"] == n and r["device"] == "cpu"), {}) for n in
                     ("teacher pytorch-fp32", "student pytorch-fp32", "student ort-int8"))
    if not (tr.get("metrics") and s32r.get("metrics") and s8r.get("metrics")):
        return None
    d = np.abs(preds[("student ort-int8", "cpu")] - preds[("student pytorch-fp32", "cpu")])
    b = {f"{k}_{m}": r["metrics"][m] for k, r in (("teacher", tr), ("student_fp32", s32r), ("student_int8", s8r))
         for m in ("Non0_acc_2", "MAE")}
    b.update(int8_vs_fp32_mean_abs=float(d.mean()), int8_vs_fp32_max_abs=float(d.max()))

    def loss(a, z):  # relative loss of one step, accuracy and MAE together
        return ((b[f"{a}_Non0_acc_2"] - b[f"{z}_Non0_acc_2"]) / max(b["teacher_Non0_acc_2"], 1e-9)
                + (b[f"{z}_MAE"] - b[f"{a}_MAE"]) / max(b["teacher_MAE"], 1e-9))
    sd, sq = loss("teacher", "student_fp32"), loss("student_fp32", "student_int8")
    b["dominant_loss"] = ("none (neither step loses more than 0.5%)" if max(sd, sq) <= 0.005
                          else "quantization" if sq > sd else "distillation")
    return b


def stage_subprocesses(R: Run) -> None:
    """The torch-free runner, bench/cp_kernel.py and bench/train_step.py (failures recorded, not fatal)."""
    a, arts, runner_res = R.a, R.v["arts"], {}
    with R.P.stage("runner") as st:
        if "runner" in R.skip:
            runner_res = {"skipped": "--skip runner"}
        elif "student_int8" in R.v["manifests"]:
            runner_res["student_int8.onnx"] = run_runner(REPO / "export" / "runner.py", arts / "student_int8.onnx",
                                                         arts / "student_int8.golden.npz", R.v["lengths"], R.threads,
                                                         R.iters, R.work)
        st["note"] = "; ".join(f"{k}: check {v.get('check_ok')}" + (f", error {v['error']}" if v.get("error") else "")
                               for k, v in runner_res.items() if isinstance(v, dict)) or runner_res.get("skipped", "—")
    timeout = 240 if a.quick else 900
    with R.P.stage("cp_kernel") as st:
        cpk = ({"skipped": "--skip cp_kernel"} if "cp_kernel" in R.skip
               else run_cp_kernel(Path(a.cp_kernel_script), a.device, R.threads, R.work, timeout))
        st["note"] = cpk.get("skipped") or cpk.get("error") or f"{len(cpk.get('rows', []))} rows"
    with R.P.stage("train_step") as st:
        steps, warm = (5, 2) if a.quick else (30, 5)
        tsr = ({"skipped": "--skip train_step"} if "train_step" in R.skip
               else run_train_step(REPO / "bench" / "train_step.py", a.device, R.threads, steps, warm, R.work, timeout))
        st["note"] = tsr.get("skipped") or tsr.get("error") or ", ".join(
            f"{r['variant']} {r['ms_median']:.1f} ms" for r in tsr.get("rows", []))
    R.v.update(runner=runner_res, cp_kernel=cpk, train_step=tsr)


def _settings(R: Run) -> dict:
    a, ev_name = R.a, R.v["ev_name"]
    return {"mode": R.mode, "device": a.device, "data": a.data, "sizes": a.sizes, "eval_split": ev_name,
            "eval_n": len(R.v["ev"]), "lengths": R.v["lengths"],
            "length_rule": f"{a.lengths} of the {ev_name} split's valid lengths",
            "batches": list(BATCHES), "threads": R.threads, "ort_intra_op_threads": R.threads,
            "ort_inter_op_threads": 1, "iters": R.iters, "budget_s_per_variant_and_batch": R.v["budget"],
            "rounds": R.v["rounds"], "work": str(R.work) if a.work else "(temporary, removed)"}


def _model_entry(R: Run, kind: str, given) -> dict:
    d = {k: (str(v) if isinstance(v, Path) else v) for k, v in R.v[f"{kind}_info"].items()}
    ck = R.v[f"{kind}_info"]["ckpt"]
    d["ckpt"] = rel_path(ck) if given else f"<work>/{Path(ck).relative_to(R.work)}"
    return d


def stage_report(R: Run, info: dict) -> int:
    """bench.json (written once, after the figure and the Markdown report are made from it)."""
    info["loadavg_end"] = loadavg()
    rows = R.v["rows"]
    summary, targets = compute_summary(rows, info, R.v["ev_name"])
    # other jobs: load before we started, or calls that waited for the CPU (single-threaded runs)
    start_load = (info.get("loadavg_start") or [0.0])[0]
    shared = start_load > 0.5 or (R.threads == 1 and (summary.get("max_wall_over_cpu") or 1.0) > 1.15)
    argv_str = " ".join(shlex.quote(x) for x in R.a.argv)
    for r in rows:
        if r.get("file"):
            r["path"] = f"<work>/artefacts/{r['file']}"
    res = {
        "format": "cpsl-bench-1", "summary": summary,
        "command": "python bench/run.py" + (f" {argv_str}" if argv_str else ""),
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": info, "shared_machine": shared, "settings": _settings(R), "targets": targets,
        "misses": misses(targets, rows, R.v["profiles"], R.v["breakdown"], R.v["sizes"]), "rows": rows,
        "teacher": _model_entry(R, "teacher", R.a.ckpt), "student": _model_entry(R, "student", R.a.student_ckpt),
        "export_errors": R.v["export_errors"], "accuracy_breakdown": R.v["breakdown"],
        "int8_size_breakdown": R.v["sizes"], "profiles": R.v["profiles"], "runner": R.v["runner"],
        "tensorrt": R.v["tensorrt"], "cp_kernel": R.v["cp_kernel"], "train_step": R.v["train_step"],
        "stages": R.P.stages, "total_s": R.P.elapsed(),
    }
    try:
        write_pareto(R.out / "pareto.png", rows, f"MAE on {R.v['ev_name']}; {describe_machine(info)}")
    except Exception as e:  # noqa: BLE001 - the plot must never sink a finished run
        R.P.say(f"warning: pareto.png not written ({type(e).__name__}: {e})")
        R.log(traceback.format_exc())
    write_markdown(R.out / "bench.md", res)
    (R.out / "bench.json").write_text(json.dumps(res, indent=2, default=str))
    R.P.say(f"summary: speed-up int8 vs teacher b1 {fmt_num(summary['speedup_int8_vs_teacher_b1'], '{:.2f}x')}, "
            f"Non0_acc_2 retention {fmt_num(summary['retention_non0_acc2'], '{:.2%}')}, MAE change "
            f"{fmt_num(summary['mae_increase'], '{:+.2%}')}, int8 {fmt_num(summary['student_int8_bytes'], '{:,}')} bytes")
    R.P.say("targets: " + ", ".join(f"{t['key']} {t['status']}" for t in targets))
    R.P.say(f"wrote {R.out / 'bench.json'}, {R.out / 'bench.md'}, {R.out / 'pareto.png'}")
    return 0


def run_all(R: Run) -> int:
    info = machine_info(R.a.device, R.threads)
    R.P.say(f"machine: {describe_machine(info)}; load average {info['loadavg_start']}; work folder {R.work}")
    stage_data(R)
    stage_model(R, "teacher")
    stage_model(R, "student")
    stage_export(R)
    build_variants(R)
    stage_accuracy(R)
    stage_latency(R, info)
    stage_tensorrt(R, info)
    stage_profiles(R)
    stage_subprocesses(R)
    return stage_report(R, info)
