"""Whole-snapshot checks GX has no expectation for: label rates, label leakage, ids in dimension tables, parent
links between events, the newest week against the weeks before it, and the row-count bounds of the event tables
against the previous snapshot."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from mtl_core.data import warehouse as wh
from mtl_core.jsonable import to_jsonable

LEAKAGE_SAMPLE_ROWS = 200_000
ID_COLUMNS = frozenset({"event_id", "parent_event_id", "user_id", "item_id", "ad_id", "session_id"})
SAMPLE_VALUES = 5  # sample values reported per failing expectation or check
SAMPLE_CHARS = 120  # a longer text sample is cut (a 100 kB title must not become a 500 kB message)
WILSON_Z = 2.576  # two-sided 99 %


@dataclass(frozen=True)
class LabelRate:
    """A label rate (numerator events / denominator events of one table) and its plausible bounds."""

    task: str
    table: str
    numerator: str
    denominator: str
    low: float
    high: float


LABEL_RATES = (
    LabelRate("ctr", "behavior_events", "click", "impression", 0.002, 0.3),
    LabelRate("cvr", "behavior_events", "purchase", "click", 0.005, 0.6),
    LabelRate("ad_ctr", "ad_events", "ad_click", "ad_impression", 0.001, 0.2),
)


def sample_value(value: Any) -> Any:
    """A reported sample value: JSON-ready, a long text cut to SAMPLE_CHARS with its length said."""
    value = to_jsonable(value)
    if isinstance(value, str) and len(value) > SAMPLE_CHARS:
        return f"{value[: SAMPLE_CHARS - 40]}... ({len(value):,} characters)"
    return value


def _instant(value: str) -> pd.Timestamp:
    return pd.Timestamp(value.replace("Z", "+00:00")).tz_convert("UTC")


def _interval_days(interval: Mapping[str, str]) -> float:
    return (_instant(interval["end"]) - _instant(interval["start"])).total_seconds() / 86_400


def volume_bounds(
    table: str, rows: int, policy: Mapping[str, Any], interval: Mapping[str, str], previous: dict[str, Any] | None
) -> dict[str, Any]:
    """Row-count bounds of one event table and how they were derived (reported with a failure)."""
    min_rows = int(policy.get("min_rows", 0))
    low_ratio, high_ratio = float(policy.get("min_ratio", 0.3)), float(policy.get("max_ratio", 3.0))
    volume: dict[str, Any] = {"rows": rows, "min_rows": min_rows, "max_rows": None, "rows_per_day": None}
    days = _interval_days(interval)
    volume["rows_per_day"] = round(rows / days, 3) if days > 0 else None
    if previous is None:
        volume["basis"] = f"no previous snapshot: only the minimum of {min_rows} rows applies"
        return volume
    prev_rows = int(previous["tables"].get(table, {}).get("rows", 0))
    prev_days = _interval_days(previous["interval"])
    if prev_rows == 0 or prev_days <= 0:
        volume["basis"] = f"previous snapshot has no {table} rows: only the minimum of {min_rows} rows applies"
        return volume
    prev_per_day = prev_rows / prev_days
    expected = prev_per_day * days
    volume.update(
        min_rows=max(min_rows, math.floor(low_ratio * expected)),
        max_rows=math.ceil(high_ratio * expected),
        previous_rows=prev_rows,
        previous_rows_per_day=round(prev_per_day, 3),
        basis=(
            f"{low_ratio:g}x..{high_ratio:g}x of the previous snapshot's {prev_per_day:.1f} rows/day "
            f"x {days:g} days (expected {expected:.0f}); this snapshot has {volume['rows_per_day']} rows/day"
        ),
    )
    return volume


def duplicate_mostly(rows: int, policy: Mapping[str, Any]) -> float:
    """Share of rows that must be unique on the retry key: a few genuine repeats pass in any table size."""
    if rows == 0:
        return 1.0
    tolerated = max(float(policy.get("max_share", 0.005)), float(policy.get("max_rows", 10)) / rows)
    return round(max(0.0, 1.0 - tolerated), 6)


# ---- whole-snapshot checks ------------------------------------------------------------------------------
def _wilson(successes: int, trials: int, z: float = WILSON_Z) -> tuple[float, float]:
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def check_label_rates(frames: Mapping[str, pd.DataFrame]) -> list[dict[str, Any]]:
    """Each task's label rate against its plausible bounds (see the module docstring)."""
    checks = []
    for rate in LABEL_RATES:
        counts = frames[rate.table]["event_type"].value_counts()
        num, den = int(counts.get(rate.numerator, 0)), int(counts.get(rate.denominator, 0))
        check: dict[str, Any] = {
            "check": "expect_label_rate_to_be_between",
            "name": rate.task,
            "table": rate.table,
            "column": "event_type",
            "numerator": num,
            "denominator": den,
            "bounds": [rate.low, rate.high],
            "skipped": False,
        }
        if den == 0:
            check.update(
                success=True,
                skipped=True,
                rate=None,
                note=f"skipped: no {rate.denominator} events, so {rate.task} has no examples in this snapshot"
                + (" (imported behaviour logs carry none)" if "impression" in rate.denominator else ""),
            )
            checks.append(check)
            continue
        observed = num / den
        low, high = _wilson(num, den)
        check.update(rate=round(observed, 6), wilson_interval=[round(low, 6), round(high, 6)])
        check["success"] = not (high < rate.low or low > rate.high)
        if check["success"] and not rate.low <= observed <= rate.high:
            check["note"] = (
                f"{rate.task} {observed:.4g} is outside [{rate.low}, {rate.high}] but {den} {rate.denominator} "
                "events are too few to call it broken"
            )
        checks.append(check)
    return checks


def _click_labels(frame: pd.DataFrame, impression: str, click: str) -> tuple[pd.DataFrame, np.ndarray]:
    impressions = frame[frame["event_type"] == impression]
    parents = frame.loc[frame["event_type"] == click, "parent_event_id"].dropna().to_numpy(dtype=np.int64)
    clicked = np.isin(impressions["event_id"].to_numpy(dtype=np.int64), parents)
    return impressions, clicked


def _leak_reason(values: pd.Series, label: np.ndarray) -> tuple[str, int] | None:
    """Why ``values`` predicts ``label`` perfectly (and on how many rows), or None."""
    missing = values.isna().to_numpy()
    if missing.any() and not missing.all() and (np.array_equal(missing, label) or np.array_equal(missing, ~label)):
        return "is null exactly on the rows of one label value", int(len(label))
    present = values[~missing]
    y = label[~missing]
    if len(y) < 2 or y.all() or not y.any():
        return None
    if pd.api.types.is_datetime64_any_dtype(present):
        present = present.astype("int64")  # epoch units; going through to_numpy() would box every value
    if pd.api.types.is_bool_dtype(present) or pd.api.types.is_numeric_dtype(present):
        keys: Any = present.to_numpy(dtype=np.float64)
        positive, negative = keys[y], keys[~y]
        if np.array_equal(keys, y.astype(np.float64)):
            return "equals the label", int(len(y))
        if positive.min() > negative.max() or positive.max() < negative.min():
            return "separates clicked from unclicked rows by a threshold", int(len(y))
    else:
        keys = present.to_numpy()
    # Purity needs 90 % of the rows in values seen at least twice, impossible with more than 0.55 n values;
    # counting first keeps unique-per-row columns (timestamps, free text) cheap.
    if present.nunique() > 0.55 * len(y):
        return None
    groups = pd.DataFrame({"value": keys, "y": y}).groupby("value", sort=False)["y"]
    size, mean = groups.size(), groups.mean()
    seen_twice = mean[size >= 2]
    covered = int(size[size >= 2].sum())
    pure = ((seen_twice == 0) | (seen_twice == 1)).all()
    if covered >= 0.9 * len(y) and pure and (seen_twice == 1).any() and (seen_twice == 0).any():
        return "determines the label: every value seen twice is always or never clicked", covered
    return None


def check_leakage(
    frames: Mapping[str, pd.DataFrame], seed: int = 0, interval: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """No non-id column of the event tables predicts the click label perfectly (see the module docstring).

    With the snapshot's ``interval``, the newest week is judged on its own as well: a backfill that wrote the
    outcome into one week's rows is diluted by the clean weeks before it.
    """
    checks = []
    spaces = (("feed", "behavior_events", "impression", "click"), ("ads", "ad_events", "ad_impression", "ad_click"))
    cut = _newest_week_cut(interval) if interval is not None else None
    for space, table, impression, click in spaces:
        impressions, clicked = _click_labels(frames[table], impression, click)
        checks.append(_leakage(space, table, impression, click, impressions, clicked, seed))
        if cut is not None:
            newest = (impressions["ts"] >= cut).to_numpy()
            name = f"{space}, newest {NEWEST_DAYS} days"
            checks.append(_leakage(name, table, impression, click, impressions[newest], clicked[newest], seed))
    return checks


def _leakage(
    name: str, table: str, impression: str, click: str, impressions: pd.DataFrame, clicked: np.ndarray, seed: int
) -> dict[str, Any]:
    check: dict[str, Any] = {
        "check": "expect_no_label_leakage",
        "name": name,
        "table": table,
        "label": f"{click} whose parent_event_id is the {impression}",
        "skipped": False,
        "leaks": [],
    }
    if len(impressions) == 0 or not clicked.any() or clicked.all():
        check.update(
            success=True,
            skipped=True,
            note=f"skipped: no {impression} events with both clicked and unclicked ones "
            "(nothing to leak into; imported logs have no impressions)",
        )
        return check
    if len(impressions) > LEAKAGE_SAMPLE_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(len(impressions), LEAKAGE_SAMPLE_ROWS, replace=False))
        impressions, clicked = impressions.iloc[rows], clicked[rows]
    columns = [c for c in impressions.columns if c not in ID_COLUMNS and c != "event_type"]
    for column in columns:
        found = _leak_reason(impressions[column], clicked)
        if found:
            reason, rows_used = found
            sample = impressions[column].iloc[np.flatnonzero(clicked)[:SAMPLE_VALUES]]
            check["leaks"].append(
                {"column": column, "reason": reason, "rows": rows_used, "sample_values": to_jsonable(list(sample))}
            )
    check.update(success=not check["leaks"], columns_checked=columns, sample_rows=int(len(impressions)))
    return check


def check_references(frames: Mapping[str, pd.DataFrame]) -> list[dict[str, Any]]:
    """Every user and item an event names exists in the snapshot's dimension tables."""
    known = {
        "user_id": frames["users"]["user_id"].dropna().to_numpy(dtype=np.int64),
        "item_id": frames["items"]["item_id"].dropna().to_numpy(dtype=np.int64),
    }
    dimension = {"user_id": "users", "item_id": "items"}
    checks = []
    for table in wh.EVENT_TABLES:
        for column, ids in known.items():
            values = frames[table][column].dropna().to_numpy(dtype=np.int64)
            orphans = values[~np.isin(values, ids)]
            checks.append(
                {
                    "check": "expect_ids_to_exist_in_dimension_table",
                    "name": f"{table}.{column}",
                    "table": table,
                    "column": column,
                    "success": len(orphans) == 0,
                    "skipped": False,
                    "unexpected_count": int(len(orphans)),
                    "sample_values": [int(v) for v in pd.unique(orphans)[:SAMPLE_VALUES]],
                    "note": f"{len(orphans)} of {len(values)} rows name {_a(column)} missing from {dimension[column]} "
                    "(its row was never written, or is dated after the interval's end and so not yet part of it)",
                }
            )
    return checks


# child event type -> the type of the event it follows, per table (the shop's chains; imported logs have none).
PARENT_TYPES = {
    "behavior_events": {"click": "impression", "add_to_cart": "click", "purchase": "add_to_cart"},
    "ad_events": {"ad_click": "ad_impression"},
}
# A child in the interval's first day may follow a parent from before the interval: not extracted, not broken.
PARENT_GRACE = pd.Timedelta(hours=24)
# Broken links tolerated, as for duplicates: the larger of a share and a count (a rare lost beacon is no batch).
PARENT_TOLERANCE_SHARE, PARENT_TOLERANCE_ROWS = 0.005, 10


def check_parent_links(frames: Mapping[str, pd.DataFrame], interval: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every click follows an impression, every cart a click, every purchase a cart, every ad click an ad
    impression of the snapshot, and none of them is earlier than the event it follows.

    The labels are built from these links (learn/examples.py): a click whose impression is missing leaves an
    impression unlabelled and a click with no example, a purchase no click led to is counted in cvr by event
    type while no click's label gets it, a click stamped before its impression means one producer's clock or
    time zone is wrong. Children in the interval's first day (PARENT_GRACE) are not judged on missing parents,
    which may lie before the interval. A child type none of whose events has a parent (imported logs) is
    skipped. Up to the larger of PARENT_TOLERANCE_SHARE and PARENT_TOLERANCE_ROWS broken children pass.
    """
    judged_from = _instant(interval["start"]) + PARENT_GRACE
    checks: list[dict[str, Any]] = []
    for table, links in PARENT_TYPES.items():
        frame = frames[table]
        # Ids stay int64 (imported events' ids are 63-bit hashes, which float64 would merge).
        known = frame["event_id"].notna().to_numpy()
        by_id = pd.DataFrame(
            # .array keeps the time zone: to_numpy() would make one Timestamp object per event (a third of
            # validation's time at 1M events).
            {"event_type": frame["event_type"].to_numpy()[known], "ts": frame["ts"].array[known]},
            index=frame["event_id"].to_numpy(dtype=np.int64, na_value=0)[known],
        )
        by_id = by_id[~by_id.index.duplicated()]
        for child, parent in links.items():
            children = frame[frame["event_type"] == child]
            parents = children["parent_event_id"]
            name = f"{child} -> {parent}"
            if len(children) == 0 or parents.isna().all():
                note = f"skipped: no {child} event names a parent (imported logs carry no parent links)"
                checks.append(_link_check("expect_parent_links_to_resolve", name, table, "parent_event_id", note))
                continue
            named = parents.notna().to_numpy()
            parent_ids = parents.to_numpy(dtype=np.int64, na_value=0)
            found = named & np.isin(parent_ids, by_id.index.to_numpy())
            parent_type = np.full(len(children), None, dtype=object)
            parent_ts = np.full(len(children), np.datetime64("NaT"), dtype="datetime64[ns]")
            lookup = by_id.loc[parent_ids[found]]
            parent_type[found] = lookup["event_type"].to_numpy()
            parent_ts[found] = lookup["ts"].dt.tz_convert(None).to_numpy()
            judged = (children["ts"] >= judged_from).to_numpy()
            missing = judged & ~named
            absent = judged & named & ~found
            other = judged & found & (parent_type != parent)
            broken = missing | absent | other
            counted = int(judged.sum())
            note = (
                f"{int(broken.sum())} of {counted} {child} events after the interval's first "
                f"{PARENT_GRACE.total_seconds() / 3600:g} h do not follow {_a(parent)} of the snapshot: "
                f"{int(missing.sum())} have no parent_event_id, {int(absent.sum())} name an event the snapshot "
                f"lacks, {int(other.sum())} name another event type"
            )
            samples = [sample_value(v) for v in parents[broken].head(SAMPLE_VALUES)]
            checks.append(
                _link_check(
                    "expect_parent_links_to_resolve",
                    name,
                    table,
                    "parent_event_id",
                    note,
                    int(broken.sum()) <= _parent_tolerance(counted),
                    int(broken.sum()),
                    samples,
                )
            )
            child_ts = children["ts"].dt.tz_convert(None).to_numpy()
            early = found & (child_ts < parent_ts)
            lead = (parent_ts[early] - child_ts[early]) / np.timedelta64(1, "s")
            note = f"{int(early.sum())} of {int(found.sum())} {child} events are earlier than the {parent} they follow"
            if early.any():
                note += (
                    f" (by {np.median(lead) / 3600:.3g} h in the median, up to {lead.max() / 3600:.3g} h): a "
                    "producer's clock or time zone is wrong"
                )
            samples = [sample_value(v) for v in children["ts"][early].head(SAMPLE_VALUES)]
            checks.append(
                _link_check(
                    "expect_events_not_before_their_parent",
                    name,
                    table,
                    "ts",
                    note,
                    int(early.sum()) <= _parent_tolerance(int(found.sum())),
                    int(early.sum()),
                    samples,
                )
            )
    return checks


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeio' else 'a'} {noun}"  # "a user_id": no word here starts with a vowel u


def _parent_tolerance(rows: int) -> int:
    return max(PARENT_TOLERANCE_ROWS, int(PARENT_TOLERANCE_SHARE * rows))


def _link_check(
    check: str,
    name: str,
    table: str,
    column: str,
    note: str,
    success: bool | None = None,
    unexpected: int | None = None,
    samples: list[Any] | None = None,
) -> dict[str, Any]:
    return {
        "check": check,
        "name": name,
        "table": table,
        "column": column,
        "success": True if success is None else success,
        "skipped": success is None,
        "unexpected_count": unexpected,
        "sample_values": samples or [],
        "note": note,
    }


NEWEST_DAYS = 7  # the newest week: what the holdout is made of, and what a lost collector empties first


def _newest_week_cut(interval: Mapping[str, str]) -> pd.Timestamp | None:
    """Where the newest week of the interval begins, or None when the interval has no earlier week."""
    start, end = _instant(interval["start"]), _instant(interval["end"])
    cut = end - pd.Timedelta(days=NEWEST_DAYS)
    return cut if (cut - start) >= pd.Timedelta(days=NEWEST_DAYS) else None


def check_newest_week(
    frames: Mapping[str, pd.DataFrame], interval: Mapping[str, str], low_ratio: float = 0.3, high_ratio: float = 3.0
) -> list[dict[str, Any]]:
    """The newest week against the weeks before it in the same snapshot: volume per day and label rates.

    The volume bounds against the previous snapshot cover the whole window, so a week that lost nearly all
    its events hides among four good ones. Here the newest week's rows per day must lie within
    ``low_ratio``..``high_ratio`` of the earlier days', and each label rate within half to twice the earlier
    rate (judged on the 99 % Wilson interval, so a small week is not called broken by chance).
    """
    start, end = _instant(interval["start"]), _instant(interval["end"])
    cut = end - pd.Timedelta(days=NEWEST_DAYS)
    history_days = (cut - start).total_seconds() / 86_400
    checks: list[dict[str, Any]] = []

    def add(check: str, name: str, table: str, column: str, success: bool, note: str, samples=None) -> None:
        checks.append(
            {
                "check": check,
                "name": name,
                "table": table,
                "column": column,
                "success": success,
                "skipped": False,
                "unexpected_count": None,
                "sample_values": samples or [],
                "note": note,
            }
        )

    newest = {table: (frames[table]["ts"] >= cut).to_numpy() for table in wh.EVENT_TABLES}
    for table in wh.EVENT_TABLES:
        recent, earlier = int(newest[table].sum()), int((~newest[table]).sum())
        if history_days < NEWEST_DAYS or earlier == 0:
            note = f"skipped: no earlier week in the snapshot to compare the newest {NEWEST_DAYS} days with"
            add("expect_newest_week_volume_like_history", table, table, "ts", True, note)
            checks[-1]["skipped"] = True
            continue
        per_day, before = recent / NEWEST_DAYS, earlier / history_days
        ratio = per_day / before
        note = (
            f"the newest {NEWEST_DAYS} days hold {per_day:.1f} rows/day against {before:.1f} in the "
            f"{history_days:g} days before (ratio {ratio:.2f}; allowed {low_ratio:g}..{high_ratio:g})"
        )
        add(
            "expect_newest_week_volume_like_history",
            table,
            table,
            "ts",
            low_ratio <= ratio <= high_ratio,
            note,
            [round(ratio, 4)],
        )
    for rate in LABEL_RATES:
        kinds = frames[rate.table]["event_type"].to_numpy()
        recent = newest[rate.table]
        num, den = int(((kinds == rate.numerator) & recent).sum()), int(((kinds == rate.denominator) & recent).sum())
        num_before = int(((kinds == rate.numerator) & ~recent).sum())
        den_before = int(((kinds == rate.denominator) & ~recent).sum())
        if den == 0 or den_before == 0 or num_before == 0:
            continue  # no such events in one of the two parts: the volume and rate bounds speak for them
        before = num_before / den_before
        low, high = _wilson(num, den)
        success = not (high < 0.5 * before or low > 2.0 * before)
        note = (
            f"{rate.task} in the newest {NEWEST_DAYS} days {num / den:.4g} ({num}/{den}; 99% interval "
            f"[{low:.4g}, {high:.4g}]) against {before:.4g} before; allowed half to twice that"
        )
        add(
            "expect_newest_week_label_rate_like_history",
            rate.task,
            rate.table,
            "event_type",
            success,
            note,
            [round(num / den, 6)],
        )
    return checks


def run_guarded(run: Any, frames: Mapping[str, pd.DataFrame]) -> list[dict[str, Any]]:
    """Run one whole-snapshot check; a table too broken to evaluate it (a missing column, ids that are not
    integers) becomes a failing check, as GX reports an expectation it could not evaluate."""
    try:
        return run(frames)
    except (KeyError, ValueError, TypeError) as exc:
        name = getattr(run, "func", run).__name__.removeprefix("check_")  # a functools.partial names its func
        return [
            {
                "check": f"check_{name}",
                "name": name,
                "table": "(snapshot)",
                "column": None,
                "success": False,
                "skipped": False,
                "unexpected_count": None,
                "sample_values": [],
                "note": f"could not be evaluated: {exc.__class__.__name__}: {exc} (see the tables' suite failures)",
            }
        ]


def check_failures(checks: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    failures = []
    for check in checks:
        if check["success"]:
            continue
        if check["check"] == "expect_label_rate_to_be_between":
            failures.append(
                {
                    "table": check["table"],
                    "column": check["column"],
                    "expectation": check["check"],
                    "unexpected_count": None,
                    "sample_values": [check["rate"]],
                    "details": (
                        f"{check['name']} = {check['numerator']} {_rate_parts(check['name'])[0]} / "
                        f"{check['denominator']} {_rate_parts(check['name'])[1]} = {check['rate']:.4g} "
                        f"(99% interval {check['wilson_interval']}); expected within {check['bounds']}"
                    ),
                }
            )
        elif check["check"] == "expect_no_label_leakage":
            for leak in check["leaks"]:
                failures.append(
                    {
                        "table": check["table"],
                        "column": leak["column"],
                        "expectation": check["check"],
                        "unexpected_count": leak["rows"],
                        "sample_values": leak["sample_values"],
                        "details": (
                            f"{leak['column']} {leak['reason']} (label: {check['label']}; "
                            f"{check['sample_rows']} sampled rows); a feature computed from the outcome"
                        ),
                    }
                )
        else:
            failures.append(
                {
                    "table": check["table"],
                    "column": check["column"],
                    "expectation": check["check"],
                    "unexpected_count": check["unexpected_count"],
                    "sample_values": check["sample_values"],
                    "details": check["note"],
                }
            )
    return failures


def _rate_parts(task: str) -> tuple[str, str]:
    rate = next(r for r in LABEL_RATES if r.task == task)
    return rate.numerator, rate.denominator
