"""The offline reference: what a model of the same configuration, trained from scratch on ALL history up to
a run's training cut-off, scores on that run's holdout.

It is the yardstick of continual retraining. A shipped champion far below it has forgotten what still holds
or not learnt what changed; one at its level loses nothing by being retrained week by week on a window.
The reference is independent of the DAG run (it needs only the warehouse and the interval's end), so it
can be trained beside the runs.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select

from mtl_core.config import Settings


def first_event(engine) -> datetime:
    """The warehouse's earliest behaviour event: where "all history" starts."""
    from mtl_core.data.warehouse import behavior_events

    with engine.connect() as connection:
        first = connection.execute(select(func.min(behavior_events.c.ts))).scalar_one()
    if first is None:
        raise ValueError("the warehouse holds no behaviour events, so there is no history to train a reference on")
    return first if isinstance(first, datetime) else datetime.fromisoformat(str(first))


def train_reference(settings: Settings, engine, interval_end: datetime | str, out: Path) -> Path:
    """Train (once: an existing one is reused) the reference of the run whose interval ends at ``interval_end``.

    The examples are built from the first event's day to the interval's end; their newest
    ``features.holdout_days`` are the run's holdout, which training leaves out exactly as the run's did.
    Uniform weights, random initialisation, the settings' model and training configuration.
    """
    from mtl_core.data.extract import DAYS_DIR, extract_snapshot
    from mtl_core.data.pseudonyms import pseudonymiser_for
    from mtl_core.learn.examples import build_examples
    from mtl_core.learn.training import train_model

    model_dir = out / "model"
    if (model_dir / "settings.json").exists():
        return model_dir
    start = first_event(engine).replace(hour=0, minute=0, second=0, microsecond=0)
    end = datetime.fromisoformat(str(interval_end)) if not isinstance(interval_end, datetime) else interval_end
    snapshot = out / "snapshot"
    # The pipeline's day store: the reference reads the same days as the runs, so most are read already.
    days = settings.snapshots_dir / DAYS_DIR
    extract_snapshot(engine, start.isoformat(), end.isoformat(), snapshot, pseudonymiser_for(settings), days_dir=days)
    examples = build_examples(snapshot, settings.features, settings.tasks)
    building = out / "building"
    shutil.rmtree(building, ignore_errors=True)
    train_model(examples, building, settings, progress=False, source=snapshot)
    building.rename(model_dir)  # complete or absent: a killed training leaves no half model behind
    shutil.rmtree(snapshot, ignore_errors=True)
    return model_dir


@dataclass(frozen=True)
class ReferenceGap:
    """Per task: the reference's AUC on the run's holdout, and the champion's difference from it."""

    tasks: dict[str, dict[str, Any]]


def compare_with_reference(reference_dir: Path, champion_dir: Path | None, examples) -> ReferenceGap:
    """The reference and the champion on the same holdout rows of ``examples`` (the run's own examples)."""
    from mtl_core.judge.delong import paired_auc_difference
    from mtl_core.judge.metrics import roc_auc
    from mtl_core.learn.checkpoint import load_model

    reference = load_model(reference_dir)
    champion = load_model(champion_dir) if champion_dir else None
    holdout = np.flatnonzero(examples.split == "holdout")
    ours = reference.predict(examples, holdout)
    theirs = champion.predict(examples, holdout) if champion else None
    lookup = np.full(len(examples), -1, dtype=np.int64)
    lookup[holdout] = np.arange(len(holdout))
    tasks: dict[str, dict[str, Any]] = {}
    for t, task in enumerate(examples.task_names):
        rows = examples.task_rows(t, "holdout")
        if len(rows) == 0 or task not in reference.task_names:
            continue
        labels = examples.labels[rows, t]
        ref = ours[lookup[rows], reference.task_names.index(task)]
        entry: dict[str, Any] = {"auc": float(roc_auc(labels, ref))}
        if theirs is not None and task in champion.task_names:
            diff = paired_auc_difference(labels, theirs[lookup[rows], champion.task_names.index(task)], ref)
            entry["champion_auc"] = float(diff["auc_a"])
            entry["champion_minus_reference"] = {k: float(diff[k]) for k in ("delta", "se", "low", "high")}
        tasks[task] = entry
    return ReferenceGap(tasks=tasks)


def main(argv: list[str] | None = None) -> None:
    """``python -m mtl_core.judge.reference END [END ...]``: train the references of these interval ends.

    Settings come from the environment as everywhere (``MTL_DATA_DIR`` ...); each reference lands in
    ``<data_dir>/references/<end>/model``. ``mtl demo`` runs this beside the DAG, on the second core.
    """
    import sys

    from mtl_core.config import load_settings
    from mtl_core.data.warehouse import make_engine

    settings = load_settings()
    engine = make_engine(settings.resolved_warehouse_url)
    for end in argv if argv is not None else sys.argv[1:]:
        train_reference(settings, engine, end, reference_dir(settings, end))


def reference_dir(settings: Settings, interval_end: str) -> Path:
    return settings.data_dir / "references" / str(interval_end)[:10]


if __name__ == "__main__":
    main()
