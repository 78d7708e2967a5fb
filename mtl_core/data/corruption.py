"""Deliberate corruption of a warehouse interval: the bad batches validation must stop (tests and the demo).

Each kind is a failure seen in real pipelines, done the way it would really reach the warehouse.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.engine import Engine

from mtl_core.data import warehouse as wh
from mtl_core.data.extract import parse_instant

# kind -> what it does to the rows of [start, end) and which check of mtl_core.quality catches it. Each is a
# failure seen in real pipelines, done the way it would really reach the warehouse.
CORRUPTION_KINDS: dict[str, str] = {
    "null_ids": "a migration dropped NOT NULL on behavior_events.user_id and a producer then wrote NULL user ids "
    "for 2 % of the interval's events (the schema forbids NULL, so the constraint is relaxed first: on SQLite by "
    "rebuilding the table, on PostgreSQL by ALTER COLUMN ... DROP NOT NULL)",
    "bad_event_types": "a client release logs 'clik' instead of 'click' for 5 % of the interval's clicks",
    "negative_prices": "a currency conversion flips the sign of the price of the items created in the interval "
    "(or, when none were, of the five newest items)",
    "duplicate_events": "an at-least-once producer re-sends 3 % of the interval's behaviour events under new "
    "event ids (same user, item, type, time, session and parent); the primary key cannot catch it",
    "volume_collapse": "90 % of the interval's behaviour and ad events are lost (a collector was down)",
    "bad_titles": "the catalogue import writes empty titles for the items created in the interval (or, when none "
    "were, the five newest items)",
    "label_leak": "a backfill writes the click outcome into position: 1 for clicked impressions, 0 otherwise",
    "lost_clicks": "click tracking breaks: every click event of the interval is missing",
}
CAUGHT_BY = {
    "null_ids": "behavior_events.user_id expect_column_values_to_not_be_null",
    "bad_event_types": "behavior_events.event_type expect_column_values_to_be_in_set",
    "negative_prices": "items.price expect_column_values_to_be_between",
    "duplicate_events": "behavior_events expect_compound_columns_to_be_unique",
    "volume_collapse": "expect_table_row_count_to_be_between against the previous snapshot",
    "bad_titles": "items.title expect_column_value_lengths_to_be_between",
    "label_leak": "behavior_events.position expect_no_label_leakage",
    "lost_clicks": "behavior_events expect_label_rate_to_be_between (ctr)",
}


def corrupt_interval(
    engine: Engine,
    start: str | datetime,
    end: str | datetime,
    kinds: tuple[str, ...] = ("null_ids", "bad_event_types", "negative_prices", "duplicate_events", "volume_collapse"),
    seed: int = 0,
) -> dict:
    """Damage the warehouse rows of [start, end) on purpose, so validation can be shown to stop the run.

    ``kinds`` are applied in the given order (see CORRUPTION_KINDS for each); returns, per kind, the table and
    column touched, how many rows, what was done and which check should catch it. Deterministic given the
    seed. Only for test and demo warehouses: the damage is not undone.
    """
    from sqlalchemy import func

    unknown = [kind for kind in kinds if kind not in CORRUPTION_KINDS]
    if unknown:
        raise ValueError(f"unknown corruption kind(s) {unknown}; known: {', '.join(CORRUPTION_KINDS)}")
    start_at, end_at = parse_instant(start, "start"), parse_instant(end, "end")
    rng = np.random.default_rng(seed)
    done: dict[str, dict] = {}
    be, items = wh.behavior_events, wh.items
    with engine.begin() as conn:
        for kind in kinds:
            touched: dict = {"table": "behavior_events", "column": None}
            if kind == "null_ids":
                _relax_not_null(conn, be, "user_id")
                ids = _share(rng, _interval_ids(conn, be, start_at, end_at), 0.02)
                rows = _update_ids(conn, be, ids, {"user_id": None})
                touched["column"] = "user_id"
            elif kind == "bad_event_types":
                clicks = _interval_ids(conn, be, start_at, end_at, be.c.event_type == "click")
                ids = _share(rng, clicks if len(clicks) else _interval_ids(conn, be, start_at, end_at), 0.05)
                rows = _update_ids(conn, be, ids, {"event_type": "clik"})
                touched["column"] = "event_type"
            elif kind == "negative_prices":
                ids = _new_items(conn, start_at, end_at, items.c.price.is_not(None))
                rows = _update_ids(conn, items, ids, {"price": -func.abs(items.c.price)}, key="item_id")
                touched.update(table="items", column="price")
            elif kind == "bad_titles":
                ids = _new_items(conn, start_at, end_at, items.c.title.is_not(None))
                rows = _update_ids(conn, items, ids, {"title": ""}, key="item_id")
                touched.update(table="items", column="title")
            elif kind == "duplicate_events":
                ids = _share(rng, _interval_ids(conn, be, start_at, end_at), 0.03)
                rows = _resend(conn, ids)
            elif kind == "volume_collapse":
                rows = 0
                for table in (be, wh.ad_events):
                    ids = _share(rng, _interval_ids(conn, table, start_at, end_at), 0.9)
                    rows += _delete_ids(conn, table, ids)
                touched["table"] = "behavior_events, ad_events"
            elif kind == "label_leak":
                rows = _leak_click_into_position(conn, start_at, end_at)
                touched["column"] = "position"
            else:  # lost_clicks
                rows = _delete_ids(conn, be, _interval_ids(conn, be, start_at, end_at, be.c.event_type == "click"))
                touched["column"] = "event_type"
            done[kind] = {**touched, "rows": int(rows), "what": CORRUPTION_KINDS[kind], "caught_by": CAUGHT_BY[kind]}
    return done


def _interval_ids(conn, table, start: datetime, end: datetime, where=None) -> np.ndarray:
    stmt = select(table.c.event_id).where(table.c.ts >= start, table.c.ts < end)
    if where is not None:
        stmt = stmt.where(where)
    return np.asarray(conn.execute(stmt.order_by(table.c.event_id)).scalars().all(), dtype=np.int64)


def _share(rng: np.random.Generator, ids: np.ndarray, share: float) -> np.ndarray:
    """A random ``share`` of ``ids`` (at least one when there are any), in id order."""
    if len(ids) == 0:
        return ids
    count = max(1, int(round(share * len(ids))))
    return np.sort(rng.choice(ids, size=min(count, len(ids)), replace=False))


def _id_chunks(ids: np.ndarray, size: int = 5_000):
    # SQLite limits the number of bound parameters of one statement.
    for begin in range(0, len(ids), size):
        yield [int(i) for i in ids[begin : begin + size]]


def _update_ids(conn, table, ids: np.ndarray, values: dict, key: str = "event_id") -> int:
    from sqlalchemy import update

    rows = 0
    for chunk in _id_chunks(ids):
        rows += conn.execute(update(table).where(table.c[key].in_(chunk)).values(**values)).rowcount
    return rows


def _delete_ids(conn, table, ids: np.ndarray) -> int:
    rows = 0
    for chunk in _id_chunks(ids):
        rows += conn.execute(delete(table).where(table.c.event_id.in_(chunk))).rowcount
    return rows


def _new_items(conn, start: datetime, end: datetime, where) -> np.ndarray:
    """Items created in the interval, or the five newest before its end when none were."""
    items = wh.items
    created = select(items.c.item_id).where(where, items.c.created_ts >= start, items.c.created_ts < end)
    ids = conn.execute(created).scalars().all()
    if not ids:
        newest = select(items.c.item_id).where(where, items.c.created_ts < end).order_by(items.c.created_ts.desc())
        ids = conn.execute(newest.limit(5)).scalars().all()
    return np.asarray(sorted(ids), dtype=np.int64)


def _resend(conn, ids: np.ndarray) -> int:
    """Insert copies of the given behaviour events under fresh event ids (a producer's retry)."""
    from sqlalchemy import func

    be = wh.behavior_events
    next_id = int(conn.execute(select(func.max(be.c.event_id))).scalar_one() or 0) + 1
    rows = []
    for chunk in _id_chunks(ids):
        rows += [dict(row) for row in conn.execute(select(be).where(be.c.event_id.in_(chunk))).mappings()]
    for offset, row in enumerate(rows):
        row["event_id"] = next_id + offset
    if rows:
        conn.execute(be.insert(), rows)
    return len(rows)


def _leak_click_into_position(conn, start: datetime, end: datetime) -> int:
    from sqlalchemy import case, update

    be = wh.behavior_events
    clicked = select(be.c.parent_event_id).where(be.c.event_type == "click", be.c.parent_event_id.is_not(None))
    stmt = (
        update(be)
        .where(be.c.event_type == "impression", be.c.ts >= start, be.c.ts < end)
        .values(position=case((be.c.event_id.in_(clicked.scalar_subquery()), 1), else_=0))
    )
    return conn.execute(stmt).rowcount


def _relax_not_null(conn, table, column: str) -> None:
    """Drop NOT NULL from one column, as a careless migration would (SQLite cannot ALTER a column: rebuild)."""
    from sqlalchemy import MetaData, text

    if conn.dialect.name == "postgresql":
        conn.execute(text(f"ALTER TABLE {table.name} ALTER COLUMN {column} DROP NOT NULL"))
        return
    relaxed = table.to_metadata(MetaData())
    relaxed.c[column].nullable = True
    old = f"{table.name}__before_corruption"
    for index in table.indexes:
        conn.execute(text(f"DROP INDEX IF EXISTS {index.name}"))
    conn.execute(text(f"ALTER TABLE {table.name} RENAME TO {old}"))
    relaxed.create(conn)
    names = ", ".join(c.name for c in table.columns)
    conn.execute(text(f"INSERT INTO {table.name} ({names}) SELECT {names} FROM {old}"))
    conn.execute(text(f"DROP TABLE {old}"))
