"""Faults injected into real components, and what survives them.

- The warehouse's PostgreSQL backend is terminated (pg_terminate_backend) while extraction streams a table.
- The disk fills up (a small tmpfs) while a snapshot is written.
- ``mtl train`` is killed with SIGKILL mid-epoch, and run again with --resume.
- The MLflow server (a real ``mlflow server`` process on loopback) dies during register, and comes back.
- A failure between register and promote: tests/integration/test_dag.py::
  test_failure_after_registration_leaves_the_champion_unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, text
from support import PSEUDONYMS

from mtl_core.data import extract
from mtl_core.data import warehouse as wh
from mtl_core.data.extract import ExtractionError, extract_snapshot, verify_snapshot
from mtl_core.data.shop import ShopSpec, write_shop

SHOP = ShopSpec(users=400, items=120, days=28, start=date(2026, 1, 5), seed=2)
MTL = str(Path(sys.executable).with_name("mtl"))


def _staging_left(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# --- the warehouse connection drops mid-extract ----------------------------------------------------------
def test_a_connection_dropped_mid_extract_leaves_the_old_snapshot_and_the_retry_gives_the_same_one(
    pg_url, tmp_path, monkeypatch
):
    app = "mtl_fault_extract"
    engine = wh.make_engine(f"{pg_url}&application_name={app}")
    write_shop(engine, SHOP)
    out = tmp_path / "snapshots" / "window"
    old = extract_snapshot(engine, "2026-01-05", "2026-01-19", out, PSEUDONYMS)
    admin = create_engine(pg_url)

    real_chunks = extract._chunks
    dropped = []

    def dropping(engine_, table, stmt, chunk_rows, pseudonyms):
        for i, chunk in enumerate(real_chunks(engine_, table, stmt, chunk_rows, pseudonyms)):
            yield chunk
            if table.name == "behavior_events" and i == 1:  # mid-table, with a server-side cursor open
                with admin.begin() as conn:
                    dropped.extend(
                        conn.execute(
                            text(
                                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE application_name = :app AND pid <> pg_backend_pid()"
                            ),
                            {"app": app},
                        ).scalars()
                    )

    monkeypatch.setattr(extract, "_chunks", dropping)
    with pytest.raises(ExtractionError) as failed:  # a day holds ~600 events: three chunks of 200 each
        extract_snapshot(engine, "2026-01-05", "2026-02-02", out, PSEUDONYMS, chunk_rows=200)
    assert dropped and all(dropped)
    message = str(failed.value)
    assert "reading table behavior_events" in message and "is as it was" in message, message
    assert _staging_left(out.parent) == []
    assert verify_snapshot(out)["content_hash"] == old["content_hash"]  # the old snapshot, whole

    monkeypatch.setattr(extract, "_chunks", real_chunks)
    engine.dispose()  # the pool's connections were terminated too
    retried = extract_snapshot(engine, "2026-01-05", "2026-02-02", out, PSEUDONYMS, chunk_rows=200)
    undisturbed = extract_snapshot(engine, "2026-01-05", "2026-02-02", tmp_path / "straight", PSEUDONYMS)
    assert retried["content_hash"] == undisturbed["content_hash"] != old["content_hash"]
    verify_snapshot(out)
    admin.dispose()
    engine.dispose()


# --- the disk fills up while a snapshot is written -------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mount of a given size, unmounted afterwards (needs root, as the CI machines have)."""
    mounts: list[Path] = []

    def mount(size_bytes: int) -> Path:
        where = tmp_path / "small_disk"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)], capture_output=True, text=True
        )
        # A failure, not a skip, like a missing PostgreSQL server: CI and the dev machines run as root.
        assert done.returncode == 0, f"cannot mount a tmpfs to fill up ({done.stderr.strip()}); run the tests as root"
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", str(where)], check=False)


def _size(snapshot: Path) -> int:
    """Bytes of a snapshot: its folder and its event days, which live in the day store beside it."""
    days = [path for table in wh.EVENT_TABLES for path in extract.table_files(snapshot, table)]
    return sum(p.stat().st_size for p in [*snapshot.rglob("*"), *days] if p.is_file())


def test_a_full_disk_while_writing_a_snapshot_is_a_clear_error_and_older_snapshots_stay_whole(small_disk, tmp_path):
    engine = wh.make_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    write_shop(engine, SHOP)
    small = extract_snapshot(engine, "2026-01-19", "2026-01-26", tmp_path / "probe_small", PSEUDONYMS)
    big = extract_snapshot(engine, "2026-01-05", "2026-02-02", tmp_path / "probe_big", PSEUDONYMS)
    # Room for the week's snapshot and half of the month's.
    disk = small_disk(_size(tmp_path / "probe_small") + _size(tmp_path / "probe_big") // 2)
    kept = extract_snapshot(engine, "2026-01-19", "2026-01-26", disk / "week", PSEUDONYMS)
    assert kept["content_hash"] == small["content_hash"]

    with pytest.raises(ExtractionError) as failed:
        extract_snapshot(engine, "2026-01-05", "2026-02-02", disk / "month", PSEUDONYMS)
    message = str(failed.value)
    assert "No space left on device" in message and "free space under data_dir" in message, message
    assert not (disk / "month").exists() and _staging_left(disk) == []
    assert verify_snapshot(disk / "week")["content_hash"] == small["content_hash"]
    # And a re-extraction over the old week that cannot fit leaves the old week in place.
    with pytest.raises(ExtractionError):
        extract_snapshot(engine, "2026-01-05", "2026-02-02", disk / "week", PSEUDONYMS)
    assert verify_snapshot(disk / "week")["content_hash"] == small["content_hash"] != big["content_hash"]
    engine.dispose()


# --- training killed mid-epoch ---------------------------------------------------------------------------
TRAIN_CONFIG = """
features: {history_days: 7, valid_days: 4, holdout_days: 7, churn_horizon_days: 7}
text: {enabled: false}
train: {epochs: 3, steps_per_epoch: 60, batch_size: 256, evals_per_epoch: 3}
"""


def test_training_killed_mid_epoch_resumes_from_its_checkpoint_to_the_same_model(tmp_path):
    engine = wh.make_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    write_shop(engine, SHOP)
    extract_snapshot(engine, "2026-01-05", "2026-02-02", tmp_path / "snap", PSEUDONYMS)
    (tmp_path / "mtl.yaml").write_text(TRAIN_CONFIG)
    env = {**os.environ, "MTL_DATA_DIR": str(tmp_path), "MTL_CONFIG": str(tmp_path / "mtl.yaml")}

    def train(out: Path, *extra: str) -> subprocess.Popen:
        args = [MTL, "train", "--snapshot", str(tmp_path / "snap"), "--out", str(out), "--json", *extra]
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    straight = train(tmp_path / "straight")
    out, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err[-2000:]
    straight_result = json.loads(out)

    killed = train(tmp_path / "killed")
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, "training ended before its first checkpoint: make it longer"
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "killed" / "model.pt").exists()

    resumed = train(tmp_path / "killed", "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    result = json.loads(out)
    assert 0 < result["resumed_from_step"] < result["steps"] == straight_result["steps"]
    assert result["tasks"] == straight_result["tasks"]
    a, b = (
        torch.load(tmp_path / name / "model.pt", weights_only=True)["state_dict"] for name in ("straight", "killed")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    engine.dispose()


# --- MLflow unreachable during register ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on loopback, started and stopped by PID."""

    def __init__(self, root: Path):
        self.root, self.port, self.process = root, _free_port(), None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--serve-artifacts",
            "--workers",
            "1",
        ]
        log = (self.root / "server.log").open("a")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                assert self.process.poll() is None, (self.root / "server.log").read_text()[-3000:]
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not start within 120 s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the server and its gunicorn/uvicorn workers
            self.process.wait(timeout=30)
        self.process = None


@pytest.fixture
def mlflow_server(tmp_path):
    root = tmp_path / "mlflow_server"
    root.mkdir()
    server = MlflowServer(root)
    server.start()
    yield server
    server.kill()


def test_mlflow_dying_during_register_fails_cleanly_and_the_retry_registers_exactly_one_version(
    mlflow_server, tmp_path, monkeypatch
):
    from mtl_core import pipeline
    from mtl_core.config import load_settings
    from mtl_core.registry import pyfunc
    from mtl_core.registry.store import configure

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    (tmp_path / "mtl.yaml").write_text(TRAIN_CONFIG + "pipeline: {lookback_days: 21, retries: 0}\n")
    settings = load_settings(
        environ={
            "MTL_DATA_DIR": str(tmp_path),
            "MTL_CONFIG": str(tmp_path / "mtl.yaml"),
            "MTL_MLFLOW_TRACKING_URI": mlflow_server.uri,
        }
    )
    write_shop(wh.make_engine(settings.resolved_warehouse_url), SHOP)
    run_key = "fault_register"
    snapshot = pipeline.validate(settings, pipeline.extract(settings, "2026-02-02"))
    examples = pipeline.build_features(settings, snapshot, run_key)
    comparison = pipeline.evaluate(settings, pipeline.train_challenger(settings, examples, run_key))

    real_log = pyfunc.log_pyfunc

    def dying_log(*args, **kwargs):  # the run and its metrics are logged; the server dies before the model
        mlflow_server.kill()
        return real_log(*args, **kwargs)

    monkeypatch.setattr(pyfunc, "log_pyfunc", dying_log)
    began = time.monotonic()
    with pytest.raises(Exception) as failed:
        pipeline.register(settings, run_key, comparison)
    assert time.monotonic() - began < 300
    message = str(failed.value)
    assert f"127.0.0.1:{mlflow_server.port}" in message, message

    monkeypatch.setattr(pyfunc, "log_pyfunc", real_log)
    mlflow_server.start()
    registered = pipeline.register(settings, run_key, comparison)
    client = configure(mlflow_server.uri)
    versions = client.search_model_versions(f"name = '{settings.pipeline.model_name}'")
    assert [int(v.version) for v in versions] == [registered.version]
    runs = client.search_runs([client.get_experiment_by_name(settings.pipeline.experiment).experiment_id])
    assert len(runs) == 1 and versions[0].run_id == runs[0].info.run_id  # the retry reused the run: no orphan
    assert client.get_model_version_by_alias(settings.pipeline.model_name, "challenger").version == versions[0].version
