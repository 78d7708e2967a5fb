"""Per-task evaluation: AUC, log loss, calibration, slices, oracle AUC, paired bootstrap comparisons.

Models are scored on one split of a snapshot (by default the holdout: the newest days, which training
never saw). Two models scored on the same rows can be compared with a paired bootstrap of the AUC
difference, which is what the promotion gate uses.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from mtl_core.config import TaskSpec
from mtl_core.errors import MtlError
from mtl_core.features import Examples, build_examples
from mtl_core.metrics import roc_auc, task_metrics
from mtl_core.train import LoadedModel, load_model


class EvaluationError(MtlError):
    pass


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


def _slices(examples: Examples, rows: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {}
    masks = {
        "new_users": examples.new_user[rows],
        "returning_users": ~examples.new_user[rows],
    }
    has_item = np.array([v is not None for v in examples.raw["item"][rows]], dtype=bool)
    if has_item.any():
        masks["cold_start_items"] = examples.cold_item[rows] & has_item
        masks["warm_items"] = ~examples.cold_item[rows] & has_item
    for name, mask in masks.items():
        if mask.sum() > 0:
            out[name] = {"auc": roc_auc(labels[mask], probs[mask]), "n": int(mask.sum())}
    return out


def score_tasks(
    model: LoadedModel,
    examples: Examples,
    tasks: list[TaskSpec],
    split: str = "holdout",
    truth_engine: Engine | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metrics per task on ``split``, and the raw probabilities per task (for paired comparisons)."""
    all_rows = np.flatnonzero(examples.split == split)
    probs_all = model.predict(examples, all_rows)
    results: dict[str, Any] = {}
    raw: dict[str, np.ndarray] = {}
    lookup = np.full(len(examples), -1, dtype=np.int64)
    lookup[all_rows] = np.arange(len(all_rows))
    for task in tasks:
        if task.name not in examples.task_names or task.name not in model.task_names:
            continue
        t = examples.task_names.index(task.name)
        rows = examples.task_rows(t, split)
        if len(rows) == 0:
            continue
        probs = probs_all[lookup[rows], model.task_names.index(task.name)]
        labels = examples.labels[rows, t]
        metrics = task_metrics(labels, probs)
        metrics["slices"] = _slices(examples, rows, labels, probs)
        truth = oracle_probabilities(truth_engine, task, examples, rows)
        metrics["oracle_auc"] = roc_auc(labels, truth) if truth is not None else None
        results[task.name] = metrics
        raw[task.name] = probs
    return results, raw


def oracle_probabilities(
    engine: Engine | None, task: TaskSpec, examples: Examples, rows: np.ndarray
) -> np.ndarray | None:
    """The shop's true probability behind each row's label (simulated data only; None without truth tables)."""
    if engine is None:
        return None
    from mtl_core.simulate import true_probabilities

    truth = true_probabilities(
        engine, task.sample_space, task.label, examples.event_id[rows], examples.click_event_id[rows],
        examples.raw["user"][rows], examples.time[rows],
    )  # fmt: skip
    if truth is None or np.isnan(truth).any():
        return None
    return truth


def evaluate_model(
    model_dir: str | Path,
    snapshot_dir: str | Path,
    split: str = "holdout",
    truth_engine: Engine | None = None,
    examples: Examples | None = None,
) -> dict[str, Any]:
    """``{"tasks": {task: {"auc", "logloss", "ece", "positive_rate", "n", "oracle_auc", "slices"}}}``."""
    model = load_model(model_dir)
    tasks = list(model.settings.tasks)
    if examples is None:
        examples = build_examples(snapshot_dir, model.settings.features, tasks)
    if not (examples.split == split).any():
        raise EvaluationError(f"snapshot {snapshot_dir} has no {split} examples")
    results, _ = score_tasks(model, examples, tasks, split, truth_engine)
    return {"tasks": results, "split": split, "snapshot": str(snapshot_dir), "model": str(model_dir)}


def compare_models(
    challenger_dir: str | Path,
    champion_dir: str | Path,
    snapshot_dir: str | Path,
    split: str = "holdout",
    n_boot: int = 200,
    truth_engine: Engine | None = None,
) -> dict[str, Any]:
    """Both models on the same rows: per-task metrics of each and the paired bootstrap of the AUC difference."""
    challenger, champion = load_model(challenger_dir), load_model(champion_dir)
    tasks = list(challenger.settings.tasks)
    examples = build_examples(snapshot_dir, challenger.settings.features, tasks)
    ours, our_probs = score_tasks(challenger, examples, tasks, split, truth_engine)
    theirs, their_probs = score_tasks(champion, examples, tasks, split, None)
    comparison = {}
    for name, metrics in ours.items():
        if name not in their_probs:
            comparison[name] = {"challenger": metrics, "champion": None, "auc_delta": None}
            continue
        t = examples.task_names.index(name)
        labels = examples.labels[examples.task_rows(t, split), t]
        comparison[name] = {
            "challenger": metrics,
            "champion": theirs[name],
            "auc_delta": paired_bootstrap_auc(labels, our_probs[name], their_probs[name], n_boot=n_boot),
        }
    return {"tasks": comparison, "split": split}
