"""The production profile end to end: PostgreSQL for every store, an MLflow server over HTTP, Connections.

The test makes three PostgreSQL databases of its own (the warehouse, Airflow's metadata, MLflow's backend),
starts a real ``mlflow server`` on a loopback port with its artifact proxy, and stores the Airflow
Connections ``mtl_warehouse``, ``mtl_mlflow`` and ``mtl_pseudonym_key`` in the metadata database, each with a
password. No setting names the warehouse or MLflow: the DAG finds them through the Connections or not at all.
Each run is ``mtl run-dag`` in a process of its own (the on-call's replay command; Airflow reads its
configuration once per process). Then: a promotion, a rejection and a validation stop, asserted as on SQLite,
and no password in any log, param, tag or artifact. Every process is stopped by its PID, every database
dropped.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from datetime import date, timedelta

import pytest
from conftest import tiny_training_env
from stack import BIN, Service, airflow, airflow_env, mlflow_server, pg_database
from support import leaks, renumber_users

from mtl_core.data import warehouse as wh
from mtl_core.data.corruption import corrupt_interval
from mtl_core.data.shop import ShopSpec, write_shop

START = date(2026, 1, 5)
WEEK = [START + timedelta(days=7 * k) for k in range(8)]
MODEL = "mtl_recommender"
CONFIG = """
train: {epochs: 2, steps_per_epoch: 40}
pipeline: {retries: 0, policy: scratch, lookback_days: 35}
tasks:
  - {name: ctr, sample_space: feed, label: clicked, floor: 0.5}
  - {name: cvr, sample_space: feed, label: purchased, given: clicked, weight: 0.5, floor: 0.5}
  - {name: ad_ctr, sample_space: ads, label: ad_clicked, weight: 0.5, floor: 0.5}
  - {name: churn, sample_space: users, label: churned, weight: 0.25, floor: 0.5}
"""
# Distinctive, so finding one anywhere means it leaked. The local server trusts loopback and MLflow's has no
# auth, so the passwords are sent and ignored: what matters is where else they turn up.
WAREHOUSE_PASSWORD = f"wh-pw-{uuid.uuid4().hex}"
MLFLOW_PASSWORD = f"ml-pw-{uuid.uuid4().hex}"
PSEUDONYM_KEY = f"pseudonym-key-{uuid.uuid4().hex}"
SECRETS = (WAREHOUSE_PASSWORD, MLFLOW_PASSWORD, PSEUDONYM_KEY)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_bert_path):
    root = tmp_path_factory.mktemp("production")
    logs = root / "logs"
    logs.mkdir()
    with contextlib.ExitStack() as stop:
        warehouse_url = stop.enter_context(pg_database("warehouse"))
        metadata_url = stop.enter_context(pg_database("airflow"))
        mlflow_backend = stop.enter_context(pg_database("mlflow"))
        artifacts = root / "mlflow-artifacts"
        tracking_uri, server = stop.enter_context(mlflow_server(mlflow_backend, artifacts, logs))

        engine = wh.make_engine(warehouse_url)
        stop.callback(engine.dispose)
        write_shop(engine, ShopSpec(users=2000, items=400, days=49, start=START, seed=5))
        renumber_users(engine)

        data_dir = root / "data"
        (root / "mtl.yaml").write_text(CONFIG)
        env = airflow_env(
            data_dir / "airflow",  # where `mtl run-dag` keeps its Airflow home
            metadata_url,
            **tiny_training_env(data_dir, tiny_bert_path),
            MTL_CONFIG=str(root / "mtl.yaml"),
        )
        env.pop("MTL_TRAIN__EPOCHS")  # the config file's budget
        env.pop("MTL_TRAIN__STEPS_PER_EPOCH")
        airflow(env, "db", "migrate")
        host, port, database = _address(warehouse_url)
        airflow(env, "connections", "add", "mtl_warehouse", "--conn-type", "postgres", "--conn-host", host,
                "--conn-port", port, "--conn-login", "postgres", "--conn-password", WAREHOUSE_PASSWORD,
                "--conn-schema", database)  # fmt: skip
        ml_host, ml_port = tracking_uri.removeprefix("http://").split(":")
        airflow(env, "connections", "add", "mtl_mlflow", "--conn-type", "http", "--conn-host", ml_host,
                "--conn-port", ml_port, "--conn-login", "mtl", "--conn-password", MLFLOW_PASSWORD)  # fmt: skip
        airflow(env, "connections", "add", "mtl_pseudonym_key", "--conn-type", "generic",
                "--conn-password", PSEUDONYM_KEY)  # fmt: skip
        yield {
            "env": env,
            "engine": engine,
            "tracking_uri": tracking_uri,
            "server": server,
            "artifacts": artifacts,
            "data_dir": data_dir,
            "root": root,
            "logs": logs,
        }


def _address(url: str) -> tuple[str, str, str]:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return parsed.host, str(parsed.port or 5432), parsed.database


def _run(stack, week_end: date, conf: dict | None = None) -> dict[str, str]:
    """``mtl run-dag`` for the week in its own process; each task's state. Its output is kept for the leak check."""
    argv = [str(BIN / "mtl"), "run-dag", "--logical-date", week_end.isoformat(), "--json"]
    if conf:
        argv += ["--conf", json.dumps(conf)]
    done = subprocess.run(argv, env=stack["env"], capture_output=True, text=True, timeout=900, cwd=stack["root"])
    (stack["logs"] / f"run-dag-{week_end}.out").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    try:
        return json.loads(done.stdout)["tasks"]
    except (json.JSONDecodeError, KeyError):
        raise AssertionError(
            f"mtl run-dag printed no task states ({done.returncode}):\n{done.stderr[-4000:]}"
        ) from None


def _client(stack):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=stack["tracking_uri"], registry_uri=stack["tracking_uri"])


def _registry(stack) -> dict[str, int | None]:
    from mtl_core.registry.aliases import current_alias

    client = _client(stack)
    aliases = {alias: current_alias(client, MODEL, alias) for alias in ("champion", "challenger", "previous")}
    return {**aliases, "versions": len(client.search_model_versions(f"name = '{MODEL}'"))}


def _verdict(stack, version: int) -> dict[str, str]:
    tags = _client(stack).get_model_version(MODEL, str(version)).tags
    return {k: v for k, v in tags.items() if k.startswith("gate.")}


@pytest.fixture(scope="module")
def first_run(stack):
    states = _run(stack, WEEK[5])
    return {"states": states, "after": _registry(stack)}


@pytest.fixture(scope="module")
def rejected_run(stack, first_run):
    # A challenger that barely moves from its random start: worse than the champion on the same holdout.
    states = _run(stack, WEEK[6], {"settings": {"train": {"epochs": 1, "steps_per_epoch": 2, "lr": 1e-6}}})
    after = _registry(stack)
    return {"states": states, "after": after, "verdict": _verdict(stack, after["challenger"])}


@pytest.fixture(scope="module")
def corrupted_run(stack, rejected_run):
    before = _registry(stack)
    corrupt_interval(stack["engine"], WEEK[7] - timedelta(days=7), WEEK[7], kinds=("null_ids", "bad_event_types"))
    states = _run(stack, WEEK[7])
    return {"states": states, "before": before, "after": _registry(stack)}


def test_a_first_model_is_promoted_through_the_mlflow_server_with_artifacts_behind_its_proxy(stack, first_run):
    states = first_run["states"]
    assert states["promote"] == "success" and states["record_rejection"] == "skipped", states
    assert first_run["after"]["champion"] == 1 and first_run["after"]["versions"] == 1
    assert _verdict(stack, 1)["gate.verdict"] == "promote"
    client = _client(stack)
    run_id = client.get_model_version(MODEL, "1").run_id
    run = client.get_run(run_id)
    # The client never saw a folder: artifacts went through the server, which keeps them in its own store.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    assert {a.path for a in client.list_artifacts(run_id)}, "no artifact listed through the server"
    assert list(stack["artifacts"].rglob("MLmodel")), "the server's artifact store holds no model"
    # The lineage names the warehouse the Connection pointed at, without its password.
    assert run.data.tags.get("mtl.run_key") and "mtl_warehouse_" in json.dumps(run.data.params)


def test_a_worse_challenger_is_not_promoted_and_the_champion_stays(rejected_run):
    states = rejected_run["states"]
    assert states["record_rejection"] == "success" and states["promote"] == "skipped", states
    assert rejected_run["verdict"]["gate.verdict"] in ("reject", "hold"), rejected_run["verdict"]
    assert rejected_run["after"]["champion"] == 1 and rejected_run["after"]["challenger"] == 2


def test_a_corrupted_week_stops_at_validation_and_nothing_is_registered(corrupted_run):
    states = corrupted_run["states"]
    assert states["extract"] == "success" and states["validate"] == "failed", states
    assert all(states[t] == "upstream_failed" for t in ("train_challenger", "register", "gate", "promote"))
    assert corrupted_run["after"]["versions"] == corrupted_run["before"]["versions"]
    assert corrupted_run["after"]["champion"] == 1


def test_no_password_of_a_connection_in_logs_params_tags_or_artifacts(stack, first_run, rejected_run, corrupted_run):
    client = _client(stack)
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiment_ids)
    assert runs
    for run in runs:
        recorded = json.dumps([run.data.params, run.data.tags, run.info.artifact_uri])
        assert not [s for s in SECRETS if s in recorded], run.info.run_id
    for version in client.search_model_versions(f"name = '{MODEL}'"):
        assert not [s for s in SECRETS if s in f"{version.description} {version.tags} {version.source}"]
    # Every file the runs and the servers wrote: the server's artifacts, snapshots, models, examples, and
    # every process's output (under `mtl run-dag` the task logs go to its output, as under `airflow dags test`).
    with stack["engine"].connect() as conn:
        raw = {row[0] for row in conn.execute(wh.users.select().with_only_columns(wh.users.c.user_id))}
    for folder in (stack["artifacts"], stack["data_dir"], stack["logs"]):
        assert leaks(folder, raw, SECRETS) == [], folder
    task_logs = (stack["logs"] / f"run-dag-{WEEK[5]}.out").read_text()
    assert stack["tracking_uri"] in task_logs, "the register task's log does not name the MLflow server it used"


def test_every_process_the_test_started_is_stopped_by_its_pid(stack, corrupted_run):
    server: Service = stack["server"]
    assert server.alive()
    server.stop()
    assert not server.alive()
