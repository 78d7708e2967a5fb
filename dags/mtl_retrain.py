"""Weekly retraining of the multi-task recommender, promoted only when every task beats the champion.

Wiring only: every task body calls one function of ``mtl_core.pipeline`` (the `mtl` command runs the
same functions), XCom carries paths and small dicts, and heavy imports happen inside the tasks so the
scheduler parses this file fast.

Settings come from ``mtl_core.config`` (defaults < $MTL_CONFIG YAML < MTL_* environment); a run's
``conf={"settings": {...}}`` overrides them for that run. The warehouse and MLflow URIs come from the
Airflow Connections ``mtl_warehouse`` and ``mtl_mlflow`` when they exist, else from the settings.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from datetime import timedelta

import pendulum
from airflow.sdk import BaseNotifier, CronDataIntervalTimetable, dag, get_current_context, task

from mtl_core.config import Settings, load_settings

log = logging.getLogger(__name__)
SETTINGS = load_settings()
RETRYING = {
    "retries": SETTINGS.pipeline.retries,
    "retry_delay": timedelta(seconds=SETTINGS.pipeline.retry_delay_seconds),
    "retry_exponential_backoff": True,
}


def run_settings() -> Settings:
    """This run's settings: the files and environment, the run's conf overrides, Airflow Connections."""
    from mtl_core.config import merge_overrides

    context = get_current_context()
    settings = merge_overrides(load_settings(), (context["dag_run"].conf or {}).get("settings", {}))
    updates = {}
    for conn_id, field in (("mtl_warehouse", "warehouse_url"), ("mtl_mlflow", "mlflow_tracking_uri")):
        uri = _connection_uri(conn_id)
        if uri:
            updates[field] = uri
    return settings.model_copy(update=updates) if updates else settings


def _connection_uri(conn_id: str) -> str | None:
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return Connection.get(conn_id).get_uri()
    except AirflowNotFoundException:
        return None


class OnCallNotifier(BaseNotifier):
    """One clear message per failed task (DAG, run, task, reason, next step): to the log and a webhook."""

    def notify(self, context) -> None:
        from mtl_core.pipeline import oncall_message

        ti = context["ti"]
        snapshot = "?"
        try:
            snapshot = (ti.xcom_pull(task_ids="extract") or {}).get("snapshot", "?")
        except Exception:  # the notifier must never fail itself
            log.debug("no snapshot in XCom", exc_info=True)
        reason = str(context.get("exception") or "unknown (see the task log)")
        message = oncall_message(context["dag"].dag_id, context["run_id"], ti.task_id, reason, SETTINGS, snapshot)
        log.error(message)
        if SETTINGS.pipeline.webhook_url:
            request = urllib.request.Request(
                SETTINGS.pipeline.webhook_url,
                data=json.dumps({"text": message}).encode(),
                headers={"Content-Type": "application/json"},
            )
            try:
                urllib.request.urlopen(request, timeout=5).close()
            except OSError as exc:
                log.error("could not deliver the on-call message to the webhook: %s", exc)


@dag(
    dag_id="mtl_retrain",
    schedule=CronDataIntervalTimetable(SETTINGS.pipeline.schedule, timezone="UTC"),
    start_date=pendulum.parse(SETTINGS.pipeline.start_date, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"on_failure_callback": OnCallNotifier()},
    tags=["mtl", "retraining"],
    doc_md=__doc__,
)
def mtl_retrain():
    @task(**RETRYING)
    def extract(data_interval_end=None) -> dict:
        from mtl_core import pipeline

        return pipeline.extract(run_settings(), data_interval_end)

    @task
    def validate(snapshot: dict) -> dict:
        from mtl_core import pipeline
        from mtl_core.validate import ValidationFailed

        try:
            return pipeline.validate(run_settings(), snapshot["snapshot"])
        except ValidationFailed as failed:
            get_current_context()["ti"].xcom_push(key="validation", value=failed.summary)
            raise

    @task
    def build_features(snapshot: dict, validation: dict) -> dict:
        from mtl_core import pipeline

        return pipeline.build_features(run_settings(), snapshot["snapshot"])

    @task
    def train_challenger(snapshot: dict, features: dict, run_id=None) -> dict:
        from mtl_core import pipeline

        settings = run_settings()
        champion = pipeline.fetch_champion(settings, run_id)
        return {**pipeline.train_challenger(settings, snapshot["snapshot"], run_id, champion), "champion_dir": champion}

    @task
    def evaluate(snapshot: dict, challenger: dict, run_id=None) -> dict:
        from mtl_core import pipeline

        return pipeline.evaluate(
            run_settings(), snapshot["snapshot"], run_id, challenger["model_dir"], challenger["champion_dir"]
        )

    @task(**RETRYING)
    def register(snapshot: dict, validation: dict, challenger: dict, evaluation: dict, run_id=None) -> dict:
        from mtl_core import pipeline

        return pipeline.register(
            run_settings(), run_id, snapshot["snapshot"], challenger["model_dir"], evaluation["comparison"],
            validation, snapshot["interval"],
        )  # fmt: skip

    @task.branch
    def gate(registered: dict, evaluation: dict) -> str:
        from mtl_core import pipeline

        decision = pipeline.gate(run_settings(), registered["version"], evaluation["comparison"])
        get_current_context()["ti"].xcom_push(key="decision", value=decision)
        return "promote" if decision["verdict"] == "promote" else "record_rejection"

    @task
    def promote(registered: dict) -> dict:
        from mtl_core import pipeline

        decision = get_current_context()["ti"].xcom_pull(task_ids="gate", key="decision")
        return pipeline.promote(run_settings(), registered["version"], decision["reason"], registered["run_id"])

    @task
    def record_rejection(registered: dict) -> dict:
        from mtl_core import pipeline

        decision = get_current_context()["ti"].xcom_pull(task_ids="gate", key="decision")
        return pipeline.record_rejection(
            run_settings(), registered["version"], decision["reason"], registered["run_id"]
        )

    snapshot = extract()
    validation = validate(snapshot)
    features = build_features(snapshot, validation)
    challenger = train_challenger(snapshot, features)
    evaluation = evaluate(snapshot, challenger)
    registered = register(snapshot, validation, challenger, evaluation)
    gate(registered, evaluation) >> [promote(registered), record_rejection(registered)]


mtl_retrain()
