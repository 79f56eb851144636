"""How far would more models of the same kind go? Prediction-averaging ensembles of MOSI recipe
runs (issue 14): ``python bench/mosi.py --ensemble RUN_DIR RUN_DIR [...]``.

Each RUN_DIR is a finished ``cpsl recipe mosi`` run folder (``results.json``,
``seed*/best.pt``; for the k-fold part, a ``--kfold K`` block and its fold runs under
``RUN_DIR/kfold/``). Every checkpoint is re-scored here (not read from the logs):

* MOSI valid: every seed of every run is a member; the ensemble predicts the mean of the members'
  fused predictions (and, as its own row, the mean of their text-head predictions);
* k-fold: on fold ``i`` the members are the runs' fold-``i`` models (the recipe's k-fold trains the
  first seed only), and the ensemble is paired fold by fold with each run and with the members'
  mean (95 % t-interval over folds).

The members were each selected on the fold they are scored on, as every figure of the recipe is,
so this is a ceiling for "train more models and average them" rather than a recipe: it costs a
member's training and inference time per member, and the edge path ships one model.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from benchkit.errors import BenchError

from cpsl.compare import METRICS, format_delta, format_mean_std


def _members_valid(run: Path) -> list[tuple[str, Path, str]]:
    """``(label, best.pt, pickle)`` of each seed of a recipe run."""
    res = _results(run)
    return [(f"{run} seed {s['seed']}", run / f"seed{s['seed']}" / "best.pt", res["data"])
            for s in res["per_seed"]]


def _results(run: Path) -> dict:
    f = run / "results.json"
    if not f.is_file():
        raise BenchError(f"{run} is not a finished recipe run (no results.json)")
    return json.loads(f.read_text())


def _fold_runs(run: Path, variant: str) -> list[Path]:
    """The fold run folders of ``variant`` whose scores are the ones ``results.json`` records."""
    kf = _results(run).get("recipe", {}).get("kfold")
    if not kf or variant not in kf["variants"]:
        raise BenchError(f"{run} has no k-fold of the variant {variant!r} (run the recipe with --kfold K)")
    recorded = [f["MAE"] for f in kf["variants"][variant]["per_fold"]["valid"]]
    for d in sorted(run.glob(f"kfold/{variant}_*")):
        folds = [d / f"fold{i}" for i in range(kf["k"])]
        if all((f / "results.json").is_file() for f in folds) and all(
                abs(_results(f)["per_seed"][0]["valid"]["MAE"] - m) < 1e-9 for f, m in zip(folds, recorded)):
            return folds
    raise BenchError(f"{run}/kfold holds no complete set of {variant} fold runs matching its results.json")


class _Scorer:
    """Predictions of checkpoints on a pickle's valid split (each pickle loaded once)."""

    def __init__(self):
        self.data = {}

    def __call__(self, ckpt: Path, pkl: str) -> dict:
        from cpsl.checkpoint import load_model
        from cpsl.data.mmsa import load_mmsa
        from cpsl.evaluation import predict
        if not ckpt.is_file():
            raise BenchError(f"{ckpt} not found")
        if pkl not in self.data:
            self.data[pkl] = load_mmsa(pkl)["valid"]
        split = self.data[pkl]
        model, cfg, _ = load_model(ckpt)
        pred, aux, y = predict(model, split, cfg.data.eval_batch_size, "cpu")
        return {"ids": [str(i) for i in split.ids], "y": y, "fused": pred, "text": aux.get("text")}


def _combine(members: list[dict], where: str) -> dict:
    """The members' mean predictions (fused, text head) on the same rows."""
    first = members[0]
    for m in members[1:]:
        if m["ids"] != first["ids"] or not np.array_equal(m["y"], first["y"]):
            raise BenchError(f"the members were scored on different rows or labels ({where})")
    out = {"ids": first["ids"], "y": first["y"], "fused": np.mean([m["fused"] for m in members], axis=0)}
    has_text = all(m["text"] is not None for m in members)
    out["text"] = np.mean([m["text"] for m in members], axis=0) if has_text else None
    return out


def _metrics(p: dict, head: str) -> dict | None:
    from cpsl.metrics import mmsa_metrics
    return None if p[head] is None else {k: float(v) for k, v in mmsa_metrics(p[head], p["y"]).items()}


def _cells(m: dict | None) -> list[str]:
    return [f"{m[k]:.4f}" for k in METRICS] if m else ["", "", ""]


def _cells_ms(m: dict | None) -> list[str]:
    return [format_mean_std(m[k]) for k in METRICS] if m else ["", "", ""]


def _row(*cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _valid_section(runs: list[Path], score) -> tuple[list[str], dict]:
    """MOSI valid: every seed of every run is a member."""
    from cpsl.metrics import mean_std
    members = [(label, score(ck, pkl)) for r in runs for label, ck, pkl in _members_valid(r)]
    ens = _combine([p for _, p in members], "MOSI valid")
    rows = {label: {h: _metrics(p, h) for h in ("fused", "text")} for label, p in members}
    single = {h: mean_std([r[h] for r in rows.values()]) if all(r[h] for r in rows.values()) else None
              for h in ("fused", "text")}
    valid = {"members": rows, "members_mean": single, "ensemble": {h: _metrics(ens, h) for h in ("fused", "text")}}
    md = [f"Members: {len(members)} checkpoints of {len(runs)} recipe runs; ensemble = mean of their predictions.", "",
          f"MOSI valid ({len(ens['ids'])} segments):", "",
          "| model | MAE | Corr | Non0_acc_2 | text head MAE | Corr | Non0_acc_2 |", "|---|---|---|---|---|---|---|"]
    md += [_row(f"`{label}`", *_cells(r["fused"]), *_cells(r["text"])) for label, r in rows.items()]
    md.append(_row("members, mean ± std", *_cells_ms(single["fused"]), *_cells_ms(single["text"])))
    md.append(_row(f"**ensemble of {len(members)}**", *_cells(valid["ensemble"]["fused"]),
                   *_cells(valid["ensemble"]["text"])))
    return md, valid


def _kfold_section(runs: list[Path], folds: list[list[Path]], variant: str, signature: str, score) -> tuple[list[str], dict]:
    """k-fold: on fold i the members are the runs' fold-i models; paired over folds."""
    from cpsl.ablate import paired_difference
    from cpsl.metrics import mean_std
    k = len(folds[0])
    per = {str(r): {"fused": [], "text": []} for r in runs}
    per_ens = {"fused": [], "text": []}
    for i in range(k):
        preds = []
        for r, fr in zip(runs, folds):
            res = _results(fr[i])
            preds.append(score(fr[i] / f"seed{res['seeds'][0]}" / "best.pt", res["data"]))
            for h in ("fused", "text"):
                per[str(r)][h].append(_metrics(preds[-1], h))
        e = _combine(preds, f"fold {i}")
        for h in ("fused", "text"):
            per_ens[h].append(_metrics(e, h))
    mean_of_runs = [{m: float(np.mean([per[str(r)]["fused"][i][m] for r in runs])) for m in METRICS} for i in range(k)]

    def minus(rows):
        return {m: paired_difference([x[m] for x in per_ens["fused"]], [x[m] for x in rows]) for m in METRICS}
    delta = {str(r): minus(per[str(r)]["fused"]) for r in runs}
    delta_mean = minus(mean_of_runs)
    out = {"k": k, "variant": variant, "folds_signature": signature, "per_fold": per, "ensemble_per_fold": per_ens,
           "ensemble_minus_run": delta, "ensemble_minus_members_mean": delta_mean}

    def maes(rows):
        return " ".join(f"{x['MAE']:.3f}" for x in rows)
    md = ["", f"k = {k} video-grouped folds of MOSI train + valid (variant `{variant}`), fused model; "
              "Δ = ensemble − row, paired over folds, mean [95 % t-interval], `*` = the interval excludes 0.", "",
          "| model | per-fold MAE | MAE | Corr | Non0_acc_2 | Δ MAE | Δ Corr | Δ Non0_acc_2 |",
          "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        rows = per[str(r)]["fused"]
        md.append(_row(f"`{r}`", maes(rows), *_cells_ms(mean_std(rows)), *(format_delta(delta[str(r)][m]) for m in METRICS)))
    md.append(_row("members' mean (per fold)", maes(mean_of_runs), *_cells_ms(mean_std(mean_of_runs)),
                   *(format_delta(delta_mean[m]) for m in METRICS)))
    md.append(_row(f"**ensemble of {len(runs)}**", maes(per_ens["fused"]), *_cells_ms(mean_std(per_ens["fused"])),
                   "", "", ""))
    if all(per_ens["text"]):
        md.append(_row(f"ensemble of {len(runs)}, text head", maes(per_ens["text"]),
                       *_cells_ms(mean_std(per_ens["text"])), "", "", ""))
    return md, out


def ensemble_report(runs: list[str], variant: str = "transferred", kfold: bool = True, threads: int = 0) -> tuple[str, dict]:
    """(markdown, json) of the valid-fold and k-fold ensembles of the recipe runs ``runs``."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    runs = [Path(r) for r in runs]
    if kfold:                                   # the runs' k-folds are checked before anything is scored
        folds = [_fold_runs(r, variant) for r in runs]
        if any(len(f) != len(folds[0]) for f in folds):
            raise BenchError("the runs' k-folds have different k")
        sigs = {_results(r)["recipe"]["kfold"].get("folds_signature") for r in runs}
        if len(sigs) != 1 or None in sigs:
            raise BenchError("the runs' k-folds are not on the same recorded folds (folds_signature)")
    score = _Scorer()
    md, valid = _valid_section(runs, score)
    report = {"runs": [str(r) for r in runs], "valid": valid}
    if kfold:
        kmd, report["kfold"] = _kfold_section(runs, folds, variant, sigs.pop(), score)
        md += kmd
    return "\n".join(md), report
