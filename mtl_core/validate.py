"""Data validation of a snapshot: one Great Expectations suite per source table plus whole-snapshot checks.

A bad batch must stop the retraining run before it reaches training, and the on-call engineer must see from
the error alone what is wrong. So every failing check is reported the same way (table, column, expectation,
how many rows, a few sample values, what was expected), whether GX evaluated it or this module did.

Suites (``expectations/<table>.json``)
--------------------------------------
One GX 1.x ExpectationSuite per source table, in the JSON form GX itself writes (``suite.to_json_dict()``)
and reviewed like code; ``meta.notes`` explains each suite and every expectation carries ``notes`` saying
why it exists. What is only known at run time is written with GX's own parameter syntax,
``{"$PARAMETER": "<name>"}``, which GX substitutes from the ``expectation_parameters`` of the run (and
records, substituted, in the results). The runner provides:

* ``interval_start``, ``interval_end``: the snapshot's data interval from ``manifest.json`` (ISO 8601, UTC;
  events must lie in [start, end), dimension rows not after the end);
* ``min_rows``, ``max_rows``: the acceptable row count of an event table. With a previous snapshot the
  expected count is the previous snapshot's rows per day times this interval's days, and the bounds are
  ``meta.volume.min_ratio`` and ``meta.volume.max_ratio`` times it (0.3x and 3x): a collapse means lost
  logs, an explosion duplicated or bot traffic. ``min_rows`` is never below ``meta.volume.min_rows``;
  without a previous snapshot (or one with no rows in that table) only that minimum applies and
  ``max_rows`` is null (no upper bound);
* ``duplicate_mostly``: the share of an event table's rows that must be unique on its retry key (the
  event's content: every column but event_id; for ads also not the ad's item and copy, which follow from
  the ad): ``1 - max(meta.duplicates.max_share, meta.duplicates.max_rows / rows)``. Some repeats are
  genuine (one ad in two slots in the same second, two page views in one second of an imported
  log), so a fixed share would fail small tables on one such pair; re-sent batches are far above it.

A suite that names another parameter is refused before anything runs.

Tables are read with pandas from the Parquet files, 64-bit integers as the nullable ``Int64`` dtype: a
nullable id column then has the same dtype whether or not it holds nulls, so the suites can state exact
dtypes (``expect_column_type_to_be``).

Whole-snapshot checks (here, in pandas: GX has no expectation spanning tables or label definitions)
---------------------------------------------------------------------------------------------------
* ``expect_label_rate_to_be_between``: ctr (clicks / impressions) in [0.002, 0.3], cvr (purchases /
  clicks) in [0.005, 0.6], ad_ctr (ad clicks / ad impressions) in [0.001, 0.2], counted by event type. A
  rate fails only when its 99 % Wilson interval lies wholly outside the bounds, so a small interval with
  20 clicks and no purchase is not called broken while a million impressions without a click is. A rate
  whose denominator is zero is skipped with a note (imported Taobao logs have no impressions and no ads).
* ``expect_no_label_leakage``: on a sample of feed impressions (and of ad impressions) the click label is
  computed the way features.py computes it, from parent links (an impression is clicked when a click names
  it as parent). Every other column of the table, except ids, must not predict that label perfectly: not
  equal to it, not null exactly on clicked (or unclicked) rows, not separating clicked from unclicked rows
  by a threshold, and not pure per value (values seen at least twice cover 90 % of the rows and each is
  always or never clicked). Such a
  column is the outcome written back into the log (a dwell time only clicked rows have, a click flag
  backfilled into ``position``): the model would learn it and fail in serving. Ids are left out on
  purpose: the label is built from ``event_id``/``parent_event_id``, and user/item/session ids are keys
  whose predictive power is learned from history, legitimately.
* ``expect_ids_to_exist_in_dimension_table``: every user_id and item_id of the event tables is in the
  users and items tables of the snapshot; an orphan loses its features in every join.

A table too broken for one of these (a missing column) makes that check fail with the reason, as GX does
with an expectation it cannot evaluate, rather than crash the run.

Output
------
``<snapshot>/validation/`` (replaced atomically: written to a temporary sibling, then renamed):
``result.json`` (the summary plus every suite's GX validation result), ``data_docs/`` (GX Data Docs of the
suites and results; the index page draws its list with scripts from CDNs, so offline it is blank, while each
result page is plain HTML) and ``report.html`` (one self-contained page with the verdict, the failures, the
whole-snapshot checks that Data Docs cannot show, and links to each table's result page). It sits inside
the snapshot because it describes exactly that content: a re-extraction replaces both together.

``import great_expectations`` takes seconds, so it happens inside the functions that need it only.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mtl_core import warehouse as wh
from mtl_core.errors import MtlError
from mtl_core.ingest import read_manifest, replace_dir

VALIDATION_DIR = "validation"
RESULT_FILE = "result.json"
REPORT_FILE = "report.html"
DATA_DOCS_DIR = "data_docs"
# Suites live at the repository root; MTL_EXPECTATIONS_DIR points elsewhere (e.g. a container mount).
DEFAULT_EXPECTATIONS_DIR = Path(__file__).resolve().parent.parent / "expectations"
RUNTIME_PARAMETERS = ("interval_start", "interval_end", "min_rows", "max_rows", "duplicate_mostly")
SAMPLE_VALUES = 5
# GX keeps this many unexpected values per expectation in the results (SUMMARY format).
PARTIAL_UNEXPECTED = 20
LEAKAGE_SAMPLE_ROWS = 200_000
ID_COLUMNS = frozenset({"event_id", "parent_event_id", "user_id", "item_id", "ad_id", "session_id"})
WILSON_Z = 2.576  # two-sided 99 %


class ValidationSetupError(MtlError):
    """The validation could not run: a missing or broken suite, or a directory that is not a snapshot."""


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


@dataclass
class ValidationReport:
    """Everything one validation found. ``summary()`` is the JSON-ready form (CLI --json, Airflow XCom)."""

    snapshot_dir: Path
    previous_snapshot_dir: Path | None
    interval: dict[str, str]
    content_hash: str
    success: bool = True
    # table -> success, rows, evaluated, failed, suite path, parameters, volume (event tables)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Whole-snapshot checks, passing, failing and skipped alike.
    checks: list[dict[str, Any]] = field(default_factory=list)
    # One entry per failing expectation or check: table, column, expectation, unexpected_count,
    # sample_values, details.
    failures: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # table -> the GX ExpectationSuiteValidationResult as JSON.
    gx_results: dict[str, dict[str, Any]] = field(default_factory=dict)
    result_path: Path | None = None
    data_docs_path: Path | None = None
    report_path: Path | None = None
    seconds: float = 0.0
    gx_version: str = ""

    def summary(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "snapshot": str(self.snapshot_dir),
            "previous_snapshot": str(self.previous_snapshot_dir) if self.previous_snapshot_dir else None,
            "interval": self.interval,
            "content_hash": self.content_hash,
            "tables": self.tables,
            "checks": self.checks,
            "failures": self.failures,
            "notes": self.notes,
            "result_path": str(self.result_path) if self.result_path else None,
            "data_docs_path": str(self.data_docs_path) if self.data_docs_path else None,
            "report_path": str(self.report_path) if self.report_path else None,
            "seconds": round(self.seconds, 3),
            "great_expectations_version": self.gx_version,
        }


class ValidationFailed(MtlError):
    """The snapshot broke at least one expectation; the message lists each one, ``report`` has all."""

    def __init__(self, report: ValidationReport):
        self.report = report
        self.summary = report.summary()
        super().__init__(failure_message(report))

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as cls(*args); ours is built from the report, not the message.
        return (type(self), (self.report,))


# ---- suites ----------------------------------------------------------------------------------------------
def expectations_dir_default() -> Path:
    return Path(os.environ.get("MTL_EXPECTATIONS_DIR") or DEFAULT_EXPECTATIONS_DIR)


def _suite_parameters(node: Any) -> set[str]:
    """Names used as {"$PARAMETER": name} anywhere in a suite's expectations."""
    if isinstance(node, dict):
        found = {str(node["$PARAMETER"])} if "$PARAMETER" in node else set()
        for value in node.values():
            found |= _suite_parameters(value)
        return found
    if isinstance(node, list):
        return set().union(*(_suite_parameters(value) for value in node)) if node else set()
    return set()


def load_suite(path: Path, table: str) -> Any:
    """Read and check one suite file; any problem is a ValidationSetupError naming the file and what to fix.

    GX's own constructor only logs an expectation it cannot build and drops it, so a typo in an expectation
    type would silently weaken the suite: each expectation is built here first, and a failure refuses the
    whole suite.
    """
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    if not path.is_file():
        raise ValidationSetupError(
            f"no expectation suite for table {table}: {path} is missing (expectations/ holds one GX suite JSON "
            "per source table; restore it from git or point MTL_EXPECTATIONS_DIR at the right folder)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValidationSetupError(
            f"expectation suite {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("expectations"), list):
        raise ValidationSetupError(
            f"expectation suite {path} is not a GX ExpectationSuite: expected an object with an 'expectations' "
            "list (the format suite.to_json_dict() writes)"
        )
    if data.get("name") != table:
        raise ValidationSetupError(
            f"expectation suite {path} is named {data.get('name')!r}; it must be named {table!r}"
        )
    for position, entry in enumerate(data["expectations"]):
        kind = entry.get("type", "?") if isinstance(entry, dict) else "?"
        try:
            if not isinstance(entry, dict):
                raise TypeError("an expectation must be a JSON object")
            ExpectationConfiguration(**entry).to_domain_obj()
        except Exception as exc:  # GX raises its own errors, pydantic's and TypeError for the same kind of typo
            problem = " ".join(str(getattr(exc, "message", None) or exc).split())
            raise ValidationSetupError(
                f"expectation suite {path}: expectation #{position} ({kind}) is not valid: {problem}"
            ) from None
    unknown = _suite_parameters(data["expectations"]) - set(RUNTIME_PARAMETERS)
    if unknown:
        raise ValidationSetupError(
            f"expectation suite {path} uses $PARAMETER {', '.join(sorted(unknown))}, which the runner does not "
            f"provide (it provides {', '.join(RUNTIME_PARAMETERS)})"
        )
    try:
        return gx.ExpectationSuite(**data)
    except (TypeError, ValueError) as exc:
        raise ValidationSetupError(f"expectation suite {path} is not a valid GX ExpectationSuite: {exc}") from None


# ---- reading the snapshot -------------------------------------------------------------------------------
def _manifest(snapshot: Path) -> dict[str, Any]:
    """The snapshot's manifest, or a ValidationSetupError saying why the directory is not a usable snapshot."""
    try:
        manifest = read_manifest(snapshot)  # raises an MtlError when manifest.json is missing
    except json.JSONDecodeError as exc:
        raise ValidationSetupError(
            f"{snapshot} is not a snapshot: manifest.json is not valid JSON ({exc.msg})"
        ) from None
    interval = manifest.get("interval") if isinstance(manifest, dict) else None
    if not isinstance(interval, dict) or not {"start", "end"} <= set(interval) or "tables" not in manifest:
        raise ValidationSetupError(f"{snapshot} is not a snapshot: manifest.json has no interval start/end or tables")
    return manifest


def _read_table(snapshot: Path, table: str) -> pd.DataFrame:
    path = snapshot / f"{table}.parquet"
    if not path.is_file():
        raise ValidationSetupError(f"{snapshot} is not a complete snapshot: {table}.parquet is missing (re-extract it)")
    try:
        arrow = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise ValidationSetupError(f"{path} cannot be read as Parquet: {exc} (re-extract the snapshot)") from None
    # Int64 keeps nullable integer ids integers (NumPy would turn a column with a null into float64).
    return arrow.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)


def _instant(value: str) -> pd.Timestamp:
    return pd.Timestamp(value.replace("Z", "+00:00")).tz_convert("UTC")


def _interval_days(interval: Mapping[str, str]) -> float:
    return (_instant(interval["end"]) - _instant(interval["start"])).total_seconds() / 86_400


def _volume(
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


def _duplicate_mostly(rows: int, policy: Mapping[str, Any]) -> float:
    """Share of rows that must be unique on the retry key: a few genuine repeats pass in any table size."""
    if rows == 0:
        return 1.0
    tolerated = max(float(policy.get("max_share", 0.005)), float(policy.get("max_rows", 10)) / rows)
    return round(max(0.0, 1.0 - tolerated), 6)


# ---- GX -------------------------------------------------------------------------------------------------
def _gx_context(docs_dir: Path | None) -> Any:
    """An in-memory GX context whose only Data Docs site is ``docs_dir`` (or none), progress bars off.

    The default ephemeral context would add a docs site in a fresh temporary directory and print progress
    bars for every suite; both are noise in a pipeline task.
    """
    import logging

    import great_expectations as gx

    # GX logs its datasource bookkeeping at INFO, which lands in the middle of a task's output.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if docs_dir is not None:
        sites["snapshot"] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites=sites,
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _exception_message(info: Any) -> str | None:
    """GX nests the exception of a failed metric under the metric's id; find the first message."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception") and info.get("exception_message"):
        return str(info["exception_message"])
    for value in info.values():
        message = _exception_message(value)
        if message:
            return message
    return None


def _plain(value: Any) -> Any:
    """A JSON value for a sample (numpy scalars, timestamps, NA)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (pd.Timestamp, datetime)):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _expected(kwargs: Mapping[str, Any]) -> str:
    shown = {k: v for k, v in kwargs.items() if k not in ("batch_id", "column", "column_list") and v is not None}
    return ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in shown.items())


def _gx_failures(table: str, result: dict[str, Any], volume: dict[str, Any] | None) -> list[dict[str, Any]]:
    failures = []
    for outcome in result.get("results", []):
        if outcome.get("success"):
            continue
        config = outcome.get("expectation_config") or {}
        kind = config.get("type", "?")
        kwargs = config.get("kwargs") or {}
        found = outcome.get("result") or {}
        column = kwargs.get("column") or (",".join(kwargs["column_list"]) if kwargs.get("column_list") else None)
        error = _exception_message(outcome.get("exception_info"))
        counts = found.get("partial_unexpected_counts")
        if counts:
            samples = [_plain(entry.get("value")) for entry in counts[:SAMPLE_VALUES]]
        elif "partial_unexpected_list" in found:
            samples = _plain(found["partial_unexpected_list"][:SAMPLE_VALUES])
        elif "observed_value" in found:
            samples = [_plain(found["observed_value"])]
        else:
            samples = []
        expected = f"; expected {_expected(kwargs)}" if _expected(kwargs) else ""
        if error:
            details = f"GX could not evaluate it: {error}"
        elif "unexpected_count" in found:
            details = f"{found['unexpected_count']} of {found.get('element_count', '?')} rows unexpected{expected}"
        else:
            details = f"observed {_plain(found.get('observed_value'))!r}{expected}"
            mismatch = (found.get("details") or {}).get("mismatched")
            if mismatch:
                details += f"; missing {mismatch.get('missing')}, unexpected {mismatch.get('unexpected')}"
        if kind == "expect_table_row_count_to_be_between" and volume:
            details += f" ({volume['basis']})"
        failures.append(
            {
                "table": table,
                "column": column,
                "expectation": kind,
                "unexpected_count": found.get("unexpected_count"),
                "sample_values": samples,
                "details": details,
            }
        )
    return failures


def _evaluated(result: dict[str, Any]) -> tuple[int, int]:
    outcomes = result.get("results", [])
    return len(outcomes), sum(1 for outcome in outcomes if not outcome.get("success"))


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


def check_leakage(frames: Mapping[str, pd.DataFrame], seed: int = 0) -> list[dict[str, Any]]:
    """No non-id column of the event tables predicts the click label perfectly (see the module docstring)."""
    checks = []
    spaces = (("feed", "behavior_events", "impression", "click"), ("ads", "ad_events", "ad_impression", "ad_click"))
    for space, table, impression, click in spaces:
        frame = frames[table]
        impressions, clicked = _click_labels(frame, impression, click)
        check: dict[str, Any] = {
            "check": "expect_no_label_leakage",
            "name": space,
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
            checks.append(check)
            continue
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
                    {"column": column, "reason": reason, "rows": rows_used, "sample_values": _plain(list(sample))}
                )
        check.update(success=not check["leaks"], columns_checked=columns, sample_rows=int(len(impressions)))
        checks.append(check)
    return checks


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
                    "note": f"{len(orphans)} of {len(values)} rows name a {column} missing from {dimension[column]}",
                }
            )
    return checks


def _guarded(run: Any, frames: Mapping[str, pd.DataFrame]) -> list[dict[str, Any]]:
    """Run one whole-snapshot check; a table too broken to evaluate it (a missing column, ids that are not
    integers) becomes a failing check, as GX reports an expectation it could not evaluate."""
    try:
        return run(frames)
    except (KeyError, ValueError, TypeError) as exc:
        name = run.__name__.removeprefix("check_")
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


def _check_failures(checks: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
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


# ---- the runner -----------------------------------------------------------------------------------------
def validate_snapshot(
    snapshot_dir: str | Path,
    previous_snapshot_dir: str | Path | None = None,
    expectations_dir: str | Path | None = None,
    *,
    write: bool = True,
    data_docs: bool = True,
) -> ValidationReport:
    """Run every table's suite and the whole-snapshot checks; write the results beside the snapshot.

    Never raises because the data is bad (that is the report's ``success``); raises ValidationSetupError when
    the validation itself cannot run (not a snapshot, a missing or broken suite).
    """
    import great_expectations as gx

    began = time.perf_counter()
    snapshot = Path(snapshot_dir)
    manifest = _manifest(snapshot)
    previous = _manifest(Path(previous_snapshot_dir)) if previous_snapshot_dir is not None else None
    suites_dir = Path(expectations_dir) if expectations_dir is not None else expectations_dir_default()
    report = ValidationReport(
        snapshot_dir=snapshot,
        previous_snapshot_dir=Path(previous_snapshot_dir) if previous_snapshot_dir is not None else None,
        interval=dict(manifest["interval"]),
        content_hash=str(manifest.get("content_hash", "")),
        gx_version=gx.__version__,
    )
    staging = snapshot / f".{VALIDATION_DIR}.tmp-{uuid.uuid4().hex[:8]}" if write else None
    try:
        context = _gx_context(staging / DATA_DOCS_DIR if staging is not None and data_docs else None)
        suites = {table: load_suite(suites_dir / f"{table}.json", table) for table in wh.SOURCE_TABLES}
        frames = {table: _read_table(snapshot, table) for table in wh.SOURCE_TABLES}
        source = context.data_sources.add_pandas("snapshot")
        for table in wh.SOURCE_TABLES:
            frame = frames[table]
            parameters: dict[str, Any] = {
                "interval_start": report.interval["start"],
                "interval_end": report.interval["end"],
            }
            volume = None
            if table in wh.EVENT_TABLES:
                meta = suites[table].meta
                volume = _volume(table, len(frame), meta.get("volume", {}), report.interval, previous)
                parameters.update(
                    min_rows=volume["min_rows"],
                    max_rows=volume["max_rows"],
                    duplicate_mostly=_duplicate_mostly(len(frame), meta.get("duplicates", {})),
                )
            suite = context.suites.add(suites[table])
            batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("whole table")
            definition = context.validation_definitions.add(
                gx.ValidationDefinition(name=table, data=batch, suite=suite)
            )
            result = definition.run(
                batch_parameters={"dataframe": frame},
                expectation_parameters=parameters,
                result_format={"result_format": "SUMMARY", "partial_unexpected_count": PARTIAL_UNEXPECTED},
            ).to_json_dict()
            failures = _gx_failures(table, result, volume)
            evaluated, failed = _evaluated(result)
            report.gx_results[table] = result
            report.failures += failures
            report.tables[table] = {
                "success": bool(result.get("success")),
                "rows": int(len(frame)),
                "evaluated": evaluated,
                "failed": failed,
                "suite": str(suites_dir / f"{table}.json"),
                "parameters": parameters,
            }
            if volume is not None:
                report.tables[table]["volume"] = volume
        report.checks = [
            check for run in (check_label_rates, check_leakage, check_references) for check in _guarded(run, frames)
        ]
        report.failures += _check_failures(report.checks)
        report.notes += [f"{c['check']} {c['name']}: {c['note']}" for c in report.checks if c.get("skipped")]
        if previous is None:
            report.notes.append("no previous snapshot: row counts are checked against minimums only")
        report.success = not report.failures
        report.seconds = time.perf_counter() - began
        if staging is not None:
            try:
                _write_outputs(report, context, staging, data_docs, began)
            except OSError as exc:
                raise ValidationSetupError(
                    f"cannot write the validation results into {snapshot / VALIDATION_DIR}: {exc.strerror or exc} "
                    "(the snapshot directory must be writable)"
                ) from exc
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _write_outputs(report: ValidationReport, context: Any, staging: Path, data_docs: bool, began: float) -> None:
    """Write result.json, report.html and Data Docs to ``staging``, then swap it in as validation/."""
    final = report.snapshot_dir / VALIDATION_DIR
    staging.mkdir(parents=True, exist_ok=True)
    report.result_path = final / RESULT_FILE
    report.report_path = final / REPORT_FILE
    if data_docs:
        try:
            context.build_data_docs(site_names=["snapshot"])
            report.data_docs_path = final / DATA_DOCS_DIR / "index.html"
            # The index lists results with JavaScript from CDNs (blank offline); each result page is plain
            # HTML, so link those directly.
            for table, info in report.tables.items():
                pages = sorted((staging / DATA_DOCS_DIR / "validations" / table).rglob("*.html"))
                if pages:
                    info["data_docs_page"] = str(final / pages[-1].relative_to(staging))
        except Exception as exc:  # a rendering bug in GX must not decide the run: results.json is the record
            report.notes.append(f"GX Data Docs were not built: {exc.__class__.__name__}: {exc}")
    report.seconds = time.perf_counter() - began
    payload = {"summary": report.summary(), "gx_results": report.gx_results}
    (staging / RESULT_FILE).write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (staging / REPORT_FILE).write_text(_html_report(report))
    replace_dir(staging, final)


def run_validation(snapshot_dir: str | Path, previous_snapshot_dir: str | Path | None = None) -> dict[str, Any]:
    """The pipeline step: validate and return the summary, or raise ValidationFailed listing every failure."""
    report = validate_snapshot(snapshot_dir, previous_snapshot_dir)
    if not report.success:
        raise ValidationFailed(report)
    return report.summary()


# ---- messages -------------------------------------------------------------------------------------------
def _samples(values: list[Any]) -> str:
    return json.dumps(values, default=str, ensure_ascii=False)


def failure_line(failure: Mapping[str, Any]) -> str:
    count = failure.get("unexpected_count")
    return (
        f"  - {failure['table']} | column {failure.get('column') or '(table)'} | {failure['expectation']} | "
        f"unexpected {count if count is not None else 'n/a'} | samples {_samples(failure.get('sample_values') or [])}"
        f" | {failure.get('details', '')}"
    )


def failure_message(report: ValidationReport) -> str:
    where = report.result_path or (report.snapshot_dir / VALIDATION_DIR / RESULT_FILE)
    lines = [
        f"snapshot {report.snapshot_dir} ({report.interval.get('start')} .. {report.interval.get('end')}) failed "
        f"validation: {len(report.failures)} failing expectation(s); details in {where}",
        *(failure_line(failure) for failure in report.failures),
    ]
    return "\n".join(lines)


def _check_line(check: Mapping[str, Any]) -> str:
    state = "skip" if check.get("skipped") else "ok" if check["success"] else "FAIL"
    if check["check"] == "expect_label_rate_to_be_between":
        text = f"label rate {check['name']}"
        if check.get("rate") is not None:
            text += f" = {check['rate']:.4g} ({check['numerator']}/{check['denominator']}), bounds {check['bounds']}"
    elif check["check"] == "expect_no_label_leakage":
        text = f"no label leakage ({check['name']})"
        if not check.get("skipped"):
            text += f": {len(check['columns_checked'])} columns on {check['sample_rows']} rows"
        if check["leaks"]:
            text += ": leaking " + ", ".join(leak["column"] for leak in check["leaks"])
    elif check["check"] == "expect_ids_to_exist_in_dimension_table":
        text = f"ids exist ({check['name']})"
        if not check["success"]:
            text += f": {check['note']}"
    else:
        text = f"{check['check']}: {check.get('note', '')}"
    if check.get("note") and (check.get("skipped") or check["check"] == "expect_label_rate_to_be_between"):
        text += f"; {check['note']}"
    return f"  {state:<5} {text}"


def validate_command_output(report: ValidationReport) -> str:
    """The human-readable summary `mtl validate` prints (the --json form is ``report.summary()``)."""
    verdict = "PASSED" if report.success else f"FAILED ({len(report.failures)} failing)"
    lines = [
        f"snapshot  {report.snapshot_dir}  ({report.interval.get('start')} .. {report.interval.get('end')})",
        f"previous  {report.previous_snapshot_dir or 'none (row counts checked against minimums only)'}",
        f"verdict   {verdict}",
        "tables",
    ]
    for table, info in report.tables.items():
        line = f"  {table:<16} {info['rows']:>10} rows  {info['evaluated'] - info['failed']}/{info['evaluated']} passed"
        volume = info.get("volume")
        if volume:
            bound = f"{volume['min_rows']}..{volume['max_rows'] if volume['max_rows'] is not None else 'inf'}"
            line += f"  (rows allowed {bound})"
        lines.append(line)
    lines.append("snapshot checks")
    lines += [_check_line(check) for check in report.checks]
    if report.failures:
        lines.append("failures")
        lines += [failure_line(failure) for failure in report.failures]
    extra = [note for note in report.notes if not note.startswith("expect_")]
    lines += [f"note      {note}" for note in extra]
    if report.result_path:
        lines.append(f"results   {report.result_path}")
    if report.data_docs_path:
        lines.append(f"docs      {report.data_docs_path}")
    if report.report_path:
        lines.append(f"report    {report.report_path}")
    lines.append(f"took      {report.seconds:.2f} s")
    return "\n".join(lines)


def _page_link(report: ValidationReport, table: str, info: Mapping[str, Any]) -> str:
    """The table's name, linked to its GX result page (relative, so the folder can move)."""
    page = info.get("data_docs_page")
    if not page:
        return html.escape(table)
    relative = Path(page).relative_to(report.snapshot_dir / VALIDATION_DIR).as_posix()
    return f'<a href="{html.escape(relative)}">{html.escape(table)}</a>'


def _html_report(report: ValidationReport) -> str:
    """A self-contained page: verdict, failures, per-table counts, whole-snapshot checks, link to Data Docs."""
    esc = html.escape
    verdict = "PASSED" if report.success else f"FAILED: {len(report.failures)} failing expectation(s)"
    colour = "#1a7f37" if report.success else "#cf222e"
    rows = "".join(
        f"<tr><td>{esc(f['table'])}</td><td>{esc(str(f.get('column') or '(table)'))}</td>"
        f"<td>{esc(f['expectation'])}</td><td>{esc(str(f.get('unexpected_count')))}</td>"
        f"<td><code>{esc(_samples(f.get('sample_values') or []))}</code></td><td>{esc(f.get('details', ''))}</td></tr>"
        for f in report.failures
    )
    tables = "".join(
        f"<tr><td>{_page_link(report, t, i)}</td><td>{i['rows']}</td>"
        f"<td>{i['evaluated'] - i['failed']}/{i['evaluated']}</td>"
        f"<td>{esc(i.get('volume', {}).get('basis', ''))}</td></tr>"
        for t, i in report.tables.items()
    )
    checks = "".join(f"<li><code>{esc(_check_line(c).strip())}</code></li>" for c in report.checks)
    docs = (
        f'<p><a href="{DATA_DOCS_DIR}/index.html">GX Data Docs</a> (its index needs the internet for its '
        "scripts; the table names above link to each result page directly)</p>"
        if report.data_docs_path
        else ""
    )
    style = "body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:4px;vertical-align:top}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Validation of {esc(str(report.snapshot_dir))}"
        f"</title><style>{style} table{{border-collapse:collapse}}</style></head><body>"
        f"<h1>Validation of {esc(str(report.snapshot_dir))}</h1>"
        f"<p>Interval {esc(report.interval.get('start', ''))} .. {esc(report.interval.get('end', ''))}; "
        f"previous snapshot {esc(str(report.previous_snapshot_dir or 'none'))}; content hash "
        f"<code>{esc(report.content_hash)}</code></p>"
        f"<h2 style='color:{colour}'>{esc(verdict)}</h2>"
        + (
            "<h3>Failures</h3><table><tr><th>table</th><th>column</th><th>expectation</th><th>unexpected</th>"
            f"<th>samples</th><th>details</th></tr>{rows}</table>"
            if report.failures
            else ""
        )
        + f"<h3>Tables</h3><table><tr><th>table</th><th>rows</th><th>passed</th><th>volume</th></tr>{tables}</table>"
        f"<h3>Snapshot checks</h3><ul>{checks}</ul>"
        + "".join(f"<p>{esc(note)}</p>" for note in report.notes)
        + f"{docs}<p>Took {report.seconds:.2f} s; Great Expectations {esc(report.gx_version)}.</p></body></html>\n"
    )
