"""Metrics shared by the simulator's oracle report and model evaluation."""

from __future__ import annotations

import numpy as np
import pandas as pd


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN if one class is absent."""
    y = np.asarray(labels, dtype=bool)
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = pd.Series(np.asarray(scores, dtype=np.float64)).rank(method="average").to_numpy()
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Mean |observed rate - mean prediction| over equal-mass bins, weighted by bin size.

    Equal-mass (quantile) bins, because with click rates of a few percent nearly all predictions fall
    into the first of equal-width bins and the measure would say nothing.
    """
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    if len(y) == 0:
        return float("nan")
    order = np.argsort(p, kind="stable")
    error = 0.0
    for chunk in np.array_split(order, min(bins, len(order))):
        if len(chunk):
            error += len(chunk) * abs(y[chunk].mean() - p[chunk].mean())
    return float(error / len(y))


def task_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    y = np.asarray(labels)
    return {
        "auc": roc_auc(y, probs),
        "logloss": log_loss(y, probs),
        "ece": expected_calibration_error(y, probs),
        "positive_rate": float(y.mean()) if len(y) else float("nan"),
        "n": int(len(y)),
    }


def fit_logistic(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Weights of a logistic regression on ``features`` plus an intercept (the last weight), by L-BFGS.

    Meant for a handful of features (blending or probing model scores), so no regularisation.
    """
    import torch

    x = torch.tensor(np.column_stack([features, np.ones(len(features))]), dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.float64)
    weights = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weights, y)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weights.detach().numpy()
