"""The DAG's step functions that need neither Airflow nor MLflow: window, previous snapshot, on-call message."""

from __future__ import annotations

from datetime import datetime

from mtl_core import pipeline
from mtl_core.config import load_settings


def test_training_window_is_lookback_plus_history_ending_at_the_interval_end(tmp_path):
    settings = load_settings(environ={"MTL_DATA_DIR": str(tmp_path), "MTL_PIPELINE__LOOKBACK_DAYS": "28"})
    start, end = pipeline.training_window(settings, "2026-03-02T00:00:00+00:00")
    assert end == datetime(2026, 3, 2) and (end - start).days == 28 + settings.features.history_days


def test_previous_snapshot_is_the_newest_one_ending_earlier(tmp_path):
    settings = load_settings(environ={"MTL_DATA_DIR": str(tmp_path)})
    for name in ("20260101-20260205", "20260108-20260212", "20260115-20260219"):
        (settings.snapshots_dir / name).mkdir(parents=True)
        (settings.snapshots_dir / name / "manifest.json").write_text("{}")
    current = settings.snapshots_dir / "20260115-20260219"
    assert pipeline.previous_snapshot(settings, current).name == "20260108-20260212"
    assert pipeline.previous_snapshot(settings, settings.snapshots_dir / "20260101-20260205") is None


def test_oncall_message_says_what_where_why_and_what_next(tmp_path):
    settings = load_settings(
        environ={"MTL_DATA_DIR": str(tmp_path), "MTL_WAREHOUSE_URL": "postgresql+psycopg://etl:s3cret@db:5432/shop"}
    )
    message = pipeline.oncall_message(
        "mtl_retrain",
        "scheduled__2026-03-02",
        "validate",
        "2 failing expectations",
        settings,
        snapshot="/data/snapshots/x",
    )
    for part in (
        "mtl_retrain",
        "scheduled__2026-03-02",
        "task validate failed",
        "2 failing expectations",
        "/data/snapshots/x/validation/report.html",
        "champion: unchanged",
        "mtl run-dag",
    ):
        assert part.lower() in message.lower(), part
    extract = pipeline.oncall_message("d", "r", "extract", "timeout", settings)
    assert "db:5432" in extract and "s3cret" not in extract  # where to look, without the password
    assert all(task in pipeline.NEXT_STEP for task in ("extract", "validate", "train_challenger", "register", "gate"))
