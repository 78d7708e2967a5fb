"""Examples per task: sample spaces, label masks, no leakage from the future, unseen ids."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest
from support import PSEUDONYMS

from mtl_core.config import FeatureSettings, TaskSpec, load_settings
from mtl_core.data import warehouse as wh
from mtl_core.data.extract import extract_snapshot, read_snapshot_table
from mtl_core.data.shop import ShopSpec, write_shop
from mtl_core.learn.examples import NUMERIC, FeatureError, FeatureSpace, Vocab, build_examples, split_summary

TASKS = load_settings(environ={}).tasks
FEATURES = FeatureSettings(history_days=3, valid_days=3, holdout_days=4, churn_cutoff_step_days=2)


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    root = tmp_path_factory.mktemp("shop")
    engine = wh.make_engine(f"sqlite:///{root / 'warehouse.db'}")
    write_shop(engine, ShopSpec(users=500, items=150, days=35, start=date(2026, 1, 5), seed=4))
    extract_snapshot(engine, "2026-01-05", "2026-02-09", root / "full", pseudonyms=PSEUDONYMS)
    extract_snapshot(engine, "2026-01-05", "2026-01-30", root / "early", pseudonyms=PSEUDONYMS)
    return root


@pytest.fixture(scope="module")
def examples(shop):
    return build_examples(shop / "full", FEATURES, TASKS)


def test_each_task_has_its_own_sample_space_and_mask(examples):
    space = examples.raw["space"]
    defined = ~np.isnan(examples.labels)
    t = {name: i for i, name in enumerate(examples.task_names)}
    assert set(space[defined[:, t["ctr"]]]) == {"feed"}
    assert set(space[defined[:, t["ad_ctr"]]]) == {"ads"}
    assert set(space[defined[:, t["churn"]]]) == {"users"}
    # cvr is defined exactly on clicked impressions
    clicked = defined[:, t["ctr"]] & (examples.labels[:, t["ctr"]] == 1)
    np.testing.assert_array_equal(defined[:, t["cvr"]], clicked)
    assert examples.numeric.shape == (len(examples), len(NUMERIC)) and examples.labels.shape == (len(examples), 4)
    counts = split_summary(examples)
    assert all(counts[name][split] > 0 for name in counts for split in ("train", "valid", "holdout")), counts


def test_splits_follow_the_time_the_label_is_known(examples):
    end = examples.interval[1]
    holdout_start = end - np.timedelta64(FEATURES.holdout_days, "D")
    feed = examples.raw["space"] == "feed"
    assert (examples.time[feed & (examples.split == "holdout")] >= holdout_start).all()
    assert (examples.time[feed & (examples.split == "train")] < holdout_start - np.timedelta64(3, "D")).all()
    churn_train = (examples.raw["space"] == "users") & (examples.split == "train")
    # a training churn label window ends before validation starts
    label_end = examples.time[churn_train] + np.timedelta64(FEATURES.churn_horizon_days, "D")
    assert (label_end < holdout_start - np.timedelta64(FEATURES.valid_days, "D")).all()


def test_history_features_use_only_earlier_events(shop, examples):
    """Cutting the future off the snapshot must not change any feature of an earlier example."""
    early = build_examples(shop / "early", FEATURES, TASKS)
    cut = early.interval[1]
    for space in ("feed", "ads"):
        full_rows = np.flatnonzero((examples.raw["space"] == space) & (examples.time < cut))
        early_rows = np.flatnonzero(early.raw["space"] == space)
        a = pd.DataFrame(examples.numeric[full_rows], index=examples.event_id[full_rows])
        b = pd.DataFrame(early.numeric[early_rows], index=early.event_id[early_rows])
        b = b.loc[a.index.intersection(b.index)]
        assert len(b) > 1000
        pd.testing.assert_frame_equal(a.loc[b.index], b, check_exact=False, rtol=1e-5)


def test_history_counts_match_a_brute_force_count(shop, examples):
    events = read_snapshot_table(shop / "full", "behavior_events").to_pandas()
    events["ts"] = events["ts"].dt.tz_convert(None)
    rng = np.random.default_rng(0)
    rows = rng.choice(np.flatnonzero(examples.raw["space"] == "feed"), 25, replace=False)
    clicks_col, impressions_col = NUMERIC.index("user_clicks"), NUMERIC.index("item_impressions")
    for row in rows:
        at = pd.Timestamp(examples.time[row]).floor("s")
        before = events[events["ts"].dt.floor("s") < at]
        user_clicks = ((before["user_id"] == examples.raw["user"][row]) & (before["event_type"] == "click")).sum()
        item_impr = ((before["item_id"] == examples.raw["item"][row]) & (before["event_type"] == "impression")).sum()
        assert np.expm1(examples.numeric[row, clicks_col]) == pytest.approx(user_clicks, abs=1e-3)
        assert np.expm1(examples.numeric[row, impressions_col]) == pytest.approx(item_impr, abs=1e-3)


def test_unseen_ids_map_to_the_out_of_vocabulary_bucket(examples):
    rows = np.flatnonzero(examples.split == "train")
    space = FeatureSpace.fit(examples, rows[: len(rows) // 10])
    encoded = examples.encode(space)
    assert (encoded["user"] == 0).any() and (encoded["item"] == 0).any()
    assert encoded["user"].max() < len(space.vocabs["user"])
    vocab = Vocab([10, 20])
    np.testing.assert_array_equal(vocab.lookup(np.array([20, 99, None], dtype=object)), [2, 0, 0])
    grown = vocab.extended(np.array([30, 10]))
    assert grown.values == [10, 20, 30]  # old ids keep their index, new ones are appended


def test_task_list_is_configuration(shop):
    only = [TaskSpec(name="carts", sample_space="feed", label="carted", given="clicked")]
    examples = build_examples(shop / "full", FEATURES, only)
    assert examples.task_names == ["carts"] and 0 < np.nanmean(examples.labels[:, 0]) < 1
    with pytest.raises(FeatureError, match="label 'bought' does not exist in sample space 'feed'"):
        build_examples(shop / "full", FEATURES, [TaskSpec(name="x", sample_space="feed", label="bought")])
    with pytest.raises(FeatureError, match="too short"):
        build_examples(shop / "full", FeatureSettings(history_days=30, holdout_days=7), TASKS)


def test_the_saved_example_set_loads_back_equal(examples, tmp_path):
    """The DAG builds examples once and every later step reads them back: they must be the very same."""
    from mtl_core.learn.examples import examples_frame, load_examples, save_examples

    save_examples(examples, tmp_path / "examples")
    loaded = load_examples(tmp_path / "examples")
    assert loaded.task_names == examples.task_names and loaded.texts == examples.texts
    assert loaded.interval == examples.interval
    for name in (
        "numeric",
        "text_index",
        "labels",
        "split",
        "time",
        "event_id",
        "click_event_id",
        "new_user",
        "cold_item",
    ):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(examples, name), err_msg=name)
        assert getattr(loaded, name).dtype == getattr(examples, name).dtype, name
    for name, values in examples.raw.items():
        assert pd.Series(loaded.raw[name]).equals(pd.Series(values)), name
    rows = np.flatnonzero(examples.split == "train")
    assert FeatureSpace.fit(loaded, rows).to_json() == FeatureSpace.fit(examples, rows).to_json()
    pd.testing.assert_frame_equal(examples_frame(loaded, rows[:50]), examples_frame(examples, rows[:50]))
    with pytest.raises(FeatureError, match="holds no example set"):
        load_examples(tmp_path)
