"""The real retraining DAG with dag.test(): Airflow, MLflow and the warehouse on SQLite.

The weeks of one shop go by in one installation (Airflow reads its configuration once per process): a weak
first model is promoted, a better one after the drift replaces it, one that neglects a task is rejected, a
corrupted week stops at validation, a failure after registration leaves the champion alone. Each run is a
module-scoped fixture that asks for the runs it builds on and records what the registry said right after
it, so every test can run alone (``pytest tests/integration/test_dag.py::NAME``) or with the others.
dag.test() does not raise when a task fails, so every test asserts task states.
"""

from __future__ import annotations

import json
import os
from datetime import date, timedelta

import pytest
from support import leaks, renumber_users
from typer.testing import CliRunner

from mtl_core import pipeline
from mtl_core.artifacts import Comparison, RegisteredModel
from mtl_core.cli import app
from mtl_core.config import load_settings
from mtl_core.data import warehouse as wh
from mtl_core.data.corruption import corrupt_interval
from mtl_core.data.shop import ShopSpec, write_shop
from mtl_core.local_airflow import DAGS_FOLDER, prepare_airflow, run_dag_in_process

START = date(2026, 1, 5)
WEEK = [START + timedelta(days=7 * k) for k in range(11)]  # WEEK[k] is the end of week k
TASKS = ("ctr", "cvr", "ad_ctr", "churn")
# Warm start, not the expanding default: it is the path with the most moving parts (the champion's weights
# fetched from the registry and grown), and its 5-week windows keep the runs short. The expanding default is
# run by the DAG's own steps in tests/unit/test_reference.py and by make demo.
CONFIG = """
features: {history_days: 7, valid_days: 4, holdout_days: 7}
train: {epochs: 2}
pipeline: {retries: 0, policy: warm_start}
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
    renumber_users(engine)  # distinctive raw ids, for the test that no file outside the warehouse holds one
    yield settings, engine
    os.environ.clear()
    os.environ.update(saved)


def _run(settings, week_end: date, conf: dict | None = None) -> dict[str, str]:
    return run_dag_in_process(settings, week_end.isoformat(), conf)


def _client(settings):
    from mtl_core.registry.store import configure

    return configure(settings.resolved_mlflow_tracking_uri)


def _alias(settings, alias: str) -> int | None:
    from mtl_core.registry.aliases import current_alias

    return current_alias(_client(settings), settings.pipeline.model_name, alias)


def _versions(settings) -> int:
    client = _client(settings)
    return len(client.search_model_versions(f"name = '{settings.pipeline.model_name}'"))


def _decision(settings, version: int) -> dict[str, str]:
    tags = _client(settings).get_model_version(settings.pipeline.model_name, str(version)).tags
    return {k: v for k, v in tags.items() if k.startswith("gate.")}


def _registry(settings) -> dict[str, int | None]:
    """What the registry says right now: the aliases and how many versions there are."""
    aliases = {alias: _alias(settings, alias) for alias in ("champion", "challenger", "previous")}
    return {**aliases, "versions": _versions(settings)}


def _latest_comparison(settings) -> Comparison:
    runs = sorted((settings.data_dir / "runs").glob("*/comparison.json"), key=lambda p: p.stat().st_mtime)
    return Comparison.load(runs[-1])


# --- the runs, each once per module, in the order the weeks go by ----------------------------------------
@pytest.fixture(scope="module")
def first_run(installation):
    settings, _ = installation
    # A deliberately weak first model (a few steps), so the next one has room to beat it on every task.
    weak = {"settings": {"train": {"epochs": 1, "steps_per_epoch": 80}}}
    states = _run(settings, WEEK[6], weak)
    return {"states": states, "after": _registry(settings), "decision": _decision(settings, 1)}


@pytest.fixture(scope="module")
def drift_run(installation, first_run):
    settings, _ = installation
    # With the single-task baselines: their lifts must reach the comparison, the MLflow run and the version.
    # And with the int8 and ONNX variants, which the session's environment turns off elsewhere.
    conf = {"pipeline": {"single_task_baselines": True}, "serve": {"build_variants": True, "variant_timing_calls": 10}}
    states = _run(settings, WEEK[7], {"settings": conf})
    version = _registry(settings)["challenger"]
    mv = _client(settings).get_model_version(settings.pipeline.model_name, str(version))
    return {
        "states": states,
        "after": _registry(settings),
        "decision": _decision(settings, version),
        "comparison": _latest_comparison(settings),
        "run_metrics": _client(settings).get_run(mv.run_id).data.metrics,
        "run_tags": _client(settings).get_run(mv.run_id).data.tags,
        "version": version,
        "description": mv.description,
    }


@pytest.fixture(scope="module")
def rejected_run(installation, drift_run):
    settings, _ = installation
    # churn's loss weighted 0: its head never learns churn (it keeps what the shared layers give it).
    tasks = [t.model_dump() | ({"weight": 0.0} if t.name == "churn" else {}) for t in settings.tasks]
    states = _run(settings, WEEK[8], {"settings": {"tasks": tasks}})
    after = _registry(settings)
    return {"states": states, "after": after, "decision": _decision(settings, after["challenger"])}


@pytest.fixture(scope="module")
def corrupted_run(installation, drift_run):
    settings, engine = installation
    before = _registry(settings)
    corrupt_interval(engine, WEEK[9] - timedelta(days=7), WEEK[9], kinds=("null_ids", "bad_event_types"))
    states = _run(settings, WEEK[9])
    return {"states": states, "before": before, "after": _registry(settings)}


@pytest.fixture(scope="module")
def failed_gate_run(installation, drift_run):
    settings, _ = installation

    def broken_gate(*args, **kwargs):
        raise RuntimeError("registry went away")

    before = _registry(settings)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "gate", broken_gate)
        states = _run(settings, WEEK[8])
    return {"states": states, "before": before, "after": _registry(settings)}


# --- the tests ----------------------------------------------------------------------------------------
def test_the_dag_folder_has_no_import_errors(installation):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert bag.import_errors == {}
    dag = bag.get_dag("mtl_retrain")
    assert dag.max_active_runs == 1 and not dag.catchup
    assert dag.get_task("extract").retries == 0 and set(dag.task_ids) >= {"validate", "gate", "promote"}
    for task in ("extract", "train_challenger", "register"):  # training resumes from its checkpoint on a retry
        assert dag.get_task(task).retry_exponential_backoff, task
    # After a promotion, and only then: the features published, then the day's candidates scored.
    assert dag.get_task("publish_features").upstream_task_ids == {"promote"}
    assert "score_candidates" not in dag.task_ids  # serve.candidates is empty: nothing to score
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MTL_SERVE__CANDIDATES", "/data/candidates-{ds}.parquet")
        scoring = DagBag(dag_folder=str(DAGS_FOLDER)).get_dag("mtl_retrain")
    assert scoring.get_task("score_candidates").upstream_task_ids == {"publish_features"}
    monitor = bag.get_dag("mtl_serving_monitor")
    assert monitor.task_ids == ["check_served_scores"] and monitor.max_active_runs == 1 and not monitor.catchup


def test_first_run_promotes(first_run):
    states = first_run["states"]
    assert states["promote"] == "success" and states["record_rejection"] == "skipped", states
    assert all(state in ("success", "skipped") for state in states.values()), states
    assert first_run["after"]["champion"] == 1 and first_run["after"]["challenger"] == 1
    assert first_run["decision"]["gate.verdict"] == "promote"


def test_run_after_drift_promotes_when_every_task_improves(drift_run):
    states = drift_run["states"]
    assert states["gate"] == "success", states
    tasks = drift_run["comparison"].tasks
    improved = all(e["challenger"]["auc"] > e["champion"]["auc"] for e in tasks.values())
    assert improved, {t: (e["challenger"]["auc"], e["champion"]["auc"]) for t, e in tasks.items()}
    assert drift_run["decision"]["gate.verdict"] == "promote" and states["promote"] == "success"
    assert drift_run["after"]["champion"] == 2 and drift_run["after"]["previous"] == 1


def test_a_promoted_version_has_its_variants_drift_review_page_card_and_published_features(drift_run):
    from mtl_core.serving.online import OnlineStore

    settings = load_settings()
    metrics, tags = drift_run["run_metrics"], drift_run["run_tags"]
    for task in TASKS:
        for variant in ("int8", "onnx"):
            assert f"variant.{variant}.auc_delta.{task}" in metrics, (variant, task)
    assert tags["mtl.variants"] and not tags["mtl.variants"].startswith("failed"), tags["mtl.variants"]
    assert "drift/max_psi" in metrics and "mtl.drift" in tags
    client = _client(settings)
    artifacts = {
        a.path
        for a in client.list_artifacts(
            client.get_model_version(settings.pipeline.model_name, str(drift_run["version"])).run_id, "review"
        )
    }
    assert "review/review.html" in artifacts, artifacts
    assert "## Model card" in drift_run["description"]
    store = OnlineStore(settings, settings.pipeline.model_name)
    assert store.is_published(drift_run["version"]) and drift_run["after"]["champion"] == drift_run["version"]
    assert set(store.reference_scores(drift_run["version"])) == set(TASKS)


def test_single_task_baselines_log_each_tasks_lift_with_its_interval(drift_run):
    for task, entry in drift_run["comparison"].tasks.items():
        lift = entry["single_task"]["lift"]
        assert lift["low"] < lift["delta"] < lift["high"], task
        assert lift["delta"] == pytest.approx(entry["challenger"]["auc"] - entry["single_task"]["auc"], abs=1e-9)
        for name in ("auc", "lift_delta", "lift_low", "lift_high"):
            assert f"single/{task}/{name}" in drift_run["run_metrics"], (task, name)
        assert (
            f"| {task} | {entry['challenger']['auc']:.4f} | {entry['single_task']['auc']:.4f} |"
            in (drift_run["description"])
        )
    assert "Multi-task lift" in drift_run["description"]


def test_a_challenger_with_an_untrained_task_is_not_promoted_and_champion_unchanged(rejected_run):
    states = rejected_run["states"]
    assert states["record_rejection"] == "success" and states["promote"] == "skipped", states
    decision = rejected_run["decision"]
    # Rejected when the holdout shows churn worse, held when it cannot tell: never promoted, and the
    # record gives churn's evidence either way.
    assert decision["gate.verdict"] in ("reject", "hold") and "churn: AUC" in decision["gate.reason"]
    assert decision["gate.churn.passed"] == "false"
    assert rejected_run["after"]["champion"] == 2 and rejected_run["after"]["challenger"] == 3


def test_corrupted_batch_fails_at_validate_and_nothing_is_registered(installation, corrupted_run):
    settings, _ = installation
    states = corrupted_run["states"]
    assert states["extract"] == "success" and states["validate"] == "failed", states
    assert all(states[t] == "upstream_failed" for t in ("train_challenger", "register", "gate", "promote"))
    assert corrupted_run["after"]["versions"] == corrupted_run["before"]["versions"]
    assert corrupted_run["after"]["champion"] == 2
    result = json.loads(next(settings.snapshots_dir.glob(f"*-{WEEK[9]:%Y%m%d}/validation/result.json")).read_text())
    failing = {(f["table"], f["expectation"]) for f in result["summary"]["failures"]}
    assert ("behavior_events", "expect_column_values_to_be_in_set") in failing


def test_failure_after_registration_leaves_the_champion_unchanged(failed_gate_run):
    states = failed_gate_run["states"]
    assert states["register"] == "success" and states["gate"] == "failed", states
    assert states["promote"] == "upstream_failed"
    assert failed_gate_run["after"]["versions"] == failed_gate_run["before"]["versions"] + 1
    assert failed_gate_run["after"]["champion"] == 2


def test_retrying_register_does_not_create_a_second_version(installation, failed_gate_run):
    settings, _ = installation
    # The DAG run with the broken gate registered version N; its register task runs again.
    version = failed_gate_run["after"]["challenger"]
    client = _client(settings)
    registered = client.get_model_version(settings.pipeline.model_name, str(version))
    run_key = client.get_run(registered.run_id).data.tags["mtl.run_key"]
    first = RegisteredModel.load(pipeline.run_dir(settings, run_key) / "registered.json")
    again = pipeline.register(settings, run_key, Comparison.load(first.comparison))
    assert (again.version, again.run_id) == (version, registered.run_id)
    assert _versions(settings) == failed_gate_run["after"]["versions"]


def test_rollback_restores_the_previous_champion_and_status_shows_it(installation, drift_run):
    settings, _ = installation
    champion, previous = _alias(settings, "champion"), _alias(settings, "previous")
    runner = CliRunner()
    out = runner.invoke(app, ["rollback", "--by", "on-call", "--why", "test", "--json"])
    assert out.exit_code == 0, out.output
    assert _alias(settings, "champion") == previous and _alias(settings, "previous") == champion
    out = runner.invoke(app, ["status", "--json"])
    state = json.loads(out.output)
    assert state["champion"]["version"] == previous == 1 and set(state["champion"]["metrics"]) >= set(TASKS)


def test_no_file_of_the_runs_holds_a_raw_user_id_or_the_pseudonym_key(
    installation, drift_run, rejected_run, corrupted_run
):
    """Snapshots, examples, models, MLflow's store and artifacts, Airflow's database and logs: everything the
    runs wrote under the data directory except the warehouse itself and the key file."""
    from mtl_core.data.pseudonyms import KEY_FILE

    settings, engine = installation
    with engine.connect() as conn:
        raw = {row[0] for row in conn.execute(wh.users.select().with_only_columns(wh.users.c.user_id))}
    key = (settings.data_dir / KEY_FILE).read_text().strip()
    skip = [*settings.data_dir.glob("warehouse.db*"), settings.data_dir / KEY_FILE]
    assert leaks(settings.data_dir, raw, [key], skip) == []
    models = list((settings.data_dir / "runs").glob("*/challenger/features.json"))
    assert models and all(json.loads(m.read_text())["vocabs"]["user"] == [] for m in models)


def test_a_second_run_of_a_date_whose_run_is_going_is_refused_not_let_to_replace_it(installation):
    from mtl_core.errors import MtlError
    from mtl_core.locks import file_lock

    settings, _ = installation
    lock = settings.data_dir.resolve() / "airflow" / "runs" / f"mtl_retrain-{WEEK[6]:%Y%m%d}T000000.lock"
    with file_lock(lock, what="a run in progress"), pytest.raises(MtlError, match="already in progress"):
        _run(settings, WEEK[6])


def test_a_wrong_run_conf_stops_at_the_first_task_and_a_gate_override_is_refused(installation):
    settings, _ = installation
    for conf in (
        {"settings": {"trian": {"epochs": 1}}},
        {"settings": {"gate": {"min_delta": -1.0}}},
        {"settings": {"tasks": [t.model_dump() | {"floor": 0.0} for t in settings.tasks]}},
    ):
        states = _run(settings, WEEK[6], conf)
        assert states["extract"] == "failed", (conf, states)
        assert all(state == "upstream_failed" for task, state in states.items() if task != "extract"), states
