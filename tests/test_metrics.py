"""Tests for gradosr.metrics, against scikit-learn, naive loops and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from gradosr.errors import ConfigError, DataError
from gradosr.metrics import (
    aupr_in,
    aupr_out,
    auroc,
    closed_set_accuracy,
    fpr_at_tpr,
    macro_f1_open,
    open_set_predictions,
    oscr,
    threshold_at_tpr,
)

SEEDS = range(8)


def random_binary(seed: int, n: int = 200, decimals: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Scores with many ties (rounded) and a random known/unknown split with both classes."""
    rng = np.random.default_rng(seed)
    is_known = rng.random(n) < rng.uniform(0.2, 0.8)
    is_known[0], is_known[1] = True, False
    scores = np.round(rng.normal(size=n) + 0.7 * is_known, decimals)
    return scores, is_known


# ---------------------------------------------------------------------------
# AUROC / AUPR against scikit-learn
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("decimals", [0, 1, 3])
def test_ranking_metrics_match_sklearn(seed, decimals):
    scores, is_known = random_binary(seed, decimals=decimals)
    assert len(np.unique(scores)) < len(scores)  # ties are present
    assert auroc(scores, is_known) == pytest.approx(roc_auc_score(is_known, scores), abs=1e-9)
    assert aupr_in(scores, is_known) == pytest.approx(average_precision_score(is_known, scores), abs=1e-9)
    assert aupr_out(scores, is_known) == pytest.approx(average_precision_score(~is_known, -scores), abs=1e-9)


def test_auroc_hand_cases():
    # perfect separation, reversed, and all tied
    assert auroc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    assert auroc([0.5, 0.5, 0.5], [1, 0, 1]) == 0.5
    # pairs (known, unknown): (3,2) win, (3,1) win, (1,2) lose, (1,1) tie -> 2.5 / 4
    assert auroc([3.0, 1.0, 2.0, 1.0], [True, True, False, False]) == pytest.approx(0.625)


def test_aupr_hand_case():
    # descending: known(0.9), unknown(0.8), known(0.7): AP = 1/2 * 1 + 1/2 * 2/3
    assert aupr_in([0.9, 0.8, 0.7], [1, 0, 1]) == pytest.approx(0.5 + 1 / 3)
    # unknown positive with negated scores: the single unknown ranks 2nd of 3 -> precision 1/2
    assert aupr_out([0.9, 0.8, 0.7], [1, 0, 1]) == pytest.approx(0.5)


def test_inputs_as_lists_and_tensors():
    scores, is_known = random_binary(3)
    expected = roc_auc_score(is_known, scores)
    assert auroc(scores.tolist(), is_known.tolist()) == pytest.approx(expected, abs=1e-12)
    got = auroc(torch.tensor(scores, dtype=torch.float32, requires_grad=True), torch.tensor(is_known))
    assert got == pytest.approx(roc_auc_score(is_known, scores.astype(np.float32)), abs=1e-12)
    assert isinstance(got, float)
    assert isinstance(fpr_at_tpr(scores, is_known.astype(int)), float)


# ---------------------------------------------------------------------------
# threshold_at_tpr / fpr_at_tpr
# ---------------------------------------------------------------------------


def test_threshold_at_boundary_20_knowns():
    known = np.arange(1, 21, dtype=float)  # 1..20
    # 95% of 20 = 19 knowns must be >= t -> t is the 19th largest = 2
    assert threshold_at_tpr(known, 0.95) == 2.0
    assert threshold_at_tpr(known, 0.9) == 3.0  # 18th largest
    assert threshold_at_tpr(known, 0.91) == 2.0  # ceil(18.2) = 19
    assert threshold_at_tpr(known, 1.0) == 1.0
    assert threshold_at_tpr(known, 0.01) == 20.0  # at least one known
    scores = np.r_[known, [1.5, 2.0, 2.5, 0.5]]
    is_known = np.r_[np.ones(20, bool), np.zeros(4, bool)]
    # unknowns >= 2: 2.0 (tie at the threshold counts) and 2.5
    assert fpr_at_tpr(scores, is_known, 0.95) == 0.5
    assert fpr_at_tpr(scores, is_known, 1.0) == 0.75


def test_threshold_float_rounding():
    known = np.arange(100, 0, -1, dtype=float)  # 100..1
    # 0.07 * 100 == 7.000000000000001 in floating point; the 7th largest is right
    assert threshold_at_tpr(known, 0.07) == 94.0
    assert threshold_at_tpr(known, 0.14) == 87.0
    assert threshold_at_tpr(known, 0.95) == 6.0


def test_fpr_at_tpr_ties():
    known = [0.9, 0.8, 0.8, 0.8, 0.1]
    unknown = [0.8, 0.5, 0.05]
    scores = known + unknown
    is_known = [True] * 5 + [False] * 3
    assert threshold_at_tpr(known, 0.5) == 0.8  # ceil(2.5) = 3rd largest
    assert threshold_at_tpr(known, 0.8) == 0.8  # exactly 4 of 5
    assert threshold_at_tpr(known, 0.81) == 0.1  # needs all 5
    assert threshold_at_tpr(known, 0.2) == 0.9
    assert fpr_at_tpr(scores, is_known, 0.5) == pytest.approx(1 / 3)
    assert fpr_at_tpr(scores, is_known, 0.8) == pytest.approx(1 / 3)
    assert fpr_at_tpr(scores, is_known, 0.81) == pytest.approx(2 / 3)
    assert fpr_at_tpr(scores, is_known, 0.2) == 0.0


def naive_fpr_at_tpr(scores, is_known, tpr):
    known, unknown = scores[is_known], scores[~is_known]
    best = -np.inf
    for t in np.unique(scores):
        if np.count_nonzero(known >= t) / len(known) >= tpr:
            best = max(best, t)
    return np.mean(unknown >= best)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tpr", [0.95, 0.9, 0.8, 0.5, 0.07, 1.0])
def test_fpr_at_tpr_matches_naive(seed, tpr):
    scores, is_known = random_binary(seed, n=int(50 + 20 * seed))
    assert fpr_at_tpr(scores, is_known, tpr) == pytest.approx(naive_fpr_at_tpr(scores, is_known, tpr), abs=1e-12)


@pytest.mark.parametrize("tpr", [0.0, -0.1, 1.01, float("nan"), "high"])
def test_invalid_tpr(tpr):
    with pytest.raises(ConfigError, match="tpr"):
        threshold_at_tpr([0.1, 0.2], tpr)


# ---------------------------------------------------------------------------
# undefined cases and invalid inputs
# ---------------------------------------------------------------------------

BINARY_METRICS = [auroc, aupr_in, aupr_out, fpr_at_tpr]


@pytest.mark.parametrize("metric", BINARY_METRICS)
def test_binary_metrics_single_class(metric):
    with pytest.raises(DataError, match="all samples are known"):
        metric([0.1, 0.5, 0.9], [True, True, True])
    with pytest.raises(DataError, match="all samples are unknown"):
        metric([0.1, 0.5, 0.9], [0, 0, 0])


@pytest.mark.parametrize("metric", BINARY_METRICS)
def test_binary_metrics_invalid_inputs(metric):
    with pytest.raises(DataError, match="empty"):
        metric([], [])
    with pytest.raises(DataError, match="length mismatch"):
        metric([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(DataError, match="NaN"):
        metric([0.1, np.nan, 0.3], [True, False, True])
    with pytest.raises(DataError, match="NaN or infinite"):
        metric([0.1, np.inf, 0.3], [True, False, True])
    with pytest.raises(DataError, match="1-D"):
        metric(np.zeros((2, 2)), np.ones((2, 2), bool))
    with pytest.raises(DataError, match="1-D"):
        metric(0.5, True)
    with pytest.raises(DataError, match="boolean"):
        metric([0.1, 0.2, 0.3], [0, 1, 2])
    with pytest.raises(DataError, match="real numbers"):
        metric(["a", "b"], [True, False])


def test_threshold_at_tpr_invalid_inputs():
    with pytest.raises(DataError, match="empty"):
        threshold_at_tpr([])
    with pytest.raises(DataError, match="NaN"):
        threshold_at_tpr([0.1, float("nan")])


def test_oscr_undefined_cases():
    with pytest.raises(DataError, match="all samples are known"):
        oscr([0, 1], [0, 1], [0.3, 0.4])
    with pytest.raises(DataError, match="all samples are unknown"):
        oscr([-1, -1], [0, 1], [0.3, 0.4])
    with pytest.raises(DataError, match="length mismatch"):
        oscr([0, -1], [0, 1, 1], [0.3, 0.4])
    with pytest.raises(DataError, match="contains -1"):
        oscr([0, -1], [0, -1], [0.3, 0.4])
    with pytest.raises(DataError, match="NaN"):
        oscr([0, -1], [0, 0], [0.3, np.nan])
    with pytest.raises(DataError, match="empty"):
        oscr([], [], [])


# ---------------------------------------------------------------------------
# macro F1
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_macro_f1_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    k = 5
    y_true = rng.integers(-1, k, size=150)
    y_pred = np.where(rng.random(150) < 0.6, y_true, rng.integers(-1, k, size=150))
    expected = f1_score(y_true, y_pred, average="macro", zero_division=0)
    assert macro_f1_open(y_true, y_pred) == pytest.approx(expected, abs=1e-9)
    expected = f1_score(y_true, y_pred, labels=list(range(-1, k)), average="macro", zero_division=0)
    assert macro_f1_open(y_true, y_pred, num_known=k) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_macro_f1_absent_labels(seed):
    rng = np.random.default_rng(seed)
    k = 8  # classes 5, 6, 7 never appear in y_true or y_pred
    y_true = rng.integers(-1, 5, size=60)
    y_pred = np.where(rng.random(60) < 0.5, y_true, rng.integers(-1, 5, size=60))
    labels = list(range(-1, k))
    expected = f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    got = macro_f1_open(y_true, y_pred, num_known=k)
    assert got == pytest.approx(expected, abs=1e-9)
    # the absent classes pull the mean down relative to the labels-present variant
    assert got < macro_f1_open(y_true, y_pred)


def test_macro_f1_hand_case():
    y_true = [0, 0, 1, -1]
    y_pred = [0, 1, 1, -1]
    # class 0: tp 1, fn 1 -> 2/3; class 1: tp 1, fp 1 -> 2/3; class -1: 1
    assert macro_f1_open(y_true, y_pred) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    # with K = 3, class 2 is absent -> F1 0
    assert macro_f1_open(y_true, y_pred, num_known=3) == pytest.approx((2 / 3 + 2 / 3 + 1 + 0) / 4)


def test_macro_f1_invalid_inputs():
    with pytest.raises(DataError, match="outside"):
        macro_f1_open([0, 1, 3], [0, 1, 1], num_known=3)
    with pytest.raises(DataError, match="outside"):
        macro_f1_open([0, 1, 2], [0, 1, 5], num_known=3)
    with pytest.raises(DataError, match="below -1"):
        macro_f1_open([0, -2], [0, 0])
    with pytest.raises(DataError, match="integer"):
        macro_f1_open([0.5, 1.0], [0, 1])
    with pytest.raises(DataError, match="length mismatch"):
        macro_f1_open([0, 1], [0])
    with pytest.raises(DataError, match="empty"):
        macro_f1_open([], [])
    with pytest.raises(ConfigError, match="num_known"):
        macro_f1_open([0, 1], [0, 1], num_known=-1)


# ---------------------------------------------------------------------------
# OSCR
# ---------------------------------------------------------------------------


def naive_oscr(y_true, y_pred, scores):
    known = y_true != -1
    correct = known & (y_pred == y_true)
    fprs, ccrs = [0.0], [0.0]  # t = +inf
    for t in sorted(set(scores.tolist()), reverse=True):
        accepted = scores >= t
        ccrs.append(np.sum(correct & accepted) / np.sum(known))
        fprs.append(np.sum(~known & accepted) / np.sum(~known))
    area = 0.0
    for i in range(1, len(fprs)):
        area += (fprs[i] - fprs[i - 1]) * (ccrs[i] + ccrs[i - 1]) / 2
    return area


def random_open_set(seed: int, n: int = 200, k: int = 4, p_correct: float = 0.7):
    rng = np.random.default_rng(seed)
    y_true = np.where(rng.random(n) < 0.6, rng.integers(0, k, size=n), -1)
    y_true[0], y_true[1] = 0, -1
    y_pred = np.where(rng.random(n) < p_correct, np.maximum(y_true, 0), rng.integers(0, k, size=n))
    scores = np.round(rng.normal(size=n) + 0.8 * (y_true != -1), 1)
    return y_true, y_pred, scores


def test_oscr_hand_case():
    # knowns: 0.9 correct, 0.7 wrong, 0.5 correct; unknowns: 0.8, 0.5 (tie with a known)
    y_true = [0, 1, 2, -1, -1]
    y_pred = [0, 0, 2, 1, 1]
    scores = [0.9, 0.7, 0.5, 0.8, 0.5]
    # curve (0,0) -> (0,1/3) -> (1/2,1/3) -> (1/2,1/3) -> (1,2/3), last segment diagonal
    assert oscr(y_true, y_pred, scores) == pytest.approx(1 / 6 + 1 / 4)


@pytest.mark.parametrize("seed", SEEDS)
def test_oscr_matches_naive(seed):
    y_true, y_pred, scores = random_open_set(seed)
    assert oscr(y_true, y_pred, scores) == pytest.approx(naive_oscr(y_true, y_pred, scores), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_oscr_equals_auroc_when_classification_is_perfect(seed):
    y_true, _, scores = random_open_set(seed)
    y_pred = np.maximum(y_true, 0)  # every known correct; unknowns get some class
    is_known = y_true != -1
    assert oscr(y_true, y_pred, scores) == pytest.approx(roc_auc_score(is_known, scores), abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_oscr_bounded_by_auroc_and_accuracy(seed):
    # CCR(t) <= TPR(t) pointwise, so OSCR <= AUROC; and OSCR <= closed-set accuracy.
    y_true, y_pred, scores = random_open_set(seed, p_correct=0.5)
    value = oscr(y_true, y_pred, scores)
    assert value <= auroc(scores, y_true != -1) + 1e-12
    assert value <= closed_set_accuracy(y_true, y_pred) + 1e-12
    assert value < auroc(scores, y_true != -1)  # some knowns are misclassified


# ---------------------------------------------------------------------------
# closed-set accuracy and open-set predictions
# ---------------------------------------------------------------------------


def test_closed_set_accuracy():
    y_true = [0, 1, 2, -1, -1, 1]
    y_pred = [0, 2, 2, 0, 1, 1]
    # knowns: (0,0) ok, (1,2) wrong, (2,2) ok, (1,1) ok -> 3 / 4; unknowns ignored
    assert closed_set_accuracy(y_true, y_pred) == 0.75
    assert closed_set_accuracy(torch.tensor(y_true), torch.tensor(y_pred)) == 0.75


@pytest.mark.parametrize("seed", SEEDS)
def test_closed_set_accuracy_random(seed):
    y_true, y_pred, _ = random_open_set(seed)
    count = sum(1 for t, p in zip(y_true, y_pred) if t != -1 and t == p)
    total = sum(1 for t in y_true if t != -1)
    assert closed_set_accuracy(y_true, y_pred) == pytest.approx(count / total)


def test_closed_set_accuracy_invalid():
    with pytest.raises(DataError, match="no known samples"):
        closed_set_accuracy([-1, -1], [0, 1])
    with pytest.raises(DataError, match="contains -1"):
        closed_set_accuracy([0, 1], [0, -1])
    with pytest.raises(DataError, match="length mismatch"):
        closed_set_accuracy([0, 1], [0])


def test_open_set_predictions():
    pred = open_set_predictions([2, 0, 1, 3], [0.9, 0.2, 0.5, 0.49], 0.5)
    assert pred.dtype == np.int64
    np.testing.assert_array_equal(pred, [2, -1, 1, -1])  # 0.5 >= 0.5 is accepted
    np.testing.assert_array_equal(open_set_predictions([2, 0], [0.1, 0.2], -np.inf), [2, 0])
    np.testing.assert_array_equal(open_set_predictions([2, 0], [0.1, 0.2], np.inf), [-1, -1])
    got = open_set_predictions(torch.tensor([1, 1]), torch.tensor([0.3, 0.7]), torch.tensor(0.5))
    np.testing.assert_array_equal(got, [-1, 1])


def test_open_set_predictions_with_calibrated_threshold():
    # accepting at threshold_at_tpr keeps at least that fraction of the calibration knowns
    rng = np.random.default_rng(0)
    known = np.round(rng.normal(size=97), 1)
    t = threshold_at_tpr(known, 0.95)
    accepted = open_set_predictions(np.zeros(97, dtype=int), known, t) != -1
    assert accepted.mean() >= 0.95
    assert np.mean(known > t) < 0.95  # any strictly higher threshold would keep fewer


def test_open_set_predictions_invalid():
    with pytest.raises(DataError, match="NaN"):
        open_set_predictions([0, 1], [0.1, 0.2], float("nan"))
    with pytest.raises(DataError, match="length mismatch"):
        open_set_predictions([0, 1], [0.1], 0.0)
    with pytest.raises(DataError, match="contains -1"):
        open_set_predictions([0, -1], [0.1, 0.2], 0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_curve_matches_sklearn(seed):
    from sklearn.metrics import roc_curve as sk_roc_curve

    from gradosr.metrics import roc_curve

    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=200), 1)
    known = rng.random(200) < 0.4
    fpr, tpr = roc_curve(scores, known)
    sk_fpr, sk_tpr, _ = sk_roc_curve(known, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, rtol=0, atol=1e-12)


def test_oscr_curve_hand_computed():
    from gradosr.metrics import oscr_curve

    # knowns: scores 0.9 (correct), 0.8 (wrong), 0.5 (correct); unknowns: 0.8, 0.1
    y_true = np.array([0, 1, 0, -1, -1])
    y_pred = np.array([0, 0, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.5, 0.8, 0.1])
    fpr, ccr = oscr_curve(y_true, y_pred, scores)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(ccr, [0, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
