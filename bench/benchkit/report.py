"""bench.json summary, targets and the Markdown report (its prose generated from measured values), Pareto figure."""
from __future__ import annotations

import math
from pathlib import Path


from . import REPO, TARGET_INT8_BYTES, TARGET_MAE_INCREASE, TARGET_RETENTION, TARGET_SPEEDUP
from .machine import describe_machine




def rel_path(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return str(p)


# ---------------------------------------------------------------------------- report
def fmt_num(v, fmt="{:.3f}", none="—"):
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


def _lat(r, b="b1", k="p50_ms"):
    return ((r or {}).get("latency") or {}).get(b, {}).get(k)


def _speed_miss(by: dict, profiles: dict) -> dict:
    """Why the batch-1 speed-up target was missed, and the fastest measured alternative."""
    t, s32, s8 = by.get(("teacher pytorch-fp32", "cpu")), by.get(("student ort-fp32", "cpu")), \
        by.get(("student ort-int8", "cpu"))
    if not (_lat(t) and _lat(s8)):
        return {"explanation": ["the speed-up could not be measured (see the errors in the latency table)."],
                "next_step": "fix the errors listed under the latency table and rerun."}
    lines = [f"teacher eager b1 p50 {_lat(t):.3f} ms vs student int8 ORT {_lat(s8):.3f} ms."]
    if _lat(t, k="cpu_p50_ms") and _lat(s8, k="cpu_p50_ms"):
        lines.append(f"In CPU time {_lat(t, k='cpu_p50_ms'):.3f} vs {_lat(s8, k='cpu_p50_ms'):.3f} ms; wall/CPU "
                     f"{_lat(t, k='wall_over_cpu'):.2f} and {_lat(s8, k='wall_over_cpu'):.2f}.")
    if _lat(s32):
        lines.append(f"student fp32 ORT b1 p50 {_lat(s32):.3f} ms: int8 runs at {_lat(s32) / _lat(s8):.2f}x of fp32.")
    op = profiles.get("ort_int8_b1") or {}
    if op.get("top_ops"):
        qdq = sum(o["share_of_node_time"] for o in op["top_ops"]
                  if o["op"] in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"))
        lines.append("ORT int8 b1 profile, share of kernel time: "
                     + ", ".join(f"{o['op']} {o['share_of_node_time']:.0%}" for o in op["top_ops"][:5])
                     + f"; (de)quantization {qdq:.0%}.")
    cpu_rows = [r for r in by.values() if r["device"] == "cpu" and _lat(r) and r["name"] != "teacher pytorch-fp32"]
    best = min(cpu_rows, key=_lat)
    step = (f"the fastest measured CPU artefact at batch 1 is {best['name']} ({_lat(t) / _lat(best):.2f}x the "
            f"teacher, target {TARGET_SPEEDUP:.1f}x)")
    if _lat(s32, "b32") and _lat(s8, "b32"):
        step += f"; at batch 32 int8 runs at {_lat(s32, 'b32') / _lat(s8, 'b32'):.2f}x of fp32"
    return {"explanation": lines, "next_step": step + "."}


def _accuracy_miss(b: dict) -> dict:
    """Where the accuracy went: the distillation and quantization steps, as measured."""
    if not b:
        return {"explanation": [], "next_step": "the accuracy breakdown could not be measured."}
    lines = [f"Non0_acc_2 teacher {fmt_num(b.get('teacher_Non0_acc_2'), '{:.4f}')} → student fp32 "
             f"{fmt_num(b.get('student_fp32_Non0_acc_2'), '{:.4f}')} (distillation) → int8 "
             f"{fmt_num(b.get('student_int8_Non0_acc_2'), '{:.4f}')} (quantization); MAE "
             f"{fmt_num(b.get('teacher_MAE'), '{:.4f}')} → {fmt_num(b.get('student_fp32_MAE'), '{:.4f}')} → "
             f"{fmt_num(b.get('student_int8_MAE'), '{:.4f}')}.",
             f"int8 vs student fp32 predictions: mean |Δ| {fmt_num(b.get('int8_vs_fp32_mean_abs'), '{:.4f}')}, "
             f"max |Δ| {fmt_num(b.get('int8_vs_fp32_max_abs'), '{:.4f}')}."]
    steps = {"distillation": ("teacher", "student_fp32"), "quantization": ("student_fp32", "student_int8")}
    dom = b.get("dominant_loss")
    if dom in steps:
        a, z = steps[dom]
        step = (f"the larger loss is in {dom} (Non0_acc_2 {b[f'{z}_Non0_acc_2'] - b[f'{a}_Non0_acc_2']:+.4f}, "
                f"MAE {b[f'{z}_MAE'] - b[f'{a}_MAE']:+.4f} in that step): work on that step first.")
    else:
        step = f"neither step loses more than 0.5% ({dom}); the evaluation split decides the miss."
    return {"explanation": lines, "next_step": step}


def _size_miss(sizes: dict) -> dict:
    largest = sizes["largest"][:5]
    share = sum(x["bytes"] for x in largest) / sizes["file_bytes"]
    lines = [f"{sizes['file_bytes']:,} bytes: initializers {sizes['initializer_bytes']:,}, Constant nodes "
             f"{sizes['constant_bytes']:,}, graph structure {sizes['other_bytes']:,}; largest: " + ", ".join(
                 f"{x['name']} {x['dtype']}{x['shape']} {x['bytes'] / 1024:.0f} KiB" for x in largest)]
    return {"explanation": lines, "next_step": f"the {len(largest)} largest tensors hold {share:.0%} of the file "
                                               f"({TARGET_INT8_BYTES:,} B allowed)."}


def misses(targets, rows, profiles, breakdown, sizes) -> dict:
    """Per missed target: an explanation and a next step, both built from the measured values."""
    by = {(r["name"], r["device"]): r for r in rows}
    status = {t["key"]: t["status"] for t in targets}
    out = {}
    if status["speedup_int8_vs_teacher_b1"] == "MISS":
        out["speedup_int8_vs_teacher_b1"] = _speed_miss(by, profiles)
    for key in ("retention_non0_acc2", "mae_increase"):
        if status[key] == "MISS":
            out[key] = _accuracy_miss(breakdown or {})
    if status["student_int8_bytes"] == "MISS" and sizes:
        out["student_int8_bytes"] = _size_miss(sizes)
    return out


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
