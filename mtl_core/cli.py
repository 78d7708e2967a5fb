"""The ``mtl`` command: every pipeline step, runnable by hand with the same code the DAG calls."""

from __future__ import annotations

import json
import logging
import sys
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import typer

from mtl_core.config import DEMO_ITEMS, DEMO_USERS, Settings, load_settings
from mtl_core.errors import MtlError
from mtl_core.jsonable import to_jsonable

app = typer.Typer(
    help="Multi-task recommender retraining: simulate, extract, import logs, train, gate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="YAML settings file (default: $MTL_CONFIG, else built-in defaults)")
]
DbOption = Annotated[
    str | None, typer.Option("--db", help="Warehouse SQLAlchemy URL (default: settings, else SQLite in the data dir)")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON")]


def _settings(config: Path | None) -> Settings:
    settings = load_settings(config)
    logging.getLogger("mtl_core").setLevel(settings.log_level)
    return settings


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _print(payload: Any, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(to_jsonable(payload), indent=2) if as_json else text)


def _engine(db: str | None, settings: Settings):
    from mtl_core.data import warehouse as wh

    return wh.make_engine(db or settings.resolved_warehouse_url)


@app.command("simulate")
def simulate_command(
    users: Annotated[int | None, typer.Option(help="Number of users")] = None,
    items: Annotated[int | None, typer.Option(help="Number of items")] = None,
    days: Annotated[int | None, typer.Option(help="Number of simulated days")] = None,
    start: Annotated[str | None, typer.Option(help="First day, YYYY-MM-DD (UTC)")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (same seed, same shop)")] = None,
    drift_day: Annotated[int | None, typer.Option("--drift-day", help="Day index from which tastes drift")] = None,
    replace: Annotated[bool, typer.Option(help="Empty a warehouse that already holds events first")] = False,
    db: DbOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write a synthetic shop (users, items, feed and ad logs, ground truth) into the warehouse."""
    from mtl_core.data.shop import ShopSpec, write_shop

    settings = _settings(config)
    shop = settings.shop
    try:
        first_day = date.fromisoformat(start or shop.start)
    except ValueError:
        _fail(f"--start {start or shop.start!r} is not a date; use YYYY-MM-DD")
    try:
        spec = ShopSpec(
            users=shop.users if users is None else users,
            items=shop.items if items is None else items,
            days=shop.days if days is None else days,
            start=first_day,
            seed=shop.seed if seed is None else seed,
            drift_day=shop.drift_day if drift_day is None else drift_day,
        )
    except ValueError as exc:
        _fail(str(exc))
    summary = write_shop(_engine(db, settings), spec, replace=replace).as_dict()
    rows = ", ".join(f"{k}={v:,}" for k, v in summary["rows"].items())
    rates = ", ".join(f"{k}={v:.3%}" for k, v in summary["rates"].items())
    _print(
        summary,
        as_json,
        f"simulated {spec.days} days from {spec.start}: {rows}\nlabel rates: {rates}\ntook {summary['seconds']} s",
    )


@app.command("extract")
def extract_command(
    start: Annotated[str, typer.Option(help="Interval start T0, included (YYYY-MM-DD or ISO time, UTC)")],
    end: Annotated[str, typer.Option(help="Interval end T1, excluded")],
    out: Annotated[Path, typer.Option(help="Snapshot directory to write (replaced atomically)")],
    db: DbOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Extract [start, end) of every warehouse table into a Parquet snapshot with a manifest."""
    from mtl_core.data.pseudonyms import pseudonymiser_for
    from mtl_core.data.stored_values import extract_or_explain

    settings = _settings(config)
    manifest = extract_or_explain(_engine(db, settings), start, end, out, pseudonymiser_for(settings))
    rows = ", ".join(f"{name}={meta['rows']:,}" for name, meta in manifest["tables"].items())
    _print(manifest, as_json, f"snapshot {out}: {rows}\ncontent hash {manifest['content_hash']}")


@app.command("describe")
def describe_command(
    snapshot: Annotated[Path, typer.Argument(help="Snapshot directory")],
    as_json: JsonOption = False,
) -> None:
    """Row counts and label rates of a snapshot."""
    from mtl_core.data.extract import describe_snapshot

    info = describe_snapshot(snapshot)
    _print(info, as_json, format_description(info))


def format_description(info: dict[str, Any]) -> str:
    lines = [f"interval {info['interval']['start']} .. {info['interval']['end']}  (hash {info['content_hash'][:12]})"]
    lines += [f"  {name:<16} {rows:>10,} rows" for name, rows in info["rows"].items()]
    lines += [f"  {name:<16} {count:>10,} events" for name, count in info["events"].items()]
    for task, rate in info["label_rates"].items():
        lines.append(f"  label rate {task:<8} {'n/a' if rate is None else f'{rate:.2%}'}")
    return "\n".join(lines)


@app.command("demo")
def demo_command(
    users: Annotated[int, typer.Option(help="Users of the demo shop")] = DEMO_USERS,
    items: Annotated[int, typer.Option(help="Items of the demo shop")] = DEMO_ITEMS,
    config: ConfigOption = None,
) -> None:
    """The main job end to end: a drifting shop, three weekly DAG runs, then a corrupted week stopped by validation."""
    from mtl_core.demo import run_demo

    run_demo(_settings(config), users, items, say=typer.echo)


@app.command("validate")
def validate_command(
    snapshot: Annotated[Path, typer.Option(help="Snapshot directory (mtl extract)")],
    previous: Annotated[Path | None, typer.Option(help="The previous run's snapshot, for volume checks")] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run the Great Expectations suites of expectations/ on a snapshot; exit 1 if any expectation fails."""
    from mtl_core.data.extract import verify_snapshot
    from mtl_core.quality import validate_command_output, validate_snapshot

    settings = _settings(config)
    verify_snapshot(snapshot)
    report = validate_snapshot(snapshot, previous, settings.expectations_dir)
    _print(report.summary(), as_json, validate_command_output(report))
    if not report.success:
        raise typer.Exit(code=1)


@app.command("train")
def train_command(
    snapshot: Annotated[Path, typer.Option(help="Snapshot directory (mtl extract)")],
    out: Annotated[Path, typer.Option(help="Model directory to write")],
    single_task: Annotated[str | None, typer.Option("--single-task", help="Train one task's baseline only")] = None,
    warm_start: Annotated[Path | None, typer.Option("--warm-start", help="Start from this model's weights")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint in --out")] = False,
    nproc: Annotated[
        int | None, typer.Option(min=1, help="Training processes (DistributedDataParallel); default train.nproc")
    ] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Train the joint multi-task model on a snapshot; print per-task validation metrics."""
    from mtl_core.learn.training import train_on_snapshot

    settings = _settings(config)
    if nproc is not None:
        settings = settings.model_copy(update={"train": settings.train.model_copy(update={"nproc": nproc})})
    result = train_on_snapshot(
        snapshot,
        out,
        settings,
        single_task=single_task,
        warm_start=warm_start,
        resume=resume,
        progress=not as_json and sys.stderr.isatty(),
    )
    if result.rank != 0:  # torchrun runs this command once per rank; rank 0 reports for all of them
        return
    payload = result.as_dict()
    text = "\n".join(
        [f"model written to {out} after {result.steps} steps ({result.seconds:.0f} s; best at step {result.best_step})"]
        + [
            f"  {task:<8} valid auc {m['auc']:.4f}  logloss {m['logloss']:.4f}  n {m['n']:,}"
            for task, m in result.metrics.items()
        ]
    )
    _print(payload, as_json, text)


@app.command("evaluate")
def evaluate_command(
    model: Annotated[Path, typer.Option(help="Model directory (mtl train)")],
    snapshot: Annotated[Path, typer.Option(help="Snapshot directory to score")],
    split: Annotated[str, typer.Option(help="holdout, valid or train")] = "holdout",
    db: DbOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Per-task AUC, log loss, calibration and slices on a snapshot's holdout (oracle AUC on simulated data)."""
    from mtl_core.data.extract import read_manifest
    from mtl_core.data.pseudonyms import pseudonymiser_for
    from mtl_core.judge.evaluate import evaluate_model
    from mtl_core.judge.oracle import Truth
    from mtl_core.learn.examples import SPLITS

    if split not in SPLITS:
        _fail(f"--split {split!r} is not one of {', '.join(SPLITS)}")
    settings = _settings(config)
    truth = Truth(_engine(db, settings), pseudonymiser_for(settings))
    report = evaluate_model(model, snapshot, split=split, truth=truth)
    made_with = read_manifest(snapshot).get("user_ids", {}).get("key_id")
    if made_with and made_with != truth.pseudonyms.key_id:
        typer.echo(
            f"note: {snapshot} was pseudonymised with another key (key id {made_with}), so the oracle cannot join "
            "the churn truth; set privacy.pseudonym_key to that key for churn's oracle AUC",
            err=True,
        )
    lines = [f"{split} of {snapshot}:"]
    for task, m in report["tasks"].items():
        oracle = "n/a" if m["oracle_auc"] is None else f"{m['oracle_auc']:.4f}"
        lines.append(
            f"  {task:<8} auc {m['auc']:.4f} (oracle {oracle})  logloss {m['logloss']:.4f}  "
            f"ece {m['ece']:.4f}  n {m['n']:,}"
        )
    _print(report, as_json, "\n".join(lines))


@app.command("run-dag")
def run_dag_command(
    logical_date: Annotated[str, typer.Option("--logical-date", help="YYYY-MM-DD: the run whose interval ends then")],
    conf: Annotated[str | None, typer.Option(help='Run conf as JSON, e.g. {"settings": {...}}')] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Replay the retraining DAG for one interval in-process; exit 1 if any task failed."""
    settings = _settings(config)
    try:
        run_conf = json.loads(conf) if conf else None
    except json.JSONDecodeError as exc:
        _fail(f"--conf is not JSON: {exc}")
    from mtl_core.local_airflow import run_dag_in_process

    states = run_dag_in_process(settings, logical_date, run_conf, quiet=as_json)  # --json: stdout holds only it
    failed = [task for task, state in states.items() if state in ("failed", "upstream_failed")]
    lines = [f"  {task:<18} {state}" for task, state in states.items()]
    _print({"tasks": states, "failed": failed}, as_json, f"mtl_retrain for {logical_date}:\n" + "\n".join(lines))
    if failed:
        raise typer.Exit(code=1)


@app.command("status")
def status_command(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """The champion, the challenger, their per-task metrics and the last gate decision."""
    from mtl_core.registry.status import format_status, status
    from mtl_core.registry.store import configure

    settings = _settings(config)
    state = status(configure(settings.resolved_mlflow_tracking_uri), settings.pipeline.model_name)
    _print(state, as_json, format_status(state))


@app.command("serve")
def serve_command(
    alias: Annotated[str, typer.Option(help="Serve the version with this alias (followed as it moves)")] = "champion",
    host: Annotated[str, typer.Option(help="Address to listen on (loopback: only this machine)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (each loads the model)")] = 1,
    config: ConfigOption = None,
) -> None:
    """Serve the model over HTTP: POST /predict (bearer token MTL_SERVE__TOKEN), GET /healthz, GET /metrics."""
    from mtl_core.serving.server import serve

    serve(_settings(config), alias, host, port, workers, config_file=config)


@app.command("promote")
def promote_command(
    version: Annotated[int, typer.Option(help="Model version to make champion")],
    by: Annotated[str, typer.Option(help="Who decides (recorded on the version)")],
    why: Annotated[str, typer.Option(help="Why (recorded on the version)")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Manual override: make VERSION the champion (the old one becomes previous), recording who and why."""
    from mtl_core.pipeline import promote_by_hand

    result = promote_by_hand(_settings(config), version, by, why)
    _print(
        result,
        as_json,
        f"version {version} is champion ({json.dumps(to_jsonable(result))}); servers switch to it once its "
        f"features are published (mtl publish --version {version} --snapshot <its training window>)",
    )


@app.command("rollback")
def rollback_command(
    by: Annotated[str, typer.Option(help="Who decides (recorded)")] = "on-call",
    why: Annotated[str, typer.Option(help="Why (recorded)")] = "manual rollback",
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Move the champion alias back to the previous champion (servers switch back at their next poll)."""
    from mtl_core.pipeline import rollback_by_hand

    result = rollback_by_hand(_settings(config), by, why)
    _print(result, as_json, f"rolled back: {json.dumps(to_jsonable(result))}")


@app.command("publish")
def publish_command(
    snapshot: Annotated[Path, typer.Option(help="Snapshot to compute the features from (the training window)")],
    version: Annotated[int | None, typer.Option(help="Version to publish (default: the one --alias names)")] = None,
    alias: Annotated[str, typer.Option(help="Publish the version holding this alias (without --version)")] = "champion",
    as_of: Annotated[
        str | None, typer.Option("--as-of", help="Features as of this UTC time (ISO; default: the snapshot's end)")
    ] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Publish a version's serving features (user, item, ad history and text vectors) to the online store."""
    from datetime import datetime

    from mtl_core.serving.online import publish_registered

    try:
        moment = datetime.fromisoformat(as_of.replace("Z", "+00:00")) if as_of else None
    except ValueError:
        _fail(f"--as-of {as_of!r} is not an ISO time; use e.g. 2026-02-09T00:00:00Z")
    manifest = publish_registered(_settings(config), snapshot, version=version, alias=alias, as_of=moment)
    counts = ", ".join(f"{n:,} {kind}" for kind, n in manifest["counts"].items())
    _print(
        manifest,
        as_json,
        f"published {manifest['model']} v{manifest['version']} as of {manifest['as_of']}: {counts} "
        f"({manifest['seconds']} s)",
    )


@app.command("score")
def score_command(
    candidates: Annotated[Path, typer.Option(help="Parquet file: user_id with item_id or ad_id (optional time)")],
    out: Annotated[Path, typer.Option(help="Parquet file to write: the candidates with one score column per task")],
    alias: Annotated[str, typer.Option(help="Score with the version holding this alias")] = "champion",
    variant: Annotated[
        str | None, typer.Option(help="Model form: fp32, int8, onnx or fastest (default: serve.variant)")
    ] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Score a file of candidate pairs in chunks (serve.score_chunk_rows) with the alias's model."""
    from mtl_core.serving.batch import score_file

    result = score_file(
        _settings(config), candidates, out, alias=alias, variant=variant, progress=not as_json and sys.stderr.isatty()
    )
    _print(
        result, as_json, f"scored {result['rows']:,} rows with v{result['version']} into {out} ({result['seconds']} s)"
    )


@app.command("import-logs")
def import_logs_command(
    file: Annotated[Path, typer.Argument(help="CSV or Parquet file of behaviour logs")],
    format: Annotated[str, typer.Option("--format", help="'taobao' or the path of a YAML mapping file")],
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Load the good rows even if some are bad")] = False,
    db: DbOption = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Import external behaviour logs (Taobao UserBehavior layout or a YAML mapping) into the warehouse."""
    from mtl_core.data.import_logs import import_logs

    settings = _settings(config)
    report = import_logs(file, format, _engine(db, settings), skip_bad=skip_bad)
    payload = report.as_dict()
    text = (
        f"read {payload['rows_read']:,} rows, loaded {payload['rows_loaded']:,}, bad {payload['bad_rows']:,}"
        + "".join(f"\n  line {bad['line']}: {bad['reason']}" for bad in payload["first_bad"])
    )
    _print(payload, as_json, text)
    if report.aborted:
        raise typer.Exit(code=1)


@app.command("doctor")
def doctor_command(
    dags_folder: Annotated[
        Path | None,
        typer.Option("--dags-folder", help="DAG folder to parse (default: AIRFLOW__CORE__DAGS_FOLDER, else dags/)"),
    ] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check the warehouse, MLflow, Airflow, Redis, the encoder, the pins and free disk; exit 1 if any check fails."""
    from mtl_core.doctor import run_checks

    report = run_checks(_settings(config), dags_folder=dags_folder)
    _print(report.as_dict(), as_json, report.text())
    if report.failed:
        raise typer.Exit(code=1)


ERROR_LINE_CHARACTERS = 600  # an error line must stay readable in a terminal and an on-call message


def error_line(exc: Exception) -> str:
    """The error as one line of readable length: a message that quotes a huge input is cut, and says so."""
    lines = str(exc).strip().splitlines() or [exc.__class__.__name__]
    line = lines[0]
    if len(line) > ERROR_LINE_CHARACTERS:
        line = f"{line[:ERROR_LINE_CHARACTERS]}... ({len(line) - ERROR_LINE_CHARACTERS:,} more characters)"
    if len(lines) > 1:
        line += f" (and {len(lines) - 1} more line(s); run the step through its Python function for all of it)"
    return line


def main() -> None:
    """Entry point: known problems become one clear line on stderr and exit code 2, never a traceback."""
    try:
        # Without standalone mode click returns the exit code of typer.Exit instead of exiting.
        code = app(standalone_mode=False)
    except MtlError as exc:
        typer.echo(f"error: {error_line(exc)}", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own message
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
