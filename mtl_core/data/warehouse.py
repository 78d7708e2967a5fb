"""The event warehouse: SQLAlchemy 2.x schema, engine helpers and fast bulk writes.

The same schema serves SQLite (embedded default) and PostgreSQL (production). Timestamps are stored as
naive datetimes that mean UTC. Event ids are unique across the whole table (simulated events count up from
1; imported events get a stable hash of their content so a re-import cannot duplicate them).

The ``truth_*`` tables hold what the synthetic shop knows and a model must not: the probability behind
every drawn label. Only the shop (data/shop.py) writes them and only the judge (judge/oracle.py) reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    make_url,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from mtl_core.config import redact
from mtl_core.errors import MtlError

BEHAVIOR_EVENT_TYPES = ("impression", "click", "add_to_cart", "purchase", "favorite")
AD_EVENT_TYPES = ("ad_impression", "ad_click")

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("user_id", BigInteger, primary_key=True, autoincrement=False),
    Column("signup_ts", DateTime, nullable=True),
    Column("region", String(32), nullable=True),
    Column("age_band", String(16), nullable=True),
)

items = Table(
    "items",
    metadata,
    Column("item_id", BigInteger, primary_key=True, autoincrement=False),
    # Imported logs often carry no title; the model has a learned "no text" embedding for them.
    Column("title", Text, nullable=True),
    Column("category", String(64), nullable=True),
    Column("brand", String(64), nullable=True),
    Column("price", Float, nullable=True),
    Column("created_ts", DateTime, nullable=True),
)

behavior_events = Table(
    "behavior_events",
    metadata,
    Column("event_id", BigInteger, primary_key=True, autoincrement=False),
    Column("user_id", BigInteger, nullable=False),
    Column("item_id", BigInteger, nullable=False),
    Column("event_type", String(16), nullable=False),
    Column("ts", DateTime, nullable=False),
    Column("session_id", BigInteger, nullable=True),
    # The event this one follows from (click -> its impression, purchase -> its click), when known.
    Column("parent_event_id", BigInteger, nullable=True),
    Column("position", Integer, nullable=True),
    Index("ix_behavior_events_ts", "ts"),
    Index("ix_behavior_events_user_ts", "user_id", "ts"),
)

ad_events = Table(
    "ad_events",
    metadata,
    Column("event_id", BigInteger, primary_key=True, autoincrement=False),
    Column("user_id", BigInteger, nullable=False),
    Column("ad_id", BigInteger, nullable=False),
    Column("item_id", BigInteger, nullable=False),
    Column("ad_text", Text, nullable=True),
    Column("event_type", String(16), nullable=False),
    Column("ts", DateTime, nullable=False),
    Column("session_id", BigInteger, nullable=True),
    Column("parent_event_id", BigInteger, nullable=True),
    Index("ix_ad_events_ts", "ts"),
)

# --- ground truth of the synthetic shop: never read by feature building or training -----------------
truth_events = Table(
    "truth_events",
    metadata,
    # One row per labelled example: the impression (p of a click), the click (p of a purchase) or the
    # ad impression (p of an ad click).
    Column("event_id", BigInteger, primary_key=True, autoincrement=False),
    Column("task", String(16), nullable=False),
    Column("p_true", Float, nullable=False),
)

truth_users = Table(
    "truth_users",
    metadata,
    # Daily session rate lambda(d) = base_rate * (floor + (1 - floor) * exp(-decay * (d - signup_day))), so
    # the true probability of no activity in [c, c+14) is exp(-sum lambda); see shop.true_churn_probability.
    Column("user_id", BigInteger, primary_key=True, autoincrement=False),
    Column("signup_day", Integer, nullable=False),
    Column("base_rate", Float, nullable=False),
    Column("decay", Float, nullable=False),
)

truth_shop = Table(
    "truth_shop",
    metadata,
    # Key/value facts about the simulation (start date, days, drift day and strength) as JSON text.
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

EVENT_TABLES = ("behavior_events", "ad_events")
DIMENSION_TABLES = ("users", "items")
SOURCE_TABLES = DIMENSION_TABLES + EVENT_TABLES
TRUTH_TABLES = ("truth_events", "truth_users", "truth_shop")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (extraction) proceed while a writer holds the file; NORMAL sync is safe with WAL.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class WarehouseError(MtlError):
    """The warehouse URL is wrong or the warehouse cannot be reached; the message names it (no password)."""


def make_engine(url: str) -> Engine:
    """An engine for the warehouse; for SQLite the parent directory is created. Connects lazily."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise WarehouseError(
            f"the warehouse URL {redact(str(url))!r} cannot be parsed; use sqlite:///path/to/warehouse.db or "
            "postgresql+psycopg://user@host:5432/database (setting warehouse_url, MTL_WAREHOUSE_URL or --db)"
        ) from None
    try:
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(parsed)
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        return create_engine(parsed, pool_pre_ping=True)
    except (NoSuchModuleError, ArgumentError, ImportError) as exc:
        raise WarehouseError(
            f"the warehouse URL {parsed.render_as_string(hide_password=True)!r} names a database driver this "
            f"installation lacks ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}); the warehouse runs "
            "on sqlite:/// or postgresql+psycopg://"
        ) from None


def connection_problem(engine: Engine, exc: Exception) -> WarehouseError:
    """One line for a warehouse that refused or did not answer (the caller raises it ``from exc``)."""
    first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:300]
    return WarehouseError(
        f"cannot use the warehouse at {engine.url.render_as_string(hide_password=True)}: "
        f"{exc.__class__.__name__}: {first}"
    )


def create_schema(engine: Engine) -> None:
    """Create every table and index that is missing; existing ones and their rows are left alone."""
    metadata.create_all(engine, checkfirst=True)


def insert_ignoring_duplicates(conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> int:
    """Insert rows, skipping those whose primary key is already there. Returns how many were new."""
    if not rows:
        return 0
    dialect = conn.dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:  # pragma: no cover - only the two supported back ends are tested
        raise NotImplementedError(f"warehouse back end {dialect!r} is not supported (use sqlite or postgresql)")
    # executemany needs the same keys in every row: a key missing from some rows means NULL there.
    keys = list(dict.fromkeys(key for row in rows for key in row))
    # RETURNING counts the rows really inserted; executemany's rowcount is unreliable on PostgreSQL.
    key = list(table.primary_key.columns)[0]
    stmt = insert(table).on_conflict_do_nothing().returning(key)
    result = conn.execute(stmt, [{k: row.get(k) for k in keys} for row in rows])
    return len(result.all())


def sqlite_datetime_text(values: np.ndarray) -> np.ndarray:
    """datetime64 -> the exact text SQLAlchemy stores in SQLite ('YYYY-MM-DD HH:MM:SS.ffffff').

    SQLite compares datetimes as strings, so a value written in another format (no microseconds, a 'T')
    would sort wrongly against SQLAlchemy's bound parameters and break interval edges.
    """
    text = np.datetime_as_string(values.astype("datetime64[us]"), unit="us")
    codes = text.view(np.uint32).reshape(len(text), -1).copy()
    codes[:, 10] = ord(" ")
    return codes.view(f"<U{codes.shape[1]}").ravel()


def bulk_insert(conn: Connection, table: Table, columns: dict[str, np.ndarray]) -> int:
    """Append column-oriented numpy data fast (the simulator writes millions of rows).

    Goes straight to the driver (executemany on SQLite, COPY on PostgreSQL) with plain Python values,
    skipping SQLAlchemy's per-row parameter processing, which would dominate the simulator's run time.
    """
    names = list(columns)
    if not names or len(columns[names[0]]) == 0:
        return 0
    dialect = conn.dialect.name
    prepared = []
    for array in columns.values():
        array = np.asarray(array)
        if np.issubdtype(array.dtype, np.datetime64):
            array = sqlite_datetime_text(array) if dialect == "sqlite" else array.astype("datetime64[us]")
        prepared.append(array.tolist())
    rows = list(zip(*prepared, strict=True))
    column_list = ", ".join(names)
    if dialect == "postgresql":
        raw = conn.connection.driver_connection
        with raw.cursor() as cursor, cursor.copy(f"COPY {table.name} ({column_list}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        return len(rows)
    if dialect != "sqlite":  # pragma: no cover - only the two supported back ends are tested
        raise NotImplementedError(f"warehouse back end {dialect!r} is not supported (use sqlite or postgresql)")
    placeholders = ", ".join("?" for _ in names)
    cursor = conn.connection.driver_connection.cursor()
    cursor.executemany(f"INSERT INTO {table.name} ({column_list}) VALUES ({placeholders})", rows)
    return len(rows)
