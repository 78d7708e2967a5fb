"""The paired DeLong test: AUCs match the Mann-Whitney AUC, the variance matches the O(n^2) definition, the SE
agrees with a paired bootstrap, and the interval covers a zero difference at about its nominal rate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mtl_core.judge.delong import auc_and_placements, paired_auc_difference
from mtl_core.judge.metrics import roc_auc


def correlated_scores(rng: np.random.Generator, n: int, rate: float = 0.3, shift_a: float = 0.8, shift_b: float = 0.8):
    """Labels and two models' scores that share most of their noise, as two versions of one model would."""
    y = rng.random(n) < rate
    shared = rng.normal(size=n)
    a = shift_a * y + shared + 0.5 * rng.normal(size=n)
    b = shift_b * y + shared + 0.5 * rng.normal(size=n)
    return y, a, b


def brute_force_delong(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(auc_a, auc_b, var of the difference) straight from DeLong's definition, over all positive-negative pairs."""
    y = np.asarray(labels, dtype=bool)
    components = []
    for scores in (a, b):
        pos, neg = scores[y][:, None], scores[~y][None, :]
        psi = (pos > neg) + 0.5 * (pos == neg)
        components.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    (auc_a, v10_a, v01_a), (auc_b, v10_b, v01_b) = components
    s10 = np.cov(np.vstack([v10_a, v10_b]))
    s01 = np.cov(np.vstack([v01_a, v01_b]))
    contrast = np.array([1.0, -1.0])
    variance = contrast @ s10 @ contrast / y.sum() + contrast @ s01 @ contrast / (~y).sum()
    return float(auc_a), float(auc_b), float(variance)


def test_aucs_equal_the_mann_whitney_auc_with_ties():
    rng = np.random.default_rng(1)
    y = rng.random(3000) < 0.2
    a = np.round(rng.random(3000) + 0.3 * y, 1)  # coarse rounding: many ties, also across classes
    b = rng.integers(0, 5, 3000).astype(float)
    result = paired_auc_difference(y.astype(int), a, b)
    assert result["auc_a"] == pytest.approx(roc_auc(y, a), abs=1e-12)
    assert result["auc_b"] == pytest.approx(roc_auc(y, b), abs=1e-12)
    assert result["delta"] == pytest.approx(roc_auc(y, a) - roc_auc(y, b), abs=1e-12)
    assert result["n"] == 3000 and result["positives"] == int(y.sum())
    assert auc_and_placements(y, a)[0] == pytest.approx(roc_auc(y, a), abs=1e-12)


def test_variance_matches_brute_force_delong_with_ties():
    rng = np.random.default_rng(2)
    y = rng.random(200) < 0.35
    a = np.round(rng.normal(size=200) + 0.7 * y, 1)
    b = np.round(0.6 * a + rng.normal(size=200), 1)
    auc_a, auc_b, variance = brute_force_delong(y, a, b)
    result = paired_auc_difference(y, a, b)
    assert result["auc_a"] == pytest.approx(auc_a, abs=1e-12)
    assert result["auc_b"] == pytest.approx(auc_b, abs=1e-12)
    assert result["se"] ** 2 == pytest.approx(variance, abs=1e-10)
    z = (result["high"] - result["delta"]) / result["se"]
    assert z == pytest.approx(1.959964, abs=1e-5)
    assert result["low"] == pytest.approx(result["delta"] - z * result["se"])


def test_se_agrees_with_a_paired_bootstrap():
    rng = np.random.default_rng(3)
    y, a, b = correlated_scores(rng, 5000, shift_b=0.7)
    result = paired_auc_difference(y, a, b)
    diffs = []
    for _ in range(400):
        idx = rng.integers(0, len(y), len(y))
        diffs.append(roc_auc(y[idx], a[idx]) - roc_auc(y[idx], b[idx]))
    bootstrap_sd = float(np.std(diffs, ddof=1))
    assert result["se"] == pytest.approx(bootstrap_sd, rel=0.2)


def test_interval_covers_a_zero_difference_at_about_the_nominal_rate():
    rng = np.random.default_rng(4)
    draws = 300
    covered = 0
    for _ in range(draws):
        y, a, b = correlated_scores(rng, 400)  # same score distribution for both models: equal true AUC
        result = paired_auc_difference(y, a, b)
        covered += result["low"] <= 0 <= result["high"]
    assert 0.90 <= covered / draws <= 0.99


def test_single_class_gives_nan_without_raising():
    scores = np.linspace(0, 1, 10)
    for labels in (np.zeros(10, dtype=int), np.ones(10, dtype=bool)):
        result = paired_auc_difference(labels, scores, scores[::-1])
        for key in ("delta", "se", "low", "high", "auc_a", "auc_b"):
            assert math.isnan(result[key]), key
        assert result["n"] == 10


def test_mismatched_lengths_raise_naming_the_lengths():
    with pytest.raises(ValueError, match="10.*9"):
        paired_auc_difference(np.arange(10) % 2, np.zeros(10), np.zeros(9))
    with pytest.raises(ValueError, match="10.*11"):
        paired_auc_difference(np.arange(10) % 2, np.zeros(11), np.zeros(10))
