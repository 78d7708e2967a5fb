"""Benchmark: day-partitioned extraction from PostgreSQL, a first full window and a weekly incremental one.

Loads ``--events`` behaviour events over ``--days`` days (with ``--users`` users and ``--items`` items) into a
fresh schema of the local PostgreSQL server with COPY, extracts the window [day 0, day N) into an empty
day store, loads the next week's events (the same rate per day), and extracts the window one week on
[day 7, day N + 7), which reuses every day it shares with the first. Each extraction runs in a fresh process,
so its peak resident memory (``VmHWM``: ``ru_maxrss`` of a child started by
subprocess also counts the parent's peak on Linux) is its own. The schema is dropped afterwards.

Prints one JSON object: load seconds, and per extraction the rows read from the warehouse, the rows of the
window, seconds, rows read per second, the checksum query's seconds, days reused/extracted, the resident
memory before and at the peak; then the incremental run's share of the full run's rows read and whether the
targets hold (peak under 2 GiB, incremental reads at most a quarter of the full run's rows).

    .venv/bin/python bench/extract.py [--events 10000000 --days 56 --users 200000 --items 20000]
    .venv/bin/python bench/extract.py --events 200000     # a quick try
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

PG_ADMIN_URL = os.environ.get("MTLTEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
START = datetime(2026, 1, 5)
LOAD_ROWS = 1_000_000  # rows generated and sent per COPY: bounds the loader's memory
GIB = 1024**3

EXTRACT = """
import json, logging, sys, time
from mtl_core.data import warehouse as wh
from mtl_core.data.extract import extract_snapshot
from mtl_core.data.pseudonyms import Pseudonymiser
url, start, end, out, days_dir, key, chunk_rows = sys.argv[1:8]
def rss_mib():
    with open("/proc/self/status") as status:
        return round(int(next(l for l in status if l.startswith("VmRSS")).split()[1]) / 1024)
engine = wh.make_engine(url)
before = rss_mib()  # the libraries loaded, nothing read yet
began = time.perf_counter()
manifest = extract_snapshot(engine, start, end, out, Pseudonymiser(key), int(chunk_rows), days_dir=days_dir)
seconds = time.perf_counter() - began
tables = manifest["tables"]
print(json.dumps({
    "rows_read": manifest["rows_read"],
    "window_rows": sum(t["rows"] for t in tables.values()),
    "seconds": round(seconds, 2),
    "rows_read_per_second": round(manifest["rows_read"] / seconds),
    "window_rows_per_second": round(sum(t["rows"] for t in tables.values()) / seconds),
    "checksum_seconds": round(sum(t.get("checksum_seconds", 0) for t in tables.values()), 2),
    "behavior_days": tables["behavior_events"]["days"],
    "rss_before_mib": before,
    "peak_rss_mib": round(int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024),
}))
"""

EVENT_TYPES = np.array(["impression", "click", "add_to_cart", "purchase", "favorite"], dtype=object)
EVENT_SHARES = [0.88, 0.07, 0.02, 0.01, 0.02]


def _copy_csv(engine, table: str, columns: list[str], frame) -> None:
    """COPY a pyarrow table into ``table`` as CSV (empty unquoted fields are NULL)."""
    import pyarrow.csv as pacsv

    buffer = io.BytesIO()
    pacsv.write_csv(frame, buffer, pacsv.WriteOptions(include_header=False))
    with engine.begin() as conn:
        raw = conn.connection.driver_connection
        with (
            raw.cursor() as cursor,
            cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT csv)") as copy,
        ):
            view = buffer.getbuffer()
            for at in range(0, len(view), 1 << 20):
                copy.write(view[at : at + (1 << 20)])


def _load_dimensions(engine, users: int, items: int, rng: np.random.Generator) -> None:
    import pyarrow as pa

    signup = np.datetime64(START - timedelta(days=365), "us") + rng.integers(0, 365 * 86_400, users).astype(
        "timedelta64[s]"
    )
    _copy_csv(
        engine,
        "users",
        ["user_id", "signup_ts", "region", "age_band"],
        pa.table(
            {
                "user_id": np.arange(1, users + 1),
                "signup_ts": signup,
                "region": rng.choice(np.array(["north", "south", "east", "west"], dtype=object), users),
                "age_band": rng.choice(np.array(["18-24", "25-34", "35-49", "50+"], dtype=object), users),
            }
        ),
    )
    ids = np.arange(1, items + 1)
    _copy_csv(
        engine,
        "items",
        ["item_id", "title", "category", "brand", "price", "created_ts"],
        pa.table(
            {
                "item_id": ids,
                "title": np.array([f"item {i} waterproof running shoes" for i in ids], dtype=object),
                "category": np.array([f"c{i % 40}" for i in ids], dtype=object),
                "brand": np.array([f"b{i % 300}" for i in ids], dtype=object),
                "price": np.round(rng.lognormal(3, 1, items), 2),
                "created_ts": np.full(items, np.datetime64(START - timedelta(days=400), "us")),
            }
        ),
    )


def _load_events(engine, first_id: int, events: int, first_day: int, days: int, args, rng) -> int:
    """``events`` behaviour events spread evenly over [first_day, first_day + days), in time order."""
    import pyarrow as pa

    span_us = days * 86_400_000_000
    origin = np.datetime64(START + timedelta(days=first_day), "us")
    done = 0
    while done < events:
        n = min(LOAD_ROWS, events - done)
        # evenly spaced times with a little jitter, so each day gets events/days rows and chunks stay in order
        offsets = (np.arange(done, done + n, dtype=np.float64) + rng.random(n)) * (span_us / events)
        ids = np.arange(first_id + done, first_id + done + n, dtype=np.int64)
        kinds = rng.choice(EVENT_TYPES, n, p=EVENT_SHARES)
        parent = np.where(kinds == "impression", None, ids - 1)
        frame = pa.table(
            {
                "event_id": ids,
                "user_id": rng.integers(1, args.users + 1, n),
                "item_id": rng.integers(1, args.items + 1, n),
                "event_type": kinds,
                "ts": origin + offsets.astype(np.int64).astype("timedelta64[us]"),
                "session_id": ids // 12,
                "parent_event_id": pa.array(parent, pa.int64()),
                "position": rng.integers(0, 20, n),
            }
        )
        _copy_csv(engine, "behavior_events", frame.column_names, frame)
        done += n
    return first_id + events


def _extract(url: str, start: datetime, end: datetime, out: Path, days_dir: Path, chunk_rows: int) -> dict:
    key = "bench-only pseudonym key, 32 bytes at least"
    argv = [url, start.isoformat(), end.isoformat(), str(out), str(days_dir), key, str(chunk_rows)]
    done = subprocess.run([sys.executable, "-c", EXTRACT, *argv], check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000, help="behaviour events of the first window")
    parser.add_argument("--days", type=int, default=56, help="days of the first window (the next week adds 7)")
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--chunk-rows", type=int, default=50_000)
    parser.add_argument("--pg-url", default=PG_ADMIN_URL, help="a PostgreSQL database to make a schema in")
    parser.add_argument("--dir", type=Path, default=None, help="where the snapshots go (default: a temporary dir)")
    args = parser.parse_args()

    from sqlalchemy import create_engine, text

    from mtl_core.data import warehouse as wh

    schema = f"mtl_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(args.pg_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{args.pg_url}?options=-csearch_path%3D{schema}"
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="mtl-bench-extract-"))
    engine = wh.make_engine(url)
    try:
        rng = np.random.default_rng(7)
        wh.create_schema(engine)
        began = time.perf_counter()
        # Bulk load the way a warehouse is loaded: indexes and the key built once after COPY, not per row.
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE behavior_events DROP CONSTRAINT behavior_events_pkey"))
            conn.execute(text("DROP INDEX ix_behavior_events_ts, ix_behavior_events_user_ts"))
        _load_dimensions(engine, args.users, args.items, rng)
        next_id = _load_events(engine, 1, args.events, 0, args.days, args, rng)
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE behavior_events ADD PRIMARY KEY (event_id)"))
            conn.execute(text("CREATE INDEX ix_behavior_events_ts ON behavior_events (ts)"))
            conn.execute(text("CREATE INDEX ix_behavior_events_user_ts ON behavior_events (user_id, ts)"))
            conn.execute(text("ANALYZE"))
        load_seconds = time.perf_counter() - began

        snapshots = workdir / "snapshots"
        days_dir = snapshots / "days"
        full = _extract(url, START, START + timedelta(days=args.days), snapshots / "full", days_dir, args.chunk_rows)

        week_events = round(args.events * 7 / args.days)
        began = time.perf_counter()
        _load_events(engine, next_id, week_events, args.days, 7, args, rng)
        with engine.begin() as conn:
            conn.execute(text("ANALYZE behavior_events"))
        week_load_seconds = time.perf_counter() - began
        incremental = _extract(
            url,
            START + timedelta(days=7),
            START + timedelta(days=args.days + 7),
            snapshots / "next_week",
            days_dir,
            args.chunk_rows,
        )
        share = incremental["rows_read"] / full["rows_read"]
        peak = max(full["peak_rss_mib"], incremental["peak_rss_mib"])
        print(
            json.dumps(
                {
                    "warehouse": {
                        "events": args.events,
                        "days": args.days,
                        "next_week_events": week_events,
                        "users": args.users,
                        "items": args.items,
                        "load_seconds": round(load_seconds, 1),
                        "load_rows_per_second": round((args.events + args.users + args.items) / load_seconds),
                        "next_week_load_seconds": round(week_load_seconds, 1),
                    },
                    "chunk_rows": args.chunk_rows,
                    "full": full,
                    "incremental": incremental,
                    "incremental_rows_read_share": round(share, 4),
                    "targets": {
                        "peak_rss_under_2_gib": peak * 1024**2 < 2 * GIB,
                        "incremental_reads_at_most_a_quarter": share <= 0.25,
                    },
                },
                indent=2,
            )
        )
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
