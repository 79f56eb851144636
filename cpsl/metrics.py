"""MMSA-exact regression metrics (thuiar/MMSA ``MetricsTop.__eval_mosei_regression``).

* ``Has0_acc_2`` / ``Has0_F1_score``: all samples, class = (value >= 0); weighted F1.
* ``Non0_acc_2`` / ``Non0_F1_score``: samples with label != 0 only, class = (value > 0).
* ``Mult_acc_5`` / ``Mult_acc_7``: clip predictions and labels to [-2, 2] / [-3, 3], then
  ``np.round`` (half to even) both and compare.
* ``MAE``: mean absolute error of the *unclipped* predictions; ``Corr``: Pearson r.

MMSA rounds each value to 4 decimals for display; :func:`mmsa_metrics` returns full
precision unless ``rounded=True``.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

METRIC_KEYS = ("Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score",
               "Mult_acc_5", "Mult_acc_7", "MAE", "Corr")


def _multiclass_acc(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.sum(np.round(pred) == np.round(true)) / float(len(true)))


def mmsa_metrics(pred, label, rounded: bool = False) -> dict[str, float]:
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    true = np.asarray(label, dtype=np.float64).reshape(-1)
    if pred.shape != true.shape or pred.size == 0:
        raise ValueError(f"pred and label must be non-empty and the same length ({pred.size} vs {true.size})")
    mae = float(np.mean(np.abs(pred - true)))
    if np.std(pred) == 0 or np.std(true) == 0:
        corr = float("nan")
    else:
        corr = float(np.corrcoef(pred, true)[0][1])
    a7 = _multiclass_acc(np.clip(pred, -3.0, 3.0), np.clip(true, -3.0, 3.0))
    a5 = _multiclass_acc(np.clip(pred, -2.0, 2.0), np.clip(true, -2.0, 2.0))
    nz = true != 0
    if nz.any():
        nz_true, nz_pred = true[nz] > 0, pred[nz] > 0
        non0_acc = float(accuracy_score(nz_true, nz_pred))
        non0_f1 = float(f1_score(nz_true, nz_pred, average="weighted"))
    else:
        non0_acc = non0_f1 = float("nan")
    b_true, b_pred = true >= 0, pred >= 0
    out = {
        "Has0_acc_2": float(accuracy_score(b_true, b_pred)),
        "Has0_F1_score": float(f1_score(b_true, b_pred, average="weighted")),
        "Non0_acc_2": non0_acc,
        "Non0_F1_score": non0_f1,
        "Mult_acc_5": a5,
        "Mult_acc_7": a7,
        "MAE": mae,
        "Corr": corr,
    }
    if rounded:
        out = {k: round(v, 4) for k, v in out.items()}
    return out


def undefined_metrics(pred, label) -> dict[str, str]:
    """``{metric: why}`` for each metric :func:`mmsa_metrics` reports as NaN on these values (empty when none)."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    true = np.asarray(label, dtype=np.float64).reshape(-1)
    out = {}
    if true.size < 2:
        out["Corr"] = f"Pearson r needs at least 2 samples (the split has {true.size})"
    elif np.std(true) == 0:
        out["Corr"] = f"the labels are constant ({true[0]:g} for all {true.size} samples)"
    elif np.std(pred) == 0:
        out["Corr"] = f"the predictions are constant ({pred[0]:g} for all {pred.size} samples)"
    if not (true != 0).any():
        out["Non0_acc_2"] = out["Non0_F1_score"] = "every label is 0 (these metrics use the non-zero labels only)"
    return out


def format_table(rows: dict[str, dict[str, float]], keys=METRIC_KEYS) -> str:
    """A plain-text table: one row per entry (e.g. split or variant), one column per metric."""
    name_w = max([len("") + 4] + [len(r) for r in rows])
    head = " " * name_w + "  " + "  ".join(f"{k:>13}" for k in keys)
    lines = [head]
    for name, m in rows.items():
        cells = []
        for k in keys:
            v = m.get(k)
            if isinstance(v, dict):
                cells.append(f"{v['mean']:.4f}±{v['std']:.4f}".rjust(13))
            elif v is None:
                cells.append(" " * 13)
            else:
                cells.append(f"{v:13.4f}")
        lines.append(f"{name:<{name_w}}  " + "  ".join(cells))
    return "\n".join(lines)


def mean_std(values: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and population std (ddof=0) over seeds, per metric."""
    out = {}
    for k in values[0]:
        arr = np.array([v[k] for v in values], dtype=np.float64)
        out[k] = {"mean": float(np.mean(arr)), "std": float(np.std(arr)), "values": arr.tolist()}
    return out


def retention(metrics: dict, reference: dict, missing=None) -> dict:
    """``metrics`` relative to ``reference`` (plain metric dicts; e.g. student vs teacher, an artefact
    vs PyTorch fp32): Non0_acc_2 and Corr ratios, absolute and relative MAE increase. A ratio
    over a zero reference is ``missing``."""
    def ratio(k):
        r = reference.get(k)
        return float(metrics[k] / r) if r else missing
    mae, ref_mae = metrics["MAE"], reference["MAE"]
    return {"Non0_acc_2": ratio("Non0_acc_2"), "Corr": ratio("Corr"), "MAE_increase": float(mae - ref_mae),
            "MAE_increase_rel": float((mae - ref_mae) / ref_mae) if ref_mae else missing}


def shapley_values(value: dict, players) -> dict:
    """Exact Shapley values φ_i = Σ_{S ⊆ N∖{i}} |S|!(n−|S|−1)!/n! (v(S ∪ {i}) − v(S)) of a game
    given as ``{frozenset(coalition): v}`` over every subset of ``players``."""
    from itertools import combinations
    from math import factorial
    players = tuple(players)
    n = len(players)
    out = {}
    for i in players:
        rest = [p for p in players if p != i]
        phi = 0.0
        for k in range(n):
            w = factorial(k) * factorial(n - k - 1) / factorial(n)
            for S in combinations(rest, k):
                S = frozenset(S)
                phi += w * (value[S | {i}] - value[S])
        out[i] = float(phi)
    return out
