"""The promotion gate: champion/challenger decision and its record (TFX's "blessing").

The rule the product promises: a challenger replaces the champion only if, for EVERY task, its AUC on
the same fresh holdout is strictly above the champion's plus ``min_delta``. Averaging across tasks is
deliberately not allowed: a model that gains on the feed's CTR while losing on churn would silently
hurt one team to please another. Without a champion (the first model, or a task the champion lacks) the
task must instead reach its absolute floor from the configuration.

This module decides and nothing else: pure functions of the comparison and the settings, no MLflow.
``registry.decisions`` writes every decision, pass or fail, onto the model version, so that "why was this
model (not) promoted?" is answered by the registry itself instead of a log line that has since rotated away.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from mtl_core.config import GateSettings, TaskSpec
from mtl_core.errors import MtlError
from mtl_core.jsonable import to_jsonable

if TYPE_CHECKING:
    pass


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
        return to_jsonable(asdict(self))


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


def fmt_metric(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def _judge_task(task: TaskSpec, comparison: dict[str, Any], settings: GateSettings) -> dict[str, Any]:
    floor = (settings.floors or {}).get(task.name, task.floor)
    challenger, champion, auc_delta = _entry(comparison, task.name)
    row: dict[str, Any] = {
        "challenger_auc": None,
        "champion_auc": None,
        "delta": None,
        "low": None,
        "high": None,
        "floor": floor,
        "mode": "missing",
        "passed": False,
        "why": "",
    }
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
        row["why"] = (
            f"{task.name}: AUC {fmt_metric(ours)} {verb} its floor {fmt_metric(floor)} (no champion to compare)"
        )
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
        need = f"must exceed {fmt_metric(settings.min_delta, signed=True)}" if settings.min_delta else "must be above 0"
        failures.append(
            f"AUC {fmt_metric(ours)} vs champion {fmt_metric(theirs)} (delta {fmt_metric(row['delta'], True)}, {need})"
        )
    if settings.require_significance:
        if row["low"] is None:
            failures.append("no bootstrap interval of the AUC difference to test significance")
        elif not row["low"] > 0:
            failures.append(
                "AUC gain not significant: 95% interval "
                f"[{fmt_metric(row['low'], True)}, {fmt_metric(row['high'], True)}] reaches 0"
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
            failures.append(
                f"{metric} worse by {a - b:.4f} ({fmt_metric(b)} -> {fmt_metric(a)}), more than the {limit:g} allowed"
            )
    row["passed"] = not failures
    if failures:
        row["why"] = f"{task.name}: " + "; ".join(failures)
    else:
        extra = (
            f", 95% interval [{fmt_metric(row['low'], True)}, {fmt_metric(row['high'], True)}]"
            if row["low"] is not None
            else ""
        )
        row["why"] = (
            f"{task.name}: AUC {fmt_metric(ours)} vs champion {fmt_metric(theirs)} "
            f"(delta {fmt_metric(row['delta'], True)}{extra})"
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
        "name": "every_task_beats_champion"
        if modes == {"champion"}
        else "every_task_clears_floor"
        if modes == {"floor"}
        else "every_task_beats_champion_or_floor",
        "metric": "auc",
        "comparison": "challenger_auc > champion_auc + min_delta (strict), on the same holdout",
        "split": comparison.get("split", "holdout"),
        "tasks": [task.name for task in tasks],
        **settings.model_dump(),
        "floors": {name: row["floor"] for name, row in per_task.items()},
    }
    failed = [row for row in per_task.values() if not row["passed"]]
    if failed:
        reason = f"rejected: {len(failed)} of {len(per_task)} task(s) failed: " + "; ".join(r["why"] for r in failed)
        verdict: Literal["promote", "reject"] = "reject"
    else:
        lead = (
            "every task beats the champion"
            if modes == {"champion"}
            else (
                "no champion yet and every task reaches its floor"
                if modes == {"floor"}
                else "every task beats the champion or, where it has none, reaches its floor"
            )
        )
        reason = f"promoted: {lead}: " + "; ".join(r["why"] for r in per_task.values())
        verdict = "promote"
    return Decision(verdict=verdict, reason=reason, per_task=per_task, rule=rule)
