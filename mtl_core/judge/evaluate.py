"""Per-task evaluation: AUC, log loss, calibration, slices and oracle AUC, and champion-challenger comparisons.

Models are scored on one split of the examples (by default the holdout: the newest days, which training
never saw). Two models scored on the same rows are compared by the AUC difference with DeLong's
variance (``judge.delong``), which is what the promotion gate reads. The examples are built once per
run and passed in; the functions that take a snapshot directory build them for a one-off call
(``mtl evaluate``, tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtl_core.config import TaskSpec
from mtl_core.errors import MtlError
from mtl_core.judge.delong import paired_auc_difference
from mtl_core.judge.metrics import roc_auc, task_metrics
from mtl_core.judge.oracle import Truth, oracle_probabilities
from mtl_core.learn.checkpoint import LoadedModel, load_model
from mtl_core.learn.examples import Examples, build_examples


class EvaluationError(MtlError):
    pass


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
    truth: Truth | None = None,
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
        true_p = oracle_probabilities(truth, task, examples, rows)
        metrics["oracle_auc"] = roc_auc(labels, true_p) if true_p is not None else None
        results[task.name] = metrics
        raw[task.name] = probs
    return results, raw


def _examples_for(model: LoadedModel, snapshot_dir: str | Path | None, examples: Examples | None) -> Examples:
    if examples is not None:
        return examples
    if snapshot_dir is None:
        raise EvaluationError("nothing to score: give a snapshot directory or the examples built from one")
    return build_examples(snapshot_dir, model.settings.features, list(model.settings.tasks))


def evaluate_model(
    model_dir: str | Path,
    snapshot_dir: str | Path | None = None,
    split: str = "holdout",
    truth: Truth | None = None,
    examples: Examples | None = None,
) -> dict[str, Any]:
    """``{"tasks": {task: {"auc", "logloss", "ece", "positive_rate", "n", "oracle_auc", "slices"}}}``."""
    model = load_model(model_dir)
    tasks = list(model.settings.tasks)
    examples = _examples_for(model, snapshot_dir, examples)
    if not (examples.split == split).any():
        raise EvaluationError(f"{snapshot_dir or 'the examples'} has no {split} examples")
    results, _ = score_tasks(model, examples, tasks, split, truth)
    return {"tasks": results, "split": split, "snapshot": str(snapshot_dir), "model": str(model_dir)}


@dataclass(frozen=True)
class Scored:
    """A comparison of the challenger with the champion (or alone), and the challenger's raw scores per task."""

    comparison: dict[str, Any]
    labels: dict[str, np.ndarray]
    probabilities: dict[str, np.ndarray]


def score_against_champion(
    challenger: LoadedModel,
    champion: LoadedModel | None,
    examples: Examples,
    split: str = "holdout",
    truth: Truth | None = None,
) -> Scored:
    """Both models on the same rows: per-task metrics of each and the AUC difference with its standard error.

    Without a champion each task's entry has ``champion: None`` (the gate then applies the floors).
    """
    tasks = list(challenger.settings.tasks)
    ours, our_probs = score_tasks(challenger, examples, tasks, split, truth)
    theirs, their_probs = score_tasks(champion, examples, tasks, split, None) if champion else ({}, {})
    comparison = {}
    labels = {}
    for name, metrics in ours.items():
        t = examples.task_names.index(name)
        labels[name] = examples.labels[examples.task_rows(t, split), t]
        if name not in their_probs:
            comparison[name] = {"challenger": metrics, "champion": None, "auc_delta": None}
            continue
        comparison[name] = {
            "challenger": metrics,
            "champion": theirs[name],
            "auc_delta": paired_auc_difference(labels[name], our_probs[name], their_probs[name]),
        }
    return Scored(comparison={"tasks": comparison, "split": split}, labels=labels, probabilities=our_probs)


def compare_models(
    challenger_dir: str | Path,
    champion_dir: str | Path,
    snapshot_dir: str | Path | None = None,
    split: str = "holdout",
    truth: Truth | None = None,
    examples: Examples | None = None,
) -> dict[str, Any]:
    """``score_against_champion`` for two model directories: the comparison the gate reads."""
    challenger, champion = load_model(challenger_dir), load_model(champion_dir)
    examples = _examples_for(challenger, snapshot_dir, examples)
    return score_against_champion(challenger, champion, examples, split, truth).comparison


def holdout_predictions(
    model_dir: str | Path,
    snapshot_dir: str | Path | None = None,
    split: str = "holdout",
    examples: Examples | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(labels, probabilities) per task of a model on a split: the input of the ROC and calibration plots."""
    model = load_model(model_dir)
    scored = score_against_champion(model, None, _examples_for(model, snapshot_dir, examples), split)
    return scored.labels, scored.probabilities
