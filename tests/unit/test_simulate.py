"""The synthetic shop: realistic rates, oracle AUCs in realistic bands, determinism, drift."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import func, select

from mtl_core.data import warehouse as wh
from mtl_core.data.shop import ATTRIBUTES, ShopSpec, generate, write_shop
from mtl_core.judge.oracle import oracle_report

RATE_BANDS = {"ctr": (0.02, 0.06), "cvr": (0.05, 0.15), "ad_ctr": (0.01, 0.03), "churn": (0.10, 0.30)}
ORACLE_BANDS = {"ctr": (0.68, 0.80), "cvr": (0.68, 0.85), "ad_ctr": (0.65, 0.80), "churn": (0.68, 0.85)}
SPEC = ShopSpec(users=3000, items=800, days=42, start=date(2026, 1, 5), seed=11)


@pytest.fixture(scope="module")
def shop_engine(tmp_path_factory):
    engine = wh.make_engine(f"sqlite:///{tmp_path_factory.mktemp('shop') / 'warehouse.db'}")
    write_shop(engine, SPEC)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def oracle(shop_engine):
    return oracle_report(shop_engine)


@pytest.mark.parametrize("task", sorted(RATE_BANDS))
def test_label_rates_look_like_a_real_shop(oracle, task):
    low, high = RATE_BANDS[task]
    assert low <= oracle[task]["rate"] <= high, oracle[task]


@pytest.mark.parametrize("task", sorted(ORACLE_BANDS))
def test_oracle_auc_is_realistic_not_trivial(oracle, task):
    low, high = ORACLE_BANDS[task]
    assert low <= oracle[task]["oracle_auc"] <= high, oracle[task]
    assert oracle[task]["n"] > 500


def test_same_seed_same_shop_other_seed_other_shop():
    a, b = generate(SPEC), generate(SPEC)
    c = generate(ShopSpec(**{**SPEC.__dict__, "seed": 12}))
    for key in ("user", "item", "ts", "clicked", "purchased"):
        np.testing.assert_array_equal(a.feed[key], b.feed[key])
    np.testing.assert_array_equal(a.title, b.title)
    assert len(a.feed["user"]) != len(c.feed["user"]) or not np.array_equal(a.feed["item"], c.feed["item"])


def test_tables_are_consistent(shop_engine):
    with shop_engine.connect() as conn:
        events = pd.read_sql(select(wh.behavior_events), conn)
        users = pd.read_sql(select(wh.users), conn)
        items = pd.read_sql(select(wh.items), conn)
        n_ads = conn.execute(select(func.count()).select_from(wh.ad_events)).scalar_one()
    assert events["event_id"].is_unique and n_ads > 0
    assert set(events["event_type"]) == {"impression", "click", "add_to_cart", "purchase"}
    assert events["user_id"].isin(users["user_id"]).all() and events["item_id"].isin(items["item_id"]).all()
    # every click follows its impression, every purchase its cart, on the same item and user
    by_id = events.set_index("event_id")
    children = events[events["parent_event_id"].notna()]
    parents = by_id.loc[children["parent_event_id"].astype(np.int64)]
    assert (parents["item_id"].to_numpy() == children["item_id"].to_numpy()).all()
    assert (parents["ts"].to_numpy() <= children["ts"].to_numpy()).all()
    expected_parent = {"click": "impression", "add_to_cart": "click", "purchase": "add_to_cart"}
    assert (parents["event_type"].to_numpy() == children["event_type"].map(expected_parent).to_numpy()).all()
    # events inside the simulated days, titles present, cold-start items arrive during the period
    assert events["ts"].min() >= pd.Timestamp("2026-01-05") and events["ts"].max() < pd.Timestamp("2026-02-17")
    assert items["title"].notna().all() and (items["created_ts"] >= pd.Timestamp("2026-01-05")).sum() > 50


def test_titles_carry_hidden_attributes_that_change_click_rates():
    shop = generate(SPEC)
    f = shop.feed
    names = [name for name, _, _ in ATTRIBUTES]
    bestseller = shop.attrs[f["item"], names.index("bestseller")] > 0
    used = shop.attrs[f["item"], names.index("defective")] > 0
    assert f["clicked"][bestseller].mean() > 1.3 * f["clicked"][used].mean()
    with_word = [t for t in shop.title if any(w in t for w in ("refurbished", "open-box", "second-hand", "used"))]
    assert len(with_word) == int((shop.attrs[:, names.index("defective")] > 0).sum())


def test_drift_changes_the_distribution():
    base = generate(ShopSpec(**{**SPEC.__dict__, "drift_day": None}))
    drifted = generate(ShopSpec(**{**SPEC.__dict__, "drift_day": 21}))
    late = drifted.feed["ts"] >= np.datetime64("2026-01-26")
    new_categories = set(np.asarray(drifted.category_names)[drifted.category[drifted.feed["item"][late]]])
    assert {"smart home", "pet supplies"} & new_categories
    assert len(base.category_names) < len(drifted.category_names)
    # changed tastes: the same user-item pairs get other click probabilities after the drift day
    users, items = np.arange(100), np.arange(100)
    before = drifted.affinity(users, items, np.zeros(100, dtype=int))
    after = drifted.affinity(users, items, np.full(100, 30))
    assert np.corrcoef(before, after)[0, 1] < 0.9
    # items released after the drift cost more than those released before within a category
    fresh = drifted.release_day >= 21
    assert np.median(drifted.price[fresh]) > np.median(base.price[base.release_day >= 21])


def test_refuses_to_overwrite_unless_asked(tmp_path):
    engine = wh.make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    small = ShopSpec(users=50, items=20, days=3, seed=1)
    write_shop(engine, small)
    with pytest.raises(FileExistsError, match="already holds events"):
        write_shop(engine, small)
    summary = write_shop(engine, small, replace=True)
    with engine.connect() as conn:
        assert (
            conn.execute(select(func.count()).select_from(wh.behavior_events)).scalar_one()
            == summary.rows["behavior_events"]
        )


@pytest.mark.parametrize("bad", [dict(users=0), dict(days=0), dict(days=10, drift_day=10)])
def test_bad_spec_is_refused_with_a_message(bad):
    with pytest.raises(ValueError, match="must be positive|outside the simulated days"):
        ShopSpec(**bad)
