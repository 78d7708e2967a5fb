"""The bad-data catalogue: every kind of bad batch a faulty upstream job writes, run through the real DAG.

One installation (Airflow, MLflow and a small simulated shop, all on SQLite) and one healthy run that promotes
a champion. Then each kind of ``mtl_core.data.corruption`` damages the newest week of its own copy of the
warehouse, inserted straight into it as the faulty job would, and the DAG runs for that week against the copy.
It must stop at validation, or for a value the warehouse stores against its column's type already at
extraction, with a message naming the table, the column and the problem; nothing is trained or registered
and the champion stays. The last test prints the catalogue: kind | stopped at | table.column | check |
message excerpt.

dag.test() does not raise when a task fails: every test asserts task states. The validation message is the
validate task's XCom ``validation``; an extraction failure's message is the on-call message in the task log.
"""

from __future__ import annotations

import re
import sqlite3
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from mtl_core import pipeline
from mtl_core.config import load_settings
from mtl_core.data import warehouse as wh
from mtl_core.data.corruption import CORRUPTION_KINDS, corrupt_interval
from mtl_core.data.shop import ShopSpec, write_shop
from mtl_core.local_airflow import prepare_airflow, run_dag_in_process

START = date(2026, 1, 5)
HEALTHY_WEEK = START + timedelta(days=42)  # the healthy run's interval ends here
BAD_WEEK = START + timedelta(days=49)  # every kind damages the week before this and runs the DAG for it
# Tiny training and floors of 0: this module tests the data, not the model, so the first model is promoted
# whatever it learned in its few steps. No text encoder, for speed.
CONFIG = """
features: {history_days: 7, valid_days: 4, holdout_days: 7}
train: {epochs: 1, steps_per_epoch: 30}
text: {enabled: false}
pipeline: {retries: 0}
tasks:
  - {name: ctr, sample_space: feed, label: clicked, floor: 0.0}
  - {name: cvr, sample_space: feed, label: purchased, given: clicked, weight: 0.5, floor: 0.0}
  - {name: ad_ctr, sample_space: ads, label: ad_clicked, weight: 0.5, floor: 0.0}
  - {name: churn, sample_space: users, label: churned, weight: 0.25, floor: 0.0}
"""
AFTER_VALIDATE = ("build_features", "train_challenger", "evaluate", "register", "gate", "promote", "record_rejection")

# kind -> (the task that stops the run, table, column, check, text the failure must contain). The shop is sized
# so that every kind is caught with room to spare (2,000 users: the newest week has ~650 clicks, so a week
# without purchases is told apart from a low purchase rate).
EXPECTED = {
    "null_ids": ("validate", "behavior_events", "user_id", "expect_column_values_to_not_be_null", "rows unexpected"),
    "bad_event_types": ("validate", "behavior_events", "event_type", "expect_column_values_to_be_in_set", '"clik"'),
    "negative_prices": ("validate", "items", "price", "expect_column_values_to_be_between", "[-"),
    "absurd_prices": ("validate", "items", "price", "expect_column_values_to_be_between", "max_value=100000"),
    "future_timestamps": (
        "validate",
        "behavior_events",
        "user_id",
        "expect_ids_to_exist_in_dimension_table",
        "missing from users",
    ),
    "shifted_timestamps": (
        "validate",
        "behavior_events",
        "ts",
        "expect_events_not_before_their_parent",
        "earlier than the impression they follow",
    ),
    "duplicate_events": (
        "validate",
        "behavior_events",
        "user_id,item_id,event_type,ts,session_id,parent_event_id,position",
        "expect_compound_columns_to_be_unique",
        "rows unexpected",
    ),
    "volume_collapse": ("validate", "behavior_events", "ts", "expect_newest_week_volume_like_history", "rows/day"),
    "empty_interval": (
        "validate",
        "behavior_events",
        "ts",
        "expect_newest_week_volume_like_history",
        "hold 0.0 rows/day",
    ),
    "label_leak": ("validate", "behavior_events", "position", "expect_no_label_leakage", "equals the label"),
    "bad_titles": ("validate", "items", "title", "expect_column_value_lengths_to_be_between", 'samples [""'),
    "huge_titles": ("validate", "items", "title", "expect_column_value_lengths_to_be_between", "100,000 characters"),
    "invalid_utf8_titles": ("extract", "items", "title", "stored_value_problems", "not valid UTF-8"),
    "undecodable_titles": ("validate", "items", "title", "expect_column_values_to_not_match_regex", "\ufffd"),
    "clicks_without_impressions": (
        "validate",
        "behavior_events",
        "parent_event_id",
        "expect_parent_links_to_resolve",
        "do not follow an impression",
    ),
    "purchases_without_clicks": (
        "validate",
        "behavior_events",
        "parent_event_id",
        "expect_parent_links_to_resolve",
        "do not follow an add_to_cart",
    ),
    "purchases_out_of_window": (
        "validate",
        "behavior_events",
        "event_type",
        "expect_newest_week_label_rate_like_history",
        "cvr in the newest 7 days 0 ",
    ),
    "unknown_category_items": (
        "validate",
        "behavior_events",
        "item_id",
        "expect_ids_to_exist_in_dimension_table",
        "missing from items",
    ),
    "type_change": ("extract", "items", "price", "stored_value_problems", "stored as text"),
    "lost_clicks": (
        "validate",
        "behavior_events",
        "event_type",
        "expect_newest_week_label_rate_like_history",
        "ctr in the newest 7 days 0 ",
    ),
}
OUTCOMES: dict[str, dict[str, str]] = {}  # kind -> what the catalogue table prints, filled by each kind's test


def test_the_catalogue_covers_every_corruption_kind():
    assert set(EXPECTED) == set(CORRUPTION_KINDS) and len(EXPECTED) >= 15


@pytest.fixture(scope="module")
def installation(tmp_path_factory):
    """The installation, its healthy week (a champion promoted) and a clean copy of its warehouse."""
    root = tmp_path_factory.mktemp("bad_data")
    (root / "mtl.yaml").write_text(CONFIG)
    with pytest.MonkeyPatch.context() as patch:  # the environment is restored afterwards
        for variable in ("MTL_WAREHOUSE_URL", "MTL_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"):
            patch.delenv(variable, raising=False)
        patch.setenv("MTL_DATA_DIR", str(root))
        patch.setenv("MTL_CONFIG", str(root / "mtl.yaml"))
        settings = load_settings()
        prepare_airflow(settings)
        engine = wh.make_engine(settings.resolved_warehouse_url)
        write_shop(engine, ShopSpec(users=2000, items=400, days=49, start=START, seed=5))
        engine.dispose()
        warehouse = Path(engine.url.database)
        states = run_dag_in_process(settings, HEALTHY_WEEK.isoformat())
        assert states["promote"] == "success", states
        _copy_sqlite(warehouse, root / "clean.db")
        yield {"settings": settings, "clean": root / "clean.db", "before": _registry(settings)}


def _copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite file in WAL mode (its -wal file may hold committed pages)."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    src.close()
    dst.close()


def _client(settings):
    from mtl_core.registry.store import configure

    return configure(settings.resolved_mlflow_tracking_uri)


def _registry(settings) -> dict[str, int | None]:
    from mtl_core.registry.aliases import current_alias

    client, name = _client(settings), settings.pipeline.model_name
    return {
        "champion": current_alias(client, name, "champion"),
        "versions": len(client.search_model_versions(f"name = '{name}'")),
    }


def _validation_xcom(since: datetime) -> dict | None:
    """The validate task's XCom ``validation`` (the validation summary) pushed after ``since``, or None."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        row = session.scalars(
            select(XComModel)
            .where(
                XComModel.dag_id == "mtl_retrain",
                XComModel.task_id == "validate",
                XComModel.key == "validation",
                XComModel.timestamp >= since,
            )
            .order_by(XComModel.timestamp.desc())
            .limit(1)
        ).first()
        return XComModel.deserialize_value(row) if row is not None else None


def _failure_line(failure: dict) -> str:
    from mtl_core.quality.report import failure_line

    return failure_line(failure).strip()


def _excerpt(text: str, width: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def test_the_healthy_newest_week_passes_validation(installation):
    """No false alarm: the same week, undamaged, passes every check that stops the damaged ones."""
    settings = installation["settings"].model_copy(update={"warehouse_url": f"sqlite:///{installation['clean']}"})
    snapshot = pipeline.extract(settings, BAD_WEEK)
    assert pipeline.validate(settings, snapshot) is snapshot


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_bad_batch_stops_before_training_and_names_table_and_column(installation, tmp_path, caplog, kind):
    settings = installation["settings"]
    stage, table, column, check, problem = EXPECTED[kind]
    warehouse = tmp_path / f"{kind}.db"
    _copy_sqlite(installation["clean"], warehouse)
    engine = wh.make_engine(f"sqlite:///{warehouse}")
    damage = corrupt_interval(engine, BAD_WEEK - timedelta(days=7), BAD_WEEK, kinds=(kind,))[kind]
    engine.dispose()
    assert damage["rows"] > 0, damage

    since = datetime.now(UTC)
    states = run_dag_in_process(
        settings, BAD_WEEK.isoformat(), {"settings": {"warehouse_url": f"sqlite:///{warehouse}"}}
    )
    log = caplog.text  # the on-call message of a failed task is logged at ERROR

    # Stopped where expected; nothing after it ran, nothing was trained or registered, the champion stays.
    if stage == "validate":
        assert states["extract"] == "success" and states["validate"] == "failed", states
    else:
        assert states["extract"] == "failed" and states["validate"] == "upstream_failed", states
    assert all(states[task] == "upstream_failed" for task in AFTER_VALIDATE), states
    assert _registry(settings) == installation["before"]
    assert len(list((settings.data_dir / "runs").glob("*/challenger"))) == 1  # the healthy run's only

    # The message names table, column and problem, on one line.
    if stage == "validate":
        summary = _validation_xcom(since)
        assert summary is not None and summary["success"] is False
        failures = summary["failures"]
        caught = [f for f in failures if (f["table"], f["column"], f["expectation"]) == (table, column, check)]
        assert caught, [_failure_line(f) for f in failures]
        line = _failure_line(caught[0])
        assert line.startswith(f"- {table} | column {column} | {check} | ") and problem in line, line
        assert "task validate failed." in log and f"- {table} | column {column} | {check} | " in log  # on-call
        others = sorted({f["expectation"] for f in failures} - {check})
        samples, details = line.split(" | ", 5)[4:]
        # A row-level expectation says "N of M rows unexpected": its samples tell the problem; a check's note does.
        excerpt = f"{samples} | {details}" if "rows unexpected" in details else details
    else:
        message = re.search(r"Reason: (cannot extract .*?)\nChampion: unchanged", log, re.DOTALL)
        assert message, log[-3000:]
        line = next(li.strip() for li in message.group(1).splitlines() if li.strip().startswith(f"- {table} |"))
        assert line.startswith(f"- {table} | column {column} | ") and problem in line, line
        others = []
        excerpt = line.split(" | ", 2)[2]
    OUTCOMES[kind] = {
        "stopped at": stage,
        "table.column": f"{table}.{column}" if "," not in column else f"{table}.({column.split(',')[0]},...)",
        "check": check + (f" (+ {', '.join(others)})" if others else ""),
        "message": _excerpt(excerpt),
    }


@pytest.fixture(scope="module", autouse=True)
def print_the_catalogue(request):
    """After the module, print the catalogue of the kinds that ran (all of them when the module runs whole)."""
    yield
    if not OUTCOMES:
        return
    columns = ("kind", "stopped at", "table.column", "check", "message")
    rows = [{"kind": kind, **outcome} for kind, outcome in OUTCOMES.items()]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = [" | ".join(c.ljust(widths[c]) for c in columns), "-+-".join("-" * widths[c] for c in columns)]
    lines += [" | ".join(r[c].ljust(widths[c]) for c in columns) for r in rows]
    plugins = request.config.pluginmanager
    with plugins.get_plugin("capturemanager").global_and_fixture_disabled():  # as capsys.disabled(), module-wide
        reporter = plugins.get_plugin("terminalreporter")
        reporter.write_line("\n\nBad-data catalogue: each kind's run stopped before training, champion unchanged\n")
        for line in lines:
            reporter.write_line(line)
