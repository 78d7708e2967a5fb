"""The warehouse schema on SQLite and on the local PostgreSQL server."""

from __future__ import annotations

from datetime import datetime

import numpy as np
from sqlalchemy import func, inspect, select

from mtl_core.data import warehouse as wh


def test_schema_is_created_idempotently_and_keeps_rows(any_url):
    engine = wh.make_engine(any_url)
    wh.create_schema(engine)
    with engine.begin() as conn:
        wh.insert_ignoring_duplicates(conn, wh.users, [{"user_id": 1, "region": "north"}])
    wh.create_schema(engine)  # again: nothing dropped, nothing duplicated
    names = set(inspect(engine).get_table_names())
    assert {"users", "items", "behavior_events", "ad_events", "truth_events", "truth_users"} <= names
    columns = {c["name"] for c in inspect(engine).get_columns("items")}
    assert {"title", "category", "brand", "price"} <= columns
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(wh.users)).scalar_one() == 1
    engine.dispose()


def test_bulk_insert_and_duplicate_ignoring_insert(any_url):
    engine = wh.make_engine(any_url)
    wh.create_schema(engine)
    ts = np.array(["2026-01-05T10:00:00", "2026-01-05T10:00:00.250"], dtype="datetime64[us]")
    with engine.begin() as conn:
        wh.bulk_insert(
            conn,
            wh.ad_events,
            {
                "event_id": np.array([1, 2]),
                "user_id": np.array([7, 7]),
                "ad_id": np.array([3, 3]),
                "item_id": np.array([9, 9]),
                "ad_text": np.array(["Free shipping on X", None], dtype=object),
                "event_type": np.array(["ad_impression", "ad_click"], dtype=object),
                "ts": ts,
                "session_id": np.array([5, 5]),
                "parent_event_id": np.array([None, 1], dtype=object),
            },
        )
        new = wh.insert_ignoring_duplicates(conn, wh.items, [{"item_id": 9, "title": "a"}, {"item_id": 10}])
        again = wh.insert_ignoring_duplicates(conn, wh.items, [{"item_id": 9, "title": "b"}])
    assert (new, again) == (2, 0)
    with engine.connect() as conn:
        rows = conn.execute(select(wh.ad_events).order_by(wh.ad_events.c.event_id)).all()
        title = conn.execute(select(wh.items.c.title).where(wh.items.c.item_id == 9)).scalar_one()
        # bound datetimes compare correctly with bulk-written ones (SQLite compares text)
        at = conn.execute(select(func.count()).where(wh.ad_events.c.ts >= datetime(2026, 1, 5, 10, 0, 0, 250000)))
        assert at.scalar_one() == 1
    assert rows[1].ts == datetime(2026, 1, 5, 10, 0, 0, 250000) and rows[1].parent_event_id == 1
    assert rows[1].ad_text is None and title == "a"
    engine.dispose()


def test_sqlite_text_matches_sqlalchemy_storage_format():
    text = wh.sqlite_datetime_text(np.array(["2026-01-05T00:00:00"], dtype="datetime64[s]"))
    assert text.tolist() == ["2026-01-05 00:00:00.000000"]
