"""bench.json summary, targets and the Markdown report (its prose generated from measured values), Pareto figure."""
from __future__ import annotations

import math
from pathlib import Path


from . import BATCHES, REPO, TARGET_INT8_BYTES, TARGET_MAE_INCREASE, TARGET_RETENTION, TARGET_SPEEDUP
from .machine import describe_machine




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
