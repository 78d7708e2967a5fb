"""Imported real-layout logs train: a Taobao UserBehavior file (no impressions, no parent links, 9 days)
gives cvr examples from its clicks and churn examples from its activity, and a model learns both."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest
import yaml
from support import PSEUDONYMS

from mtl_core.config import load_settings
from mtl_core.data import warehouse as wh
from mtl_core.data.extract import extract_snapshot
from mtl_core.data.import_logs import import_logs
from mtl_core.data.shop import ShopSpec, write_shop
from mtl_core.errors import MtlError
from mtl_core.judge.evaluate import evaluate_model
from mtl_core.learn.examples import build_examples, split_summary
from mtl_core.learn.training import TrainingError, train_on_snapshot

START = date(2017, 11, 25)  # the public sample's nine days: 2017-11-25 .. 2017-12-03
TAOBAO_TYPES = {"click": "pv", "add_to_cart": "cart", "purchase": "buy", "favorite": "fav"}
# The settings a nine-day log needs (the README's "Importing real logs"): short history, splits and churn horizon,
# cvr learned from clicks, and no ctr or ad_ctr, which need impressions.
SETTINGS = {
    "features": {
        "history_days": 2,
        "valid_days": 1,
        "holdout_days": 2,
        "churn_horizon_days": 3,
        "churn_active_days": 5,
        "churn_cutoff_step_days": 1,
        "purchase_window_hours": 24,
    },
    "tasks": [
        {"name": "cvr", "sample_space": "clicks", "label": "purchased"},
        {"name": "churn", "sample_space": "users", "label": "churned", "weight": 0.5},
    ],
    "train": {"epochs": 6, "batch_size": 128},
}


def taobao_lines(engine) -> list[str]:
    """A simulated shop's behaviour written as the Taobao dump would hold it: no impressions, no parents."""
    with engine.connect() as conn:
        events = pd.read_sql(wh.behavior_events.select(), conn)
        items = pd.read_sql(wh.items.select(), conn).set_index("item_id")
    events = events[events["event_type"].isin(TAOBAO_TYPES)].sort_values("ts")
    seconds = events["ts"].astype("datetime64[s]").astype(np.int64) // 1  # naive UTC
    category = items["category"].reindex(events["item_id"]).fillna("0").str.replace(r"\D", "", regex=True)
    category = category.where(category != "", "0").to_numpy()
    return [
        f"{u},{i},{c},{TAOBAO_TYPES[t]},{s}"
        for u, i, c, t, s in zip(
            events["user_id"], events["item_id"], category, events["event_type"], seconds, strict=True
        )
    ]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("taobao")
    shop = wh.make_engine(f"sqlite:///{root / 'shop.db'}")
    write_shop(shop, ShopSpec(users=16000, items=1000, days=9, start=START, seed=5))
    log = root / "UserBehavior.csv"
    log.write_text("\n".join(taobao_lines(shop)) + "\n")
    warehouse = wh.make_engine(f"sqlite:///{root / 'warehouse.db'}")
    report = import_logs(log, "taobao", warehouse)
    assert not report.aborted and report.rows_loaded == report.rows_read
    extract_snapshot(warehouse, "2017-11-25", "2017-12-04", root / "snap", PSEUDONYMS)
    (root / "mtl.yaml").write_text(yaml.safe_dump(SETTINGS))
    settings = load_settings(root / "mtl.yaml", environ={"MTL_DATA_DIR": str(root)})
    return root, settings


def test_clicks_give_cvr_examples_labelled_by_a_later_purchase_of_the_same_item(imported):
    root, settings = imported
    examples = build_examples(root / "snap", settings.features, list(settings.tasks))
    counts = split_summary(examples)
    assert all(counts["cvr"][split] > 200 for split in ("train", "valid", "holdout")), counts
    assert all(counts["churn"][split] > 200 for split in ("train", "valid", "holdout")), counts
    cvr = examples.labels[:, examples.task_names.index("cvr")]
    rate = np.nanmean(cvr)
    assert 0.01 < rate < 0.5, rate
    # The newest clicks have an open purchase window: no label yet, so no example.
    last_day = examples.time >= np.datetime64("2017-12-03")
    assert np.isnan(cvr[last_day & (examples.raw["space"] == "clicks")]).all()


def test_a_model_trains_on_the_imported_log_and_learns_cvr_and_churn(imported):
    root, settings = imported
    train_on_snapshot(root / "snap", root / "model", settings, progress=False)
    report = evaluate_model(root / "model", root / "snap")
    aucs = {task: report["tasks"][task]["auc"] for task in ("cvr", "churn")}
    # cvr learns (0.57 measured; the Taobao-like log has no titles, prices or user attributes). Churn over
    # a 3-day horizon in 9 days is near chance (0.46-0.49, single-task too: early cut-offs do not resemble
    # late ones); the test holds that it trains and is scored, not that it is good.
    assert aucs["cvr"] > 0.55, aucs
    assert 0.0 < aucs["churn"] < 1.0 and report["tasks"]["churn"]["n"] > 200, report["tasks"]["churn"]


def test_the_default_settings_on_the_imported_log_say_which_settings_to_change(imported):
    root, _ = imported
    defaults = load_settings(environ={"MTL_DATA_DIR": str(root)})
    with pytest.raises(MtlError) as failed:
        train_on_snapshot(root / "snap", root / "default-model", defaults, progress=False)
    assert "features.valid_days (4) and features.holdout_days (7)" in str(failed.value)

    short_splits = {f"MTL_FEATURES__{k.upper()}": "2" for k in ("history_days", "valid_days", "holdout_days")}
    default_tasks = load_settings(environ={"MTL_DATA_DIR": str(root), **short_splits})
    with pytest.raises(TrainingError) as failed:
        train_on_snapshot(root / "snap", root / "default-model", default_tasks, progress=False)
    message = str(failed.value)
    for hint in ("features.churn_horizon_days (14)", "sample_space: clicks", "drop the ctr and ad_ctr tasks"):
        assert hint in message, message
