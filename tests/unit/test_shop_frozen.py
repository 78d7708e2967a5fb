"""The synthetic shop is the ground truth every quality figure leans on: its generative process is frozen.

A change to any probability or parameter of ``mtl_core.data.shop`` moves these oracle AUCs (the true
probabilities against the labels drawn from them). Quality figures measured before and after such a
change would not be comparable, so the change must be deliberate: a reviewed commit that updates these
numbers and says why, never a side effect of chasing a quality target.
"""

from __future__ import annotations

from datetime import date

import pytest

from mtl_core.data.shop import ShopSpec, write_shop
from mtl_core.data.warehouse import make_engine
from mtl_core.judge.oracle import oracle_report

FROZEN = {  # task: (examples, label rate, oracle AUC)
    "ctr": (15573, 0.0275, 0.672),
    "cvr": (429, 0.0303, 0.735),
    "ad_ctr": (3148, 0.0216, 0.773),
    "churn": (242, 0.1777, 0.811),
}


def test_the_oracle_aucs_of_a_fixed_small_shop_are_pinned(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'shop.db'}")
    spec = ShopSpec(users=400, items=120, days=28, start=date(2026, 1, 5), seed=11, drift_day=14)
    write_shop(engine, spec, replace=True)
    report = oracle_report(engine)
    for task, (n, rate, auc) in FROZEN.items():
        assert report[task]["n"] == n, task
        assert report[task]["rate"] == pytest.approx(rate, abs=5e-5), task
        assert round(report[task]["oracle_auc"], 3) == auc, task
