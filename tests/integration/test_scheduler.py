"""The DAG under a real Airflow 3: api-server, scheduler, dag-processor (and a Celery worker) as processes.

Once with the LocalExecutor, once with the CeleryExecutor on the local Redis; the metadata on a PostgreSQL
database of the test's own. The DAG is parsed with a schedule two minutes wide and, as Airflow creates it,
paused. The test triggers ``mtl_retrain`` for a given logical date (the on-call's replay of a past week),
which waits, queued, while the DAG is paused; then unpauses the DAG. The scheduler itself now creates the
run of the two minutes that just ended, and with ``max_active_runs=1`` the two queued runs must run one
after the other, never together. The test waits for both to succeed and checks the registry. Every process
is stopped by its PID (its process group), the database dropped.

The shop's days run up to tomorrow: the scheduled run's interval ends now, whatever the date.
"""

from __future__ import annotations

import contextlib
import json
import random
import secrets
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from conftest import tiny_training_env
from sqlalchemy import create_engine, text
from stack import BIN, Service, airflow, airflow_env, free_port, http_ok, pg_database, wait_until

from mtl_core.config import load_settings
from mtl_core.data import warehouse as wh
from mtl_core.data.shop import ShopSpec, write_shop

DAG_ID = "mtl_retrain"
TODAY = datetime.now(UTC).date()
SHOP = ShopSpec(users=2000, items=400, days=52, start=TODAY - timedelta(days=50), seed=11)
# The end of the interval the on-call replays: a past day inside the shop.
TRIGGERED_DATE = TODAY - timedelta(days=4)
SCHEDULE = "*/2 * * * *"
CONFIG = """
train: {{epochs: 2, steps_per_epoch: 40}}
pipeline: {{retries: 0, policy: scratch, lookback_days: 35, schedule: "{schedule}", start_date: "{start}",
            train_queue: {train_queue}}}
tasks:
  - {{name: ctr, sample_space: feed, label: clicked, floor: 0.5}}
  - {{name: cvr, sample_space: feed, label: purchased, given: clicked, weight: 0.5, floor: 0.5}}
  - {{name: ad_ctr, sample_space: ads, label: ad_clicked, weight: 0.5, floor: 0.5}}
  - {{name: churn, sample_space: users, label: churned, weight: 0.25, floor: 0.5}}
"""


@contextlib.contextmanager
def airflow_stack(executor: str, root, tiny_bert_path):
    """A migrated metadata DB, the shop, and the Airflow components of ``executor`` running; its handles."""
    logs = root / "logs"
    logs.mkdir(parents=True)
    data_dir = root / "data"
    train_queue = f"mtltest_train_{uuid.uuid4().hex[:8]}"
    default_queue = f"mtltest_{uuid.uuid4().hex[:8]}"  # other runs on this Redis never take these tasks
    config = root / "mtl.yaml"

    # Airflow creates no task instance of a task whose start_date is after the run's logical date.
    start = (TRIGGERED_DATE - timedelta(days=1)).isoformat()
    config.write_text(CONFIG.format(schedule=SCHEDULE, start=start, train_queue=train_queue))
    admin_password = secrets.token_urlsafe(16)
    passwords = root / "passwords.json"  # the simple auth manager's users, as a team's secret store would hold
    passwords.write_text(json.dumps({"admin": admin_password}))
    with pg_database("airflow") as metadata_url, contextlib.ExitStack() as stop:
        api_port = free_port()
        env = airflow_env(
            data_dir / "airflow",
            metadata_url,
            **tiny_training_env(data_dir, tiny_bert_path),
            MTL_CONFIG=str(config),
            AIRFLOW__CORE__EXECUTOR=executor,
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{api_port}/execution/",
            AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{api_port}",
            AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_urlsafe(32),
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="admin:admin",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(passwords),
            AIRFLOW__OPERATORS__DEFAULT_QUEUE=default_queue,
            # Parse the DAG folder and its file every few seconds, so a changed schedule is seen at once.
            AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
            AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="5",
            AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="2",
        )
        for budget in ("MTL_TRAIN__EPOCHS", "MTL_TRAIN__STEPS_PER_EPOCH"):  # the config file's budget
            env.pop(budget)
        if executor == "CeleryExecutor":
            # The train task in 2 DistributedDataParallel processes, spawned from inside a Celery worker's task.
            env["MTL_TRAIN__NPROC"] = "2"
            env["AIRFLOW__CELERY__BROKER_URL"] = f"redis://127.0.0.1:6379/{random.randint(1, 15)}"
            env["AIRFLOW__CELERY__RESULT_BACKEND"] = "db+" + metadata_url
        settings = load_settings(environ=env)
        engine = wh.make_engine(settings.resolved_warehouse_url)
        write_shop(engine, SHOP)
        engine.dispose()
        airflow(env, "db", "migrate")

        services: list[Service] = []

        def start(name: str, *args: str) -> Service:
            service = Service(name, [str(BIN / "airflow"), *args], env, logs)
            services.append(service)
            stop.callback(service.stop)
            return service

        start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(api_port), "--workers", "1")
        start("scheduler", "scheduler")
        start("dag-processor", "dag-processor")
        if executor == "CeleryExecutor":
            # One worker takes both queues here; a team binds the training queue to GPU workers instead.
            queues = f"{default_queue},{train_queue}"
            start("celery-worker", "celery", "worker", "--concurrency", "1", "--queues", queues)
        wait_until(
            lambda: http_ok(f"http://127.0.0.1:{api_port}/api/v2/monitor/health"), "the api-server", 120, services
        )
        metadata = create_engine(metadata_url)
        stop.callback(metadata.dispose)
        yield {
            "env": env,
            "metadata": metadata,
            "services": services,
            "settings": settings,
            "api": f"http://127.0.0.1:{api_port}",
            "admin_password": admin_password,
            "train_queue": train_queue,
        }


def _api(stack, method: str, path: str, body: dict, token: str | None = None) -> dict:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(stack["api"] + path, json.dumps(body).encode(), headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{method} {path}: {exc.code} {exc.read()[:2000]!r}") from None


def _trigger(stack, run_id: str, logical_date: datetime, interval: tuple[datetime, datetime]) -> dict:
    """Trigger a run of the given interval through the REST API, logged in as the admin user."""
    token = _api(stack, "POST", "/auth/token", {"username": "admin", "password": stack["admin_password"]})
    body = {
        "dag_run_id": run_id,
        "logical_date": logical_date.isoformat(),
        "data_interval_start": interval[0].isoformat(),
        "data_interval_end": interval[1].isoformat(),
    }
    return _api(stack, "POST", f"/api/v2/dags/{DAG_ID}/dagRuns", body, token["access_token"])


def _dag_runs(metadata) -> list[dict]:
    query = text(
        "SELECT run_id, run_type, state, logical_date, data_interval_end, start_date, end_date "
        "FROM dag_run WHERE dag_id = :dag ORDER BY COALESCE(start_date, queued_at)"
    )
    with metadata.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query, {"dag": DAG_ID})]


def _task_states(metadata, run_id: str) -> dict[str, tuple[str, str]]:
    query = text("SELECT task_id, state, queue FROM task_instance WHERE dag_id = :dag AND run_id = :run")
    with metadata.connect() as conn:
        return {row.task_id: (row.state, row.queue) for row in conn.execute(query, {"dag": DAG_ID, "run": run_id})}


def _finished(metadata, run_id: str):
    """The run's state once it is final (a failed run fails the wait at once, with its tasks' states)."""
    run = next((r for r in _dag_runs(metadata) if r["run_id"] == run_id), None)
    if run and run["state"] == "failed":
        raise AssertionError(f"run {run_id} failed: {_task_states(metadata, run_id)}")
    return run if run and run["state"] == "success" else None


def _registry(settings) -> dict[str, int | None]:
    from mtl_core.registry.aliases import current_alias
    from mtl_core.registry.store import configure

    client = configure(settings.resolved_mlflow_tracking_uri)
    name = settings.pipeline.model_name
    versions = client.search_model_versions(f"name = '{name}'")
    reasons = [v.tags.get("gate.reason") for v in versions]
    return {"champion": current_alias(client, name, "champion"), "versions": len(versions), "reasons": reasons}


def _serialized_schedule(metadata) -> str | None:
    with metadata.connect() as conn:
        row = conn.execute(text("SELECT timetable_summary FROM dag WHERE dag_id = :dag"), {"dag": DAG_ID}).first()
    return row.timetable_summary if row else None


@pytest.mark.parametrize("executor", ["LocalExecutor", "CeleryExecutor"])
def test_the_scheduler_runs_a_triggered_run_then_creates_and_completes_the_next_on_schedule(
    executor, tmp_path, tiny_bert_path
):
    began = time.monotonic()
    with airflow_stack(executor, tmp_path, tiny_bert_path) as stack:
        env, metadata, services = stack["env"], stack["metadata"], stack["services"]
        wait_until(
            lambda: _serialized_schedule(metadata) == SCHEDULE, "the dag-processor to parse the DAG", 180, services
        )

        # A run for a given logical date, triggered through the REST API while the DAG is paused: it waits,
        # queued. (Airflow 3 infers a manual run's interval from the moment it is triggered, not from its
        # logical date, so replaying a past week means giving the interval, which only the API takes.)
        end = datetime.combine(TRIGGERED_DATE, datetime.min.time(), UTC)
        _trigger(stack, "triggered", logical_date=end, interval=(end - timedelta(days=7), end))
        time.sleep(5)
        assert [(r["run_id"], r["state"]) for r in _dag_runs(metadata)] == [("triggered", "queued")]

        # Unpaused, the scheduler adds the run of the two minutes that just ended; one runs at a time.
        airflow(env, "dags", "unpause", DAG_ID)
        triggered = wait_until(lambda: _finished(metadata, "triggered"), "the triggered run", 600, services, every=2)
        triggered_at = time.monotonic()

        def first_scheduled():
            runs = [r for r in _dag_runs(metadata) if r["run_type"] == "scheduled"]
            return _finished(metadata, runs[0]["run_id"]) if runs else None

        scheduled = wait_until(first_scheduled, "the scheduler's own run to complete", 600, services, every=2)

        assert triggered["data_interval_end"] == end
        assert datetime.now(UTC) - timedelta(minutes=15) < scheduled["data_interval_end"] < datetime.now(UTC)
        for run in (triggered, scheduled):
            states = _task_states(metadata, run["run_id"])
            assert all(state in ("success", "skipped") for state, _ in states.values()), states
            assert states["register"][0] == "success" and states["gate"][0] == "success", states
            assert states["train_challenger"][1] == stack["train_queue"], "the train task ignored its queue"
            assert states["extract"][1] != stack["train_queue"]
        registry = _registry(stack["settings"])
        assert registry["versions"] == 2 and registry["champion"] in (1, 2), registry  # the first one promoted

        # max_active_runs=1: two runs were queued together, yet none started before the other had ended.
        runs = sorted((r for r in _dag_runs(metadata) if r["start_date"] is not None), key=lambda r: r["start_date"])
        for earlier, later in zip(runs, runs[1:], strict=False):
            assert earlier["end_date"] is not None and later["start_date"] >= earlier["end_date"], (earlier, later)
        timings = {
            "executor": executor,
            "triggered_run_s": round((triggered["end_date"] - triggered["start_date"]).total_seconds(), 1),
            "scheduled_run_s": round((scheduled["end_date"] - scheduled["start_date"]).total_seconds(), 1),
            "until_triggered_done_s": round(triggered_at - began, 1),
            "whole_test_s": round(time.monotonic() - began, 1),
        }
        print(f"scheduler timings: {timings}")
    for service in services:
        assert not service.alive(), f"{service.name} (pid {service.pid}) outlived the test"


def test_the_shop_covers_the_scheduled_intervals():
    """The scheduled run's window ends now: the shop's days must reach past today (else it trains on nothing)."""
    assert SHOP.start + timedelta(days=SHOP.days) > TODAY + timedelta(days=1)
    assert TRIGGERED_DATE > SHOP.start + timedelta(days=35)  # a whole lookback window before it
