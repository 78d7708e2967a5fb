"""Quality benchmark: joint model vs single-task models vs the oracle, and what the text encoder buys.

On a simulated shop (default 20,000 users, 3,000 items, 60 days) the models train on everything but the
last 7 days and are scored on those 7 days (the holdout):

* per task: the joint model's AUC, the single-task model's AUC (same features and tower, one task), and
  the oracle AUC (the shop's true probabilities: the best any model could do);
* on cold-start items (younger than a week): ctr AUC of the joint model with and without text;
* per task, the joint-minus-single and the oracle-minus-joint AUC differences, each with a 95 % paired
  bootstrap interval over the holdout.

Prints JSON, then how each target of the quality bar fared:

    .venv/bin/python bench/quality.py [--users 20000 --items 3000 --days 60 --seed 1] [--dir /tmp/q]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

TARGETS = {
    "oracle_gap": 0.02,  # every task's joint AUC within this of its oracle AUC
    "cvr_lift": 0.005,  # joint cvr AUC at least this above single-task cvr
    "max_single_loss": 0.002,  # no task more than this below its single-task model
    "cold_start_text_lift": 0.02,  # cold-start ctr AUC with text at least this above without
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=3_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--config", type=Path, default=None, help="settings YAML for the models")
    args = parser.parse_args()

    from mtl_core.config import load_settings
    from mtl_core.data import warehouse as wh
    from mtl_core.data.extract import extract_snapshot
    from mtl_core.data.shop import ShopSpec, write_shop
    from mtl_core.judge.bootstrap import paired_bootstrap_auc
    from mtl_core.judge.evaluate import score_tasks
    from mtl_core.judge.oracle import oracle_probabilities
    from mtl_core.learn.checkpoint import load_model
    from mtl_core.learn.examples import build_examples
    from mtl_core.learn.training import train_model

    began = time.perf_counter()
    root = args.dir or Path(tempfile.mkdtemp(prefix="mtl-quality-"))
    root.mkdir(parents=True, exist_ok=True)
    settings = load_settings(args.config, environ={"MTL_DATA_DIR": str(root)})
    settings = settings.model_copy(update={"features": settings.features.model_copy(update={"holdout_days": 7})})
    engine = wh.make_engine(f"sqlite:///{root / 'warehouse.db'}")
    start = date(2026, 1, 5)
    write_shop(
        engine, ShopSpec(users=args.users, items=args.items, days=args.days, start=start, seed=args.seed), replace=True
    )
    snapshot = root / "snapshot"
    extract_snapshot(engine, start.isoformat(), (start + timedelta(days=args.days)).isoformat(), snapshot)
    examples = build_examples(snapshot, settings.features, settings.tasks)
    seconds: dict[str, float] = {}
    raw: dict[str, dict] = {}  # model -> task -> holdout probabilities, for the paired comparisons

    def fit(name: str, run_settings, single_task: str | None = None) -> dict:
        t0 = time.perf_counter()
        train_model(examples, root / name, run_settings, single_task=single_task, progress=False, source=snapshot)
        model = load_model(root / name)
        report, raw[name] = score_tasks(model, examples, list(model.settings.tasks), "holdout", engine)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(
            f"{name}: {json.dumps({t: round(m['auc'], 4) for t, m in report.items()})} ({seconds[name]} s)",
            file=sys.stderr,
            flush=True,
        )
        return report

    joint = fit("joint", settings)
    no_text = fit(
        "joint_without_text", settings.model_copy(update={"text": settings.text.model_copy(update={"enabled": False})})
    )
    single = {task.name: fit(f"single_{task.name}", settings, task.name)[task.name] for task in settings.tasks}

    tasks = {
        name: {
            "joint_auc": round(joint[name]["auc"], 4),
            "single_auc": round(single[name]["auc"], 4),
            "oracle_auc": round(joint[name]["oracle_auc"], 4) if joint[name]["oracle_auc"] else None,
            "n": joint[name]["n"],
            # Paired bootstrap over the holdout examples (both models score the same rows): how sure the
            # joint-minus-single difference is, given the test set. Seed-to-seed training noise comes on top.
            "joint_minus_single": _rounded(
                paired_bootstrap_auc(_holdout_labels(examples, name), raw["joint"][name], raw[f"single_{name}"][name])
            ),
        }
        for name in joint
    }
    for task in settings.tasks:
        # The same for the gap to the oracle: the holdout's labels are one draw, so a small holdout (a few
        # hundred purchases for cvr) gives a wide interval around the gap measured.
        t = examples.task_names.index(task.name)
        rows = examples.task_rows(t, "holdout")
        truth = oracle_probabilities(engine, task, examples, rows)
        if truth is not None:
            gap = paired_bootstrap_auc(examples.labels[rows, t], truth, raw["joint"][task.name])
            tasks[task.name]["oracle_minus_joint"] = _rounded(gap)
    cold = {
        "with_text_auc": round(joint["ctr"]["slices"]["cold_start_items"]["auc"], 4),
        "without_text_auc": round(no_text["ctr"]["slices"]["cold_start_items"]["auc"], 4),
        "n": joint["ctr"]["slices"]["cold_start_items"]["n"],
    }
    result = {
        "shop": {"users": args.users, "items": args.items, "days": args.days, "seed": args.seed},
        "tasks": tasks,
        "cold_start_ctr": cold,
        "train_and_evaluate_seconds": seconds,
        "seconds": round(time.perf_counter() - began, 1),
    }
    print(json.dumps(result, indent=2))
    checks = {
        f"{name} within {TARGETS['oracle_gap']} of oracle": t["oracle_auc"] is not None
        and t["oracle_auc"] - t["joint_auc"] <= TARGETS["oracle_gap"]
        for name, t in tasks.items()
    }
    details = {
        f"{name} within {TARGETS['oracle_gap']} of oracle": f" (gap {g['delta']}, 95 % {g['low']} to {g['high']})"
        for name, t in tasks.items()
        if (g := t.get("oracle_minus_joint"))
    }
    checks[f"cvr joint >= single + {TARGETS['cvr_lift']}"] = (
        tasks["cvr"]["joint_auc"] >= tasks["cvr"]["single_auc"] + TARGETS["cvr_lift"]
    )
    for name, t in tasks.items():
        checks[f"{name} joint >= single - {TARGETS['max_single_loss']}"] = (
            t["joint_auc"] >= t["single_auc"] - TARGETS["max_single_loss"]
        )
    checks[f"cold-start ctr text lift >= {TARGETS['cold_start_text_lift']}"] = (
        cold["with_text_auc"] >= cold["without_text_auc"] + TARGETS["cold_start_text_lift"]
    )
    for check, ok in checks.items():
        print(f"{'PASS' if ok else 'MISS'}  {check}{details.get(check, '')}", file=sys.stderr)


def _holdout_labels(examples, task: str):
    t = examples.task_names.index(task)
    return examples.labels[examples.task_rows(t, "holdout"), t]


def _rounded(interval: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 4) for key, value in interval.items()}


if __name__ == "__main__":
    main()
