"""The promotion gate: champion/challenger decision and its record (TFX's "blessing").

The rule the product promises: a challenger replaces the champion only if, for EVERY task, its AUC on
the same fresh holdout is strictly above the champion's plus ``min_delta``. Averaging across tasks is
deliberately not allowed: a model that gains on the feed's CTR while losing on churn would silently
hurt one team to please another. Without a champion (the first model, or a task the champion lacks) the
task must instead reach its absolute floor from the configuration.

Every decision, pass or fail, is written onto the model version (tags, description, and a JSON
comparison artifact on the version's run), so that "why was this model (not) promoted?" is answered by
the registry itself instead of a log line that has since rotated away.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mtl_core.config import GateSettings, TaskSpec
from mtl_core.errors import MtlError

if TYPE_CHECKING:
    from mlflow import MlflowClient

COMPARISON_ARTIFACT = "gate/comparison.json"
TAG_PREFIX = "gate."


class GateError(MtlError):
    """The gate could not decide or record its decision; the message says what is missing."""


@dataclass
class Decision:
    """The verdict, the one-sentence reason, and the evidence per task."""

    verdict: Literal["promote", "reject"]
    reason: str
    per_task: dict[str, dict[str, Any]]
    rule: dict[str, Any]
    decided_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def promote(self) -> bool:
        return self.verdict == "promote"

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe (NaN becomes None, since JSON has no NaN and MLflow's UI would show the raw text)."""
        return _json_safe(asdict(self))


# --------------------------------------------------------------------------------------------------
# The decision: pure, no MLflow.
def _num(value: Any) -> float | None:
    """A finite float or None: missing and NaN metrics are treated alike (both mean "not measured")."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _json_safe(value.item())
    return value


def _entry(comparison: dict[str, Any], task: str) -> tuple[dict | None, dict | None, dict | None]:
    """(challenger metrics, champion metrics, auc_delta) of a task.

    Accepts ``compare_models`` output and also ``evaluate_model`` output (``{"tasks": {task: {auc, ...}}}``),
    which is what the DAG has when there is no champion to compare with.
    """
    entry = (comparison.get("tasks") or {}).get(task)
    if entry is None:
        return None, None, None
    if "challenger" not in entry and "auc" in entry:
        return entry, None, None
    return entry.get("challenger"), entry.get("champion"), entry.get("auc_delta")


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def _judge_task(task: TaskSpec, comparison: dict[str, Any], settings: GateSettings) -> dict[str, Any]:
    floor = (settings.floors or {}).get(task.name, task.floor)
    challenger, champion, auc_delta = _entry(comparison, task.name)
    row: dict[str, Any] = {
        "challenger_auc": None, "champion_auc": None, "delta": None, "low": None, "high": None,
        "floor": floor, "mode": "missing", "passed": False, "why": "",
    }  # fmt: skip
    if challenger is None:
        row["why"] = f"{task.name}: no holdout examples, so the challenger could not be scored"
        return row
    row["mode"] = "champion" if champion is not None else "floor"
    ours = _num(challenger.get("auc"))
    row["challenger_auc"] = ours
    if ours is None:
        row["why"] = f"{task.name}: challenger AUC undefined on the holdout (one class only or not scored)"
        return row

    if champion is None:
        # Without a champion only the absolute floor protects the product: a first model must be useful.
        row["passed"] = ours >= floor
        verb = "reaches" if row["passed"] else "is below"
        row["why"] = f"{task.name}: AUC {_fmt(ours)} {verb} its floor {_fmt(floor)} (no champion to compare)"
        return row

    theirs = _num(champion.get("auc"))
    row["champion_auc"] = theirs
    if theirs is None:
        row["why"] = f"{task.name}: champion AUC undefined on the holdout, so the challenger cannot be shown better"
        return row
    delta = _num((auc_delta or {}).get("delta"))
    row["delta"] = delta if delta is not None else ours - theirs
    row["low"] = _num((auc_delta or {}).get("low"))
    row["high"] = _num((auc_delta or {}).get("high"))
    failures: list[str] = []
    # Strict: an equal AUC is no reason to swap models (every swap carries risk of its own).
    if not row["delta"] > settings.min_delta:
        need = f"must exceed {_fmt(settings.min_delta, signed=True)}" if settings.min_delta else "must be above 0"
        failures.append(f"AUC {_fmt(ours)} vs champion {_fmt(theirs)} (delta {_fmt(row['delta'], True)}, {need})")
    if settings.require_significance:
        if row["low"] is None:
            failures.append("no bootstrap interval of the AUC difference to test significance")
        elif not row["low"] > 0:
            failures.append(
                f"AUC gain not significant: 95% interval [{_fmt(row['low'], True)}, {_fmt(row['high'], True)}] "
                "reaches 0"
            )
    for metric, limit in (("logloss", settings.max_logloss_increase), ("ece", settings.max_ece_increase)):
        if limit is None:
            continue
        a, b = _num(challenger.get(metric)), _num(champion.get(metric))
        if a is None or b is None:
            failures.append(f"{metric} guardrail cannot be checked ({metric} missing)")
            continue
        row[f"{metric}_increase"] = a - b
        if a - b > limit:
            failures.append(f"{metric} worse by {a - b:.4f} ({_fmt(b)} -> {_fmt(a)}), more than the {limit:g} allowed")
    row["passed"] = not failures
    if failures:
        row["why"] = f"{task.name}: " + "; ".join(failures)
    else:
        extra = (
            f", 95% interval [{_fmt(row['low'], True)}, {_fmt(row['high'], True)}]" if row["low"] is not None else ""
        )
        row["why"] = (
            f"{task.name}: AUC {_fmt(ours)} vs champion {_fmt(theirs)} (delta {_fmt(row['delta'], True)}{extra})"
        )
    return row


def decide(comparison: dict[str, Any], tasks: list[TaskSpec], settings: GateSettings | None = None) -> Decision:
    """Promote only if every configured task passes; the reason names each failing task and by how much.

    ``tasks`` (the configuration), not the comparison, says which tasks must pass: a task the comparison
    lacks (no holdout examples) is a rejection, never a silent skip.
    """
    settings = settings or GateSettings()
    if not tasks:
        raise GateError("the gate needs at least one task to judge; the configuration lists none")
    per_task = {task.name: _judge_task(task, comparison, settings) for task in tasks}
    # A task without holdout examples fails on its own; it says nothing about which rule applied.
    modes = {row["mode"] for row in per_task.values()} - {"missing"} or {"champion"}
    rule = {
        "name": "every_task_beats_champion" if modes == {"champion"} else
                "every_task_clears_floor" if modes == {"floor"} else "every_task_beats_champion_or_floor",
        "metric": "auc",
        "comparison": "challenger_auc > champion_auc + min_delta (strict), on the same holdout",
        "split": comparison.get("split", "holdout"),
        "tasks": [task.name for task in tasks],
        **settings.model_dump(),
        "floors": {name: row["floor"] for name, row in per_task.items()},
    }  # fmt: skip
    failed = [row for row in per_task.values() if not row["passed"]]
    if failed:
        reason = f"rejected: {len(failed)} of {len(per_task)} task(s) failed: " + "; ".join(r["why"] for r in failed)
        verdict: Literal["promote", "reject"] = "reject"
    else:
        lead = "every task beats the champion" if modes == {"champion"} else (
            "no champion yet and every task reaches its floor" if modes == {"floor"}
            else "every task beats the champion or, where it has none, reaches its floor")  # fmt: skip
        reason = f"promoted: {lead}: " + "; ".join(r["why"] for r in per_task.values())
        verdict = "promote"
    return Decision(verdict=verdict, reason=reason, per_task=per_task, rule=rule)


# --------------------------------------------------------------------------------------------------
# The record on the model version.
def describe(decision: Decision, version: int | str, champion_version: int | str | None) -> str:
    """A readable summary for the version's description in the MLflow UI (Markdown)."""
    against = f"champion v{champion_version}" if champion_version is not None else "the absolute floors (no champion)"
    lines = [
        f"**Gate: {decision.verdict.upper()}** ({decision.decided_at}) - v{version} against {against}.",
        "",
        decision.reason,
        "",
        "| task | challenger AUC | champion AUC | delta | 95% interval | floor | passed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in decision.per_task.items():
        interval = f"[{_fmt(row['low'], True)}, {_fmt(row['high'], True)}]" if row["low"] is not None else "n/a"
        lines.append(
            f"| {name} | {_fmt(row['challenger_auc'])} | {_fmt(row['champion_auc'])} | {_fmt(row['delta'], True)} "
            f"| {interval} | {_fmt(row['floor'])} | {'yes' if row['passed'] else 'NO'} |"
        )
    return "\n".join(lines)


def record_decision(
    client: MlflowClient,
    model_name: str,
    version: int | str,
    decision: Decision,
    comparison: dict[str, Any],
    champion_version: int | str | None = None,
) -> dict[str, Any]:
    """Write the decision onto the model version: tags, description, and ``gate/comparison.json`` on its run.

    ``champion_version`` defaults to the version holding the ``champion`` alias now, so record before
    promoting (the DAG does: decide, record, then promote).
    Returns the JSON document that was written.
    """
    from mtl_core.registry import current_alias, mlflow_errors

    with mlflow_errors(f"recording the gate decision on {model_name} v{version}"):
        mv = client.get_model_version(model_name, str(version))
        if champion_version is None:
            champion_version = current_alias(client, model_name, "champion")
            if champion_version is not None and str(champion_version) == str(version):
                champion_version = current_alias(client, model_name, "previous")
        document = _json_safe(
            {
                "model": model_name,
                "candidate": {"version": int(mv.version), "run_id": mv.run_id},
                "champion": {"version": int(champion_version) if champion_version is not None else None},
                "verdict": decision.verdict,
                "why": decision.reason,
                "decided_at": decision.decided_at,
                "rule": decision.rule,
                "per_task": decision.per_task,
                "comparison": comparison,
            }
        )
        tags = {
            "gate.verdict": decision.verdict,
            "gate.reason": decision.reason,
            "gate.decided_at": decision.decided_at,
            "gate.rule": decision.rule["name"],
            "gate.min_delta": str(decision.rule.get("min_delta")),
            "gate.champion_version": str(champion_version) if champion_version is not None else "none",
        }
        for name, row in decision.per_task.items():
            tags[f"gate.{name}.passed"] = str(row["passed"]).lower()
            for key in ("auc_delta", "challenger_auc", "champion_auc"):
                value = row["delta"] if key == "auc_delta" else row[key]
                tags[f"gate.{name}.{key}"] = "none" if value is None else f"{value:.6f}"
        for key, value in tags.items():
            client.set_model_version_tag(model_name, str(version), key, value)
        client.update_model_version(model_name, str(version), description=describe(decision, version, champion_version))
        if mv.run_id:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / Path(COMPARISON_ARTIFACT).name
                path.write_text(json.dumps(document, indent=2, sort_keys=False))
                client.log_artifact(mv.run_id, str(path), str(Path(COMPARISON_ARTIFACT).parent))
            client.set_tag(mv.run_id, "gate.verdict", decision.verdict)
    return document


def run_gate(
    client: MlflowClient,
    model_name: str,
    version: int | str,
    comparison: dict[str, Any],
    tasks: list[TaskSpec],
    settings: GateSettings | None = None,
    actor: str = "gate",
) -> Decision:
    """Decide, record, and promote on a pass: the whole gate step of the DAG in one call.

    The record is written before the alias moves, so a crash in between leaves a recorded "promote" with
    the old champion still serving (safe), never a new champion without its reason.
    """
    from mtl_core.registry import promote

    decision = decide(comparison, tasks, settings)
    # The champion compared against is resolved by record_decision (on a retry after promotion: "previous").
    record_decision(client, model_name, version, decision, comparison)
    if decision.promote:
        promote(client, model_name, version, actor=actor, why=decision.reason)
    return decision
