"""Weekly retraining of the multi-task recommender, promoted only when the holdout shows it better, no task worse.

Wiring only: every task body calls one function of ``mtl_core.pipeline`` (the `mtl` command runs the
same functions), XCom carries the uri of one artifact (``mtl_core.artifacts``) per task, and heavy imports
happen inside the tasks so the scheduler parses this file fast.

Settings come from ``mtl_core.config`` (defaults < $MTL_CONFIG YAML < MTL_* environment); a run's
``conf={"settings": {...}}`` overrides them for that run. The warehouse and MLflow URIs come from the
Airflow Connections ``mtl_warehouse`` (postgres or sqlite) and ``mtl_mlflow`` (http) when they exist, else
from the settings (``mtl_mlflow``'s login and password become MLflow's own credentials, never part of the URI);
the secret key of the user-id pseudonyms from the password of the Connection ``mtl_pseudonym_key`` when it exists.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from datetime import timedelta

import pendulum
from airflow.sdk import BaseNotifier, CronDataIntervalTimetable, dag, get_current_context, task

from mtl_core.config import PrivacySettings, Settings, load_settings

log = logging.getLogger(__name__)
SETTINGS = load_settings()
RETRYING = {
    "retries": SETTINGS.pipeline.retries,
    "retry_delay": timedelta(seconds=SETTINGS.pipeline.retry_delay_seconds),
    "retry_exponential_backoff": True,
}


def run_settings() -> Settings:
    """This run's settings: the files and environment, the run's conf overrides, Airflow Connections."""
    from airflow.sdk.exceptions import AirflowFailException

    from mtl_core.config import ConfigError, connection_url, merge_overrides, mlflow_credentials

    context = get_current_context()
    try:
        settings = merge_overrides(load_settings(), (context["dag_run"].conf or {}).get("settings", {}))
    except ConfigError as exc:  # a wrong conf stays wrong: fail at once, no retries
        raise AirflowFailException(str(exc)) from None
    updates = {}
    for conn_id, field, purpose in (
        ("mtl_warehouse", "warehouse_url", "warehouse"),
        ("mtl_mlflow", "mlflow_tracking_uri", "mlflow"),
    ):
        c = _connection(conn_id)
        if c is None:
            continue
        fields = (c.conn_type, c.host, c.port, c.login, c.password, c.schema)
        try:
            updates[field] = connection_url(conn_id, purpose, *fields)
        except ConfigError as exc:
            raise AirflowFailException(str(exc)) from None
        if purpose == "mlflow":  # MLflow reads its server's credentials from its own variables, never the URI
            os.environ.update(mlflow_credentials(c.login, c.password))
    settings = settings.model_copy(update=updates) if updates else settings
    # The user-id pseudonym key is a secret: the connection's password field, masked by Airflow in logs.
    key_connection = _connection("mtl_pseudonym_key")
    if key_connection is not None and key_connection.password:
        settings.privacy = PrivacySettings(pseudonym_key=key_connection.password)
    return settings


def _connection(conn_id: str):
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return Connection.get(conn_id)
    except AirflowNotFoundException:
        return None


class OnCallNotifier(BaseNotifier):
    """One clear message per failed task (DAG, run, task, reason, next step): to the log and a webhook."""

    def notify(self, context) -> None:
        from mtl_core.pipeline import oncall_message

        ti = context["ti"]
        snapshot = "?"
        try:
            snapshot = ti.xcom_pull(task_ids="extract") or "?"
        except Exception:  # the notifier must never fail itself
            log.debug("no snapshot in XCom", exc_info=True)
        reason = str(context.get("exception") or "unknown (see the task log)")
        message = oncall_message(context["dag"].dag_id, context["run_id"], ti.task_id, reason, SETTINGS, snapshot)
        log.error(message)
        webhook = SETTINGS.pipeline.webhook_url.get_secret_value()
        if webhook:
            request = urllib.request.Request(
                webhook,
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
    # Each task loads its upstream artifact from the uri in XCom, runs one pipeline step, returns its own uri.
    @task(**RETRYING)
    def extract(data_interval_end=None) -> str:
        from airflow.sdk.exceptions import AirflowFailException

        from mtl_core import pipeline
        from mtl_core.data.stored_values import StoredValueError

        try:
            return pipeline.extract(run_settings(), data_interval_end).uri
        except StoredValueError as exc:  # bad rows stay bad: fail at once, no retries
            raise AirflowFailException(str(exc)) from exc

    @task
    def validate(snapshot: str) -> str:
        from mtl_core import pipeline
        from mtl_core.artifacts import Snapshot
        from mtl_core.quality import ValidationFailed

        try:
            return pipeline.validate(run_settings(), Snapshot.load(snapshot)).uri
        except ValidationFailed as failed:
            get_current_context()["ti"].xcom_push(key="validation", value=failed.summary)
            raise

    @task
    def build_features(snapshot: str, run_id=None) -> str:
        from mtl_core import pipeline
        from mtl_core.artifacts import Snapshot

        return pipeline.build_features(run_settings(), Snapshot.load(snapshot), run_id).uri

    # A retry resumes from the checkpoint the failed attempt left. The queue lets a team bind training to
    # GPU (or big) Celery workers; every other task runs on the default queue.
    @task(queue=SETTINGS.pipeline.train_queue, **RETRYING)
    def train_challenger(example_set: str, run_id=None) -> str:
        from mtl_core import pipeline
        from mtl_core.artifacts import ExampleSet

        return pipeline.train_challenger(run_settings(), ExampleSet.load(example_set), run_id).uri

    @task
    def evaluate(challenger: str) -> str:
        from mtl_core import pipeline
        from mtl_core.artifacts import TrainedModel

        return pipeline.evaluate(run_settings(), TrainedModel.load(challenger)).uri

    @task(**RETRYING)
    def register(comparison: str, run_id=None) -> str:
        from mtl_core import pipeline
        from mtl_core.artifacts import Comparison

        return pipeline.register(run_settings(), run_id, Comparison.load(comparison)).uri

    @task.branch
    def gate(registered: str) -> str:
        from mtl_core import pipeline
        from mtl_core.artifacts import RegisteredModel
        from mtl_core.config import gate_overrides

        settings = run_settings()
        overrides = gate_overrides(load_settings(), settings)  # only when pipeline.allow_gate_overrides is on
        decision = pipeline.gate(settings, RegisteredModel.load(registered), overrides)
        get_current_context()["ti"].xcom_push(key="decision", value=decision.uri)
        return "promote" if decision.promote else "record_rejection"

    @task
    def promote() -> dict:
        from mtl_core import pipeline
        from mtl_core.artifacts import GateDecision

        decision = get_current_context()["ti"].xcom_pull(task_ids="gate", key="decision")
        return pipeline.promote(run_settings(), GateDecision.load(decision))

    @task
    def record_rejection() -> dict:
        from mtl_core import pipeline
        from mtl_core.artifacts import GateDecision

        decision = get_current_context()["ti"].xcom_pull(task_ids="gate", key="decision")
        return pipeline.record_rejection(run_settings(), GateDecision.load(decision))

    # After a promotion: the new champion's features into the online store (servers switch to it once they
    # are complete), then, if serve.candidates names a file, the next day's candidate pairs scored.
    @task(**RETRYING)
    def publish_features() -> dict:
        from mtl_core import pipeline
        from mtl_core.artifacts import GateDecision

        decision = get_current_context()["ti"].xcom_pull(task_ids="gate", key="decision")
        return pipeline.publish_features(run_settings(), GateDecision.load(decision))

    @task
    def score_candidates(published: dict, data_interval_end=None) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from mtl_core import pipeline

        settings = run_settings()
        if pipeline.candidates_file(settings, data_interval_end) is None:
            raise AirflowSkipException("serve.candidates is empty: no candidate pairs to score")
        if not published.get("published"):
            raise AirflowSkipException(f"no new champion is served: {published.get('reason')}")
        return pipeline.score_candidates(settings, data_interval_end)

    snapshot = validate(extract())
    registered = register(evaluate(train_challenger(build_features(snapshot))))
    promoted = promote()
    gate(registered) >> [promoted, record_rejection()]
    published = publish_features()
    promoted >> published
    # Only when serve.candidates names a file (read when the DAG is parsed, like the train queue): a task
    # that would skip on every run is not scheduled at all.
    if SETTINGS.serve.candidates:
        score_candidates(published)


mtl_retrain()


@dag(
    dag_id="mtl_serving_monitor",
    schedule="@hourly",
    start_date=pendulum.parse(SETTINGS.pipeline.start_date, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"on_failure_callback": OnCallNotifier()},
    tags=["mtl", "serving"],
    doc_md="Hourly: the champion's served scores per task against its holdout's (PSI, drift.score_psi_threshold); "
    "a shift fails the task, and the on-call message says which tasks moved and what to check.",
)
def mtl_serving_monitor():
    @task
    def check_served_scores() -> dict:
        from mtl_core import pipeline

        return pipeline.monitor_served_scores(run_settings())

    check_served_scores()


mtl_serving_monitor()
