"""Day partitions of the event tables: where a day's file lives, what makes it reusable, and the checksum
the warehouse computes to tell whether a day's source rows changed since it was extracted.

An event table is stored once per UTC day and shared by every window that covers the day:

    <day store>/                                   (``<data_dir>/snapshots/days`` in the pipeline)
      <source>.<key_id>/
        store.json                                 the warehouse URL (no password) and the key id it stands for
        behavior_events/day=2026-01-05.parquet     rows of [day, day + 1), in (ts, event_id) order
        ad_events/day=2026-01-05.parquet

``<source>`` fingerprints the warehouse URL without its password and ``<key_id>`` is the pseudonym key's
fingerprint (``pseudonyms.Pseudonymiser.key_id``): a day read from another warehouse, or pseudonymised under
another key, lives elsewhere and is never reused. Each day file carries its own record in its Parquet footer
(key ``mtl.day``): table, day, key id, row count and content digest, and the warehouse checksum of the day's
rows taken just before they were read. A day is read again only when its file is missing or unreadable, its
record is of another format, or the warehouse's checksum of the day differs from the recorded one (late
events, a backfill, a correction).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import BigInteger, Date, DateTime, Integer, String, Table, Text, case, cast, extract, func, select
from sqlalchemy.engine import Engine

from mtl_core.data import warehouse as wh

DAY_FORMAT_VERSION = 1
META_KEY = "mtl.day"
STORE_RECORD = "store.json"
DAY = timedelta(days=1)
# The checksum works modulo a prime below 2**31, so that every product of two reduced values stays below
# 2**62: SQLite turns an integer overflow into a float silently and PostgreSQL raises on one.
_PRIME = 2_147_483_647
# One odd multiplier per column position: a value moved to another column changes the sum.
_MULTIPLIERS = [(2_654_435_761 * (position + 1)) % _PRIME for position in range(16)]
_EVENT_TYPES = wh.BEHAVIOR_EVENT_TYPES + wh.AD_EVENT_TYPES


@dataclass(frozen=True)
class DaySlice:
    """The part of one UTC day a window covers: the whole day, or a cut at the window's first or last day."""

    day: date
    start: datetime
    end: datetime

    @property
    def whole(self) -> bool:
        return self.end - self.start == DAY


def day_slices(start: datetime, end: datetime) -> list[DaySlice]:
    """The days of [start, end) in order; only a window's first and last day can be cut."""
    slices = []
    day = datetime(start.year, start.month, start.day)
    while day < end:
        slices.append(DaySlice(day.date(), max(start, day), min(end, day + DAY)))
        day += DAY
    return slices


def store_dir(days_dir: Path, source: str, key_id: str) -> Path:
    """The folder of the days read from ``source`` (a URL without password) under the key ``key_id``."""
    return Path(days_dir) / f"{hashlib.sha256(source.encode()).hexdigest()[:12]}.{key_id}"


def ensure_store(store: Path, source: str, key_id: str) -> None:
    """Create the store folder with its ``store.json`` (what the folder name's fingerprints stand for)."""
    record = store / STORE_RECORD
    if record.is_file():
        return
    store.mkdir(parents=True, exist_ok=True)
    staging = store / f".{STORE_RECORD}.tmp-{uuid.uuid4().hex[:8]}"
    staging.write_text(json.dumps({"source": source, "key_id": key_id}, indent=2) + "\n")
    os.replace(staging, record)


def day_path(store: Path, table: str, day: date) -> Path:
    return store / table / f"day={day.isoformat()}.parquet"


def read_day_record(path: Path) -> dict[str, Any] | None:
    """The record in a day file's footer, or None when the file is missing, unreadable or has none.

    Only the footer is read (a few kB), so checking every day of a long window costs milliseconds.
    """
    try:
        footer = pq.read_metadata(path)
        record = json.loads((footer.metadata or {})[META_KEY.encode()])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None
    # A file cut short keeps no footer; one rewritten by other tools keeps no record. Both are read again.
    if not isinstance(record, dict) or record.get("rows") != footer.num_rows:
        return None
    return record


def is_reusable(record: dict[str, Any] | None, table: str, day: date, key_id: str, checksum: dict[str, int]) -> bool:
    """Whether a day file may stand for the day: same format, table, day and key, same source checksum."""
    return (
        record is not None
        and record.get("format_version") == DAY_FORMAT_VERSION
        and record.get("table") == table
        and record.get("day") == day.isoformat()
        and record.get("key_id") == key_id
        and record.get("checksum") == checksum
    )


# ---- the warehouse checksum of a day ----------------------------------------------------------------------
EMPTY_DAY = {"rows": 0, "fingerprint": 0}


def _epoch_seconds(column, dialect: str):
    if dialect == "sqlite":  # SQLite keeps datetimes as text
        return cast(func.strftime("%s", column), BigInteger)
    return cast(extract("epoch", column), BigInteger)


def _as_integer(column, dialect: str):
    """A column's value as an integer the checksum can sum, NULL included (as -1 or an empty text)."""
    if isinstance(column.type, DateTime):
        return func.coalesce(_epoch_seconds(column, dialect), -1)
    if isinstance(column.type, (String, Text)):
        length = func.length(func.coalesce(column, "")) + 100
        if column.name == "event_type":  # 'purchase' and 'favorite' have the same length
            return case({kind: i + 1 for i, kind in enumerate(_EVENT_TYPES)}, value=column, else_=length)
        return length
    if isinstance(column.type, (BigInteger, Integer)):
        return func.coalesce(column, -1)
    raise TypeError(f"no checksum term for column {column.name} of type {column.type}")  # pragma: no cover


def _row_fingerprint(table: Table, dialect: str):
    """A number per row that depends on every column and on which event holds the value.

    Each column's value is multiplied by a factor drawn from the row's event id, so the day's sum changes when
    an event is added, removed, re-timed, re-typed or re-attributed, and also when two events swap a value
    (a plain per-column sum would not see that). Arithmetic only: the same expression runs on SQLite and
    PostgreSQL, in the warehouse, and returns one number per day.
    """
    key = table.c.event_id % _PRIME
    total = None
    for position, column in enumerate(table.columns):
        weight = (key * _MULTIPLIERS[position]) % _PRIME + 1
        term = ((_as_integer(column, dialect) % _PRIME) * weight) % _PRIME
        total = term if total is None else total + term
    return total % _PRIME


def day_checksums(engine: Engine, table: Table, start: datetime, end: datetime) -> dict[date, dict[str, int]]:
    """{day: {"rows", "fingerprint"}} of every day of [start, end) (midnights) that holds rows of ``table``.

    One aggregate query per table for the whole window, run in the warehouse: rows never leave it. Days
    without rows are absent (their checksum is ``EMPTY_DAY``).
    """
    dialect = engine.dialect.name
    ts = table.c.ts
    day = func.date(ts) if dialect == "sqlite" else cast(ts, Date)
    stmt = (
        select(day.label("day"), func.count().label("rows"), func.sum(_row_fingerprint(table, dialect)))
        .where(ts >= start, ts < end)
        .group_by(day)
    )
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return {date.fromisoformat(str(d)[:10]): {"rows": int(n), "fingerprint": int(f or 0)} for d, n, f in rows}
