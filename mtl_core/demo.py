"""The main job end to end on the embedded defaults: a drifting shop, weekly DAG runs, a corrupted week.

``mtl demo`` calls ``run_demo`` with ``typer.echo``; the demo is a self-contained installation in
``<data dir>/demo`` (SQLite warehouse, MLflow and Airflow stores), started afresh each time, so nothing
else in the data dir is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from mtl_core.artifacts import Comparison, ExampleSet, GateDecision, TrainedModel
from mtl_core.config import Settings
from mtl_core.data.corruption import corrupt_interval
from mtl_core.data.shop import ShopSpec, write_shop
from mtl_core.data.warehouse import make_engine
from mtl_core.errors import MtlError
from mtl_core.local_airflow import run_dag_in_process
from mtl_core.pipeline import challenger_is_its_reference, deployed_model_dir

STEPS = ("extract", "validate", "build_features", "train_challenger", "evaluate", "register", "gate")
# The DAG runs for the intervals ending this many weeks after the shop's start: the first is the first whose
# 28-day window and 7-day history warm-up the shop fills.
WEEKS = (5, 6, 7, 8)
CORRUPTED_RUN = 4  # the run whose week is corrupted before it starts


def run_demo(base: Settings, users: int, items: int, say: Callable[[str], None]) -> None:
    from mtl_core.registry.status import format_status, status
    from mtl_core.registry.store import configure

    began = time.perf_counter()
    demo_dir = (base.data_dir / "demo").resolve()
    shutil.rmtree(demo_dir, ignore_errors=True)
    for variable in ("MTL_WAREHOUSE_URL", "MTL_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"):
        os.environ.pop(variable, None)
    os.environ["MTL_DATA_DIR"] = str(demo_dir)
    settings = base.model_copy(update={"data_dir": demo_dir, "warehouse_url": "", "mlflow_tracking_uri": ""})
    start = date.fromisoformat(settings.shop.start)
    weeks = [start + timedelta(days=7 * k) for k in WEEKS]  # ends of the intervals the DAG runs for
    engine = make_engine(settings.resolved_warehouse_url)
    say(f"data dir:  {settings.data_dir.resolve()}")
    say(f"warehouse: {engine.url.render_as_string(hide_password=True)}")
    say(f"mlflow:    {settings.resolved_mlflow_tracking_uri}")
    days = (weeks[-1] - start).days
    drift_day = (weeks[1] - start).days - 3  # tastes change during the second run's holdout week
    spec = ShopSpec(users=users, items=items, days=days, start=start, seed=settings.shop.seed, drift_day=drift_day)
    shop = write_shop(engine, spec, replace=True)
    say(
        f"simulated {days} days from {start} ({shop.rows['impressions']:,} feed impressions), tastes drift "
        f"from {start + timedelta(days=drift_day)}"
    )
    client = configure(settings.resolved_mlflow_tracking_uri)
    # The offline references (from scratch on all history up to each run's cut-off). Under the expanding
    # policy a run's challenger is its own reference (same configuration, seed and days). Otherwise they need
    # only the warehouse, so two more processes train them while the DAG runs, sharing the two cores.
    trained_runs = [
        end.isoformat()
        for number, end in enumerate(weeks, 1)
        if number != CORRUPTED_RUN and not challenger_is_its_reference(settings, engine, end.isoformat())
    ]
    log = open(settings.data_dir / "references.log", "w")  # noqa: SIM115 (the processes write it until they end)
    references = [
        subprocess.Popen(
            [sys.executable, "-m", "mtl_core.judge.reference", *group], stdout=subprocess.DEVNULL, stderr=log
        )
        for group in _balanced(trained_runs, start)
        if group
    ]
    shipped: list[tuple[str, Comparison, str | None]] = []
    for number, end in enumerate(weeks, 1):
        if number == CORRUPTED_RUN:
            damage = corrupt_interval(engine, end - timedelta(days=7), end)
            say(f"\ncorrupted the week before {end}: {', '.join(damage)}")
        say(f"\nrun {number}: mtl_retrain for the interval ending {end} ...")
        t0 = time.perf_counter()
        states = run_dag_in_process(settings, end.isoformat(), quiet=True)
        failed = [task for task, state in states.items() if state in ("failed", "upstream_failed")]
        say(f"  tasks: {', '.join(f'{t}={st}' for t, st in states.items())}  ({time.perf_counter() - t0:.0f} s)")
        if failed:
            first = next(t for t in STEPS if states.get(t) == "failed")
            say(f"  stopped at {first}; nothing registered after it, champion unchanged")
            for line in _validation_failures(settings, end):
                say(line)
            continue
        comparison = _latest_comparison(settings)
        for line in _comparison_lines(comparison):
            say(line)
        decision = status(client, settings.pipeline.model_name)["last_decision"]
        say(f"  verdict: {decision['verdict']} v{decision['version']}: {decision['reason']}")
        decision_record = GateDecision.load(Path(comparison.uri).parent / "decision.json")
        shipped.append((end.isoformat(), comparison, deployed_model_dir(comparison, decision_record)))
    say("\n" + format_status(status(client, settings.pipeline.model_name)))
    if references:
        say("\nwaiting for the offline references ...")
    failed = [process for process in references if process.wait() != 0]
    log.close()
    if failed:
        raise MtlError(f"training the offline references failed; the log is {settings.data_dir / 'references.log'}")
    say("the shipped champion of each run against the offline reference (the same configuration trained from")
    say("scratch on all history up to the run's cut-off) and the oracle, on the run's holdout:")
    for line in _reference_lines(settings, shipped, trained_runs):
        say(line)
    say(f"\nreview in the MLflow UI: mlflow ui --backend-store-uri {settings.resolved_mlflow_tracking_uri}")
    pages = sorted(settings.data_dir.glob("runs/*/review_v*.html"), key=lambda page: page.stat().st_mtime)
    if pages:
        say(f"each version's reviewer page (open in a browser), e.g. the newest: {pages[-1]}")
    say(
        f"serve the champion (its features are in the online store): MTL_DATA_DIR={settings.data_dir} "
        "MTL_SERVE__TOKEN=<a secret> mtl serve --port 8000"
    )
    say(f"demo took {time.perf_counter() - began:.0f} s")


def _validation_failures(settings: Settings, end: date) -> list[str]:
    lines = []
    for result in settings.snapshots_dir.glob(f"*-{end:%Y%m%d}/validation/result.json"):
        for failure in json.loads(result.read_text())["summary"]["failures"]:
            where = f"{failure['table']}.{failure['column']}"
            seen = f"{failure['unexpected_count']} unexpected, e.g. {failure['sample_values'][:3]}"
            lines.append(f"    {where}: {failure['expectation']} ({seen})")
    return lines


def _latest_comparison(settings: Settings) -> Comparison:
    runs = sorted((settings.data_dir / "runs").glob("*/comparison.json"), key=lambda p: p.stat().st_mtime)
    return Comparison.load(runs[-1])


def _comparison_lines(comparison: Comparison) -> list[str]:
    lines = []
    for task, entry in comparison.tasks.items():
        champion: dict[str, Any] | None = entry.get("champion")
        oracle = entry["challenger"].get("oracle_auc")
        lines.append(
            f"  {task:<7} challenger auc {entry['challenger']['auc']:.4f}"
            + (f"  champion {champion['auc']:.4f}" if champion else "  (no champion yet)")
            + (f"  oracle {oracle:.4f}" if oracle else "")
        )
    return lines


def _reference_lines(
    settings: Settings, shipped: list[tuple[str, Comparison, str | None]], trained_apart: list[str]
) -> list[str]:
    from mtl_core.judge.reference import compare_with_reference, reference_dir

    lines = []
    for end, comparison, model_dir in shipped:
        if model_dir is None:
            lines.append(f"  {end}: no champion shipped")
            continue
        examples = ExampleSet.load(comparison.examples).examples()
        own = end not in trained_apart
        reference = (
            Path(TrainedModel.load(comparison.challenger).model_dir) if own else reference_dir(settings, end) / "model"
        )
        gap = compare_with_reference(reference, Path(model_dir), examples)
        lines.append(f"  interval ending {end}:" + ("  (the run's challenger is its reference)" if own else ""))
        for task, entry in gap.tasks.items():
            diff = entry["champion_minus_reference"]
            oracle = comparison.tasks[task]["challenger"].get("oracle_auc")
            lines.append(
                f"    {task:<7} champion {entry['champion_auc']:.4f}  reference {entry['auc']:.4f} "
                f"(champion - reference {diff['delta']:+.4f}, 95% [{diff['low']:+.4f}, {diff['high']:+.4f}])"
                + (f"  oracle {oracle:.4f} (gap {oracle - entry['champion_auc']:.4f})" if oracle else "")
            )
    return lines


def _balanced(ends: list[str], start: date) -> tuple[list[str], list[str]]:
    """The interval ends in two groups of about equal history to train on (a reference costs its days)."""
    groups: tuple[list[str], list[str]] = ([], [])
    load = [0, 0]
    for end in sorted(ends, reverse=True):
        lighter = load.index(min(load))
        groups[lighter].append(end)
        load[lighter] += (date.fromisoformat(end) - start).days
    return groups
