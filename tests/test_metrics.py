"""sslam_fast.metrics: AP / mAP with sklearn's step-wise definition and top-k accuracy, against values worked out by
hand (no sklearn)."""

import math

import numpy as np
import pytest

from sslam_fast.metrics import accuracy, average_precision, mean_average_precision

# --- average precision ------------------------------------------------------------------------------------------------


def test_average_precision_hand_computed():
    # ranks: + - + - : P@1 = 1, P@3 = 2/3; AP = 0.5 * 1 + 0.5 * 2/3
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6, abs=1e-12)
    # ties form one threshold: {0.5, 0.5} -> P = 1/2 at R = 1/2; then 0.2 -> P = 2/3 at R = 1. Ranking the tied
    # positive first would give 1/2 + 1/3 = 5/6: the order inside a tie must not matter.
    assert average_precision([0.5, 0.5, 0.2], [1, 0, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3, abs=1e-12)
    assert average_precision([0.5, 0.5, 0.2], [0, 1, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3, abs=1e-12)
    assert average_precision([0.1, 0.9, 0.3], [0, 1, 0]) == 1.0
    assert average_precision([0.9, 0.1, 0.3], [0, 1, 0]) == pytest.approx(1 / 3, abs=1e-12)
    assert math.isnan(average_precision([0.2, 0.1], [0, 0]))


def test_average_precision_worst_ranking_and_all_tied():
    # - - + + : P@3 = 1/3 at R = 1/2, P@4 = 2/4 at R = 1: AP = 0.5 / 3 + 0.5 * 0.5 = 5/12
    assert average_precision([4.0, 3.0, 2.0, 1.0], [0, 0, 1, 1]) == pytest.approx(5 / 12, abs=1e-12)
    # one threshold for everything: AP = the share of positives
    assert average_precision([0.3] * 5, [1, 0, 0, 1, 0]) == pytest.approx(2 / 5, abs=1e-12)
    # bool targets and a monotone transform of the scores give the same AP
    s = np.array([0.2, 1.5, -0.3, 0.9, 0.1])
    y = np.array([True, True, False, False, True])
    assert average_precision(np.exp(3 * s), y) == average_precision(s, y.astype(int))
    # by score 1.5 +, 0.9 -, 0.2 +, 0.1 +, -0.3 -: P = 1, 2/3, 3/4 at R = 1/3, 2/3, 1
    assert average_precision(s, y) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3, abs=1e-12)


def test_average_precision_rejects_bad_input():
    with pytest.raises(ValueError, match="same"):
        average_precision([1.0, 2.0], [1])
    with pytest.raises(ValueError, match="finite"):
        average_precision([1.0, float("nan")], [1, 0])


def test_mean_average_precision_skips_classes_without_positives():
    s = np.array([[0.9, 0.1, 0.5], [0.8, 0.2, 0.4], [0.7, 0.3, 0.3], [0.6, 0.4, 0.2]])
    y = np.array([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 1]])
    m, ap = mean_average_precision(s, y)
    assert math.isnan(ap[1])
    np.testing.assert_allclose(ap[[0, 2]], [5 / 6, 1 / 4])
    assert m == pytest.approx((5 / 6 + 1 / 4) / 2, abs=1e-12)
    m, ap = mean_average_precision(s, np.zeros_like(y))
    assert math.isnan(m) and np.isnan(ap).all()
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        mean_average_precision(s, y[:, :2])
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        mean_average_precision(s[:, 0], y[:, 0])


# --- accuracy ---------------------------------------------------------------------------------------------------------


def test_accuracy_top_1_and_top_k():
    s = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    y = np.array([1, 1, 2, 2])
    # top-1 predictions 1, 0, 2, 0: rows 0 and 2 right
    assert accuracy(s, y) == 0.5
    # top-2: {1, 2}, {0, 1}, {2, 1}, {0, 1}: rows 0, 1, 2 right
    assert accuracy(s, y, k=2) == 0.75
    assert accuracy(s, y, k=3) == 1.0
    # a tie at the top counts for the lower class index
    assert accuracy(np.array([[0.4, 0.4, 0.2]]), np.array([0])) == 1.0
    assert accuracy(np.array([[0.4, 0.4, 0.2]]), np.array([1])) == 0.0


@pytest.mark.parametrize(
    "scores,labels,k,match",
    [
        (np.zeros((2, 3)), np.array([0, 3]), 1, "labels"),
        (np.zeros((2, 3)), np.array([0.0, 1.0]), 1, "labels"),
        (np.zeros((2, 3)), np.array([0]), 1, "labels"),
        (np.zeros((2, 3)), np.array([0, 1]), 4, "k"),
        (np.zeros((2, 3)), np.array([0, 1]), 0, "k"),
        (np.zeros(3), np.array([0]), 1, "scores"),
        (np.array([[0.0, np.inf]]), np.array([0]), 1, "finite"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), 1, "no rows"),
    ],
)
def test_accuracy_rejects_bad_input(scores, labels, k, match):
    with pytest.raises(ValueError, match=match):
        accuracy(scores, labels, k=k)
