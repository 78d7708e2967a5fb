"""Drift: PSI against hand-computed values, the snapshot report on shops with and without drift, stop vs
warn, and the served-score monitor with its on-call message."""

from __future__ import annotations

import json
import math
from datetime import date

import numpy as np
import pandas as pd
import pytest
from support import PSEUDONYMS

from mtl_core.config import DriftSettings
from mtl_core.data import warehouse as wh
from mtl_core.data.extract import extract_snapshot, read_snapshot_table
from mtl_core.data.shop import DRIFT_CATEGORIES, ShopSpec, write_shop
from mtl_core.errors import MtlError
from mtl_core.quality.drift import (
    PSI_EPSILON,
    DriftDetected,
    DriftInputError,
    ScoresShifted,
    check_drift,
    check_scores,
    psi,
    psi_categorical,
    score_drift,
    snapshot_drift,
)

START, CUT, END = "2026-01-05", "2026-02-02", "2026-02-09"
# Many items, so that the items released in the newest week (when the new categories arrive) are a fair share
# of it, as in a real catalogue; 600 users keep the shop and its snapshot at about a second.
SPEC = ShopSpec(users=600, items=2000, days=35, start=date(2026, 1, 5), seed=7)
DRIFT_DAY = 28  # 2026-02-02: the first day of the newest week


def by_hand(reference: list[float], current: list[float]) -> float:
    return sum((c - r) * math.log(c / r) for r, c in zip(reference, current, strict=True))


# ---- PSI ------------------------------------------------------------------------------------------
def test_identical_distributions_give_zero():
    values = np.random.default_rng(0).normal(size=5_000)
    assert psi(values, values) == 0.0
    assert psi_categorical(["a", "b", "b", None], ["a", "b", "b", None]) == 0.0
    # Two samples of one distribution: sampling noise only.
    other = np.random.default_rng(1).normal(size=5_000)
    assert psi(values, other) < 0.01


def test_a_known_shift_gives_the_textbook_value():
    reference = np.arange(100) + 0.5  # quartiles at 25.25, 50 and 74.75: 25 values in each of 4 bins
    current = np.repeat([10.0, 30.0, 60.0, 90.0], [10, 20, 30, 40])
    expected = by_hand([0.25] * 4, [0.1, 0.2, 0.3, 0.4])
    assert expected == pytest.approx(0.228217, abs=1e-6)
    assert psi(reference, current, bins=4) == pytest.approx(expected, rel=1e-12)


def test_outer_bins_are_open_ended_and_ties_keep_one_bin_per_value():
    reference = np.arange(100.0)
    # Far beyond the reference's range on both sides, half and half: the outer bins take them.
    assert psi(reference, np.repeat([-1e6, 1e6], 50), bins=2) == 0.0
    # Two distinct values and ten bins: coinciding quantiles merge, each value keeps its own bin.
    ties = psi(np.repeat([1.0, 2.0], 50), np.repeat([1.0, 2.0], [80, 20]), bins=10)
    assert ties == pytest.approx(by_hand([0.5, 0.5], [0.8, 0.2]))


def test_categories_only_one_side_has_count_with_the_epsilon():
    reference = ["a"] * 50 + ["b"] * 50
    current = ["a"] * 50 + ["b"] * 25 + ["c"] * 25
    assert psi_categorical(reference, current) == pytest.approx(by_hand([0.5, 0.5, PSI_EPSILON], [0.5, 0.25, 0.25]))
    # A category that disappears counts as well.
    assert psi_categorical(current, reference) == pytest.approx(by_hand([0.5, 0.25, 0.25], [0.5, 0.5, PSI_EPSILON]))


def test_nan_is_a_bin_of_its_own():
    values = np.arange(50) + 0.5
    reference = np.concatenate([values, np.full(50, np.nan)])  # two bins of 25 % and NaN 50 %
    current = np.concatenate([values, np.full(150, np.nan)])  # 12.5 %, 12.5 % and NaN 75 %
    assert psi(reference, current, bins=2) == pytest.approx(by_hand([0.25, 0.25, 0.5], [0.125, 0.125, 0.75]))
    # NaN only in the current: the reference's NaN bin is empty and counts with the epsilon.
    assert psi(values, np.append(values, np.nan), bins=2) == pytest.approx(
        by_hand([0.5, 0.5, PSI_EPSILON], [25 / 51, 25 / 51, 1 / 51])
    )
    # The same missing share on both sides is no drift.
    assert psi(reference, reference, bins=2) == 0.0
    assert psi_categorical(["a", None, np.nan], ["a", None, None]) == 0.0


def test_what_psi_cannot_compare_is_a_clear_error():
    with pytest.raises(DriftInputError, match="current side has none"):
        psi([1.0, 2.0], [])
    with pytest.raises(DriftInputError, match="reference side has none"):
        psi_categorical([], ["a"])
    with pytest.raises(DriftInputError, match="at least 2 bins"):
        psi([1.0], [1.0], bins=1)
    assert issubclass(DriftInputError, MtlError)


# ---- the snapshot report --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shops(tmp_path_factory):
    """The same shop without and with drift from the first day of the newest week, a snapshot of each, and
    one of the drifting shop whose window runs a week past the shop's last day (an empty newest week)."""
    root = tmp_path_factory.mktemp("drift_shops")
    snaps = {}
    for name, drift_day in (("steady", None), ("drift", DRIFT_DAY)):
        engine = wh.make_engine(f"sqlite:///{root / name}.db")
        write_shop(engine, ShopSpec(**{**SPEC.__dict__, "drift_day": drift_day}))
        extract_snapshot(engine, START, END, root / name, pseudonyms=PSEUDONYMS)
        snaps[name] = root / name
    extract_snapshot(engine, START, "2026-02-16", root / "late", pseudonyms=PSEUDONYMS)
    snaps["late"] = root / "late"
    return snaps


@pytest.fixture(scope="module")
def reports(shops):
    return {name: snapshot_drift(shops[name], DriftSettings()) for name in ("steady", "drift")}


FEATURES = {
    "impression_price": ("numeric", "items"),
    "impression_position": ("numeric", "behavior_events"),
    "impression_hour": ("categorical", "behavior_events"),
    "impression_weekday": ("categorical", "behavior_events"),
    "impression_category": ("categorical", "items"),
    "click_category": ("categorical", "items"),
    "user_region": ("categorical", "users"),
    "user_age_band": ("categorical", "users"),
    "events_per_user_day": ("numeric", "behavior_events, ad_events"),
    "event_type": ("categorical", "behavior_events"),
    "ad_event_type": ("categorical", "ad_events"),
}


def test_the_report_has_the_shape_the_reviewer_page_renders(reports):
    report = reports["steady"]
    assert json.loads(json.dumps(report)) == report  # plain JSON, no NumPy values
    assert set(report) == {"reference", "current", "threshold", "action", "features", "labels", "drifted", "max_psi"}
    assert report["reference"]["start"] == f"{START}T00:00:00Z" and report["reference"]["end"] == f"{CUT}T00:00:00Z"
    assert report["current"]["start"] == f"{CUT}T00:00:00Z" and report["current"]["end"] == f"{END}T00:00:00Z"
    assert (report["threshold"], report["action"]) == (0.2, "warn")
    assert {f["name"]: (f["kind"], f["table"]) for f in report["features"]} == FEATURES
    for feature in report["features"]:
        assert set(feature) == {"name", "kind", "table", "psi", "drifted"}
        assert feature["psi"] >= 0 and feature["drifted"] == (feature["psi"] > report["threshold"])
    assert report["drifted"] == [f["name"] for f in report["features"] if f["drifted"]]
    assert report["max_psi"] == max(f["psi"] for f in report["features"])
    assert [label["name"] for label in report["labels"]] == [
        "click_rate",
        "purchase_per_click",
        "ad_click_rate",
        "inactive_user_share",
    ]


def test_rows_and_label_rates_are_those_of_the_two_periods(shops, reports):
    """Counted again here with pandas, the plain way, from the snapshot's tables."""
    frames = {
        table: read_snapshot_table(shops["steady"], table, ["user_id", "event_type", "ts"]).to_pandas()
        for table in ("behavior_events", "ad_events")
    }
    cut, end = pd.Timestamp(CUT, tz="UTC"), pd.Timestamp(END, tz="UTC")
    report = reports["steady"]
    newest = {table: frame["ts"] >= cut for table, frame in frames.items()}
    assert report["current"]["rows"] == sum(int(n.sum()) for n in newest.values())
    assert report["reference"]["rows"] == sum(int((~n).sum()) for n in newest.values())

    def ratio(table, current, num, den):
        frame = frames[table]
        kinds = frame.loc[newest[table] == current, "event_type"].value_counts()
        return kinds[num] / kinds[den]

    week = pd.Timedelta(days=7)
    activity = pd.concat(frames.values())

    def inactive(start):
        before = set(activity.loc[(activity["ts"] >= start - week) & (activity["ts"] < start), "user_id"])
        during = set(activity.loc[(activity["ts"] >= start) & (activity["ts"] < start + week), "user_id"])
        return len(before - during) / len(before)

    expected = {
        "click_rate": [ratio("behavior_events", side, "click", "impression") for side in (False, True)],
        "purchase_per_click": [ratio("behavior_events", side, "purchase", "click") for side in (False, True)],
        "ad_click_rate": [ratio("ad_events", side, "ad_click", "ad_impression") for side in (False, True)],
        "inactive_user_share": [inactive(cut - week), inactive(cut)],
    }
    assert end - cut == week
    for label in report["labels"]:
        ref, cur = expected[label["name"]]
        assert label["reference"] == pytest.approx(ref, abs=1e-6)
        assert label["current"] == pytest.approx(cur, abs=1e-6)
        assert label["change"] == pytest.approx(cur - ref, abs=2e-6)


def test_a_drift_in_the_newest_week_shows_where_the_shop_changed(reports):
    """From the drift day the shop releases items of two new categories and users' tastes are partly redrawn:
    the categories shown and, more still, the categories clicked move. How items are laid out in a feed does
    not change, and neither does who the users are."""
    steady = {f["name"]: f["psi"] for f in reports["steady"]["features"]}
    drift = {f["name"]: f["psi"] for f in reports["drift"]["features"]}
    assert reports["steady"]["drifted"] == []
    assert {"impression_category", "click_category"} <= set(reports["drift"]["drifted"])
    for name in ("impression_category", "click_category"):
        assert drift[name] > 0.5 and drift[name] > 5 * steady[name], name
    for name in ("impression_position", "user_region", "user_age_band", "event_type"):
        assert drift[name] < 0.1 and steady[name] < 0.1, name
    assert reports["drift"]["max_psi"] == max(drift.values())
    assert len(DRIFT_CATEGORIES) == 2  # what the unseen categories above are


def test_a_window_too_short_or_an_empty_newest_week_is_skipped_not_an_error(shops):
    settings = DriftSettings()
    too_short = snapshot_drift(shops["steady"], settings, newest_days=35)
    assert "needs the newest 35 days plus at least one day" in too_short["skipped"]
    assert (too_short["features"], too_short["drifted"], too_short["max_psi"]) == ([], [], 0.0)
    one_day_before = snapshot_drift(shops["steady"], settings, newest_days=34)
    assert "skipped" not in one_day_before and one_day_before["reference"]["rows"] > 0
    late = snapshot_drift(shops["late"], settings)
    assert late["skipped"] == "no feed impressions in the newest 7 days"
    assert late["current"]["rows"] == 0
    check_drift(late, DriftSettings(on_drift="stop"))  # nothing to judge: no stop


def test_stop_raises_naming_the_drifted_features_and_warn_does_not(reports):
    drift = reports["drift"]
    assert check_drift(drift, DriftSettings()) is None  # warn, the default
    with pytest.raises(DriftDetected) as caught:
        check_drift(drift, DriftSettings(on_drift="stop"))
    message = str(caught.value)
    assert "\n" not in message
    category = next(f for f in drift["features"] if f["name"] == "impression_category")
    assert f"impression_category (items) PSI {category['psi']:.3f}" in message
    assert f"{CUT}T00:00:00Z..{END}T00:00:00Z" in message
    assert "above drift.psi_threshold 0.2" in message
    assert "MTL_DRIFT__ON_DRIFT=warn" in message and "MTL_DRIFT__PSI_THRESHOLD" in message
    assert "impression_position" not in message  # only what drifted
    # Judged against the settings given: a raised threshold lets the run go on with the same report.
    check_drift(drift, DriftSettings(on_drift="stop", psi_threshold=max(5.0, drift["max_psi"])))
    check_drift(reports["steady"], DriftSettings(on_drift="stop"))


# ---- served scores --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def holdout():
    rng = np.random.default_rng(3)
    return {"ctr": rng.beta(2, 40, 4_000), "cvr": rng.beta(2, 20, 4_000), "ad_ctr": rng.beta(2, 60, 4_000)}


def test_score_drift_waits_for_enough_scores_then_judges_each_task(holdout):
    rng = np.random.default_rng(4)
    settings = DriftSettings(min_served=500)
    served = {
        "ctr": rng.beta(2, 40, 2_000),  # as on the holdout
        "cvr": rng.beta(6, 20, 2_000),  # shifted up: a broken feature, other traffic
        "ad_ctr": rng.beta(2, 60, 499),  # one short of min_served
    }
    report = score_drift(holdout, served, settings)
    assert json.loads(json.dumps(report)) == report
    tasks = {t["task"]: t for t in report["tasks"]}
    assert tasks["ctr"]["status"] == "ok" and tasks["ctr"]["psi"] < 0.05
    assert tasks["cvr"]["status"] == "shifted" and tasks["cvr"]["psi"] > 0.5
    assert tasks["ad_ctr"] == {"task": "ad_ctr", "reference": 4_000, "served": 499, "psi": None, "status": "waiting"}
    assert report["shifted"] == ["cvr"] and report["status"] == "shifted"
    assert (report["threshold"], report["min_served"]) == (0.2, 500)

    quiet = score_drift(holdout, {"ctr": served["ctr"]}, settings)
    assert [t["status"] for t in quiet["tasks"]] == ["ok", "waiting", "waiting"]
    assert quiet["status"] == "waiting" and quiet["shifted"] == []
    everything = score_drift(holdout, {task: rng.permutation(v)[:1_000] for task, v in holdout.items()}, settings)
    assert everything["status"] == "ok"


def test_scores_of_a_task_the_holdout_lacks_are_a_clear_error(holdout):
    with pytest.raises(DriftInputError, match="served scores of task churn have no holdout scores"):
        score_drift(holdout, {"churn": np.full(600, 0.3)}, DriftSettings())


def test_the_on_call_message_says_what_shifted_what_it_may_mean_and_what_to_do(holdout):
    rng = np.random.default_rng(5)
    served = {"ctr": rng.beta(6, 40, 1_234), "cvr": rng.beta(2, 20, 1_000)}
    report = score_drift(holdout, served, DriftSettings(min_served=500))
    check_scores(score_drift(holdout, {"ctr": holdout["ctr"]}, DriftSettings()), "mtl-recommender", 7)
    with pytest.raises(ScoresShifted) as caught:
        check_scores(report, "mtl-recommender", 7)
    message = str(caught.value)
    ctr = report["tasks"][0]
    assert "\n" not in message
    assert "mtl-recommender v7" in message
    assert f"ctr PSI {ctr['psi']:.3f} over 1,234 served scores" in message
    assert "cvr" not in message.split("(threshold")[0]  # only the shifted task is named
    assert "drift.score_psi_threshold 0.2" in message
    for meaning in ("traffic drifted", "broken feature publish", "a client sending other traffic"):
        assert meaning in message
    for step in ("/metrics", "mtl status", "mtl publish", "mtl rollback"):
        assert step in message
    assert message.endswith("Runbook: docs/RUNBOOK.md#served-scores-shifted")
