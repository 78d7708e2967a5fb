"""The promotion gate: champion/challenger decision and its record (TFX's "blessing").

The product promises that a challenger replaces the champion only when it is better, task by task, on the
same fresh holdout. A holdout is a sample, so "better" is a statement with an error rate. The default rule
(``evidence``) promotes only when

* no task is worse than the champion by ``margin`` AUC or more: every task's one-sided lower bound of the
  AUC difference (DeLong's variance, ``confidence``) lies above ``-margin``; and
* the tasks together are better: the lower bound of the mean AUC difference over the tasks lies above
  ``min_gain``. Its variance is the holdout's (DeLong) plus twice ``seed_sd`` squared: two trainings of
  one configuration that differ only in their seed land a few thousandths apart, which a holdout measures
  but which is luck, not a better model.

A challenger that some task shows worse (its upper bound below 0), or that gains nothing on average, is
rejected. One in between (no task shown worse, a positive mean gain, but not enough evidence) is **held**:
the champion stays, and the record says which task lacked evidence and how many times this holdout it
would take. The measured error rates of each rule (``bench/gate_power.py``) are part of every record.

The ``point`` rule (every task's AUC above the champion's plus ``min_delta``) is the old one, kept for
comparison: it promotes about half of the models that are no better at all.

Without a champion (the first model, or a task the champion lacks) each task must instead reach its
absolute floor from the configuration.

This module decides and nothing else: pure functions of the comparison and the settings, no MLflow.
``registry.decisions`` writes every decision onto the model version.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from statistics import NormalDist
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

    verdict: Literal["promote", "hold", "reject"]
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


RATES_FILE = Path(__file__).with_name("gate_error_rates.json")
Z95 = NormalDist().inv_cdf(0.975)  # the two-sided 95% intervals of the comparison


@cache
def measured_error_rates() -> dict[str, Any]:
    """Each rule's error rates as ``bench/gate_power.py`` last measured them (empty if never measured)."""
    try:
        return json.loads(RATES_FILE.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as error:
        raise GateError(
            f"{RATES_FILE} is not valid JSON ({error}); restore it from git or measure the rates again "
            "with bench/gate_power.py --write-rates on the test shops"
        ) from None


def _rates_for(settings: GateSettings) -> tuple[dict[str, Any] | None, str | None]:
    """The measured error rates of the rule as configured, and why there are none when there are none.

    Rates measured for other knobs (another ``min_gain``, ``seed_sd``, ...) say nothing about this rule,
    so they are not quoted as its own."""
    rates = measured_error_rates().get(settings.rule)
    if not rates:
        return None, f"the {settings.rule} rule's error rates were never measured (bench/gate_power.py)"
    measured_with = rates.get("settings") or {}
    applied = settings.model_dump()
    differ = {key: value for key, value in measured_with.items() if applied.get(key) != value}
    if differ:
        knobs = ", ".join(f"{key} {applied.get(key)} (measured with {value})" for key, value in differ.items())
        return None, f"error rates not measured for this rule's settings: {knobs}"
    return rates, None


def _standard_error(auc_delta: dict[str, Any]) -> float | None:
    """DeLong's standard error of the difference; from the 95% interval's width for older comparisons."""
    se = _num(auc_delta.get("se"))
    if se is not None:
        return se
    low, high = _num(auc_delta.get("low")), _num(auc_delta.get("high"))
    return (high - low) / (2 * Z95) if low is not None and high is not None else None


def _judge_task(task: TaskSpec, comparison: dict[str, Any], settings: GateSettings) -> dict[str, Any]:
    """The task's evidence and, for the floor and point rules, whether it passed; ``decide`` applies the rest."""
    floor = (settings.floors or {}).get(task.name, task.floor)
    challenger, champion, auc_delta = _entry(comparison, task.name)
    row: dict[str, Any] = {
        "task": task.name,
        "challenger_auc": None,
        "champion_auc": None,
        "delta": None,
        "se": None,
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
    row["n"] = challenger.get("n")
    if ours is None:
        row["mode"] = "missing"
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
        row["mode"] = "missing"
        row["why"] = f"{task.name}: champion AUC undefined on the holdout, so the challenger cannot be shown better"
        return row
    auc_delta = auc_delta or {}
    delta = _num(auc_delta.get("delta"))
    row["delta"] = delta if delta is not None else ours - theirs
    row["se"] = _standard_error(auc_delta)
    row["low"] = _num(auc_delta.get("low"))
    row["high"] = _num(auc_delta.get("high"))
    guardrails: list[str] = []
    for metric, limit in (("logloss", settings.max_logloss_increase), ("ece", settings.max_ece_increase)):
        if limit is None:
            continue
        a, b = _num(challenger.get(metric)), _num(champion.get(metric))
        if a is None or b is None:
            guardrails.append(f"{metric} guardrail cannot be checked ({metric} missing)")
            continue
        row[f"{metric}_increase"] = a - b
        if a - b > limit:
            guardrails.append(
                f"{metric} worse by {a - b:.4f} ({fmt_metric(b)} -> {fmt_metric(a)}), more than the {limit:g} allowed"
            )
    row["guardrails_failed"] = guardrails
    if settings.rule == "point":
        _point_rule(row, settings, list(guardrails))
    return row


def _interval(row: dict[str, Any]) -> str:
    if row["low"] is None:
        return ""
    return f", 95% interval [{fmt_metric(row['low'], True)}, {fmt_metric(row['high'], True)}]"


def _point_rule(row: dict[str, Any], settings: GateSettings, failures: list[str]) -> None:
    ours, theirs = row["challenger_auc"], row["champion_auc"]
    # Strict: an equal AUC is no reason to swap models (every swap carries risk of its own).
    if not row["delta"] > settings.min_delta:
        need = f"must exceed {fmt_metric(settings.min_delta, signed=True)}" if settings.min_delta else "must be above 0"
        failures.insert(
            0,
            f"AUC {fmt_metric(ours)} vs champion {fmt_metric(theirs)} (delta {fmt_metric(row['delta'], True)}, {need})",
        )
    if settings.require_significance:
        if row["low"] is None:
            failures.append("no interval of the AUC difference to test significance")
        elif not row["low"] > 0:
            failures.append(
                "AUC gain not significant: 95% interval "
                f"[{fmt_metric(row['low'], True)}, {fmt_metric(row['high'], True)}] reaches 0"
            )
    row["passed"] = not failures
    row["why"] = (
        f"{row['task']}: " + "; ".join(failures)
        if failures
        else (
            f"{row['task']}: AUC {fmt_metric(ours)} vs champion {fmt_metric(theirs)} "
            f"(delta {fmt_metric(row['delta'], True)}{_interval(row)})"
        )
    )


def _evidence_rule(
    rows: list[dict[str, Any]], settings: GateSettings
) -> tuple[Literal["promote", "hold", "reject"], str, dict[str, float] | None]:
    """(verdict, reason, the tasks' mean difference) of the evidence rule over the compared tasks' rows,
    whose bounds and needs it fills in."""
    z = NormalDist().inv_cdf(settings.confidence)
    z_power = NormalDist().inv_cdf(settings.power)
    pct = f"{settings.confidence:.0%}"
    m = settings.margin
    no_se = [r["task"] for r in rows if r["se"] is None]
    if no_se:
        for r in rows:
            r["why"] = f"{r['task']}: no standard error of the AUC difference" if r["se"] is None else r["why"]
        reason = f"rejected: no standard error of the AUC difference for {', '.join(no_se)}, so nothing is known"
        return "reject", reason, None
    worse, short, guard = [], [], []
    for r in rows:
        r["lower_bound"], r["upper_bound"] = r["delta"] - z * r["se"], r["delta"] + z * r["se"]
        r["noninferior"] = r["lower_bound"] > -m
        head = (
            f"{r['task']}: AUC {fmt_metric(r['challenger_auc'])} vs champion {fmt_metric(r['champion_auc'])} "
            f"(delta {fmt_metric(r['delta'], True)}, {pct} bounds [{fmt_metric(r['lower_bound'], True)}, "
            f"{fmt_metric(r['upper_bound'], True)}])"
        )
        r["why"] = head
        if r["guardrails_failed"]:
            guard.append(f"{head}: " + "; ".join(r["guardrails_failed"]))
        elif r["upper_bound"] < 0:
            worse.append(f"{head}: worse than the champion")
        elif not r["noninferior"]:
            # How many times this holdout's examples would show the task no worse by the margin, with
            # ``power``, if the difference measured is the true one.
            gap = r["delta"] + m
            r["more_data"] = _holdout_factor(gap, r["se"] ** 2, 0.0, z + z_power) if gap > 0 else None
            need = (
                f"about {r['more_data']:.1f} times this holdout would tell"
                if r["more_data"]
                else "no holdout would tell"
            )
            short.append(
                f"{r['task']} could still be worse by {m:g} or more (lower bound "
                f"{fmt_metric(r['lower_bound'], True)}; {need})"
            )
    mean = sum(r["delta"] for r in rows) / len(rows)
    holdout_var = sum(r["se"] ** 2 for r in rows) / len(rows) ** 2  # the tasks' holdouts taken as independent
    seed_var = 2 * settings.seed_sd**2  # two trainings' luck, which no holdout shrinks
    mean_se = math.sqrt(holdout_var + seed_var)
    mean_low = mean - z * mean_se
    summary = (
        f"mean AUC difference over the tasks {fmt_metric(mean, True)} ({pct} lower bound {fmt_metric(mean_low, True)})"
    )
    summed: dict[str, float] = {"delta": mean, "se": mean_se, "lower_bound": mean_low}
    details = "; ".join(r["why"] for r in rows)
    if guard or worse:
        failed = guard + worse
        return "reject", f"rejected: {len(failed)} of {len(rows)} task(s) failed: " + "; ".join(failed), summed
    floor = settings.min_gain
    if mean <= floor:
        worth = f" ({fmt_metric(floor, True)} is worth a swap)" if floor else ""
        return "reject", f"rejected: no gain{worth}, {summary}: {details}", summed
    if short or mean_low <= floor:
        needs = list(short)
        if mean_low <= floor:
            factor = _holdout_factor(mean - floor, holdout_var, seed_var, z + z_power)
            if factor is None:
                need = "no holdout would tell: the gain is within what two trainings' seeds alone give"
            else:
                summed["more_data"] = factor
                need = f"about {factor:.1f} times this holdout would tell"
            needs.append(f"the mean gain is not shown above {fmt_metric(floor, True) if floor else 0} ({need})")
        return "hold", f"held, champion kept: not enough evidence: {'; '.join(needs)}; {summary}: {details}", summed
    return (
        "promote",
        f"promoted: no task is worse than the champion by {m:g} or more and the tasks together are better, "
        f"{summary}: {details}",
        summed,
    )


def _holdout_factor(gain: float, holdout_var: float, seed_var: float, z: float) -> float | None:
    """How many times this holdout would show ``gain`` with the lower bound's confidence and the power
    (``z`` is the sum of their normal quantiles), if it is the true gain; None if no holdout would, because
    the seed variance alone, which more rows do not shrink, already hides it."""
    room = (gain / z) ** 2 - seed_var  # the variance of the holdout's part that the gain still allows
    if room <= 0:
        return None
    return holdout_var / room


def decide(comparison: dict[str, Any], tasks: list[TaskSpec], settings: GateSettings | None = None) -> Decision:
    """The verdict on a comparison; the reason names each task that failed or lacked evidence, and by how much.

    ``tasks`` (the configuration), not the comparison, says which tasks are judged: a task the comparison
    lacks (no holdout examples) is a rejection, never a silent skip.
    """
    settings = settings or GateSettings()
    if not tasks:
        raise GateError("the gate needs at least one task to judge; the configuration lists none")
    per_task = {task.name: _judge_task(task, comparison, settings) for task in tasks}
    # A task without holdout examples fails on its own; it says nothing about which rule applied.
    modes = {row["mode"] for row in per_task.values()} - {"missing"} or {"champion"}
    against_champion = (
        "every_task_noninferior_and_mean_gain" if settings.rule == "evidence" else "every_task_beats_champion"
    )
    rule = {
        "name": against_champion
        if modes == {"champion"}
        else "every_task_clears_floor"
        if modes == {"floor"}
        else f"{against_champion}_or_floor",
        "metric": "auc",
        "comparison": (
            f"every task: one-sided {settings.confidence:.0%} lower bound of the AUC difference "
            f"> -{settings.margin:g}; "
            f"mean over tasks: lower bound > {settings.min_gain:g} (DeLong variance, same holdout, "
            f"plus 2 x seed_sd^2 = 2 x {settings.seed_sd:g}^2 for two trainings' luck)"
            if settings.rule == "evidence"
            else "challenger_auc > champion_auc + min_delta (strict), on the same holdout"
        ),
        "split": comparison.get("split", "holdout"),
        "tasks": [task.name for task in tasks],
        **settings.model_dump(),
        "floors": {name: row["floor"] for name, row in per_task.items()},
    }
    rule["measured_error_rates"], why_no_rates = _rates_for(settings)
    if why_no_rates:
        rule["measured_error_rates_note"] = why_no_rates
    missing = [row for row in per_task.values() if row["mode"] == "missing"]
    floored = [row for row in per_task.values() if row["mode"] == "floor"]
    compared = {name: row for name, row in per_task.items() if row["mode"] == "champion"}
    failed = missing + [row for row in floored if not row["passed"]]
    if settings.rule == "point":
        failed += [row for row in compared.values() if not row["passed"]]
    if failed:
        reason = f"rejected: {len(failed)} of {len(per_task)} task(s) failed: " + "; ".join(r["why"] for r in failed)
        verdict: Literal["promote", "hold", "reject"] = "reject"
    elif settings.rule == "evidence" and compared:
        verdict, reason, mean = _evidence_rule(list(compared.values()), settings)
        for row in compared.values():
            row["passed"] = verdict == "promote"
        if mean is not None:
            rule["mean"] = mean
        if floored:
            reason += "; " + "; ".join(r["why"] for r in floored)
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
