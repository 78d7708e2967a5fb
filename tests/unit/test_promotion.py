"""Promotion is compare-and-set under a lock that holds across processes: two runs never both promote."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from mtl_core import pipeline
from mtl_core.artifacts import GateDecision
from mtl_core.config import load_settings
from mtl_core.locks import LockTimeout, file_lock, store_lock
from mtl_core.registry.aliases import CHAMPION, current_alias, make_champion
from mtl_core.registry.runs import run_for_key
from mtl_core.registry.store import configure

MODEL = "mtl_recommender"


@pytest.fixture
def registry(tmp_path):
    settings = load_settings(environ={"MTL_DATA_DIR": str(tmp_path)})
    client = configure(settings.resolved_mlflow_tracking_uri)
    client.create_registered_model(MODEL)
    versions = []
    for key in ("run-a", "run-b", "run-c"):
        run_id = run_for_key(client, "mtl", key)
        (tmp_path / key).mkdir()
        versions.append((int(client.create_model_version(MODEL, str(tmp_path / key), run_id=run_id).version), run_id))
    return settings, client, versions


def _passed(settings, version: int, run_id: str, champion: int | None) -> GateDecision:
    return GateDecision(
        uri=str(settings.data_dir / f"decision-{version}.json"),
        registered="",
        model_name=MODEL,
        version=version,
        run_id=run_id,
        verdict="promote",
        reason="every task beats the champion",
        champion_version=champion,
        per_task={},
        rule={},
        decided_at="2026-03-02T00:00:00+00:00",
    )


def test_two_runs_that_both_passed_against_no_champion_promote_once(registry):
    settings, client, [(v1, run1), (v2, run2), _] = registry
    # Both gates ran before either promoted, so both compared against "no champion yet".
    first = pipeline.promote(settings, _passed(settings, v1, run1, champion=None))
    second = pipeline.promote(settings, _passed(settings, v2, run2, champion=None))
    assert first["changed"] and current_alias(client, MODEL, CHAMPION) == v1
    assert not second["changed"] and "v1 became champion meanwhile" in second["refused"]
    tags = client.get_model_version(MODEL, str(v2)).tags
    assert tags["gate.verdict"] == "reject" and "compared v2 against no champion" in tags["gate.reason"]
    assert client.get_model_version(MODEL, str(v2)).description.startswith("**Not promoted**")
    assert client.get_run(run2).info.status == "FINISHED"

    # Against the champion it was compared with, the alias moves; a retry of that promotion changes nothing.
    v3, run3 = registry[2][2]
    assert pipeline.promote(settings, _passed(settings, v3, run3, champion=v1))["changed"]
    assert not pipeline.promote(settings, _passed(settings, v3, run3, champion=v1))["changed"]
    assert current_alias(client, MODEL, CHAMPION) == v3 and "refused" not in client.get_model_version(MODEL, "3").tags


def test_a_manual_promotion_meanwhile_is_not_overwritten(registry):
    settings, client, [(v1, _), (v2, run2), _] = registry
    make_champion(client, MODEL, v1, actor="alice", why="hotfix")
    result = pipeline.promote(settings, _passed(settings, v2, run2, champion=None))
    assert not result["changed"] and current_alias(client, MODEL, CHAMPION) == v1


HOLD = """
import sys, time
from mtl_core.locks import file_lock
with file_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_the_file_lock_holds_across_processes(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "x.lock"), "3"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        held_at = time.monotonic()
        with pytest.raises(LockTimeout, match=r"x\.lock"):
            with file_lock(tmp_path / "x.lock", timeout=0.5):
                pass
        with file_lock(tmp_path / "x.lock", timeout=10):  # free again once the holder lets go, 3 s after taking it
            assert time.monotonic() - held_at > 2.5
    finally:
        holder.kill()


def test_the_advisory_lock_holds_across_sessions_on_postgresql(pg_url, tmp_path):
    with store_lock(pg_url, "promotion", tmp_path):
        with pytest.raises(LockTimeout, match="advisory lock 'promotion'"):
            with store_lock(pg_url, "promotion", tmp_path, timeout=0.5):
                pass
    with store_lock(pg_url, "promotion", tmp_path, timeout=5):  # released
        pass


FIRST_RUN = """
from mtl_core.config import load_settings
from mtl_core.local_airflow import prepare_airflow
from mtl_core.registry.store import configure

settings = load_settings()
prepare_airflow(settings)
configure(settings.resolved_mlflow_tracking_uri).search_experiments()
print("ready", flush=True)
"""


def test_two_first_runs_at_once_initialise_airflow_and_mlflow_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MTL_", "AIRFLOW_", "MLFLOW_TRACKING"))}
    env["MTL_DATA_DIR"] = str(tmp_path)
    runs = [
        subprocess.Popen([sys.executable, "-c", FIRST_RUN], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outcomes = [run.communicate(timeout=300) for run in runs]
    for run, (out, err) in zip(runs, outcomes, strict=True):
        assert run.returncode == 0 and out.strip() == b"ready", err.decode()[-2000:]
    assert (tmp_path / "airflow" / "airflow.db.migrated").exists() and (tmp_path / "mlflow.db").exists()
