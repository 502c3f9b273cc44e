"""Classification metrics on NumPy arrays, without sklearn: the AudioSet mAP (ALGORITHM §8, §10) and top-k accuracy.

- :func:`average_precision` / :func:`mean_average_precision`: ``[S] SSLAM_Inference/evaluation/eval.py`` scores a
  fine-tuned model by the class mean of ``sklearn.metrics.average_precision_score``. AP is sklearn's step-wise
  definition: over the distinct score thresholds in decreasing order, the sum of (R_n - R_{n-1}) * P_n, tied scores
  forming one threshold (so the order inside a tie never matters). A class without a positive has no AP (NaN) and is
  left out of the mean.
- :func:`accuracy`: the share of clips whose true class is among the k highest scores (single-label sets such as
  ESC-50 or Speech Commands report top-1 accuracy, ALGORITHM §10). A tie at the k-th score counts for the class with
  the lower index, as a stable sort of the negated scores orders them.

Used by ``python -m sslam_fast.evaluate`` and the trainer's linear probe (``sslam_fast.train.probe``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["accuracy", "average_precision", "mean_average_precision"]


def average_precision(scores, targets) -> float:
    """AP of one class (``sklearn.metrics.average_precision_score`` semantics); NaN when there is no positive.

    Args:
        scores: (N,) real scores, higher = more likely positive (any monotone transform gives the same AP).
        targets: (N,) {0, 1} or bool labels.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(targets).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and targets must have the same length, got {s.shape} and {y.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    npos = int(y.sum())
    if npos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last].astype(np.float64)
    precision = tps / (last + 1)
    recall = tps / npos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores, targets) -> tuple[float, np.ndarray]:
    """``(mAP, per-class AP)`` of (N, C) scores and {0, 1} targets; classes without a positive get NaN and are left
    out of the mean (NaN mAP if no class has a positive)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(targets)
    if s.ndim != 2 or s.shape != y.shape:
        raise ValueError(f"scores and targets must both be (N, C), got {s.shape} and {y.shape}")
    ap = np.array([average_precision(s[:, c], y[:, c]) for c in range(s.shape[1])], dtype=np.float64)
    valid = ~np.isnan(ap)
    return (float(ap[valid].mean()) if valid.any() else float("nan")), ap


def accuracy(scores, labels, k: int = 1) -> float:
    """Top-``k`` accuracy of (N, C) scores against (N,) integer class labels in [0, C): the share of rows whose label
    is among the row's k highest scores (ties ordered by class index). N must be at least 1."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be (N, C), got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    y = np.asarray(labels)
    N, C = s.shape
    if y.shape != (N,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be ({N},) integers, got shape {y.shape} and dtype {y.dtype}")
    if N == 0:
        raise ValueError("accuracy of no rows is undefined")
    if (y < 0).any() or (y >= C).any():
        raise ValueError(f"labels must lie in [0, {C}), got values from {int(y.min())} to {int(y.max())}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= C:
        raise ValueError(f"k must be an int in [1, {C}], got {k!r}")
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return float((top == y[:, None]).any(axis=1).mean())
