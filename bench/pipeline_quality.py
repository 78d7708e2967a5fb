"""Pipeline quality benchmark: what the scheduled DAG ships, week after week, through a drift.

A simulated shop whose users' tastes change mid-way; the real DAG (``mtl run-dag``'s in-process run) for
``--weeks`` consecutive weekly intervals, under one retraining ``--policy``. For each run and task it prints

* champion: the model deployed after the run's decision (the challenger if promoted, else the champion
  kept), scored on that run's holdout week;
* challenger: this run's new model on the same rows;
* oracle: the shop's true probabilities on the same rows (the best any model could do);
* reference: the offline reference, a model of the same configuration trained from scratch on ALL history
  up to the run's training cut-off (uniform weights), scored on the same rows. It is trained for the last
  run before the drift, the two after it and the last run (``--references all`` for every run). Under the
  expanding policy the run's challenger is its reference (the same model), so none is trained apart.

It ends with one JSON object: per task the averages over runs, the champion's gap to the reference and to
the oracle, and the recovery after the drift (the gaps at the two runs after it).

    .venv/bin/python bench/pipeline_quality.py --seed 101 --policy recency [--weeks 8 --users 9000 ...]

Dev shops (seeds 1-9) are for choosing; test shops (101-103) for reporting (README, "How quality is measured").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from mtl_core.config import DEMO_ITEMS, DEMO_USERS

START = date(2026, 1, 5)
FIRST_WEEK = 5  # the first run's interval ends 5 weeks after the shop's start (the 28-day window's first full one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1, help="shop seed: 1-9 to choose, 101-103 to report")
    parser.add_argument("--weeks", type=int, default=8, help="weekly DAG runs (at least 8)")
    parser.add_argument("--policy", choices=["warm_start", "scratch", "recency", "expanding"], default=None)
    parser.add_argument("--users", type=int, default=DEMO_USERS, help="the demo's shop size by default")
    parser.add_argument("--items", type=int, default=DEMO_ITEMS)
    parser.add_argument("--references", choices=["key", "all", "none"], default="key")
    parser.add_argument("--dir", type=Path, default=None, help="installation directory (replaced)")
    parser.add_argument("--config", type=Path, default=None, help="settings YAML")
    args = parser.parse_args()
    if args.weeks < 2:
        parser.error("--weeks must be at least 2")

    root = (args.dir or Path(f"/tmp/mtl-pipeline-quality-{args.seed}-{args.policy or 'default'}")).resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for variable in ("MTL_WAREHOUSE_URL", "MTL_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        os.environ.pop(variable, None)
    os.environ["MTL_DATA_DIR"] = str(root)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # One pseudonym key per shop seed, so that every policy's run of a seed sees the same examples and the
    # offline references (the same for every policy) are trained once per seed and shop size.
    os.environ["MTL_PRIVACY__PSEUDONYM_KEY"] = hashlib.sha256(f"pipeline-quality-{args.seed}".encode()).hexdigest()
    if args.policy:
        os.environ["MTL_PIPELINE__POLICY"] = args.policy  # the DAG reads the settings from the environment

    from mtl_core.config import load_settings
    from mtl_core.data.shop import ShopSpec, write_shop
    from mtl_core.data.warehouse import make_engine
    from mtl_core.local_airflow import run_dag_in_process

    settings = load_settings(args.config)
    policy = settings.pipeline.policy
    cache = Path("/tmp/mtl-pipeline-quality-references") / (
        f"seed{args.seed}-{args.users}x{args.items}-{args.weeks}weeks-holdout{settings.features.holdout_days}"
    )
    ends = [START + timedelta(days=7 * (FIRST_WEEK + k)) for k in range(args.weeks)]
    before = args.weeks // 2 - 1  # index of the last run before the drift
    # Tastes change on the fourth day of the holdout week of run `before + 1`: that run is the first to see it.
    drift_day = (ends[before + 1] - START).days - 4
    engine = make_engine(settings.resolved_warehouse_url)
    days = (ends[-1] - START).days
    write_shop(
        engine,
        ShopSpec(users=args.users, items=args.items, days=days, start=START, seed=args.seed, drift_day=drift_day),
        replace=True,
    )
    references = {
        "all": set(range(args.weeks)),
        "key": {before, before + 1, before + 2, args.weeks - 1},
        "none": set(),
    }[args.references]
    say(
        f"shop seed {args.seed}: {args.users} users, {args.items} items, {days} days from {START}, tastes drift "
        f"from {START + timedelta(days=drift_day)}; policy {policy}; {args.weeks} weekly runs"
    )
    say(
        f"{'run':>3} {'interval end':<12} {'task':<7} {'champion':>8} {'challenger':>10} {'oracle':>7} {'reference':>9}"
    )
    runs = []
    began = time.perf_counter()
    for number, end in enumerate(ends):
        t0 = time.perf_counter()
        states = run_dag_in_process(settings, end.isoformat(), quiet=True)
        seconds = time.perf_counter() - t0
        failed = [task for task, state in states.items() if state in ("failed", "upstream_failed")]
        if failed:
            raise SystemExit(f"run {number + 1} ({end}) failed at {failed}; the log is in {root}")
        run = _read_run(settings, end)
        run["seconds"] = round(seconds, 1)
        if number in references:
            t0 = time.perf_counter()
            run["reference"] = _offline_reference(settings, engine, run, cache / end.isoformat())
            run["reference_seconds"] = round(time.perf_counter() - t0, 1)
        runs.append(run)
        for task, row in run["tasks"].items():
            ref = run.get("reference", {}).get(task)
            say(
                f"{number + 1:>3} {end.isoformat():<12} {task:<7} {row['champion']:>8.4f} {row['challenger']:>10.4f} "
                f"{row['oracle']:>7.4f} {ref['auc'] if ref else float('nan'):>9.4f}"
            )
        say(f"    verdict {run['verdict']} v{run['version']} ({run['seconds']:.0f} s): {run['reason'][:160]}")
    summary = _summary(runs, before, settings)
    result = {
        "shop": {"seed": args.seed, "users": args.users, "items": args.items, "days": days, "drift_day": drift_day},
        "policy": policy,
        "weeks": args.weeks,
        "runs": runs,
        "summary": summary,
        "seconds": round(time.perf_counter() - began, 1),
    }
    (root / "pipeline_quality.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


def say(line: str) -> None:
    print(line, flush=True)


def _read_run(settings, end: date) -> dict:
    """The newest run's comparison and decision: per task, deployed champion, challenger and oracle AUC."""
    from mtl_core.artifacts import Comparison, GateDecision, TrainedModel
    from mtl_core.pipeline import deployed_model_dir

    folder = max((settings.data_dir / "runs").glob("*/comparison.json"), key=lambda p: p.stat().st_mtime).parent
    comparison = Comparison.load(folder / "comparison.json")
    decision = GateDecision.load(folder / "decision.json")
    tasks = {}
    for task, entry in comparison.tasks.items():
        challenger = entry["challenger"]["auc"]
        champion = entry["champion"]["auc"] if entry.get("champion") else None
        deployed = challenger if decision.verdict == "promote" or champion is None else champion
        if champion is None and decision.verdict != "promote":
            deployed = float("nan")  # no model deployed yet
        tasks[task] = {
            "champion": deployed,
            "challenger": challenger,
            "previous_champion": champion,
            "oracle": entry["challenger"].get("oracle_auc") or float("nan"),
            "n": entry["challenger"]["n"],
        }
    return {
        "interval_end": end.isoformat(),
        "verdict": decision.verdict,
        "version": decision.version,
        "reason": decision.reason,
        "examples": comparison.examples,
        "champion_model": deployed_model_dir(comparison, decision),
        "challenger_model": TrainedModel.load(comparison.challenger).model_dir,
        "tasks": tasks,
    }


def _offline_reference(settings, engine, run: dict, out: Path) -> dict:
    """Same configuration, from scratch on all history up to the run's training cut-off; scored on its holdout.

    Under the expanding policy the run's challenger is that model (same configuration, seed and days), so it
    is not trained twice.
    """
    from mtl_core.artifacts import ExampleSet
    from mtl_core.judge.reference import compare_with_reference, train_reference
    from mtl_core.pipeline import challenger_is_its_reference

    if challenger_is_its_reference(settings, engine, run["interval_end"]):
        reference = Path(run["challenger_model"])
        run["reference_is_challenger"] = True
    else:
        reference = train_reference(settings, engine, run["interval_end"], out)
    # Scored on the DAG run's own holdout rows, so that it is compared with the champion row for row.
    examples = ExampleSet.load(run["examples"]).examples()
    champion = Path(run["champion_model"]) if run["champion_model"] else None
    gap = compare_with_reference(reference, champion, examples)
    return {
        task: {
            "auc": entry["auc"],
            **(
                {"champion_minus_reference": {k: round(v, 4) for k, v in entry["champion_minus_reference"].items()}}
                if "champion_minus_reference" in entry
                else {}
            ),
        }
        for task, entry in gap.tasks.items()
    }


def _summary(runs: list[dict], before: int, settings) -> dict:
    tasks = list(runs[0]["tasks"])
    out = {}
    for task in tasks:
        deployed = [r for r in runs if not np.isnan(r["tasks"][task]["champion"])]
        with_ref = [r for r in deployed if "reference" in r]
        after = [r for r in runs[before + 1 : before + 3] if "reference" in r]
        out[task] = {
            "champion_auc": _mean(r["tasks"][task]["champion"] for r in deployed),
            "challenger_auc": _mean(r["tasks"][task]["challenger"] for r in runs),
            "oracle_auc": _mean(r["tasks"][task]["oracle"] for r in runs),
            "oracle_minus_champion": _mean(r["tasks"][task]["oracle"] - r["tasks"][task]["champion"] for r in deployed),
            "reference_minus_champion": _mean(
                r["reference"][task]["auc"] - r["tasks"][task]["champion"] for r in with_ref
            ),
            "reference_runs": [runs.index(r) + 1 for r in with_ref],
            "after_drift_reference_minus_champion": [
                round(r["reference"][task]["auc"] - r["tasks"][task]["champion"], 4) for r in after
            ],
        }
    out["verdicts"] = [r["verdict"] for r in runs]
    out["targets"] = {
        "mean reference gap <= 0.005 on every task": all(
            out[t]["reference_minus_champion"] is not None and out[t]["reference_minus_champion"] <= 0.005
            for t in tasks
        ),
        "within 0.01 of the reference within two runs after the drift": all(
            any(gap <= 0.01 for gap in out[t]["after_drift_reference_minus_champion"]) for t in tasks
        ),
        "mean oracle gap <= 0.02 on every task": all(out[t]["oracle_minus_champion"] <= 0.02 for t in tasks),
    }
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not np.isnan(v)]
    return round(float(np.mean(values)), 4) if values else None


if __name__ == "__main__":
    main()
