"""The retraining run, step by step: what each task of the DAG does, callable without Airflow.

Every step takes plain values (settings, paths, the data interval) and returns a small JSON-ready dict,
so Airflow passes only paths and summaries through XCom, and an on-call engineer can replay any step
from a shell with the same code. Files of one run live under ``<data_dir>/runs/<run key>/``.

extract -> validate -> build features -> train challenger -> evaluate challenger and champion on the
same holdout -> register -> gate -> promote | record rejection.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from mtl_core.config import Settings
from mtl_core.errors import MtlError

log = logging.getLogger(__name__)

# What the on-call engineer should do when a task fails, by task id.
NEXT_STEP = {
    "extract": "check that the warehouse answers ({warehouse}) and holds the interval's events; the task "
    "retries by itself first",
    "validate": "read {snapshot}/validation/report.html: fix or re-load the source data for the interval, or, "
    "if the data is right and the expectation wrong, change expectations/<table>.json in a reviewed commit",
    "build_features": "check the snapshot's row counts per task (mtl describe {snapshot}); a task without "
    "examples needs a longer lookback or must be dropped from the settings' tasks",
    "train_challenger": "re-run the step by hand: mtl train --snapshot {snapshot} --out /tmp/challenger",
    "evaluate": "re-run: mtl evaluate --model <challenger dir> --snapshot {snapshot}",
    "register": "check the MLflow tracking store ({mlflow}); the task retries by itself first",
    "gate": "check the MLflow registry ({mlflow}); the champion is unchanged",
    "promote": "check the MLflow registry ({mlflow}); promote by hand with mtl promote --version N if right",
    "record_rejection": "nothing is lost: the champion is unchanged; see mtl status",
}


class PipelineError(MtlError):
    pass


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        moment = value
    else:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment


def run_dir(settings: Settings, run_key: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run_key)
    path = settings.data_dir / "runs" / safe
    path.mkdir(parents=True, exist_ok=True)
    return path


def training_window(settings: Settings, interval_end: Any) -> tuple[datetime, datetime]:
    """[end - lookback - history warm-up, end): the lookback's newest days are the holdout."""
    end = _as_datetime(interval_end)
    days = settings.pipeline.lookback_days + settings.features.history_days
    return end - timedelta(days=days), end


def extract(settings: Settings, interval_end: Any) -> dict[str, Any]:
    from mtl_core import warehouse as wh
    from mtl_core.ingest import extract_snapshot

    start, end = training_window(settings, interval_end)
    out = settings.snapshots_dir / f"{start:%Y%m%d}-{end:%Y%m%d}"
    manifest = extract_snapshot(wh.make_engine(settings.resolved_warehouse_url), start, end, out)
    return {
        "snapshot": str(out),
        "content_hash": manifest["content_hash"],
        "interval": manifest["interval"],
        "rows": {name: meta["rows"] for name, meta in manifest["tables"].items()},
    }


def previous_snapshot(settings: Settings, snapshot: str | Path) -> Path | None:
    """The newest other snapshot that ends before this one does (the volume checks compare against it)."""
    current = Path(snapshot)
    candidates = [
        p for p in settings.snapshots_dir.glob("*-*") if p.is_dir() and p != current and (p / "manifest.json").exists()
    ]
    older = [p for p in candidates if p.name.split("-")[-1] < current.name.split("-")[-1]]
    return max(older, key=lambda p: p.name.split("-")[-1]) if older else None


def validate(settings: Settings, snapshot: str) -> dict[str, Any]:
    """Raises ``ValidationFailed`` (listing every failing expectation) when the data is not fit to train on."""
    from mtl_core.validate import run_validation

    return run_validation(snapshot, previous_snapshot(settings, snapshot))


def build_features(settings: Settings, snapshot: str) -> dict[str, Any]:
    """Examples per task and split, and every distinct text encoded into the cache (once across runs)."""
    from mtl_core.features import build_examples, split_summary
    from mtl_core.train import TrainingError, text_matrix

    began = time.perf_counter()
    examples = build_examples(snapshot, settings.features, settings.tasks)
    counts = split_summary(examples)
    empty = {name: c for name, c in counts.items() if min(c.values()) == 0}
    if empty:
        raise TrainingError(
            f"task(s) {', '.join(empty)} have no examples in some split of {snapshot}: {json.dumps(empty)}"
        )
    if settings.text.enabled:
        text_matrix(examples.texts, settings, settings.data_dir / "text_cache", progress=False)
    return {"examples": counts, "texts": len(examples.texts), "seconds": round(time.perf_counter() - began, 1)}


def _client(settings: Settings):
    from mtl_core.registry import configure

    return configure(settings.resolved_mlflow_tracking_uri)


def fetch_champion(settings: Settings, run_key: str) -> str | None:
    from mtl_core.registry import champion_model_dir

    path = champion_model_dir(_client(settings), settings.pipeline.model_name, run_dir(settings, run_key) / "champion")
    return str(path) if path else None


def train_challenger(settings: Settings, snapshot: str, run_key: str, champion_dir: str | None) -> dict[str, Any]:
    from mtl_core.train import train

    out = run_dir(settings, run_key) / "challenger"
    warm = champion_dir if settings.pipeline.warm_start and champion_dir else None
    result = train(snapshot, out, settings, warm_start=warm, resume=True, progress=False)
    (run_dir(settings, run_key) / "training.json").write_text(
        json.dumps({**result.as_dict(), "history": result.history}, default=float)
    )
    return {
        "model_dir": str(out),
        "valid": {t: round(m["auc"], 4) for t, m in result.metrics.items()},
        "warm_start": bool(warm),
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
    }


def evaluate(settings: Settings, snapshot: str, run_key: str, challenger_dir: str, champion_dir: str | None) -> dict:
    """Challenger and champion on the same holdout rows; the comparison goes to the run directory."""
    from mtl_core import warehouse as wh
    from mtl_core.evaluate import compare_models, evaluate_model

    truth = wh.make_engine(settings.resolved_warehouse_url)  # oracle AUCs when the warehouse is the simulated shop
    if champion_dir:
        comparison = compare_models(
            challenger_dir, champion_dir, snapshot, n_boot=settings.pipeline.bootstrap_samples, truth_engine=truth
        )
    else:
        alone = evaluate_model(challenger_dir, snapshot, truth_engine=truth)
        comparison = {
            "tasks": {t: {"challenger": m, "champion": None, "auc_delta": None} for t, m in alone["tasks"].items()},
            "split": "holdout",
        }
    path = run_dir(settings, run_key) / "comparison.json"
    path.write_text(json.dumps(comparison, default=_json_default, indent=2))
    return {"comparison": str(path), "auc": _aucs(comparison)}


def _aucs(comparison: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    out = {}
    for task, entry in comparison["tasks"].items():
        champion = entry.get("champion")
        out[task] = {
            "challenger": round(entry["challenger"]["auc"], 4),
            "champion": round(champion["auc"], 4) if champion else None,
        }
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def register(
    settings: Settings,
    run_key: str,
    snapshot: str,
    challenger_dir: str,
    comparison_path: str,
    validation: dict[str, Any] | None,
    data_interval: dict[str, str],
) -> dict[str, Any]:
    """One MLflow run per DAG run (found again by its run key) and one model version, even when retried."""
    from mtl_core.features import build_examples, examples_frame
    from mtl_core.registry import holdout_predictions, log_and_register_model, log_training, run_for_key

    # Record where things resolved to, not how they were spelt: a retry that finds the same store through
    # another route (MLFLOW_TRACKING_URI instead of the default) is the same configuration.
    settings = settings.model_copy(
        update={
            "warehouse_url": settings.resolved_warehouse_url,
            "mlflow_tracking_uri": settings.resolved_mlflow_tracking_uri,
        }
    )
    client = _client(settings)
    run_id = run_for_key(client, settings.pipeline.experiment, run_key, run_name=f"retrain {data_interval['end']}")
    comparison = json.loads(Path(comparison_path).read_text())
    training = json.loads((run_dir(settings, run_key) / "training.json").read_text())
    ours = {t: e["challenger"] for t, e in comparison["tasks"].items()}
    theirs = {t: e["champion"] for t, e in comparison["tasks"].items() if e.get("champion")}
    labels, probs = holdout_predictions(challenger_dir, snapshot)
    log_training(
        client, run_id, settings, metrics=ours, champion_metrics=theirs or None, history=training["history"],
        snapshot_manifest=snapshot, validation_summary=validation, data_interval=data_interval,
        snapshot_dir=snapshot, predictions={task: (labels[task], probs[task]) for task in probs},
    )  # fmt: skip
    client.log_artifact(run_id, comparison_path, "evaluation")
    examples = build_examples(snapshot, settings.features, settings.tasks)
    rows = np.flatnonzero(examples.split == "holdout")[:: max(1, int(np.sum(examples.split == "holdout")) // 20)][:20]
    version = log_and_register_model(
        client, run_id, challenger_dir, settings.pipeline.model_name, input_example=examples_frame(examples, rows)
    )
    return {"version": version, "run_id": run_id}


def gate(settings: Settings, version: int, comparison_path: str) -> dict[str, Any]:
    """Decide and record the decision on the version (pass or fail); the alias moves in ``promote``."""
    from mtl_core.gate import decide, record_decision

    comparison = json.loads(Path(comparison_path).read_text())
    decision = decide(comparison, list(settings.tasks), settings.gate)
    record_decision(_client(settings), settings.pipeline.model_name, version, decision, comparison)
    return {"verdict": decision.verdict, "reason": decision.reason, "version": version}


def promote(settings: Settings, version: int, reason: str, run_id: str | None = None) -> dict[str, Any]:
    from mtl_core.registry import finish_run
    from mtl_core.registry import promote as move_aliases

    client = _client(settings)
    moved = move_aliases(client, settings.pipeline.model_name, version, actor="mtl_retrain DAG", why=reason)
    if run_id:
        finish_run(client, run_id)
    return moved


def record_rejection(settings: Settings, version: int, reason: str, run_id: str | None = None) -> dict[str, Any]:
    """The gate already wrote the decision on the version; this closes the run and says so in the log."""
    from mtl_core.registry import finish_run

    if run_id:
        finish_run(_client(settings), run_id)
    log.warning("challenger version %s rejected, champion unchanged: %s", version, reason)
    return {"version": version, "verdict": "reject", "reason": reason}


def oncall_message(dag_id: str, run_id: str, task_id: str, reason: str, settings: Settings, snapshot: str = "?") -> str:
    """The one message an on-call engineer gets when a task fails: what, where, why, and what to do next."""
    hint = NEXT_STEP.get(task_id, "see the task log").format(
        snapshot=snapshot,
        warehouse=_redacted(settings.resolved_warehouse_url),
        mlflow=_redacted(settings.resolved_mlflow_tracking_uri),
    )
    return (
        f"[mtl] DAG {dag_id}, run {run_id}: task {task_id} failed.\n"
        f"Reason: {reason}\n"
        f"Champion: unchanged (a failed run never moves it).\n"
        f"Next step: {hint}\n"
        f"Replay: mtl run-dag --logical-date <the run's logical date>"
    )


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a database URL (an MLflow http URI): no password in it
        return url
