"""Deliberate corruption of a warehouse interval: the bad batches validation must stop (tests and the demo).

Each kind is a failure seen in real pipelines, done the way it would really reach the warehouse. Two kinds never
reach validation: a value the warehouse stores against its column's type (``type_change``, a price written as
text) or as bytes that are not UTF-8 (``invalid_utf8_titles``) cannot be written into the snapshot's typed
Parquet, so extraction stops and names the table and column (``mtl_core.data.stored_values``).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
from sqlalchemy import bindparam, delete, func, select, text, update
from sqlalchemy.engine import Engine

from mtl_core.data import warehouse as wh
from mtl_core.data.extract import parse_instant

# kind -> what it does to the rows of [start, end), done the way it would really reach the warehouse. Events
# whose ts lies outside the interval never reach its snapshot (extraction cuts events by ts and takes users
# and items as of the interval's end), so the time kinds damage what does survive: dimension rows stamped in
# the future and event times moved against the events they follow.
CORRUPTION_KINDS: dict[str, str] = {
    "null_ids": "a migration dropped NOT NULL on behavior_events.user_id and a producer then wrote NULL user ids "
    "for 2 % of the interval's events (the schema forbids NULL, so the constraint is relaxed first: on SQLite by "
    "rebuilding the table, on PostgreSQL by ALTER COLUMN ... DROP NOT NULL)",
    "bad_event_types": "a client release logs 'clik' instead of 'click' for 5 % of the interval's clicks",
    "negative_prices": "a currency conversion flips the sign of the price of the items created in the interval "
    "(or, when none were, of the five newest items)",
    "absurd_prices": "a unit bug writes the prices of the items created in the interval (or the five newest) in "
    "micro-units: a million times too high",
    "future_timestamps": "the account service's clock is a year ahead: users who signed up in the interval (or the "
    "five newest) get signup_ts a year in the future. As of the interval's end they do not exist yet, so "
    "extraction leaves them out and their events name users the snapshot lacks",
    "shifted_timestamps": "the click collector moves to a host on local time (UTC-5) and writes it as UTC: the "
    "interval's clicks are stamped 5 h early, before the impressions they follow (those of the interval's first "
    "hours land before its start)",
    "duplicate_events": "an at-least-once producer re-sends 3 % of the interval's behaviour events under new "
    "event ids (same user, item, type, time, session and parent); the primary key cannot catch it",
    "volume_collapse": "a collector was down most of the interval: 90 % of its sessions lost all their behaviour "
    "and ad events",
    "empty_interval": "the loader ran and reported success but wrote nothing: the interval has no behaviour or ad "
    "events at all",
    "label_leak": "a backfill writes the click outcome into position: 1 for clicked impressions, 0 otherwise",
    "bad_titles": "the catalogue import writes empty titles for the items created in the interval (or, when none "
    "were, the five newest items)",
    "huge_titles": "a scraper writes the whole product page (100 kB of HTML) into the title of the items created "
    "in the interval (or the five newest)",
    "invalid_utf8_titles": "a catalogue feed in Latin-1 is loaded byte for byte (sqlite3 .import, a C loader): the "
    "titles of the items created in the interval (or the five newest) are TEXT that is not valid UTF-8. SQLite "
    "only; PostgreSQL refuses such bytes itself (see undecodable_titles for what gets through there)",
    "undecodable_titles": "the catalogue loader decodes a Latin-1 feed as UTF-8 with errors='replace': the titles "
    "of the items created in the interval (or the five newest) carry U+FFFD where accented letters were",
    "clicks_without_impressions": "the impression beacon is blocked in 30 % of the interval's sessions (an "
    "ad-blocker rule): their impressions never arrive while their clicks, logged server-side, do",
    "purchases_without_clicks": "the order service backfills orders placed outside the feed (search, reorders) "
    "as purchase events with no parent, half as many as the interval's feed purchases: purchases no click led to",
    "purchases_out_of_window": "a late batch loads the interval's purchases stamped with its load time, 14 days "
    "on: past the interval's end, so its clicks and carts keep no purchase (silent label loss)",
    "unknown_category_items": "a category is launched in the interval but its catalogue import fails: 10 % of "
    "the interval's feed sessions show its items, new item ids of which the items table has no row",
    "type_change": "a producer release writes price as formatted text ('12,50') for the items created in the "
    "interval (or the five newest): SQLite keeps the text in the REAL column (on PostgreSQL a migration first "
    "changes the column to text)",
    "lost_clicks": "click tracking breaks: every click event of the interval is missing",
}
# kind -> the check of mtl_core.quality (or the step) that stops it. When the damaged interval is the newest week
# of a longer window, the whole-window bounds are diluted and the newest-week checks catch it.
CAUGHT_BY = {
    "null_ids": "behavior_events.user_id expect_column_values_to_not_be_null",
    "bad_event_types": "behavior_events.event_type expect_column_values_to_be_in_set",
    "negative_prices": "items.price expect_column_values_to_be_between",
    "absurd_prices": "items.price expect_column_values_to_be_between",
    "future_timestamps": "behavior_events.user_id expect_ids_to_exist_in_dimension_table",
    "shifted_timestamps": "behavior_events.ts expect_events_not_before_their_parent",
    "duplicate_events": "behavior_events expect_compound_columns_to_be_unique",
    "volume_collapse": "expect_table_row_count_to_be_between against the previous snapshot; "
    "expect_newest_week_volume_like_history when it is the newest week of a longer window",
    "empty_interval": "behavior_events.ts expect_newest_week_volume_like_history (a snapshot of the interval alone: "
    "expect_table_row_count_to_be_between)",
    "label_leak": "behavior_events.position expect_no_label_leakage",
    "bad_titles": "items.title expect_column_value_lengths_to_be_between",
    "huge_titles": "items.title expect_column_value_lengths_to_be_between",
    "invalid_utf8_titles": "extraction: items.title stored_value_problems (not valid UTF-8)",
    "undecodable_titles": "items.title expect_column_values_to_not_match_regex",
    "clicks_without_impressions": "behavior_events.parent_event_id expect_parent_links_to_resolve",
    "purchases_without_clicks": "behavior_events.parent_event_id expect_parent_links_to_resolve",
    "purchases_out_of_window": "behavior_events.event_type expect_newest_week_label_rate_like_history (cvr) (a "
    "snapshot of the interval alone: expect_label_rate_to_be_between)",
    "unknown_category_items": "behavior_events.item_id expect_ids_to_exist_in_dimension_table",
    "type_change": "extraction: items.price stored_value_problems (stored as text)",
    "lost_clicks": "behavior_events.event_type expect_label_rate_to_be_between (ctr); "
    "expect_newest_week_label_rate_like_history when it is the newest week of a longer window",
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
    unknown = [kind for kind in kinds if kind not in CORRUPTION_KINDS]
    if unknown:
        raise ValueError(f"unknown corruption kind(s) {unknown}; known: {', '.join(CORRUPTION_KINDS)}")
    start_at, end_at = parse_instant(start, "start"), parse_instant(end, "end")
    rng = np.random.default_rng(seed)
    done: dict[str, dict] = {}
    with engine.begin() as conn:
        for kind in kinds:
            table, column, rows = _DAMAGE[kind](conn, rng, start_at, end_at)
            done[kind] = {
                "table": table,
                "column": column,
                "rows": int(rows),
                "what": CORRUPTION_KINDS[kind],
                "caught_by": CAUGHT_BY[kind],
            }
    return done


# ---- the kinds: each (conn, rng, start, end) -> (table, column, rows touched) ---------------------------------
_BE = wh.behavior_events


def _null_ids(conn, rng, start, end):
    _relax_not_null(conn, _BE, "user_id")
    ids = _share(rng, _interval_ids(conn, _BE, start, end), 0.02)
    return "behavior_events", "user_id", _update_ids(conn, _BE, ids, {"user_id": None})


def _bad_event_types(conn, rng, start, end):
    clicks = _interval_ids(conn, _BE, start, end, _BE.c.event_type == "click")
    ids = _share(rng, clicks if len(clicks) else _interval_ids(conn, _BE, start, end), 0.05)
    return "behavior_events", "event_type", _update_ids(conn, _BE, ids, {"event_type": "clik"})


def _scaled_prices(factor: float):
    def damage(conn, rng, start, end):
        items = wh.items
        ids = _new_items(conn, start, end, items.c.price.is_not(None))
        price = -func.abs(items.c.price) if factor < 0 else items.c.price * factor
        return "items", "price", _update_ids(conn, items, ids, {"price": price}, key="item_id")

    return damage


def _future_timestamps(conn, rng, start, end):
    users = wh.users
    created = select(users.c.user_id).where(users.c.signup_ts >= start, users.c.signup_ts < end)
    ids = conn.execute(created).scalars().all()
    if not ids:
        newest = select(users.c.user_id).where(users.c.signup_ts < end).order_by(users.c.signup_ts.desc())
        ids = conn.execute(newest.limit(5)).scalars().all()
    rows = _shift(conn, users, "user_id", np.asarray(sorted(ids), dtype=np.int64), "signup_ts", timedelta(days=365))
    return "users", "signup_ts", rows


def _shifted_timestamps(conn, rng, start, end):
    ids = _interval_ids(conn, _BE, start, end, _BE.c.event_type == "click")
    return "behavior_events", "ts", _shift(conn, _BE, "event_id", ids, "ts", -timedelta(hours=5))


def _duplicate_events(conn, rng, start, end):
    return "behavior_events", None, _resend(conn, _share(rng, _interval_ids(conn, _BE, start, end), 0.03))


def _lost_sessions(share: float):
    """Delete every behaviour and ad event of ``share`` of the interval's sessions: an outage loses whole
    sessions, so the events that remain still follow their parents. Events without a session (imported logs)
    are lost one by one."""

    def damage(conn, rng, start, end):
        tables = (_BE, wh.ad_events)
        found = {table.name: _session_rows(conn, table, start, end) for table in tables}
        sessions = np.unique(np.concatenate([s[s >= 0] for _, s in found.values()]))
        lost = _share(rng, sessions, share) if share < 1 else sessions
        rows = 0
        for table in tables:
            ids, session = found[table.name]
            alone = ids[session < 0]
            doomed = np.concatenate([ids[np.isin(session, lost)], alone if share >= 1 else _share(rng, alone, share)])
            rows += _delete_ids(conn, table, np.sort(doomed))
        return "behavior_events, ad_events", None, rows

    return damage


def _session_rows(conn, table, start: datetime, end: datetime, where=None) -> tuple[np.ndarray, np.ndarray]:
    """Event ids of the interval and their session ids (-1 for none)."""
    stmt = select(table.c.event_id, func.coalesce(table.c.session_id, -1)).where(table.c.ts >= start, table.c.ts < end)
    rows = conn.execute(stmt.where(where) if where is not None else stmt).all()
    if not rows:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    ids, sessions = np.asarray(rows, dtype=np.int64).T
    return ids, sessions


def _label_leak(conn, rng, start, end):
    return "behavior_events", "position", _leak_click_into_position(conn, start, end)


def _titles(make):
    """Rewrite the titles of the interval's new items (or the five newest) with ``make(title)``."""

    def damage(conn, rng, start, end):
        items = wh.items
        ids = _new_items(conn, start, end, items.c.title.is_not(None))
        found = select(items.c.item_id, items.c.title).where(items.c.item_id.in_(ids.tolist()))
        titles = {key: title for key, title in conn.execute(found)}
        values = [{"key": int(i), "title": make(titles[int(i)])} for i in ids]
        if values and isinstance(values[0]["title"], bytes):
            if conn.dialect.name != "sqlite":
                raise ValueError(
                    "invalid_utf8_titles: PostgreSQL refuses invalid UTF-8 itself, so such titles cannot reach "
                    "its warehouse; use undecodable_titles for what a loader lets through"
                )
            statement = text("UPDATE items SET title = CAST(:title AS TEXT) WHERE item_id = :key")
        else:
            statement = text("UPDATE items SET title = :title WHERE item_id = :key")
        if values:
            conn.execute(statement, values)
        return "items", "title", len(values)

    return damage


def _product_page(title: str) -> str:
    row = f"<li class='spec'><span>{title}</span><a href='/similar?q={title.replace(' ', '+')}'>similar</a></li>"
    page = f"<html><body><div class='product'><h1>{title}</h1><ul>" + row * (TITLE_PAGE_CHARS // len(row) + 1)
    return page[:TITLE_PAGE_CHARS]


def _clicks_without_impressions(conn, rng, start, end):
    ids, sessions = _session_rows(conn, _BE, start, end, _BE.c.event_type == "impression")
    blocked = _share(rng, np.unique(sessions[sessions >= 0]), 0.3)
    return "behavior_events", "parent_event_id", _delete_ids(conn, _BE, np.sort(ids[np.isin(sessions, blocked)]))


def _purchases_without_clicks(conn, rng, start, end):
    purchases = len(_interval_ids(conn, _BE, start, end, _BE.c.event_type == "purchase"))
    impressions = conn.execute(
        select(_BE.c.user_id, _BE.c.item_id, _BE.c.ts).where(
            _BE.c.ts >= start, _BE.c.ts < end, _BE.c.event_type == "impression"
        )
    ).all()
    if not impressions:
        return "behavior_events", "parent_event_id", 0
    count = max(20, round(0.5 * purchases))
    picked = rng.choice(len(impressions), size=count, replace=count > len(impressions))
    delays = rng.integers(60, 3600, count)
    next_id = int(conn.execute(select(func.max(_BE.c.event_id))).scalar_one() or 0) + 1
    rows = []
    for offset, (row, delay) in enumerate(zip(picked, delays, strict=True)):
        user, item, ts = impressions[int(row)]
        when = ts + timedelta(seconds=int(delay))
        rows.append(
            {
                "event_id": next_id + offset,
                "user_id": user,
                "item_id": item,
                "event_type": "purchase",
                "ts": when if when < end else ts,
                "session_id": None,
                "parent_event_id": None,
                "position": None,
            }
        )
    conn.execute(_BE.insert(), rows)
    return "behavior_events", "parent_event_id", len(rows)


def _purchases_out_of_window(conn, rng, start, end):
    ids = _interval_ids(conn, _BE, start, end, _BE.c.event_type == "purchase")
    return "behavior_events", "ts", _shift(conn, _BE, "event_id", ids, "ts", timedelta(days=14))


def _unknown_category_items(conn, rng, start, end):
    in_interval = (_BE.c.ts >= start, _BE.c.ts < end)
    sessions = conn.execute(select(_BE.c.session_id).distinct().where(*in_interval, _BE.c.session_id.is_not(None)))
    chosen = _share(rng, np.asarray(sorted(sessions.scalars().all()), dtype=np.int64), 0.1)
    first_new = int(conn.execute(select(func.max(wh.items.c.item_id))).scalar_one() or 0) + 1
    rows = 0
    for chunk in _id_chunks(chosen):
        stmt = (
            update(_BE)
            .where(*in_interval, _BE.c.session_id.in_(chunk))
            .values(item_id=first_new + _BE.c.item_id % NEW_CATEGORY_ITEMS)
        )
        rows += conn.execute(stmt).rowcount
    return "behavior_events", "item_id", rows


def _type_change(conn, rng, start, end):
    items = wh.items
    ids = _new_items(conn, start, end, items.c.price.is_not(None))
    found = select(items.c.item_id, items.c.price).where(items.c.item_id.in_(ids.tolist()))
    prices = {key: price for key, price in conn.execute(found)}
    if conn.dialect.name == "postgresql":
        conn.execute(text("ALTER TABLE items ALTER COLUMN price TYPE text USING price::text"))
    values = [{"key": int(i), "price": f"{prices[int(i)]:.2f}".replace(".", ",")} for i in ids]
    if values:
        conn.execute(text("UPDATE items SET price = :price WHERE item_id = :key"), values)
    return "items", "price", len(values)


def _lost_clicks(conn, rng, start, end):
    ids = _interval_ids(conn, _BE, start, end, _BE.c.event_type == "click")
    return "behavior_events", "event_type", _delete_ids(conn, _BE, ids)


TITLE_PAGE_CHARS = 100_000  # huge_titles: a whole product page
NEW_CATEGORY_ITEMS = 25  # unknown_category_items: how many new item ids the launched category has
_DAMAGE = {
    "null_ids": _null_ids,
    "bad_event_types": _bad_event_types,
    "negative_prices": _scaled_prices(-1.0),
    "absurd_prices": _scaled_prices(1e6),
    "future_timestamps": _future_timestamps,
    "shifted_timestamps": _shifted_timestamps,
    "duplicate_events": _duplicate_events,
    "volume_collapse": _lost_sessions(0.9),
    "empty_interval": _lost_sessions(1.0),
    "label_leak": _label_leak,
    "bad_titles": _titles(lambda title: ""),
    "huge_titles": _titles(_product_page),
    "invalid_utf8_titles": _titles(lambda title: title.encode() + " Caf\xe9 cr\xe8me".encode("latin-1")),
    "undecodable_titles": _titles(lambda title: f"{title} Caf\ufffd cr\ufffdme"),
    "clicks_without_impressions": _clicks_without_impressions,
    "purchases_without_clicks": _purchases_without_clicks,
    "purchases_out_of_window": _purchases_out_of_window,
    "unknown_category_items": _unknown_category_items,
    "type_change": _type_change,
    "lost_clicks": _lost_clicks,
}


def _shift(conn, table, key: str, ids: np.ndarray, column: str, delta: timedelta) -> int:
    """Move ``column`` (a time) of the given rows by ``delta``."""
    moved = []
    for chunk in _id_chunks(ids):
        found = conn.execute(select(table.c[key], table.c[column]).where(table.c[key].in_(chunk)))
        moved += [{"_key": k, "_when": when + delta} for k, when in found if when is not None]
    if moved:
        stmt = update(table).where(table.c[key] == bindparam("_key")).values({column: bindparam("_when")})
        conn.execute(stmt, moved)
    return len(moved)


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
    from sqlalchemy import case

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
    from sqlalchemy import MetaData

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
