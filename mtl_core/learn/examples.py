"""Examples per task from a snapshot: sample spaces, labels, leakage-free history features, vocabularies.

Four sample spaces share one feature schema, so one model (and one shared bottom) can take any row:

* ``feed``: one row per feed impression. Labels: ``clicked``; ``carted`` and ``purchased`` are defined
  only on clicked rows (their parent chain in the log), so cvr's examples are the clicked impressions.
* ``clicks``: one row per click, whether or not the log has the impression it came from (imported logs such
  as Taobao's have none). Label ``purchased``: the click's parent chain ends in a purchase, or the same user
  buys the same item within ``purchase_window_hours`` after it. A click whose window runs past the end of
  the snapshot has no label yet (a purchase could still come), so it is no example.
* ``ads``: one row per ad impression. Label: ``ad_clicked``.
* ``users``: one row per (user, cut-off day) for users active in the ``churn_active_days`` before the
  cut-off. Label ``churned``: no activity in the ``churn_horizon_days`` after it. The last horizon of an
  interval only serves as label window.

History features (user and item activity counts, rates, recency) count only events strictly before the
row's time, computed with sorted keys and binary search (no Python loop over rows), so no example sees its
own outcome or the future.

Each row gets a split by the time its label is known: impressions by their time, churn rows by the end of
their label window. ``holdout`` is the newest ``holdout_days`` (what champion and challenger are compared
on), ``valid`` the ``valid_days`` before it (early stopping), ``train`` the rest after ``history_days``
of warm-up history.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mtl_core.config import FeatureSettings, TaskSpec
from mtl_core.data.extract import SnapshotIntegrityError, read_manifest, read_snapshot_table, replace_dir
from mtl_core.errors import MtlError
from mtl_core.jsonable import to_jsonable

SPACES = ("feed", "ads", "users", "clicks")
SPACE_LABELS = {
    "feed": ("clicked", "carted", "purchased"),
    "ads": ("ad_clicked",),
    "users": ("churned",),
    "clicks": ("purchased",),
}
# Entity ids: embedded only when the model settings' id_features name them.
ID_FEATURES = ("user", "item", "ad")
CATEGORICAL = ("user", "item", "category", "brand", "region", "age_band", "ad", "space")
NUMERIC = (
    "log_price",
    "hour_sin",
    "hour_cos",
    "dow_sin",
    "dow_cos",
    "position",
    "user_events",
    "user_clicks",
    "user_ctr",
    "user_purchases",
    "user_events_7d",
    "user_events_28d",
    "user_days_since_last",
    "user_days_since_signup",
    "user_ad_impressions",
    "user_ad_ctr",
    "item_impressions",
    "item_clicks",
    "item_ctr",
    "item_purchases",
    "item_age_days",
    "has_item",
)
SPLITS = ("train", "valid", "holdout")
DAY = np.timedelta64(1, "D")


class FeatureError(MtlError):
    pass


@dataclass
class Vocab:
    """Raw value -> index; 0 is the bucket for unseen (out-of-vocabulary) and missing values."""

    values: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._index = pd.Index(self.values)

    def __len__(self) -> int:
        return len(self.values) + 1

    def lookup(self, raw: np.ndarray | pd.Series) -> np.ndarray:
        if not self.values:  # an id the model does not learn: every value is out of vocabulary
            return np.zeros(len(raw), dtype=np.int64)
        positions = self._index.get_indexer(pd.Index(np.asarray(raw, dtype=object)))
        return (positions + 1).astype(np.int64)  # -1 (unseen) becomes 0

    def extended(self, raw: np.ndarray | pd.Series) -> Vocab:
        """A vocabulary with the new values appended; old values keep their indices (warm start)."""
        fresh = pd.unique(pd.Series(np.asarray(raw, dtype=object)).dropna())
        new = [v for v in fresh if v not in set(self.values)]
        return Vocab(self.values + sorted(new, key=str))

    @classmethod
    def fit(cls, raw: np.ndarray | pd.Series) -> Vocab:
        values = pd.unique(pd.Series(np.asarray(raw, dtype=object)).dropna())
        return cls(sorted((to_jsonable(v) for v in values), key=str))


def _kept(name: str, id_features: Iterable[str]) -> bool:
    return name not in ID_FEATURES or name in tuple(id_features)


@dataclass
class FeatureSpace:
    """What training fitted and scoring must reuse: vocabularies and numeric standardisation."""

    vocabs: dict[str, Vocab]
    mean: dict[str, float]
    std: dict[str, float]

    def sizes(self) -> dict[str, int]:
        return {name: len(vocab) for name, vocab in self.vocabs.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "vocabs": {name: vocab.values for name, vocab in self.vocabs.items()},
            "mean": self.mean,
            "std": self.std,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeatureSpace:
        return cls(
            vocabs={name: Vocab(values) for name, values in data["vocabs"].items()},
            mean=data["mean"],
            std=data["std"],
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: Path) -> FeatureSpace:
        return cls.from_json(json.loads(path.read_text()))

    @classmethod
    def fit(cls, examples: Examples, rows: np.ndarray, id_features: Iterable[str] = ID_FEATURES) -> FeatureSpace:
        """Vocabularies and standardisation of ``rows``; of the entity ids, only those the model learns.

        An id vocabulary that no embedding reads would only copy every user's (pseudonymous) id into the
        model files, so the ids not in ``id_features`` get an empty one.
        """
        raw = examples.raw
        vocabs = {
            name: Vocab.fit(raw[name][rows]) if _kept(name, id_features) else Vocab()
            for name in CATEGORICAL
            if name != "space"
        }
        vocabs["space"] = Vocab(list(SPACES))
        numeric = examples.numeric[rows]
        mean = numeric.mean(axis=0) if len(rows) else np.zeros(len(NUMERIC))
        std = numeric.std(axis=0) if len(rows) else np.ones(len(NUMERIC))
        return cls(
            vocabs=vocabs,
            mean=dict(zip(NUMERIC, map(float, mean), strict=True)),
            std=dict(zip(NUMERIC, (float(s) if s > 1e-6 else 1.0 for s in std), strict=True)),
        )

    def extended(self, examples: Examples, rows: np.ndarray, id_features: Iterable[str] = ID_FEATURES) -> FeatureSpace:
        """Warm start: the same space with vocabularies grown by the new users, items, ... of ``rows``."""
        vocabs = {
            name: vocab
            if name == "space"
            else vocab.extended(examples.raw[name][rows])
            if _kept(name, id_features)
            else Vocab()
            for name, vocab in self.vocabs.items()
        }
        return FeatureSpace(vocabs=vocabs, mean=self.mean, std=self.std)


@dataclass
class Examples:
    """All rows of all sample spaces, column-wise. ``labels`` has one column per task (NaN: undefined)."""

    raw: dict[str, np.ndarray]  # raw categorical values per row (ids, names)
    numeric: np.ndarray  # [N, len(NUMERIC)] float32, not yet standardised
    text_index: np.ndarray  # [N] index into ``texts`` (0: no text)
    texts: list[str]  # distinct texts; texts[i - 1] belongs to index i
    labels: np.ndarray  # [N, T] float32
    task_names: list[str]
    split: np.ndarray  # [N] one of SPLITS (or "history")
    time: np.ndarray  # [N] datetime64[us] of the example (impression time or cut-off)
    event_id: np.ndarray  # impression / ad impression id; 0 for user rows
    click_event_id: np.ndarray  # the click's id on clicked feed rows (cvr truth), else 0
    new_user: np.ndarray  # bool: no activity of this user before the row
    cold_item: np.ndarray  # bool: the item is younger than cold_start_days (feed and ads rows)
    interval: tuple[np.datetime64, np.datetime64]

    def __len__(self) -> int:
        return len(self.split)

    def task_rows(self, task: int, split: str) -> np.ndarray:
        return np.flatnonzero((self.split == split) & ~np.isnan(self.labels[:, task]))

    def encode(self, space: FeatureSpace) -> dict[str, np.ndarray]:
        """Model inputs: vocabulary indices per categorical feature and standardised numerics."""
        encoded = {name: space.vocabs[name].lookup(self.raw[name]) for name in CATEGORICAL}
        mean = np.array([space.mean[n] for n in NUMERIC], dtype=np.float32)
        std = np.array([space.std[n] for n in NUMERIC], dtype=np.float32)
        encoded["numeric"] = ((self.numeric - mean) / std).astype(np.float32)
        encoded["text"] = self.text_index
        return encoded


# ---------------------------------------------------------------------------------------------------
def _read(snapshot: Path, table: str, columns: list[str] | None = None) -> pd.DataFrame:
    try:
        frame = read_snapshot_table(snapshot, table, columns).to_pandas()
    except SnapshotIntegrityError as exc:
        raise FeatureError(str(exc)) from None
    for column in frame.columns:
        if isinstance(frame[column].dtype, pd.DatetimeTZDtype):
            frame[column] = frame[column].dt.tz_convert(None).astype("datetime64[us]")
    return frame


class _History:
    """Counts of an entity's events strictly before given times, by binary search over sorted keys.

    A key packs (entity code, epoch second) into one int64: 2**34 seconds cover five centuries and leave
    29 bits for entity codes. Times are floored to the second, so an event in the same second as the
    example does not count (never the other way round: no leakage).
    """

    SHIFT = 1 << 34

    def __init__(self, entity: np.ndarray, ts: np.ndarray, codes: pd.Index):
        if len(codes) >= (1 << 29):
            raise FeatureError(f"{len(codes):,} distinct ids exceed what the history index holds (2**29)")
        self.codes = codes
        code = codes.get_indexer(entity).astype(np.int64)
        seconds = _epoch_seconds(ts)
        order = np.lexsort((seconds, code))
        self.code, self.seconds = code[order], seconds[order]
        self.key = self.code * self.SHIFT + self.seconds

    def _keys(self, entity: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        code = self.codes.get_indexer(entity).astype(np.int64)
        return code, code * self.SHIFT + np.clip(_epoch_seconds(ts), 0, self.SHIFT - 1)

    def count_before(self, entity: np.ndarray, ts: np.ndarray, window: np.timedelta64 | None = None) -> np.ndarray:
        code, key = self._keys(entity, ts)
        upper = np.searchsorted(self.key, key, side="left")
        if window is None:
            lower = np.searchsorted(self.key, code * self.SHIFT, side="left")
        else:
            _, start_key = self._keys(entity, ts.astype("datetime64[us]") - window)
            lower = np.searchsorted(self.key, start_key, side="left")
        counts = (upper - lower).astype(np.float64)
        counts[code < 0] = 0
        return counts

    def last_before(self, entity: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Epoch second of the entity's last event before ts; -1 if none."""
        code, key = self._keys(entity, ts)
        idx = np.searchsorted(self.key, key, side="left") - 1
        ok = (idx >= 0) & (code >= 0)
        ok[ok] &= self.code[idx[ok]] == code[ok]
        out = np.full(len(ts), -1, dtype=np.int64)
        out[ok] = self.seconds[idx[ok]]
        return out


def _epoch_seconds(ts: np.ndarray) -> np.ndarray:
    return np.asarray(ts).astype("datetime64[s]").astype(np.int64)


def _cyclic(ts: np.ndarray) -> dict[str, np.ndarray]:
    stamp = pd.DatetimeIndex(ts)
    hour = (stamp.hour + stamp.minute / 60.0).to_numpy()
    dow = stamp.day_of_week.to_numpy()
    return {
        "hour_sin": np.sin(2 * np.pi * hour / 24),
        "hour_cos": np.cos(2 * np.pi * hour / 24),
        "dow_sin": np.sin(2 * np.pi * dow / 7),
        "dow_cos": np.cos(2 * np.pi * dow / 7),
    }


def build_examples(snapshot_dir: str | Path, settings: FeatureSettings, tasks: list[TaskSpec]) -> Examples:
    """Read a snapshot and build every sample space's rows, features, labels and split."""
    snapshot = Path(snapshot_dir)
    manifest = read_manifest(snapshot)
    start = np.datetime64(manifest["interval"]["start"].rstrip("Z"), "us")
    end = np.datetime64(manifest["interval"]["end"].rstrip("Z"), "us")
    _check_tasks(tasks)

    users = _read(snapshot, "users")
    items = _read(snapshot, "items")
    behavior = _read(snapshot, "behavior_events")
    ads = _read(snapshot, "ad_events")

    holdout_start = end - settings.holdout_days * DAY
    valid_start = holdout_start - settings.valid_days * DAY
    examples_start = start + settings.history_days * DAY
    if examples_start >= valid_start:
        raise FeatureError(
            f"snapshot {snapshot} spans {(end - start) // DAY} days: too short for features.history_days "
            f"({settings.history_days}), features.valid_days ({settings.valid_days}) and features.holdout_days "
            f"({settings.holdout_days}) with at least one training day; shorten those or extract a longer window "
            "(pipeline.lookback_days)"
        )

    feed = _feed_rows(behavior)
    ad_rows = _ad_rows(ads)
    user_rows = _user_rows(behavior, ads, start, end, examples_start, settings)
    frames = {"feed": feed, "ads": ad_rows, "users": user_rows}
    if any(task.sample_space == "clicks" for task in tasks):
        frames["clicks"] = _click_rows(behavior, end, settings.purchase_window_hours)
    frames = {name: frame.assign(space=name) for name, frame in frames.items()}
    rows = pd.concat(list(frames.values()), ignore_index=True, sort=False)

    # Dimensions joined in: item attributes for feed and ad rows, user attributes for all.
    item_info = items.set_index("item_id")
    user_info = users.set_index("user_id")
    item_ids = rows["item_id"]
    rows["category"] = item_ids.map(item_info["category"])
    rows["brand"] = item_ids.map(item_info["brand"])
    rows["price"] = item_ids.map(item_info["price"])
    rows["item_created"] = item_ids.map(item_info["created_ts"])
    rows["title"] = item_ids.map(item_info["title"])
    rows["region"] = rows["user_id"].map(user_info["region"])
    rows["age_band"] = rows["user_id"].map(user_info["age_band"])
    rows["signup"] = rows["user_id"].map(user_info["signup_ts"])

    numeric, new_user, cold_item = _history_features(rows, behavior, ads, settings)
    texts, text_index = _texts(rows)

    label_time = rows["time"].to_numpy().astype("datetime64[us]")
    is_user_row = (rows["space"] == "users").to_numpy()
    label_time = np.where(is_user_row, label_time + settings.churn_horizon_days * DAY, label_time)
    split = np.select(
        [
            rows["time"].to_numpy() < examples_start,
            label_time < valid_start,
            label_time < holdout_start,
        ],
        ["history", "train", "valid"],
        default="holdout",
    )
    labels = np.full((len(rows), len(tasks)), np.nan, dtype=np.float32)
    for t, task in enumerate(tasks):
        in_space = (rows["space"] == task.sample_space).to_numpy()
        if task.label not in rows.columns or task.label not in SPACE_LABELS[task.sample_space]:
            raise FeatureError(
                f"task {task.name!r}: label {task.label!r} does not exist in sample space {task.sample_space!r} "
                f"(labels there: {', '.join(SPACE_LABELS[task.sample_space])})"
            )
        value = rows[task.label].to_numpy(dtype=np.float64, na_value=np.nan)
        defined = in_space & ~np.isnan(value)
        if task.given:
            defined &= rows[task.given].to_numpy(dtype=np.float64, na_value=0.0) == 1
        labels[defined, t] = value[defined]

    raw = {
        "user": rows["user_id"].to_numpy(dtype=object),
        "item": rows["item_id"].to_numpy(dtype=object),
        "category": rows["category"].to_numpy(dtype=object),
        "brand": rows["brand"].to_numpy(dtype=object),
        "region": rows["region"].to_numpy(dtype=object),
        "age_band": rows["age_band"].to_numpy(dtype=object),
        "ad": rows["ad_id"].to_numpy(dtype=object),
        "space": rows["space"].to_numpy(dtype=object),
    }
    for name in ("user", "item", "ad"):
        # Whole numbers or None (user rows carry no item or ad): the concatenation above turned the id
        # columns into floats, and 126.0 must be the same vocabulary entry as the warehouse's 126.
        raw[name] = pd.array(rows[f"{name}_id"], dtype="Int64").to_numpy(dtype=object, na_value=None)
    return Examples(
        raw=raw,
        numeric=numeric,
        text_index=text_index,
        texts=texts,
        labels=labels,
        task_names=[task.name for task in tasks],
        split=split,
        time=rows["time"].to_numpy().astype("datetime64[us]"),
        event_id=rows["event_id"].fillna(0).to_numpy(dtype=np.int64),
        click_event_id=rows["click_event_id"].fillna(0).to_numpy(dtype=np.int64),
        new_user=new_user,
        cold_item=cold_item,
        interval=(start, end),
    )


def _check_tasks(tasks: list[TaskSpec]) -> None:
    names = [task.name for task in tasks]
    if not tasks:
        raise FeatureError("no tasks configured: the tasks list is empty")
    if len(set(names)) != len(names):
        raise FeatureError(f"task names must be unique, got {names}")


def _feed_rows(behavior: pd.DataFrame) -> pd.DataFrame:
    impressions = behavior[behavior["event_type"] == "impression"]
    clicks = behavior[behavior["event_type"] == "click"].dropna(subset=["parent_event_id"])
    carts = behavior[behavior["event_type"] == "add_to_cart"].dropna(subset=["parent_event_id"])
    buys = behavior[behavior["event_type"] == "purchase"].dropna(subset=["parent_event_id"])
    click_of_impression = pd.Series(clicks["event_id"].to_numpy(), index=clicks["parent_event_id"].to_numpy())
    click_of_impression = click_of_impression[~click_of_impression.index.duplicated()]
    carted_clicks = set(carts["parent_event_id"].astype(np.int64))
    cart_of_buy = set(buys["parent_event_id"].astype(np.int64))
    purchased_clicks = set(carts.loc[carts["event_id"].isin(cart_of_buy), "parent_event_id"].astype(np.int64))

    click_id = click_of_impression.reindex(impressions["event_id"].to_numpy()).to_numpy()
    clicked = ~np.isnan(click_id)
    click_int = np.where(clicked, np.nan_to_num(click_id), 0).astype(np.int64)
    carted = np.where(clicked, np.isin(click_int, list(carted_clicks)), np.nan)
    purchased = np.where(clicked, np.isin(click_int, list(purchased_clicks)), np.nan)
    return pd.DataFrame(
        {
            "event_id": impressions["event_id"].to_numpy(),
            "click_event_id": click_int,
            "user_id": impressions["user_id"].to_numpy(),
            "item_id": impressions["item_id"].to_numpy(),
            "time": impressions["ts"].to_numpy(),
            "position": impressions["position"].to_numpy(dtype=np.float64, na_value=np.nan),
            "clicked": clicked.astype(np.float64),
            "carted": carted.astype(np.float64),
            "purchased": purchased.astype(np.float64),
        }
    )


def _click_rows(behavior: pd.DataFrame, end: np.datetime64, window_hours: int) -> pd.DataFrame:
    """One row per click; purchased if chained to a purchase, or if the same user buys the same item in time."""
    clicks = behavior[behavior["event_type"] == "click"].dropna(subset=["user_id", "item_id"])
    carts = behavior[behavior["event_type"] == "add_to_cart"].dropna(subset=["parent_event_id"])
    chained_buys = set(behavior.loc[behavior["event_type"] == "purchase", "parent_event_id"].dropna().astype(np.int64))
    chained = clicks["event_id"].isin(set(carts.loc[carts["event_id"].isin(chained_buys), "parent_event_id"]))

    window = pd.Timedelta(hours=window_hours)
    buys = behavior.loc[behavior["event_type"] == "purchase", ["user_id", "item_id", "ts"]].dropna()
    left = pd.DataFrame(
        {
            "user_id": clicks["user_id"].astype(np.int64).to_numpy(),
            "item_id": clicks["item_id"].astype(np.int64).to_numpy(),
            "ts": clicks["ts"].to_numpy().astype("datetime64[us]"),
            "order": np.arange(len(clicks)),
        }
    ).sort_values("ts")
    right = pd.DataFrame(
        {
            "user_id": buys["user_id"].astype(np.int64).to_numpy(),
            "item_id": buys["item_id"].astype(np.int64).to_numpy(),
            "ts": buys["ts"].to_numpy().astype("datetime64[us]"),
            "buy_ts": buys["ts"].to_numpy().astype("datetime64[us]"),
        }
    ).sort_values("ts")
    # The first purchase of the same item by the same user strictly after the click and within the window.
    matched = pd.merge_asof(
        left,
        right,
        on="ts",
        by=["user_id", "item_id"],
        direction="forward",
        allow_exact_matches=False,
        tolerance=window,
    ).sort_values("order")
    bought = chained.to_numpy() | matched["buy_ts"].notna().to_numpy()
    times = clicks["ts"].to_numpy().astype("datetime64[us]")
    open_window = times + np.timedelta64(window_hours, "h") > end
    # Censored whether or not a purchase was already seen: keeping only the open windows that ended in one
    # would give the newest clicks a purchase rate of 100 %.
    purchased = np.where(open_window, np.nan, bought.astype(np.float64))
    return pd.DataFrame(
        {
            "event_id": clicks["event_id"].to_numpy(),
            "click_event_id": clicks["event_id"].to_numpy(),
            "user_id": clicks["user_id"].to_numpy(),
            "item_id": clicks["item_id"].to_numpy(),
            "time": clicks["ts"].to_numpy(),
            "position": clicks["position"].to_numpy(dtype=np.float64, na_value=np.nan),
            "purchased": purchased,
        }
    )


def _ad_rows(ads: pd.DataFrame) -> pd.DataFrame:
    impressions = ads[ads["event_type"] == "ad_impression"]
    clicked_ids = set(ads.loc[ads["event_type"] == "ad_click", "parent_event_id"].dropna().astype(np.int64))
    return pd.DataFrame(
        {
            "event_id": impressions["event_id"].to_numpy(),
            "user_id": impressions["user_id"].to_numpy(),
            "item_id": impressions["item_id"].to_numpy(),
            "ad_id": impressions["ad_id"].to_numpy(),
            "ad_text": impressions["ad_text"].to_numpy(dtype=object),
            "time": impressions["ts"].to_numpy(),
            "ad_clicked": impressions["event_id"].isin(clicked_ids).to_numpy(dtype=np.float64),
        }
    )


def _user_rows(
    behavior: pd.DataFrame,
    ads: pd.DataFrame,
    start: np.datetime64,
    end: np.datetime64,
    examples_start: np.datetime64,
    settings: FeatureSettings,
) -> pd.DataFrame:
    """One row per active user at each cut-off; cut-offs step back from the last one with a full horizon."""
    activity = pd.concat([behavior[["user_id", "ts"]], ads[["user_id", "ts"]]], ignore_index=True)
    day = ((activity["ts"].to_numpy().astype("datetime64[us]") - start) // DAY).astype(np.int64)
    active = pd.DataFrame({"user_id": activity["user_id"].to_numpy(), "day": day}).drop_duplicates()
    horizon = settings.churn_horizon_days
    last_cutoff = int((end - start) // DAY) - horizon
    first_cutoff = int((examples_start - start) // DAY)
    frames = []
    for cutoff in range(last_cutoff, first_cutoff - 1, -settings.churn_cutoff_step_days):
        before = active[(active["day"] < cutoff) & (active["day"] >= cutoff - settings.churn_active_days)]
        after = active[(active["day"] >= cutoff) & (active["day"] < cutoff + horizon)]
        users = np.unique(before["user_id"].to_numpy())
        frames.append(
            pd.DataFrame(
                {
                    "user_id": users,
                    "time": np.full(len(users), start + cutoff * DAY),
                    "churned": (~np.isin(users, after["user_id"].to_numpy())).astype(np.float64),
                }
            )
        )
    if not frames:
        return pd.DataFrame({"user_id": [], "time": np.array([], dtype="datetime64[us]"), "churned": []})
    return pd.concat(frames[::-1], ignore_index=True)


def _history_features(
    rows: pd.DataFrame, behavior: pd.DataFrame, ads: pd.DataFrame, settings: FeatureSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ts = rows["time"].to_numpy().astype("datetime64[us]")
    user = rows["user_id"].to_numpy()
    item = rows["item_id"].to_numpy(dtype=np.float64, na_value=np.nan)
    has_item = ~np.isnan(item)
    item_key = np.where(has_item, item, -1).astype(np.int64)

    history = EventHistory(behavior, ads, user, item_key)
    user_side = history.user_columns(user, ts)
    seen = pd.Series(item_key).map(history.first_seen).to_numpy().astype("datetime64[us]")
    timed = time_columns(
        ts,
        last_event=user_side[LAST_EVENT],
        signup=rows["signup"].to_numpy().astype("datetime64[us]"),
        created=rows["item_created"].to_numpy().astype("datetime64[us]"),
        first_seen=seen,
    )
    columns = {
        **item_attribute_columns(rows["price"].to_numpy(dtype=np.float64, na_value=np.nan), has_item),
        **position_columns(rows["position"].to_numpy(dtype=np.float64, na_value=np.nan)),
        **user_side,
        **history.item_columns(item_key, ts),
        **timed,
    }
    new_user = user_side[USER_EVENT_COUNT] == 0
    cold_item = has_item & (timed[ITEM_AGE_DAYS] < settings.cold_start_days)
    return numeric_matrix(columns), new_user, cold_item


# --- history features by side: what the online store publishes per user and per item ----------------
# The user-side and item-side columns below are counts as of a time; the time columns are what changes with
# the row's own time given an entity's anchors (its last event, signup, creation or first sighting). Training
# computes both at every example's time; serving publishes the counts once (as of the interval's end) with
# the anchors, and computes the time columns at the request's time, with these same formulas.
USER_COUNT_FEATURES = (
    "user_events",
    "user_clicks",
    "user_ctr",
    "user_purchases",
    "user_events_7d",
    "user_events_28d",
    "user_ad_impressions",
    "user_ad_ctr",
)
ITEM_COUNT_FEATURES = ("item_impressions", "item_clicks", "item_ctr", "item_purchases")
# Extra entries of user_columns: the raw event count (new_user) and the epoch second of the last event.
USER_EVENT_COUNT = "_user_event_count"
LAST_EVENT = "_last_event_second"
# Extra entry of time_columns: the item's age in days before its transform (cold_item).
ITEM_AGE_DAYS = "_item_age_days"


class EventHistory:
    """A snapshot's events indexed for counts per user and per item strictly before given times.

    ``users`` and ``items`` are the ids that will be asked about beside those of the events.
    """

    def __init__(self, behavior: pd.DataFrame, ads: pd.DataFrame, users: np.ndarray, items: np.ndarray):
        users_index = pd.Index(pd.unique(np.concatenate([behavior["user_id"], ads["user_id"], users])))
        items_index = pd.Index(pd.unique(np.concatenate([behavior["item_id"], items])))
        kinds = {k: behavior[behavior["event_type"] == k] for k in ("impression", "click", "purchase")}

        def index(frame: pd.DataFrame, entity: str, codes: pd.Index) -> _History:
            return _History(frame[entity].to_numpy(), frame["ts"].to_numpy(), codes)

        self.all_user = _History(
            np.concatenate([behavior["user_id"], ads["user_id"]]),
            np.concatenate([behavior["ts"].to_numpy(), ads["ts"].to_numpy()]),
            users_index,
        )
        self.user_clicks = index(kinds["click"], "user_id", users_index)
        self.user_impr = index(kinds["impression"], "user_id", users_index)
        self.user_buys = index(kinds["purchase"], "user_id", users_index)
        self.user_ad_impr = index(ads[ads["event_type"] == "ad_impression"], "user_id", users_index)
        self.user_ad_click = index(ads[ads["event_type"] == "ad_click"], "user_id", users_index)
        self.item_impr = index(kinds["impression"], "item_id", items_index)
        self.item_clicks = index(kinds["click"], "item_id", items_index)
        self.item_buys = index(kinds["purchase"], "item_id", items_index)
        # Without a creation time (imported logs), an item's age is how long it has been seen in the snapshot.
        self.first_seen = behavior.groupby("item_id")["ts"].min()

    def user_columns(self, user: np.ndarray, ts: np.ndarray) -> dict[str, np.ndarray]:
        """USER_COUNT_FEATURES, plus USER_EVENT_COUNT and LAST_EVENT (-1: none), of ``user`` at ``ts``."""
        columns = user_count_columns(
            events=self.all_user.count_before(user, ts),
            impressions=self.user_impr.count_before(user, ts),
            clicks=self.user_clicks.count_before(user, ts),
            purchases=self.user_buys.count_before(user, ts),
            events_7d=self.all_user.count_before(user, ts, 7 * DAY),
            events_28d=self.all_user.count_before(user, ts, 28 * DAY),
            ad_impressions=self.user_ad_impr.count_before(user, ts),
            ad_clicks=self.user_ad_click.count_before(user, ts),
        )
        columns[LAST_EVENT] = self.all_user.last_before(user, ts)
        return columns

    def item_columns(self, item_key: np.ndarray, ts: np.ndarray) -> dict[str, np.ndarray]:
        """ITEM_COUNT_FEATURES of ``item_key`` (-1: no item) at ``ts``."""
        return item_count_columns(
            impressions=self.item_impr.count_before(item_key, ts),
            clicks=self.item_clicks.count_before(item_key, ts),
            purchases=self.item_buys.count_before(item_key, ts),
        )


def user_count_columns(
    events: np.ndarray,
    impressions: np.ndarray,
    clicks: np.ndarray,
    purchases: np.ndarray,
    events_7d: np.ndarray,
    events_28d: np.ndarray,
    ad_impressions: np.ndarray,
    ad_clicks: np.ndarray,
) -> dict[str, np.ndarray]:
    """The user-side features from a user's event counts (all zero: a user without history)."""
    return {
        "user_events": np.log1p(events),
        "user_clicks": np.log1p(clicks),
        "user_ctr": (clicks + 0.5) / (impressions + 15.0),  # smoothed towards a ~3 % prior
        "user_purchases": np.log1p(purchases),
        "user_events_7d": np.log1p(events_7d),
        "user_events_28d": np.log1p(events_28d),
        "user_ad_impressions": np.log1p(ad_impressions),
        "user_ad_ctr": (ad_clicks + 0.2) / (ad_impressions + 10.0),
        USER_EVENT_COUNT: events,
    }


def item_count_columns(impressions: np.ndarray, clicks: np.ndarray, purchases: np.ndarray) -> dict[str, np.ndarray]:
    """The item-side features from an item's event counts (all zero: an item without history)."""
    return {
        "item_impressions": np.log1p(impressions),
        "item_clicks": np.log1p(clicks),
        "item_ctr": (clicks + 0.5) / (impressions + 15.0),
        "item_purchases": np.log1p(purchases),
    }


def item_attribute_columns(price: np.ndarray, has_item: np.ndarray) -> dict[str, np.ndarray]:
    """``price``: NaN where unknown; ``has_item``: the row names an item (known or not)."""
    return {"log_price": np.log1p(np.nan_to_num(price, nan=0.0)), "has_item": has_item.astype(np.float64)}


def position_columns(position: np.ndarray) -> dict[str, np.ndarray]:
    """``position``: the feed slot, NaN where the row has none (ad and user rows)."""
    return {"position": np.log1p(np.nan_to_num(position, nan=0.0))}


def time_columns(
    ts: np.ndarray, last_event: np.ndarray, signup: np.ndarray, created: np.ndarray, first_seen: np.ndarray
) -> dict[str, np.ndarray]:
    """What depends on the row's time ``ts`` (datetime64[us]) given the entities' anchors.

    ``last_event``: epoch second of the user's last event before the row (-1: none); ``signup``, ``created``
    and ``first_seen`` (the item's first event in the snapshot): datetime64[us], NaT where unknown. Also
    returns ITEM_AGE_DAYS, the item's age before its transform.
    """
    since_last = np.where(last_event >= 0, (_epoch_seconds(ts) - last_event) / 86_400, 60.0)
    since_signup = np.where(np.isnat(signup), 365.0, (ts - signup) / DAY)
    fallback = np.where(np.isnat(first_seen), 0.0, np.maximum((ts - first_seen) / DAY, 0.0))
    item_age = np.where(np.isnat(created), fallback, (ts - created) / DAY)
    return {
        **_cyclic(ts),
        "user_days_since_last": np.log1p(np.clip(since_last, 0, 60)),
        "user_days_since_signup": np.log1p(np.clip(since_signup, 0, 365)),
        "item_age_days": np.log1p(np.clip(item_age, 0, 365)),
        ITEM_AGE_DAYS: item_age,
    }


def numeric_matrix(columns: dict[str, np.ndarray]) -> np.ndarray:
    """[N, len(NUMERIC)] float32 from one float64 column per NUMERIC feature (extra entries are ignored)."""
    return np.column_stack([columns[name] for name in NUMERIC]).astype(np.float32)


def _texts(rows: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """Item title for feed rows, ad copy for ad rows, nothing for user rows; distinct texts indexed from 1."""
    text = np.where(rows["space"].to_numpy() == "ads", rows.get("ad_text"), rows["title"])
    text = pd.Series(text, dtype=object)
    text = text.where(text.notna() & (text.astype(str).str.strip() != ""), None)
    text[(rows["space"] == "users").to_numpy()] = None
    codes, uniques = pd.factorize(text, use_na_sentinel=True)
    return [str(u) for u in uniques], (codes + 1).astype(np.int64)


def too_little_data(
    counts: dict[str, dict[str, int]], empty: list[str], tasks: list[TaskSpec], settings: FeatureSettings, days: float
) -> str:
    """Why some tasks have no examples in a split, and which settings would give them some."""
    spaces = {task.name: task.sample_space for task in tasks}
    used = settings.history_days + settings.valid_days + settings.holdout_days
    hints = [
        f"the window holds {days:g} days, of which features.history_days ({settings.history_days}), "
        f"features.valid_days ({settings.valid_days}) and features.holdout_days ({settings.holdout_days}) take {used}"
    ]
    if any(spaces.get(name) == "users" for name in empty):
        hints.append(
            f"a churn example needs features.churn_horizon_days ({settings.churn_horizon_days}) after its cut-off, "
            "and the cut-offs of the holdout's labels end inside the window: shorten the horizon or lengthen "
            "the window (pipeline.lookback_days)"
        )
    if any(spaces.get(name) in ("feed", "ads") for name in empty):
        hints.append(
            "feed and ad tasks need their events (impressions, ad impressions) in every split: imported logs "
            "without impressions give none, so learn cvr from clicks instead (a task with sample_space: clicks, "
            "label: purchased; features.purchase_window_hours sets how long after a click a purchase counts) "
            "and drop the ctr and ad_ctr tasks"
        )
    per_split = {name: counts[name] for name in empty}
    return (
        f"task(s) {', '.join(empty)} have no examples in some split ({json.dumps(per_split)}): "
        + "; ".join(hints)
        + "; or drop the task from the settings' tasks"
    )


def split_summary(examples: Examples) -> dict[str, dict[str, int]]:
    """Examples per task and split: what the on-call checks first when a task has no data."""
    summary: dict[str, dict[str, int]] = {}
    for t, name in enumerate(examples.task_names):
        defined = ~np.isnan(examples.labels[:, t])
        summary[name] = {split: int((defined & (examples.split == split)).sum()) for split in SPLITS}
    return summary


# --- the example set on disk: built once per run, read by training, evaluation and registration ---------
EXAMPLES_FILE = "examples.parquet"
TEXTS_FILE = "texts.parquet"
EXAMPLES_META = "examples.json"
ID_FEATURES = ("user", "item", "ad")


def save_examples(examples: Examples, directory: str | Path) -> None:
    """Write the examples as Parquet (columns as built, labels with their NaN) into ``directory``, atomically.

    ``load_examples`` gives back equal arrays, so a model trained on loaded examples is the model trained on
    freshly built ones.
    """
    out = Path(directory)
    columns: dict[str, pa.Array] = {}
    for name in CATEGORICAL:
        values = examples.raw[name]
        if name in ID_FEATURES:
            columns[f"raw.{name}"] = pa.array(pd.array(values, dtype="Int64"), type=pa.int64())
        else:
            columns[f"raw.{name}"] = pa.array([None if _missing(v) else str(v) for v in values], type=pa.string())
    for i, name in enumerate(NUMERIC):
        columns[f"numeric.{name}"] = pa.array(np.ascontiguousarray(examples.numeric[:, i]))
    for t, task in enumerate(examples.task_names):
        columns[f"label.{task}"] = pa.array(np.ascontiguousarray(examples.labels[:, t]))
    columns["text_index"] = pa.array(examples.text_index)
    columns["split"] = pa.array(np.asarray(examples.split, dtype=str))
    columns["time"] = pa.array(examples.time.astype("datetime64[us]"))
    for name in ("event_id", "click_event_id", "new_user", "cold_item"):
        columns[name] = pa.array(getattr(examples, name))
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        pq.write_table(pa.table(columns), staging / EXAMPLES_FILE)
        pq.write_table(pa.table({"text": pa.array(examples.texts, type=pa.string())}), staging / TEXTS_FILE)
        meta = {
            "task_names": examples.task_names,
            "interval": [str(examples.interval[0]), str(examples.interval[1])],
            "rows": len(examples),
        }
        (staging / EXAMPLES_META).write_text(json.dumps(meta, indent=2))
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_examples(directory: str | Path) -> Examples:
    """The examples ``save_examples`` wrote."""
    path = Path(directory)
    if not (path / EXAMPLES_META).is_file():
        raise FeatureError(
            f"{path} holds no example set: {EXAMPLES_META} is missing (the build_features step writes it)"
        )
    meta = json.loads((path / EXAMPLES_META).read_text())
    table = pq.read_table(path / EXAMPLES_FILE)
    raw = {}
    for name in CATEGORICAL:
        column = table.column(f"raw.{name}")
        if name in ID_FEATURES:
            raw[name] = pd.array(column.to_pandas(), dtype="Int64").to_numpy(dtype=object, na_value=None)
        else:  # missing as NaN, as the joins of build_examples leave it
            raw[name] = np.array([np.nan if v is None else v for v in column.to_pylist()], dtype=object)
    return Examples(
        raw=raw,
        numeric=np.column_stack([table.column(f"numeric.{n}").to_numpy() for n in NUMERIC]).astype(np.float32),
        text_index=table.column("text_index").to_numpy(),
        texts=pq.read_table(path / TEXTS_FILE).column("text").to_pylist(),
        labels=np.column_stack([table.column(f"label.{t}").to_numpy() for t in meta["task_names"]]).astype(np.float32)
        if meta["task_names"]
        else np.zeros((table.num_rows, 0), dtype=np.float32),
        task_names=list(meta["task_names"]),
        split=np.asarray(table.column("split").to_pylist(), dtype=str),
        time=table.column("time").to_numpy().astype("datetime64[us]"),
        event_id=table.column("event_id").to_numpy(),
        click_event_id=table.column("click_event_id").to_numpy(),
        new_user=table.column("new_user").to_numpy(zero_copy_only=False),
        cold_item=table.column("cold_item").to_numpy(zero_copy_only=False),
        interval=(np.datetime64(meta["interval"][0], "us"), np.datetime64(meta["interval"][1], "us")),
    )


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


__all__ = [
    "CATEGORICAL",
    "ITEM_COUNT_FEATURES",
    "NUMERIC",
    "SPLITS",
    "USER_COUNT_FEATURES",
    "EventHistory",
    "Examples",
    "FeatureError",
    "FeatureSpace",
    "Vocab",
    "build_examples",
    "item_attribute_columns",
    "item_count_columns",
    "load_examples",
    "numeric_matrix",
    "position_columns",
    "save_examples",
    "split_summary",
    "time_columns",
    "user_count_columns",
]


# --- the serving frame: what a scoring request carries --------------------------------------------
def examples_frame(examples: Examples, rows: np.ndarray) -> pd.DataFrame:
    """Rows as a flat frame: raw categorical values, the (unstandardised) numeric features and the text.

    This is the input of the packaged model (MLflow pyfunc): a caller that computed these columns for
    new rows gets one probability per task back, without snapshots or history tables.
    """
    frame = pd.DataFrame({name: examples.raw[name][rows] for name in CATEGORICAL})
    for name in ("user", "item", "ad"):
        frame[name] = pd.array([None if v is None else str(v) for v in frame[name]], dtype="string")
    for name in CATEGORICAL:
        if name not in ("user", "item", "ad"):
            frame[name] = frame[name].astype("string")
    numeric = pd.DataFrame(examples.numeric[rows], columns=list(NUMERIC))
    frame = pd.concat([frame, numeric], axis=1)
    texts = np.asarray([None, *examples.texts], dtype=object)[examples.text_index[rows]]
    frame["text"] = pd.array(texts, dtype="string")
    return frame


def frame_examples(frame: pd.DataFrame, task_names: list[str]) -> Examples:
    """The inverse of ``examples_frame``: a scoring request as Examples (labels unknown, split "holdout")."""
    missing = [c for c in (*CATEGORICAL, *NUMERIC, "text") if c not in frame.columns]
    if missing:
        raise FeatureError(f"scoring input lacks column(s) {', '.join(missing)}")
    n = len(frame)
    raw = {}
    for name in CATEGORICAL:
        values = frame[name].astype(object).where(frame[name].notna(), None).to_numpy(dtype=object)
        if name in ("user", "item", "ad"):  # ids arrive as text; vocabularies hold the warehouse's integers
            values = np.array([_as_id(v) for v in values], dtype=object)
        raw[name] = values
    text = frame["text"].astype(object).where(frame["text"].notna(), None)
    codes, uniques = pd.factorize(text, use_na_sentinel=True)
    return Examples(
        raw=raw,
        numeric=frame[list(NUMERIC)].to_numpy(dtype=np.float32),
        text_index=(codes + 1).astype(np.int64),
        texts=[str(u) for u in uniques],
        labels=np.full((n, len(task_names)), np.nan, dtype=np.float32),
        task_names=list(task_names),
        split=np.full(n, "holdout", dtype=object),
        time=np.full(n, np.datetime64("NaT"), dtype="datetime64[us]"),
        event_id=np.zeros(n, dtype=np.int64),
        click_event_id=np.zeros(n, dtype=np.int64),
        new_user=np.zeros(n, dtype=bool),
        cold_item=np.zeros(n, dtype=bool),
        interval=(np.datetime64("NaT"), np.datetime64("NaT")),
    )


def _as_id(value: Any) -> Any:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return value
