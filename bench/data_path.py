"""Benchmark: the data path's throughput and memory, extraction from PostgreSQL plus validation, at 1M and 10M events.

For each ``--events`` size: simulates a shop (mtl_core.data.shop, ``--days`` days, ``--items`` items, the users
scaled so that the shop holds about that many behaviour events), loads it into a fresh schema of the local
PostgreSQL server with COPY (the way bench/extract.py loads: keys and indexes built once after the load),
then runs, each in a fresh process so that its peak resident memory is its own (``VmHWM``: a child's
``ru_maxrss`` on Linux starts at its parent's peak, here the simulation's, so it is not used):

* extract: the DAG's extract step (``mtl_core.pipeline.extract``: the window from the first event to the
  interval's end, day-partitioned, user ids pseudonymised) into a snapshot of an empty data dir;
* validate: the DAG's validate step (``mtl_core.pipeline.validate``: the snapshot's files against its
  manifest, the Great Expectations suites of every table, the whole-snapshot checks, the drift report).

Rows are the snapshot's rows over all four tables (behaviour and ad events, users, items); the behaviour events
alone are reported beside them. The schema and the data dir are removed afterwards.

Prints one JSON object: per size the shop, the load seconds, and per step seconds, rows/s, the resident memory
after the imports and at the peak; the combined rows/s (rows / (extract + validate seconds)); then whether the
targets hold: at least 200,000 rows/s through extract plus validate at every size, and memory flat in the number
of rows (each step's peak at the largest size within 1.3x of its peak at the smallest).

    .venv/bin/python bench/data_path.py [--events 1000000 10000000 --days 35 --items 20000]   # about 4 minutes
    .venv/bin/python bench/data_path.py --events 200000                                       # a quick try

Speed figures come from shop seed ``--seed`` (7 by default, the shop settings' default).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

PG_ADMIN_URL = os.environ.get("MTLTEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
START = date(2026, 1, 5)
LOAD_ROWS = 1_000_000  # rows sent per COPY: bounds the loader's CSV buffer
CALIBRATION_USERS = 2000
TARGET_ROWS_PER_SECOND = 200_000
FLAT_MEMORY_RATIO = 1.3

# One step of the DAG in a fresh process: the imports first (their memory is the baseline), then the step.
STEP = """
import json, sys, time
t0 = time.perf_counter()
from mtl_core import pipeline
from mtl_core.artifacts import Snapshot
from mtl_core.config import load_settings
import mtl_core.data.extract, mtl_core.data.pseudonyms, mtl_core.data.stored_values  # noqa: E401
import mtl_core.quality, mtl_core.quality.drift, great_expectations  # noqa: E401
step, arg = sys.argv[1:3]
def rss_mib(field="VmRSS"):
    with open("/proc/self/status") as status:
        return round(int(next(l for l in status if l.startswith(field)).split()[1]) / 1024)
settings = load_settings()
imports = time.perf_counter() - t0
before = rss_mib()
began = time.perf_counter()
out = {}
if step == "extract":
    snapshot = pipeline.extract(settings, arg)
    out["snapshot"] = snapshot.uri
    out["rows_read"] = snapshot.manifest["rows_read"]
else:
    from mtl_core.quality import ValidationFailed
    snapshot = Snapshot.load(arg)
    try:
        pipeline.validate(settings, snapshot)
        out["success"], out["failures"] = True, []
    except ValidationFailed as failed:
        out["success"] = False
        out["failures"] = [f"{f['table']}.{f['column']}: {f['expectation']}" for f in failed.summary["failures"]]
seconds = time.perf_counter() - began
out |= {
    "rows": snapshot.rows,
    "seconds": round(seconds, 2),
    "import_seconds": round(imports, 2),
    "rss_before_mib": before,
    "peak_rss_mib": rss_mib("VmHWM"),
}
print(json.dumps(out))
"""


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _bench_extract():
    """bench/extract.py as a module (bench/ is no package): its COPY loader is reused, not copied."""
    spec = importlib.util.spec_from_file_location("bench_extract", Path(__file__).with_name("extract.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _users_for(events: int, items: int, days: int, seed: int) -> int:
    """Users whose shop holds about ``events`` behaviour events (events grow linearly with users)."""
    from mtl_core.data.shop import ShopSpec, generate

    shop = generate(ShopSpec(users=CALIBRATION_USERS, items=items, days=days, start=START, seed=seed))
    f = shop.feed
    per_user = (len(f["user"]) + int(f["clicked"].sum() + f["carted"].sum() + f["purchased"].sum())) / CALIBRATION_USERS
    return max(1, round(events / per_user))


def _shop_tables(users: int, items: int, days: int, seed: int) -> dict:
    """The simulated shop's four source tables as pyarrow tables, as write_shop would write them."""
    import numpy as np
    import pyarrow as pa

    from mtl_core.data.shop import (
        AGE_BANDS,
        REGIONS,
        SECONDS_PER_DAY,
        ShopSpec,
        _ad_columns,
        _behavior_columns,
        generate,
    )

    shop = generate(ShopSpec(users=users, items=items, days=days, start=START, seed=seed))
    day_ts = lambda d: shop.t0 + (np.asarray(d) * SECONDS_PER_DAY).astype("timedelta64[s]")  # noqa: E731
    behavior, _ = _behavior_columns(shop)
    ads, _ = _ad_columns(shop, first_id=len(behavior["event_id"]) + 1)
    nullable = {"parent_event_id", "position"}
    return {
        "users": pa.table(
            {
                "user_id": np.arange(1, users + 1),
                "signup_ts": day_ts(shop.signup_day),
                "region": np.asarray(REGIONS, dtype=object)[shop.region],
                "age_band": np.asarray(AGE_BANDS, dtype=object)[shop.age_band],
            }
        ),
        "items": pa.table(
            {
                "item_id": np.arange(1, items + 1),
                "title": shop.title,
                "category": np.asarray(shop.category_names, dtype=object)[shop.category],
                "brand": shop.brand,
                "price": shop.price,
                "created_ts": day_ts(shop.release_day),
            }
        ),
        "behavior_events": pa.table({k: pa.array(v, pa.int64()) if k in nullable else v for k, v in behavior.items()}),
        "ad_events": pa.table({k: pa.array(v, pa.int64()) if k in nullable else v for k, v in ads.items()}),
    }


def _load(engine, tables: dict, copy_csv) -> None:
    """COPY the tables in, the event tables' key and indexes dropped first and built once afterwards."""
    from sqlalchemy import text

    from mtl_core.data import warehouse as wh

    wh.create_schema(engine)
    with engine.begin() as conn:
        for name in wh.EVENT_TABLES:
            conn.execute(text(f"ALTER TABLE {name} DROP CONSTRAINT {name}_pkey"))
        conn.execute(text("DROP INDEX ix_behavior_events_ts, ix_behavior_events_user_ts, ix_ad_events_ts"))
    for name, frame in tables.items():
        for at in range(0, frame.num_rows, LOAD_ROWS):
            part = frame.slice(at, LOAD_ROWS)
            copy_csv(engine, name, part.column_names, part)
    with engine.begin() as conn:
        for name in wh.EVENT_TABLES:
            conn.execute(text(f"ALTER TABLE {name} ADD PRIMARY KEY (event_id)"))
        conn.execute(text("CREATE INDEX ix_behavior_events_ts ON behavior_events (ts)"))
        conn.execute(text("CREATE INDEX ix_behavior_events_user_ts ON behavior_events (user_id, ts)"))
        conn.execute(text("CREATE INDEX ix_ad_events_ts ON ad_events (ts)"))
        conn.execute(text("ANALYZE"))


def _step(step: str, arg: str, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", STEP, step, arg], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {step} process failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _one_size(events: int, args, copy_csv) -> dict:
    from sqlalchemy import create_engine, text

    from mtl_core.data import warehouse as wh

    began = time.perf_counter()
    users = _users_for(events, args.items, args.days, args.seed)
    tables = _shop_tables(users, args.items, args.days, args.seed)
    rows = {name: frame.num_rows for name, frame in tables.items()}
    simulate_seconds = time.perf_counter() - began
    say(f"{events:,} events: simulated {users:,} users, {rows} in {simulate_seconds:.0f} s")

    schema = f"mtl_bench_{secrets.token_hex(5)}"
    admin = create_engine(args.pg_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{args.pg_url}?options=-csearch_path%3D{schema}"
    data_dir = Path(tempfile.mkdtemp(prefix="mtl-bench-data-path-"))
    engine = wh.make_engine(url)
    try:
        began = time.perf_counter()
        _load(engine, tables, copy_csv)
        del tables
        load_seconds = time.perf_counter() - began
        say(f"  loaded into PostgreSQL schema {schema} in {load_seconds:.0f} s")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MTL_") and k != "MLFLOW_TRACKING_URI"}
        env |= {
            "MTL_DATA_DIR": str(data_dir),
            "MTL_WAREHOUSE_URL": url,
            "MTL_PRIVACY__PSEUDONYM_KEY": secrets.token_hex(32),
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        interval_end = (START + timedelta(days=args.days)).isoformat()
        extract = _step("extract", interval_end, env)
        say(f"  extract: {extract['seconds']} s, peak {extract['peak_rss_mib']} MiB")
        validate = _step("validate", extract.pop("snapshot"), env)
        say(
            f"  validate: {validate['seconds']} s, peak {validate['peak_rss_mib']} MiB, "
            f"{'passed' if validate['success'] else 'FAILED: ' + '; '.join(validate['failures'][:5])}"
        )
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
        shutil.rmtree(data_dir, ignore_errors=True)

    window = sum(extract["rows"].values())
    for result in (extract, validate):
        result["rows_per_second"] = round(window / result["seconds"])
        result["behavior_events_per_second"] = round(extract["rows"]["behavior_events"] / result["seconds"])
    return {
        "events": events,
        "shop": {"users": users, "items": args.items, "days": args.days, "seed": args.seed, "rows": rows},
        "simulate_seconds": round(simulate_seconds, 1),
        "load_seconds": round(load_seconds, 1),
        "snapshot_rows": window,
        "extract": extract,
        "validate": validate,
        "combined_seconds": round(extract["seconds"] + validate["seconds"], 2),
        "combined_rows_per_second": round(window / (extract["seconds"] + validate["seconds"])),
    }


def _check_server(pg_url: str) -> None:
    """Refuse at once, with the fix, when the PostgreSQL server does not answer (before minutes of simulation)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        shown = engine.url.render_as_string(hide_password=True)
        raise SystemExit(
            f"data_path: cannot reach PostgreSQL at {shown} ({exc.__class__.__name__}: {str(exc).splitlines()[0]}); "
            "start the server or give another database with --pg-url (default: $MTLTEST_PG_URL)"
        ) from None
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000], help="behaviour events")
    parser.add_argument("--days", type=int, default=35, help="days of the shop (the window: all of them)")
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=7, help="shop seed (a speed figure: any seed will do)")
    parser.add_argument("--pg-url", default=PG_ADMIN_URL, help="a PostgreSQL database to make a schema in")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    _check_server(args.pg_url)
    copy_csv = _bench_extract()._copy_csv
    began = time.perf_counter()
    sizes = [_one_size(events, args, copy_csv) for events in sorted(args.events)]
    smallest, largest = sizes[0], sizes[-1]
    ratios = {
        step: round(largest[step]["peak_rss_mib"] / smallest[step]["peak_rss_mib"], 2)
        for step in ("extract", "validate")
    }
    result = {
        "sizes": sizes,
        "peak_rss_ratio_largest_to_smallest": ratios,
        "targets": {
            "combined_rows_per_second_at_least_200k": {
                str(s["events"]): s["combined_rows_per_second"] >= TARGET_ROWS_PER_SECOND for s in sizes
            },
            "memory_flat_within_1.3x": (
                {step: ratio <= FLAT_MEMORY_RATIO for step, ratio in ratios.items()} if ratios else None
            ),
        },
        "seconds": round(time.perf_counter() - began, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
