"""MLflow runs: one run per DAG run (found again by its run key), and everything a run is logged with.

Params are the whole configuration (redacted), metrics are per task (challenger, champion, single-task
baselines, training curves), the snapshot is the run's dataset input (its content hash is the lineage),
and the ROC and calibration plots are artifacts. Must not import training, Airflow or the gate.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

import mtl_core
from mtl_core.config import Settings, redact
from mtl_core.jsonable import to_jsonable
from mtl_core.registry.plots import plot_roc_and_calibration
from mtl_core.registry.store import (
    METRIC_NAMES,
    RegistryError,
    default_artifact_location,
    mlflow_errors,
    quote,
)

RUN_KEY_TAG = "mtl.run_key"
_MAX_PARAM_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_MAX_DIGEST_LENGTH = 32  # the store allows 36 characters; the full hash goes into a tag and the profile


# --------------------------------------------------------------------------------------------------
# Runs.
def run_for_key(
    client: MlflowClient,
    experiment_name: str,
    run_key: str,
    run_name: str | None = None,
    artifact_location: str | None = None,
) -> str:
    """The run of one DAG run, found again by its ``mtl.run_key`` tag so a retried task adds no second run."""
    with mlflow_errors(f"finding or creating the MLflow run for {run_key!r} in experiment {experiment_name!r}"):
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            location = artifact_location or default_artifact_location(client.tracking_uri)
            experiment_id = client.create_experiment(experiment_name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
            if experiment.lifecycle_stage == "deleted":  # deleted in the UI; a name cannot be reused while so
                client.restore_experiment(experiment_id)
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{RUN_KEY_TAG}` = {quote(run_key)}",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        if found:
            return found[0].info.run_id
        run = client.create_run(experiment_id, tags={RUN_KEY_TAG: run_key}, run_name=run_name)
        return run.info.run_id


def finish_run(client: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run ended (FINISHED or FAILED); runs created through the client stay RUNNING otherwise."""
    with mlflow_errors(f"ending run {run_id}"):
        client.set_terminated(run_id, status=status)


def git_commit() -> str:
    """The commit of the code that trained (``unknown`` outside a git checkout, e.g. in a wheel install)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(mtl_core.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten_settings(settings: Settings) -> dict[str, str]:
    """``{"train.lr": "0.002", "tasks.ctr.floor": "0.6", ...}``: every setting as an MLflow param.

    Lists of named items (the tasks) are keyed by name, so a param's meaning does not depend on its
    position; other lists are JSON. Values are cut to MLflow's length limit.
    """
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
            for item in value:
                walk(f"{prefix}.{item['name']}", {k: v for k, v in item.items() if k != "name"})
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            text = redact(text)
            if len(text) > _MAX_PARAM_LENGTH:
                text = text[: _MAX_PARAM_LENGTH - 14] + "...[truncated]"
            flat[prefix] = text

    walk("", settings.model_dump(mode="json"))
    return flat


def _task_metrics(metrics: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``{task: {auc, ...}}`` from that form itself or from ``evaluate_model``'s ``{"tasks": {...}}``."""
    if not metrics:
        return {}
    if "tasks" in metrics and isinstance(metrics["tasks"], Mapping):
        metrics = metrics["tasks"]
    return {task: dict(values) for task, values in metrics.items() if isinstance(values, Mapping)}


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _metric_entities(prefix: str, metrics: dict[str, dict[str, Any]], now: int, step: int = 0) -> list[Metric]:
    out = []
    for task, values in metrics.items():
        # lift_*: joint minus single-task AUC (pipeline.single_task_baselines), logged under single/<task>/
        for name in (*METRIC_NAMES, "positive_rate", "n", "oracle_auc", "lift_delta", "lift_low", "lift_high"):
            if (value := _finite(values.get(name))) is not None:
                out.append(Metric(f"{prefix}{task}/{name}", value, now, step))
        for slice_name, slice_values in (values.get("slices") or {}).items():
            if (value := _finite(slice_values.get("auc"))) is not None:
                out.append(Metric(f"{prefix}{task}/slice/{slice_name}/auc", value, now, step))
    return out


def _history_entities(history: list[dict[str, Any]], now: int) -> list[Metric]:
    out = []
    for point in history:
        step = int(point["step"])
        if (value := _finite(point.get("criterion"))) is not None:
            out.append(Metric("curve/criterion", value, now, step))
        for task, loss in (point.get("train_loss") or {}).items():
            if (value := _finite(loss)) is not None:
                out.append(Metric(f"curve/train_loss/{task}", value, now, step))
        for task, values in (point.get("valid") or {}).items():
            for name in METRIC_NAMES:
                if (value := _finite(values.get(name))) is not None:
                    out.append(Metric(f"curve/valid/{task}/{name}", value, now, step))
    return out


def _validation_state(summary: Any) -> str:
    if summary is None:
        return "unknown"
    if isinstance(summary, bool):
        return "passed" if summary else "failed"
    for key in ("success", "passed", "ok"):
        if isinstance(summary, Mapping) and isinstance(summary.get(key), bool):
            return "passed" if summary[key] else "failed"
    return "unknown"


def _interval_text(data_interval: Any, manifest: Mapping[str, Any] | None) -> str:
    """ISO 8601 interval notation ``start/end``."""
    if data_interval is None and manifest:
        data_interval = manifest.get("interval")
    if data_interval is None:
        return "unknown"
    if isinstance(data_interval, Mapping):
        return f"{data_interval.get('start')}/{data_interval.get('end')}"
    if isinstance(data_interval, (tuple, list)) and len(data_interval) == 2:
        return "/".join(x.isoformat() if hasattr(x, "isoformat") else str(x) for x in data_interval)
    return str(data_interval)


class _SnapshotDataset(MetaDataset):
    """A snapshot as MLflow lineage: its path as source, its content hash as digest, row counts as profile."""

    def __init__(self, source, name: str, digest: str, profile: dict[str, Any]):
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        config = super().to_dict()
        config["profile"] = json.dumps(self._profile)
        return config


def snapshot_dataset(manifest: Mapping[str, Any], snapshot_dir: str | Path | None = None) -> MetaDataset:
    """The dataset entity of a snapshot (``data.extract.extract_snapshot``'s manifest)."""
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json

    # Without the directory the warehouse URL it was extracted from is the source: still true lineage.
    where = str(Path(snapshot_dir).resolve()) if snapshot_dir else redact(str(manifest.get("source", "unknown")))
    # "local" by type name: resolving a path by guessing warns that two registered sources claim it.
    source = get_dataset_source_from_json(json.dumps({"uri": where}), source_type="local")
    interval = manifest.get("interval") or {}
    name = f"snapshot_{str(interval.get('start', ''))[:10]}_{str(interval.get('end', ''))[:10]}"
    content_hash = str(manifest.get("content_hash", "unknown"))
    profile = {
        "content_hash": content_hash,
        "interval": interval,
        "rows": {table: meta.get("rows") for table, meta in (manifest.get("tables") or {}).items()},
        "format_version": manifest.get("format_version"),
    }
    return _SnapshotDataset(source, name=name, digest=content_hash[:_MAX_DIGEST_LENGTH], profile=profile)


def log_training(
    client: MlflowClient,
    run_id: str,
    settings: Settings,
    metrics: Mapping[str, Any],
    champion_metrics: Mapping[str, Any] | None = None,
    single_task_metrics: Mapping[str, Any] | None = None,
    history: list[dict[str, Any]] | None = None,
    snapshot_manifest: Mapping[str, Any] | str | Path | None = None,
    validation_summary: Any = None,
    data_interval: Any = None,
    *,
    snapshot_dir: str | Path | None = None,
    predictions: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    drift_report: Mapping[str, Any] | None = None,
) -> None:
    """Log what a reviewer needs to trust the challenger: config, per-task metrics, curves, lineage, plots.

    ``metrics`` are the challenger's per task (``{task: {auc, logloss, ece, ...}}`` or ``evaluate_model``
    output); ``champion_metrics`` the champion's on the same holdout; ``single_task_metrics`` the
    single-task baselines. ``snapshot_manifest`` is the manifest dict or the snapshot directory;
    ``validation_summary`` is ``validate``'s report or its ``summary()`` (``mtl.validation`` follows its
    ``success``); ``predictions`` (``{task: (labels, probabilities)}``) adds ROC and calibration plots;
    ``drift_report`` (``quality.drift.snapshot_drift``) adds each feature's PSI and the label rates as metrics.
    Safe to repeat on a retried task: params already there are skipped (a changed value is an error, since
    one run must describe one configuration).
    """
    with mlflow_errors(f"logging training to run {run_id}"):
        if isinstance(snapshot_manifest, (str, Path)):
            from mtl_core.data.extract import read_manifest

            snapshot_dir = snapshot_dir or snapshot_manifest
            snapshot_manifest = read_manifest(snapshot_manifest)
        if callable(getattr(validation_summary, "summary", None)):  # a validate.ValidationReport itself
            validation_summary = validation_summary.summary()
        run = client.get_run(run_id)
        existing = run.data.params
        params = flatten_settings(settings)
        conflicts = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if conflicts:
            raise RegistryError(
                f"run {run_id} already holds other values for setting(s) {', '.join(conflicts[:5])}: a retried "
                "step must use the configuration of the first attempt (or start a new DAG run)"
            )
        new_params = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new_params), 100):
            client.log_batch(run_id, params=new_params[i : i + 100])

        now = int(time.time() * 1000)
        entities = _metric_entities("", _task_metrics(metrics), now)
        entities += _metric_entities("champion/", _task_metrics(champion_metrics), now)
        entities += _metric_entities("single/", _task_metrics(single_task_metrics), now)
        entities += _history_entities(history or [], now)
        for i in range(0, len(entities), 1000):
            client.log_batch(run_id, metrics=entities[i : i + 1000])

        manifest = dict(snapshot_manifest) if snapshot_manifest else None
        tags = {
            "mtl.git_commit": git_commit(),
            "mtl.data_interval": _interval_text(data_interval, manifest),
            "mtl.snapshot_hash": str(manifest.get("content_hash", "unknown")) if manifest else "unknown",
            "mtl.validation": _validation_state(validation_summary),
            "mtl.tasks": ",".join(_task_metrics(metrics)) or ",".join(t.name for t in settings.tasks),
        }
        # A repeated call that lacks some inputs must not overwrite what an earlier call knew with "unknown".
        tags = {k: v for k, v in tags.items() if v != "unknown" or k not in run.data.tags}
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if manifest:
            entity = DatasetEntity(**snapshot_dataset(manifest, snapshot_dir).to_dict())
            context = InputTag(key="mlflow.data.context", value="training")  # what mlflow.log_input tags
            # The same dataset logged again (a retried task) stays one input of the run.
            client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=[context])])
        config = json.loads(redact(settings.model_dump_json()))
        client.log_dict(run_id, config, "config/settings.json")
        if validation_summary is not None:
            client.log_dict(run_id, to_jsonable(validation_summary), "validation/summary.json")
        if drift_report is not None:
            _log_drift(client, run_id, drift_report, now)
        if predictions:
            with tempfile.TemporaryDirectory() as tmp:
                labels = {task: pair[0] for task, pair in predictions.items()}
                probs = {task: pair[1] for task, pair in predictions.items()}
                plot_roc_and_calibration(labels, probs, tmp)
                client.log_artifacts(run_id, tmp, "plots")


def _log_drift(client: MlflowClient, run_id: str, report: Mapping[str, Any], now: int) -> None:
    """The drift report as an artifact, each feature's PSI and each label rate as a metric, and a tag naming
    what drifted (searchable: ``tags."mtl.drift" != "none"``)."""
    client.log_dict(run_id, to_jsonable(dict(report)), "validation/drift.json")
    values = {f"drift/psi/{f['name']}": f["psi"] for f in report.get("features", [])}
    for label in report.get("labels", []):
        for side in ("reference", "current"):
            values[f"drift/label/{label['name']}/{side}"] = label[side]
    if not report.get("skipped"):
        values["drift/max_psi"] = report["max_psi"]
    metrics = [Metric(k, float(v), now, 0) for k, v in values.items() if _finite(v) is not None]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    drifted = "skipped" if report.get("skipped") else ",".join(report.get("drifted", [])) or "none"
    client.set_tag(run_id, "mtl.drift", drifted)
