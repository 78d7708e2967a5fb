"""The embedded Airflow: the real retraining DAG run in this process, as ``airflow dags test`` runs it.

The one module of the library that imports Airflow, and only inside its functions: ``mtl run-dag``, the
demo and the DAG tests replay a run on a laptop with the same DAG file the scheduler parses.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

from mtl_core.config import Settings
from mtl_core.errors import MtlError
from mtl_core.locks import LockTimeout, file_lock

# The repository's dags/ folder (the package is installed in development mode from the repository).
DAGS_FOLDER = Path(__file__).resolve().parents[1] / "dags"
DAG_ID = "mtl_retrain"


def _airflow_env(settings: Settings) -> dict[str, str]:
    """The embedded Airflow: home, metadata DB and DAGs folder under the data dir / repo (set before import)."""
    home = (settings.data_dir / "airflow").resolve()
    home.mkdir(parents=True, exist_ok=True)
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": os.environ.get(
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{home / 'airflow.db'}"
        ),
        "MTL_DATA_DIR": str(settings.data_dir.resolve()),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def prepare_airflow(settings: Settings) -> None:
    """Point this process's Airflow at the embedded installation and migrate its metadata DB when new.

    Must run before anything imports airflow: Airflow reads its configuration once, on first import.
    """
    import subprocess

    env = _airflow_env(settings)
    os.environ.update(env)
    home = Path(env["AIRFLOW_HOME"])
    migrated = home / "airflow.db.migrated"
    if not env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite") or migrated.exists():
        return
    # Two first runs at once must not both migrate, nor one run on a database the other is still creating:
    # the first migrates under the lock, the second waits and finds the marker.
    with file_lock(home / "migrate.lock", what="airflow db migrate"):
        if migrated.exists():
            return
        migrate = subprocess.run(
            [sys.executable, "-m", "airflow", "db", "migrate"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
        )
        if migrate.returncode != 0:
            raise MtlError(f"airflow db migrate failed: {migrate.stderr.strip().splitlines()[-1:]}")
        migrated.touch()


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout (Airflow's task logs) to stderr for a while, at the descriptor level."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run_dag_in_process(
    settings: Settings, logical_date: str, conf: dict[str, Any] | None = None, quiet: bool = False
) -> dict[str, str]:
    """Run the real DAG for the interval ending at ``logical_date`` in this process, as `airflow dags test`.

    Returns each task's final state. ``quiet`` sends Airflow's task logs to stderr instead of stdout.
    """
    if quiet:
        with _stdout_to_stderr():
            return run_dag_in_process(settings, logical_date, conf)
    try:
        date.fromisoformat(logical_date[:10])
    except ValueError:
        raise MtlError(
            f"--logical-date {logical_date!r} is not a date; use YYYY-MM-DD (the end of the interval to replay)"
        ) from None
    prepare_airflow(settings)
    import pendulum
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    if bag.import_errors:
        raise MtlError(f"the DAGs folder has import errors: {bag.import_errors}")
    dag = bag.get_dag(DAG_ID)
    when = pendulum.parse(logical_date, tz="UTC")
    # dag.test() replaces an existing run of the same logical date: a second `mtl run-dag` for a date whose
    # run is still going would delete the first one's run under it (it then dies on a foreign key). One
    # run per date at a time; runs of different dates may overlap (promotion is compare-and-set).
    lock = Path(os.environ["AIRFLOW_HOME"]) / "runs" / f"{DAG_ID}-{when:%Y%m%dT%H%M%S}.lock"
    try:
        with file_lock(lock, timeout=0, what=f"the run of {logical_date}"):
            run = dag.test(logical_date=when, run_conf=conf or None)
    except LockTimeout:
        holder = lock.read_text().strip() if lock.exists() else "another process"
        raise MtlError(
            f"a run of {DAG_ID} for logical date {when.isoformat()} is already in progress in this installation "
            f"({holder}); wait for it to finish, then replay the date if needed"
        ) from None
    return {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
