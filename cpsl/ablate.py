"""Ablations: the full method against its parts and against OGM-GE, on the same seeds."""
from __future__ import annotations

import json
from pathlib import Path

from .config import Config, copy_config
from .metrics import METRIC_KEYS

VARIANTS: dict[str, dict] = {
    "full": {},
    "-CP": {"cp": {"modulation": "none"}},
    "-SL": {"loss": {"sl": 0.0}},
    "-CP-SL": {"cp": {"modulation": "none"}, "loss": {"sl": 0.0}},
    "-AME": {"model": {"ame": False}},
    "-GCF": {"model": {"fusion": "concat"}},
    "OGM-GE": {"cp": {"modulation": "ogm_ge"}},
}


def variant_config(base: Config, name: str) -> Config:
    from .config import merge
    cfg = copy_config(base)
    merge(cfg, VARIANTS[name])
    return cfg


def run_ablation(base: Config, data, out: str | Path, variants=None, log=print, overwrite: bool = False) -> dict:
    from .train import run
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(variants or VARIANTS)
    results = {}
    for name in names:
        log(f"== variant {name}")
        d = out / _dirname(name)
        res = run(variant_config(base, name), data, d, log=log, overwrite=overwrite)
        results[name] = {"dir": str(d), "valid": res.get("valid"), "test": res.get("test"),
                         "test_aux": res.get("test_aux"), "valid_aux": res.get("valid_aux"),
                         "histories": [_history(Path(r["ckpt"]).parent) for r in res["per_seed"]]}
    summary = {"data": data.path, "seeds": list(base.train.seeds), "variants": {
        k: {s: v[s] for s in ("valid", "test", "test_aux", "valid_aux")} for k, v in results.items()}}
    (out / "ablation.json").write_text(json.dumps(summary, indent=2))
    (out / "ablation.md").write_text(markdown(summary))
    plot_trajectories(results, out / "balance_trajectories.png")
    return summary


def _dirname(name: str) -> str:
    """'-CP-SL' → 'no_CP_SL', 'OGM-GE' → 'OGM_GE'."""
    return ("no_" + name.lstrip("-").replace("-", "_")) if name.startswith("-") else name.replace("-", "_")


def _history(seed_dir: Path) -> list[dict]:
    p = seed_dir / "log.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.is_file() else []


def markdown(summary: dict, split: str = "test") -> str:
    keys = ("MAE", "Corr", "Non0_acc_2", "Non0_F1_score", "Has0_acc_2", "Mult_acc_5", "Mult_acc_7")
    lines = [f"# Ablation on {summary['data']} (seeds {summary['seeds']}; {split} split, mean ± std over seeds)", "",
             "| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, v in summary["variants"].items():
        m = v.get(split) or {}
        cells = [f"{m[k]['mean']:.4f} ± {m[k]['std']:.4f}" if k in m else "" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Unimodal auxiliary heads ({split} MAE / Corr):", "",
              "| variant | " + " | ".join(f"{m} MAE | {m} Corr" for m in _mods(summary)) + " |",
              "|---" * (2 * len(_mods(summary)) + 1) + "|"]
    for name, v in summary["variants"].items():
        aux = v.get(f"{split}_aux") or {}
        cells = []
        for m in _mods(summary):
            a = aux.get(m, {})
            cells += [f"{a['MAE']['mean']:.4f} ± {a['MAE']['std']:.4f}" if a else "",
                      f"{a['Corr']['mean']:.4f} ± {a['Corr']['std']:.4f}" if a else ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mods(summary):
    for v in summary["variants"].values():
        if v.get("test_aux"):
            return list(v["test_aux"])
    return []


def plot_trajectories(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(16, 4))
    for name, v in results.items():
        h = [x for x in (v["histories"][0] if v["histories"] else []) if x.get("balance")]
        if h:
            ep = [x["epoch"] for x in h]
            imb = [x["balance"]["imbalance"] or float("nan") for x in h]
            ax[0].plot(ep, imb, label=name)
            text_r = [x["balance"]["r"].get("text", float("nan")) for x in h]
            ax[1].plot(ep, text_r, label=name)
        hh = v["histories"][0] if v["histories"] else []
        if hh:
            ax[2].plot([x["epoch"] for x in hh], [x["valid"]["MAE"] for x in hh], label=name)
    ax[0].set_title("imbalance max ĝ / min ĝ (first seed)")
    ax[1].set_title("text r = ĝ_text / ḡ")
    ax[2].set_title("valid MAE")
    for a in ax:
        a.set_xlabel("epoch"); a.grid(alpha=0.3); a.legend(fontsize=7)
    fig.tight_layout(); fig.savefig(path, dpi=90); plt.close(fig)
