"""``cpsl diagnose``: before choosing a balancing strategy, is any modality under-learned by plain
joint training on *this* data and model, so that balancing could help at all?

Runs, with the user's config and ``train.modulation=none``:

1. one **unimodal** run per modality (the data restricted to it; the checkpoint selected on valid),
   whose valid loss ``u_m`` is what the modality can give on its own, and whose valid-loss curve
   gives its *learning speed*: the first validated epoch at which it has made half of its
   improvement over the constant predictor (``t½_m``; ratio = ``t½_m / min t½``);
2. one **joint** run; modality m's part of it is scored on valid: ``j_m`` = the valid loss of its
   unimodal prediction (the branch's own contribution for ``model.arch=linear``; the trained
   auxiliary head for the CPSL model with ``loss.aux > 0``; else a ridge probe of the pooled
   representation ``h_m`` fitted on train); plus each modality's exact Shapley contribution to the
   joint model's valid MAE.

With ``c`` = the valid loss of the constant (train-mean) predictor, modality m is *informative*
when ``u_m < (1 − INFORMATIVE) c``, and *under-learned in joint training* when it is informative
and its joint part recovers less than ``RECOVERED`` of what it reaches alone:
``(c − j_m) / (c − u_m) < RECOVERED``. Balancing can only help when some modality is
under-learned; with at most one informative modality it cannot (there is nothing to balance).
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from .config import Config, copy_config
from .data.mmsa import MMSAData
from .errors import CPSLError
from .losses import task_loss

INFORMATIVE = 0.05      # a modality alone must beat the constant predictor's valid loss by 5 %
RECOVERED = 0.8         # ... and joint training must recover 80 % of that gain, else: under-learned


def restrict(data: MMSAData, modality: str) -> MMSAData:
    """The same splits with one modality."""
    from dataclasses import replace
    splits = {n: replace(s, features={modality: s.features[modality]}, lengths={modality: s.lengths[modality]})
              for n, s in data.splits.items()}
    return MMSAData(splits, (modality,), data.path, dict(data.meta))


def _loss(pred: np.ndarray, y: np.ndarray, kind: str) -> float:
    return float(task_loss(torch.from_numpy(np.asarray(pred, np.float32)), torch.from_numpy(y), kind))


def half_time(history: list[dict], const: float) -> int | None:
    """First validated epoch whose valid loss has made half the run's best improvement over ``const``."""
    losses = [(h["epoch"], h["valid"]["loss"]) for h in history]
    best = min((v for _, v in losses), default=math.inf)
    if not best < const:
        return None
    target = const - 0.5 * (const - best)
    return next(e + 1 for e, v in losses if v <= target)


@torch.no_grad()
def _features(model, split, cfg: Config, m: str) -> np.ndarray:
    from .data.batch import iterate
    model.eval()
    out = [model(b.x, b.mask, b.text_bert).h[m].float().cpu().numpy()
           for b in iterate(split, cfg.data.eval_batch_size, modalities=model.modalities)]
    return np.concatenate(out)


def joint_parts(model, data: MMSAData, cfg: Config) -> tuple[dict, str]:
    """Valid loss of each modality's part of the joint model, and how it was read."""
    from .evaluation import predict
    _, aux, y = predict(model, data["valid"], cfg.data.eval_batch_size, cfg.train.device)
    if cfg.model.arch == "linear" or cfg.loss.aux > 0:
        how = "its own branch's contribution" if cfg.model.arch == "linear" else "its trained auxiliary head"
        return {m: _loss(aux[m], y, cfg.loss.task) for m in model.modalities}, how
    from sklearn.linear_model import Ridge
    parts = {}
    for m in model.modalities:
        probe = Ridge(alpha=1.0).fit(_features(model, data["train"], cfg, m), data["train"].labels)
        parts[m] = _loss(probe.predict(_features(model, data["valid"], cfg, m)), y, cfg.loss.task)
    return parts, "a ridge probe of its pooled representation"


def _train(cfg: Config, data: MMSAData, folder: Path, seed: int):
    from .checkpoint import load_model
    from .train import train_seed
    r = train_seed(cfg, data, seed, folder, log=lambda *_: None)
    model, _, _ = load_model(r["ckpt"], cfg.train.device)
    hist = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
    return model, hist


def diagnose(cfg: Config, data: MMSAData, seed: int = 1, log=print, progress=None) -> dict:
    """The report of this module's docstring (a JSON-ready dict)."""
    from .evaluation import contributions
    if len(data.modalities) < 2:
        raise CPSLError(f"diagnose needs at least two modalities; {data.path or 'the data'} has "
                        f"{', '.join(data.modalities)}")
    if "valid" not in data.splits or len(data["valid"]) < 2:
        raise CPSLError("diagnose needs a valid split with at least 2 rows (it scores every run on it)")
    base = copy_config(cfg)
    base.train.modulation, base.train.progress = "none", False
    base.train.eval_every = max(1, base.train.epochs // 300)        # curves fine enough for t½
    y_tr, y_va = data["train"].labels, data["valid"].labels
    const = _loss(np.full_like(y_va, float(y_tr.mean())), y_va, cfg.loss.task)
    uni, speed = {}, {}
    with tempfile.TemporaryDirectory(prefix="cpsl_diagnose_") as tmp:
        for m in data.modalities:
            ucfg = copy_config(base)
            ucfg.train.select = "best"                              # what m can give alone, selected on valid
            log(f"unimodal run: {m}")
            _, hist = _train(ucfg, restrict(data, m), Path(tmp) / f"uni_{m}", seed)
            uni[m] = min(h["valid"]["loss"] for h in hist)
            speed[m] = half_time(hist, const)
            if progress:
                progress()
        log("joint run (modulation none)")
        model, _ = _train(base, data, Path(tmp) / "joint", seed)
        parts, how = joint_parts(model, data, base)
        shap = contributions(model, data["valid"], base, base.train.device)["shapley"]
        if progress:
            progress()
    fastest = min((t for t in speed.values() if t), default=None)
    mods = {}
    for m in data.modalities:
        gain = const - uni[m]
        informative = gain > INFORMATIVE * const
        recovered = (const - parts[m]) / gain if informative else None
        mods[m] = {"unimodal_valid_loss": uni[m], "joint_part_valid_loss": parts[m], "informative": informative,
                   "recovered": recovered, "under_learned": bool(informative and recovered < RECOVERED),
                   "half_epoch": speed[m], "speed_ratio": (speed[m] / fastest) if speed[m] and fastest else None,
                   "shapley_MAE": shap[m]}
    n_inf = sum(v["informative"] for v in mods.values())
    helps = n_inf >= 2 and any(v["under_learned"] for v in mods.values())
    return {"constant_valid_loss": const, "loss": cfg.loss.task, "joint_part": how, "modalities": mods,
            "informative": [m for m, v in mods.items() if v["informative"]], "balancing_could_help": helps,
            "thresholds": {"informative": INFORMATIVE, "recovered": RECOVERED}, "seed": seed,
            "epochs": base.train.epochs, "verdicts": verdict_lines(mods, helps)}


def verdict_lines(mods: dict, helps: bool) -> list[str]:
    lines = []
    for m, v in mods.items():
        if not v["informative"]:
            lines.append(f"{m}: not informative on its own (its unimodal model is within {100 * INFORMATIVE:.0f} % of "
                         "the constant predictor); balancing cannot make it help")
        elif v["under_learned"]:
            lines.append(f"{m}: UNDER-LEARNED in joint training: its part recovers {100 * v['recovered']:.0f} % of "
                         f"what {m} reaches alone; balancing could help")
        else:
            lines.append(f"{m}: learned in joint training (its part recovers {100 * v['recovered']:.0f} % of what "
                         f"{m} reaches alone)")
    inf = [m for m, v in mods.items() if v["informative"]]
    if len(inf) <= 1:
        what = f"Only {inf[0]} is informative" if inf else "No modality is informative"
        lines.append(f"verdict: NO. {what}, so balancing cannot help here; train with --modulation none")
    elif helps:
        lines.append("verdict: YES. Joint training under-learns " + ", ".join(m for m, v in mods.items()
                                                                          if v["under_learned"])
                     + ": a balancing strategy (e.g. --modulation cp) can help; compare it with none on valid")
    else:
        lines.append("verdict: NO. Every informative modality is learned in joint training; balancing is not "
                     "expected to help (--modulation none is the baseline to beat)")
    return lines


def plot(report: dict, path: Path) -> None:
    """Per modality: what it reaches alone vs its part in joint training, and the constant's loss."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    mods = report["modalities"]
    names = list(mods)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.4))
    ax.bar(x - 0.18, [mods[m]["unimodal_valid_loss"] for m in names], 0.36, label="alone (unimodal run)")
    ax.bar(x + 0.18, [mods[m]["joint_part_valid_loss"] for m in names], 0.36, label="its part of the joint model")
    ax.axhline(report["constant_valid_loss"], color="k", ls="--", lw=1, label="constant predictor")
    ax.set_xticks(x, [f"{m}{' *' if mods[m]['under_learned'] else ''}" for m in names])
    ax.set_ylabel(f"valid loss ({report['loss']})")
    ax.set_title("cpsl diagnose (* under-learned)" if report["balancing_could_help"] else "cpsl diagnose")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
