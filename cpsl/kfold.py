"""Video-grouped k-fold cross-validation over train + valid (never the test rows): the one fold
writer (:func:`fold_pickles`), the folds' signature, training each variant on every fold
(:func:`train_folds`, one ``cpsl train`` child per fold) and the paired fold-by-fold comparison
of finished k-folds (:func:`compare_kfold`). Used by the MOSI recipe and bench/balance.py."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import CPSLError

FOLD_SEED = 0
GROUPING = "video id, train+valid pooled (test rows never used)"


def fold_pickles(pkl: str | Path, k: int, cache: str | Path) -> list[Path]:
    """The k video-grouped folds of ``pkl``'s train + valid (:func:`cpsl.data.folds.video_folds`,
    seed 0) as ``CACHE/folds_<stem>_k<k>/fold<i>.pkl``, written once and reused after."""
    from .data.folds import video_folds
    from .data.mmsa import load_mmsa, save_mmsa
    pkl = Path(pkl)
    d = Path(cache) / f"folds_{pkl.stem}_k{k}"
    paths = [d / f"fold{i}.pkl" for i in range(k)]
    if not all(p.is_file() for p in paths):
        for i, f in enumerate(video_folds(load_mmsa(pkl, require_splits=("train", "valid")), k, seed=FOLD_SEED)):
            save_mmsa(f, paths[i])
    return paths


def folds_signature(paths: list[Path]) -> str:
    """blake2b of each fold's segment ids, labels and token ids, per split: the same signature means
    the same folds, whatever float noise the frozen encoder states carry from machine to machine."""
    import numpy as np

    from .data.mmsa import load_mmsa
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        for name, sp in sorted(load_mmsa(p).splits.items()):
            h.update(name.encode() + b"\0" + "\0".join(map(str, sp.ids)).encode())
            h.update(np.ascontiguousarray(sp.labels, dtype=np.float32).tobytes())
            if sp.text_bert is not None:
                h.update(np.ascontiguousarray(sp.text_bert).tobytes())
    return h.hexdigest()


def paired(a: list[dict], b: list[dict]) -> dict:
    """Fold-paired a − b of MAE, Corr and Non0_acc_2: mean with its 95 % t-interval."""
    from .ablate import paired_difference
    from .compare import METRICS
    return {m: paired_difference([x[m] for x in a], [y[m] for y in b]) for m in METRICS}


@dataclass
class FoldVariant:
    """One setting trained on every fold: its runs go to ``folder/fold<i>``; ``train_args(fold_pickle,
    run_folder)`` is its ``cpsl train`` command line; ``record`` joins its result (e.g. the encoder)."""
    name: str
    folder: Path
    train_args: Callable[[Path, Path], list]
    record: dict = field(default_factory=dict)


def train_folds(paths: list[Path], variants: list[FoldVariant], seed: int, threads: int = 0,
                timing: dict | None = None, log=print) -> dict:
    """Each variant trained on each fold (one seed; a fold whose run finished is reused); per
    variant the fold-valid mean ± std of the fused model and of its text head, their fold-paired
    difference, and the first variant minus each other one, paired over the same folds."""
    from .metrics import mean_std
    from .proc import run_cpsl
    from .runs import epoch_times
    timing = {} if timing is None else timing
    res = {}
    for v in variants:
        per_fold, fold_time = [], 0.0
        for i, p in enumerate(paths):
            d = v.folder / f"fold{i}"
            log(f"[kfold] {v.name} fold {i + 1}/{len(paths)}")
            if not (d / "results.json").is_file():
                run_cpsl([*v.train_args(p, d), "--overwrite"], v.folder / f"fold{i}.log", True, threads)
            per_fold.append(json.loads((d / "results.json").read_text()))
            fold_time += sum(epoch_times(d))      # the run's own epoch time: a reused fold counts what it took
        fused = [r["per_seed"][0]["valid"] for r in per_fold]
        text = [r["per_seed"][0]["valid_aux"]["text"] for r in per_fold]
        res[v.name] = {**v.record, "valid": mean_std(fused), "valid_text_head": mean_std(text),
                       "per_fold": {"valid": fused, "valid_text_head": text},
                       "fused_minus_text_head": paired(fused, text)}
        timing[f"kfold_{v.name}_s"] = fold_time
    first = next(iter(res))
    for name in list(res)[1:]:      # the same folds: paired over folds
        res[first][f"minus_{name}"] = paired(res[first]["per_fold"]["valid"], res[name]["per_fold"]["valid"])
    return {"k": len(paths), "seed": int(seed), "grouping": GROUPING, "folds_signature": folds_signature(paths),
            "variants": res}


def _load_kfolds(files: list[str], variant: str) -> list[tuple[Path, dict, dict]]:
    runs = []
    for f in map(Path, files):
        if not f.is_file():
            raise CPSLError(f"{f} not found")
        r = json.loads(f.read_text())
        kf = r.get("recipe", {}).get("kfold")
        if not kf or variant not in kf["variants"]:
            raise CPSLError(f"{f} has no k-fold of the variant {variant!r} (run the recipe with --kfold K)")
        runs.append((f, r, kf))
    return runs


def _same_folds(runs, assume_same_folds: bool) -> list[str]:
    """Refuse k-folds on other folds than the first's; the notes of folds assumed the same."""
    f0, r0, k0 = runs[0]
    notes = []
    for f, r, kf in runs[1:]:
        for what, a, b in (("k", kf["k"], k0["k"]), ("seed", kf["seed"], k0["seed"])):
            if a != b:
                raise CPSLError(f"{f} and {f0} differ in {what} ({a!r} vs {b!r}): not the same folds")
        if kf.get("folds_signature") and k0.get("folds_signature"):
            if kf["folds_signature"] != k0["folds_signature"]:
                raise CPSLError(f"{f} and {f0} differ in their folds' segments, labels or tokens "
                                "(folds_signature): not the same folds")
        elif r.get("data_fingerprint") != r0.get("data_fingerprint"):
            old = f if not kf.get("folds_signature") else f0
            if not assume_same_folds:
                raise CPSLError(f"{f} and {f0} differ in the MOSI data fingerprint and {old} predates "
                                "fold signatures, so their folds cannot be checked; pass --assume-same-folds if "
                                "both came from the same labels.csv (the same segments and labels)")
            notes.append(f"`{old}` records no fold signature and the MOSI data fingerprints differ "
                         "(frozen encoder states differ across machines): the folds are assumed to be the same "
                         "(--assume-same-folds).")
    return notes


def compare_kfold(files: list[str], variant: str = "transferred", assume_same_folds: bool = False) -> str:
    """Markdown: the k-fold of ``variant`` in each recipe ``results.json``, paired fold by fold with
    the first file's (the same folds: k, seed and folds_signature checked). Two recipe configs or
    encoders compared on the k-fold estimate without retraining either."""
    from .compare import format_delta, format_mean_std
    if len(files) < 2:
        raise CPSLError("a k-fold comparison needs two or more results.json files")
    runs = _load_kfolds(files, variant)
    notes = _same_folds(runs, assume_same_folds)
    f0, k0 = runs[0][0], runs[0][2]
    folds = [kf["variants"][variant]["per_fold"]["valid"] for _, _, kf in runs]
    lines = [f"k = {k0['k']} video-grouped folds of MOSI train + valid, seed {k0['seed']}, variant `{variant}`; "
             f"Δ = run − `{f0}` paired over folds, mean [95 % t-interval], `*` = the interval excludes 0.",
             *notes, "",
             "| run | encoder | per-fold MAE | MAE | Δ MAE | Corr | Δ Corr | Non0_acc_2 | Δ Non0_acc_2 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, ((f, _, kf), pf) in enumerate(zip(runs, folds)):
        v, d = kf["variants"][variant], paired(pf, folds[0])
        cells = [f"`{f}`", f"`{Path(v['encoder']).name}`", " ".join(f"{x['MAE']:.3f}" for x in pf)]
        for m in ("MAE", "Corr", "Non0_acc_2"):
            cells += [format_mean_std(v["valid"][m]), format_delta(d[m]) if i else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
