"""The DAG's step functions that need neither Airflow nor MLflow: window, previous snapshot, on-call message,
snapshot integrity."""

from __future__ import annotations

from datetime import date, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_training_env
from support import PSEUDONYMS

from mtl_core import pipeline
from mtl_core.artifacts import Snapshot
from mtl_core.config import load_settings
from mtl_core.data import warehouse as wh
from mtl_core.data.extract import SnapshotIntegrityError, extract_snapshot
from mtl_core.data.shop import ShopSpec, write_shop
from mtl_core.learn.training import train_on_snapshot


def test_training_window_is_lookback_plus_history_ending_at_the_interval_end(tmp_path):
    env = {"MTL_DATA_DIR": str(tmp_path), "MTL_PIPELINE__LOOKBACK_DAYS": "28", "MTL_PIPELINE__POLICY": "warm_start"}
    settings = load_settings(environ=env)
    start, end = pipeline.training_window(settings, "2026-03-02T00:00:00+00:00")
    assert end == datetime(2026, 3, 2) and (end - start).days == 28 + settings.features.history_days


def test_the_expanding_window_starts_at_the_first_event_and_grows_no_longer_than_its_cap(tmp_path):
    env = {"MTL_DATA_DIR": str(tmp_path), "MTL_PIPELINE__POLICY": "expanding"}
    settings = load_settings(environ=env)
    engine = wh.make_engine(settings.resolved_warehouse_url)
    write_shop(engine, ShopSpec(users=60, items=20, days=70, start=date(2026, 1, 5), seed=1))
    assert pipeline.training_window(settings, "2026-03-02", engine) == (datetime(2026, 1, 5), datetime(2026, 3, 2))
    assert pipeline.training_window(settings, "2026-03-09", engine)[0] == datetime(2026, 1, 5)  # it grows
    capped = load_settings(environ={**env, "MTL_PIPELINE__EXPANDING_MAX_DAYS": "21"})
    start, end = pipeline.training_window(capped, "2026-03-09", engine)
    assert (end - start).days == 21 + capped.features.history_days
    assert pipeline.lookback_days(capped) == 21


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
    assert "Runbook: docs/RUNBOOK.md#validate-the-data-broke-an-expectation" in message
    promote = pipeline.oncall_message("d", "r", "promote", "run could not be closed", settings)
    assert "--by" in promote and "--why" in promote and "unchanged" not in promote  # the alias may have moved


def test_every_runbook_section_an_oncall_message_names_is_a_heading_of_the_runbook():
    import re
    from pathlib import Path

    from mtl_core.quality import drift

    runbook = Path(__file__).resolve().parents[2] / pipeline.RUNBOOK
    # GitHub's anchors: lower case, punctuation other than - and _ dropped, each space a hyphen.
    anchors = {
        re.sub(r"[^\w\- ]", "", line[3:].strip().lower()).replace(" ", "-")
        for line in runbook.read_text().splitlines()
        if line.startswith("## ")
    }
    named = {**pipeline.RUNBOOK_SECTION, "validate (drift)": pipeline.DRIFT_SECTION}
    # The monitor's message names its section itself.
    named["check_served_scores (message)"] = drift.RUNBOOK_SCORES.split("#", 1)[1]
    missing = {task: a for task, a in named.items() if a not in anchors}
    assert missing == {} and "contents" in anchors, missing
    assert set(pipeline.RUNBOOK_SECTION) == set(pipeline.NEXT_STEP)


def test_a_tampered_snapshot_stops_validate_and_build_features_and_mtl_train(tmp_path, tiny_bert_path):
    settings = load_settings(environ=tiny_training_env(tmp_path, tiny_bert_path))
    engine = wh.make_engine(settings.resolved_warehouse_url)
    write_shop(engine, ShopSpec(users=300, items=80, days=21, seed=2))
    extract_snapshot(engine, "2026-01-05", "2026-01-26", tmp_path / "snap", pseudonyms=PSEUDONYMS)
    items = pq.read_table(tmp_path / "snap" / "items.parquet")
    prices = items["price"].to_pylist()
    prices[0] = 0.01  # one price changed after extraction; the file otherwise as written
    column = pa.array(prices, items.schema.field("price").type)
    pq.write_table(
        items.set_column(items.schema.get_field_index("price"), "price", column), tmp_path / "snap" / "items.parquet"
    )
    snapshot = Snapshot.load(tmp_path / "snap")
    with pytest.raises(SnapshotIntegrityError, match=r"items\.parquet .*does not match the manifest"):
        pipeline.validate(settings, snapshot)
    with pytest.raises(SnapshotIntegrityError, match=r"items\.parquet .*does not match the manifest"):
        pipeline.build_features(settings, snapshot, "k")
    with pytest.raises(SnapshotIntegrityError, match=r"items\.parquet"):
        train_on_snapshot(tmp_path / "snap", tmp_path / "model", settings, progress=False)


def test_abandoned_checkpoints_are_removed_after_the_retention(tmp_path):
    import os
    import time

    settings = load_settings(environ={"MTL_DATA_DIR": str(tmp_path), "MTL_PIPELINE__CHECKPOINT_RETENTION_DAYS": "7"})
    old, fresh, current = (pipeline.run_dir(settings, key) / "challenger" / "checkpoint.pt" for key in "abc")
    for checkpoint in (old, fresh, current):
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(b"weights")
    eight_days_ago = time.time() - 8 * 86_400
    for checkpoint in (old, current):
        os.utime(checkpoint, (eight_days_ago, eight_days_ago))
    removed = pipeline.remove_abandoned_checkpoints(settings, keep=pipeline.run_dir(settings, "c"))
    assert removed == [old] and not old.exists() and fresh.exists() and current.exists()


def test_a_window_too_short_for_a_task_names_the_settings_to_change(tmp_path):
    from mtl_core.learn import TrainingError

    settings = load_settings(environ={"MTL_DATA_DIR": str(tmp_path), "MTL_TEXT__ENABLED": "false"})
    engine = wh.make_engine(settings.resolved_warehouse_url)
    write_shop(engine, ShopSpec(users=300, items=80, days=21, seed=2))
    extract_snapshot(engine, "2026-01-05", "2026-01-26", tmp_path / "snap", PSEUDONYMS)  # 21 days, like a short import
    with pytest.raises(TrainingError) as caught:
        pipeline.build_features(settings, Snapshot.load(tmp_path / "snap"), "k")
    message = str(caught.value)
    assert "churn" in message and "features.churn_horizon_days (14)" in message and "21 days" in message
    assert "pipeline.lookback_days" in message and "drop the task" in message
