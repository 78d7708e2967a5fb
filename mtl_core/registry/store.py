"""The MLflow store: connecting to it, and turning its failures into one clear line.

MLflow writes assume a single writer (SQLite locks under concurrent writers): the DAG calls the registry
from one task at a time, and every call is idempotent so a retried task repeats nothing.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import SQLAlchemyError

from mtl_core.config import redact
from mtl_core.errors import MtlError

MODEL_NAME = "mtl_recommender"
METRIC_NAMES = ("auc", "logloss", "ece")


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
    with mlflow_errors(f"opening the MLflow store at {redact(uri)}"):
        if uri.startswith("sqlite:///") and ":memory:" not in uri:
            Path(uri[len("sqlite:///") :]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        if uri.startswith(("http://", "https://")):
            return MlflowClient(tracking_uri=uri, registry_uri=uri)
        # Creating the client opens the store and creates the schema of a new database, which takes seconds:
        # two first runs at once must not both create it.
        from mtl_core.locks import store_lock

        with store_lock(uri, "mlflow-schema", Path(tempfile.gettempdir())):
            return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _probe_server(uri: str) -> None:
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5)
    except requests.RequestException as exc:
        raise RegistryError(
            f"the MLflow tracking server at {redact(uri)} is unreachable ({exc.__class__.__name__}); is it running "
            "(mlflow server ...) and is MLFLOW_TRACKING_URI / mlflow_tracking_uri right?"
        ) from exc


def default_artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of an embedded SQLite store live beside the database, not in the working directory."""
    if tracking_uri.startswith("sqlite:///") and ":memory:" not in tracking_uri:
        return str(Path(tracking_uri[len("sqlite:///") :]).expanduser().resolve().parent / "mlartifacts")
    return None  # a server decides (its --default-artifact-root)


def quote(value: str) -> str:
    """A string literal of MLflow's search syntax, which has no escapes: the quote the value lacks is used."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise RegistryError(f"run key {value!r} holds both quote characters; MLflow's search syntax cannot match it")
