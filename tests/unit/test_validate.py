"""Snapshot validation: clean data passes, each kind of corruption fails with the right expectation named,
volume is judged against the previous snapshot, results land beside the snapshot, broken suites are refused.

One small simulated shop (two weeks) serves every test; a corruption damages week 2 of a fresh copy of the
same shop, so the clean week 1 snapshot is a fair "previous run" for all of them.
"""

from __future__ import annotations

import json
import pickle
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from support import PSEUDONYMS

from mtl_core import quality as validate
from mtl_core.data import extract as ingest
from mtl_core.data import shop as simulate
from mtl_core.data import warehouse as wh
from mtl_core.data.corruption import corrupt_interval
from mtl_core.data.import_logs import import_logs
from mtl_core.errors import MtlError

SPEC = simulate.ShopSpec(users=300, items=120, days=14)
WEEK1 = ("2026-01-05", "2026-01-12")
WEEK2 = ("2026-01-12", "2026-01-19")


def make_shop(path: Path):
    engine = wh.make_engine(f"sqlite:///{path}")
    simulate.write_shop(engine, SPEC)
    return engine


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> dict[str, Path]:
    """The clean warehouse and its two weekly snapshots."""
    base = tmp_path_factory.mktemp("validate_shop")
    engine = make_shop(base / "clean.db")
    ingest.extract_snapshot(engine, *WEEK1, base / "week1", pseudonyms=PSEUDONYMS)
    ingest.extract_snapshot(engine, *WEEK2, base / "week2", pseudonyms=PSEUDONYMS)
    engine.dispose()
    return {"base": base, "week1": base / "week1", "week2": base / "week2"}


def corrupted_snapshot(tmp_path: Path, kind: str, interval: tuple[str, str] = WEEK2) -> tuple[Path, dict]:
    engine = make_shop(tmp_path / f"{kind}.db")
    done = corrupt_interval(engine, *interval, kinds=(kind,), seed=1)
    out = ingest.extract_snapshot(engine, *interval, tmp_path / f"snapshot_{kind}", pseudonyms=PSEUDONYMS)
    engine.dispose()
    assert out["tables"]
    return tmp_path / f"snapshot_{kind}", done


def failing(report: validate.ValidationReport) -> set[tuple[str, str | None, str]]:
    return {(f["table"], f["column"], f["expectation"]) for f in report.failures}


# ---- clean data -------------------------------------------------------------------------------------------
def test_clean_snapshot_passes_and_writes_results_beside_it(shop):
    summary = validate.run_validation(shop["week1"])

    assert summary["success"] is True
    assert summary["failures"] == []
    assert set(summary["tables"]) == set(wh.SOURCE_TABLES)
    assert all(info["failed"] == 0 and info["evaluated"] > 5 for info in summary["tables"].values())
    assert any("no previous snapshot" in note for note in summary["notes"])
    out = shop["week1"] / "validation"
    result = json.loads((out / "result.json").read_text())
    assert result["summary"]["success"] is True
    assert set(result["gx_results"]) == set(wh.SOURCE_TABLES)
    assert all(r["success"] and r["results"] for r in result["gx_results"].values())
    # The suite parameters arrive substituted in the GX results.
    ts_check = next(
        r
        for r in result["gx_results"]["behavior_events"]["results"]
        if r["expectation_config"]["type"] == "expect_column_values_to_be_between"
        and r["expectation_config"]["kwargs"]["column"] == "ts"
    )
    assert ts_check["expectation_config"]["kwargs"]["min_value"].startswith("2026-01-05T00:00:00")
    assert (out / "data_docs" / "index.html").is_file()
    assert "PASSED" in (out / "report.html").read_text()
    assert summary["data_docs_path"] == str(out / "data_docs" / "index.html")
    # Written through a temporary directory that is gone afterwards.
    assert not [p for p in shop["week1"].iterdir() if p.name.startswith(".validation")]


def test_normal_next_week_passes_against_previous(shop):
    report = validate.validate_snapshot(shop["week2"], shop["week1"])

    assert report.success, validate.failure_message(report)
    volume = report.tables["behavior_events"]["volume"]
    assert volume["min_rows"] < volume["rows"] < volume["max_rows"]
    assert volume["previous_rows"] > 0
    text = validate.validate_command_output(report)
    assert "verdict   PASSED" in text
    assert "rows allowed" in text
    assert "ok    label rate ctr" in text


def test_validating_again_replaces_the_previous_results(shop):
    first = validate.validate_snapshot(shop["week2"], data_docs=False)
    second = validate.validate_snapshot(shop["week2"], shop["week1"], data_docs=False)

    saved = json.loads((shop["week2"] / "validation" / "result.json").read_text())
    assert first.result_path == second.result_path
    assert saved["summary"]["previous_snapshot"] == str(shop["week1"])
    assert not (shop["week2"] / "validation" / "data_docs").exists()


# ---- corruption -------------------------------------------------------------------------------------------
CASES = {
    # kind: (table, column, expectation, a sample value that must be reported or None)
    "null_ids": ("behavior_events", "user_id", "expect_column_values_to_not_be_null", None),
    "bad_event_types": ("behavior_events", "event_type", "expect_column_values_to_be_in_set", "clik"),
    "negative_prices": ("items", "price", "expect_column_values_to_be_between", None),
    "duplicate_events": (
        "behavior_events",
        "user_id,item_id,event_type,ts,session_id,parent_event_id,position",
        "expect_compound_columns_to_be_unique",
        None,
    ),
    "volume_collapse": ("behavior_events", None, "expect_table_row_count_to_be_between", None),
    "bad_titles": ("items", "title", "expect_column_value_lengths_to_be_between", ""),
    "label_leak": ("behavior_events", "position", "expect_no_label_leakage", 1),
    "lost_clicks": ("behavior_events", "event_type", "expect_label_rate_to_be_between", None),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_each_corruption_fails_with_the_right_expectation(shop, tmp_path, kind):
    snapshot, done = corrupted_snapshot(tmp_path, kind)
    table, column, expectation, sample = CASES[kind]
    assert done[kind]["rows"] > 0

    with pytest.raises(validate.ValidationFailed) as caught:
        validate.run_validation(snapshot, shop["week1"])

    report = caught.value.report
    assert not report.success
    assert (table, column, expectation) in failing(report), validate.failure_message(report)
    failure = next(
        f for f in report.failures if (f["table"], f["column"], f["expectation"]) == (table, column, expectation)
    )
    if sample is not None:
        assert sample in failure["sample_values"]
    # The message alone names table, column and expectation on one line.
    message = str(caught.value)
    where = f"  - {table} | column {column or '(table)'} | {expectation} | unexpected "
    line = next(line for line in message.splitlines() if line.startswith(where))
    assert "| samples [" in line
    assert caught.value.summary["success"] is False
    assert (snapshot / "validation" / "result.json").is_file()


def test_message_lists_every_failure_on_its_own_line(shop, tmp_path):
    engine = make_shop(tmp_path / "wh.db")
    corrupt_interval(engine, *WEEK2, kinds=("bad_event_types", "negative_prices", "null_ids"))
    ingest.extract_snapshot(engine, *WEEK2, tmp_path / "snap", pseudonyms=PSEUDONYMS)

    with pytest.raises(validate.ValidationFailed) as caught:
        validate.run_validation(tmp_path / "snap", shop["week1"])

    lines = str(caught.value).splitlines()
    assert "failed validation: 3 failing expectation(s)" in lines[0]
    assert str(tmp_path / "snap" / "validation" / "result.json") in lines[0]
    assert len(lines) == 4
    # Tables in suite order (users, items, behavior_events, ad_events), then the order of each suite.
    starts = [
        "  - items | column price | expect_column_values_to_be_between | unexpected 22 | samples [-",
        "  - behavior_events | column user_id | expect_column_values_to_not_be_null | unexpected ",
        "  - behavior_events | column event_type | expect_column_values_to_be_in_set | unexpected ",
    ]
    assert [line[: len(start)] for line, start in zip(lines[1:], starts, strict=True)] == starts
    assert all(" | samples [" in line and " rows unexpected" in line for line in lines[1:])
    assert "; expected value_set=['impression', 'click', 'add_to_cart', 'purchase', 'favorite']" in lines[3]


def test_volume_explosion_against_a_collapsed_previous_week_fails(shop, tmp_path):
    collapsed_week1, _ = corrupted_snapshot(tmp_path, "volume_collapse", WEEK1)

    report = validate.validate_snapshot(shop["week2"], collapsed_week1, data_docs=False)

    assert ("behavior_events", None, "expect_table_row_count_to_be_between") in failing(report)
    failure = next(f for f in report.failures if f["expectation"] == "expect_table_row_count_to_be_between")
    assert "previous snapshot" in failure["details"]
    assert failure["sample_values"][0] > report.tables["behavior_events"]["volume"]["max_rows"]


def test_without_previous_snapshot_only_the_minimum_row_count_applies(tmp_path):
    snapshot, _ = corrupted_snapshot(tmp_path, "volume_collapse")

    report = validate.validate_snapshot(snapshot, data_docs=False)

    assert report.success, validate.failure_message(report)
    assert report.tables["behavior_events"]["volume"]["max_rows"] is None
    assert report.tables["behavior_events"]["volume"]["min_rows"] == 100


def test_events_outside_the_interval_and_items_from_the_future_fail(shop, tmp_path):
    """Extraction bugs (a time zone shift) cannot come from the warehouse: damage the Parquet directly."""
    snapshot = tmp_path / "shifted"
    ingest.copy_snapshot(shop["week2"], snapshot)  # its own copy of the days: the shared ones stay as they are
    for path in ingest.table_files(snapshot, "behavior_events"):
        events = pq.read_table(path)
        shifted = pc.add(events["ts"], pa.scalar(pd.Timedelta(hours=8).to_pytimedelta(), pa.duration("us")))
        pq.write_table(events.set_column(events.schema.get_field_index("ts"), "ts", shifted), path)
    items = pq.read_table(snapshot / "items.parquet")
    created = items["created_ts"].to_pylist()
    created[0] = datetime(2026, 3, 1, tzinfo=UTC)
    items = items.set_column(
        items.schema.get_field_index("created_ts"), "created_ts", pa.array(created, pa.timestamp("us", tz="UTC"))
    )
    pq.write_table(items, snapshot / "items.parquet")

    report = validate.validate_snapshot(snapshot, data_docs=False)

    assert ("behavior_events", "ts", "expect_column_values_to_be_between") in failing(report)
    assert ("items", "created_ts", "expect_column_values_to_be_between") in failing(report)
    late = next(f for f in report.failures if f["column"] == "created_ts")
    assert late["unexpected_count"] == 1
    assert late["sample_values"][0].startswith("2026-03-01")


def test_a_wrong_column_set_and_type_are_reported_not_raised(shop, tmp_path):
    snapshot = tmp_path / "schema"
    ingest.copy_snapshot(shop["week2"], snapshot)
    users = pq.read_table(snapshot / "users.parquet").drop_columns(["age_band"])
    users = users.set_column(0, "user_id", pc.cast(users["user_id"], pa.float64()))
    pq.write_table(users.append_column("clicked", pa.array(np.zeros(users.num_rows))), snapshot / "users.parquet")

    report = validate.validate_snapshot(snapshot, data_docs=False)

    assert ("users", None, "expect_table_columns_to_match_set") in failing(report)
    assert ("users", "user_id", "expect_column_type_to_be") in failing(report)
    columns = next(f for f in report.failures if f["expectation"] == "expect_table_columns_to_match_set")
    assert "missing ['age_band']" in columns["details"] and "unexpected ['clicked']" in columns["details"]
    missing = next(f for f in report.failures if f["column"] == "age_band")
    assert "does not exist" in missing["details"]


def test_a_table_too_broken_for_the_snapshot_checks_fails_them_instead_of_crashing(shop, tmp_path):
    snapshot = tmp_path / "no_parents"
    ingest.copy_snapshot(shop["week2"], snapshot)
    for path in ingest.table_files(snapshot, "behavior_events"):
        pq.write_table(pq.read_table(path).drop_columns(["parent_event_id"]), path)

    with pytest.raises(validate.ValidationFailed) as caught:
        validate.run_validation(snapshot)

    assert ("(snapshot)", None, "check_leakage") in failing(caught.value.report)
    assert "KeyError: 'parent_event_id'" in str(caught.value)
    # The exception survives a pickle round trip (worker processes, Airflow), report included.
    copy = pickle.loads(pickle.dumps(caught.value))
    assert str(copy) == str(caught.value)
    assert copy.report.failures == caught.value.report.failures


# ---- imported logs ----------------------------------------------------------------------------------------
def test_imported_logs_without_impressions_pass_with_skipped_label_rates(tmp_path):
    rng = np.random.default_rng(3)
    n = 600
    start = int(datetime(2026, 1, 5, tzinfo=UTC).timestamp())
    kinds = rng.choice(["pv", "cart", "fav", "buy"], size=n, p=[0.85, 0.06, 0.04, 0.05])
    users, items, seconds = rng.integers(1, 80, n), rng.integers(1000, 1200, n), rng.integers(0, 7 * 86_400, n)
    lines = [f"{u},{i},{i % 9},{kind},{start + s}" for u, i, kind, s in zip(users, items, kinds, seconds, strict=True)]
    (tmp_path / "taobao.csv").write_text("\n".join(lines) + "\n")
    engine = wh.make_engine(f"sqlite:///{tmp_path / 'wh.db'}")
    assert not import_logs(tmp_path / "taobao.csv", "taobao", engine).aborted
    ingest.extract_snapshot(engine, *WEEK1, tmp_path / "snap", pseudonyms=PSEUDONYMS)

    report = validate.validate_snapshot(tmp_path / "snap")

    assert report.success, validate.failure_message(report)
    rates = {c["name"]: c for c in report.checks if c["check"] == "expect_label_rate_to_be_between"}
    assert rates["ctr"]["skipped"] and "no impression events" in rates["ctr"]["note"]
    assert rates["ad_ctr"]["skipped"] and "no ad_impression events" in rates["ad_ctr"]["note"]
    assert not rates["cvr"]["skipped"] and rates["cvr"]["success"]
    leaks = [c for c in report.checks if c["check"] == "expect_no_label_leakage"]
    assert all(c["skipped"] for c in leaks)
    assert any("ctr" in note and "skipped" in note for note in report.notes)
    assert "skip  label rate ctr" in validate.validate_command_output(report)


# ---- the whole-snapshot checks as functions ---------------------------------------------------------------
def test_label_rates_are_judged_by_their_sample_size():
    def frames(counts: dict[str, int]) -> dict[str, pd.DataFrame]:
        types = [t for t, c in counts.items() for _ in range(c)]
        events = pd.DataFrame({"event_type": pd.Series(types, dtype="str")})
        return {"behavior_events": events, "ad_events": pd.DataFrame({"event_type": pd.Series([], dtype="str")})}

    few = {c["name"]: c for c in validate.check_label_rates(frames({"impression": 400, "click": 20}))}
    many = {c["name"]: c for c in validate.check_label_rates(frames({"impression": 100_000, "click": 20}))}

    assert few["cvr"]["success"] and "too few" in few["cvr"]["note"]  # 0 purchases of 20 clicks: cannot tell
    assert few["ctr"]["success"]
    assert not many["ctr"]["success"]  # 0.02 % of 100k impressions is far below 0.2 %
    assert many["ad_ctr"]["skipped"]


def test_leakage_check_flags_outcome_columns_and_spares_honest_ones():
    rng = np.random.default_rng(0)
    n = 2_000
    clicked = rng.random(n) < 0.05
    impressions = pd.DataFrame(
        {
            "event_id": pd.array(np.arange(1, n + 1), dtype="Int64"),
            "event_type": "impression",
            "parent_event_id": pd.array([None] * n, dtype="Int64"),
            "position": pd.array(rng.integers(0, 20, n), dtype="Int64"),
            "dwell_ms": pd.array(np.where(clicked, rng.integers(100, 9000, n), None), dtype="Int64"),
            "status": np.where(clicked, "engaged", rng.choice(["seen", "skipped"], n)),
            "ts": pd.date_range("2026-01-05", periods=n, freq="min", tz="UTC"),
        }
    )
    clicks = pd.DataFrame(
        {
            "event_id": pd.array(np.arange(n + 1, n + 1 + clicked.sum()), dtype="Int64"),
            "event_type": "click",
            "parent_event_id": pd.array(np.flatnonzero(clicked) + 1, dtype="Int64"),
        }
    )
    behaviour = pd.concat([impressions, clicks], ignore_index=True)
    ads = pd.DataFrame(
        {
            "event_id": pd.array([], dtype="Int64"),
            "event_type": pd.Series([], dtype="str"),
            "parent_event_id": pd.array([], dtype="Int64"),
        }
    )

    feed = validate.check_leakage({"behavior_events": behaviour, "ad_events": ads})[0]

    assert not feed["success"]
    assert {leak["column"] for leak in feed["leaks"]} == {"dwell_ms", "status"}
    assert set(feed["columns_checked"]) == {"position", "dwell_ms", "status", "ts"}


# ---- refusing to run --------------------------------------------------------------------------------------
def broken_suites(tmp_path: Path, table: str, text: str | None) -> Path:
    suites = tmp_path / "expectations"
    shutil.copytree(validate.DEFAULT_EXPECTATIONS_DIR, suites)
    if text is None:
        (suites / f"{table}.json").unlink()
    else:
        (suites / f"{table}.json").write_text(text)
    return suites


def with_extra_expectation(entry: dict) -> str:
    suite = json.loads((validate.DEFAULT_EXPECTATIONS_DIR / "items.json").read_text())
    suite["expectations"].append(entry)
    return json.dumps(suite)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "no expectation suite for table items"),
        ('{"name": "items", "expectations": [', "is not valid JSON: Expecting"),
        ('["items"]', "is not a GX ExpectationSuite"),
        ('{"name": "users", "expectations": []}', "it must be named 'items'"),
        (
            with_extra_expectation({"type": "expect_column_values_to_be_postive", "kwargs": {"column": "price"}}),
            "expect_column_values_to_be_postive) is not valid",
        ),
        (
            with_extra_expectation({"type": "expect_column_values_to_be_between", "kwargs": {"colum": "price"}}),
            "expect_column_values_to_be_between) is not valid",
        ),
        (
            with_extra_expectation(
                {
                    "type": "expect_column_max_to_be_between",
                    "kwargs": {"column": "price", "max_value": {"$PARAMETER": "x"}},
                }
            ),
            "uses $PARAMETER x, which the runner does not provide",
        ),
    ],
    ids=["missing", "not-json", "not-a-suite", "wrong-name", "unknown-type", "bad-kwargs", "unknown-parameter"],
)
def test_a_broken_suite_is_a_clear_error(shop, tmp_path, text, message):
    suites = broken_suites(tmp_path, "items", text)

    with pytest.raises(MtlError) as caught:
        validate.validate_snapshot(shop["week1"], expectations_dir=suites)

    assert message in str(caught.value)
    assert str(suites / "items.json") in str(caught.value)
    assert not [p for p in shop["week1"].iterdir() if p.name.startswith(".validation.tmp")]


def test_a_directory_that_is_not_a_snapshot_is_a_clear_error(shop, tmp_path):
    with pytest.raises(MtlError, match="is not a snapshot: manifest.json is missing"):
        validate.run_validation(tmp_path)
    with pytest.raises(MtlError, match="is not a snapshot"):
        validate.run_validation(shop["week1"], tmp_path / "nowhere")
    partial = tmp_path / "partial"
    ingest.copy_snapshot(shop["week1"], partial)
    (partial / "items.parquet").unlink()
    with pytest.raises(MtlError, match="items.parquet is missing"):
        validate.run_validation(partial)
    (partial / "manifest.json").write_text("{")
    with pytest.raises(MtlError, match="manifest.json is not valid JSON"):
        validate.run_validation(partial)


def test_a_collapsed_newest_week_fails_though_the_whole_window_looks_normal(tmp_path):
    """The probe: 95 % of the newest week deleted passed, since volume bounds applied to the whole window."""
    from sqlalchemy import delete

    engine = wh.make_engine(f"sqlite:///{tmp_path / 'shop.db'}")
    simulate.write_shop(engine, simulate.ShopSpec(users=400, items=120, days=35, seed=3))
    interval = ("2026-01-05", "2026-02-09")
    ingest.extract_snapshot(engine, *interval, tmp_path / "healthy", pseudonyms=PSEUDONYMS)
    report = validate.validate_snapshot(tmp_path / "healthy", data_docs=False)
    assert report.success, validate.failure_message(report)
    week = [c for c in report.checks if c["check"] == "expect_newest_week_volume_like_history"]
    assert {c["table"] for c in week} == set(wh.EVENT_TABLES) and all(not c["skipped"] for c in week)

    newest = datetime(2026, 2, 2)
    with engine.begin() as conn:
        for table in (wh.behavior_events, wh.ad_events):
            ids = [
                row[0]
                for row in conn.execute(table.select().with_only_columns(table.c.event_id).where(table.c.ts >= newest))
            ]
            doomed = ids[: int(len(ids) * 0.95)]
            for start in range(0, len(doomed), 5000):
                conn.execute(delete(table).where(table.c.event_id.in_(doomed[start : start + 5000])))
    ingest.extract_snapshot(engine, *interval, tmp_path / "collapsed", pseudonyms=PSEUDONYMS)
    report = validate.validate_snapshot(tmp_path / "collapsed", data_docs=False)

    assert ("behavior_events", "ts", "expect_newest_week_volume_like_history") in failing(report)
    assert ("ad_events", "ts", "expect_newest_week_volume_like_history") in failing(report)
    detail = next(f for f in report.failures if f["expectation"] == "expect_newest_week_volume_like_history")
    assert "newest 7 days" in detail["details"] and "rows/day" in detail["details"]
