"""Benchmark: generate a shop with ~1M feed impressions into SQLite, then extract short and long intervals.

Prints JSON: generation seconds, oracle AUCs, and for each extraction its rows, seconds, rows per second
and the peak resident memory of the extracting process (each runs in a fresh process, so the peaks
compare: streaming means the long interval does not need more memory than the short one).

    .venv/bin/python bench/simulate_extract.py [--users 14000 --items 3000 --days 60] [--dir /tmp/x]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

EXTRACT = """
import json, secrets, sys, time
from mtl_core.data import warehouse as wh
from mtl_core.data.extract import extract_snapshot
from mtl_core.data.pseudonyms import Pseudonymiser
url, start, end, out = sys.argv[1:5]
began = time.perf_counter()
manifest = extract_snapshot(wh.make_engine(url), start, end, out, Pseudonymiser(secrets.token_hex(32)))
seconds = time.perf_counter() - began
rows = sum(t["rows"] for t in manifest["tables"].values())
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
print(json.dumps({"rows": rows, "seconds": round(seconds, 2), "rows_per_second": round(rows / seconds),
                  "peak_rss_mib": round(peak)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=14_000)
    parser.add_argument("--items", type=int, default=3_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()

    from mtl_core.data import warehouse as wh
    from mtl_core.data.shop import ShopSpec, write_shop
    from mtl_core.judge.oracle import oracle_report

    workdir = args.dir or Path(tempfile.mkdtemp(prefix="mtl-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{workdir / 'warehouse.db'}"
    start = date(2026, 1, 5)
    spec = ShopSpec(users=args.users, items=args.items, days=args.days, start=start, seed=1, drift_day=args.days // 2)
    engine = wh.make_engine(url)
    began = time.perf_counter()
    summary = write_shop(engine, spec, replace=True)
    generate_seconds = time.perf_counter() - began
    oracle = oracle_report(engine)

    extractions = {}
    for label, days in (("2_weeks", 14), (f"{args.days}_days", args.days)):
        end = start + timedelta(days=args.days)
        begin = end - timedelta(days=days)
        out = subprocess.run(
            [sys.executable, "-c", EXTRACT, url, begin.isoformat(), end.isoformat(), str(workdir / f"snap-{label}")],
            check=True,
            capture_output=True,
            text=True,
        )
        extractions[label] = json.loads(out.stdout)

    print(
        json.dumps(
            {
                "shop": {"users": args.users, "items": args.items, "days": args.days, **summary.rows},
                "generate_and_write_seconds": round(generate_seconds, 2),
                "oracle": {task: {k: round(v, 4) for k, v in values.items()} for task, values in oracle.items()},
                "extract": extractions,
                "workdir": str(workdir),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
