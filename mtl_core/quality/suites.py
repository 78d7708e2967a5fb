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
  computed the way learn/examples.py computes it, from parent links (an impression is clicked when a click names
  it as parent). Every other column of the table, except ids, must not predict that label perfectly: not
  equal to it, not null exactly on clicked (or unclicked) rows, not separating clicked from unclicked rows
  by a threshold, and not pure per value (values seen at least twice cover 90 % of the rows and each is
  always or never clicked). Such a
  column is the outcome written back into the log (a dwell time only clicked rows have, a click flag
  backfilled into ``position``): the model would learn it and fail in serving. Ids are left out on
  purpose: the label is built from ``event_id``/``parent_event_id``, and user/item/session ids are keys
  whose predictive power is learned from history, legitimately.
  The newest week is judged on its own as well, so a backfill of one week is not diluted by the others.
* ``expect_ids_to_exist_in_dimension_table``: every user_id and item_id of the event tables is in the
  users and items tables of the snapshot; an orphan loses its features in every join (a users or items row
  dated after the interval's end is not part of the snapshot, so its events are orphans too).
* ``expect_parent_links_to_resolve`` and ``expect_events_not_before_their_parent``: every click follows an
  impression of the snapshot, every add_to_cart a click, every purchase an add_to_cart, every ad click an ad
  impression, and none is earlier than its parent (children of the interval's first day may follow a parent
  from before it; a type none of whose events has a parent, as in imported logs, is skipped).
* ``expect_newest_week_volume_like_history`` and ``expect_newest_week_label_rate_like_history``: the newest
  week's rows per day and label rates against the weeks before it in the same snapshot (a whole-window bound
  hides a broken week among four good ones).

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

import json
import shutil
import time
import uuid
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from mtl_core.data import warehouse as wh
from mtl_core.data.extract import SnapshotIntegrityError, read_manifest, read_snapshot_table, replace_dir
from mtl_core.errors import MtlError
from mtl_core.jsonable import to_jsonable
from mtl_core.quality.checks import (
    SAMPLE_VALUES,
    check_failures,
    check_label_rates,
    check_leakage,
    check_newest_week,
    check_parent_links,
    check_references,
    duplicate_mostly,
    run_guarded,
    sample_value,
    volume_bounds,
)
from mtl_core.quality.report import (
    DATA_DOCS_DIR,
    REPORT_FILE,
    RESULT_FILE,
    VALIDATION_DIR,
    ValidationFailed,
    ValidationReport,
    html_report,
)

DEFAULT_EXPECTATIONS_DIR = Path(__file__).resolve().parents[2] / "expectations"
RUNTIME_PARAMETERS = ("interval_start", "interval_end", "min_rows", "max_rows", "duplicate_mostly")
# GX keeps this many unexpected values per expectation in the results (SUMMARY format).
PARTIAL_UNEXPECTED = 20


class ValidationSetupError(MtlError):
    """The validation could not run: a missing or broken suite, or a directory that is not a snapshot."""


# ---- suites ----------------------------------------------------------------------------------------------
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
            "per source table; restore it from git or point the expectations_dir setting (MTL_EXPECTATIONS_DIR) "
            "at the right folder)"
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
    try:
        arrow = read_snapshot_table(snapshot, table)  # the window's files of the table, wherever its days live
    except SnapshotIntegrityError as exc:
        raise ValidationSetupError(str(exc)) from None
    # Int64 keeps nullable integer ids integers (NumPy would turn a column with a null into float64).
    return arrow.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)


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
            samples = [sample_value(entry.get("value")) for entry in counts[:SAMPLE_VALUES]]
        elif "partial_unexpected_list" in found:
            samples = [sample_value(value) for value in found["partial_unexpected_list"][:SAMPLE_VALUES]]
        elif "observed_value" in found:
            samples = [sample_value(found["observed_value"])]
        else:
            samples = []
        expected = f"; expected {_expected(kwargs)}" if _expected(kwargs) else ""
        if error:
            details = f"GX could not evaluate it: {error}"
        elif "unexpected_count" in found:
            details = f"{found['unexpected_count']} of {found.get('element_count', '?')} rows unexpected{expected}"
        else:
            details = f"observed {to_jsonable(found.get('observed_value'))!r}{expected}"
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
    suites_dir = Path(expectations_dir) if expectations_dir is not None else DEFAULT_EXPECTATIONS_DIR
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
                volume = volume_bounds(table, len(frame), meta.get("volume", {}), report.interval, previous)
                parameters.update(
                    min_rows=volume["min_rows"],
                    max_rows=volume["max_rows"],
                    duplicate_mostly=duplicate_mostly(len(frame), meta.get("duplicates", {})),
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
            check
            for run in (
                check_label_rates,
                partial(check_leakage, interval=report.interval),
                check_references,
                partial(check_parent_links, interval=report.interval),
                partial(check_newest_week, interval=report.interval),
            )
            for check in run_guarded(run, frames)
        ]
        report.failures += check_failures(report.checks)
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
    (staging / RESULT_FILE).write_text(json.dumps(to_jsonable(payload), indent=1) + "\n")
    (staging / REPORT_FILE).write_text(html_report(report))
    replace_dir(staging, final)


def run_validation(
    snapshot_dir: str | Path,
    previous_snapshot_dir: str | Path | None = None,
    expectations_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The pipeline step: validate and return the summary, or raise ValidationFailed listing every failure."""
    report = validate_snapshot(snapshot_dir, previous_snapshot_dir, expectations_dir)
    if not report.success:
        raise ValidationFailed(report)
    return report.summary()
