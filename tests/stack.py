"""The production stack's pieces for the integration tests: PostgreSQL databases, server processes, Airflow.

Every process is started in its own session and stopped by its PID (its process group: a server's workers
go with it). Every database is created with a unique name and dropped afterwards, so tests that run at the
same time, or a run killed halfway, never share or reuse one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

from conftest import PG_ADMIN_URL
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def pg_database(purpose: str) -> Iterator[str]:
    """A new, empty PostgreSQL database (its URL, without a password: the server trusts loopback)."""
    name = f"mtl_{purpose}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # a missing server is a failure, not a skip: CI has one
        admin.dispose()
        raise RuntimeError(f"PostgreSQL at {PG_ADMIN_URL} is not reachable: {exc}") from exc
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:  # WITH (FORCE): a server process we stopped may leave a session behind
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Service:
    """One server process, its output in a log file; ``stop()`` ends its whole process group."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log = log_dir / f"{name}.log"
        self._out = self.log.open("ab")
        self.process = subprocess.Popen(
            argv, env=env, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True, cwd=log_dir
        )
        self.pid = self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace: float = 20.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.process.wait(10)
        # Workers a server forked into its group outlive it when it dies first: end them too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self._out.close()


def wait_until(check, what: str, timeout: float, services: list[Service] = (), every: float = 1.0):
    """Poll ``check()`` until it returns something truthy; fail naming ``what`` (and a dead service's log)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        for service in services:
            if not service.alive():
                raise AssertionError(f"{service.name} exited while waiting for {what}:\n{service.tail()}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {s.name} ---\n{s.tail(20)}" for s in services)
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")
        time.sleep(every)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def mlflow_server(backend_url: str, artifacts: Path, log_dir: Path) -> Iterator[tuple[str, Service]]:
    """A real ``mlflow server`` on a loopback port, its artifacts proxied (clients never see the folder)."""
    port = free_port()
    argv = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", backend_url,
        "--serve-artifacts", "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    server = Service("mlflow-server", argv, env, log_dir)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(uri + "/health"), "the MLflow server's /health", 120, [server])
        yield uri, server
    finally:
        server.stop()


SESSION_SERVE_VARIABLES = ("MTL_SERVE__REDIS_URL", "MTL_SERVE__KEY_PREFIX", "MTL_SERVE__BUILD_VARIANTS")


def airflow_env(home: Path, metadata_url: str, **extra: str) -> dict[str, str]:
    """The environment of one Airflow installation whose metadata lives on ``metadata_url``."""
    from mtl_core.local_airflow import DAGS_FOLDER

    home.mkdir(parents=True, exist_ok=True)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AIRFLOW", "MTL_", "MLFLOW_TRACKING")) or key.startswith("MTLTEST_")
    }
    # The session's online store (conftest): its own key prefix, and no int8/ONNX variants to build.
    env.update({key: os.environ[key] for key in SESSION_SERVE_VARIABLES if key in os.environ})
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            # Every component decrypts the Connections' passwords with this one key, as a team's deployment
            # shares one; without it each AIRFLOW_HOME makes its own and cannot read the others' Connections.
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
            # Airflow's async engine would take asyncpg for postgresql://; psycopg 3 speaks async itself.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": metadata_url,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def airflow(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    """Run one ``airflow`` command of the installation; its output, or a failure naming the command."""
    done = subprocess.run([str(BIN / "airflow"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"airflow {' '.join(args[:3])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout
