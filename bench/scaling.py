"""Scaling curve: training time per epoch at three data sizes, each 4x the last, in 1 and 2 processes.

The data grow through the synthetic shop's users (default 1,500, 6,000 and 24,000 users; the same items,
days and seed), so the examples grow about as the users do: the JSON gives the actual training rows per
size. At each size the project's ``train_model`` trains the default model for one epoch
(``train.epochs: 1``, ``train.patience: 0``, so no early stop) with ``train.threads: 1`` per process, once
with ``train.nproc: 1`` (in this process) and once with ``train.nproc: 2`` (DistributedDataParallel over
gloo, two spawned ranks, each half of every batch). The text cache is filled before the timed runs, and one
short untimed training warms up the process first.

Per size and process count: rows per epoch (every task's training rows: the epoch's step budget), steps,
seconds (``TrainResult.seconds``: the whole run, so setup, the epoch's two validation evaluations, saving
the model and, for 2 processes, starting them and handing them the examples), training examples per
second, CPU seconds (this process and its children) and examples per CPU-second. Then the linearity check
per process count: consecutive sizes' cost ratios against their row ratios, the exponent k of a
least-squares fit of seconds ~ rows^k, and the affine fit seconds = fixed + per_row * rows (a fixed
start-up cost makes k < 1 at small sizes even when the per-row cost is constant); and per size the
speed-up of 2 processes over 1. Speed figures; any seed will do (default the dev shop 1).

    .venv/bin/python bench/scaling.py [--users 1500 6000 24000 --items 1000 --days 35 --nproc 1 2]
    .venv/bin/python bench/scaling.py --users 400 1600 6400 --items 500   # a quick try (~2 min)

At the defaults it takes about 4-5 minutes on 2 cores (the 2-process runs pay about 20 s each to start).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from shops import shop_examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="+", default=[1_500, 6_000, 24_000], help="one shop per value")
    parser.add_argument("--items", type=int, default=1_000)
    parser.add_argument("--days", type=int, default=35)
    parser.add_argument("--seed", type=int, default=1, help="shop seed (1-9 dev, 101-103 test)")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="train.nproc values to compare")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir, removed)")
    args = parser.parse_args()
    if len(args.users) < 2 or any(u < 1 for u in args.users) or any(n < 1 for n in args.nproc):
        parser.error("give at least two --users values, all positive, and positive --nproc values")
    root = args.dir or Path(tempfile.mkdtemp(prefix="mtl-scaling-"))
    try:
        result = run(args, root)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args, root: Path) -> dict:
    import torch

    from mtl_core.config import load_settings
    from mtl_core.learn.text import text_matrix

    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    # One data directory for every size: the shops share their items, so one text cache serves them all.
    settings = load_settings(None, environ={"MTL_DATA_DIR": str(root)})
    settings = settings.model_copy(
        update={"train": settings.train.model_copy(update={"epochs": 1, "patience": 0, "threads": 1})}
    )
    began = time.perf_counter()
    runs: list[dict] = []
    for i, users in enumerate(sorted(args.users)):
        examples, shop = build_shop(users, args, root / f"users{users}", settings)
        if settings.text.enabled:
            text_matrix(examples.texts, settings, settings.resolved_text_cache_dir, progress=False)
        if i == 0:  # the process's first training pays for lazy imports and first-call set-ups: not timed
            warm = settings.model_copy(update={"train": settings.train.model_copy(update={"steps_per_epoch": 2})})
            train(examples, root / "warmup", warm)
        for nproc in args.nproc:
            say(f"training {users} users, nproc {nproc} ...")
            run_settings = settings.model_copy(update={"train": settings.train.model_copy(update={"nproc": nproc})})
            figures = train(examples, root / f"users{users}" / f"nproc{nproc}", run_settings)
            runs.append({"users": users, "nproc": nproc, "shop_rows": shop["example_rows"], **figures})
            say(f"  {json.dumps(figures)}")
        del examples
    return {
        "shop": {"users": sorted(args.users), "items": args.items, "days": args.days, "seed": args.seed},
        "varied": "shop users (items, days and seed fixed)",
        "threads_per_process": 1,
        "batch_size": settings.train.batch_size,
        "runs": runs,
        "linearity": {str(n): linearity([r for r in runs if r["nproc"] == n]) for n in args.nproc},
        "speedup": speedups(runs, args.nproc),
        "seconds": round(time.perf_counter() - began, 1),
    }


def build_shop(users: int, args, root: Path, settings):
    """One shop's examples (as bench/quality.py builds them) and its size."""
    say(f"building the shop: {users} users, {args.items} items, {args.days} days, seed {args.seed} ...")
    t0 = time.perf_counter()
    examples = shop_examples(root, settings, users, args.items, args.days, args.seed, keep_warehouse=False)
    return examples, {"example_rows": len(examples.labels), "build_seconds": round(time.perf_counter() - t0, 1)}


def train(examples, out: Path, settings) -> dict:
    """One 1-epoch ``train_model``: its rows, steps, wall and CPU seconds (children's included)."""
    from mtl_core.learn.training import train_model

    cpu0 = _cpu_seconds()
    wall0 = time.perf_counter()
    result = train_model(examples, out, settings, progress=False)
    wall = time.perf_counter() - wall0
    cpu = _cpu_seconds() - cpu0
    rows = sum(c["train"] for c in result.examples.values())
    shutil.rmtree(out, ignore_errors=True)
    return {
        "rows_per_epoch": rows,
        "steps": result.steps,
        "seconds": round(result.seconds, 2),
        "wall_seconds": round(wall, 2),
        "examples_per_second": round(rows / result.seconds),
        "cpu_seconds": round(cpu, 2),
        "examples_per_cpu_second": round(rows / cpu) if cpu > 0 else None,
    }


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have ended (the spawned ranks)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def linearity(runs: list[dict]) -> dict:
    """How the cost grows with the rows: step ratios, the power-law exponent and the affine fit."""
    runs = sorted(runs, key=lambda r: r["rows_per_epoch"])
    rows = np.array([r["rows_per_epoch"] for r in runs], dtype=float)
    seconds = np.array([r["seconds"] for r in runs], dtype=float)
    k, _ = np.polyfit(np.log(rows), np.log(seconds), 1)
    per_row, fixed = np.polyfit(rows, seconds, 1)
    fitted = fixed + per_row * rows
    return {
        "steps": [
            {
                "from_rows": int(rows[i]),
                "to_rows": int(rows[i + 1]),
                "row_ratio": round(rows[i + 1] / rows[i], 2),
                "seconds_ratio": round(seconds[i + 1] / seconds[i], 2),
            }
            for i in range(len(rows) - 1)
        ],
        "exponent_k": round(float(k), 3),
        "affine_fit": {
            "fixed_seconds": round(float(fixed), 2),
            "microseconds_per_row": round(float(per_row) * 1e6, 2),
            "max_relative_residual": round(float(np.max(np.abs(fitted - seconds) / seconds)), 3),
        },
        # Linear: the largest step's cost ratio within 15 % of its row ratio (the fixed cost weighs least there).
        "linear_at_largest_step": bool(
            abs((seconds[-1] / seconds[-2]) / (rows[-1] / rows[-2]) - 1) <= 0.15 if len(rows) > 1 else True
        ),
    }


def speedups(runs: list[dict], nprocs: list[int]) -> list[dict]:
    """Per size, each process count's examples per second over the first process count's."""
    base = nprocs[0]
    out = []
    for users in sorted({r["users"] for r in runs}):
        by_n = {r["nproc"]: r for r in runs if r["users"] == users}
        out.append(
            {
                "users": users,
                **{
                    f"nproc{n}_over_nproc{base}": round(by_n[base]["seconds"] / by_n[n]["seconds"], 2)
                    for n in nprocs[1:]
                },
            }
        )
    return out


if __name__ == "__main__":
    main()
