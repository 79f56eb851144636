"""The table and figure of bench/balance.py: read each cell's ``ablation.json`` (a ``cpsl ablate``
folder) and its k-fold folds, pair every variant with ``none`` over the same seeds
(``cpsl.ablate.paired_difference``), write ``balance.json``, ``balance.md`` and ``balance.png``."""
from __future__ import annotations

import json
from pathlib import Path

from cpsl.ablate import machine, paired_difference


def _ms(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = (sum((x - mean) ** 2 for x in values) / n) ** 0.5
    return {"mean": mean, "std": std, "n": n}


def _excludes_zero(d: dict | None) -> bool:
    return bool(d and d.get("ci95") and (d["ci95"][0] > 0 or d["ci95"][1] < 0))


def cell_table(summaries: list[dict], split: str, names: list[str]) -> dict:
    """Per variant: ``split`` MAE over (run, seed) pairs, the paired Δ to ``none``, each non-text
    modality's unimodal-head MAE (and its Δ to none), the Shapley contributions (mean)."""
    def values(n, key="MAE", head=None):
        out = []
        for s in summaries:
            v = s["variants"][n]
            m = (v.get(f"{split}_aux") or {}).get(head) if head else v.get(split)
            if not m:
                return None
            out += m[key]["values"]
        return out
    first = summaries[0]["variants"]
    mods = next((list(v[f"{split}_aux"]) for v in first.values() if v.get(f"{split}_aux")), [])
    weak = [m for m in mods if m != "text"]
    rows = {}
    for n in names:
        mae, ref = values(n), values("none")
        if mae is None:
            continue
        r = {"MAE": _ms(mae), "heads": {}, "shapley": None}
        if n != "none" and ref:
            r["vs_none"] = paired_difference(mae, ref)
            r["vs_none"]["excludes_0"] = _excludes_zero(r["vs_none"])
        for m in weak:
            h, h0 = values(n, head=m), values("none", head=m)
            if h:
                r["heads"][m] = _ms(h)
                if n != "none" and h0:
                    r["heads"][m]["vs_none"] = paired_difference(h, h0)
        sh = [s["variants"][n].get("shapley") for s in summaries]
        if all(sh):
            r["shapley"] = {m: _ms([x for s in sh for x in s[m]])["mean"] for m in sh[0]}
        rows[n] = r
    return {"split": split, "runs": len(summaries), "seeds": summaries[0]["seeds"], "weak": weak, "variants": rows}


def collect(out: Path, cells: dict, names: list[str]) -> dict:
    res = {}
    for cell, rec in cells.items():
        r = dict(rec)
        p = out / cell / "ablation.json"
        if rec["status"] != "unavailable" and p.is_file():
            s = json.loads(p.read_text())
            has_test = all(v.get("test") for v in s["variants"].values())
            mine = [n for n in names if n in s["variants"]] + [n for n in s["variants"] if n not in names]
            r["table"] = cell_table([s], "test" if has_test else "valid", mine)
            r["ablation_wall_s"] = s.get("wall_s")      # the runs' own wall time (a skipped cell: 0 s here)
            if rec.get("kfold"):
                folds = [json.loads((out / cell / "kfold" / f"fold{i}" / "ablation.json").read_text())
                         for i in range(rec["kfold"]["k"])]
                in_all = [n for n in mine if all(n in f["variants"] for f in folds)]
                r["kfold"] = dict(rec["kfold"], table=cell_table(folds, "valid", in_all),
                                  pairs="(fold, seed)")
        res[cell] = r
    return res


def _fmt(d: dict | None, mark: bool = True) -> str:
    if not d:
        return ""
    if not d.get("ci95"):
        return f"{d['mean']:+.4f}"
    star = " *" if mark and _excludes_zero(d) else ""
    return f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]{star}"


def _rows(cell: str, t: dict) -> list[str]:
    mods = next((list(v["shapley"]) for v in t["variants"].values() if v.get("shapley")), ["text", *t["weak"]])
    lines = [f"| cell | variant | {t['split']} MAE | ΔMAE vs none [95 %] | "
             + " | ".join(f"{m} head MAE (Δ vs none)" for m in t["weak"]) + " | "
             + " | ".join(f"φ {m}" for m in mods) + " |", "|---" * (4 + len(t["weak"]) + len(mods)) + "|"]
    for n, v in t["variants"].items():
        heads = [(f"{h['mean']:.4f} ± {h['std']:.4f}" + (f" ({h['vs_none']['mean']:+.4f})" if h.get("vs_none") else ""))
                 if (h := v["heads"].get(m)) else "" for m in t["weak"]]
        sh = [f"{v['shapley'][m]:+.4f}" if v.get("shapley") and m in v["shapley"] else "" for m in mods]
        lines.append(f"| {cell} | {n} | {v['MAE']['mean']:.4f} ± {v['MAE']['std']:.4f} | {_fmt(v.get('vs_none'))} | "
                     + " | ".join(heads + sh) + " |")
    return lines


def markdown(res: dict, command: str, mc: dict) -> str:
    lines = ["# Imbalance benchmark (bench/balance.py)", "",
             f"Machine: {mc['cpu']} ({mc['cores']} cores, torch {mc['torch']}, CUDA {mc['cuda']}, "
             f"load average at the end {mc['loadavg_at_end']}).", "", "```bash", command, "```", "",
             "MAE: mean ± std over seeds of the checkpoint selected on valid (test split; valid where the "
             "data has no test rows, e.g. the development data pack's MOSI). ΔMAE: paired over the same "
             "seeds (k-fold: over (fold, seed) pairs), mean [95 % t-interval]; negative is better; `*` = "
             "the interval excludes 0. Head MAE: each weak modality's own unimodal head. φ: Shapley "
             "contribution of each modality to the MAE (error reduction, mean over seeds; test split only).", ""]
    for cell, r in res.items():
        if r["status"] == "unavailable":
            lines += [f"## {cell}", "", f"Not run: {r['reason']}", ""]
            continue
        if "table" not in r:
            continue
        t = r["table"]
        lines += [f"## {cell} ({t['split']} split, seeds {t['seeds']}, {r.get('ablation_wall_s') or r.get('wall_s', 0):.0f} s wall)", ""]
        lines += _rows(cell, t) + [""]
        if r.get("kfold"):
            kt = r["kfold"]["table"]
            lines += [f"### {cell}: video-grouped {r['kfold']['k']}-fold over train + valid (fold-valid MAE, "
                      f"{kt['runs']} folds × {len(kt['seeds'])} seeds paired)", ""]
            lines += _rows(f"{cell} k-fold", kt) + [""]
    return "\n".join(lines) + "\n"


def figure(res: dict, path: Path) -> None:
    """One panel per cell (and per k-fold): ΔMAE vs none with its 95 % interval per variant (dots),
    and each weak modality's head ΔMAE vs none (small markers)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = []
    for cell, r in res.items():
        if "table" in r:
            panels.append((cell + f" ({r['table']['split']})", r["table"]))
        if r.get("kfold", {}).get("table"):
            panels.append((cell + " k-fold (valid)", r["kfold"]["table"]))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    marks = ["v", "^", "s", "D"]
    for ax, (title, t) in zip(axes[0], panels):
        names = [n for n, v in t["variants"].items() if v.get("vs_none")]
        for i, n in enumerate(names):
            d = t["variants"][n]["vs_none"]
            lo, hi = d["ci95"] or (d["mean"], d["mean"])
            ax.errorbar([i], [d["mean"]], yerr=[[d["mean"] - lo], [hi - d["mean"]]], fmt="o", capsize=3,
                        color="tab:red" if d.get("excludes_0") else "tab:blue")
            for j, m in enumerate(t["weak"]):
                h = t["variants"][n]["heads"].get(m, {}).get("vs_none")
                if h:
                    ax.plot([i + 0.2], [h["mean"]], marker=marks[j % len(marks)], color="gray", ms=4, ls="",
                            label=f"{m} head Δ" if i == 0 else None)
        ax.axhline(0, color="k", lw=0.7)
        ax.set_xlim(-0.6, max(len(names), 1) - 0.2)
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if t["weak"] and names:
            ax.legend(fontsize=6)
    axes[0][0].set_ylabel("ΔMAE vs none (95 % CI; red: excludes 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(out: Path, cells: dict, names: list[str], command: str) -> dict:
    res = collect(out, cells, names)
    mc = machine()
    (out / "balance.json").write_text(json.dumps({"command": command, "machine": mc, "variants": names,
                                                  "cells": res}, indent=2))
    (out / "balance.md").write_text(markdown(res, command, mc))
    figure(res, out / "balance.png")
    return res
