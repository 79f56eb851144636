"""MMSA-exact regression metrics (thuiar/MMSA ``__eval_mosei_regression``), checked by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cpsl.metrics import METRIC_KEYS, format_table, mean_std, mmsa_metrics


def test_keys_are_mmsa_names():
    m = mmsa_metrics([0.1, -0.2, 1.0], [0.0, -1.0, 2.0])
    assert tuple(m) == METRIC_KEYS
    assert METRIC_KEYS == ("Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score",
                           "Mult_acc_5", "Mult_acc_7", "MAE", "Corr")


def test_zero_labels_has0_vs_non0():
    label = [0.0, 0.0, 1.0, -1.0, 2.0, -2.0]
    pred = [0.5, -0.5, 0.0, -1.0, 1.0, 1.0]
    # Has0 (>= 0 on both sides, all six samples):
    #   true  T T T F T F
    #   pred  T F T F T T      (pred 0.0 counts as positive with >=)
    #   hits  1 0 1 1 1 0  -> 4/6
    #   pos class: TP=3 FP=1 FN=1 -> F1 = 6/8 = 0.75, support 4
    #   neg class: TP=1 FP=1 FN=1 -> F1 = 2/4 = 0.5,  support 2
    #   weighted F1 = (4*0.75 + 2*0.5)/6 = 2/3
    # Non0 (label != 0 only: the last four; > 0 on both sides):
    #   true  T F T F
    #   pred  F F T T          (pred exactly 0 on label 1.0 is negative with >)
    #   hits  0 1 1 0  -> 2/4
    #   pos: TP=1 FP=1 FN=1 -> 0.5 ; neg: TP=1 FP=1 FN=1 -> 0.5 ; weighted 0.5
    m = mmsa_metrics(pred, label)
    assert m["Has0_acc_2"] == pytest.approx(4 / 6, abs=1e-15)
    assert m["Has0_F1_score"] == pytest.approx(2 / 3, abs=1e-15)
    assert m["Non0_acc_2"] == pytest.approx(0.5, abs=1e-15)
    assert m["Non0_F1_score"] == pytest.approx(0.5, abs=1e-15)


def test_pred_exactly_zero_on_nonzero_label():
    # label 1 (positive), pred 0: Has0 says pred >= 0 -> positive -> hit;
    # Non0 says pred > 0 is False -> negative -> miss. Second sample is a plain hit for both.
    m = mmsa_metrics([0.0, -1.0], [1.0, -1.0])
    assert m["Has0_acc_2"] == 1.0
    assert m["Non0_acc_2"] == 0.5


def test_weighted_f1_unbalanced_by_hand():
    label = [1, 1, 1, 1, 1, 1, -1, -1]   # 6 positive, 2 negative
    pred = [1, 1, 1, 1, -1, -1, 1, -1]
    # pos: TP=4, FP=1 (idx 6), FN=2 (idx 4,5) -> F1 = 2*4/(8+1+2) = 8/11
    # neg: TP=1 (idx 7), FP=2, FN=1          -> F1 = 2*1/(2+2+1) = 2/5
    # weighted = (6*8/11 + 2*2/5)/8 = 71/110   (macro would be 31/55, binary 8/11)
    m = mmsa_metrics(pred, label)
    assert m["Has0_F1_score"] == pytest.approx(71 / 110, abs=1e-15)
    assert m["Non0_F1_score"] == pytest.approx(71 / 110, abs=1e-15)  # no zero labels: same samples
    assert m["Has0_acc_2"] == pytest.approx(5 / 8, abs=1e-15)


def test_half_labels_round_half_to_even():
    # np.round: 0.5->0, 1.5->2, 2.5->2, -0.5->-0, -1.5->-2, -2.5->-2
    label = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5]
    pred = [0.2, 1.9, 2.1, -0.2, -1.9, -2.1]   # round to 0, 2, 2, -0, -2, -2
    # half-to-even: every sample matches -> Acc-7 = 1.
    # (half-up would give 3/6, half-away-from-zero 2/6.)
    # Acc-5 clips first: 2.5->2, -2.5->-2, 2.1->2, -2.1->-2 -> still every sample matches.
    m = mmsa_metrics(pred, label)
    assert m["Mult_acc_7"] == 1.0
    assert m["Mult_acc_5"] == 1.0


def test_half_preds_round_half_to_even():
    # preds 0.5->0, 2.5->2, -0.5->-0 (== 0), 1.5->2 ; labels round to 0, 2, 0, 1
    m = mmsa_metrics([0.5, 2.5, -0.5, 1.5], [0.0, 2.0, 0.2, 1.0])
    assert m["Mult_acc_7"] == pytest.approx(3 / 4, abs=1e-15)


def test_clipping_and_unclipped_mae():
    label = [2.4, -2.6, 3.0, 2.6]
    pred = [2.7, -3.6, 5.0, 1.4]
    # Acc-5 (clip to [-2, 2], round): pred 2, -2, 2, 1 ; label 2, -2, 2, 2 -> 3/4
    #   (without clipping sample 0 would be 3 vs 2: a miss)
    # Acc-7 (clip to [-3, 3], round): pred 3, -3, 3, 1 ; label 2, -3, 3, 3 -> 2/4
    # MAE unclipped: (0.3 + 1.0 + 2.0 + 1.2)/4 = 1.125   (clipped to [-3,3]: 0.475)
    m = mmsa_metrics(pred, label)
    assert m["Mult_acc_5"] == pytest.approx(3 / 4, abs=1e-15)
    assert m["Mult_acc_7"] == pytest.approx(2 / 4, abs=1e-15)
    assert m["MAE"] == pytest.approx(1.125, abs=1e-12)


def test_mae_pred_outside_range():
    m = mmsa_metrics([5.0, 0.0], [3.0, 0.0])   # |5-3| = 2, |0-0| = 0 -> 1.0
    assert m["MAE"] == pytest.approx(1.0, abs=1e-15)


def test_pearson_by_hand():
    # deviations from the mean 2.5: pred (-1.5,-.5,.5,1.5), label (-1.5,.5,-.5,1.5)
    # cov sum = 2.25 - .25 - .25 + 2.25 = 4 ; var sums 5 and 5 -> r = 0.8
    m = mmsa_metrics([1, 2, 3, 4], [1, 3, 2, 4])
    assert m["Corr"] == pytest.approx(0.8, abs=1e-14)
    assert mmsa_metrics([1, 2, 3], [3, 2, 1])["Corr"] == pytest.approx(-1.0, abs=1e-14)


def test_degenerate_cases():
    assert math.isnan(mmsa_metrics([1.0, 1.0, 1.0], [0.2, 0.4, -1.0])["Corr"])  # constant pred
    m = mmsa_metrics([0.3, -0.1], [0.0, 0.0])   # every label zero: Non0 undefined
    assert math.isnan(m["Non0_acc_2"]) and math.isnan(m["Non0_F1_score"])
    with pytest.raises(ValueError):
        mmsa_metrics([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        mmsa_metrics([], [])


def test_rounded_and_shapes():
    p = np.array([[0.123456], [1.987654], [-0.55555]], dtype=np.float32)   # (N, 1) like a model output
    y = [0.0, 2.0, -0.4]
    full, r = mmsa_metrics(p, y), mmsa_metrics(p, y, rounded=True)
    for k in METRIC_KEYS:
        assert r[k] == round(full[k], 4)
    assert full["MAE"] != r["MAE"]   # full precision by default


# ------------------------------------------------------- independent re-implementation

def _weighted_f1(t: np.ndarray, p: np.ndarray) -> float:
    tot = 0.0
    for c in (False, True):
        tp = np.sum((p == c) & (t == c))
        fp = np.sum((p == c) & (t != c))
        fn = np.sum((p != c) & (t == c))
        f1 = 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
        tot += f1 * np.sum(t == c)
    return tot / len(t)


def _reference(pred, true) -> dict:
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    nz = true != 0
    pc, tc = pred - pred.mean(), true - true.mean()
    return {
        "Has0_acc_2": np.mean((pred >= 0) == (true >= 0)),
        "Has0_F1_score": _weighted_f1(true >= 0, pred >= 0),
        "Non0_acc_2": np.mean((pred[nz] > 0) == (true[nz] > 0)),
        "Non0_F1_score": _weighted_f1(true[nz] > 0, pred[nz] > 0),
        "Mult_acc_5": np.mean(np.round(np.clip(pred, -2, 2)) == np.round(np.clip(true, -2, 2))),
        "Mult_acc_7": np.mean(np.round(np.clip(pred, -3, 3)) == np.round(np.clip(true, -3, 3))),
        "MAE": np.mean(np.abs(pred - true)),
        "Corr": np.sum(pc * tc) / np.sqrt(np.sum(pc ** 2) * np.sum(tc ** 2)),
    }


@pytest.mark.parametrize("seed", range(5))
def test_matches_independent_reimplementation(seed):
    rng = np.random.default_rng(seed)
    n = 200 + 37 * seed
    true = np.clip(np.round(rng.normal(0, 1.4, n) * 5) / 5, -3, 3)          # 0.2 grid, exact zeros
    pred = 0.6 * true + rng.normal(0, 1.0, n) * (1 + seed)                  # some far outside [-3, 3]
    pred[::13] = 0.0                                                        # exact zero predictions
    pred[5::17] = np.round(pred[5::17]) + 0.5                               # .5 predictions
    assert (true == 0).any() and (pred == 0).any()
    got, ref = mmsa_metrics(pred, true), _reference(pred, true)
    for k in METRIC_KEYS:
        assert abs(got[k] - ref[k]) <= 1e-12, (k, got[k], ref[k])


# ----------------------------------------------------------- format_table, mean_std

def test_mean_std_population():
    runs = [{"MAE": 1.0, "Corr": 0.5}, {"MAE": 3.0, "Corr": 0.7}, {"MAE": 2.0, "Corr": 0.6}]
    ms = mean_std(runs)
    assert ms["MAE"]["mean"] == pytest.approx(2.0)
    # population std: sqrt(((1-2)^2 + (3-2)^2 + 0)/3) = sqrt(2/3)   (sample std would be 1.0)
    assert ms["MAE"]["std"] == pytest.approx(math.sqrt(2 / 3), abs=1e-15)
    assert ms["Corr"]["mean"] == pytest.approx(0.6)
    assert ms["MAE"]["values"] == [1.0, 3.0, 2.0]


def test_format_table():
    test_m = mmsa_metrics([0.5, -1.2, 2.0, 0.1], [1.0, -1.0, 2.2, -0.4])
    seeds = mean_std([test_m, {k: v + 0.5 for k, v in test_m.items()}])
    txt = format_table({"test": test_m, "mean over seeds": seeds, "partial": {"MAE": 0.25}})
    lines = txt.splitlines()
    assert len(lines) == 4
    header = lines[0].split()
    assert header == list(METRIC_KEYS)
    row = lines[1].split()
    assert row[0] == "test"
    assert [float(c) for c in row[1:]] == [round(test_m[k], 4) for k in METRIC_KEYS]
    # a mean_std entry renders as mean±std
    assert f"{seeds['MAE']['mean']:.4f}±{seeds['MAE']['std']:.4f}" in lines[2]
    assert lines[2].startswith("mean over seeds")
    # missing metrics are blank, present ones are still placed under their own column
    assert lines[3].split() == ["partial", "0.2500"]
    col = lines[0].index("MAE") + len("MAE")   # right-aligned columns
    assert lines[3][col - 6:col] == "0.2500"
