"""Paired bootstrap of an AUC difference: how sure are we that one model ranks better than another?"""

from __future__ import annotations

import math

import numpy as np

from mtl_core.judge.metrics import roc_auc


def paired_bootstrap_auc(
    labels: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, n_boot: int = 200, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """AUC(a) - AUC(b) on the same examples, with a percentile interval from resampling examples.

    Resampling the examples once for both models (paired) cancels the variance the two share, so the
    interval is far tighter than comparing two independent intervals.
    """
    y = np.asarray(labels, dtype=bool)
    delta = roc_auc(y, probs_a) - roc_auc(y, probs_b)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        a, b = roc_auc(y[idx], probs_a[idx]), roc_auc(y[idx], probs_b[idx])
        if not (math.isnan(a) or math.isnan(b)):
            diffs.append(a - b)
    if not diffs:
        return {"delta": delta, "low": float("nan"), "high": float("nan")}
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return {"delta": float(delta), "low": float(low), "high": float(high)}
