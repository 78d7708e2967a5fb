"""ROC and calibration plots per task, drawn on matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np


# --------------------------------------------------------------------------------------------------
# Plots.
def _roc_curve(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold (ties form one step, as AUC counts them)."""
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-p, kind="stable")
    y, p = y[order], p[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(p) != 0), len(p) - 1]
    tp = np.cumsum(y)[last_of_run]
    fp = (last_of_run + 1) - tp
    positives, negatives = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fp / negatives], np.r_[0.0, tp / positives]


def _calibration_bins(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """Mean prediction and observed rate per equal-mass bin (the bins of ``metrics.expected_calibration_error``)."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    chunks = [c for c in np.array_split(np.argsort(p, kind="stable"), min(bins, max(len(p), 1))) if len(c)]
    return np.array([p[c].mean() for c in chunks]), np.array([y[c].mean() for c in chunks])


def plot_roc_and_calibration(
    labels_by_task: Mapping[str, np.ndarray], probs_by_task: Mapping[str, np.ndarray], out_dir: str | Path
) -> list[Path]:
    """``roc_<task>.png`` and ``calibration_<task>.png`` per task; returns the files written.

    Uses matplotlib's object API on the Agg canvas, so no display and no global backend switch is needed
    (pyplot's global state is what breaks plotting inside Airflow workers).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mtl_core.judge.metrics import expected_calibration_error, roc_auc

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for task, labels in labels_by_task.items():
        labels = np.asarray(labels, dtype=np.float64)
        probs = np.asarray(probs_by_task[task], dtype=np.float64)
        if len(labels) == 0:
            continue
        fpr, tpr = _roc_curve(labels, probs)
        fig = Figure(figsize=(4.5, 4.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(fpr, tpr, label=f"AUC {roc_auc(labels, probs):.4f}")
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC: {task} (n={len(labels)})")
        ax.legend(loc="lower right")
        fig.tight_layout()
        path = out / f"roc_{task}.png"
        fig.savefig(path, dpi=90)
        written.append(path)

        mean_pred, observed = _calibration_bins(labels, probs)
        fig = Figure(figsize=(4.5, 4.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        top = float(max(mean_pred.max(initial=0), observed.max(initial=0), 1e-3)) * 1.05
        ax.plot([0, top], [0, top], linestyle="--", color="grey", linewidth=0.8)
        ax.plot(mean_pred, observed, marker="o", label=f"ECE {expected_calibration_error(labels, probs):.4f}")
        ax.set(
            xlabel="mean predicted probability",
            ylabel="observed rate",
            title=f"Calibration: {task}",
            xlim=(0, top),
            ylim=(0, top),
        )
        ax.legend(loc="upper left")
        fig.tight_layout()
        path = out / f"calibration_{task}.png"
        fig.savefig(path, dpi=90)
        written.append(path)
    return written
