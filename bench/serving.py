"""Benchmark: `mtl serve` latency on loopback and `mtl score` throughput, for the fp32, int8 and ONNX forms.

Builds a champion the way the DAG does, in a temporary installation: simulates a shop (``--users``, ``--items``,
``--days``), extracts its snapshot, trains the joint model with the default settings (the packaged MiniLM
encoder), registers it in a SQLite MLflow store, builds and logs its int8 and ONNX variants (which measure each
variant's holdout AUC change), makes it champion and publishes its features to the local Redis (under a key
prefix of its own, removed at the end).

Then, per form, it starts `mtl serve` with one worker (``serve.variant``) and sends, over one keep-alive HTTP
connection on 127.0.0.1, ``--requests`` requests of 1 row and as many of 100 rows (feed and ad rows of known
users and items, after 50 warm-up requests), and scores ``--candidates`` rows with `mtl score`'s function.
Prints one JSON object, then a table: p50 and p99 latency in ms for 1 and 100 rows, batch rows/s, and the
variant's holdout AUC change per task; and whether the target holds (p99 under 20 ms for one row).

    .venv/bin/python bench/serving.py                      # 9,000 users, 2,000 items, 35 days (~6 minutes)
    .venv/bin/python bench/serving.py --users 2000 --items 500 --requests 100   # a quick try
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import date, timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOKEN = secrets.token_hex(16)  # made per run: the servers this benchmark starts take it from their environment
FORMS = ("fp32", "int8", "onnx")
TARGET_P99_MS = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_champion(args, root: Path, env: dict[str, str]) -> dict:
    """Shop, snapshot, model, registration with variants, champion alias, published features."""
    import pandas as pd

    from mtl_core.config import load_settings
    from mtl_core.data import warehouse as wh
    from mtl_core.data.extract import extract_snapshot
    from mtl_core.data.pseudonyms import pseudonymiser_for
    from mtl_core.data.shop import ShopSpec, write_shop
    from mtl_core.learn.examples import build_examples, examples_frame
    from mtl_core.learn.training import train_on_snapshot
    from mtl_core.registry import configure
    from mtl_core.registry.aliases import make_champion
    from mtl_core.registry.pyfunc import log_and_register_model
    from mtl_core.registry.runs import run_for_key
    from mtl_core.registry.variants import log_variants
    from mtl_core.serving.online import OnlineStore

    settings = load_settings(environ=env)
    timings = {}
    started = time.perf_counter()
    engine = wh.make_engine(settings.resolved_warehouse_url)
    start = date(2026, 1, 5)
    write_shop(engine, ShopSpec(users=args.users, items=args.items, days=args.days, start=start, seed=args.seed))
    snapshot = root / "snapshot"
    end = start + timedelta(days=args.days)
    extract_snapshot(engine, start.isoformat(), end.isoformat(), snapshot, pseudonyms=pseudonymiser_for(settings))
    timings["shop_and_snapshot_s"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    model_dir = root / "model"
    train_on_snapshot(snapshot, model_dir, settings, progress=False)
    timings["train_s"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    client = configure(settings.resolved_mlflow_tracking_uri)
    name = settings.pipeline.model_name
    run_id = run_for_key(client, settings.pipeline.experiment, "bench-serving")
    examples = build_examples(snapshot, settings.features, settings.tasks)
    holdout = np.flatnonzero(examples.split == "holdout")
    version = log_and_register_model(
        client, run_id, model_dir, name, input_example=examples_frame(examples, holdout[:20])
    )
    report = log_variants(client, run_id, model_dir, examples, settings)
    make_champion(client, name, version, actor="bench/serving.py", why="benchmark")
    timings["register_and_variants_s"] = round(time.perf_counter() - started, 1)

    started = time.perf_counter()
    OnlineStore(settings, name).publish(version, model_dir, snapshot)
    timings["publish_s"] = round(time.perf_counter() - started, 1)

    # Requests carry the warehouse's raw ids, as a caller's do; the server pseudonymises them.
    users = pd.read_sql("select user_id from users", engine)["user_id"].to_numpy()
    items = pd.read_sql("select item_id from items", engine)["item_id"].to_numpy()
    ads = pd.read_sql("select distinct ad_id from ad_events where ad_id is not null", engine)["ad_id"].to_numpy()
    return {
        "settings": settings,
        "version": version,
        "report": report,
        "timings": timings,
        "users": users,
        "items": items,
        "ads": ads,
    }


def request_rows(rng: np.random.Generator, built: dict, n: int) -> list[dict]:
    """Feed rows and, one in four, ad rows of known users (raw warehouse ids, as a caller sends them)."""
    rows = []
    for _ in range(n):
        user = int(rng.choice(built["users"]))
        if rng.random() < 0.25 and len(built["ads"]):
            rows.append({"user_id": user, "ad_id": int(rng.choice(built["ads"]))})
        else:
            rows.append({"user_id": user, "item_id": int(rng.choice(built["items"]))})
    return rows


def start_server(form: str, env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    server_env = {**os.environ, **env, "MTL_SERVE__VARIANT": form, "MTL_SERVE__TOKEN": TOKEN}
    argv = [str(Path(sys.executable).with_name("mtl")), "serve", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(
        argv, env=server_env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"mtl serve ({form}) exited with {process.returncode}; its log: {log}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"mtl serve ({form}) did not become healthy in 180 s; its log: {log}")


def stop_server(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)


def latencies(port: int, bodies: list[bytes], warmup: int = 50) -> dict[str, float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    times = []
    for i, body in enumerate(bodies[:warmup] + bodies):
        began = time.perf_counter()
        connection.request("POST", "/predict", body=body, headers=headers)
        response = connection.getresponse()
        payload = response.read()
        elapsed = (time.perf_counter() - began) * 1000
        if response.status != 200:
            raise SystemExit(f"POST /predict answered {response.status}: {payload[:300]!r}")
        if i >= warmup:
            times.append(elapsed)
    connection.close()
    return {
        "p50_ms": round(float(np.percentile(times, 50)), 2),
        "p99_ms": round(float(np.percentile(times, 99)), 2),
        "requests": len(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=9000)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--days", type=int, default=35)
    parser.add_argument("--seed", type=int, default=101)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--candidates", type=int, default=200_000)
    args = parser.parse_args()

    import pandas as pd

    from mtl_core.serving.batch import score_file

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="mtl-bench-serving-") as tmp:
        root = Path(tmp)
        env = {
            "MTL_DATA_DIR": str(root / "data"),
            "MTL_SERVE__KEY_PREFIX": prefix,
            "MTL_SERVE__POLL_SECONDS": "3600",  # one model for the whole benchmark
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        built = build_champion(args, root, env)
        settings = built["settings"]
        one = [json.dumps(request_rows(rng, built, 1)).encode() for _ in range(args.requests)]
        hundred = [json.dumps(request_rows(rng, built, 100)).encode() for _ in range(args.requests)]
        candidates = root / "candidates.parquet"
        pd.DataFrame(request_rows(rng, built, args.candidates)).to_parquet(candidates, index=False)

        results = {}
        try:
            for form in FORMS:
                port = free_port()
                server = start_server(form, env, port, root / f"serve-{form}.log")
                try:
                    online = {"1_row": latencies(port, one), "100_rows": latencies(port, hundred)}
                finally:
                    stop_server(server)
                began = time.perf_counter()
                scored = score_file(settings, candidates, root / f"scores-{form}.parquet", variant=form, progress=False)
                seconds = time.perf_counter() - began
                results[form] = {**online, "batch_rows_per_s": round(scored["rows"] / seconds)}
        finally:
            import redis

            client = redis.Redis.from_url(settings.serve.redis_url)
            for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                client.unlink(key)
            client.close()

    report = built["report"]
    auc = {
        form: {task: entry.get("auc_delta") for task, entry in report["variants"][form].get("tasks", {}).items()}
        for form in FORMS
        if form != "fp32" and form in report["variants"]
    }
    out = {
        "shop": {"users": args.users, "items": args.items, "days": args.days, "seed": args.seed},
        "timings": built["timings"],
        "serving": results,
        "variant_auc_change": auc,
        "target_p99_1row_ms": TARGET_P99_MS,
        "target_met": {form: results[form]["1_row"]["p99_ms"] < TARGET_P99_MS for form in results},
    }
    print(json.dumps(out, indent=2))
    print(f"\n{'form':6} {'1 row p50':>10} {'1 row p99':>10} {'100 p50':>9} {'100 p99':>9} {'batch rows/s':>13}")
    for form, r in results.items():
        print(
            f"{form:6} {r['1_row']['p50_ms']:>10} {r['1_row']['p99_ms']:>10} {r['100_rows']['p50_ms']:>9} "
            f"{r['100_rows']['p99_ms']:>9} {r['batch_rows_per_s']:>13}"
        )


if __name__ == "__main__":
    main()
