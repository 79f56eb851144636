"""The edge student's seed spread on the recipe's k-fold: the same fold teachers, students of several
distillation seeds, so that the student-vs-teacher figures carry seeds as well as folds.

    python bench/edge_seeds.py --run OUT [--seeds 1,2] [--data-dir DATA] [--threads 1] [--out DIR] [--quiet]

OUT is a finished ``cpsl recipe mosi --kfold K --edge`` run: its fold teachers
(``OUT/kfold/transferred_*/fold<i>/seed<t>``) and their seed-1 students are reused. The students of
another distillation seed ``s`` are made by the recipe's own edge stage (``cpsl.recipes.edge.edge_kfold``,
the kept run's edge settings, only ``LayerDistillSettings.seed`` changed) in
``OUT/kfold_edge_seed<s>/fold<i>``, beside links to the fold's teacher; a fold already done is kept.
One fold is about 40 min at one thread on a 2-vCPU VM (distillation over the MOSEI transfer set).

Reports, per fold and over the folds (mean with its 95 % t-interval): each seed's int8 student against
its fold's teacher (MAE change, Non0_acc_2 retention, and the same with the epochs chosen on the
other folds), the mean over seeds per fold, and how far the seeds differ within a fold. Writes
``DIR/edge_seeds.json``, ``DIR/edge_seeds.md`` and ``DIR/edge_seeds.png`` (DIR default:
``runs/bench/edge_seeds``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from benchkit.errors import BenchError, bench_main
from benchkit.machine import machine_info
from benchkit.outdir import output_dir

from cpsl.ablate import mean_interval

DEFAULT_DATA = os.environ.get("CPSL_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
TEACHER_LINKS = ("config.json", "cpsl-run.json", "results.json")


def _pct(x: dict | None, scale: float = 100.0, sign: bool = True) -> str:
    if not x:
        return "n/a"
    f = "{:+.1f}" if sign else "{:.1f}"
    ci = x.get("ci95")
    return f.format(x["mean"] * scale) + (" [" + ", ".join(f.format(v * scale) for v in ci) + "]" if ci else "")


def combine(per_seed: dict[int, dict]) -> dict:
    """Seeds × folds from each seed's ``recipe.kfold.edge``-shaped block (:func:`cpsl.recipes.edge.edge_kfold`).
    Per fold the mean over seeds; over folds the mean and its 95 % t-interval, per seed and of the
    per-fold seed means; within folds the seeds' standard deviation, pooled over folds (needs 2 seeds)."""
    seeds = sorted(per_seed)
    if not seeds:
        raise BenchError("no seeds to combine")
    ks = {per_seed[s]["k"] for s in seeds}
    if len(ks) != 1:
        raise BenchError(f"the seeds' k-folds differ in k ({sorted(ks)})")
    k = ks.pop()
    keys = ("mae_vs_teacher", "retention_non0_acc2")
    per_fold = []
    for i in range(k):
        t = per_seed[seeds[0]]["per_fold"]["teacher"][i]
        for s in seeds[1:]:
            if abs(per_seed[s]["per_fold"]["teacher"][i]["MAE"] - t["MAE"]) > 1e-6:
                raise BenchError(f"fold {i + 1}: seed {s}'s teacher is not seed {seeds[0]}'s (MAE "
                                 f"{per_seed[s]['per_fold']['teacher'][i]['MAE']:.4f} vs {t['MAE']:.4f})")
        row = {"fold": i + 1, "teacher": {"MAE": t["MAE"], "Non0_acc_2": t["Non0_acc_2"]}}
        for key in keys:
            vals = [per_seed[s]["per_fold"][key][i] for s in seeds]
            row[key] = {"by_seed": dict(zip(map(str, seeds), vals)), "mean": sum(vals) / len(vals),
                        "sd": _sd(vals)}
        row["student_MAE"] = {str(s): per_seed[s]["per_fold"]["student"][i]["MAE"] for s in seeds}
        row["student_Non0_acc_2"] = {str(s): per_seed[s]["per_fold"]["student"][i]["Non0_acc_2"] for s in seeds}
        per_fold.append(row)
    out = {"seeds": seeds, "k": k, "per_fold": per_fold,
           "per_seed": {str(s): {key: per_seed[s][key] for key in keys} | {
               "cross_fold_epochs": _cross(per_seed[s])} for s in seeds},
           "seed_mean": {key: mean_interval([r[key]["mean"] for r in per_fold]) for key in keys},
           "all_runs": {key: mean_interval([v for r in per_fold for v in r[key]["by_seed"].values()]) for key in keys}}
    if len(seeds) > 1:
        out["within_fold_sd"] = {key: math.sqrt(sum(r[key]["sd"] ** 2 for r in per_fold) / k) for key in keys}
        out["between_fold_sd"] = {key: _sd([r[key]["mean"] for r in per_fold]) for key in keys}
    cfe = [per_seed[s].get("cross_fold_epochs") for s in seeds]
    if all(cfe):                      # the teacher's epoch is the same for every seed: its curves are the same
        out["seed_mean_cross_fold_epochs"] = {"mae_vs_teacher": mean_interval(
            [sum(c["student_fp32_mae"][i] / c["teacher_mae"][i] - 1 for c in cfe) / len(cfe) for i in range(k)])}
    return out


def _sd(v: list[float]) -> float:
    return statistics.stdev(v) if len(v) > 1 else 0.0


def _cross(blk: dict) -> dict | None:
    c = blk.get("cross_fold_epochs")
    if not c:
        return None
    return {k: c[k] for k in ("mae_vs_teacher", "retention_non0_acc2") if k in c}


def markdown(res: dict) -> str:
    seeds = [str(s) for s in res["seeds"]]
    head = "| fold | teacher MAE / Non0_acc_2 | " + " | ".join(f"seed {s}: MAE change / retention" for s in seeds) \
        + " | mean over seeds |"
    lines = ["# The edge student over distillation seeds and folds", "",
             f"Command: `{res.get('command', '')}`  ",
             f"Machine: {res.get('machine', {}).get('cpu', '?')}; {res['k']} video-grouped folds of MOSI "
             f"train+valid, each fold's teacher (one seed) and int8 students of seeds {', '.join(seeds)}, scored "
             "on the fold's valid rows as a device runs them (raw text, ONNX Runtime).", "",
             head, "|---" * (len(seeds) + 3) + "|"]
    for r in res["per_fold"]:
        cells = [f"{r['mae_vs_teacher']['by_seed'][s] * 100:+.1f} % / {r['retention_non0_acc2']['by_seed'][s] * 100:.1f} %"
                 for s in seeds]
        lines.append(f"| {r['fold']} | {r['teacher']['MAE']:.4f} / {r['teacher']['Non0_acc_2']:.4f} | "
                     + " | ".join(cells) + f" | {r['mae_vs_teacher']['mean'] * 100:+.1f} % / "
                     f"{r['retention_non0_acc2']['mean'] * 100:.1f} % |")
    lines += ["", "Over the folds (mean [95 % t-interval]):", ""]
    for s in seeds:
        p = res["per_seed"][s]
        c = p.get("cross_fold_epochs") or {}
        lines.append(f"- seed {s}: MAE change {_pct(p['mae_vs_teacher'])} %, retention "
                     f"{_pct(p['retention_non0_acc2'], sign=False)} %; each model's epoch chosen on the other folds (fp32 "
                     f"student): MAE change "
                     f"{_pct(c.get('mae_vs_teacher'))} %, retention {_pct(c.get('retention_non0_acc2'), sign=False)} %")
    sm = res["seed_mean"]
    lines.append(f"- **mean over seeds per fold: MAE change {_pct(sm['mae_vs_teacher'])} %, retention "
                 f"{_pct(sm['retention_non0_acc2'], sign=False)} %**")
    a = res["all_runs"]
    lines.append(f"- every run alike ({a['mae_vs_teacher']['n']} runs; the interval treats them as independent, "
                 f"which they are not): MAE change {_pct(a['mae_vs_teacher'])} %, retention "
                 f"{_pct(a['retention_non0_acc2'], sign=False)} %")
    if "within_fold_sd" in res:
        w, b = res["within_fold_sd"], res["between_fold_sd"]
        lines.append(f"- spread: seeds within a fold SD {w['mae_vs_teacher'] * 100:.1f} points of MAE change and "
                     f"{w['retention_non0_acc2'] * 100:.1f} of retention; the folds' seed means SD "
                     f"{b['mae_vs_teacher'] * 100:.1f} and {b['retention_non0_acc2'] * 100:.1f}")
    cm = res.get("seed_mean_cross_fold_epochs")
    if cm and len(seeds) > 1:
        lines.append(f"- mean over seeds, each model's epoch chosen on the other folds (fp32 student): MAE change "
                     f"{_pct(cm['mae_vs_teacher'])} %")
    lines += ["", "![MAE change and retention per fold and seed](edge_seeds.png)", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    folds = [r["fold"] for r in res["per_fold"]]
    for ax, key, scale, target, label in ((axes[0], "mae_vs_teacher", 100, 3.0, "MAE change vs teacher (%)"),
                                          (axes[1], "retention_non0_acc2", 100, 98.0, "Non0_acc_2 retention (%)")):
        for j, s in enumerate(res["seeds"]):
            ax.scatter([f + (j - (len(res["seeds"]) - 1) / 2) * 0.12 for f in folds],
                       [r[key]["by_seed"][str(s)] * scale for r in res["per_fold"]], s=22, label=f"seed {s}")
        ax.plot(folds, [r[key]["mean"] * scale for r in res["per_fold"]], "k_", markersize=16, label="mean over seeds")
        ax.axhline(target, color="tab:red", lw=0.8, ls="--", label="issue target")
        ax.set_xticks(folds)
        ax.set_xlabel("fold")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fold_folder(run: Path) -> Path:
    found = sorted(p for p in (run / "kfold").glob("transferred_*") if (p / "fold0" / "edge_results.json").is_file())
    if not found:
        raise BenchError(f"{run} has no k-fold edge students (run `cpsl recipe mosi --kfold K --edge --out {run}` first)")
    if len(found) > 1:
        raise BenchError(f"{run}/kfold holds several transferred folders with edge students: {', '.join(p.name for p in found)}")
    return found[0]


def _link_teacher(src: Path, dst: Path, teacher_seed: str) -> None:
    """``dst`` holds links to the fold's teacher (its seed folder and run files) and the new student."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in (*TEACHER_LINKS, f"seed{teacher_seed}"):
        target, link = (src / name).resolve(), dst / name
        if not (src / name).exists():
            continue
        if link.is_symlink() and link.resolve() == target:
            continue
        if link.exists() or link.is_symlink():
            raise BenchError(f"{link} exists and is not a link to {target}")
        link.symlink_to(target)


@bench_main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished `cpsl recipe mosi --kfold K --edge` output folder")
    ap.add_argument("--seeds", default="1,2", help="distillation seeds (1: the recipe's own students)")
    ap.add_argument("--data-dir", default=DEFAULT_DATA, help="the data pack (for the cached MOSEI transfer set)")
    ap.add_argument("--cache", help="the recipe's cache folder (default: the recipe's default)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the distillation (default 1)")
    ap.add_argument("--out", help="report folder (default runs/bench/edge_seeds)")
    ap.add_argument("--overwrite", action="store_true", help="replace a committed report under bench/results")
    ap.add_argument("--quiet", action="store_true", help="no distillation progress bar (the stage lines stay)")
    a = ap.parse_args(argv)
    from cpsl.kfold import fold_pickles
    from cpsl.recipes.edge import FOLD_EDGE, EdgeSettings, edge_kfold
    from cpsl.recipes.mosi import build, default_cache, load_yaml

    try:
        seeds = sorted({int(x) for x in a.seeds.split(",") if x.strip()})
    except ValueError:
        raise BenchError(f"--seeds must be integers separated by commas, got {a.seeds!r}") from None
    if not seeds or min(seeds) < 0:
        raise BenchError("--seeds needs at least one seed >= 0")
    run = Path(a.run)
    if not (run / "results.json").is_file():
        raise BenchError(f"{run} is not a finished recipe run (no results.json)")
    rec = json.loads((run / "results.json").read_text()).get("recipe", {})
    kf = rec.get("kfold") or {}
    if "edge" not in kf:
        raise BenchError(f"{run}/results.json has no k-fold edge block (run `cpsl recipe mosi --kfold K --edge`)")
    out = output_dir(a.out, "edge_seeds", a.overwrite)
    folder = _fold_folder(run)
    first = json.loads((folder / "fold0" / FOLD_EDGE).read_text())
    kept = dict(first["edge"]["settings"])
    kept_seed = int((first["edge"].get("distill", {}).get("settings") or {}).get("seed", 1))
    teacher_seed = str(kf["seed"])
    cache = Path(a.cache) if a.cache else default_cache()
    paths = fold_pickles(rec["mosi_pickle"], int(kf["k"]), cache)
    mosei = None
    if kept.get("transfer", True):
        max_len = int(load_yaml(rec["transfer_config"]).get("build", {}).get("max_len", 50))
        mosei = build("mosei", Path(a.data_dir), cache, rec["source_encoder"], max_len, a.threads, True, {})
    say = lambda m: print(m, flush=True)  # noqa: E731
    per_seed, t0 = {}, time.time()
    for s in seeds:
        distill = {**kept.get("distill", {}), "seed": s, "progress": not a.quiet}
        settings = EdgeSettings(**{**kept, "threads": a.threads, "distill": distill})
        if s == kept_seed:
            f = folder
        else:
            f = run / f"kfold_edge_seed{s}"
            for i in range(len(paths)):
                _link_teacher(folder / f"fold{i}", f / f"fold{i}", teacher_seed)
        say(f"[edge seeds] seed {s}: {f}")
        per_seed[s] = edge_kfold(f, paths, teacher_seed, mosei, settings, say)
    res = combine(per_seed)
    res.update({"command": "python bench/edge_seeds.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "machine": machine_info("cpu", a.threads), "run": str(run), "fold_folder": str(folder),
                "edge_settings": kept, "elapsed_s": time.time() - t0})
    out.mkdir(parents=True, exist_ok=True)
    (out / "edge_seeds.json").write_text(json.dumps(res, indent=1))
    plot(res, out / "edge_seeds.png")
    md = markdown(res)
    (out / "edge_seeds.md").write_text(md)
    say(md)
    say(f"wrote {out / 'edge_seeds.md'}, edge_seeds.json and edge_seeds.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
