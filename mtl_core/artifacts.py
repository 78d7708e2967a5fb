"""The typed artifacts the stages of a run hand each other, in the spirit of TFX's artifacts.

Each is a frozen dataclass that saves itself under its ``uri`` and loads itself back from it. Airflow's XCom
carries only the uri, the ``mtl`` command and the DAG call the same pipeline steps with them, and an on-call
engineer can load any of them in a shell to see what a run saw. One run's artifacts live under
``<data dir>/runs/<run key>/``; a snapshot lives under ``<data dir>/snapshots/`` since runs share them.

    Snapshot -> ExampleSet -> TrainedModel -> Comparison -> RegisteredModel -> GateDecision

Every artifact names the one it was made from, so the chain is lineage: from a decision back to the rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd

from mtl_core.data.extract import read_manifest
from mtl_core.errors import MtlError
from mtl_core.jsonable import to_jsonable

VALIDATION_RESULT = Path("validation") / "result.json"
# The drift between the window's training part and its newest week, written by the validate step.
DRIFT_REPORT = Path("validation") / "drift.json"


class ArtifactError(MtlError):
    """An artifact is missing or is not what the step expected; the message names the file."""


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary sibling, then rename: a reader never sees half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(to_jsonable(payload), indent=2) + "\n")
    os.replace(staging, path)


def _read_json(path: Path, kind: str) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"{path} is not a saved {kind} (the file is missing)")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not a saved {kind}: {exc}") from exc
    if payload.get("artifact") != kind:
        raise ArtifactError(f"{path} holds a {payload.get('artifact', 'unknown record')}, not a {kind}")
    return payload


@dataclass(frozen=True)
class _JsonRecord:
    """An artifact that is one JSON file (its uri); subclasses name their kind."""

    KIND: ClassVar[str] = ""
    uri: str

    def save(self) -> Self:
        payload = {"artifact": self.KIND, **dataclasses.asdict(self)}
        _write_json(Path(self.uri), payload)
        return self

    @classmethod
    def load(cls, uri: str | Path) -> Self:
        payload = _read_json(Path(uri), cls.KIND)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in payload.items() if k in names} | {"uri": str(uri)})


@dataclass(frozen=True)
class Snapshot:
    """A data interval of the warehouse as Parquet (``data.extract`` writes it; its manifest is the record)."""

    uri: str
    interval: dict[str, str]
    content_hash: str
    rows: dict[str, int]

    @classmethod
    def load(cls, uri: str | Path) -> Snapshot:
        manifest = read_manifest(uri)
        rows = {name: int(meta["rows"]) for name, meta in manifest["tables"].items()}
        return cls(uri=str(uri), interval=dict(manifest["interval"]), content_hash=manifest["content_hash"], rows=rows)

    @property
    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.uri)

    def validation_summary(self) -> dict[str, Any] | None:
        """What the validate step found (``None`` before it ran)."""
        path = Path(self.uri) / VALIDATION_RESULT
        return json.loads(path.read_text())["summary"] if path.is_file() else None

    def drift_report(self) -> dict[str, Any] | None:
        """The validate step's drift report (``quality.drift.snapshot_drift``); ``None`` before it ran."""
        path = Path(self.uri) / DRIFT_REPORT
        return json.loads(path.read_text()) if path.is_file() else None


@dataclass(frozen=True)
class ExampleSet:
    """The examples of every task built once from a snapshot: Parquet, read by training and evaluation."""

    uri: str
    snapshot: str
    snapshot_hash: str
    task_names: list[str]
    counts: dict[str, dict[str, int]]
    texts: int

    RECORD: ClassVar[str] = "example_set.json"

    def save(self) -> Self:
        _write_json(Path(self.uri) / self.RECORD, {"artifact": "example_set", **dataclasses.asdict(self)})
        return self

    @classmethod
    def load(cls, uri: str | Path) -> ExampleSet:
        payload = _read_json(Path(uri) / cls.RECORD, "example_set")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in payload.items() if k in names} | {"uri": str(uri)})

    def examples(self):
        """The ``learn.examples.Examples`` themselves."""
        from mtl_core.learn.examples import load_examples

        return load_examples(self.uri)


@dataclass(frozen=True)
class TrainedModel(_JsonRecord):
    """A model directory and how it came to be: the challenger a run trained, or the champion it fetched."""

    KIND: ClassVar[str] = "trained_model"
    model_dir: str
    task_names: list[str]
    # The registered version, for a model fetched from the registry (the champion); None for a new one.
    version: int | None = None
    # What the challenger was trained on and beside: its example set and the champion of the run.
    examples: str | None = None
    champion: str | None = None
    warm_started: bool = False
    valid_metrics: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    best_step: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    # pipeline.single_task_baselines: each task's single-task model, trained beside the joint one.
    single_task_models: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Comparison(_JsonRecord):
    """The challenger and the champion scored on the same holdout rows: what the gate decides on.

    ``tasks`` is ``{task: {"challenger": metrics, "champion": metrics | None, "auc_delta": interval | None}}``;
    the challenger's own holdout scores are in ``predictions`` (Parquet), for the ROC and calibration plots.
    """

    KIND: ClassVar[str] = "comparison"
    challenger: str
    champion: str | None
    examples: str
    split: str
    tasks: dict[str, Any]
    predictions: str

    def as_gate_input(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "split": self.split}

    @staticmethod
    def save_predictions(path: Path, labels: dict[str, np.ndarray], probs: dict[str, np.ndarray]) -> None:
        parts = [pd.DataFrame({"task": task, "label": labels[task], "probability": probs[task]}) for task in probs]
        columns = {"task": pd.Series(dtype=str), "label": pd.Series(dtype=float), "probability": pd.Series(dtype=float)}
        frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns)
        frame.to_parquet(path, index=False)

    def holdout_predictions(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(labels, probabilities) of the challenger per task on the compared rows."""
        frame = pd.read_parquet(self.predictions)
        groups = {task: rows for task, rows in frame.groupby("task", sort=False)}
        return (
            {task: rows["label"].to_numpy() for task, rows in groups.items()},
            {task: rows["probability"].to_numpy() for task, rows in groups.items()},
        )


@dataclass(frozen=True)
class RegisteredModel(_JsonRecord):
    """The challenger as a version of the registered model, with its MLflow run."""

    KIND: ClassVar[str] = "registered_model"
    model_name: str
    version: int
    run_id: str
    comparison: str


@dataclass(frozen=True)
class GateDecision(_JsonRecord):
    """The gate's verdict on a registered version (also written onto the version in the registry)."""

    KIND: ClassVar[str] = "gate_decision"
    registered: str
    model_name: str
    version: int
    run_id: str
    verdict: str
    reason: str
    champion_version: int | None
    per_task: dict[str, Any]
    rule: dict[str, Any]
    decided_at: str

    @property
    def promote(self) -> bool:
        return self.verdict == "promote"
