"""``cpsl compare``: paired comparison of finished ``cpsl train`` run folders, seed by seed.

Each run is ``NAME=DIR[,DIR...]`` (several folders of one setting, e.g. seeds split across two
processes, are merged by seed). The first run is the reference. Only seeds present in every run
are paired; runs on different data (``data_fingerprint``) are refused, because a paired
difference across data sets means nothing. The split is ``test`` when every paired seed of every
run has test metrics, else ``valid``. For each run: mean ± std (population, as everywhere in
cpsl) of the metrics, the paired difference to the reference with its 95 % t-interval
(:func:`cpsl.ablate.paired_difference`), each unimodal head's MAE where the runs logged them, and
the config keys that differ from the reference's (what the comparison is about).
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import flatten
from .errors import CPSLError

METRICS = ("MAE", "Corr", "Non0_acc_2")
# keys that say where or how fast a run went, not what it learnt
IGNORED_KEYS = {"train.seeds", "train.num_threads", "train.progress", "train.tensorboard", "data.path",
                "cp.backend", "groups.diagnostics"}


def parse_run(spec: str) -> tuple[str, list[Path]]:
    name, sep, dirs = spec.partition("=")
    if not sep or not name.strip() or not dirs.strip():
        raise CPSLError(f"a run is NAME=DIR[,DIR...], got {spec!r}")
    return name.strip(), [Path(d) for d in dirs.split(",") if d.strip()]


def load_run(name: str, dirs: list[Path]) -> dict:
    """``{"seeds": {seed: per-seed row}, "config": flat config, "fingerprints": set}`` merged over ``dirs``."""
    rows, configs, prints = {}, [], set()
    for d in dirs:
        f = d / "results.json"
        if not f.is_file():
            raise CPSLError(f"{name}: {f} not found (a finished cpsl train folder has one)")
        try:
            res = json.loads(f.read_text())
            per_seed = res["per_seed"]
        except (ValueError, KeyError) as e:
            raise CPSLError(f"{name}: {f} is not a cpsl train results.json ({e})") from None
        for r in per_seed:
            if r["seed"] in rows:
                raise CPSLError(f"{name}: seed {r['seed']} appears in two of its folders")
            rows[r["seed"]] = r
        configs.append(flatten(res.get("config", {})))
        prints.add(res.get("data_fingerprint"))
    cfg = configs[0]
    for other, d in zip(configs[1:], dirs[1:]):
        diff = differing_keys(cfg, other)
        if diff:
            raise CPSLError(f"{name}: {d} was trained with other settings than {dirs[0]} ({', '.join(diff)})")
    return {"seeds": rows, "config": cfg, "fingerprints": prints}


def differing_keys(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if k not in IGNORED_KEYS and a.get(k) != b.get(k))


def _ms(xs: list[float]) -> dict:
    """Mean and population std, as every other cpsl table (cpsl.metrics.mean_std)."""
    from .metrics import mean_std
    return mean_std([{"v": x} for x in xs])["v"]


def compare(specs: list[str], split: str = "auto") -> dict:
    from .ablate import paired_difference
    if len(specs) < 2:
        raise CPSLError("compare needs at least two runs (the first is the reference)")
    runs = {}
    for spec in specs:
        name, dirs = parse_run(spec)
        if name in runs:
            raise CPSLError(f"run name {name!r} given twice")
        runs[name] = load_run(name, dirs)
    ref = next(iter(runs))
    if len(set().union(*(r["fingerprints"] for r in runs.values()))) > 1:
        raise CPSLError("the runs were trained on different data (data_fingerprint differs): seeds cannot be paired")
    seeds = sorted(set.intersection(*(set(r["seeds"]) for r in runs.values())))
    if not seeds:
        raise CPSLError("no seed is common to every run: nothing to pair")
    if split == "auto":
        split = "test" if all(r["seeds"][s].get("test") for r in runs.values() for s in seeds) else "valid"
    for name, r in runs.items():
        missing = [s for s in seeds if not r["seeds"][s].get(split)]
        if missing:
            raise CPSLError(f"{name}: no {split} metrics for seed(s) {missing}")
    aux_key = f"{split}_aux"
    heads = sorted(set.intersection(*(set(r["seeds"][s].get(aux_key) or {}) for r in runs.values() for s in seeds)))
    out = {"reference": ref, "split": split, "seeds": seeds,
           "dropped_seeds": {n: sorted(set(r["seeds"]) - set(seeds)) for n, r in runs.items()}, "runs": {}}
    for name, r in runs.items():
        vals = {m: [r["seeds"][s][split][m] for s in seeds] for m in METRICS}
        rec = {"metrics": {m: _ms(v) for m, v in vals.items()},
               "heads_MAE": {h: _ms([r["seeds"][s][aux_key][h]["MAE"] for s in seeds]) for h in heads},
               "config_vs_reference": {k: r["config"].get(k) for k in differing_keys(runs[ref]["config"], r["config"])}}
        if name != ref:
            rv = {m: [runs[ref]["seeds"][s][split][m] for s in seeds] for m in METRICS}
            rec["vs_reference"] = {m: paired_difference(vals[m], rv[m]) for m in METRICS}
            rec["heads_vs_reference"] = {h: rec["heads_MAE"][h]["mean"] - out["runs"][ref]["heads_MAE"][h]["mean"]
                                         for h in heads}
        out["runs"][name] = rec
    return out


def format_mean_std(v: dict) -> str:
    """A ``{"mean", "std"}`` pair (cpsl.metrics.mean_std) as ``0.7123 ± 0.0045``."""
    return f"{v['mean']:.4f} ± {v['std']:.4f}"


def format_delta(d: dict) -> str:
    """A paired difference as ``+0.0123 [+0.0010, +0.0236] *`` (*: its 95 % interval excludes 0)."""
    if d["ci95"] is None:
        return f"{d['mean']:+.4f} (n=1)"
    lo, hi = d["ci95"]
    star = " *" if lo > 0 or hi < 0 else ""
    return f"{d['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]{star}"


def markdown(res: dict) -> str:
    ref, split = res["reference"], res["split"]
    heads = list(next(iter(res["runs"].values()))["heads_MAE"])
    cols = ["run", f"{split} MAE", f"Δ MAE vs {ref} [95 %]", "Corr", "Δ Corr", "Non0_acc_2", "Δ Non0_acc_2"]
    cols += [f"{h} head MAE" for h in heads]
    lines = [f"Paired over seeds {res['seeds']} ({split} split); Δ = run − {ref}, mean [95 % t-interval], "
             "`*` = the interval excludes 0; MAE: negative is better.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, r in res["runs"].items():
        m, v = r["metrics"], r.get("vs_reference")
        cells = [name, format_mean_std(m["MAE"]), format_delta(v["MAE"]) if v else "",
                 f"{m['Corr']['mean']:.4f}", format_delta(v["Corr"]) if v else "",
                 f"{m['Non0_acc_2']['mean']:.4f}", format_delta(v["Non0_acc_2"]) if v else ""]
        for h in heads:
            d = r.get("heads_vs_reference", {}).get(h)
            cells.append(f"{r['heads_MAE'][h]['mean']:.4f}" + (f" ({d:+.4f})" if d is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name, r in res["runs"].items():
        if name != ref:
            diff = ", ".join(f"{k}={json.dumps(v)}" for k, v in r["config_vs_reference"].items()) or "nothing"
            lines.append(f"- {name} differs from {ref} in: {diff}")
    dropped = {n: s for n, s in res["dropped_seeds"].items() if s}
    if dropped:
        lines.append("- not paired (seed missing in another run): "
                     + "; ".join(f"{n} {s}" for n, s in dropped.items()))
    return "\n".join(lines) + "\n"
