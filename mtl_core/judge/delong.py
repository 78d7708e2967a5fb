"""Paired DeLong test of an AUC difference: the variance of AUC(a) - AUC(b) on the same examples, in closed form.

DeLong's estimator gives the variance of a paired AUC difference analytically (from each example's placement
against the other class), so the gate needs no resampling and its error rates can be simulated cheaply. The
computation is the fast algorithm of Sun & Xu (2014): midranks from one sort per model, O(n log n), with ties
counted as half, exactly like the Mann-Whitney AUC of ``mtl_core.judge.metrics.roc_auc``.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def _midranks_of_sorted(values: np.ndarray) -> np.ndarray:
    """1-based ranks of already sorted ``values``, tied runs sharing their average rank."""
    n = len(values)
    if n == 0:
        return np.empty(0, dtype=np.float64)
    starts = np.flatnonzero(np.concatenate(([True], values[1:] != values[:-1])))
    ends = np.append(starts[1:], n)
    return np.repeat((starts + ends + 1) / 2.0, ends - starts)


def _labels(labels) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {y.shape}")
    if y.dtype != bool:
        if not ((y == 0) | (y == 1)).all():
            raise ValueError("labels must be 0/1 or boolean")
        y = y.astype(bool)
    return y


def _scores(scores, n: int, name: str) -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {x.shape}")
    if len(x) != n:
        raise ValueError(f"labels has {n} rows but {name} has {len(x)}")
    if np.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    return x


def auc_and_placements(labels, scores) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC of ``scores`` and DeLong's structural components (placements).

    Returns ``(auc, v10, v01)``: ``v10[i]`` is the share of negatives that positive ``i`` outranks and
    ``v01[j]`` the share of positives that outrank negative ``j`` (ties count half), both in row order
    within their class; ``auc`` is the mean of either. With only one class: ``(nan, empty, empty)``.
    """
    y = _labels(labels)
    x = _scores(scores, len(y), "scores")
    m = int(y.sum())
    n = len(y) - m
    if m == 0 or n == 0:
        empty = np.empty(0, dtype=np.float64)
        return float("nan"), empty, empty
    order = np.argsort(x)
    sorted_x, sorted_y = x[order], y[order]
    overall = _midranks_of_sorted(sorted_x)
    within = np.empty(len(x), dtype=np.float64)  # rank among the own class, in sorted order
    within[sorted_y] = _midranks_of_sorted(sorted_x[sorted_y])
    within[~sorted_y] = _midranks_of_sorted(sorted_x[~sorted_y])
    # Rank among all minus rank among the own class = number of the other class below (ties half).
    below = np.empty(len(x), dtype=np.float64)
    below[order] = overall - within
    v10 = below[y] / n
    v01 = 1.0 - below[~y] / m
    return float(v10.mean()), v10, v01


def paired_auc_difference(labels, probs_a, probs_b, level: float = 0.95) -> dict[str, float]:
    """AUC(a) - AUC(b) on the same rows with DeLong's variance: {"delta", "se", "low", "high", "auc_a", "auc_b",
    "n", "positives"}; low/high is the two-sided `level` normal interval.

    With one class absent every statistic is NaN; with a single positive or negative the AUCs and delta
    are defined but the variance is not, so se/low/high are NaN.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    y = _labels(labels)
    a = _scores(probs_a, len(y), "probs_a")
    b = _scores(probs_b, len(y), "probs_b")
    positives = int(y.sum())
    negatives = len(y) - positives
    nan = float("nan")
    result = {"n": len(y), "positives": positives}
    if positives == 0 or negatives == 0:
        return {"delta": nan, "se": nan, "low": nan, "high": nan, "auc_a": nan, "auc_b": nan, **result}
    auc_a, v10_a, v01_a = auc_and_placements(y, a)
    auc_b, v10_b, v01_b = auc_and_placements(y, b)
    delta = auc_a - auc_b
    if positives < 2 or negatives < 2:
        se = nan
    else:
        # S10[a,a] + S10[b,b] - 2 S10[a,b] is the sample variance of the paired differences (same for S01).
        variance = np.var(v10_a - v10_b, ddof=1) / positives + np.var(v01_a - v01_b, ddof=1) / negatives
        se = math.sqrt(max(float(variance), 0.0))
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return {
        "delta": delta,
        "se": se,
        "low": delta - z * se,
        "high": delta + z * se,
        "auc_a": auc_a,
        "auc_b": auc_b,
        **result,
    }
