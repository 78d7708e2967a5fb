"""Locks that hold across processes: who may initialise a store, and who may move the champion.

Two DAG runs at once (a manual replay beside the scheduled run, two `mtl run-dag`) must not both promote,
and two first runs must not both create the same database. ``max_active_runs=1`` binds only the scheduler,
so the library locks for itself: a PostgreSQL advisory lock when the warehouse is on PostgreSQL (it holds
across machines, for as long as the session lives), an exclusive file lock beside an SQLite database
(every process that can open that file shares its file system).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import make_url

from mtl_core.errors import MtlError


class LockTimeout(MtlError):
    """Another process held the lock for longer than we wait; the message names the lock and its holder's hint."""


@contextmanager
def file_lock(path: str | Path, timeout: float = 600.0, what: str = "") -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing) for the ``with`` block, across processes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    with open(path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(
                        f"waited {timeout:.0f} s for the lock {path}{f' ({what})' if what else ''}; another process "
                        "holds it. If none is running, the lock is free: retry"
                    ) from None
                time.sleep(0.2)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _advisory_key(name: str) -> int:
    """A stable signed 64-bit key for pg_advisory_lock from a readable name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextmanager
def store_lock(url: str, name: str, fallback_dir: Path, timeout: float = 600.0) -> Iterator[None]:
    """Lock ``name`` in the database at ``url``: an advisory lock on PostgreSQL, else a file lock.

    The file lock lives beside an SQLite database (``<db>.<name>.lock``), or in ``fallback_dir`` for any
    other store.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        from mtl_core.data.warehouse import make_engine

        engine = make_engine(url)
        key = _advisory_key(f"mtl:{name}")
        deadline = time.monotonic() + timeout
        with engine.connect() as conn:
            while not conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar():
                if time.monotonic() > deadline:
                    raise LockTimeout(f"waited {timeout:.0f} s for the advisory lock {name!r}; another run holds it")
                time.sleep(0.2)
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                conn.commit()
        engine.dispose()
        return
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        lock = Path(parsed.database).with_name(f"{Path(parsed.database).name}.{name}.lock")
    else:
        lock = fallback_dir / f"{name}.lock"
    with file_lock(lock, timeout, what=name):
        yield
