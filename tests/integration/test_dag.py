"""The real retraining DAG with dag.test(): Airflow, MLflow and the warehouse on SQLite.

The tests run in order over one installation (Airflow reads its configuration once per process), as the
weeks of a shop go by: a weak first model is promoted, a better one after the drift replaces it, one that
neglects a task is rejected, a corrupted week stops at validation, a failure after registration leaves
the champion alone. dag.test() does not raise when a task fails, so every test asserts task states.
"""

from __future__ import annotations

import json
import os
from datetime import date, timedelta

import pytest
from typer.testing import CliRunner

from mtl_core import warehouse as wh
from mtl_core.cli import DAGS_FOLDER, app, prepare_airflow, run_dag_in_process
from mtl_core.config import load_settings
from mtl_core.simulate import ShopSpec, corrupt_interval, write_shop

START = date(2026, 1, 5)
WEEK = [START + timedelta(days=7 * k) for k in range(11)]  # WEEK[k] is the end of week k
TASKS = ("ctr", "cvr", "ad_ctr", "churn")
CONFIG = """
features: {history_days: 7, valid_days: 4, holdout_days: 7}
train: {epochs: 2}
pipeline: {retries: 0, bootstrap_samples: 50}
tasks:
  - {name: ctr, sample_space: feed, label: clicked, floor: 0.5}
  - {name: cvr, sample_space: feed, label: purchased, given: clicked, weight: 0.5, floor: 0.5}
  - {name: ad_ctr, sample_space: ads, label: ad_clicked, weight: 0.5, floor: 0.5}
  - {name: churn, sample_space: users, label: churned, weight: 0.25, floor: 0.5}
"""


@pytest.fixture(scope="module")
def installation(tmp_path_factory):
    root = tmp_path_factory.mktemp("dag")
    (root / "mtl.yaml").write_text(CONFIG)
    saved = dict(os.environ)
    for variable in ("MTL_WAREHOUSE_URL", "MTL_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        os.environ.pop(variable, None)
    os.environ.update({"MTL_DATA_DIR": str(root), "MTL_CONFIG": str(root / "mtl.yaml")})
    settings = load_settings()
    prepare_airflow(settings)
    engine = wh.make_engine(settings.resolved_warehouse_url)
    write_shop(engine, ShopSpec(users=6000, items=1500, days=70, start=START, seed=3, drift_day=44))
    yield settings, engine
    os.environ.clear()
    os.environ.update(saved)


def _run(settings, week_end: date, conf: dict | None = None) -> dict[str, str]:
    return run_dag_in_process(settings, week_end.isoformat(), conf)


def _client(settings):
    from mtl_core.registry import configure

    return configure(settings.resolved_mlflow_tracking_uri)


def _alias(settings, alias: str) -> int | None:
    from mtl_core.registry import current_alias

    return current_alias(_client(settings), settings.pipeline.model_name, alias)


def _versions(settings) -> int:
    client = _client(settings)
    return len(client.search_model_versions(f"name = '{settings.pipeline.model_name}'"))


def _decision(settings, version: int) -> dict[str, str]:
    tags = _client(settings).get_model_version(settings.pipeline.model_name, str(version)).tags
    return {k: v for k, v in tags.items() if k.startswith("gate.")}


def test_the_dag_folder_has_no_import_errors(installation):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert bag.import_errors == {}
    dag = bag.get_dag("mtl_retrain")
    assert dag.max_active_runs == 1 and not dag.catchup
    assert dag.get_task("extract").retries == 0 and set(dag.task_ids) >= {"validate", "gate", "promote"}


def test_first_run_promotes(installation):
    settings, _ = installation
    # A deliberately weak first model (a few steps), so the next one has room to beat it on every task.
    weak = {"settings": {"train": {"epochs": 1, "steps_per_epoch": 80}}}
    states = _run(settings, WEEK[6], weak)
    assert states["promote"] == "success" and states["record_rejection"] == "skipped", states
    assert all(state in ("success", "skipped") for state in states.values()), states
    assert _alias(settings, "champion") == 1 and _alias(settings, "challenger") == 1
    assert _decision(settings, 1)["gate.verdict"] == "promote"


def test_run_after_drift_promotes_when_every_task_improves(installation):
    settings, _ = installation
    states = _run(settings, WEEK[7])
    assert states["gate"] == "success", states
    decision = _decision(settings, 2)
    comparison = json.loads(sorted((settings.data_dir / "runs").glob("*/comparison.json"),
                                   key=lambda p: p.stat().st_mtime)[-1].read_text())  # fmt: skip
    improved = all(e["challenger"]["auc"] > e["champion"]["auc"] for e in comparison["tasks"].values())
    assert improved, {t: (e["challenger"]["auc"], e["champion"]["auc"]) for t, e in comparison["tasks"].items()}
    assert decision["gate.verdict"] == "promote" and states["promote"] == "success"
    assert _alias(settings, "champion") == 2 and _alias(settings, "previous") == 1


def test_challenger_worse_on_one_task_is_rejected_and_champion_unchanged(installation):
    settings, _ = installation
    # churn's loss weighted 0: its head never trains, so it cannot match the champion's churn AUC.
    tasks = [t.model_dump() | ({"weight": 0.0} if t.name == "churn" else {}) for t in settings.tasks]
    states = _run(settings, WEEK[8], {"settings": {"tasks": tasks}})
    assert states["record_rejection"] == "success" and states["promote"] == "skipped", states
    decision = _decision(settings, 3)
    assert decision["gate.verdict"] == "reject" and "churn" in decision["gate.reason"]
    assert _alias(settings, "champion") == 2 and _alias(settings, "challenger") == 3


def test_corrupted_batch_fails_at_validate_and_nothing_is_registered(installation):
    settings, engine = installation
    versions = _versions(settings)
    corrupt_interval(engine, WEEK[9] - timedelta(days=7), WEEK[9], kinds=("null_ids", "bad_event_types"))
    states = _run(settings, WEEK[9])
    assert states["extract"] == "success" and states["validate"] == "failed", states
    assert all(states[t] == "upstream_failed" for t in ("train_challenger", "register", "gate", "promote"))
    assert _versions(settings) == versions and _alias(settings, "champion") == 2
    result = json.loads(next(settings.snapshots_dir.glob(f"*-{WEEK[9]:%Y%m%d}/validation/result.json")).read_text())
    failing = {(f["table"], f["expectation"]) for f in result["summary"]["failures"]}
    assert ("behavior_events", "expect_column_values_to_be_in_set") in failing


def test_failure_after_registration_leaves_the_champion_unchanged(installation, monkeypatch):
    settings, _ = installation
    import mtl_core.pipeline as pipeline

    def broken_gate(*args, **kwargs):
        raise RuntimeError("registry went away")

    monkeypatch.setattr(pipeline, "gate", broken_gate)
    versions = _versions(settings)
    states = _run(settings, WEEK[8])
    assert states["register"] == "success" and states["gate"] == "failed", states
    assert states["promote"] == "upstream_failed"
    assert _versions(settings) == versions + 1 and _alias(settings, "champion") == 2


def test_retrying_register_does_not_create_a_second_version(installation):
    settings, _ = installation
    import mtl_core.pipeline as pipeline

    # The last DAG run registered version N, then its gate failed; its register task runs again.
    versions = _versions(settings)
    client = _client(settings)
    registered = client.get_model_version(settings.pipeline.model_name, str(versions))
    run_key = client.get_run(registered.run_id).data.tags["mtl.run_key"]
    run = pipeline.run_dir(settings, run_key)
    snapshot = next(settings.snapshots_dir.glob(f"*-{WEEK[8]:%Y%m%d}"))
    again = pipeline.register(settings, run_key, str(snapshot), str(run / "challenger"), str(run / "comparison.json"),
                              None, {"start": f"{WEEK[7]}", "end": f"{WEEK[8]}"})  # fmt: skip
    assert again == {"version": versions, "run_id": registered.run_id}
    assert _versions(settings) == versions


def test_rollback_restores_the_previous_champion_and_status_shows_it(installation):
    settings, _ = installation
    runner = CliRunner()
    out = runner.invoke(app, ["rollback", "--by", "on-call", "--why", "test", "--json"])
    assert out.exit_code == 0, out.output
    assert _alias(settings, "champion") == 1 and _alias(settings, "previous") == 2
    out = runner.invoke(app, ["status", "--json"])
    state = json.loads(out.output)
    assert state["champion"]["version"] == 1 and set(state["champion"]["metrics"]) >= set(TASKS)
