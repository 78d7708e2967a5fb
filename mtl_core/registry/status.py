"""What the registry says now: champion, challenger and previous with their metrics, and the last decision."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mtl_core.registry.aliases import CHALLENGER, CHAMPION, PREVIOUS, current_alias, require_model
from mtl_core.registry.store import (
    METRIC_NAMES,
    MODEL_NAME,
    mlflow_errors,
    quote,
)


def _version_summary(client: MlflowClient, model_name: str, version: int) -> dict[str, Any]:
    mv = client.get_model_version(model_name, str(version))
    tags = dict(mv.tags or {})
    metrics: dict[str, dict[str, float]] = {}
    run_tags: dict[str, str] = {}
    if mv.run_id:
        try:
            run = client.get_run(mv.run_id)
            run_tags = run.data.tags
            tasks = [t for t in run_tags.get("mtl.tasks", "").split(",") if t]
            for key, value in run.data.metrics.items():
                task, _, name = key.partition("/")
                if name in METRIC_NAMES and (not tasks or task in tasks):
                    metrics.setdefault(task, {})[name] = value
        except MlflowException:  # the run was deleted; the version and its tags still tell most of it
            pass
    return {
        "version": int(mv.version),
        "run_id": mv.run_id,
        "created_at": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
        "metrics": metrics,
        "gate": {k[len("gate.") :]: v for k, v in tags.items() if k.startswith("gate.")},
        "promotion": {k[len("promotion.") :]: v for k, v in tags.items() if k.startswith("promotion.")},
        "data_interval": run_tags.get("mtl.data_interval"),
        "snapshot_hash": run_tags.get("mtl.snapshot_hash"),
        "git_commit": run_tags.get("mtl.git_commit"),
    }


def status(client: MlflowClient, model_name: str = MODEL_NAME) -> dict[str, Any]:
    """Champion, challenger and previous with their per-task metrics and gate records, plus the last decision."""
    with mlflow_errors(f"reading the status of {model_name}"):
        require_model(client, model_name)
        out: dict[str, Any] = {"model": model_name, "tracking_uri": client.tracking_uri}
        for alias in (CHAMPION, CHALLENGER, PREVIOUS):
            version = current_alias(client, model_name, alias)
            out[alias] = _version_summary(client, model_name, version) if version is not None else None
        versions = client.search_model_versions(f"name = {quote(model_name)}", order_by=["version_number DESC"])
        out["versions"] = len(versions)
        out["last_decision"] = None
        for mv in versions:
            tags = mv.tags or {}
            if "gate.verdict" in tags:
                out["last_decision"] = {
                    "version": int(mv.version),
                    "verdict": tags["gate.verdict"],
                    "reason": tags.get("gate.reason", ""),
                    "at": tags.get("gate.decided_at"),
                }
                break
        return out


def format_status(state: dict[str, Any]) -> str:
    """The status for a terminal: one block per alias, one line per task."""
    lines = [f"{state['model']} at {state['tracking_uri']} ({state.get('versions', '?')} versions)"]
    for alias in (CHAMPION, CHALLENGER, PREVIOUS):
        info = state.get(alias)
        if info is None:
            lines.append(f"  {alias:<10} none")
            continue
        head = f"  {alias:<10} v{info['version']}  registered {info['created_at']}"
        if info.get("data_interval"):
            head += f"  data {info['data_interval']}"
        lines.append(head)
        promo = info.get("promotion") or {}
        if promo:
            lines.append(
                f"             {promo.get('kind', 'promote')} at {promo.get('at')} by {promo.get('by')}: "
                f"{promo.get('why')}"
            )
        gate = info.get("gate") or {}
        if gate.get("verdict"):
            lines.append(f"             gate: {gate['verdict']} ({gate.get('decided_at')}): {gate.get('reason')}")
        for task, values in info.get("metrics", {}).items():
            shown = "  ".join(f"{k} {values[k]:.4f}" for k in METRIC_NAMES if k in values)
            lines.append(f"             {task:<8} {shown}")
    last = state.get("last_decision")
    if last:
        lines.append(f"  last gate decision: v{last['version']} {last['verdict']} ({last['at']}): {last['reason']}")
    else:
        lines.append("  last gate decision: none recorded")
    return "\n".join(lines)
