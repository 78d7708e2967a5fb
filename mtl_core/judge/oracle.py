"""The oracle: the shop's true probability behind each example, the best any model could score.

The only reader of the shop's truth outside the simulator (a test enforces it). On a warehouse that is not a
simulated shop there is no truth, and every oracle figure is None.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sqlalchemy import inspect, select
from sqlalchemy.engine import Engine

from mtl_core.config import TaskSpec
from mtl_core.data import warehouse as wh
from mtl_core.data.pseudonyms import Pseudonymiser
from mtl_core.data.shop import CHURN_HORIZON_DAYS, true_churn_probability
from mtl_core.judge.metrics import roc_auc
from mtl_core.learn.examples import Examples


@dataclass(frozen=True)
class Truth:
    """Where the shop's truth is: the warehouse, and the key its snapshots' user ids were pseudonymised with.

    The truth is keyed by raw user id; the examples hold pseudonyms, so the oracle maps the truth's ids
    through the same key to join them (it never maps pseudonyms back, which nobody can).
    """

    engine: Engine
    pseudonyms: Pseudonymiser


def oracle_probabilities(
    truth_source: Truth | None, task: TaskSpec, examples: Examples, rows: np.ndarray
) -> np.ndarray | None:
    """The shop's true probability behind each row's label (simulated data only; None without truth tables)."""
    if truth_source is None:
        return None
    truth = true_probabilities(
        truth_source.engine,
        task.sample_space,
        task.label,
        examples.event_id[rows],
        examples.click_event_id[rows],
        examples.raw["user"][rows],
        examples.time[rows],
        truth_source.pseudonyms,
    )
    if truth is None or np.isnan(truth).any():
        return None
    return truth


def oracle_report(engine: Engine, churn_cutoff_day: int | None = None) -> dict[str, dict[str, float]]:
    """Each task's label rate, example count and oracle AUC (true probability against the drawn label).

    The oracle AUC is the best AUC any model could reach on these examples. Churn is scored at
    ``churn_cutoff_day`` (default: 14 days before the end) over users active in the 28 days before it.
    """
    with engine.connect() as conn:
        truth = pd.read_sql(select(wh.truth_events), conn)
        behavior = pd.read_sql(
            select(
                wh.behavior_events.c.event_id,
                wh.behavior_events.c.user_id,
                wh.behavior_events.c.event_type,
                wh.behavior_events.c.ts,
                wh.behavior_events.c.parent_event_id,
            ),
            conn,
        )
        ad_clicks = pd.read_sql(
            select(wh.ad_events.c.parent_event_id).where(wh.ad_events.c.event_type == "ad_click"), conn
        )
        truth_users = pd.read_sql(select(wh.truth_users), conn)
        facts = {k: json.loads(v) for k, v in conn.execute(select(wh.truth_shop.c.key, wh.truth_shop.c.value))}
    by_type = {kind: frame for kind, frame in behavior.groupby("event_type")}
    empty = pd.DataFrame(columns=behavior.columns)
    clicked_impressions = set(by_type.get("click", empty)["parent_event_id"])
    cart_of_click = by_type.get("add_to_cart", empty).set_index("event_id")["parent_event_id"]
    purchased_clicks = set(cart_of_click.reindex(by_type.get("purchase", empty)["parent_event_id"]).dropna())
    clicked_ads = set(ad_clicks["parent_event_id"])
    labels = {"ctr": clicked_impressions, "cvr": purchased_clicks, "ad_ctr": clicked_ads}

    report: dict[str, dict[str, float]] = {}
    for task, positives in labels.items():
        rows = truth[truth["task"] == task]
        y = rows["event_id"].isin(positives).to_numpy()
        report[task] = {
            "n": int(len(y)),
            "rate": float(y.mean()) if len(y) else float("nan"),
            "oracle_auc": roc_auc(y, rows["p_true"].to_numpy()),
        }

    start = pd.Timestamp(facts["start"])
    cutoff = facts["days"] - CHURN_HORIZON_DAYS if churn_cutoff_day is None else churn_cutoff_day
    active = behavior[["user_id"]].assign(day=(behavior["ts"] - start).dt.days).drop_duplicates()
    before = set(active.loc[(active["day"] >= cutoff - 28) & (active["day"] < cutoff), "user_id"])
    after = set(active.loc[(active["day"] >= cutoff) & (active["day"] < cutoff + CHURN_HORIZON_DAYS), "user_id"])
    users = np.array(sorted(before))
    y = np.array([u not in after for u in users], dtype=bool)
    p = true_churn_probability(truth_users, cutoff).reindex(users).to_numpy()
    report["churn"] = {
        "n": int(len(y)),
        "rate": float(y.mean()) if len(y) else float("nan"),
        "oracle_auc": roc_auc(y, p),
        "cutoff_day": int(cutoff),
    }
    return report


# Which truth answers which (sample space, label): the probability behind that label, or none.
TRUTH_OF_LABEL = {
    ("feed", "clicked"): "ctr",
    ("feed", "purchased"): "cvr",
    ("ads", "ad_clicked"): "ad_ctr",
    ("users", "churned"): "churn",
}


def true_probabilities(
    engine: Engine,
    sample_space: str,
    label: str,
    event_id: np.ndarray,
    click_event_id: np.ndarray,
    user_id: np.ndarray,
    time: np.ndarray,
    pseudonyms: Pseudonymiser | None = None,
) -> np.ndarray | None:
    """The shop's true probability for each example of a task, or None where the shop has no truth for it.

    Evaluation only. Feed click truth is keyed by the impression, purchase truth by the click, ad click
    truth by the ad impression; churn truth is computed at each row's cut-off day.
    """
    kind = TRUTH_OF_LABEL.get((sample_space, label))
    if kind is None:
        return None
    if not inspect(engine).has_table("truth_shop"):  # not a simulated warehouse
        return None
    with engine.connect() as conn:
        facts = {k: json.loads(v) for k, v in conn.execute(select(wh.truth_shop.c.key, wh.truth_shop.c.value))}
        if not facts:
            return None
        if kind == "churn":
            truth_users = pd.read_sql(select(wh.truth_users), conn)
            start = np.datetime64(facts["start"], "D")
            days = ((np.asarray(time).astype("datetime64[D]") - start) // np.timedelta64(1, "D")).astype(int)
            out = np.full(len(days), np.nan)
            for day in np.unique(days):
                p = true_churn_probability(truth_users, int(day))
                if pseudonyms is not None:
                    p.index = pseudonyms.array(p.index.to_numpy())
                out[days == day] = p.reindex(np.asarray(user_id)[days == day]).to_numpy()
            return out
        truth = pd.read_sql(
            select(wh.truth_events.c.event_id, wh.truth_events.c.p_true).where(wh.truth_events.c.task == kind), conn
        ).set_index("event_id")["p_true"]
    keys = click_event_id if kind == "cvr" else event_id
    return truth.reindex(np.asarray(keys)).to_numpy()
