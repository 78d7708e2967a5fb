"""`mtl doctor`: a healthy installation passes; each broken thing is one FAIL line naming it, and exit code 1."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import uuid

import pytest
import redis
from conftest import REDIS_URL, drop_redis_keys
from typer.testing import CliRunner

from mtl_core import doctor
from mtl_core.cli import app
from mtl_core.config import load_settings
from mtl_core.data import warehouse as wh
from mtl_core.data.shop import ShopSpec, write_shop

runner = CliRunner()
MODEL = "mtl_recommender"
GIB = 1 << 30
# Variables of the developer's shell or of other tests that would point the doctor elsewhere.
FOREIGN = (
    "MTL_CONFIG",
    "MTL_WAREHOUSE_URL",
    "MTL_MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_URI",
    "MTL_TEXT__MODEL_PATH",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    "AIRFLOW__CORE__DAGS_FOLDER",
)


def _migrated_airflow_db(path, revision: str) -> None:
    """An Airflow metadata DB as `airflow db migrate` leaves it, as far as the doctor reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)")
        conn.execute("INSERT INTO alembic_version VALUES (?)", (revision,))
    conn.close()


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """An embedded installation with a warehouse, a champion, its published features and a migrated Airflow DB."""
    from mtl_core.registry import configure

    root = tmp_path_factory.mktemp("doctor")
    data = root / "data"
    write_shop(wh.make_engine(f"sqlite:///{data / 'warehouse.db'}"), ShopSpec(users=40, items=15, days=2, seed=1))
    client = configure(f"sqlite:///{data / 'mlflow.db'}")
    client.create_registered_model(MODEL)
    (root / "model").mkdir()
    version = client.create_model_version(MODEL, source=str(root / "model")).version
    client.set_registered_model_alias(MODEL, "champion", version)
    heads, _known = doctor.airflow_revisions()
    _migrated_airflow_db(data / "airflow" / "airflow.db", sorted(heads)[0])
    prefix = f"mtltest-doctor-{uuid.uuid4().hex[:8]}"
    env = {
        "MTL_DATA_DIR": str(data),
        "MTL_SERVE__REDIS_URL": REDIS_URL,
        "MTL_SERVE__KEY_PREFIX": prefix,
        "AIRFLOW_HOME": str(data / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    store = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    store.set(f"{prefix}:{MODEL}:published:{version}", json.dumps({"version": int(version)}))
    store.close()
    yield env
    drop_redis_keys(prefix)


@pytest.fixture
def installation(healthy, monkeypatch):
    for name in FOREIGN:
        monkeypatch.delenv(name, raising=False)
    for name, value in healthy.items():
        monkeypatch.setenv(name, value)
    # The machine's own free space must not decide a test's verdict.
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: shutil._ntuple_diskusage(100 * GIB, 50 * GIB, 50 * GIB))
    return healthy


def test_a_healthy_installation_passes_with_ok_lines(installation):
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    statuses = {check["name"]: check["status"] for check in report["checks"]}
    assert statuses == dict.fromkeys(
        ["warehouse", "mlflow", "airflow-db", "dags", "redis", "encoder", "packages", "disk"], "OK"
    ), report
    facts = {check["name"]: check["facts"] for check in report["checks"]}
    assert facts["mlflow"]["champion"] == 1 and facts["redis"]["published"] is True
    assert "mtl_retrain" in facts["dags"]["dags"] and report["ok"] is True


def test_each_broken_thing_is_a_fail_line_that_names_it(installation, monkeypatch, tmp_path):
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "broken_dag.py").write_text("from airflow.sdk import dag\n\ndef build(:\n    pass\n")
    monkeypatch.setenv("MTL_WAREHOUSE_URL", "postgresql://postgres:s3cret-pw@127.0.0.1:1/x")
    monkeypatch.setenv("MTL_SERVE__REDIS_URL", "redis://:r3dis-pw@127.0.0.1:1/0")
    monkeypatch.setenv("MTL_TEXT__MODEL_PATH", str(tmp_path / "no_such_model"))
    real_version = doctor.installed_version
    monkeypatch.setattr(doctor, "installed_version", lambda d: "2.12.0" if d == "torch" else real_version(d))
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: shutil._ntuple_diskusage(100 * GIB, 99.5 * GIB, GIB // 2))

    result = runner.invoke(app, ["doctor", "--dags-folder", str(dags)])

    assert result.exit_code == 1, result.output
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line.split()[0] in ("OK", "WARN", "FAIL")}
    for name in ("warehouse", "redis", "encoder", "dags", "packages", "disk"):
        assert lines[name].startswith("FAIL"), lines[name]
    assert "cannot use the warehouse at postgresql://postgres:***@127.0.0.1:1/x" in lines["warehouse"]
    assert "cannot reach Redis at redis://:***@127.0.0.1:1/0" in lines["redis"]
    assert f"text.model_path '{tmp_path / 'no_such_model'}' does not exist" in lines["encoder"]
    assert "1 file(s)" in lines["dags"] and "broken_dag.py: SyntaxError: invalid syntax (line 3)" in result.stdout
    assert "torch 2.12.0 (pinned ==2.13.0)" in lines["packages"] and "pip install -e" in lines["packages"]
    assert "only 512.0 MiB free" in lines["disk"] and "under 1 GiB" in lines["disk"]
    assert lines["mlflow"].startswith("OK") and lines["airflow-db"].startswith("OK")  # the rest still checked
    assert result.stdout.strip().splitlines()[-1] == "doctor: 6 FAIL, 0 WARN, 2 OK"
    assert "Traceback" not in result.output and "s3cret-pw" not in result.output and "r3dis-pw" not in result.output


def test_the_warehouse_names_a_missing_table_and_the_command_that_creates_it(tmp_path):
    engine = wh.make_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    wh.create_schema(engine)
    with engine.begin() as conn:
        wh.ad_events.drop(conn)
    engine.dispose()
    result = doctor.check_warehouse(load_settings(environ={"MTL_DATA_DIR": str(tmp_path)}))
    assert result.status == "FAIL" and "lacks table(s) ad_events" in result.message
    assert "mtl import-logs" in result.fix and "mtl simulate" in result.fix


def test_an_airflow_db_of_an_older_airflow_must_be_migrated(tmp_path, monkeypatch):
    heads, known = doctor.airflow_revisions()
    _migrated_airflow_db(tmp_path / "airflow.db", sorted(known - heads)[0])
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{tmp_path / 'airflow.db'}")
    result = doctor.check_airflow_db(load_settings(environ={"MTL_DATA_DIR": str(tmp_path)}))
    assert result.status == "FAIL" and "older than Airflow" in result.message and "airflow db migrate" in result.fix

    monkeypatch.delenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")
    fresh = doctor.check_airflow_db(load_settings(environ={"MTL_DATA_DIR": str(tmp_path / "fresh")}))
    assert fresh.status == "WARN" and "mtl run-dag creates and migrates it" in fresh.fix


def test_low_disk_warns_under_5_gib_and_counts_what_the_data_dir_holds(tmp_path, monkeypatch):
    (tmp_path / "snapshots" / "w1").mkdir(parents=True)
    (tmp_path / "snapshots" / "w1" / "part.parquet").write_bytes(b"x" * 3000)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: shutil._ntuple_diskusage(100 * GIB, 97 * GIB, 3 * GIB))
    result = doctor.check_disk(load_settings(environ={"MTL_DATA_DIR": str(tmp_path)}))
    assert result.status == "WARN" and "only 3.0 GiB free" in result.message and "under 5 GiB" in result.message
    assert "snapshots/ 2.9 KiB" in result.message and "no mtl command removes files" in result.fix


def test_a_check_that_hangs_or_raises_is_a_fail_line_not_a_hang_or_a_traceback():
    release = threading.Event()
    hung = doctor._guarded("redis", lambda: release.wait(30) and None, deadline_s=0.2)
    release.set()
    assert hung.status == "FAIL" and hung.message == "no answer within 0.2 s"

    def broken():
        raise RuntimeError("boom\nsecond line")

    raised = doctor._guarded("disk", broken, deadline_s=5)
    assert raised.status == "FAIL" and raised.message == "the check itself failed: RuntimeError: boom"
