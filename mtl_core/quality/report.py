"""What a validation found, and how it is told: the report, the one-line failures, the terminal and HTML pages."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtl_core.errors import MtlError
from mtl_core.jsonable import to_jsonable

VALIDATION_DIR = "validation"
RESULT_FILE = "result.json"
REPORT_FILE = "report.html"
DATA_DOCS_DIR = "data_docs"


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


# ---- messages -------------------------------------------------------------------------------------------
def _samples(values: list[Any]) -> str:
    return json.dumps(to_jsonable(values), ensure_ascii=False)


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


def html_report(report: ValidationReport) -> str:
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
