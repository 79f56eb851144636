"""Summary and Markdown of ``bench/run.py --e2e`` (bench/benchkit/e2e.py)."""
from __future__ import annotations

from pathlib import Path

TARGET_B1_MS = 3.0               # issue 32: batch 1, one thread, tokenization included
TARGET_RETENTION = 0.98
TARGET_MAE_REL = 0.03             # issue 32: the int8 student's MAE within +3 % of the teacher's
TARGET_INT8_MB = 20.0            # the student's int8 graph on disk (decimal MB)
TARGET_INT8_VS_FP32_MAE = 0.01   # int8 MAE / the same student's fp32-graph MAE - 1


def _row(rows, L, p):
    return next(r for r in rows if r["layers"] == L and r["precision"] == p)


def _lat(r, key="t1_b1", part="total", q="p50_ms"):
    return r["latency"][key][part][q]


def summarize(rows: list[dict], student: int, teacher_ref: dict) -> dict:
    """The headline figures of the student (``student`` encoder layers) and the checks of issue 15."""
    s8, s32 = _row(rows, student, "int8"), _row(rows, student, "fp32")
    ret = s8["retention_vs_teacher_fp32"]
    out = {
        "student_layers": student,
        "e2e_int8_b1_p50_ms": _lat(s8), "e2e_int8_b1_p90_ms": _lat(s8, q="p90_ms"),
        "e2e_int8_b1_p99_ms": _lat(s8, q="p99_ms"), "e2e_int8_b1_tokenize_p50_ms": _lat(s8, part="tokenize"),
        "e2e_int8_b32_p50_ms": _lat(s8, "t1_b32"), "e2e_fp32_b1_p50_ms": _lat(s32), "e2e_fp32_b32_p50_ms": _lat(s32, "t1_b32"),
        "e2e_int8_b1_2threads_p50_ms": _lat(s8, "t2_b1"), "e2e_int8_b32_2threads_p50_ms": _lat(s8, "t2_b32"),
        "e2e_int8_bytes": s8["bytes"], "e2e_retention_non0_acc2": ret["Non0_acc_2"],
        "e2e_mae_increase_rel": ret["MAE_increase_rel"], "e2e_int8_non0_acc2": s8["metrics"]["Non0_acc_2"],
        "e2e_int8_mae": s8["metrics"]["MAE"], "teacher_fp32_non0_acc2": teacher_ref["Non0_acc_2"],
        "teacher_fp32_mae": teacher_ref["MAE"], "e2e_int8_mb": s8["bytes"] / 1e6, "e2e_fp32_mb": s32["bytes"] / 1e6,
        "e2e_int8_vs_fp32_mae_rel": s8["metrics"]["MAE"] / s32["metrics"]["MAE"] - 1,
        "e2e_int8_vs_fp32_b1_ratio": s8["latency"]["t1_b1"].get("ratio_vs_fp32"),
    }
    out["checks"] = {
        f"retention_non0_acc2_ge_{TARGET_RETENTION:g}": out["e2e_retention_non0_acc2"] >= TARGET_RETENTION,
        f"mae_increase_le_{100 * TARGET_MAE_REL:g}pct": out["e2e_mae_increase_rel"] <= TARGET_MAE_REL,
        f"int8_b1_p50_le_{TARGET_B1_MS:g}ms_1thread": out["e2e_int8_b1_p50_ms"] <= TARGET_B1_MS,
        f"int8_le_{TARGET_INT8_MB:g}MB": out["e2e_int8_mb"] <= TARGET_INT8_MB,
        "int8_mae_within_1pct_of_fp32_graph": out["e2e_int8_vs_fp32_mae_rel"] <= 0.01,
        "int8_faster_than_fp32_b1": out["e2e_int8_b1_p50_ms"] < out["e2e_fp32_b1_p50_ms"],   # 1 thread, interleaved
        "int8_faster_than_fp32_b32": out["e2e_int8_b32_p50_ms"] < out["e2e_fp32_b32_p50_ms"],
        "two_threads_no_slower_b1": out["e2e_int8_b1_2threads_p50_ms"] <= out["e2e_int8_b1_p50_ms"],
        "two_threads_no_slower_b32": out["e2e_int8_b32_2threads_p50_ms"] <= out["e2e_int8_b32_p50_ms"],
    }
    return out


def write_markdown(path: Path, res: dict) -> None:
    s, m = res["summary"], res["machine"]
    L = [f"# End-to-end student on CMU-MOSI valid (raw text + openSMILE audio → sentiment)", "",
         f"Command: `{res['command']}`  ",
         f"Machine: {m['cpu']}, {m['usable_cores']} cores, no GPU; onnxruntime {m['onnxruntime']}; "
         f"load average {m['loadavg_start']} at the start, {m.get('loadavg_end')} at the end (other jobs ran: "
         "latencies are upper bounds of a quiet machine).", "",
         f"Teacher: fine-tuned all-MiniLM-L6-v2 (6 layers) + CPSL, PyTorch fp32: Non0_acc_2 {s['teacher_fp32_non0_acc2']:.4f}, "
         f"MAE {s['teacher_fp32_mae']:.4f}. Every row below runs raw transcripts through `export/frontend.py` "
         "(tokenizers) and ONNX Runtime CPU; latency = tokenization + graph, consecutive real valid transcripts "
         "(≤ 50 tokens), p50 (p90/p99) ms; the precisions of one encoder depth timed interleaved (same input, "
         "rotating order); MB = the .onnx file on disk.", "",
         f"Student int8 vs its fp32 graph: {s['e2e_int8_mb']:.1f} vs {s['e2e_fp32_mb']:.1f} MB, MAE "
         f"{s['e2e_int8_vs_fp32_mae_rel']:+.2%}, batch 1 (1 thread) "
         + (f"×{s['e2e_int8_vs_fp32_b1_ratio']:.2f} (median over rounds of int8/fp32 on the same input)."
            if s.get("e2e_int8_vs_fp32_b1_ratio") is not None else "(no paired ratio)."), "",
         "| encoder layers | precision | MB | Non0_acc_2 | MAE | retention Non0_acc_2 | MAE vs teacher | "
         "1 thr b1 | tokenize b1 | 1 thr b32 | 2 thr b1 | 2 thr b32 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(res["rows"], key=lambda r: (-r["layers"], r["precision"])):
        lt = r["latency"]
        f = lambda k: f"{lt[k]['total']['p50_ms']:.2f} ({lt[k]['total']['p90_ms']:.2f}/{lt[k]['total']['p99_ms']:.2f})"  # noqa: E731
        ret = r["retention_vs_teacher_fp32"]
        L.append(f"| {r['layers']} | {r['precision']} | {r['bytes'] / 1e6:.1f} | {r['metrics']['Non0_acc_2']:.4f} | "
                 f"{r['metrics']['MAE']:.4f} | {ret['Non0_acc_2']:.1%} | {ret['MAE_increase_rel']:+.1%} | {f('t1_b1')} | "
                 f"{lt['t1_b1']['tokenize']['p50_ms']:.3f} | {f('t1_b32')} | {f('t2_b1')} | {f('t2_b32')} |")
    L += ["", f"## Checks (student: {s['student_layers']}-layer encoder, int8)", ""]
    L += [f"- {k}: **{'PASS' if v else 'MISS'}**" for k, v in s["checks"].items()]
    L += ["", f"## ONNX Runtime per-op profile, batch 1, 1 thread ({res['profile_input_tokens']} tokens)", ""]
    for name, p in res["profiles_b1_1thread"].items():
        ops = ", ".join(f"{o['op']} {o['ms_per_run']:.2f} ms ({o['share']:.0%})" for o in p["top_ops"][:6])
        L.append(f"- **{name}** ({p['node_ms']:.2f} ms in nodes): {ops}")
    path.write_text("\n".join(L) + "\n")
