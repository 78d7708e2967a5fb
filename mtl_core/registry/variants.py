"""The int8 and ONNX variants of a registered version: built at registration, logged as artifacts of its run.

``log_variants`` builds them (``learn.variants.build_variants``) on the run's holdout and logs the directory
as the run's ``variants/`` artifacts, with per-variant metrics (``variant.<v>.auc_delta.<task>``,
``variant.<v>.p99_ms_1row``, ...) that the MLflow UI compares across runs. ``download_variants`` fetches them
for the server; versions registered before variants existed have none, and get None.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric

from mtl_core.config import Settings
from mtl_core.learn.examples import Examples
from mtl_core.learn.variants import REPORT_FILE, VARIANTS, build_variants, read_report
from mtl_core.registry.store import RegistryError, mlflow_errors

log = logging.getLogger(__name__)

ARTIFACT_DIR = "variants"


def _has_report(client: MlflowClient, run_id: str) -> bool:
    return any(f.path == f"{ARTIFACT_DIR}/{REPORT_FILE}" for f in client.list_artifacts(run_id, ARTIFACT_DIR))


def variant_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report's figures as flat MLflow metrics: AUC change per task, latencies, throughput, size, verdict."""
    metrics: dict[str, float] = {}
    for name in VARIANTS:
        entry = report["variants"].get(name)
        if entry is None:
            continue
        prefix = f"variant.{name}"
        for rows, label in (("1", "1row"), ("100", "100rows")):
            for stat in ("p50", "p99"):
                metrics[f"{prefix}.{stat}_ms_{label}"] = entry["latency_ms"][rows][stat]
        metrics[f"{prefix}.rows_per_s"] = entry["rows_per_s"]
        metrics[f"{prefix}.size_bytes"] = entry["size_bytes"]
        if name != "fp32":
            metrics[f"{prefix}.within_bound"] = 1.0 if entry["within_bound"] else 0.0
            metrics[f"{prefix}.speedup_1row_p99"] = entry["speedup_1row_p99"]
            for task, figures in entry["tasks"].items():
                if figures.get("auc_delta") is not None:  # undefined on this holdout: no metric, the report says why
                    metrics[f"{prefix}.auc_delta.{task}"] = figures["auc_delta"]
    return metrics


def log_variants(
    client: MlflowClient,
    run_id: str,
    model_dir: str | Path,
    examples: Examples,
    settings: Settings,
    *,
    calls: int = 300,
) -> dict[str, Any]:
    """Build the variants of ``model_dir`` on the holdout rows of ``examples`` and log them on ``run_id``.

    Returns the report (``learn.variants.build_variants``). Idempotent per run: a retried task finds the
    report the first attempt logged and builds nothing again.
    """
    with mlflow_errors(f"reading the variants of run {run_id}"):
        if _has_report(client, run_id):
            with tempfile.TemporaryDirectory() as tmp:
                local = client.download_artifacts(run_id, f"{ARTIFACT_DIR}/{REPORT_FILE}", tmp)
                return json.loads(Path(local).read_text())
    rows = np.flatnonzero(examples.split == "holdout")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / ARTIFACT_DIR
        report = build_variants(
            model_dir,
            out,
            examples,
            rows,
            max_auc_loss=settings.serve.variant_max_auc_loss,
            calls=calls,
            cache_dir=settings.resolved_text_cache_dir,
        )
        with mlflow_errors(f"logging the variants of {model_dir} on run {run_id}"):
            # The report goes last: its presence is what a retry takes for "all logged".
            for part in sorted(p for p in out.iterdir() if p.is_dir()):
                client.log_artifacts(run_id, str(part), f"{ARTIFACT_DIR}/{part.name}")
            metrics = variant_metrics(report)
            client.log_batch(
                run_id, metrics=[Metric(key, float(value), _now_ms(), 0) for key, value in metrics.items()]
            )
            client.log_artifact(run_id, str(out / REPORT_FILE), ARTIFACT_DIR)
    return report


def download_variants(client: MlflowClient, model_name: str, version: int, dest: str | Path) -> Path | None:
    """The variants directory of one registered version, downloaded into ``dest``; None for a version registered
    before variants existed (its run has no ``variants/``)."""
    with mlflow_errors(f"downloading the variants of {model_name} v{version}"):
        run_id = client.get_model_version(model_name, str(version)).run_id
        if not run_id or not _has_report(client, run_id):
            return None
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        local = Path(client.download_artifacts(run_id, ARTIFACT_DIR, str(dest)))
    report = read_report(local)
    missing = [
        entry["file"]
        for name, entry in report["variants"].items()
        if name != "fp32" and not (local / entry["file"]).is_file()
    ]
    if missing:
        raise RegistryError(
            f"the variants of {model_name} v{version} are incomplete in the artifact store (missing "
            f"{', '.join(missing)}); serve it with serve.variant fp32 until they are logged again"
        )
    return local


def _now_ms() -> int:
    return int(time.time() * 1000)
