"""The unimodal-bias benchmark: where joint training provably under-learns a modality, does a
balancing strategy close the gap to early fusion? (docs/unimodal_bias.md)

Every run is ``cpsl train``'s own loop (:func:`cpsl.train.train_seed`) on the embedded
``unimodal_bias`` family, with the theory's presets (``linear_late``: per-modality branches;
``linear_early``: one network on the concatenated input). Seed ``s`` draws the dataset
(generator seed ``s``) and the initialisation (training seed ``s``), so the variants of a cell
are paired by seed.

    python bench/unimodal_bias.py --out OUT                  # deficit cell + control, every strategy, 10 seeds
    (without --out: runs/bench/unimodal_bias; a bench/results folder with files needs --overwrite)
    python bench/unimodal_bias.py --out OUT --cells deficit --variants early,none,cp --seeds 1-3
    python bench/unimodal_bias.py --out OUT --sweep          # + the deficit heat-map over n_train/D and v_A/v_B
    python bench/unimodal_bias.py --out OUT --set cp.alpha=2 # extra config overrides for every late variant

Reported per cell and variant: test MSE (mean ± std over seeds), the paired Δ to ``none`` with a
95 % t-interval, and the *share of the deficit closed* ``(none − variant) / (none − early)``
(from the seed means). Also per branch, the epoch at which its contribution (RMS of its part of
the prediction on the training set) first reaches half its final value, against the theory's
prediction for a two-layer linear branch: ``t½ = ln(s/(v·u0) − 1) / (2·lr·s)`` with ``s = v·‖w‖``
(input-output covariance), ``v`` the modality's variance, ``u0 = init_std²·√H``.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from benchkit.errors import BenchError, bench_main

CELLS = {
    "deficit": {"n_train": 70, "dims": "50,50", "variances": "3,1", "noise": 0.5},
    "control": {"n_train": 700, "dims": "50,50", "variances": "3,1", "noise": 0.5},
}
PEERS = ("ogm_ge", "cggm", "ags", "mmpareto", "inforeg", "moddrop")
# variant -> (preset, config overrides)
VARIANTS = {
    "early": ("linear_early", {"train.modulation": "none"}),
    "none": ("linear_late", {"train.modulation": "none"}),
    "cp": ("linear_late", {"train.modulation": "cp"}),          # the preset's default rule: ratio, no stop
    **{p: ("linear_late", {"train.modulation": p}) for p in PEERS},
    "cp_plateau": ("linear_late", {"train.modulation": "cp", "cp.stop": "plateau"}),   # the package-wide stop rule
    # the tanh rule, alpha 0.5 (the default penalty before 0.2.0), with and without the plateau stop
    "cp_tanh": ("linear_late", {"train.modulation": "cp", "cp.penalty": "tanh", "cp.stop": "plateau"}),
    "cp_tanh_never": ("linear_late", {"train.modulation": "cp", "cp.penalty": "tanh", "cp.stop": "never"}),
    "cp_ema": ("linear_late", {"train.modulation": "cp", "cp.penalty": "tanh", "cp.signal": "ema", "cp.stop": "never"}),
    "cp_fixed": ("linear_late", {"train.modulation": "cp", "cp.penalty": "fixed", "cp.beta": 0.1, "cp.stop": "never"}),
    "cp_alpha1": ("linear_late", {"train.modulation": "cp", "cp.penalty": "tanh", "cp.alpha": 1.0, "cp.stop": "never"}),
    "cp_alpha2": ("linear_late", {"train.modulation": "cp", "cp.penalty": "tanh", "cp.alpha": 2.0, "cp.stop": "never"}),
    # the method's own architecture (AME + gated fusion + heads, the teacher preset: AdamW, SL, selection on valid)
    "cpsl_none": ("teacher", {"train.modulation": "none"}),
    "cpsl_cp": ("teacher", {"train.modulation": "cp", "cp.stop": "never"}),
    "cpsl_cp_tanh": ("teacher", {"train.modulation": "cp", "cp.penalty": "tanh", "cp.stop": "never"}),
}
REFERENCE = {"cpsl_cp": "cpsl_none", "cpsl_cp_tanh": "cpsl_none"}   # the variant each one is paired with (default: none)
SWEEP_N = (35, 70, 140, 350, 1000)
SWEEP_RATIO = (1.0, 2.0, 3.0, 6.0)


class BranchTrace(torch.nn.Module):
    """A zero-valued extra loss that records, every step, the RMS of each modality's part of the
    prediction on the batch (full batch: the training set): the branches' learning curves."""

    def __init__(self, modalities):
        super().__init__()
        self.mods = tuple(modalities)
        self.rows: list = []

    def forward(self, out, batch):
        self.rows.append(torch.stack([out.aux[m].detach().pow(2).mean().sqrt() for m in self.mods]))
        return out.pred.new_zeros(()), {}

    def curve(self) -> dict:
        t = torch.stack(self.rows).tolist() if self.rows else []
        return {m: [r[i] for r in t] for i, m in enumerate(self.mods)}


def half_epoch(curve: list[float]) -> int | None:
    """First epoch at which the curve reaches half its final value."""
    if not curve or not curve[-1] > 0:
        return None
    target = 0.5 * curve[-1]
    return next((i for i, v in enumerate(curve) if v >= target), None)


def predicted_half_epoch(knobs: dict, cfg) -> dict:
    """The theory's t½ per modality for a two-layer linear branch (docs/unimodal_bias.md)."""
    from cpsl.data import family_spec, set_knobs
    from cpsl.data.unimodal_bias import NAMES, label_weights
    spec = set_knobs(family_spec("unimodal_bias"), dict(knobs))
    u0 = cfg.model.init_std ** 2 * math.sqrt(cfg.model.linear_width)
    out = {}
    for m, v, w in zip(NAMES, spec.variances, label_weights(spec)):
        s = float(v) * float((w ** 2).sum()) ** 0.5
        out[m] = math.log(s / (float(v) * u0) - 1.0) / (2.0 * cfg.train.lr * s) if s > v * u0 else None
    return out


def make_config(variant: str, sets=(), epochs: int | None = None):
    from cpsl.config import apply_overrides, build_config
    preset, over = VARIANTS[variant] if variant in VARIANTS else ("linear_late", {"train.modulation": variant})
    cfg = build_config(preset, None, [f"{k}={v}" for k, v in over.items()])
    if preset == "linear_late":
        apply_overrides(cfg, list(sets))
    if epochs:
        cfg.train.epochs = epochs
    cfg.train.num_threads, cfg.train.progress = 1, False
    return cfg


def run_one(args) -> dict:
    """One (cell, variant, seed): train in a scratch folder, score the final weights."""
    cell, knobs, variant, seed, sets, epochs = args
    import numpy as np
    from cpsl.data import load_data
    from cpsl.checkpoint import load_model
    from cpsl.train import predict, train_seed
    torch.set_num_threads(1)
    cfg = make_config(variant, sets, epochs)
    data = load_data("synth", synth_seed=seed, synth={"family": "unimodal_bias", **knobs})
    trace = BranchTrace(data.modalities)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        r = train_seed(cfg, data, seed, Path(tmp), log=lambda *_: None, extra_loss=trace)
        model, _, _ = load_model(r["ckpt"])
        res = {}
        for split in ("train", "valid", "test"):
            pred, aux, y = predict(model, data[split], 4096, "cpu")
            res[f"{split}_mse"] = float(np.mean((pred - y) ** 2))
            res[f"{split}_aux_rms"] = {m: float(np.sqrt(np.mean(a ** 2))) for m, a in aux.items()}
    curve = trace.curve() if cfg.model.arch == "linear" else {}   # one step per epoch: full batch
    return {"cell": cell, "variant": variant, "seed": seed, **res, "wall_s": time.perf_counter() - t0,
            "half_epoch": {m: half_epoch(c) for m, c in curve.items()},
            "curve": {m: c[::10] for m, c in curve.items()}}


def run_grid(tasks: list, jobs: int, cache: Path | None = None, log=print) -> list[dict]:
    """Every task (``jobs`` processes); with ``cache``, each finished run is kept as one JSON file
    there and reused by a rerun of the same command (a stopped benchmark resumes)."""
    out, todo = [], []
    for t in tasks:
        f = cache / _key(t) if cache else None
        if f is not None and f.is_file():
            out.append({**json.loads(f.read_text()), "variant": t[2]})
        else:
            todo.append(t)
    if out:
        log(f"reusing {len(out)} finished runs from {cache}")

    def done(t, r):
        out.append(r)
        if cache:
            (cache / _key(t)).write_text(json.dumps(r))
        log(_line(r))
    if jobs <= 1:
        for t in todo:
            done(t, run_one(t))
        return out
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
        futs = {ex.submit(run_one, t): t for t in todo}
        for f in as_completed(futs):
            done(futs[f], f.result())
    return out


def _key(task) -> str:
    """A file name for one run: cell, seed, and a digest of the cell's knobs and what the run learns:
    its resolved config without the non-identity keys (cpsl.config.non_identity_keys: backend,
    threads, ...) and, for a strategy other than cp, without CP's section (two variant names with
    the same such config share their runs)."""
    import hashlib
    from cpsl.config import flatten, non_identity_keys
    cell, knobs, variant, seed, sets, epochs = task
    cfg = make_config(variant, sets, epochs)
    skip = non_identity_keys()
    flat = {k: v for k, v in flatten(cfg.to_dict()).items()
            if k not in skip and (cfg.train.modulation == "cp" or not k.startswith("cp."))}
    h = hashlib.sha1(json.dumps([sorted(knobs.items()), flat], sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{cell}_s{seed}_{h}.json"


def _line(r: dict) -> str:
    return (f"{r['cell']:>10s} {r['variant']:>9s} seed {r['seed']:2d}: test MSE {r['test_mse']:.4f} "
            f"(valid {r['valid_mse']:.4f}, train {r['train_mse']:.4f}) {r['wall_s']:.1f} s")


def summarize(rows: list[dict], key: str = "test_mse") -> dict:
    """Per cell: per variant mean ± std, paired Δ to none (95 % t), share of the deficit closed."""
    from cpsl.ablate import paired_difference
    from cpsl.metrics import mean_std
    cells: dict = {}
    for r in rows:
        cells.setdefault(r["cell"], {}).setdefault(r["variant"], {})[r["seed"]] = r
    out = {}
    for cell, by_var in cells.items():
        none = by_var.get("none", {})
        early = by_var.get("early", {})
        rec = {}
        for v, by_seed in by_var.items():
            seeds = sorted(by_seed)
            vals = [by_seed[s][key] for s in seeds]
            e = {"n": len(seeds), **mean_std([{"v": x} for x in vals])["v"]}
            ref_name = REFERENCE.get(v, "none")
            ref = by_var.get(ref_name, {})
            common = [s for s in seeds if s in ref]
            if v != ref_name and len(common) >= 2:
                e["reference"] = ref_name
                e["delta_vs_none"] = paired_difference([by_seed[s][key] for s in common],
                                                       [ref[s][key] for s in common])
                e["wins_vs_none"] = sum(by_seed[s][key] < ref[s][key] for s in common)
            both = [s for s in seeds if s in none and s in early]
            gap = sum(none[s][key] - early[s][key] for s in both)
            if v not in ("none", "early") and ref_name == "none" and both and gap > 0.01 * sum(early[s][key] for s in both):
                e["deficit_closed"] = sum(none[s][key] - by_seed[s][key] for s in both) / gap   # only where there is a deficit
            halves = [by_seed[s]["half_epoch"] for s in seeds]
            e["half_epoch"] = {m: _mean([h[m] for h in halves]) for m in halves[0]} if halves else {}
            rec[v] = e
        both = [s for s in none if s in early]
        if len(both) >= 2:
            rec["_deficit"] = paired_difference([none[s][key] for s in both], [early[s][key] for s in both])
        out[cell] = rec
    return out


def _rounded(x):
    if isinstance(x, float):
        return round(x, 6)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def markdown(summary: dict, meta: dict, valid: dict | None = None) -> str:
    """The README table; ``valid``: the same summary on valid MSE (what choices are made on)."""
    valid = valid or {}
    from cpsl.compare import format_delta
    lines = [f"# Unimodal-bias benchmark ({meta['date']}, {meta['machine']})", "",
             f"Command: `{meta['command']}`  ",
             f"Runs' own time: {meta['runs_wall_s'] / 60:.1f} min in all ({meta['jobs']} jobs; this invocation "
             f"{meta['wall_s']:.0f} s, finished runs are reused from OUT/runs/)  ",
             f"Seeds {meta['seeds']}; metric: test MSE of the final weights "
             "(lower is better); Δ = variant − none, paired by seed, 95 % t-interval (* excludes 0); "
             "closed = (none − variant) / (none − early).", ""]
    for cell, rec in summary.items():
        knobs = meta["cells"].get(cell, {})
        lines += [f"## {cell}: " + ", ".join(f"{k}={v}" for k, v in knobs.items()), ""]
        if "_deficit" in rec:
            lines += [f"Deficit late (none) − early: {format_delta(rec['_deficit'])}", ""]
        pred = meta.get("predicted_half_epoch", {}).get(cell)
        if pred:
            lines += ["Theory's t½ per branch (two-layer linear, population covariances): "
                      + ", ".join(f"{m} {t:.0f}" for m, t in pred.items() if t is not None) + " epochs", ""]
        lines += ["| variant | test MSE | Δ vs reference | wins | deficit closed | valid MSE (closed) | t½ per branch (epochs) |",
                  "|---|---|---|---|---|---|---|"]
        for v, e in rec.items():
            if v.startswith("_"):
                continue
            d = (format_delta(e["delta_vs_none"]) + (f" (vs {e['reference']})" if e["reference"] != "none" else "")
                 if "delta_vs_none" in e else "")
            w = f"{e['wins_vs_none']}/{e['n']}" if "wins_vs_none" in e else ""
            c = f"{100 * e['deficit_closed']:.0f} %" if e.get("deficit_closed") is not None else ""
            h = ", ".join(f"{m} {t:.0f}" for m, t in e["half_epoch"].items() if t is not None)
            va = valid.get(cell, {}).get(v, {})
            vc = f" ({100 * va['deficit_closed']:.0f} %)" if va.get("deficit_closed") is not None else ""
            lines.append(f"| {v} | {e['mean']:.4f} ± {e['std']:.4f} | {d} | {w} | {c} | {va.get('mean', float('nan')):.4f}{vc} | {h} |")
        lines.append("")
    return "\n".join(lines)


def parse_seeds(s: str) -> list[int]:
    if "-" in s and "," not in s:
        a, b = s.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(x) for x in s.split(",") if x.strip()]


@bench_main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output folder (default: the scratch folder runs/bench/unimodal_bias; a "
                                  "bench/results folder with files needs --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="allow rewriting committed results under bench/results")
    ap.add_argument("--cells", default="deficit,control", help=f"cells ({', '.join(CELLS)})")
    ap.add_argument("--cell", action="append", default=[], metavar="NAME:k=v;k=v",
                    help="an extra cell, e.g. 'mine:n_train=100;variances=4,1'")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="variants (any registered strategy too)")
    ap.add_argument("--seeds", default="1-10")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=None, help="override the presets' 3000 epochs")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override for the late variants")
    ap.add_argument("--sweep", action="store_true", help="also the late-vs-early deficit heat-map (none, early)")
    ap.add_argument("--sweep-seeds", default="1-3")
    a = ap.parse_args(argv)
    try:
        cells = {c: CELLS[c] for c in a.cells.split(",") if c}
        for spec in a.cell:
            name, _, kv = spec.partition(":")
            cells[name] = dict(item.split("=", 1) for item in kv.split(";") if item)
        variants = [v for v in a.variants.split(",") if v]
        seeds = parse_seeds(a.seeds)
        from cpsl import strategies
        for v in variants:
            if v not in VARIANTS and v not in strategies.names():
                raise ValueError(f"unknown variant {v!r}")
        make_config("none", a.sets)                 # bad --set: one error line before any run
    except Exception as e:  # noqa: BLE001 - every bad argument ends in one line
        raise BenchError(str(e)) from None
    from benchkit.outdir import output_dir
    out = output_dir(a.out, "unimodal_bias", a.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(c, k, v, s, tuple(a.sets), a.epochs) for c, k in cells.items() for v in variants for s in seeds]
    if a.sweep:
        for n in SWEEP_N:
            for ratio in SWEEP_RATIO:
                knobs = {"n_train": n, "dims": "50,50", "variances": f"{ratio},1", "noise": 0.5}
                tasks += [(f"sweep_n{n}_r{ratio:g}", knobs, v, s, (), a.epochs)
                          for v in ("none", "early") for s in parse_seeds(a.sweep_seeds)]
    t0 = time.perf_counter()
    (out / "runs").mkdir(exist_ok=True)
    rows = run_grid(tasks, a.jobs, cache=out / "runs")
    wall = time.perf_counter() - t0
    from benchkit.machine import base_info
    machine = base_info("cpu", 1)
    meta = {"command": "python bench/unimodal_bias.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"), "machine": f"{machine['cpu']}, {machine['usable_cores']} cores",
            "machine_info": machine, "seeds": seeds,
            "cells": {**cells, **{r["cell"]: {} for r in rows if r["cell"].startswith("sweep")}},
            "wall_s": wall, "runs_wall_s": sum(r["wall_s"] for r in rows), "jobs": a.jobs, "sets": a.sets,
            "predicted_half_epoch": {c: predicted_half_epoch(k, make_config("none", a.sets)) for c, k in cells.items()}}
    summary = summarize(rows)
    slim = [_rounded({k: v for k, v in r.items() if k != "curve" or (r["seed"] == seeds[0] and r["cell"] in cells)})
            for r in rows]                                   # curves: the first seed of the named cells
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary,
                                                  "summary_valid": summarize(rows, "valid_mse"), "runs": slim}, indent=1))
    (out / "README.md").write_text(markdown({c: v for c, v in summary.items() if not c.startswith("sweep")}, meta,
                                            summarize(rows, "valid_mse")))
    if a.sweep:
        plot_sweep(rows, out / "deficit_heatmap.png")
    plot_curves(rows, out / "branch_curves.png")
    print(f"wrote {out}/README.md, results.json ({wall:.0f} s, {len(tasks)} runs, {a.jobs} jobs)")
    return 0


def plot_sweep(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    summ = summarize([r for r in rows if r["cell"].startswith("sweep")])
    grid = np.full((len(SWEEP_RATIO), len(SWEEP_N)), np.nan)
    for i, ratio in enumerate(SWEEP_RATIO):
        for j, n in enumerate(SWEEP_N):
            rec = summ.get(f"sweep_n{n}_r{ratio:g}", {})
            if "none" in rec and "early" in rec:
                grid[i, j] = (rec["none"]["mean"] - rec["early"]["mean"]) / rec["early"]["mean"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    im = ax.imshow(100 * grid, origin="lower", cmap="magma", aspect="auto")
    ax.set_xticks(range(len(SWEEP_N)), [f"{n / 100:g}" for n in SWEEP_N])
    ax.set_yticks(range(len(SWEEP_RATIO)), [f"{r:g}" for r in SWEEP_RATIO])
    ax.set_xlabel("n_train / D (D = 100)")
    ax.set_ylabel("variance ratio v_A / v_B")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center", color="w" if grid[i, j] < 0.15 else "k")
    fig.colorbar(im, label="late − early test MSE (% of early)")
    ax.set_title("Late-fusion deficit (linear, 2 layers, noise 0.5)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pick = [r for r in rows if r["cell"] == "deficit" and r["variant"] in ("none", "cp", "ogm_ge") and r["seed"] == min(
        x["seed"] for x in rows)]
    if not pick:
        return
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r, ls in zip(sorted(pick, key=lambda r: r["variant"]), ("-", "--", ":")):
        for m, c in r["curve"].items():
            ax.plot([10 * i for i in range(len(c))], c, ls, label=f"{r['variant']}: {m}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("branch contribution (RMS on train)")
    ax.set_xscale("symlog", linthresh=100)
    ax.legend(fontsize=7)
    ax.set_title("Unimodal phase, deficit cell (seed %d)" % pick[0]["seed"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
