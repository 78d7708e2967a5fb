"""Drift: has the shop moved between a window's training part and its newest week, and have the served scores
moved away from the holdout's?

Both compare distributions with the population stability index, PSI = sum((c - r) * ln(c / r)) over the bins
of the reference r and the current c (shares; an empty bin counts as ``PSI_EPSILON``). PSI is written here
in a few lines rather than taken from Evidently, whose dependency tree (and its own pins of pandas, numpy and
pydantic, which this project's would have to match) is far heavier than the computation it would replace.

* ``snapshot_drift`` (the validate step) reads a snapshot's tables and reports, between the training window
  (everything before the newest ``newest_days``) and the newest days, the PSI of what a change in the shop
  moves (prices, positions, hours, categories, who is active, how active) and the label rates of both
  periods. ``check_drift`` stops the run on drift when ``drift.on_drift`` is ``stop``; by default it warns.
* ``score_drift`` (the serving monitor) compares each task's served score distribution with the holdout's;
  ``check_scores`` raises the on-call message when one shifted.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mtl_core.config import DriftSettings
from mtl_core.data.extract import read_manifest, read_snapshot_table
from mtl_core.errors import MtlError

# Share given to a bin one side leaves empty: without it one unseen category would make PSI infinite.
PSI_EPSILON = 1e-4
MISSING = "(missing)"
US_PER_SECOND = 1_000_000
US_PER_DAY = 86_400 * US_PER_SECOND
RUNBOOK_SCORES = "docs/RUNBOOK.md#served-scores-shifted"


class DriftInputError(MtlError):
    """Values PSI cannot compare: an empty side, too few bins, scores of a task with no reference."""


class DriftDetected(MtlError):
    """The newest week drifted past ``drift.psi_threshold`` and ``drift.on_drift`` is ``stop``."""


class ScoresShifted(MtlError):
    """The served scores of a task moved away from its holdout's past ``drift.score_psi_threshold``."""


# ---- PSI ------------------------------------------------------------------------------------------
def _psi_of_counts(reference: np.ndarray, current: np.ndarray) -> float:
    ref = np.maximum(reference / reference.sum(), PSI_EPSILON)
    cur = np.maximum(current / current.sum(), PSI_EPSILON)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def _require_values(reference_size: int, current_size: int) -> None:
    if reference_size == 0 or current_size == 0:
        empty = "reference" if reference_size == 0 else "current"
        raise DriftInputError(f"PSI needs values on both sides, the {empty} side has none")


def psi(reference: Any, current: Any, bins: int = 10) -> float:
    """PSI of numeric values: equal-frequency bins cut at the reference's quantiles, the outer two open-ended
    (values beyond the reference's range fall in them), NaN as a bin of its own.

    Quantiles that coincide (discrete values) merge their bins, so each distinct value keeps one bin.
    """
    if int(bins) != bins or bins < 2:
        raise DriftInputError(f"PSI needs at least 2 bins, got {bins!r}")
    ref = np.asarray(reference, dtype=np.float64).ravel()
    cur = np.asarray(current, dtype=np.float64).ravel()
    _require_values(ref.size, cur.size)
    ref_nan, cur_nan = np.isnan(ref), np.isnan(cur)
    finite = ref[~ref_nan]
    inner = np.linspace(0.0, 1.0, int(bins) + 1)[1:-1]
    edges = np.unique(np.quantile(finite, inner)) if finite.size else np.empty(0)
    # side="right": a value equal to an edge goes above it, so a discrete value that is an edge owns its bin.
    ref_counts = np.bincount(np.searchsorted(edges, finite, side="right"), minlength=edges.size + 1)
    cur_counts = np.bincount(np.searchsorted(edges, cur[~cur_nan], side="right"), minlength=edges.size + 1)
    return _psi_of_counts(
        np.append(ref_counts, ref_nan.sum()).astype(np.float64),
        np.append(cur_counts, cur_nan.sum()).astype(np.float64),
    )


def psi_categorical(reference: Any, current: Any) -> float:
    """PSI of categories over those of both sides: one the reference never saw counts, with the reference's
    share ``PSI_EPSILON``. A missing value (None, NaN) is a category of its own."""
    ref = pd.Series(np.asarray(reference, dtype=object).ravel()).fillna(MISSING)
    cur = pd.Series(np.asarray(current, dtype=object).ravel()).fillna(MISSING)
    _require_values(len(ref), len(cur))
    counts = pd.concat([ref.value_counts(), cur.value_counts()], axis=1, keys=["ref", "cur"]).fillna(0)
    return _psi_of_counts(counts["ref"].to_numpy(np.float64), counts["cur"].to_numpy(np.float64))


def _psi_of_codes(codes: np.ndarray, in_reference: np.ndarray, categories: int) -> float:
    """psi_categorical of integer-coded values split by a mask, without making strings of 10M rows."""
    ref = np.bincount(codes[in_reference], minlength=categories).astype(np.float64)
    cur = np.bincount(codes[~in_reference], minlength=categories).astype(np.float64)
    _require_values(int(ref.sum()), int(cur.sum()))
    seen = (ref + cur) > 0
    return _psi_of_counts(ref[seen], cur[seen])


# ---- reading a snapshot ---------------------------------------------------------------------------
def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """A string column as integer codes and their labels; null is the label ``MISSING``."""
    encoded = pc.dictionary_encode(column.combine_chunks())
    labels = [str(v) for v in encoded.dictionary.to_pylist()] + [MISSING]
    codes = encoded.indices.fill_null(len(labels) - 1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, labels


def _micros(column: pa.ChunkedArray) -> np.ndarray:
    return column.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy()


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    return column.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


def _instant_micros(value: str) -> int:
    stamp = pd.Timestamp(value)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return int(stamp.value // 1000)


def _iso(micros: int) -> str:
    return datetime.fromtimestamp(micros / US_PER_SECOND, UTC).replace(tzinfo=None).isoformat() + "Z"


def _lookup(keys: np.ndarray, table_keys: np.ndarray) -> np.ndarray:
    """Row of each key in ``table_keys`` (a dimension table's ids), -1 where it is not there."""
    if table_keys.size == 0:
        return np.full(keys.size, -1, dtype=np.int64)
    order = np.argsort(table_keys, kind="stable")
    at = np.minimum(np.searchsorted(table_keys[order], keys), table_keys.size - 1)
    return np.where(table_keys[order][at] == keys, order[at], -1)


def _dimension_codes(rows: np.ndarray, codes: np.ndarray, labels: list[str]) -> tuple[np.ndarray, list[str]]:
    """Codes of a dimension column for looked-up rows; a key the table lacks is ``MISSING`` too."""
    missing = labels.index(MISSING)
    return np.where(rows >= 0, codes[np.maximum(rows, 0)], missing), labels


def _active_users(users: np.ndarray, ts: np.ndarray, start: int, end: int) -> np.ndarray:
    return np.unique(users[(ts >= start) & (ts < end)])


def _inactive_share(users: np.ndarray, ts: np.ndarray, before: int, start: int, end: int) -> float | None:
    """Of the users active in [before, start), the share with no event in [start, end)."""
    earlier = _active_users(users, ts, before, start)
    if earlier.size == 0:
        return None
    return float(np.mean(~np.isin(earlier, _active_users(users, ts, start, end), assume_unique=True)))


def _empty_report(
    reference: dict[str, Any], current: dict[str, Any], settings: DriftSettings, reason: str
) -> dict[str, Any]:
    return {
        "reference": reference,
        "current": current,
        "threshold": float(settings.psi_threshold),
        "action": settings.on_drift,
        "features": [],
        "labels": [],
        "drifted": [],
        "max_psi": 0.0,
        "skipped": reason,
    }


def snapshot_drift(snapshot_dir: str | Path, settings: DriftSettings, newest_days: int = 7) -> dict[str, Any]:
    """PSI per feature and the label rates between a snapshot's training window (before its newest
    ``newest_days``) and its newest days; the JSON-ready report the validate step keeps and the reviewer
    page shows. A window too short to hold both, or a period without feed impressions, gives a report with a
    ``skipped`` reason and no features.

    Features (per feed impression unless said): price, position, hour of day and weekday, item category;
    the category of clicked items; region and age band of the users active in the period; events (feed and
    ads) per active user and day; the share of each event type (feed, ads). Labels: click rate
    (clicks/impressions), purchases per click, ad click rate, and the share of the users active in the
    period's preceding ``newest_days`` who are not active in it (a churn proxy; the reference's is the same
    for the ``newest_days`` just before the newest, so both cover equal spans; left out when the window is
    shorter than three periods). ``change`` is current minus reference. Ad features and rates are left out
    when a period has no ad impressions.
    """
    if newest_days < 1:
        raise DriftInputError(f"newest_days must be at least 1, got {newest_days}")
    snapshot = Path(snapshot_dir)
    interval = read_manifest(snapshot)["interval"]
    start, end = _instant_micros(interval["start"]), _instant_micros(interval["end"])
    cut = end - newest_days * US_PER_DAY
    behavior = read_snapshot_table(snapshot, "behavior_events", ["user_id", "item_id", "event_type", "ts", "position"])
    ads = read_snapshot_table(snapshot, "ad_events", ["user_id", "event_type", "ts"])
    b_ts, a_ts = _micros(behavior.column("ts")), _micros(ads.column("ts"))
    b_ref, a_ref = b_ts < cut, a_ts < cut
    reference = {"start": _iso(start), "end": _iso(max(cut, start)), "rows": int(b_ref.sum() + a_ref.sum())}
    current = {"start": _iso(max(cut, start)), "end": _iso(end), "rows": int((~b_ref).sum() + (~a_ref).sum())}
    if cut - start < US_PER_DAY:
        days = (end - start) / US_PER_DAY
        return _empty_report(
            reference,
            current,
            settings,
            f"the window is {days:g} days long: it needs the newest {newest_days} days plus at least one day "
            "before them to compare them with",
        )

    b_type, b_types = _codes(behavior.column("event_type"))
    impression = b_type == (b_types.index("impression") if "impression" in b_types else -1)
    imp_ref = b_ref[impression]
    for side, name in ((imp_ref, "training window"), (~imp_ref, f"newest {newest_days} days")):
        if not side.any():
            return _empty_report(reference, current, settings, f"no feed impressions in the {name}")

    features: list[dict[str, Any]] = []

    def add(name: str, kind: str, table: str, value: float) -> None:
        features.append({"name": name, "kind": kind, "table": table, "psi": round(value, 6)})

    items = read_snapshot_table(snapshot, "items", ["item_id", "category", "price"])
    item_row = _lookup(behavior.column("item_id").to_numpy(), items.column("item_id").to_numpy())
    price = np.where(item_row >= 0, _floats(items.column("price"))[np.maximum(item_row, 0)], np.nan)[impression]
    bins = settings.bins
    add("impression_price", "numeric", "items", psi(price[imp_ref], price[~imp_ref], bins))
    position = _floats(behavior.column("position"))[impression]
    add("impression_position", "numeric", "behavior_events", psi(position[imp_ref], position[~imp_ref], bins))
    seconds = b_ts[impression] // US_PER_SECOND
    hour = (seconds // 3600) % 24
    add("impression_hour", "categorical", "behavior_events", _psi_of_codes(hour, imp_ref, 24))
    weekday = (seconds // 86_400 + 3) % 7  # 1970-01-01 was a Thursday; Monday is 0
    add("impression_weekday", "categorical", "behavior_events", _psi_of_codes(weekday, imp_ref, 7))
    category, categories = _dimension_codes(item_row, *_codes(items.column("category")))
    add("impression_category", "categorical", "items", _psi_of_codes(category[impression], imp_ref, len(categories)))
    # What users click moves with their tastes even where what the shop shows them does not.
    click = b_type == (b_types.index("click") if "click" in b_types else -1)
    if click[b_ref].any() and click[~b_ref].any():
        add("click_category", "categorical", "items", _psi_of_codes(category[click], b_ref[click], len(categories)))

    users = read_snapshot_table(snapshot, "users", ["user_id", "region", "age_band"])
    user_keys = users.column("user_id").to_numpy()
    b_user, a_user = behavior.column("user_id").to_numpy(), ads.column("user_id").to_numpy()
    all_user, all_ts = np.concatenate([b_user, a_user]), np.concatenate([b_ts, a_ts])
    active_ref = _active_users(all_user, all_ts, start, cut)
    active_cur = _active_users(all_user, all_ts, cut, end)
    active = np.concatenate([active_ref, active_cur])
    active_in_ref = np.arange(active.size) < active_ref.size
    rows = _lookup(active, user_keys)
    for column in ("region", "age_band"):
        codes, names = _dimension_codes(rows, *_codes(users.column(column)))
        add(f"user_{column}", "categorical", "users", _psi_of_codes(codes, active_in_ref, len(names)))

    # One count per (user, UTC day) with any event; the period is part of the key, so a day the cut splits
    # counts on each side for what happened there.
    user_code = pd.factorize(all_user)[0].astype(np.int64)
    day = all_ts // US_PER_DAY
    day -= day.min()
    in_ref = all_ts < cut
    key = (user_code * (int(day.max()) + 1) + day) * 2 + in_ref
    per_day = pd.Series(key).value_counts(sort=False)
    per_day_ref = (per_day.index.to_numpy() % 2) == 1
    counts = per_day.to_numpy(np.float64)
    add(
        "events_per_user_day",
        "numeric",
        "behavior_events, ad_events",
        psi(counts[per_day_ref], counts[~per_day_ref], bins),
    )
    add("event_type", "categorical", "behavior_events", _psi_of_codes(b_type, b_ref, len(b_types)))

    a_type, a_types = _codes(ads.column("event_type"))
    ad_impression = a_type == (a_types.index("ad_impression") if "ad_impression" in a_types else -1)
    ads_in_both = ad_impression[a_ref].any() and ad_impression[~a_ref].any()
    if ads_in_both:
        add("ad_event_type", "categorical", "ad_events", _psi_of_codes(a_type, a_ref, len(a_types)))

    labels: list[dict[str, Any]] = []

    def rate(name: str, types: list[str], codes: np.ndarray, in_ref: np.ndarray, num: str, den: str) -> None:
        def of(side: np.ndarray) -> float | None:
            kinds = codes[side]
            below = int(np.sum(kinds == types.index(den))) if den in types else 0
            above = int(np.sum(kinds == types.index(num))) if num in types else 0
            return above / below if below else None

        label(name, of(in_ref), of(~in_ref))

    def label(name: str, ref_value: float | None, cur_value: float | None) -> None:
        if ref_value is not None and cur_value is not None:
            labels.append(
                {
                    "name": name,
                    "reference": round(ref_value, 6),
                    "current": round(cur_value, 6),
                    "change": round(cur_value - ref_value, 6),
                }
            )

    rate("click_rate", b_types, b_type, b_ref, "click", "impression")
    rate("purchase_per_click", b_types, b_type, b_ref, "purchase", "click")
    if ads_in_both:
        rate("ad_click_rate", a_types, a_type, a_ref, "ad_click", "ad_impression")
    span = newest_days * US_PER_DAY
    if cut - 2 * span >= start:
        label(
            "inactive_user_share",
            _inactive_share(all_user, all_ts, cut - 2 * span, cut - span, cut),
            _inactive_share(all_user, all_ts, cut - span, cut, end),
        )

    threshold = float(settings.psi_threshold)
    for feature in features:
        feature["drifted"] = feature["psi"] > threshold
    return {
        "reference": reference,
        "current": current,
        "threshold": threshold,
        "action": settings.on_drift,
        "features": features,
        "labels": labels,
        "drifted": [f["name"] for f in features if f["drifted"]],
        "max_psi": max(f["psi"] for f in features),
    }


def check_drift(report: Mapping[str, Any], settings: DriftSettings) -> None:
    """Raise ``DriftDetected`` when a feature's PSI is above ``settings.psi_threshold`` and
    ``settings.on_drift`` is ``stop``; with ``warn`` (or a skipped report) return, and the caller logs.

    Judged against the settings given, not the report's own threshold and action, so a re-run with a raised
    threshold or ``MTL_DRIFT__ON_DRIFT=warn`` goes on with the report it already wrote.
    """
    if settings.on_drift != "stop" or report.get("skipped"):
        return
    threshold = float(settings.psi_threshold)
    drifted = [f for f in report.get("features", []) if f["psi"] > threshold]
    if not drifted:
        return
    ref, cur = report["reference"], report["current"]
    named = ", ".join(f"{f['name']} ({f['table']}) PSI {f['psi']:.3f}" for f in drifted)
    raise DriftDetected(
        f"the newest days {cur['start']}..{cur['end']} drifted from the training window {ref['start']}..{ref['end']}: "
        f"{named}, above drift.psi_threshold {threshold:g}, and drift.on_drift is stop; check the data "
        "(validation/drift.json in the snapshot lists every feature's PSI and the label rates), then raise "
        f"drift.psi_threshold (MTL_DRIFT__PSI_THRESHOLD) or set drift.on_drift: warn (MTL_DRIFT__ON_DRIFT=warn) "
        "to continue"
    )


# ---- served scores --------------------------------------------------------------------------------
def score_drift(
    reference: Mapping[str, np.ndarray], served: Mapping[str, np.ndarray], settings: DriftSettings
) -> dict[str, Any]:
    """Per task, the PSI of the served scores against the holdout's (``reference``), in ``settings.bins``
    equal-frequency bins of the holdout's scores.

    A task's status is ``waiting`` with fewer than ``settings.min_served`` served scores (too few to tell a
    shift from noise), else ``shifted`` above ``settings.score_psi_threshold``, else ``ok``. The overall
    ``status`` is ``shifted`` if any task is, ``ok`` if every task was judged ok, else ``waiting``.
    """
    unknown = sorted(set(served) - set(reference))
    if unknown:
        raise DriftInputError(
            f"served scores of task {', '.join(unknown)} have no holdout scores to compare with (the holdout has "
            f"{', '.join(sorted(reference)) or 'none'}); the served model and the stored reference disagree on "
            "the tasks"
        )
    threshold = float(settings.score_psi_threshold)
    tasks = []
    for task, holdout in reference.items():
        ref = np.asarray(holdout, dtype=np.float64).ravel()
        if ref.size == 0:
            raise DriftInputError(f"the holdout reference of task {task} holds no scores to compare served ones with")
        now = np.asarray(served.get(task, ()), dtype=np.float64).ravel()
        entry: dict[str, Any] = {"task": task, "reference": int(ref.size), "served": int(now.size), "psi": None}
        if now.size < settings.min_served:
            entry["status"] = "waiting"
        else:
            entry["psi"] = round(psi(ref, now, settings.bins), 6)
            entry["status"] = "shifted" if entry["psi"] > threshold else "ok"
        tasks.append(entry)
    shifted = [t["task"] for t in tasks if t["status"] == "shifted"]
    judged_ok = bool(tasks) and all(t["status"] == "ok" for t in tasks)
    return {
        "threshold": threshold,
        "min_served": int(settings.min_served),
        "tasks": tasks,
        "shifted": shifted,
        "status": "shifted" if shifted else "ok" if judged_ok else "waiting",
    }


def check_scores(report: Mapping[str, Any], model_name: str, version: str | int) -> None:
    """Raise ``ScoresShifted`` with the on-call message when ``score_drift`` found a task shifted."""
    names = set(report.get("shifted", ()))
    shifted = [t for t in report.get("tasks", []) if t["task"] in names]
    if not shifted:
        return
    named = "; ".join(f"{t['task']} PSI {t['psi']:.3f} over {t['served']:,} served scores" for t in shifted)
    raise ScoresShifted(
        f"the scores {model_name} v{version} serves moved away from its holdout's: {named} (threshold "
        f"drift.score_psi_threshold {report['threshold']:g}). It may mean the traffic drifted (new users, items "
        "or categories), a broken feature publish (missing or stale features turn rows into cold-start scores), "
        "or a client sending other traffic (a test, a bot, a new caller). Compare the per-task score histograms "
        f"on the server's /metrics with the holdout's, check mtl status (is v{version} the champion served?) and "
        f"re-publish its features with mtl publish; if the model is at fault, mtl rollback --by <you> --why "
        f"<reason>. Runbook: {RUNBOOK_SCORES}"
    )


__all__ = [
    "PSI_EPSILON",
    "DriftDetected",
    "DriftInputError",
    "ScoresShifted",
    "check_drift",
    "check_scores",
    "psi",
    "psi_categorical",
    "score_drift",
    "snapshot_drift",
]
