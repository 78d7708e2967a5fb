"""Benchmark: one run of the retraining DAG, extraction through gate, with each task's seconds, at two shop sizes.

Each size runs in a fresh process and a fresh installation (a temporary MTL_DATA_DIR with the embedded defaults:
SQLite warehouse, local MLflow store, Airflow's SQLite metadata DB, a cold text cache), as ``mtl demo`` does:

* ``demo``: the demo's shop (mtl_core.config DEMO_USERS x DEMO_ITEMS) and the window of the demo's first run
  (``--week``: the interval ending 5 weeks after the shop's start; under the default expanding policy the
  window is every day from the shop's first event);
* ``1m``: the same window and items, the users chosen so that the window holds about ``--impressions`` feed
  impressions (a quick simulation of a small shop gives the impressions per user; they grow linearly).

The shop is simulated into the warehouse (timed apart: no part of the DAG), then the real DAG runs in process
(``mtl_core.local_airflow.run_dag_in_process``, as ``mtl run-dag`` and the demo run it). Each task's start,
end and seconds come from the run's task instances in Airflow's metadata DB. The online store is the
configured Redis under a key prefix of this run's own (deleted afterwards); without a Redis answering,
publish_features is told there is none.

Prints one JSON object: per size the shop, the snapshot's rows per table (from its manifest) and its feed
impressions (counted in the snapshot's behaviour events), the examples per task and split, each task's state
and seconds, the sum of the task seconds and the wall seconds from extract's start to gate's end
(extraction through gate, Airflow's time between tasks included), the verdict, and the target check
(1m: extraction through gate within 600 s on this machine).

    .venv/bin/python bench/end_to_end.py [--sizes demo 1m]     # about 8 minutes on 2 cores
    .venv/bin/python bench/end_to_end.py --sizes demo          # about 3 minutes

Speed figures come from shop seed ``--seed`` (7 by default, the demo's).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timedelta
from pathlib import Path

from mtl_core.config import DEMO_ITEMS, DEMO_USERS

START = date(2026, 1, 5)
CALIBRATION_USERS = 3000
TARGET_SECONDS = 600  # 1M impressions, extraction through gate, on 2 cores
# The DAG's tasks in their order; tasks the DAG file may add later are reported after these.
ORDER = (
    "extract",
    "validate",
    "build_features",
    "train_challenger",
    "evaluate",
    "register",
    "gate",
    "promote",
    "record_rejection",
    "publish_features",
    "score_candidates",
)
THROUGH_GATE = ORDER[:7]


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _users_for(impressions: int, items: int, days: int, seed: int) -> int:
    """Users whose shop of ``days`` days holds about ``impressions`` feed impressions."""
    from mtl_core.data.shop import ShopSpec, generate

    shop = generate(ShopSpec(users=CALIBRATION_USERS, items=items, days=days, start=START, seed=seed))
    return max(1, round(impressions * CALIBRATION_USERS / len(shop.feed["user"])))


def _redis_answers(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        client.ping()
        client.close()
        return True
    except (redis.RedisError, OSError):
        return False


def _delete_keys(url: str, prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    deleted = 0
    batch = []
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += client.delete(*batch)
            batch = []
    if batch:
        deleted += client.delete(*batch)
    client.close()
    return deleted


def _instant(value) -> datetime | None:
    if value is None:
        return None
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def _task_times(airflow_db: Path, dag_id: str) -> tuple[str, dict]:
    """Each task instance of the DAG's (only) run: state, try, start, end and seconds."""
    with sqlite3.connect(airflow_db) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute(
            "SELECT run_id, task_id, state, try_number, start_date, end_date, duration FROM task_instance "
            "WHERE dag_id = ? ORDER BY start_date",
            (dag_id,),
        ).fetchall()
    runs = {row["run_id"] for row in rows}
    if len(runs) != 1:
        raise SystemExit(f"expected one run of {dag_id} in {airflow_db}, found {sorted(runs)}")
    tasks = {}
    for row in rows:
        start, end = _instant(row["start_date"]), _instant(row["end_date"])
        seconds = (
            row["duration"] if row["duration"] is not None else (end - start).total_seconds() if start and end else None
        )
        tasks[row["task_id"]] = {
            "state": row["state"],
            "try_number": row["try_number"],
            "start": start.isoformat() if start else None,
            "end": end.isoformat() if end else None,
            "seconds": round(seconds, 2) if seconds is not None else None,
        }
    ordered = {t: tasks[t] for t in ORDER if t in tasks}
    ordered |= {t: v for t, v in tasks.items() if t not in ordered}
    return runs.pop(), ordered


def _snapshot_facts(settings) -> dict:
    """The run's snapshot: rows per table from its manifest, and the feed impressions among its behaviour events."""
    import pyarrow.compute as pc

    from mtl_core.data.extract import read_manifest, read_snapshot_table

    folders = [p for p in settings.snapshots_dir.glob("*-*") if (p / "manifest.json").is_file()]
    if len(folders) != 1:
        raise SystemExit(f"expected one snapshot in {settings.snapshots_dir}, found {folders}")
    manifest = read_manifest(folders[0])
    kinds = read_snapshot_table(folders[0], "behavior_events", columns=["event_type"])["event_type"]
    return {
        "interval": manifest["interval"],
        "rows": {name: table["rows"] for name, table in manifest["tables"].items()},
        "feed_impressions": int(pc.sum(pc.equal(kinds, "impression")).as_py() or 0),
    }


def _run_facts(settings) -> dict:
    """The examples per task and split, and the gate's verdict (None where the run did not get so far)."""
    from mtl_core.artifacts import Comparison, ExampleSet, GateDecision

    facts: dict = {"examples": None, "texts": None, "verdict": None, "reason": None}
    example_sets = list((settings.data_dir / "runs").glob("*/examples/example_set.json"))
    if example_sets:
        example_set = ExampleSet.load(example_sets[0].parent)
        facts["examples"], facts["texts"] = example_set.counts, example_set.texts
    comparisons = list((settings.data_dir / "runs").glob("*/comparison.json"))
    if comparisons and (comparisons[0].parent / "decision.json").is_file():
        decision = GateDecision.load(comparisons[0].parent / "decision.json")
        facts["verdict"], facts["reason"] = decision.verdict, decision.reason
        facts["comparison_tasks"] = {
            task: round(entry["challenger"]["auc"], 4) for task, entry in Comparison.load(comparisons[0]).tasks.items()
        }
    return facts


def run_one(size: str, args) -> dict:
    """One size in this process: a fresh installation, the shop, one DAG run; its figures."""
    root = Path(tempfile.mkdtemp(prefix=f"mtl-bench-e2e-{size}-")) if args.dir is None else args.dir / size
    if args.dir is not None:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    for variable in ("MTL_WAREHOUSE_URL", "MTL_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI", "MTL_SERVE__KEY_PREFIX"):
        os.environ.pop(variable, None)
    os.environ["MTL_DATA_DIR"] = str(root)
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["MTL_SERVE__KEY_PREFIX"] = prefix = f"mtl-bench-e2e-{secrets.token_hex(4)}"

    from mtl_core.config import load_settings

    settings = load_settings(args.config)
    redis_url = settings.serve.redis_url
    online_store = bool(redis_url) and _redis_answers(redis_url)
    if redis_url and not online_store:
        say(f"no Redis answers at {redis_url}: the run publishes no features")
        os.environ["MTL_SERVE__REDIS_URL"] = ""
        settings = load_settings(args.config)

    from mtl_core.data.shop import ShopSpec, write_shop
    from mtl_core.data.warehouse import make_engine
    from mtl_core.local_airflow import DAG_ID, run_dag_in_process

    days = 7 * args.week
    end = START + timedelta(days=days)
    if size == "demo":
        users = args.users or DEMO_USERS
    else:
        users = args.users or _users_for(args.impressions, args.items, days, args.seed)
    began = time.perf_counter()
    engine = make_engine(settings.resolved_warehouse_url)
    shop = write_shop(
        engine, ShopSpec(users=users, items=args.items, days=days, start=START, seed=args.seed), replace=True
    )
    engine.dispose()
    shop_seconds = time.perf_counter() - began
    say(f"{size}: simulated {users:,} users x {args.items:,} items, {days} days ({shop.rows}) in {shop_seconds:.0f} s")
    say(f"{size}: the DAG for the interval ending {end} (task logs follow on stderr) ...")
    try:
        began = time.perf_counter()
        states = run_dag_in_process(settings, end.isoformat(), quiet=True)
        dag_seconds = time.perf_counter() - began
        run_id, tasks = _task_times(settings.data_dir / "airflow" / "airflow.db", DAG_ID)
        snapshot = _snapshot_facts(settings)
        facts = _run_facts(settings)
    finally:
        if online_store:
            deleted = _delete_keys(redis_url, prefix)
            say(f"{size}: deleted {deleted} keys under {prefix}: in the online store")
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    failed = [task for task, state in states.items() if state in ("failed", "upstream_failed")]
    timed = [tasks[t] for t in THROUGH_GATE if t in tasks and tasks[t]["seconds"] is not None]
    complete = len(timed) == len(THROUGH_GATE) and not failed
    span = None
    if complete:
        span = (_instant(tasks["gate"]["end"]) - _instant(tasks["extract"]["start"])).total_seconds()
    task_seconds = {t: v["seconds"] for t, v in tasks.items()}
    say(f"{size}: " + ", ".join(f"{t} {s}" for t, s in task_seconds.items()) + f"; through gate {span} s")
    result = {
        "size": size,
        "shop": {"users": users, "items": args.items, "days": days, "seed": args.seed, "rows": shop.rows},
        "shop_seconds": round(shop_seconds, 1),
        "interval_end": end.isoformat(),
        "snapshot": snapshot,
        **facts,
        "run_id": run_id,
        "failed_tasks": failed,
        "tasks": tasks,
        "task_seconds": task_seconds,
        "through_gate_task_seconds": round(sum(v["seconds"] for v in timed), 1),
        "through_gate_wall_seconds": round(span, 1) if span is not None else None,
        "dag_run_wall_seconds": round(dag_seconds, 1),
        "online_store": online_store,
        "cpus": os.cpu_count(),
    }
    if size == "1m":
        result["target"] = {
            "extraction_through_gate_within_600_s": span is not None and span <= TARGET_SECONDS,
            "seconds": result["through_gate_wall_seconds"],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=["demo", "1m"], default=["demo", "1m"])
    parser.add_argument("--impressions", type=int, default=1_000_000, help="feed impressions of the 1m size")
    parser.add_argument("--items", type=int, default=DEMO_ITEMS, help="the demo's by default, at every size")
    parser.add_argument("--week", type=int, default=5, help="the interval ends this many weeks after the start")
    parser.add_argument("--seed", type=int, default=7, help="shop seed (the demo's; a speed figure: any will do)")
    parser.add_argument("--users", type=int, default=None, help="override the size's users (a quick try)")
    parser.add_argument("--config", type=Path, default=None, help="settings YAML")
    parser.add_argument("--dir", type=Path, default=None, help="keep each installation in DIR/<size> (replaced)")
    parser.add_argument("--one", choices=["demo", "1m"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.week < 2:
        parser.error("--week must be at least 2 (a holdout week and history before it)")

    if args.one:  # the child: one size; Airflow reads its home once per process, so each size has its own
        print(json.dumps(run_one(args.one, args)))
        return
    began = time.perf_counter()
    results = {}
    for size in args.sizes:
        argv = [sys.executable, __file__, "--one", size, "--impressions", str(args.impressions)]
        argv += ["--items", str(args.items), "--week", str(args.week), "--seed", str(args.seed)]
        for flag, value in (("--users", args.users), ("--config", args.config), ("--dir", args.dir)):
            if value is not None:
                argv += [flag, str(value)]
        done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"the {size} run failed (exit {done.returncode}); its log is above")
        results[size] = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps({"sizes": results, "seconds": round(time.perf_counter() - began, 1)}, indent=2))


if __name__ == "__main__":
    main()
