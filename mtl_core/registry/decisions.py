"""The gate's decision written onto the model version: tags, description, and ``gate/comparison.json``.

Every decision, pass or fail, is recorded, so that "why was this model (not) promoted?" is answered by the
registry itself instead of a log line that has since rotated away.
"""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from mtl_core.jsonable import to_jsonable
from mtl_core.judge.gate import Decision, fmt_metric
from mtl_core.registry.aliases import CHAMPION, PREVIOUS, current_alias
from mtl_core.registry.store import mlflow_errors

COMPARISON_ARTIFACT = "gate/comparison.json"


def describe(
    decision: Decision, version: int | str, champion_version: int | str | None, comparison: dict[str, Any] | None = None
) -> str:
    """A readable summary for the version's description in the MLflow UI (Markdown)."""
    against = f"champion v{champion_version}" if champion_version is not None else "the absolute floors (no champion)"
    lines = [
        f"**Gate: {decision.verdict.upper()}** ({decision.decided_at}) - v{version} against {against}.",
        "",
        decision.reason,
        "",
        *(
            [f"Settings that decide promotion were overridden by the run's conf: {decision.rule['overrides']}", ""]
            if decision.rule.get("overrides")
            else []
        ),
        "| task | challenger AUC | champion AUC | delta | 95% interval | one-sided lower bound | floor | passed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in decision.per_task.items():
        interval = (
            f"[{fmt_metric(row['low'], True)}, {fmt_metric(row['high'], True)}]" if row["low"] is not None else "n/a"
        )
        lines.append(
            f"| {name} | {fmt_metric(row['challenger_auc'])} | {fmt_metric(row['champion_auc'])} "
            f"| {fmt_metric(row['delta'], True)} | {interval} | {fmt_metric(row.get('lower_bound'), True)} "
            f"| {fmt_metric(row['floor'])} | {'yes' if row['passed'] else 'NO'} |"
        )
    rates = decision.rule.get("measured_error_rates")
    if rates:
        lines += [
            "",
            f"Error rates of this rule ({rates.get('measured_by', 'bench/gate_power.py')}): "
            + ", ".join(
                f"{label} {rates[key]['rate']:.1%} (95% interval {rates[key]['low']:.1%}-{rates[key]['high']:.1%}"
                + (
                    f"; {rates[key]['shop_min']:.1%}-{rates[key]['shop_max']:.1%} shop by shop)"
                    if "shop_min" in rates[key]
                    else ")"
                )
                for key, label in (
                    ("aa_promotion", "promotes a model no better (A/A)"),
                    ("one_task_worse_promotion", "promotes one 0.01 worse on a task"),
                    ("all_better_promotion", "promotes one 0.01 better on every task"),
                )
                if key in rates
            ),
        ]
    elif decision.rule.get("measured_error_rates_note"):
        lines += ["", f"Error rates of this rule: none quoted, {decision.rule['measured_error_rates_note']}."]
    tasks = (comparison or {}).get("tasks") or {}
    lifts = {name: entry["single_task"] for name, entry in tasks.items() if entry.get("single_task")}
    if lifts:
        lines += [
            "",
            "Multi-task lift: the joint model against each task's single-task model (the same optimiser budget "
            "and features), on the same holdout rows:",
            "",
            "| task | joint AUC | single-task AUC | lift | 95% interval |",
            "|---|---|---|---|---|",
        ]
        for name, single in lifts.items():
            lift = single["lift"]
            lines.append(
                f"| {name} | {fmt_metric(lift.get('auc_a'))} | {fmt_metric(single.get('auc'))} "
                f"| {fmt_metric(lift.get('delta'), True)} "
                f"| [{fmt_metric(lift.get('low'), True)}, {fmt_metric(lift.get('high'), True)}] |"
            )
    return "\n".join(lines)


def record_decision(
    client: MlflowClient,
    model_name: str,
    version: int | str,
    decision: Decision,
    comparison: dict[str, Any],
    champion_version: int | str | None = None,
    *,
    champion_known: bool = False,
) -> dict[str, Any]:
    """Write the decision onto the model version: tags, description, and ``gate/comparison.json`` on its run.

    ``champion_version`` is the champion the comparison was made against; with ``champion_known`` it is
    taken as given (None: there was none). Otherwise it defaults to the version holding the ``champion``
    alias now, so record before promoting. Returns the JSON document that was written.
    """
    with mlflow_errors(f"recording the gate decision on {model_name} v{version}"):
        mv = client.get_model_version(model_name, str(version))
        if champion_version is None and not champion_known:
            champion_version = current_alias(client, model_name, CHAMPION)
            if champion_version is not None and str(champion_version) == str(version):
                champion_version = current_alias(client, model_name, PREVIOUS)
        document = to_jsonable(
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
        if decision.rule.get("overrides"):  # a run's conf changed what decides promotion, as allowed
            tags["gate.overrides"] = json.dumps(decision.rule["overrides"], sort_keys=True)
        for name, row in decision.per_task.items():
            tags[f"gate.{name}.passed"] = str(row["passed"]).lower()
            for key in ("auc_delta", "challenger_auc", "champion_auc"):
                value = row["delta"] if key == "auc_delta" else row[key]
                tags[f"gate.{name}.{key}"] = "none" if value is None else f"{value:.6f}"
        for key, value in tags.items():
            client.set_model_version_tag(model_name, str(version), key, value)
        client.update_model_version(
            model_name, str(version), description=describe(decision, version, champion_version, comparison)
        )
        if mv.run_id:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / Path(COMPARISON_ARTIFACT).name
                path.write_text(json.dumps(document, indent=2, sort_keys=False))
                client.log_artifact(mv.run_id, str(path), str(Path(COMPARISON_ARTIFACT).parent))
            client.set_tag(mv.run_id, "gate.verdict", decision.verdict)
    return document


def record_refusal(client: MlflowClient, model_name: str, version: int | str, reason: str) -> None:
    """A version the gate passed but that was not promoted after all (the champion moved meanwhile)."""
    with mlflow_errors(f"recording the refused promotion of {model_name} v{version}"):
        mv = client.get_model_version(model_name, str(version))
        tags = {
            "gate.verdict": "reject",
            "gate.reason": reason,
            "gate.refused_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        for key, value in tags.items():
            client.set_model_version_tag(model_name, str(version), key, value)
        note = f"**Not promoted** ({tags['gate.refused_at']}): {reason}"
        client.update_model_version(model_name, str(version), description=f"{note}\n\n{mv.description or ''}")
