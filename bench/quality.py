"""Quality benchmark: joint model vs single-task models vs the oracle, and what the text encoder buys.

On a simulated shop (default 20,000 users, 3,000 items, 60 days) the models train on everything but the
last 7 days and are scored on those 7 days (the holdout):

* per task: the joint model's AUC, the single-task model's AUC (same features and tower, one task, and
  the joint model's optimiser budget: as many steps per epoch, evaluations and patience), and the oracle
  AUC (the shop's true probabilities: the best any model could do);
* on cold-start items (younger than a week): ctr AUC of the joint model with and without text;
* per task, the joint-minus-single and the oracle-minus-joint AUC differences, each with a 95 % paired
  bootstrap interval over the holdout.

Prints JSON, then how each target of the quality bar fared. Seeds 1-9 are dev shops (for choosing
settings), 101-103 test shops (for reporting; README, "How quality is measured"):

    .venv/bin/python bench/quality.py [--users 20000 --items 3000 --days 60 --seeds 101 102 103] [--dir /tmp/q]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np

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
    parser.add_argument("--seeds", type=int, nargs="+", default=[101, 102, 103], help="1-9: dev; 101-103: test")
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--config", type=Path, default=None, help="settings YAML for the models")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="mtl-quality-"))
    per_seed = [run_seed(args, seed, root / f"seed{seed}") for seed in args.seeds]
    summary = summarise(per_seed)
    print(json.dumps({"seeds": args.seeds, "per_seed": per_seed, "summary": summary}, indent=2))
    report_checks(summary)


def run_seed(args, seed: int, root: Path) -> dict:
    """One shop seed: every model trained and scored on its holdout."""

    from mtl_core.config import load_settings
    from mtl_core.data import warehouse as wh
    from mtl_core.data.extract import extract_snapshot
    from mtl_core.data.pseudonyms import pseudonymiser_for
    from mtl_core.data.shop import ShopSpec, write_shop
    from mtl_core.judge.bootstrap import paired_bootstrap_auc
    from mtl_core.judge.evaluate import score_tasks
    from mtl_core.judge.oracle import Truth, oracle_probabilities
    from mtl_core.learn.checkpoint import load_model
    from mtl_core.learn.examples import build_examples
    from mtl_core.learn.training import train_model

    began = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    settings = load_settings(args.config, environ={"MTL_DATA_DIR": str(root)})
    settings = settings.model_copy(update={"features": settings.features.model_copy(update={"holdout_days": 7})})
    engine = wh.make_engine(f"sqlite:///{root / 'warehouse.db'}")
    start = date(2026, 1, 5)
    write_shop(
        engine, ShopSpec(users=args.users, items=args.items, days=args.days, start=start, seed=seed), replace=True
    )
    snapshot = root / "snapshot"
    pseudonyms = pseudonymiser_for(settings)
    truth = Truth(engine, pseudonyms)
    end = start + timedelta(days=args.days)
    extract_snapshot(engine, start.isoformat(), end.isoformat(), snapshot, pseudonyms)
    examples = build_examples(snapshot, settings.features, settings.tasks)
    seconds: dict[str, float] = {}
    raw: dict[str, dict] = {}  # model -> task -> holdout probabilities, for the paired comparisons

    def fit(name: str, run_settings, single_task: str | None = None) -> dict:
        t0 = time.perf_counter()
        train_model(examples, root / name, run_settings, single_task=single_task, progress=False, source=snapshot)
        model = load_model(root / name)
        report, raw[name] = score_tasks(model, examples, list(model.settings.tasks), "holdout", truth)
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
        true_p = oracle_probabilities(truth, task, examples, rows)
        if true_p is not None:
            gap = paired_bootstrap_auc(examples.labels[rows, t], true_p, raw["joint"][task.name])
            tasks[task.name]["oracle_minus_joint"] = _rounded(gap)
    cold = {
        "with_text_auc": round(joint["ctr"]["slices"]["cold_start_items"]["auc"], 4),
        "without_text_auc": round(no_text["ctr"]["slices"]["cold_start_items"]["auc"], 4),
        "n": joint["ctr"]["slices"]["cold_start_items"]["n"],
    }
    return {
        "shop": {"users": args.users, "items": args.items, "days": args.days, "seed": seed},
        "tasks": tasks,
        "cold_start_ctr": cold,
        "train_and_evaluate_seconds": seconds,
        "seconds": round(time.perf_counter() - began, 1),
    }


def summarise(per_seed: list[dict]) -> dict:
    """Per task and figure: the mean and the min-max over the seeds."""

    def spread(values: list[float]) -> dict:
        return {"mean": round(float(np.mean(values)), 4), "min": min(values), "max": max(values)}

    out: dict = {"tasks": {}}
    for task in per_seed[0]["tasks"]:
        rows = [run["tasks"][task] for run in per_seed]
        out["tasks"][task] = {
            "joint_auc": spread([r["joint_auc"] for r in rows]),
            "single_auc": spread([r["single_auc"] for r in rows]),
            "oracle_auc": spread([r["oracle_auc"] for r in rows if r["oracle_auc"] is not None]),
            "joint_minus_single": spread([r["joint_minus_single"]["delta"] for r in rows]),
            "joint_minus_single_intervals": [
                [r["joint_minus_single"]["low"], r["joint_minus_single"]["high"]] for r in rows
            ],
            "oracle_minus_joint": spread([r["oracle_minus_joint"]["delta"] for r in rows if "oracle_minus_joint" in r]),
        }
    out["cold_start_ctr"] = {
        key: spread([run["cold_start_ctr"][key] for run in per_seed]) for key in ("with_text_auc", "without_text_auc")
    }
    return out


def report_checks(summary: dict) -> None:
    """How each target fared on the seeds' means (a check on one seed is the table's business)."""
    tasks = summary["tasks"]
    checks = {}
    for name, t in tasks.items():
        gap = t["oracle_minus_joint"]
        checks[f"{name} within {TARGETS['oracle_gap']} of oracle (mean {gap['mean']}, max {gap['max']})"] = (
            gap["mean"] <= TARGETS["oracle_gap"]
        )
    lift = tasks["cvr"]["joint_minus_single"]
    checks[f"cvr joint >= single + {TARGETS['cvr_lift']} (mean lift {lift['mean']})"] = (
        lift["mean"] >= TARGETS["cvr_lift"]
    )
    for name, t in tasks.items():
        lift = t["joint_minus_single"]
        checks[f"{name} joint >= single - {TARGETS['max_single_loss']} (mean {lift['mean']}, min {lift['min']})"] = (
            lift["mean"] >= -TARGETS["max_single_loss"]
        )
    cold = summary["cold_start_ctr"]
    checks[f"cold-start ctr text lift >= {TARGETS['cold_start_text_lift']}"] = (
        cold["with_text_auc"]["mean"] >= cold["without_text_auc"]["mean"] + TARGETS["cold_start_text_lift"]
    )
    for check, ok in checks.items():
        print(f"{'PASS' if ok else 'MISS'}  {check}", file=sys.stderr)


def _holdout_labels(examples, task: str):
    t = examples.task_names.index(task)
    return examples.labels[examples.task_rows(t, "holdout"), t]


def _rounded(interval: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 4) for key, value in interval.items()}


if __name__ == "__main__":
    main()
