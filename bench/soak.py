"""Soak: the real retraining DAG over consecutive weekly intervals, with drift, bad batches and concurrent runs.

A fresh installation (SQLite warehouse, MLflow and Airflow stores) in a temporary directory or --data-dir
holds a simulated shop long enough for --intervals weekly intervals after the training window, with tastes
drifting halfway. For each interval, one `mtl run-dag --json` process replays the DAG (a real process each,
as an on-call would start it). Every --corrupt-every-th interval (index % N == N - 1) has its newest week
damaged first (`corrupt_interval`) and must stop at validate; the damage is undone after the run (the bad
batch repaired upstream), else it would stay in the next four training windows. At each --concurrent-at
index two runs start at once: by default for that interval and the next (two distinct challengers compared
against the same champion, so that when both pass the gate, only the compare-and-set promotion keeps the
second from also promoting), or with --pair-mode same two runs for that one interval. The first interval
trains a deliberately weak model (--first-steps), as the DAG tests do, so later challengers can beat it.

After each interval it reads the registry (aliases, versions and their gate.* / promotion.* tags) and prints
one line to stderr: interval end, verdict, champion after, number of versions, seconds. At the end it
prints one JSON object to stdout (the rows and the invariants) and exits 1 if an invariant fails:

* one version per run that reached register, each from a run of this soak (no orphan, no duplicate);
* no double promotion: per interval step at most one alias move, the recorded promotions equal the moves,
  and every promoted version replaced exactly the champion its gate compared it against;
* each version's gate tags name the champion it was compared against (the champion when its run started);
* the champion is always a version whose gate verdict is promote;
* no run stuck: no timeout, no Airflow run or task left running or queued, no MLflow run left RUNNING;
* corrupted intervals stop at validate, and every other run ends in promote or record_rejection.

    .venv/bin/python bench/soak.py [--intervals 20 --users 3000 --items 800 --seed 1] [--data-dir DIR] [--keep]
    .venv/bin/python bench/soak.py --intervals 4 --users 800 --items 300 --concurrent-at 1 --corrupt-every 4
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

START = date(2026, 1, 5)  # a Monday: the DAG's weekly intervals end on Mondays 00:00 UTC
TASK_ORDER = (
    "extract",
    "validate",
    "build_features",
    "train_challenger",
    "evaluate",
    "register",
    "gate",
    "promote",
    "record_rejection",
)
UNFINISHED = {"running", "queued", "scheduled", "up_for_retry", "up_for_reschedule", "restarting", "deferred"}
CONFIG = """
features: {{history_days: 7, valid_days: 4, holdout_days: 7}}
train: {{epochs: 1, steps_per_epoch: {steps}}}
pipeline: {{retries: 0}}
tasks:
  - {{name: ctr, sample_space: feed, label: clicked, floor: 0.5}}
  - {{name: cvr, sample_space: feed, label: purchased, given: clicked, weight: 0.5, floor: 0.5}}
  - {{name: ad_ctr, sample_space: ads, label: ad_clicked, weight: 0.5, floor: 0.5}}
  - {{name: churn, sample_space: users, label: churned, weight: 0.25, floor: 0.5}}
"""


@dataclass
class Run:
    """One `mtl run-dag` process and what it left behind."""

    interval: int
    end: str
    corrupted: bool
    concurrent_with: str | None = None
    seconds: float = 0.0
    returncode: int | None = None
    timed_out: bool = False
    states: dict[str, str] = field(default_factory=dict)
    run_key: str | None = None
    version: int | None = None
    verdict: str = ""
    gate_champion: str | None = None
    reason: str = ""
    log: str = ""


def main() -> None:
    args = _arguments()
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="mtl-soak-")).resolve()
    if args.data_dir and data_dir.exists() and any(data_dir.iterdir()):
        sys.exit(f"error: --data-dir {data_dir} is not empty; the soak needs a fresh installation")
    data_dir.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        ok = soak(args, data_dir)
    finally:
        if args.keep or args.data_dir or not ok:
            _say(f"installation kept: {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    sys.exit(0 if ok else 1)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", type=int, default=20, help="weekly intervals to run (default 20)")
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--items", type=int, default=800)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", help="an empty directory for the installation (kept); default: a temporary one")
    parser.add_argument("--keep", action="store_true", help="keep the temporary installation (always kept on failure)")
    parser.add_argument("--corrupt-every", type=int, default=5, help="corrupt interval i when i %% N == N-1; 0: never")
    parser.add_argument(
        "--corrupt-kinds", default="null_ids,bad_event_types", help="comma-separated mtl_core.data.corruption kinds"
    )
    parser.add_argument(
        "--concurrent-at", default="2,11", help="comma-separated interval indexes where two runs start at once"
    )
    parser.add_argument(
        "--pair-mode",
        choices=("consecutive", "same"),
        default="consecutive",
        help="two runs at once: for interval i and i+1 (default), or twice for interval i",
    )
    parser.add_argument("--steps", type=int, default=150, help="train.steps_per_epoch of every run (1 epoch)")
    parser.add_argument("--first-steps", type=int, default=80, help="steps of the first, weak model; 0: as the others")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a run counts as stuck")
    args = parser.parse_args()
    args.pairs = sorted({int(i) for i in args.concurrent_at.split(",") if i.strip()})
    args.kinds = tuple(k.strip() for k in args.corrupt_kinds.split(",") if k.strip())
    problems = []
    if args.intervals < 1:
        problems.append("--intervals must be at least 1")
    for i in args.pairs:
        last = i + 1 if args.pair_mode == "consecutive" else i
        if not 0 <= i or last >= args.intervals:
            problems.append(f"--concurrent-at {i}: the pair needs intervals {i}..{last} within 0..{args.intervals - 1}")
        if _corrupted(args, i) and args.pair_mode == "consecutive":
            problems.append(f"--concurrent-at {i}: a corrupted first interval would also damage the second's window")
    starts = set(args.pairs)
    if args.pair_mode == "consecutive" and any(i + 1 in starts for i in starts):
        problems.append(f"--concurrent-at {args.concurrent_at}: consecutive pairs overlap")
    if problems:
        parser.error("; ".join(problems))
    return args


def _corrupted(args: argparse.Namespace, index: int) -> bool:
    return args.corrupt_every > 0 and index % args.corrupt_every == args.corrupt_every - 1


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- the soak ---------------------------------------------------------------------------------------------
def soak(args: argparse.Namespace, data_dir: Path) -> bool:
    began = time.perf_counter()
    for variable in ("MTL_WAREHOUSE_URL", "MTL_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI", "AIRFLOW_HOME"):
        os.environ.pop(variable, None)
    config = data_dir / "mtl.yaml"
    config.write_text(CONFIG.format(steps=args.steps))
    os.environ.update({"MTL_DATA_DIR": str(data_dir), "MTL_CONFIG": str(config), "MLFLOW_DISABLE_TELEMETRY": "true"})
    (data_dir / "soak_logs").mkdir(exist_ok=True)

    from mtl_core.config import load_settings
    from mtl_core.data.shop import ShopSpec, write_shop
    from mtl_core.data.warehouse import make_engine
    from mtl_core.registry.store import configure

    settings = load_settings()
    engine = make_engine(settings.resolved_warehouse_url)
    window = settings.pipeline.lookback_days + settings.features.history_days
    first_end = START + timedelta(days=7 * -(-window // 7))  # the first Monday with a whole window behind it
    ends = [first_end + timedelta(days=7 * k) for k in range(args.intervals)]
    days = (ends[-1] - START).days
    drift_day = (ends[args.intervals // 2] - START).days - 3  # tastes change in the middle interval's holdout
    spec = ShopSpec(users=args.users, items=args.items, days=days, start=START, seed=args.seed, drift_day=drift_day)
    t0 = time.perf_counter()
    shop = write_shop(engine, spec, replace=True)
    _say(
        f"data dir {data_dir}\nshop: {args.users} users, {args.items} items, {days} days from {START} "
        f"({shop.rows['impressions']:,} feed impressions, {time.perf_counter() - t0:.0f} s), drift from "
        f"{START + timedelta(days=drift_day)}; intervals end {ends[0]} .. {ends[-1]}"
    )
    client = configure(settings.resolved_mlflow_tracking_uri)
    model = settings.pipeline.model_name

    steps: list[list[int]] = []
    index = 0
    while index < args.intervals:
        if index in args.pairs:
            steps.append([index, index + 1] if args.pair_mode == "consecutive" else [index, index])
            index += 2 if args.pair_mode == "consecutive" else 1
        else:
            steps.append([index])
            index += 1

    runs: list[Run] = []
    observations: list[dict[str, Any]] = []
    for step in steps:
        before = _registry(client, model)
        batch = [Run(interval=i, end=ends[i].isoformat(), corrupted=_corrupted(args, i)) for i in step]
        repairs = []
        for i in sorted(set(step)):
            if _corrupted(args, i):
                repairs.append(_corrupt(engine, ends[i], args.kinds))
        if len(batch) == 2:
            batch[0].concurrent_with, batch[1].concurrent_with = batch[1].end, batch[0].end
        weak = step[0] == 0 and args.first_steps > 0
        conf = {"settings": {"train": {"epochs": 1, "steps_per_epoch": args.first_steps}}} if weak else None
        _run_at_once(batch, data_dir, conf, args.timeout)
        for repair in repairs:
            repair()
        after = _registry(client, model)
        _attribute(batch, before, after, data_dir)
        for run in batch:
            _say(
                f"interval {run.end}  {run.verdict:<30} champion {_v(after['champion'])}  "
                f"versions {len(after['versions'])}  {run.seconds:5.0f} s"
                + (f"  (at once with {run.concurrent_with})" if run.concurrent_with else "")
                + (f"  [{run.reason}]" if run.reason else "")
            )
        runs += batch
        observations.append({"step": step, "before": before, "after": after, "runs": batch})

    invariants = _invariants(client, model, runs, observations, data_dir)
    failed = [name for name, check in invariants.items() if not check["ok"]]
    result = {
        "intervals": args.intervals,
        "shop": {"users": args.users, "items": args.items, "days": days, "seed": args.seed, "drift_day": drift_day},
        "settings": {
            "steps_per_epoch": args.steps,
            "first_steps": args.first_steps,
            "corrupt_every": args.corrupt_every,
            "corrupt_kinds": list(args.kinds),
            "concurrent_at": args.pairs,
            "pair_mode": args.pair_mode,
            "timeout": args.timeout,
        },
        "rows": [_row(run) for run in runs],
        "final": _registry_summary(client, model),
        "invariants": invariants,
        "failed_invariants": failed,
        "ok": not failed,
        "seconds": round(time.perf_counter() - began, 1),
        "data_dir": str(data_dir),
    }
    print(json.dumps(result, indent=2, default=str))
    _say(f"soak {'passed' if not failed else 'FAILED: ' + ', '.join(failed)} in {result['seconds']:.0f} s")
    return not failed


def _v(version: int | None) -> str:
    return f"v{version}" if version is not None else "none"


def _row(run: Run) -> dict[str, Any]:
    row = asdict(run)
    row["seconds"] = round(run.seconds, 1)
    return row


# --- corruption, and its repair ---------------------------------------------------------------------------
def _corrupt(engine, end: date, kinds: tuple[str, ...]):
    """Damage the week before ``end``; return the function that puts the saved rows back."""
    from sqlalchemy import delete, func, select

    from mtl_core.data import warehouse as wh
    from mtl_core.data.corruption import corrupt_interval
    from mtl_core.data.extract import parse_instant

    start_at, end_at = parse_instant(end - timedelta(days=7), "start"), parse_instant(end, "end")
    events = (wh.behavior_events, wh.ad_events)
    with engine.connect() as conn:  # every row corrupt_interval may touch: the week's events, the items
        saved = {
            table.name: [
                dict(r)
                for r in conn.execute(select(table).where(table.c.ts >= start_at, table.c.ts < end_at)).mappings()
            ]
            for table in events
        }
        saved_items = [dict(r) for r in conn.execute(select(wh.items)).mappings()]
    damage = corrupt_interval(engine, start_at, end_at, kinds=kinds)
    _say(f"corrupted the week before {end}: " + ", ".join(f"{k} ({d['rows']} rows)" for k, d in damage.items()))

    def repair() -> None:
        # The table may have been rebuilt (null_ids relaxes NOT NULL on SQLite): reflect its current form.
        from sqlalchemy import MetaData, Table

        current = MetaData()
        with engine.begin() as conn:
            for table in (*events, wh.items):
                live = Table(table.name, current, autoload_with=conn)
                rows = saved_items if table is wh.items else saved[table.name]
                if table is wh.items:
                    conn.execute(delete(live))
                else:
                    conn.execute(delete(live).where(live.c.ts >= start_at, live.c.ts < end_at))
                for begin in range(0, len(rows), 5000):
                    conn.execute(live.insert(), rows[begin : begin + 5000])
            counts = {
                table.name: conn.execute(
                    select(func.count()).select_from(table).where(table.c.ts >= start_at, table.c.ts < end_at)
                ).scalar_one()
                for table in events
            }
        wrong = {name: (counts[name], len(saved[name])) for name in counts if counts[name] != len(saved[name])}
        if wrong:
            raise RuntimeError(f"repairing the week before {end} left other row counts than saved: {wrong}")
        _say(f"repaired the week before {end} ({sum(counts.values()):,} event rows put back)")

    return repair


# --- running the DAG --------------------------------------------------------------------------------------
def _mtl() -> str:
    beside = Path(sys.executable).with_name("mtl")
    return str(beside) if beside.exists() else (shutil.which("mtl") or "mtl")


def _run_at_once(batch: list[Run], data_dir: Path, conf: dict | None, timeout: float) -> None:
    """Start one `mtl run-dag --json` per run at the same moment, wait for all (each up to ``timeout``)."""
    started = []
    for number, run in enumerate(batch, 1):
        run.log = str(data_dir / "soak_logs" / f"{run.interval:02d}-{run.end}-{number}.log")
        command = [_mtl(), "run-dag", "--logical-date", run.end, "--json"]
        if conf:
            command += ["--conf", json.dumps(conf)]
        handle = open(run.log, "w")  # closed below, once the process ends
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy(), start_new_session=True
        )
        started.append((run, process, handle, time.perf_counter()))
    waiting = list(started)
    while waiting:
        time.sleep(0.5)
        for entry in list(waiting):
            run, process, handle, t0 = entry
            run.returncode = process.poll()
            if run.returncode is None and time.perf_counter() - t0 < timeout:
                continue
            if run.returncode is None:
                run.timed_out = True
                _stop(process)
                run.returncode = process.returncode
            run.seconds = time.perf_counter() - t0
            handle.close()
            run.states = _states_from_log(Path(run.log))
            waiting.remove(entry)


def _stop(process: subprocess.Popen) -> None:
    """End the process group this soak started for one run (its own session), politely first."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def _states_from_log(log: Path) -> dict[str, str]:
    """The task states `mtl run-dag --json` printed last (Airflow's task logs come before it on stdout)."""
    text = log.read_text(errors="replace")
    at = text.rfind("\n{\n")
    if at < 0:
        return {}
    try:
        return json.loads(text[at + 1 :])["tasks"]
    except (json.JSONDecodeError, KeyError):
        return {}


def _reason_from_log(log: Path) -> str:
    """The on-call message's reason (the DAG's failure callback logs it), else the last error line."""
    text = log.read_text(errors="replace")
    found = re.findall(r"Reason: (.*)", text)
    if found:
        return found[0].strip()[:300]
    first = re.search(r"\[error\s*\]\s*(.*?)\s{2,}\[", text)  # the first error Airflow logged
    raised = [line for line in text.splitlines() if re.match(r"^(error:|[\w.]+(Error|Exception)\b)", line)]
    parts = [first.group(1) if first else "", raised[-1] if raised else ""]
    return "; then ".join(p.strip()[:200] for p in parts if p.strip())


# --- reading the stores -----------------------------------------------------------------------------------
def _registry(client, model: str) -> dict[str, Any]:
    """Aliases and every version with its tags and its run's key, as they are now."""
    from mtl_core.registry.aliases import current_alias
    from mtl_core.registry.runs import RUN_KEY_TAG

    versions = {}
    for mv in client.search_model_versions(f"name = '{model}'"):
        full = client.get_model_version(model, mv.version)
        run = client.get_run(full.run_id) if full.run_id else None
        versions[int(full.version)] = {
            "tags": dict(full.tags),
            "run_key": run.data.tags.get(RUN_KEY_TAG) if run else None,
            "run_name": run.info.run_name if run else None,
            "run_status": run.info.status if run else None,
        }
    aliases = {alias: current_alias(client, model, alias) for alias in ("champion", "challenger", "previous")}
    return {**aliases, "versions": versions}


def _registry_summary(client, model: str) -> dict[str, Any]:
    state = _registry(client, model)
    versions = {}
    for number, entry in sorted(state["versions"].items()):
        tags = entry["tags"]
        versions[number] = {
            "run_key": entry["run_key"],
            "gate.verdict": tags.get("gate.verdict"),
            "gate.champion_version": tags.get("gate.champion_version"),
            "gate.refused_at": tags.get("gate.refused_at"),
            "promotion.kind": tags.get("promotion.kind"),
            "promotion.replaced": tags.get("promotion.replaced"),
        }
    return {k: state[k] for k in ("champion", "challenger", "previous")} | {"versions": versions}


def _airflow(data_dir: Path) -> tuple[list[tuple], list[tuple]]:
    """(dag runs, task instances) of the embedded Airflow's metadata DB: (run_id, logical_date, state), ..."""
    db = data_dir / "airflow" / "airflow.db"
    if not db.exists():
        return [], []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60) as conn:
        dag_runs = conn.execute(
            "SELECT run_id, logical_date, state FROM dag_run WHERE dag_id = 'mtl_retrain'"
        ).fetchall()
        tis = conn.execute("SELECT run_id, task_id, state FROM task_instance WHERE dag_id = 'mtl_retrain'").fetchall()
    return dag_runs, tis


def _attribute(batch: list[Run], before: dict, after: dict, data_dir: Path) -> None:
    """Find each run's Airflow run id and registered version, and name its verdict."""
    new = {n: e for n, e in after["versions"].items() if n not in before["versions"]}
    dag_runs, _ = _airflow(data_dir)
    for run in batch:
        keys = [r[0] for r in dag_runs if str(r[1]).startswith(run.end)]
        logged = re.findall(r"manual__\d{4}-\d\d-\d\dT[0-9:.+]+", Path(run.log).read_text(errors="replace"))
        if len(batch) == 1 or batch[0].end != batch[1].end:
            run.run_key = keys[0] if len(keys) == 1 else (logged[0] if logged else None)
        else:  # two runs of one interval: Airflow keeps only the newer dag run; the run's own log names its key
            run.run_key = logged[0] if logged else None
        mine = [n for n, e in new.items() if run.run_key and e["run_key"] == run.run_key]
        if not mine and len(batch) == 1 and len(new) == 1:
            mine = list(new)
        run.version = mine[0] if len(mine) == 1 else None
        tags = after["versions"][run.version]["tags"] if run.version is not None else {}
        run.gate_champion = tags.get("gate.champion_version")
        states = run.states
        failed = next((t for t in TASK_ORDER if states.get(t) == "failed"), None)
        if run.timed_out:
            run.verdict = f"timed out after {run.seconds:.0f} s"
        elif not states:
            run.verdict = f"crashed (exit {run.returncode})"
        elif failed == "validate":
            run.verdict = "stopped at validate"
        elif failed:
            run.verdict = f"failed at {failed}"
        elif states.get("promote") == "success":
            run.verdict = "refused (champion moved)" if tags.get("gate.refused_at") else "promote"
        elif states.get("record_rejection") == "success":
            run.verdict = "reject"
        else:
            run.verdict = "unfinished: " + ", ".join(f"{t}={s}" for t, s in states.items())
        if run.version is not None:
            run.verdict += f" v{run.version}"
        if failed or run.timed_out or not states:
            run.reason = _reason_from_log(Path(run.log))
        elif tags.get("gate.refused_at"):
            run.reason = tags.get("gate.reason", "")


# --- the invariants ---------------------------------------------------------------------------------------
def _check(ok: bool, **detail: Any) -> dict[str, Any]:
    return {"ok": bool(ok), **detail}


def _invariants(client, model: str, runs: list[Run], observations: list[dict], data_dir: Path) -> dict[str, Any]:
    final = _registry(client, model)
    versions = final["versions"]
    checks: dict[str, Any] = {}

    # One version per run that reached register, each from one of our runs, none twice.
    registered = [run for run in runs if run.states.get("register") == "success"]
    keys = [run.run_key for run in registered]
    by_key: dict[str | None, list[int]] = {}
    for number, entry in versions.items():
        by_key.setdefault(entry["run_key"], []).append(number)
    orphans = sorted(n for n, e in versions.items() if e["run_key"] not in keys)
    doubles = {k: v for k, v in by_key.items() if len(v) > 1}
    missing = [run.end for run in registered if run.run_key not in by_key]
    checks["one_version_per_registered_run"] = _check(
        len(versions) == len(registered) and not orphans and not doubles and not missing,
        versions=len(versions),
        runs_that_reached_register=len(registered),
        orphan_versions=orphans,
        run_keys_with_several_versions=doubles,
        registered_runs_without_version=missing,
    )

    # No double promotion: at most one alias move per step, moves == recorded promotions, and every promoted
    # version replaced the very champion its gate compared it against (compare-and-set).
    moves = 0
    per_step = []
    for obs in observations:
        moved = obs["after"]["champion"] != obs["before"]["champion"]
        moves += moved
        stepped = [n for n in obs["after"]["versions"] if n not in obs["before"]["versions"]]
        promoted = [n for n in stepped if versions[n]["tags"].get("promotion.kind") == "promote"]
        previous_ok = not moved or obs["after"]["previous"] == obs["before"]["champion"]
        per_step.append(
            {
                "intervals": [run.end for run in obs["runs"]],
                "champion": [obs["before"]["champion"], obs["after"]["champion"]],
                "new_versions": stepped,
                "promoted": promoted,
                "gate_champions": {n: versions[n]["tags"].get("gate.champion_version") for n in stepped},
                "ok": len(promoted) == int(moved) and previous_ok,
                "previous_after": obs["after"]["previous"],
            }
        )
    promoted_all = sorted(n for n, e in versions.items() if e["tags"].get("promotion.kind") == "promote")
    cas = {
        n: {
            "gate.champion_version": versions[n]["tags"].get("gate.champion_version"),
            "promotion.replaced": versions[n]["tags"].get("promotion.replaced"),
        }
        for n in promoted_all
    }
    cas_broken = {n: e for n, e in cas.items() if e["gate.champion_version"] != e["promotion.replaced"]}
    pairs = [s for s in per_step if len(s["intervals"]) == 2]
    checks["no_double_promotion"] = _check(
        all(s["ok"] for s in per_step) and not cas_broken and len(promoted_all) == moves,
        promotions_recorded=len(promoted_all),
        alias_moves=moves,
        promoted_over_another_champion_than_compared=cas_broken,
        bad_steps=[s for s in per_step if not s["ok"]],
        concurrent_pairs=pairs,
        compare_and_set_exercised=[
            p["intervals"]
            for p in pairs
            if len(p["new_versions"]) == 2
            and len(set(p["gate_champions"].values())) == 1
            and all(versions[n]["tags"].get("gate.refused_at") or n in p["promoted"] for n in p["new_versions"])
        ],
    )

    # Each version's gate tags name the champion it was compared against: the champion when its run started
    # (or, for two runs at once, the other one's version if that was promoted before this one was trained).
    wrong_gate = {}
    for obs in observations:
        stepped = [n for n in obs["after"]["versions"] if n not in obs["before"]["versions"]]
        for n in stepped:
            recorded = versions[n]["tags"].get("gate.champion_version")
            if recorded is None:
                continue  # never reached the gate (a failure after register is reported elsewhere)
            allowed = {_tag(obs["before"]["champion"])} | {str(m) for m in stepped if m != n}
            if recorded not in allowed:
                wrong_gate[n] = {"recorded": recorded, "champion_at_start": obs["before"]["champion"]}
    checks["gate_records_the_champion_compared_against"] = _check(not wrong_gate, wrong=wrong_gate)

    # The champion is always a version the gate said promote to.
    bad_champions = []
    for obs in observations:
        champion = obs["after"]["champion"]
        if champion is not None and obs["after"]["versions"][champion]["tags"].get("gate.verdict") != "promote":
            bad_champions.append({"after": [r.end for r in obs["runs"]], "champion": champion})
    checks["champion_always_a_promote_verdict"] = _check(not bad_champions, bad=bad_champions)

    # No run stuck: no timeout, nothing running or queued in Airflow, no MLflow run left RUNNING.
    dag_runs, tis = _airflow(data_dir)
    stuck_runs = [r for r in dag_runs if str(r[2]) in UNFINISHED]
    stuck_tis = [t for t in tis if str(t[2]) in UNFINISHED]
    running_mlflow = sorted(n for n, e in versions.items() if e["run_status"] == "RUNNING")
    timed_out = [run.end for run in runs if run.timed_out]
    checks["no_run_stuck"] = _check(
        not (stuck_runs or stuck_tis or running_mlflow or timed_out),
        timed_out=timed_out,
        airflow_runs_unfinished=stuck_runs,
        airflow_tasks_unfinished=stuck_tis,
        mlflow_runs_still_running_for_versions=running_mlflow,
        airflow_dag_runs=len(dag_runs),
    )

    # Corrupted weeks stop at validate with nothing registered; every other run ends promote or reject.
    bad_corrupted = [r.end for r in runs if r.corrupted and not (r.verdict == "stopped at validate")]
    # Two runs of one interval at once (--pair-mode same): the second is refused ("already in progress", see
    # local_airflow.run_dag_in_process) and registers nothing; the other must decide.
    unclean, displaced = [], []
    for obs in observations:
        batch = obs["runs"]
        same = len(batch) == 2 and batch[0].end == batch[1].end
        for run in batch:
            if run.corrupted or _decided(run):
                continue
            if same and any(_decided(other) for other in batch if other is not run) and run.version is None:
                displaced.append(f"{run.end}: {run.verdict}: {run.reason}")
            else:
                unclean.append(f"{run.end}: {run.verdict}")
    checks["corrupted_intervals_stop_at_validate"] = _check(not bad_corrupted, not_stopped=bad_corrupted)
    checks["clean_runs_reach_a_decision"] = _check(
        not unclean, others=unclean, same_interval_runs_refused_as_in_progress=displaced
    )
    return checks


def _tag(version: int | None) -> str:
    return str(version) if version is not None else "none"


def _decided(run: Run) -> bool:
    return run.states.get("promote") == "success" or run.states.get("record_rejection") == "success"


if __name__ == "__main__":
    main()
