"""Day partitions: a window reads only the days it has not seen, a changed day is read again and replaced alone,
the window's digest follows the days' content, a day's identity holds the key, PostgreSQL streams.

A handful of events over six days (eight a day), on SQLite and on PostgreSQL (``any_url``): each test is fast.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import numpy as np
import pyarrow.parquet as pq
import pytest
from sqlalchemy import event, update
from sqlalchemy.exc import OperationalError
from support import PSEUDONYMS

from mtl_core.data import days as day_store
from mtl_core.data import extract as ingest
from mtl_core.data import warehouse as wh
from mtl_core.data.extract import (
    ExtractionError,
    SnapshotIntegrityError,
    extract_snapshot,
    read_snapshot_table,
    table_files,
    verify_snapshot,
)
from mtl_core.data.pseudonyms import Pseudonymiser

DAY0 = datetime(2026, 3, 2)
DAYS = 6
PER_DAY = 8
TYPES = ("impression", "impression", "click", "impression", "purchase", "favorite", "add_to_cart", "impression")


def _insert(engine, first_id: int, times: list[datetime]) -> None:
    n = len(times)
    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    kinds = [TYPES[i % len(TYPES)] for i in ids]
    columns = {
        "event_id": ids,
        "user_id": 1 + ids % 7,
        "item_id": 1 + ids % 5,
        "event_type": np.asarray(kinds, dtype=object),
        "ts": np.asarray(times, dtype="datetime64[us]"),
        "session_id": ids // 4,
        # NULL for impressions: a chunk of a few rows may hold none, one of a day always some
        "parent_event_id": np.asarray(
            [None if k == "impression" else int(i) - 1 for k, i in zip(kinds, ids, strict=True)], dtype=object
        ),
    }
    with engine.begin() as conn:
        wh.bulk_insert(conn, wh.behavior_events, columns)


@pytest.fixture
def warehouse(any_url):
    engine = wh.make_engine(any_url)
    wh.create_schema(engine)
    times = [DAY0 + timedelta(days=d, hours=3 * h) for d in range(DAYS) for h in range(PER_DAY)]
    _insert(engine, 1, times)
    yield engine
    engine.dispose()


class _Reads:
    """The warehouse queries an extraction sends: row reads per table (and the cursor class) and checksums."""

    def __init__(self, engine):
        self.rows: dict[str, int] = {}
        self.checksums = 0
        self.cursors: set[str] = set()
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, conn, cursor, statement, parameters, context, executemany):
        if "count(*)" in statement:
            self.checksums += 1
            return
        for table in wh.EVENT_TABLES:
            if statement.lstrip().startswith(f"SELECT {table}.event_id"):
                self.rows[table] = self.rows.get(table, 0) + 1
                self.cursors.add(type(cursor).__name__)


def _this_run(manifest, table="behavior_events") -> dict[str, str]:
    return {p["day"]: p["this_run"] for p in manifest["tables"][table]["parts"]}


def _day(n: int) -> str:
    return (DAY0 + timedelta(days=n)).date().isoformat()


def test_a_second_window_reads_only_the_days_it_has_not_seen(warehouse, tmp_path):
    first = extract_snapshot(warehouse, DAY0, DAY0 + timedelta(days=4), tmp_path / "a", PSEUDONYMS)
    assert set(_this_run(first).values()) == {"extracted"} and first["tables"]["behavior_events"]["rows"] == 32
    days_before = {p: p.stat().st_mtime_ns for p in table_files(tmp_path / "a", "behavior_events")}

    reads = _Reads(warehouse)
    second = extract_snapshot(warehouse, DAY0 + timedelta(days=2), DAY0 + timedelta(days=6), tmp_path / "b", PSEUDONYMS)

    assert _this_run(second) == {_day(2): "reused", _day(3): "reused", _day(4): "extracted", _day(5): "extracted"}
    assert reads.rows == {"behavior_events": 2, "ad_events": 2}  # one query per new day and table
    assert reads.checksums == 2  # one checksum query per event table for the whole window
    assert second["rows_read"] == 2 * PER_DAY  # the dimension tables are empty here
    assert {p: p.stat().st_mtime_ns for p in days_before} == days_before  # the old days' files were not rewritten
    got = read_snapshot_table(tmp_path / "b", "behavior_events").to_pandas()
    assert len(got) == 4 * PER_DAY and got["ts"].is_monotonic_increasing
    assert verify_snapshot(tmp_path / "b") == second


def test_a_late_event_replaces_its_day_and_leaves_the_others_alone(warehouse, tmp_path):
    old = extract_snapshot(warehouse, DAY0, DAY0 + timedelta(days=DAYS), tmp_path / "old", PSEUDONYMS)
    files = table_files(tmp_path / "old", "behavior_events")
    stamps = {p: p.stat().st_mtime_ns for p in files}
    _insert(warehouse, 10_000, [DAY0 + timedelta(days=1, hours=23, minutes=59)])  # a late event of day 1

    reads = _Reads(warehouse)
    new = extract_snapshot(warehouse, DAY0, DAY0 + timedelta(days=DAYS), tmp_path / "new", PSEUDONYMS)

    assert _this_run(new) == {_day(d): "replaced" if d == 1 else "reused" for d in range(DAYS)}
    assert reads.rows["behavior_events"] == 1
    assert [p for p in files if p.stat().st_mtime_ns != stamps[p]] == [files[1]]  # only day 1 was rewritten
    assert 10_000 in read_snapshot_table(tmp_path / "new", "behavior_events")["event_id"].to_pylist()
    assert new["content_hash"] != old["content_hash"]
    record = day_store.read_day_record(files[1])
    assert record["rows"] == PER_DAY + 1 and record["checksum"]["rows"] == PER_DAY + 1
    # The older window still lists the day as it was: verification names the day that changed under it.
    with pytest.raises(SnapshotIntegrityError, match=rf"behavior_events day {_day(1)} .*replaced after this window"):
        verify_snapshot(tmp_path / "old")


def test_a_correction_in_place_is_seen_by_the_checksum(warehouse, tmp_path):
    """Same rows, same ids, same times: only a value changed (a type fixed by a backfill, an event re-attributed)."""
    extract_snapshot(warehouse, DAY0, DAY0 + timedelta(days=DAYS), tmp_path / "a", PSEUDONYMS)
    be = wh.behavior_events
    with warehouse.begin() as conn:
        conn.execute(update(be).where(be.c.event_id == 3 * PER_DAY + 5).values(event_type="purchase"))  # was favorite
    again = extract_snapshot(warehouse, DAY0, DAY0 + timedelta(days=DAYS), tmp_path / "a", PSEUDONYMS)
    assert [d for d, how in _this_run(again).items() if how != "reused"] == [_day(3)]
    # two events of one day swapping their users: a per-column sum would not move
    with warehouse.begin() as conn:
        conn.execute(update(be).where(be.c.event_id == 4 * PER_DAY + 1).values(user_id=1 + (4 * PER_DAY + 2) % 7))
        conn.execute(update(be).where(be.c.event_id == 4 * PER_DAY + 2).values(user_id=1 + (4 * PER_DAY + 1) % 7))
    again = extract_snapshot(warehouse, DAY0, DAY0 + timedelta(days=DAYS), tmp_path / "a", PSEUDONYMS)
    assert [d for d, how in _this_run(again).items() if how != "reused"] == [_day(4)]


def test_the_window_digest_is_the_days_content(warehouse, tmp_path):
    span = (DAY0, DAY0 + timedelta(days=DAYS))
    first = extract_snapshot(warehouse, *span, tmp_path / "one" / "w", PSEUDONYMS)
    reused = extract_snapshot(warehouse, *span, tmp_path / "one" / "w2", PSEUDONYMS)
    # its own day store, chunks of 3 rows: some with a NULL parent_event_id, some without
    fresh = extract_snapshot(warehouse, *span, tmp_path / "two" / "w", PSEUDONYMS, chunk_rows=3)
    assert set(_this_run(reused).values()) == {"reused"} and set(_this_run(fresh).values()) == {"extracted"}
    assert first["content_hash"] == reused["content_hash"] == fresh["content_hash"]
    shorter = extract_snapshot(warehouse, DAY0, span[1] - timedelta(days=1), tmp_path / "one" / "w3", PSEUDONYMS)
    assert shorter["content_hash"] != first["content_hash"]
    _insert(warehouse, 20_000, [DAY0 + timedelta(days=5, hours=1)])
    changed = extract_snapshot(warehouse, *span, tmp_path / "one" / "w", PSEUDONYMS)
    assert changed["content_hash"] != first["content_hash"]


def test_a_day_under_another_key_is_never_reused(warehouse, tmp_path):
    span = (DAY0, DAY0 + timedelta(days=2))
    mine = extract_snapshot(warehouse, *span, tmp_path / "a", PSEUDONYMS)
    other_key = Pseudonymiser("another tests-only key, 32 bytes long")
    theirs = extract_snapshot(warehouse, *span, tmp_path / "b", other_key)
    assert set(_this_run(theirs).values()) == {"extracted"}
    assert {p.parent.parent.name.split(".")[1] for p in table_files(tmp_path / "b", "behavior_events")} == {
        other_key.key_id
    }
    assert not set(table_files(tmp_path / "a", "behavior_events")) & set(table_files(tmp_path / "b", "behavior_events"))
    # and a day file moved under the wrong key's folder by hand is read again, not trusted
    moved = table_files(tmp_path / "a", "behavior_events")[0]
    target = table_files(tmp_path / "b", "behavior_events")[0]
    target.write_bytes(moved.read_bytes())
    again = extract_snapshot(warehouse, *span, tmp_path / "b", other_key)
    assert _this_run(again)[_day(0)] == "replaced" and again["content_hash"] == theirs["content_hash"]
    assert mine["content_hash"] != theirs["content_hash"]


def test_a_tampered_day_is_named_and_a_day_without_its_record_is_read_again(warehouse, tmp_path):
    span = (DAY0, DAY0 + timedelta(days=DAYS))
    extract_snapshot(warehouse, *span, tmp_path / "w", PSEUDONYMS)
    path = table_files(tmp_path / "w", "behavior_events")[2]
    events = pq.read_table(path).to_pandas()
    events.loc[0, "item_id"] = 99  # one value changed, written back by another tool (no footer record)
    events.to_parquet(path, index=False)
    with pytest.raises(SnapshotIntegrityError, match=rf"behavior_events day {_day(2)} \({path}\) .*does not match"):
        verify_snapshot(tmp_path / "w")
    again = extract_snapshot(warehouse, *span, tmp_path / "w", PSEUDONYMS)
    assert [d for d, how in _this_run(again).items() if how != "reused"] == [_day(2)]
    verify_snapshot(tmp_path / "w")


def test_a_window_that_cuts_its_first_and_last_day_keeps_those_cuts_to_itself(warehouse, tmp_path):
    start, end = DAY0 + timedelta(hours=7), DAY0 + timedelta(days=2, hours=7)
    manifest = extract_snapshot(warehouse, start, end, tmp_path / "w", PSEUDONYMS)
    assert _this_run(manifest) == {_day(0): "cut", _day(1): "extracted", _day(2): "cut"}
    got = read_snapshot_table(tmp_path / "w", "behavior_events").to_pandas()["ts"].dt.tz_convert(None)
    assert len(got) == 2 * PER_DAY and got.min() >= start and got.max() < end  # 09:00 .. 06:00 two days on
    cuts = [p for p in manifest["tables"]["behavior_events"]["parts"] if p["this_run"] == "cut"]
    assert all((tmp_path / "w" / p["file"]).is_file() for p in cuts)  # in the window's own folder
    assert verify_snapshot(tmp_path / "w") == manifest


def test_a_failed_day_names_table_day_and_warehouse_and_keeps_the_days_before(warehouse, tmp_path, monkeypatch):
    span = (DAY0, DAY0 + timedelta(days=DAYS))
    real_write = ingest._write_table

    def failing(engine, table, stmt, path, *args, **kwargs):
        if table.name == "behavior_events" and "day=" in path.name and _day(3) in path.name:
            raise OperationalError("SELECT ...", {}, Exception("server closed the connection unexpectedly"))
        return real_write(engine, table, stmt, path, *args, **kwargs)

    monkeypatch.setattr(ingest, "_write_table", failing)
    with pytest.raises(ExtractionError) as caught:
        extract_snapshot(warehouse, *span, tmp_path / "w", PSEUDONYMS)
    message = str(caught.value)
    assert f"reading table behavior_events day {_day(3)} from the warehouse at " in message
    assert "server closed the connection" in message and f"the snapshot {tmp_path / 'w'} is as it was" in message
    assert "a retry reads only the others" in message
    url = warehouse.url
    assert url.password is None or url.password not in message
    assert not (tmp_path / "w").exists() and not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    monkeypatch.setattr(ingest, "_write_table", real_write)
    retried = extract_snapshot(warehouse, *span, tmp_path / "w", PSEUDONYMS)
    assert [d for d, how in _this_run(retried).items() if how == "extracted"] == [_day(3), _day(4), _day(5)]


def test_postgresql_streams_rows_through_a_server_side_cursor(pg_url, tmp_path, monkeypatch):
    """psycopg 3 under SQLAlchemy's yield_per: a named cursor, fetched chunk_rows at a time, so memory stays flat
    (bench/extract.py measures the peak over 10M rows)."""
    import psycopg

    engine = wh.make_engine(pg_url)
    wh.create_schema(engine)
    _insert(engine, 1, [DAY0 + timedelta(minutes=m) for m in range(500)])
    fetched: list[int] = []
    real_fetchmany = psycopg.ServerCursor.fetchmany

    def fetchmany(self, size=0):
        rows = real_fetchmany(self, size)
        fetched.append(len(rows))
        return rows

    monkeypatch.setattr(psycopg.ServerCursor, "fetchmany", fetchmany)
    reads = _Reads(engine)
    manifest = extract_snapshot(engine, DAY0, DAY0 + timedelta(days=1), tmp_path / "w", PSEUDONYMS, chunk_rows=64)
    assert reads.cursors == {"ServerCursor"}
    assert manifest["tables"]["behavior_events"]["rows"] == 500
    assert max(fetched) <= 64 and sum(fetched) >= 500
    engine.dispose()


def test_a_format_1_snapshot_one_file_per_table_still_reads_and_verifies(warehouse, tmp_path):
    """Snapshots made before day partitions: one file per table, digests of chunks as NumPy hashed them."""
    extract_snapshot(warehouse, DAY0, DAY0 + timedelta(days=DAYS), tmp_path / "new", PSEUDONYMS)
    old = tmp_path / "old"
    old.mkdir()
    manifest = {"format_version": 1, "interval": {}, "content_hash": "", "tables": {}}
    for name in wh.SOURCE_TABLES:
        rows = read_snapshot_table(tmp_path / "new", name)
        pq.write_table(rows, old / f"{name}.parquet", row_group_size=5)  # chunks of 5: some without a NULL
        digest = ingest._new_digest(rows.schema)
        parquet = pq.ParquetFile(old / f"{name}.parquet")
        for group in range(parquet.num_row_groups):
            digest.update(ingest._rows_digest(parquet.read_row_group(group), legacy=True))
        meta = {"file": f"{name}.parquet", "rows": rows.num_rows, "sha256": digest.hexdigest()}
        manifest["tables"][name] = meta
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert verify_snapshot(old) == manifest
    assert read_snapshot_table(old, "behavior_events").num_rows == DAYS * PER_DAY
    assert table_files(old, "users") == [old / "users.parquet"]
