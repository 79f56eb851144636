"""Ablations and strategy comparisons on the same seeds: the method's parts, and every registered
modulation strategy (``cpsl.strategies``), with mean ± std over seeds, the paired difference to
``none`` with a 95 % t-interval across seeds, each modality's Shapley contribution to the test
error, and the training-step cost relative to ``none``.

Variant × seed runs are independent: ``jobs > 1`` runs them as parallel processes (each with
``train.num_threads`` threads, 1 when unset), so two 1-thread jobs fill a 2-core machine."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .config import Config, copy_config, merge

PARTS: dict[str, dict] = {
    "full": {},
    "-CP": {"train": {"modulation": "none"}},
    "-SL": {"loss": {"sl": 0.0}},
    "-CP-SL": {"train": {"modulation": "none"}, "loss": {"sl": 0.0}},
    "-AME": {"model": {"ame": False}},
    "-GCF": {"model": {"fusion": "concat"}},
    "OGM-GE": {"train": {"modulation": "ogm_ge"}},
}
DEFAULT = tuple(PARTS)


def variants(defined: dict | None = None) -> dict[str, dict]:
    """The method's parts, one variant per registered strategy (its name), and ``defined``
    (``{name: config mapping}``, e.g. from ``cpsl ablate --define``)."""
    from . import strategies
    out = dict(PARTS)
    out.update({n: {"train": {"modulation": n}} for n in strategies.names()})
    out.update(defined or {})
    return out


def variant_config(base: Config, name: str, defined: dict | None = None) -> Config:
    cfg = copy_config(base)
    merge(cfg, variants(defined)[name])
    return cfg


def _task(args) -> dict:
    """One (variant, seed) run in its own process: train, then the test contributions."""
    cfg_dict, data, seed, out, fingerprint = args
    import torch
    from .checkpoint import load_model
    from .evaluation import contributions
    from .train import train_seed
    cfg = Config.from_dict(cfg_dict)
    torch.set_num_threads(cfg.train.num_threads or 1)
    t0 = time.perf_counter()
    r = train_seed(cfg, data, seed, Path(out), log=lambda *_: None, fingerprint=fingerprint)
    r["wall_s"] = time.perf_counter() - t0
    if "test" in data.splits and len(data["test"]):
        best, _, _ = load_model(r["ckpt"], cfg.train.device)
        r["contributions"] = contributions(best, data["test"], cfg, cfg.train.device)
    return r


def run_ablation(base: Config, data, out: str | Path, names=None, jobs: int = 1, log=print,
                 overwrite: bool = False, cost_steps: int = 20, defined: dict | None = None,
                 reference: str | None = None) -> dict:
    """Every variant × seed (``jobs`` processes), then per variant ``results.json`` and the tables;
    ``cost_steps`` interleaved steps per variant time the training step in one process (0: skip).
    ``defined``: extra variants ``{name: config mapping}``; ``reference``: the variant the paired
    differences are taken to (default ``none``, else ``-CP``).
    A variant folder holding a run is refused unless ``overwrite``."""
    from . import strategies
    from .data.mmsa import require_splits
    from .runs import data_fingerprint, prepare_out
    from .checkpoint import check_lengths
    from .train import aggregate, seed_summary
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(names or DEFAULT)
    cfgs = {n: variant_config(base, n, defined) for n in names}
    for n, c in cfgs.items():
        strategies.check(c)
        check_lengths(c.model, data, data.modalities, f"variant {n}")
    require_splits({k: len(sp) for k, sp in data.splits.items()}, data.path or "the data")
    for n in names:
        prepare_out(out / variant_dir(n), overwrite=overwrite, seeds=base.train.seeds)
        cfgs[n].save(out / variant_dir(n) / "config.json")
    fingerprint = data_fingerprint(data)
    tasks = [(n, int(s)) for n in names for s in base.train.seeds]
    args = [(cfgs[n].to_dict(), data, s, str(out / variant_dir(n) / f"seed{s}"), fingerprint) for n, s in tasks]
    t0 = time.perf_counter()
    done: dict[tuple, dict] = {}
    if jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
            futs = {ex.submit(_task, a): t for t, a in zip(tasks, args)}
            from concurrent.futures import as_completed
            for f in as_completed(futs):
                done[futs[f]] = f.result()
                log(f"{futs[f][0]}: {seed_summary(done[futs[f]])} ({done[futs[f]]['wall_s']:.0f} s)")
    else:
        for t, a in zip(tasks, args):
            done[t] = _task(a)
            log(f"{t[0]}: {seed_summary(done[t])} ({done[t]['wall_s']:.0f} s)")
    wall = time.perf_counter() - t0
    results = {}
    for n in names:
        per_seed = [done[(n, int(s))] for s in base.train.seeds]
        res = aggregate(cfgs[n], data, per_seed, fingerprint)
        (out / variant_dir(n) / "results.json").write_text(json.dumps(res, indent=2))
        results[n] = res
    costs = step_costs(base, data, names, cost_steps, defined=defined) if cost_steps else None
    summary = summarize(results, data, base, wall, jobs, costs, reference)
    (out / "ablation.json").write_text(json.dumps(summary, indent=2))
    (out / "ablation.md").write_text(markdown(summary))
    histories = {n: [read_history(out / variant_dir(n) / f"seed{s}") for s in base.train.seeds] for n in names}
    plot_trajectories(histories, out / "balance_trajectories.png")
    plot_valid_curves(histories, out / "valid_curves.png")
    return summary


def step_costs(base: Config, data, names, steps: int = 20, warmup: int = 3, defined: dict | None = None) -> dict:
    """Median ms per training step of each variant, measured in this process on the same batches,
    the variants interleaved step by step so that every one sees the same machine load."""
    import statistics
    import numpy as np
    import torch
    from .data.batch import make_batch
    from .train import batch_size, stepper
    torch.set_num_threads(base.train.num_threads or 1)
    train, bs = data["train"], batch_size(base, data)
    rows = [np.arange(i, min(i + bs, len(train))) for i in range(0, min(len(train), 4 * bs), bs)]
    steps_of = {n: stepper(variant_config(base, n, defined), data) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + steps):
        for n in names:
            b = make_batch(train, rows[i % len(rows)])
            t0 = time.perf_counter()
            steps_of[n](b)
            if i >= warmup:
                times[n].append(1e3 * (time.perf_counter() - t0))
    return {n: {"ms_median": statistics.median(t), "ms_p10": sorted(t)[len(t) // 10], "steps": steps} for n, t in times.items()}


def add_step_costs(base: Config, data, out: str | Path, names, steps: int = 20, defined: dict | None = None) -> dict:
    """Time the variants' training steps (:func:`step_costs`) and write them into OUT/ablation.json and
    ablation.md when an ablation is there (else OUT/step_cost.json alone)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    costs = step_costs(base, data, names, steps, defined=defined)
    (out / "step_cost.json").write_text(json.dumps({"costs": costs, "machine": machine()}, indent=2))
    p = out / "ablation.json"
    if p.is_file():
        summary = json.loads(p.read_text())
        for n, c in costs.items():
            if n in summary["variants"]:
                summary["variants"][n]["step_cost"] = c
        summary["step_cost_machine"] = machine()
        p.write_text(json.dumps(summary, indent=2))
        (out / "ablation.md").write_text(markdown(summary))
    return costs


def mean_interval(values: list[float]) -> dict:
    """Mean of ``values`` with its 95 % t-interval (None when n < 2)."""
    from scipy import stats
    d = [float(x) for x in values]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n}
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    h = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - h, mean + h], "n": n}


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Mean of a_i − b_i over paired seeds with its 95 % t-interval (None when n < 2)."""
    return mean_interval([x - y for x, y in zip(a, b)])


def summarize(results: dict, data, base: Config, wall_s: float, jobs: int, costs: dict | None = None,
              reference: str | None = None) -> dict:
    ref = reference or ("none" if "none" in results else ("-CP" if "-CP" in results else None))
    variants_ = {}
    for n, res in results.items():
        ps = res["per_seed"]
        v = {k: res.get(k) for k in ("valid", "test", "test_aux", "valid_aux")}
        v["ms_per_step"] = [r.get("ms_per_step") for r in ps]
        if costs and n in costs:
            v["step_cost"] = costs[n]
        v["epochs_run"] = [r["epochs_run"] for r in ps]
        v["best_epoch"] = [r["best_epoch"] for r in ps]
        v["jitter"] = res.get("jitter")
        if all("contributions" in r for r in ps):
            mods = list(ps[0]["contributions"]["shapley"])
            v["shapley"] = {m: [r["contributions"]["shapley"][m] for r in ps] for m in mods}
        if ref and n != ref and "test" in res and "test" in results[ref]:
            v["vs_" + ref] = {k: paired_difference(res["test"][k]["values"], results[ref]["test"][k]["values"])
                              for k in ("MAE", "Corr", "Non0_acc_2")}
        variants_[n] = v
    return {"data": data.path, "seeds": list(base.train.seeds), "reference": ref, "wall_s": wall_s, "jobs": jobs,
            "epochs": base.train.epochs, "machine": machine(), "variants": variants_}


def machine() -> dict:
    """Where the numbers were measured (CPU, cores, load, torch)."""
    import os
    import platform
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "loadavg_at_end": load, "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "platform": platform.platform()}


def variant_dir(name: str) -> str:
    """'-CP-SL' → 'no_CP_SL', 'OGM-GE' → 'OGM_GE'."""
    return ("no_" + name.lstrip("-").replace("-", "_")) if name.startswith("-") else name.replace("-", "_")


def read_history(seed_dir: Path) -> list[dict]:
    p = seed_dir / "log.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.is_file() else []


def _ms(v) -> str:
    return f"{v['mean']:.4f} ± {v['std']:.4f}"


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def markdown(summary: dict, split: str = "test") -> str:
    keys = ("MAE", "Corr", "Non0_acc_2", "Non0_F1_score", "Has0_acc_2", "Mult_acc_5", "Mult_acc_7")
    ref = summary.get("reference")
    lines = [f"# Strategies on {summary['data']} (seeds {summary['seeds']}; {split} split of the checkpoint "
             "selected on valid; mean ± std over seeds)", ""]
    for what, key in (("Runs", "machine"), ("Isolated step timings", "step_cost_machine")):
        mc = summary.get(key)
        if mc:
            lines += [f"{what} measured on {mc.get('cpu')} ({mc.get('cores')} cores, torch {mc.get('torch')}, "
                      f"load average at the end {mc.get('loadavg_at_end')}).", ""]
    lines += [f"{summary.get('jobs', 1)} parallel job(s), wall time {summary.get('wall_s', 0):.0f} s, at most "
              f"{summary.get('epochs')} epochs.", "",
             "| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, v in summary["variants"].items():
        m = v.get(split) or {}
        lines.append(f"| {name} | " + " | ".join(_ms(m[k]) if k in m else "" for k in keys) + " |")
    if ref:
        lines += ["", f"Paired difference to `{ref}` over the same seeds ({split}; mean [95 % t-interval]; "
                  "MAE: negative is better):", "", "| variant | ΔMAE | ΔCorr | ΔNon0_acc_2 |", "|---|---|---|---|"]
        for name, v in summary["variants"].items():
            d = v.get("vs_" + ref)
            if d:
                cells = [f"{d[k]['mean']:+.4f} [{d[k]['ci95'][0]:+.4f}, {d[k]['ci95'][1]:+.4f}]" if d[k]["ci95"]
                         else f"{d[k]['mean']:+.4f}" for k in ("MAE", "Corr", "Non0_acc_2")]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += _cost_and_contrib(summary)
    lines += _stability(summary)
    return "\n".join(lines) + "\n"


def _stability(summary: dict) -> list[str]:
    """Selection noise per variant: jitter = mean |Δ valid MAE| between consecutive epochs after
    epoch 3 (cpsl.train.jitter), the seed spread of the selected checkpoints, the best epochs."""
    vs = summary["variants"]
    if not any(v.get("jitter") for v in vs.values()):
        return []
    lines = ["", "Stability: *jitter* = mean |Δ valid MAE| between consecutive epochs after the first 3 "
             "(mean ± std over seeds); the seed spread (std) of the selected checkpoints' valid and test MAE:", "",
             "| variant | jitter | valid MAE | test MAE | best epochs |", "|---|---|---|---|---|"]
    for name, v in vs.items():
        j = v.get("jitter")
        cells = [_ms(j) if j else "", _ms(v["valid"]["MAE"]) if v.get("valid") else "",
                 _ms(v["test"]["MAE"]) if v.get("test") else "", ", ".join(map(str, v.get("best_epoch", [])))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _cost_and_contrib(summary: dict) -> list[str]:
    vs = summary["variants"]
    mods = next((list(v["shapley"]) for v in vs.values() if v.get("shapley")), [])
    ref = vs.get("none", vs.get("-CP", {}))
    iso = (ref.get("step_cost") or {}).get("ms_median")
    lines = ["", "Training-step cost on CPU: *isolated* = median ms of one training step (forward, loss, the "
             "strategy's hooks, backward(s), AdamW) measured in one process with the variants interleaved step "
             "by step on the same batches (the fair comparison); *in run* = training-epoch wall time / steps of "
             f"the runs above ({summary['jobs']} parallel 1-thread job(s) on a shared machine: load-dependent). "
             "Each modality's Shapley contribution to the test MAE (error reduction, mean over seeds; sums to "
             "MAE(all masked) − MAE(all)):", "",
             "| variant | isolated ms/step | × none | in-run ms/step | epochs run | "
             + " | ".join(f"φ {m}" for m in mods) + " |", "|---" * (5 + len(mods)) + "|"]
    for name, v in vs.items():
        ms = _mean(v.get("ms_per_step", []))
        c = (v.get("step_cost") or {}).get("ms_median")
        cells = [f"{c:.1f}" if c else "", f"{c / iso:.2f}" if c and iso else "", f"{ms:.1f}" if ms else "",
                 f"{_mean(v['epochs_run']):.1f}"]
        cells += [f"{_mean(v['shapley'][m]):+.4f}" if v.get("shapley") else "" for m in mods]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def plot_valid_curves(histories: dict, path: Path) -> None:
    """Valid MAE per epoch, every seed, one panel per variant (the jitter, seen)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n, hs in histories.items() if any(hs)]
    if not names:
        return
    fig, ax = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), sharey=True, squeeze=False)
    for a, n in zip(ax[0], names):
        for hs in histories[n]:
            if hs:
                a.plot([x["epoch"] for x in hs], [x["valid"]["MAE"] for x in hs], marker=".", lw=1)
        a.set_title(n, fontsize=9)
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    ax[0][0].set_ylabel("valid MAE (each seed)")
    fig.tight_layout(); fig.savefig(path, dpi=90); plt.close(fig)


def plot_trajectories(histories: dict, path: Path) -> None:
    """Balance over epochs (first seed of each variant): imbalance, text r, valid MAE."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(16, 4))
    for name, hs in histories.items():
        hh = hs[0] if hs else []
        h = [x for x in hh if x.get("balance")]
        if h:
            ep = [x["epoch"] for x in h]
            ax[0].plot(ep, [x["balance"]["imbalance"] or float("nan") for x in h], label=name)
            ax[1].plot(ep, [x["balance"]["r"].get("text", float("nan")) for x in h], label=name)
        if hh:
            ax[2].plot([x["epoch"] for x in hh], [x["valid"]["MAE"] for x in hh], label=name)
    ax[0].set_title("imbalance max ĝ / min ĝ (first seed)")
    ax[1].set_title("text r = ĝ_text / ḡ")
    ax[2].set_title("valid MAE")
    for a in ax:
        a.set_xlabel("epoch"); a.grid(alpha=0.3); a.legend(fontsize=7)
    fig.tight_layout(); fig.savefig(path, dpi=90); plt.close(fig)
