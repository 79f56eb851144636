"""bench.md: the Markdown report, one function per section, every sentence filled from the
measured values of bench.json."""
from __future__ import annotations

from pathlib import Path

from . import BATCHES
from .machine import describe_machine
from .report import fmt_num


def _md_head(res: dict) -> list[str]:
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
        L.append(f"| {t['what']} | {fmt_num(t['value'], t['fmt'])} | {t['op']} {t['fmt'].format(t['threshold'])} | "
                 f"**{t['status']}** |")
    L.append("")
    for key, ns in res.get("misses", {}).items():
        L.append(f"**{key} — MISS.** " + " ".join(ns["explanation"]) + f"  \n*Next step:* {ns['next_step']}\n")
    return L


def _md_latency(res: dict) -> list[str]:
    s, st = res["summary"], res["settings"]
    L = []
    L.append("## Latency (ms)\n")
    L.append("| variant | device | b1 p50 | b1 p90 | b1 p99 | b1 CPU p50 | b32 p50 | b32 p90 | b32 p99 | b32 CPU p50 "
             "| b32 samples/s | wall/CPU b1, b32 | iters b1/b32 |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in res["rows"]:
        a, b = r["latency"].get("b1", {}), r["latency"].get("b32", {})
        thr = 32 / (b["p50_ms"] / 1e3) if b.get("p50_ms") else None
        L.append(f"| {r['name']} | {r['device']} | {fmt_num(a.get('p50_ms'))} | {fmt_num(a.get('p90_ms'))} | "
                 f"{fmt_num(a.get('p99_ms'))} | {fmt_num(a.get('cpu_p50_ms'))} | {fmt_num(b.get('p50_ms'))} | {fmt_num(b.get('p90_ms'))} | "
                 f"{fmt_num(b.get('p99_ms'))} | {fmt_num(b.get('cpu_p50_ms'))} | {fmt_num(thr, '{:,.0f}')} | "
                 f"{fmt_num(a.get('wall_over_cpu'), '{:.2f}')}, {fmt_num(b.get('wall_over_cpu'), '{:.2f}')} | "
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
                 f"(wall-clock: {fmt_num(s['speedup_int8_vs_teacher_b1'], '{:.2f}x')}).\n")
    return L


def _md_accuracy(res: dict) -> list[str]:
    st = res["settings"]
    L = []
    L.append("## Accuracy, size\n")
    L.append(f"MMSA metrics on **{st['eval_split']}**; retention = variant / teacher fp32 (PyTorch).\n")
    L.append("| variant | device | MAE | Corr | Non0_acc_2 | Has0_acc_2 | Mult_acc_7 | Non0 retention | MAE change "
             "| params | graph elems | file | bytes |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in res["rows"]:
        m, rt = r.get("metrics") or {}, r.get("retention") or {}
        L.append(f"| {r['name']} | {r['device']} | {fmt_num(m.get('MAE'), '{:.4f}')} | {fmt_num(m.get('Corr'), '{:.4f}')} | "
                 f"{fmt_num(m.get('Non0_acc_2'), '{:.4f}')} | {fmt_num(m.get('Has0_acc_2'), '{:.4f}')} | "
                 f"{fmt_num(m.get('Mult_acc_7'), '{:.4f}')} | {fmt_num(rt.get('Non0_acc_2'), '{:.2%}')} | "
                 f"{fmt_num(rt.get('MAE_increase_rel'), '{:+.2%}')} | {fmt_num(r.get('params'), '{:,}')} | "
                 f"{fmt_num(r.get('graph_params'), '{:,}')} | {r.get('file') or '—'} | {fmt_num(r.get('bytes'), '{:,}')} |")
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
            L.append(f"| {lab} | {fmt_num(b.get(f'{k}_Non0_acc_2'), '{:.4f}')} | {fmt_num(b.get(f'{k}_MAE'), '{:.4f}')} |")
        L.append(f"\nint8 vs fp32 student predictions on {st['eval_split']}: mean |Δ| "
                 f"{fmt_num(b.get('int8_vs_fp32_mean_abs'), '{:.4f}')}, max |Δ| {fmt_num(b.get('int8_vs_fp32_max_abs'), '{:.4f}')}. "
                 f"Largest loss: {b.get('dominant_loss') or '—'}.\n")
    return L


def _md_profiles(res: dict) -> list[str]:
    L = []
    pr = res.get("profiles", {})
    if pr and not pr.get("skipped"):
        L.append("## Profiles (batch 1)\n")
        op = pr.get("ort_int8_b1")
        if op and "top_ops" in op:
            un = next((r["latency"].get("b1", {}).get("p50_ms") for r in res["rows"]
                       if r["name"] == "student ort-int8" and r["device"] == "cpu"), None)
            L.append(f"ONNX Runtime, student int8 (`SessionOptions.enable_profiling`, {op['runs']} runs): "
                     f"{op['run_ms']:.3f} ms per run under the profiler ({fmt_num(un)} ms p50 without it), "
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
    return L


def _md_runner_trt(res: dict) -> list[str]:
    L = []
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
    return L


def _md_subbench(title: str, d: dict, table) -> list[str]:
    """A subprocess bench's section: skipped, error, or its table (``table(d) -> lines``)."""
    L = [title]
    if d.get("skipped"):
        return L + [f"skipped ({d['skipped']})\n"]
    if d.get("error"):
        L.append(f"error: {d['error']}\n")
    if d.get("rows"):
        L += table(d)
    return L


def _cp_kernel_table(ck: dict) -> list[str]:
    L = [f"`{ck.get('command')}`\n", "| set | backend | device | ms | vs foreach | params | tensors |",
         "|---|---|---|---:|---:|---:|---:|"]
    for r in ck["rows"]:
        base = next((x["ms"] for x in ck["rows"] if x["set"] == r["set"] and x["backend"] == "foreach"), None)
        spd = f"{base / r['ms']:.2f}x" if base and r["backend"] != "bandwidth_floor" and r["ms"] else ""
        L.append(f"| {r['set']} | {r['backend']} | {r['device']} | {r['ms']:.3f} | {spd} | "
                 f"{r.get('params', 0):,} | {r.get('tensors', '')} |")
    return L + [""]


def _train_step_table(ts: dict) -> list[str]:
    L = [f"`{ts.get('command')}` (teacher model, batch {ts.get('meta', {}).get('batch_size')})\n",
         "| variant | ms/step (median) | overhead vs none | steps |", "|---|---:|---:|---:|"]
    for r in ts["rows"]:
        L.append(f"| {r['variant']} | {r['ms_median']:.2f} | {fmt_num(r.get('overhead_pct'), '{:+.1f}%')} | {r['steps']} |")
    spread = max(((r["ms_median"] - r["ms_p10"]) / r["ms_median"] for r in ts["rows"] if r.get("ms_p10")), default=None)
    return L + [f"\n{min(r['steps'] for r in ts['rows'])} timed steps per variant; the median is up to "
                f"{fmt_num(spread, '{:.1%}')} above the 10th percentile, so smaller overheads are within the noise.\n"]


def _md_cp_kernel(res: dict) -> list[str]:
    return (_md_subbench("## CP kernel (`bench/cp_kernel.py --quick`)\n", res.get("cp_kernel", {}), _cp_kernel_table)
            + _md_subbench("## CP inside a training step (`bench/train_step.py`)\n", res.get("train_step", {}),
                           _train_step_table))


def _md_run(res: dict) -> list[str]:
    L = []
    L.append("## Run\n")
    t, sd = res["teacher"], res["student"]
    L.append(f"Teacher: {t['source']} ({t.get('epochs_run', '—')} epochs, best {t.get('best_epoch', '—')}), "
             f"{fmt_num(t.get('params'), '{:,}')} parameters. Student: {sd['source']} ({sd.get('epochs_run', '—')} epochs, "
             f"best {sd.get('best_epoch', '—')}), {fmt_num(sd.get('params'), '{:,}')} parameters.  ")
    L.append("Stages: " + ", ".join(f"{x['stage']} {x['seconds']:.0f} s" for x in res["stages"]) + ".\n")
    return L


def write_markdown(path: Path, res: dict) -> None:
    """bench.md: every section from the measured values in ``res`` (the content of bench.json)."""
    L = []
    for section in (_md_head, _md_latency, _md_accuracy, _md_profiles, _md_runner_trt, _md_cp_kernel, _md_run):
        L += section(res)
    path.write_text("\n".join(L) + "\n")
