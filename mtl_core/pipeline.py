"""The retraining run, step by step: what each task of the DAG does, callable without Airflow.

Each step takes the settings and the artifact its upstream step made, and returns the artifact it makes
(``mtl_core.artifacts``), so Airflow passes only a uri between tasks and an on-call engineer can replay any
step from a shell with the same code. Files of one run live under ``<data_dir>/runs/<run key>/``.

    extract -> validate -> build_features -> train_challenger -> evaluate (challenger and champion on the
    same holdout) -> register -> gate -> promote | record_rejection
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from mtl_core.artifacts import (
    Comparison,
    ExampleSet,
    GateDecision,
    RegisteredModel,
    Snapshot,
    TrainedModel,
)
from mtl_core.config import Settings, redact

log = logging.getLogger(__name__)

# What the on-call engineer should do when a task fails, by task id.
NEXT_STEP = {
    "extract": "check that the warehouse answers ({warehouse}) and holds the interval's events (the task retries "
    "by itself first); values the schema does not allow are listed by table and column and fail at once: fix the "
    "producer or the rows, then replay the run",
    "validate": "read {snapshot}/validation/report.html: fix or re-load the source data for the interval, or, "
    "if the data is right and the expectation wrong, change expectations/<table>.json in a reviewed commit",
    "build_features": "check the snapshot's row counts per task (mtl describe {snapshot}); a task without "
    "examples needs a longer lookback or must be dropped from the settings' tasks",
    "train_challenger": "re-run the step by hand: mtl train --snapshot {snapshot} --out /tmp/challenger",
    "evaluate": "re-run: mtl evaluate --model <challenger dir> --snapshot {snapshot}",
    "register": "check the MLflow tracking store ({mlflow}); the task retries by itself first",
    "gate": "check the MLflow registry ({mlflow}); the champion is unchanged",
    "promote": "check the MLflow registry ({mlflow}) and mtl status; promote by hand if right: mtl promote "
    "--version N --by <you> --why <reason>",
    "record_rejection": "nothing is lost: the champion is unchanged; see mtl status",
    "publish_features": "the alias has moved but the servers keep serving the version before until its features "
    "are published: check Redis with mtl doctor, then publish by hand: mtl publish --alias champion --snapshot "
    "{snapshot}",
    "score_candidates": "the champion and its features are in place; re-run the scoring by hand: mtl score --alias "
    "champion --candidates <file> --out <file>",
    "check_served_scores": "compare the served and holdout score histograms (the server's /metrics), check mtl "
    "status and mtl doctor; if the champion misbehaves: mtl rollback --by <you> --why <reason>",
}
# The section of docs/RUNBOOK.md an on-call message points to, per task: what the failure means, how to
# confirm it, the fix (tests/unit/test_pipeline.py checks that every anchor is a heading there).
RUNBOOK = "docs/RUNBOOK.md"
RUNBOOK_SECTION = {
    "extract": "extract-the-warehouse-cannot-be-read",
    "validate": "validate-the-data-broke-an-expectation",
    "build_features": "build_features-a-task-has-no-examples",
    "train_challenger": "train_challenger-training-failed",
    "evaluate": "other-errors-you-may-see",
    "register": "any-mlflow-task-mlflow-refused-or-cannot-be-reached",
    "gate": "gate-the-gate-cannot-decide",
    "promote": "any-mlflow-task-mlflow-refused-or-cannot-be-reached",
    "record_rejection": "any-mlflow-task-mlflow-refused-or-cannot-be-reached",
    "publish_features": "publish_features-the-champions-features-are-not-published",
    "score_candidates": "score_candidates-batch-scoring-failed",
    "check_served_scores": "served-scores-shifted",
}
DRIFT_SECTION = "validate-the-newest-week-drifted-drifton_drift-stop"
INPUT_EXAMPLE_ROWS = 20  # holdout rows stored with the registered model as its input example


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


def lookback_days(settings: Settings) -> int:
    """Days of examples a run extracts before its interval's end: the policy's window (for ``expanding``,
    the most it may grow to)."""
    pipeline = settings.pipeline
    return {"recency": pipeline.recency_lookback_days, "expanding": pipeline.expanding_max_days}.get(
        pipeline.policy, pipeline.lookback_days
    )


def training_window(settings: Settings, interval_end: Any, engine=None) -> tuple[datetime, datetime]:
    """[end - lookback - history warm-up, end): the lookback's newest days are the holdout.

    Under the ``expanding`` policy the window starts at the day of the warehouse's first event (``engine``
    is asked) unless that is longer ago than ``expanding_max_days``.
    """
    end = _as_datetime(interval_end)
    days = lookback_days(settings) + settings.features.history_days
    start = end - timedelta(days=days)
    if settings.pipeline.policy == "expanding":
        from mtl_core.judge.reference import first_event

        first = _as_datetime(first_event(engine if engine is not None else _warehouse(settings)))
        start = max(start, first.replace(hour=0, minute=0, second=0, microsecond=0))
    return start, end


def _client(settings: Settings):
    from mtl_core.registry.store import configure

    return configure(settings.resolved_mlflow_tracking_uri)


def _warehouse(settings: Settings):
    from mtl_core.data.warehouse import make_engine

    return make_engine(settings.resolved_warehouse_url)


def challenger_is_its_reference(settings: Settings, engine, interval_end: Any) -> bool:
    """Whether the run's own challenger is its offline reference (``judge.reference``), so that training one
    would repeat it.

    Under the ``expanding`` policy, while the window still reaches back to the first event, the run trains
    the reference's configuration from random weights with the same seed on the same days: the same model
    (``tests/unit/test_reference.py`` checks it prediction for prediction).
    """
    from mtl_core.judge.reference import first_event

    if settings.pipeline.policy != "expanding":
        return False
    first = _as_datetime(first_event(engine)).replace(hour=0, minute=0, second=0, microsecond=0)
    return training_window(settings, interval_end, engine)[0] == first


# ---- the steps ------------------------------------------------------------------------------------------
def extract(settings: Settings, interval_end: Any) -> Snapshot:
    """The training window ending at the interval's end, as a snapshot (replaced atomically if it exists).

    Its event days come from ``<snapshots_dir>/days``: only days no earlier run extracted, or whose rows changed
    in the warehouse since (late events), are read (``mtl_core.data.extract``).

    Raises ``StoredValueError`` naming the table and column when the warehouse holds a value its schema does
    not allow (a price written as text, a title that is not UTF-8).
    """
    from mtl_core.data.pseudonyms import pseudonymiser_for
    from mtl_core.data.stored_values import extract_or_explain

    engine = _warehouse(settings)
    start, end = training_window(settings, interval_end, engine)
    out = settings.snapshots_dir / f"{start:%Y%m%d}-{end:%Y%m%d}"
    extract_or_explain(engine, start, end, out, pseudonymiser_for(settings))
    return Snapshot.load(out)


def previous_snapshot(settings: Settings, snapshot: str | Path) -> Path | None:
    """The newest other snapshot that ends before this one does (the volume checks compare against it)."""
    current = Path(snapshot)
    candidates = [
        p for p in settings.snapshots_dir.glob("*-*") if p.is_dir() and p != current and (p / "manifest.json").exists()
    ]
    older = [p for p in candidates if p.name.split("-")[-1] < current.name.split("-")[-1]]
    return max(older, key=lambda p: p.name.split("-")[-1]) if older else None


def validate(settings: Settings, snapshot: Snapshot) -> Snapshot:
    """The same snapshot, now validated; raises ``ValidationFailed`` (listing every failing expectation).

    First the files must hold what the manifest says (``SnapshotIntegrityError`` names the table if not).
    """
    from mtl_core.data.extract import verify_snapshot
    from mtl_core.quality import run_validation

    verify_snapshot(snapshot.uri)
    run_validation(snapshot.uri, previous_snapshot(settings, snapshot.uri), settings.expectations_dir)
    check_drift(settings, snapshot)
    return snapshot


def check_drift(settings: Settings, snapshot: Snapshot) -> dict[str, Any]:
    """The PSI of each feature between the window's training part and its newest week, kept beside the
    validation result; drift above ``drift.psi_threshold`` warns, or stops the run (``drift.on_drift: stop``)."""
    from mtl_core.artifacts import DRIFT_REPORT
    from mtl_core.quality.drift import check_drift as judge_drift
    from mtl_core.quality.drift import snapshot_drift

    # A whole week: a shorter newest period differs from the weeks before it in its weekdays by construction.
    report = snapshot_drift(snapshot.uri, settings.drift, newest_days=7)
    _write_json_atomic(Path(snapshot.uri) / DRIFT_REPORT, report)
    if report.get("drifted"):
        log.warning(
            "drift above drift.psi_threshold %.2f in the newest week: %s",
            settings.drift.psi_threshold,
            ", ".join(f"{f['name']} {f['psi']:.2f}" for f in report["features"] if f["drifted"]),
        )
    judge_drift(report, settings.drift)
    return report


def _write_json_atomic(path: Path, data: Any) -> None:
    import json
    import uuid

    from mtl_core.jsonable import to_jsonable

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # two validations of one snapshot never collide
    tmp.write_text(json.dumps(to_jsonable(data), indent=2))
    tmp.replace(path)


def build_features(settings: Settings, snapshot: Snapshot, run_key: str) -> ExampleSet:
    """Every task's examples, built once for the whole run, and every distinct text encoded into the cache."""
    from mtl_core.data.extract import verify_snapshot
    from mtl_core.learn import TrainingError
    from mtl_core.learn.examples import build_examples, save_examples, split_summary, too_little_data
    from mtl_core.learn.text import text_matrix

    verify_snapshot(snapshot.uri)  # the files may have changed since validation
    examples = build_examples(snapshot.uri, settings.features, settings.tasks)
    counts = split_summary(examples)
    empty = [name for name, c in counts.items() if min(c.values()) == 0]
    if empty:
        days = (examples.interval[1] - examples.interval[0]) / np.timedelta64(1, "D")
        reason = too_little_data(counts, empty, settings.tasks, settings.features, float(days))
        raise TrainingError(f"snapshot {snapshot.uri}: {reason}")
    if settings.text.enabled:
        text_matrix(examples.texts, settings, settings.resolved_text_cache_dir, progress=False)
    out = run_dir(settings, run_key) / "examples"
    save_examples(examples, out)
    return ExampleSet(
        uri=str(out),
        snapshot=snapshot.uri,
        snapshot_hash=snapshot.content_hash,
        task_names=examples.task_names,
        counts=counts,
        texts=len(examples.texts),
    ).save()


def fetch_champion(settings: Settings, run_key: str) -> TrainedModel | None:
    """The champion's model directory, downloaded into the run (None while there is no champion)."""
    from mtl_core.learn.checkpoint import trained_task_names
    from mtl_core.registry.aliases import CHAMPION, current_alias
    from mtl_core.registry.pyfunc import download_model_dir

    client = _client(settings)
    model_name = settings.pipeline.model_name
    version = current_alias(client, model_name, CHAMPION)
    if version is None:
        return None
    path = download_model_dir(client, model_name, version, run_dir(settings, run_key) / "champion")
    record = run_dir(settings, run_key) / "champion.json"
    names = trained_task_names(path)  # read from its settings: building the model here would be wasted
    return TrainedModel(uri=str(record), model_dir=str(path), task_names=names, version=version).save()


def train_challenger(settings: Settings, example_set: ExampleSet, run_key: str) -> TrainedModel:
    """Fetch the champion, then train the challenger as ``pipeline.policy`` says (warm start, or from scratch on
    the window, recency-weighted or expanding).

    Retried, it resumes from its checkpoint.
    """
    from mtl_core.learn.training import train_model

    removed = remove_abandoned_checkpoints(settings, keep=run_dir(settings, run_key))
    if removed:
        log.info("removed %d abandoned training checkpoint(s): %s", len(removed), ", ".join(map(str, removed)))
    champion = fetch_champion(settings, run_key)
    policy = settings.pipeline.policy
    warm = champion.model_dir if policy == "warm_start" and champion else None
    out = run_dir(settings, run_key) / "challenger"
    half_life = settings.pipeline.recency_half_life_days if policy == "recency" else None
    examples = example_set.examples()
    result = train_model(
        examples,
        out,
        settings,
        warm_start=warm,
        resume=True,
        progress=False,
        source=example_set.snapshot,
        recency_half_life_days=half_life,
    )
    singles = {}
    if settings.pipeline.single_task_baselines:
        for task in settings.tasks:
            single = run_dir(settings, run_key) / "single_task" / task.name
            if not (single / "settings.json").exists():  # a retried step keeps the baselines it finished
                train_model(
                    examples,
                    single,
                    settings,
                    single_task=task.name,
                    resume=True,
                    progress=False,
                    source=example_set.snapshot,
                    recency_half_life_days=half_life,
                )
            singles[task.name] = str(single)
    return TrainedModel(
        uri=str(run_dir(settings, run_key) / "challenger.json"),
        model_dir=str(out),
        task_names=example_set.task_names,
        examples=example_set.uri,
        champion=champion.uri if champion else None,
        warm_started=bool(warm),
        valid_metrics=result.metrics,
        steps=result.steps,
        best_step=result.best_step,
        seconds=round(result.seconds, 1),
        history=result.history,
        single_task_models=singles,
    ).save()


def remove_abandoned_checkpoints(settings: Settings, keep: Path | None = None) -> list[Path]:
    """Delete the training checkpoints of other runs untouched for ``pipeline.checkpoint_retention_days``.

    A run killed mid-training leaves its checkpoint (weights and optimiser state) behind; a retry within the
    retention resumes from it, after that nobody will.
    """
    from mtl_core.learn.checkpoint import CHECKPOINT_FILE

    horizon = time.time() - settings.pipeline.checkpoint_retention_days * 86_400
    removed = []
    for checkpoint in (settings.data_dir / "runs").glob(f"*/*/{CHECKPOINT_FILE}"):
        if keep is not None and keep in checkpoint.parents:
            continue
        if checkpoint.stat().st_mtime < horizon:
            checkpoint.unlink(missing_ok=True)
            removed.append(checkpoint)
    return removed


def evaluate(settings: Settings, challenger: TrainedModel) -> Comparison:
    """Challenger and champion on the same holdout rows, with the AUC difference's standard error per task."""
    from mtl_core.data.pseudonyms import pseudonymiser_for
    from mtl_core.judge.evaluate import score_against_champion
    from mtl_core.judge.oracle import Truth
    from mtl_core.learn.checkpoint import load_model

    example_set = ExampleSet.load(challenger.examples)
    examples = example_set.examples()
    champion = TrainedModel.load(challenger.champion) if challenger.champion else None
    scored = score_against_champion(
        load_model(challenger.model_dir),
        load_model(champion.model_dir) if champion else None,
        examples,
        # oracle AUCs when the warehouse is the simulated shop
        truth=Truth(_warehouse(settings), pseudonymiser_for(settings)),
    )
    if challenger.single_task_models:
        add_single_task_lifts(scored, challenger.single_task_models, examples)
    folder = Path(challenger.uri).parent
    Comparison.save_predictions(folder / "predictions.parquet", scored.labels, scored.probabilities)
    return Comparison(
        uri=str(folder / "comparison.json"),
        challenger=challenger.uri,
        champion=champion.uri if champion else None,
        examples=example_set.uri,
        split=scored.comparison["split"],
        tasks=scored.comparison["tasks"],
        predictions=str(folder / "predictions.parquet"),
    ).save()


def add_single_task_lifts(scored, single_task_models: dict[str, str], examples) -> None:
    """Each task's single-task model on the same holdout rows, and the joint-minus-single AUC lift."""
    from mtl_core.judge.delong import paired_auc_difference
    from mtl_core.learn.checkpoint import load_model

    for task, model_dir in single_task_models.items():
        entry = scored.comparison["tasks"].get(task)
        if entry is None:
            continue
        t = examples.task_names.index(task)
        rows = examples.task_rows(t, "holdout")
        single = load_model(model_dir)
        theirs = single.predict(examples, rows)[:, single.task_names.index(task)]
        lift = paired_auc_difference(scored.labels[task], scored.probabilities[task], theirs)
        entry["single_task"] = {"auc": lift["auc_b"], "n": len(rows), "lift": lift}


def register(settings: Settings, run_key: str, comparison: Comparison) -> RegisteredModel:
    """One MLflow run per DAG run (found again by its run key) and one model version, even when retried."""
    from mtl_core.learn.examples import examples_frame
    from mtl_core.registry.pyfunc import log_and_register_model
    from mtl_core.registry.runs import log_training, run_for_key

    challenger = TrainedModel.load(comparison.challenger)
    example_set = ExampleSet.load(comparison.examples)
    snapshot = Snapshot.load(example_set.snapshot)
    # Record where things resolved to, not how they were spelt: a retry that finds the same store through
    # another route (MLFLOW_TRACKING_URI instead of the default) is the same configuration.
    settings = settings.model_copy(
        update={
            "warehouse_url": settings.resolved_warehouse_url,
            "mlflow_tracking_uri": settings.resolved_mlflow_tracking_uri,
        }
    )
    client = _client(settings)
    run_id = run_for_key(client, settings.pipeline.experiment, run_key, run_name=f"retrain {snapshot.interval['end']}")
    ours = {task: entry["challenger"] for task, entry in comparison.tasks.items()}
    theirs = {task: entry["champion"] for task, entry in comparison.tasks.items() if entry.get("champion")}
    singles = {
        task: {"auc": entry["single_task"]["auc"], **{f"lift_{k}": v for k, v in entry["single_task"]["lift"].items()}}
        for task, entry in comparison.tasks.items()
        if entry.get("single_task")
    }
    labels, probs = comparison.holdout_predictions()
    log_training(
        client,
        run_id,
        settings,
        metrics=ours,
        champion_metrics=theirs or None,
        single_task_metrics=singles or None,
        history=challenger.history,
        snapshot_manifest=snapshot.manifest,
        validation_summary=snapshot.validation_summary(),
        data_interval=snapshot.interval,
        snapshot_dir=snapshot.uri,
        predictions={task: (labels[task], probs[task]) for task in probs},
        drift_report=snapshot.drift_report(),
    )
    client.log_artifact(run_id, comparison.uri, "evaluation")
    examples = example_set.examples()
    holdout = np.flatnonzero(examples.split == "holdout")
    rows = holdout[:: max(1, len(holdout) // INPUT_EXAMPLE_ROWS)][:INPUT_EXAMPLE_ROWS]
    version = log_and_register_model(
        client,
        run_id,
        challenger.model_dir,
        settings.pipeline.model_name,
        input_example=examples_frame(examples, rows),
    )
    log_model_variants(client, run_id, challenger.model_dir, examples, settings)
    return RegisteredModel(
        uri=str(Path(comparison.uri).parent / "registered.json"),
        model_name=settings.pipeline.model_name,
        version=version,
        run_id=run_id,
        comparison=comparison.uri,
    ).save()


def log_model_variants(client, run_id: str, model_dir: str, examples, settings: Settings) -> dict[str, Any] | None:
    """The int8 and ONNX variants of the version, each with its holdout AUC change and latency, on its run.

    A variant that cannot be built does not stop the run: the version is whole without it and serves in fp32
    (``serve.variant: fastest`` falls back to it); the run's tag ``mtl.variants`` says why.
    """
    from mtl_core.registry.variants import log_variants

    if not settings.serve.build_variants:
        client.set_tag(run_id, "mtl.variants", "not built (serve.build_variants is off)")
        return None
    try:
        report = log_variants(client, run_id, model_dir, examples, settings, calls=settings.serve.variant_timing_calls)
    except Exception as exc:  # any exporter or runtime fault: the version still serves in fp32
        reason = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:400]
        log.warning("the int8/ONNX variants of run %s were not built (it serves in fp32): %s", run_id, reason)
        client.set_tag(run_id, "mtl.variants", f"failed: {reason}")
        return None
    cleared = [name for name, entry in report["variants"].items() if name != "fp32" and entry.get("within_bound")]
    client.set_tag(run_id, "mtl.variants", ",".join(cleared) or "none within the AUC bound")
    return report


def gate(settings: Settings, registered: RegisteredModel, overrides: dict[str, str] | None = None) -> GateDecision:
    """Decide and record the decision on the version, pass or fail; the alias moves in ``promote``.

    ``overrides``: what this run's conf changed of the settings that decide promotion (``config.gate_overrides``),
    recorded with the decision.
    """
    from mtl_core.judge.gate import decide
    from mtl_core.registry.decisions import record_decision

    compared = Comparison.load(registered.comparison)
    comparison = compared.as_gate_input()
    # The champion this challenger was scored against, not whichever holds the alias by now: promote checks
    # that it still does.
    champion = TrainedModel.load(compared.champion).version if compared.champion else None
    decision = decide(comparison, list(settings.tasks), settings.gate)
    if overrides:
        decision.rule["overrides"] = dict(overrides)
    document = record_decision(
        _client(settings),
        registered.model_name,
        registered.version,
        decision,
        comparison,
        champion_version=champion,
        champion_known=True,
    )
    publish_review_page(settings, registered, compared, decision, champion)
    return GateDecision(
        uri=str(Path(registered.uri).parent / "decision.json"),
        registered=registered.uri,
        model_name=registered.model_name,
        version=registered.version,
        run_id=registered.run_id,
        verdict=decision.verdict,
        reason=decision.reason,
        champion_version=document["champion"]["version"],
        per_task=decision.per_task,
        rule=decision.rule,
        decided_at=decision.decided_at,
    ).save()


def publish_review_page(
    settings: Settings, registered: RegisteredModel, compared: Comparison, decision, champion_version: int | None
) -> Path:
    """The reviewer's page beside the run's artifacts and on its MLflow run, and the model card in the version's
    description below the decision's summary; a retried gate step replaces both."""
    from mtl_core.registry.review import logged_commit, model_card, publish_review, render_review_page

    challenger = TrainedModel.load(compared.challenger)
    example_set = ExampleSet.load(compared.examples)
    snapshot = Snapshot.load(example_set.snapshot)
    client = _client(settings)
    labels, probs = compared.holdout_predictions()
    facts = dict(
        model_name=registered.model_name,
        version=registered.version,
        decision=decision,
        comparison_tasks=compared.tasks,
        drift=snapshot.drift_report(),
        interval=snapshot.interval,
        manifest_counts=snapshot.rows,
        example_counts=example_set.counts,
        settings=settings,
        champion_version=champion_version,
        run_id=registered.run_id,
        snapshot_hash=snapshot.content_hash,
        git_commit=logged_commit(client, registered.run_id),  # the code that trained, as register logged it
    )
    page = render_review_page(**facts, labels=labels, probabilities=probs, history=challenger.history)
    card = model_card(**facts)
    return publish_review(
        client, registered.model_name, registered.version, registered.run_id, page, card, Path(registered.uri).parent
    )


def promote(settings: Settings, decision: GateDecision) -> dict[str, Any]:
    """Move ``champion`` to the version (the old one becomes ``previous``), compare-and-set, and close the run.

    Under a lock that holds across processes, the alias moves only if the champion is still the one the gate
    compared against. Otherwise another run promoted meanwhile: this version is not promoted, the reason is
    recorded on it, and the next run compares against the new champion.
    """
    from mtl_core.locks import store_lock
    from mtl_core.registry.aliases import CHAMPION, current_alias, make_champion
    from mtl_core.registry.decisions import record_refusal
    from mtl_core.registry.runs import finish_run

    client = _client(settings)
    model = decision.model_name
    with store_lock(settings.resolved_warehouse_url, "promotion", settings.data_dir):
        now = current_alias(client, model, CHAMPION)
        if now not in (decision.champion_version, decision.version):  # the latter: a retry after it moved
            against = f"v{decision.champion_version}" if decision.champion_version is not None else "no champion"
            reason = (
                f"not promoted: the gate compared v{decision.version} against {against}, but v{now} became champion "
                "meanwhile (another run promoted it); the next run compares against it"
            )
            record_refusal(client, model, decision.version, reason)
            finish_run(client, decision.run_id)
            log.warning("%s", reason)
            return {"model": model, "champion": now, "changed": False, "refused": reason}
        moved = make_champion(client, model, decision.version, actor="mtl_retrain DAG", why=decision.reason)
    finish_run(client, decision.run_id)
    return moved


def promote_by_hand(settings: Settings, version: int, by: str, why: str) -> dict[str, Any]:
    """`mtl promote`: the manual override, under the lock the DAG's promote takes, so it never interleaves with
    a run's compare-and-set."""
    from mtl_core.locks import store_lock
    from mtl_core.registry.aliases import make_champion

    with store_lock(settings.resolved_warehouse_url, "promotion", settings.data_dir):
        return make_champion(_client(settings), settings.pipeline.model_name, version, by, why)


def rollback_by_hand(settings: Settings, by: str, why: str) -> dict[str, Any]:
    """`mtl rollback`: the champion back to the previous one, under the promotion lock."""
    from mtl_core.locks import store_lock
    from mtl_core.registry.aliases import rollback

    with store_lock(settings.resolved_warehouse_url, "promotion", settings.data_dir):
        return rollback(_client(settings), settings.pipeline.model_name, by, why)


def deployed_model_dir(comparison: Comparison, decision: GateDecision) -> str | None:
    """The model serving after a run's decision: the challenger if promoted, else the champion it was held to."""
    if decision.verdict == "promote":
        return TrainedModel.load(comparison.challenger).model_dir
    return TrainedModel.load(comparison.champion).model_dir if comparison.champion else None


def record_rejection(settings: Settings, decision: GateDecision) -> dict[str, Any]:
    """The gate already wrote the decision (reject or hold) on the version; this closes the run and logs it."""
    from mtl_core.registry.runs import finish_run

    finish_run(_client(settings), decision.run_id)
    done = "held" if decision.verdict == "hold" else "rejected"
    log.warning("challenger version %s %s, champion unchanged: %s", decision.version, done, decision.reason)
    return {"version": decision.version, "verdict": decision.verdict, "reason": decision.reason}


def publish_features(settings: Settings, decision: GateDecision) -> dict[str, Any]:
    """The promoted version's serving features into the online store, keyed by its version.

    The servers poll the alias and switch to a new champion only once this has written its last key, so
    until then they keep serving the version before. Skipped, with the reason, when the version is not (or no
    longer) the champion, or when no online store is configured (``serve.redis_url`` empty).
    """
    from mtl_core.registry.aliases import CHAMPION, current_alias
    from mtl_core.serving.online import OnlineStore

    if not settings.serve.redis_url:
        log.warning("serve.redis_url is empty: no online store, v%s's features are not published", decision.version)
        return {"published": False, "reason": "serve.redis_url is empty"}
    champion = current_alias(_client(settings), decision.model_name, CHAMPION)
    if champion != decision.version:
        reason = f"v{decision.version} is not the champion (v{champion} is): nothing to publish"
        log.warning("%s", reason)
        return {"published": False, "reason": reason}
    compared = Comparison.load(RegisteredModel.load(decision.registered).comparison)
    challenger = TrainedModel.load(compared.challenger)
    _, holdout_scores = compared.holdout_predictions()
    manifest = OnlineStore(settings, decision.model_name).publish(
        decision.version,
        challenger.model_dir,
        ExampleSet.load(compared.examples).snapshot,
        reference_scores=holdout_scores,
    )
    return {"published": True, "version": decision.version, **manifest}


def candidates_file(settings: Settings, interval_end: Any) -> Path | None:
    """The next day's candidate pairs of ``serve.candidates`` ("{ds}": the interval's end day), if configured."""
    if not settings.serve.candidates:
        return None
    return Path(settings.serve.candidates.replace("{ds}", _as_datetime(interval_end).strftime("%Y-%m-%d")))


def score_candidates(settings: Settings, interval_end: Any) -> dict[str, Any]:
    """Batch scores of the next day's candidate pairs by the champion, beside the run's other outputs."""
    from mtl_core.serving.batch import score_file

    candidates = candidates_file(settings, interval_end)
    if candidates is None:
        return {"scored": False, "reason": "serve.candidates is empty"}
    day = _as_datetime(interval_end).strftime("%Y-%m-%d")
    out = settings.data_dir / "scores" / f"{day}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    return {"scored": True, **score_file(settings, candidates, out, alias="champion", progress=False)}


def monitor_served_scores(settings: Settings) -> dict[str, Any]:
    """The champion's served scores per task against its holdout's; raises ``ScoresShifted`` past the threshold."""
    from mtl_core.quality.drift import check_scores, score_drift
    from mtl_core.registry.aliases import CHAMPION, current_alias
    from mtl_core.serving.online import OnlineStore

    model = settings.pipeline.model_name
    version = current_alias(_client(settings), model, CHAMPION)
    if version is None:
        return {"status": "no champion"}
    store = OnlineStore(settings, model)
    report = score_drift(store.reference_scores(version), store.served_scores(version), settings.drift)
    report["version"] = version
    check_scores(report, model, version)
    return report


def oncall_message(dag_id: str, run_id: str, task_id: str, reason: str, settings: Settings, snapshot: str = "?") -> str:
    """The one message an on-call engineer gets when a task fails: what, where, why, and what to do next."""
    hint = NEXT_STEP.get(task_id, "see the task log").format(
        snapshot=snapshot,
        warehouse=redact(settings.resolved_warehouse_url),
        mlflow=redact(settings.resolved_mlflow_tracking_uri),
    )
    # promote moves the alias and then closes the MLflow run: a failure in between leaves the new champion.
    champion = (
        "check mtl status (promote may have moved it before it failed)"
        if task_id == "promote"
        else "unchanged (a failed run never moves it)."
    )
    section = RUNBOOK_SECTION.get(task_id, "contents")
    if task_id == "validate" and "drift.on_drift is stop" in reason:  # quality.drift.DriftDetected
        section = DRIFT_SECTION
    return (
        f"[mtl] DAG {dag_id}, run {run_id}: task {task_id} failed.\n"
        f"Reason: {reason}\n"
        f"Champion: {champion}\n"
        f"Next step: {hint}\n"
        f"Runbook: {RUNBOOK}#{section}\n"
        f"Replay: mtl run-dag --logical-date <the run's logical date>"
    )
