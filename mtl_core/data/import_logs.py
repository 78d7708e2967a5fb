"""Import external behaviour logs (the Taobao UserBehavior dump, or any CSV/Parquet log described by a YAML
mapping file) into the warehouse, so the model can be trained on real traffic instead of the simulator's.

The layouts it reads (``--format``) are described in ``log_formats``.

Bad rows and atomicity
----------------------
A row is bad when it has the wrong number of fields, a missing or non-integer id, an event type value the
mapping does not know, a timestamp that does not parse or lies outside 1970-01-01 .. 2100-01-01 (mostly a
wrong unit), an unparsable or negative price, or a category/brand longer than the warehouse's 64
characters. Every bad row is counted; the first few are reported with their 1-based line number in the
file (the header counts as line 1; for Parquet it is the row number). Blank lines are skipped.

By default one bad row aborts the whole import and nothing is written: a half-imported log would silently
skew labels, and the report says exactly what to fix. ``skip_bad=True`` loads the good rows anyway. The
import runs in a single transaction either way, so an interruption leaves the warehouse as it was.

Idempotence
-----------
Event ids are derived from the content of each event, not from its position in the file: a 64-bit hash
of (user_id, item_id, event_type, ts in microseconds, occurrence) mapped into [2**62, 2**63), where
occurrence counts earlier identical events in the same file (so two genuine identical rows stay two
events). Simulated events count up from 1 and never reach that range. Importing the same file again, or
an overlapping export, inserts nothing twice: events, users and items are written with ON CONFLICT DO
NOTHING, so existing users and items (and their titles) are never overwritten. To tell identical events
apart, the importer remembers 8 bytes per distinct event of the file being read.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pandas.api import types as ptypes
from sqlalchemy import Table
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from mtl_core.data import warehouse as wh
from mtl_core.data.log_formats import OPTIONAL_COLUMNS, TAOBAO_FORMAT, TIME_UNITS, LogFormat, load_format
from mtl_core.errors import MtlError

# Microseconds per unit: timestamps are handled as integer microseconds, the warehouse's resolution.
UNIT_NAMES = {"s": "seconds", "ms": "milliseconds", "us": "microseconds"}
# Imported event ids live in [2**62, 2**63): positive BigIntegers far above the simulator's 1, 2, 3, ...
IMPORTED_ID_MIN = 2**62
# Behaviour logs cannot predate the epoch or lie in the next century; such values mean a wrong unit.
TS_MIN = datetime(1970, 1, 1)
TS_MAX = datetime(2100, 1, 1)
TEXT_LIMITS = {"category": 64, "brand": 64}  # String(64) in the warehouse; PostgreSQL would refuse more
CONTENT_CHARS = 200  # a reported bad row's content is cut to this length

_US_MIN = int((TS_MIN - datetime(1970, 1, 1)).total_seconds()) * 1_000_000
_US_MAX = int((TS_MAX - datetime(1970, 1, 1)).total_seconds()) * 1_000_000


@dataclass
class ImportReport:
    """What an import did: the CLI prints it and exits 1 when ``aborted``."""

    rows_read: int = 0
    rows_loaded: int = 0
    bad_rows: int = 0
    first_bad: list[dict[str, Any]] = field(default_factory=list)
    aborted: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read,
            "rows_loaded": self.rows_loaded,
            "bad_rows": self.bad_rows,
            "first_bad": [dict(bad) for bad in self.first_bad],
            "aborted": self.aborted,
        }


# --- reading: chunks of raw values with their line numbers ----------------------------------------------
@dataclass
class _RawChunk:
    """Up to ``chunk_rows`` rows of the file, before any value is checked."""

    columns: dict[str, pd.Series]  # warehouse column -> raw values of the well-formed rows
    lines: np.ndarray  # 1-based line (CSV) or row (Parquet) number of each well-formed row
    content: Callable[[int], str]  # raw content of the i-th well-formed row, for reports
    malformed: list[tuple[int, str, str]]  # (line, reason, content) of rows with a wrong field count
    rows: int  # rows read, well-formed or not


def _file_format(path: Path, spec: LogFormat) -> str:
    if spec.file_format:
        return spec.file_format
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes[-1:] == [".gz"]:  # gzip'd text: the suffix before tells which text
        suffixes = suffixes[:-1] or [".csv"]
    last = suffixes[-1] if suffixes else ""
    if last in (".parquet", ".pq"):
        return "parquet"
    if last in (".jsonl", ".ndjson"):
        return "jsonl"
    if last in (".csv", ".tsv", ".txt"):
        return "csv"
    raise MtlError(
        f"cannot tell the format of {path} from its suffix; set 'format: csv', 'format: parquet' or "
        f"'format: jsonl' in the mapping file {spec.name}"
    )


def _open_text(path: Path, encoding: str) -> IO[str]:
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding=encoding, newline="")
    return path.open("r", encoding=encoding, newline="")


def _csv_text(fields: list[str], delimiter: str) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=delimiter, lineterminator="").writerow(fields)
    return buffer.getvalue()[:CONTENT_CHARS]


def _csv_chunks(path: Path, spec: LogFormat, chunk_rows: int) -> Iterator[_RawChunk]:
    """Stream the CSV with the csv module: unlike pandas it tells a row's true field count and line."""
    with _open_text(path, spec.encoding) as handle:
        reader = csv.reader(handle, delimiter=spec.delimiter)
        previous_line = 0  # reader.line_num after the previous record: a record starts on the next line
        if spec.header:
            header: list[str] = []
            for header in reader:
                if header:
                    break
            if not header:
                raise MtlError(f"{path} is empty: expected a header line (or set 'header: false')")
            previous_line = reader.line_num
            names = [name.strip() for name in header]
            positions: dict[str, int] = {}
            for source, target in spec.columns.items():
                if str(source) not in names:
                    raise MtlError(
                        f"{path}: column {str(source)!r} of mapping file {spec.name} is not in the header; "
                        f"the header has: {', '.join(names)}"
                    )
                if names.count(str(source)) > 1:
                    raise MtlError(f"{path}: column {str(source)!r} appears more than once in the header")
                positions[target] = names.index(str(source))
            expected: int | None = len(header)
        else:
            positions = {target: int(source) for source, target in spec.columns.items()}
            expected = spec.field_count
        needed = max(positions.values()) + 1

        rows: list[list[str]] = []
        lines: list[int] = []
        malformed: list[tuple[int, str, str]] = []
        count = 0
        try:
            for row in reader:
                line = previous_line + 1
                previous_line = reader.line_num
                if not row:  # blank line
                    continue
                if expected is None:  # header-less mapping: the first row sets the width
                    expected = max(len(row), needed)
                count += 1
                if len(row) == expected:
                    rows.append(row)
                    lines.append(line)
                else:
                    reason = f"expected {expected} fields, found {len(row)}"
                    malformed.append((line, reason, _csv_text(row, spec.delimiter)))
                if count >= chunk_rows:
                    yield _csv_chunk(rows, lines, malformed, count, positions, spec.delimiter)
                    rows, lines, malformed, count = [], [], [], 0
        except UnicodeDecodeError as exc:  # text is decoded in blocks: the bad byte is at or after that line
            raise MtlError(
                f"{path} is not valid {spec.encoding.removesuffix('-sig')} text ({exc.reason}) at or after "
                f"line {previous_line + 1}; is it compressed or binary? (a mapping file can set 'encoding')"
            ) from None
        if count:
            yield _csv_chunk(rows, lines, malformed, count, positions, spec.delimiter)


def _csv_chunk(
    rows: list[list[str]],
    lines: list[int],
    malformed: list[tuple[int, str, str]],
    count: int,
    positions: dict[str, int],
    delimiter: str,
) -> _RawChunk:
    # One Arrow list array, then a column per field: much faster than zip(*rows) into Python tuples.
    table = pa.array(rows, type=pa.list_(pa.string()))
    columns = {
        target: pd.Series(pc.list_element(table, position).to_pandas(), dtype="str")
        for target, position in positions.items()
    }
    return _RawChunk(
        columns=columns,
        lines=np.asarray(lines, dtype=np.int64),
        content=lambda i: _csv_text(rows[i], delimiter),
        malformed=malformed,
        rows=count,
    )


def _parquet_chunks(path: Path, spec: LogFormat, chunk_rows: int) -> Iterator[_RawChunk]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise MtlError(f"{path} is not a readable Parquet file: {exc}") from None
    names = parquet.schema_arrow.names
    for source in spec.columns:
        if str(source) not in names:
            raise MtlError(
                f"{path}: column {str(source)!r} of mapping file {spec.name} is not in the file; "
                f"it has: {', '.join(names)}"
            )
    sources = {target: str(source) for source, target in spec.columns.items()}
    done = 0
    for batch in parquet.iter_batches(batch_size=chunk_rows, columns=sorted(set(sources.values()))):
        frame = batch.to_pandas()
        columns = {target: frame[source].reset_index(drop=True) for target, source in sources.items()}

        def content(i: int, frame: pd.DataFrame = frame) -> str:
            return ", ".join(f"{name}={frame[name].iloc[i]!r}" for name in frame.columns)[:CONTENT_CHARS]

        yield _RawChunk(
            columns=columns,
            lines=np.arange(done + 1, done + len(frame) + 1, dtype=np.int64),
            content=content,
            malformed=[],
            rows=len(frame),
        )
        done += len(frame)


_MISSING = object()


def _lookup(record: Any, path: str) -> Any:
    """``record["a"]["b"]`` for the path "a.b"; _MISSING where a step is absent or not an object."""
    for part in path.split("."):
        if not isinstance(record, dict) or part not in record:
            return _MISSING
        record = record[part]
    return record


def _json_value(value: Any) -> str | None:
    """A JSON value as the text the value parsers read (as if from a CSV field); absent or null -> None."""
    if value is _MISSING or value is None:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value)  # numbers as written (no float rounding of big ids), lists and objects as JSON


def _jsonl_chunks(path: Path, spec: LogFormat, chunk_rows: int) -> Iterator[_RawChunk]:
    """Stream JSON Lines: one event per line, or one list of events per line (``events`` in the mapping)."""
    sources = {target: str(source) for source, target in spec.columns.items()}
    values: dict[str, list[str | None]] = {target: [] for target in sources}
    lines: list[int] = []
    contents: list[str] = []
    malformed: list[tuple[int, str, str]] = []
    count = 0

    def add(event: dict, outer: dict, line: int) -> None:
        for target, source in sources.items():
            value = _lookup(event, source)
            if value is _MISSING and outer is not event:
                value = _lookup(outer, source)
            values[target].append(_json_value(value))
        lines.append(line)
        contents.append(json.dumps(event)[:CONTENT_CHARS])

    def chunk() -> _RawChunk:
        return _RawChunk(
            columns={target: pd.Series(column, dtype="str") for target, column in values.items()},
            lines=np.asarray(lines, dtype=np.int64),
            content=contents.__getitem__,
            malformed=malformed,
            rows=count,
        )

    with _open_text(path, spec.encoding) as handle:
        line = 0
        try:
            for line, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as exc:
                    count += 1
                    malformed.append((line, f"not valid JSON ({exc.msg}, column {exc.colno})", text[:CONTENT_CHARS]))
                    continue
                if not isinstance(record, dict):
                    count += 1
                    malformed.append((line, "not a JSON object", text[:CONTENT_CHARS]))
                    continue
                if spec.events_path is None:
                    count += 1
                    add(record, record, line)
                else:
                    events = _lookup(record, spec.events_path)
                    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
                        count += 1
                        reason = f"{spec.events_path!r} is not a list of event objects"
                        malformed.append((line, reason, text[:CONTENT_CHARS]))
                        continue
                    for event in events:
                        count += 1
                        add(event, record, line)
                if count >= chunk_rows:
                    yield chunk()
                    values = {target: [] for target in sources}
                    lines, contents, malformed, count = [], [], [], 0
        except UnicodeDecodeError as exc:
            raise MtlError(
                f"{path} is not valid {spec.encoding.removesuffix('-sig')} text ({exc.reason}) at or after "
                f"line {line + 1}; is it compressed or binary? (a mapping file can set 'encoding')"
            ) from None
    if count:
        yield chunk()


# --- checking and converting values (vectorised) ---------------------------------------------------------
@dataclass
class _Check:
    """Rows failing one rule, and how to word the reason for one of them (only the reported few)."""

    failed: np.ndarray
    reason: Callable[[int], str]


def _text(values: pd.Series) -> pd.Series:
    """Stripped text; missing values stay missing."""
    if not isinstance(values.dtype, pd.StringDtype):
        values = values.astype("str")
    return values.str.strip()


def _blank(values: pd.Series) -> np.ndarray:
    return (values.isna() | (values == "")).to_numpy(dtype=bool)


def _parse_ids(raw: pd.Series, name: str, checks: list[_Check]) -> np.ndarray:
    """Integer ids (BigInteger in the warehouse); text like '12.5', 'abc' or '' is a bad row."""
    n = len(raw)
    if ptypes.is_integer_dtype(raw.dtype):  # Parquet integers, maybe nullable
        missing = raw.isna().to_numpy(dtype=bool)
        values = raw.fillna(0).to_numpy(dtype=np.int64)
        ok = ~missing
        text_values = raw
    elif ptypes.is_float_dtype(raw.dtype):  # Parquet floats (integers with NaN, as pandas writes them)
        numbers = raw.to_numpy(dtype=np.float64, na_value=np.nan)
        missing = np.isnan(numbers)
        ok = ~missing & (numbers == np.floor(numbers)) & (np.abs(numbers) < 2**63)
        values = np.where(ok, numbers, 0).astype(np.int64)
        text_values = raw
    else:
        text_values = _text(raw)
        missing = _blank(text_values)
        ok = np.array(text_values.str.fullmatch(r"[+-]?\d{1,18}"), dtype=bool)  # a writable copy
        values = np.zeros(n, dtype=np.int64)
        if ok.any():
            values[ok] = text_values[ok].astype("int64").to_numpy()
        # 19 or more digits: rare, so checked one by one against the BigInteger range
        long_digits = np.flatnonzero(text_values.str.fullmatch(r"[+-]?\d{19,}").to_numpy(dtype=bool))
        for i in long_digits:
            number = int(text_values.iloc[i])
            if -(2**63) <= number < 2**63:
                values[i], ok[i] = number, True
    checks.append(_Check(missing, lambda i: f"missing {name}"))
    checks.append(_Check(~missing & ~ok, lambda i: f"{name} {text_values.iloc[i]!r} is not an integer"))
    return values


def _parse_event_types(raw: pd.Series, spec: LogFormat, checks: list[_Check]) -> np.ndarray:
    values = _text(raw)
    mapped = values.map(spec.event_types)
    missing = _blank(values)
    unknown = mapped.isna().to_numpy(dtype=bool) & ~missing
    known = ", ".join(spec.event_types)
    checks.append(_Check(missing, lambda i: "missing behaviour (event type)"))
    checks.append(_Check(unknown, lambda i: f"unknown behaviour {values.iloc[i]!r} (expected one of: {known})"))
    return mapped.to_numpy(dtype=object)


def _parse_timestamps(raw: pd.Series, spec: LogFormat, checks: list[_Check]) -> np.ndarray:
    """-> int64 microseconds since the epoch, UTC (0 where bad)."""
    n = len(raw)
    if ptypes.is_datetime64_any_dtype(raw.dtype):  # Parquet timestamps: naive ones are taken as UTC
        stamps = raw.dt.tz_convert("UTC").dt.tz_localize(None) if raw.dt.tz is not None else raw
        missing = stamps.isna().to_numpy(dtype=bool)
        micros = stamps.to_numpy(dtype="datetime64[us]").view(np.int64)
        parsed = ~missing
        shown = raw.astype("str")
        expected = "a time"
    elif spec.ts_format is not None:
        shown = _text(raw)
        missing = _blank(shown)
        stamps = pd.to_datetime(shown, format=spec.ts_format, errors="coerce", utc=True).dt.tz_localize(None)
        parsed = stamps.notna().to_numpy(dtype=bool)
        micros = np.zeros(n, dtype=np.int64)
        micros[parsed] = stamps[parsed].to_numpy(dtype="datetime64[us]").view(np.int64)
        expected = f"in format {spec.ts_format!r}"
    else:
        unit = spec.ts_unit or "s"
        shown = raw if ptypes.is_numeric_dtype(raw.dtype) else _text(raw)
        missing = shown.isna().to_numpy(dtype=bool) if ptypes.is_numeric_dtype(raw.dtype) else _blank(shown)
        numbers = pd.to_numeric(shown, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        # float64 holds every in-range value exactly, even in microseconds (4.1e15 < 2**53)
        parsed = np.isfinite(numbers) & (np.abs(numbers) < 2**62 / TIME_UNITS[unit])
        micros = np.zeros(n, dtype=np.int64)
        micros[parsed] = np.round(numbers[parsed] * TIME_UNITS[unit]).astype(np.int64)
        expected = f"a number of {UNIT_NAMES[unit]}"
    out_of_range = parsed & ((micros < _US_MIN) | (micros >= _US_MAX))
    span = f"{TS_MIN:%Y-%m-%d} .. {TS_MAX:%Y-%m-%d}"
    checks.append(_Check(missing, lambda i: "missing timestamp"))
    checks.append(_Check(~missing & ~parsed, lambda i: f"timestamp {shown.iloc[i]!r} is not {expected}"))
    checks.append(_Check(out_of_range, lambda i: f"timestamp {shown.iloc[i]!r} is outside {span} (wrong unit?)"))
    return micros


def _parse_optional(raw: pd.Series, name: str, checks: list[_Check]) -> np.ndarray:
    """Item attributes: text (NULL when blank) or, for price, a non-negative number."""
    if name == "price":
        shown = raw if ptypes.is_numeric_dtype(raw.dtype) else _text(raw)
        missing = shown.isna().to_numpy(dtype=bool) if ptypes.is_numeric_dtype(raw.dtype) else _blank(shown)
        numbers = pd.to_numeric(shown, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~missing & ~(np.isfinite(numbers) & (numbers >= 0))
        checks.append(_Check(bad, lambda i: f"price {shown.iloc[i]!r} is not a non-negative number"))
        return np.where(missing | bad, None, numbers.astype(object))
    values = _text(raw)
    missing = _blank(values)
    limit = TEXT_LIMITS.get(name)
    if limit is not None:
        too_long = (values.str.len().fillna(0).to_numpy() > limit) & ~missing
        checks.append(_Check(too_long, lambda i: f"{name} is longer than {limit} characters"))
    return np.where(missing, None, values.to_numpy(dtype=object, na_value=None))


@dataclass
class _Parsed:
    good: dict[str, np.ndarray]  # warehouse column -> values of the good rows
    bad: list[tuple[int, int]]  # (line, index into the chunk) of the bad rows, in file order
    checks: list[_Check]


def _parse(chunk: _RawChunk, spec: LogFormat) -> _Parsed:
    checks: list[_Check] = []
    cols = chunk.columns
    values: dict[str, np.ndarray] = {
        "user_id": _parse_ids(cols["user_id"], "user_id", checks),
        "item_id": _parse_ids(cols["item_id"], "item_id", checks),
        "event_type": _parse_event_types(cols["event_type"], spec, checks),
        "ts": _parse_timestamps(cols["ts"], spec, checks),
    }
    for name in OPTIONAL_COLUMNS:
        if name in cols:
            values[name] = _parse_optional(cols[name], name, checks)
    failed = np.zeros(len(chunk.lines), dtype=bool)
    for check in checks:
        failed |= check.failed
    good = {name: column[~failed] for name, column in values.items()}
    bad = [(int(chunk.lines[i]), int(i)) for i in np.flatnonzero(failed)]
    return _Parsed(good=good, bad=bad, checks=checks)


def _record_bad(report: ImportReport, chunk: _RawChunk, parsed: _Parsed, max_reported: int) -> None:
    """Count the chunk's bad rows and keep the first ``max_reported`` of the file, in line order."""
    report.bad_rows += len(chunk.malformed) + len(parsed.bad)
    room = max_reported - len(report.first_bad)
    if room <= 0:
        return
    candidates: list[tuple[int, Callable[[], tuple[str, str]]]] = []
    for line, reason, content in chunk.malformed[:room]:
        candidates.append((line, lambda reason=reason, content=content: (reason, content)))
    for line, i in parsed.bad[:room]:

        def describe(i: int = i) -> tuple[str, str]:
            reason = next(check.reason(i) for check in parsed.checks if check.failed[i])
            return reason, chunk.content(i)

        candidates.append((line, describe))
    for line, describe in sorted(candidates, key=lambda item: item[0])[:room]:
        reason, content = describe()
        report.first_bad.append({"line": line, "reason": reason, "content": content})


# --- event ids ----------------------------------------------------------------------------------------------
# splitmix64's finaliser: a bijection on 64-bit integers with full avalanche, in plain numpy arithmetic so
# the ids never depend on a library's hashing (they must stay the same for every future re-import).
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_SEED = np.uint64(0x6D746C5F696D706F)  # "mtl_impo"
_EVENT_TYPE_CODES = {
    name: int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    for name in wh.BEHAVIOR_EVENT_TYPES
}


def _mix(values: np.ndarray) -> np.ndarray:
    values = values ^ (values >> np.uint64(30))
    values = values * _MIX_1
    values = values ^ (values >> np.uint64(27))
    values = values * _MIX_2
    return values ^ (values >> np.uint64(31))


def _as_u64(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.int64).view(np.uint64)


def content_hashes(user_id: np.ndarray, item_id: np.ndarray, event_type: np.ndarray, ts_us: np.ndarray) -> np.ndarray:
    """64-bit hash of each event's content (ids, type, time in microseconds), as uint64."""
    codes = np.array([_EVENT_TYPE_CODES[name] for name in event_type], dtype=np.uint64)
    hashes = np.full(len(codes), _SEED, dtype=np.uint64)
    for part in (_as_u64(user_id), _as_u64(item_id), codes, _as_u64(ts_us)):
        hashes = _mix(hashes ^ part)
    return hashes


def imported_event_ids(content: np.ndarray, occurrence: np.ndarray) -> np.ndarray:
    """Event ids in [2**62, 2**63) from content hashes and occurrence indexes (0 for an event's first copy)."""
    hashes = _mix(content ^ _mix(_as_u64(occurrence)))
    return ((hashes >> np.uint64(2)) | np.uint64(IMPORTED_ID_MIN)).view(np.int64)


class _Occurrences:
    """How many identical events came earlier in the file, across chunks.

    Keeps the sorted content hashes seen so far (8 bytes per distinct event) and, for the few repeated
    ones, how often each was seen.
    """

    def __init__(self) -> None:
        self._seen = np.empty(0, dtype=np.uint64)
        self._repeats: dict[int, int] = {}

    def index(self, hashes: np.ndarray) -> np.ndarray:
        unique, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
        within = pd.Series(inverse).groupby(inverse).cumcount().to_numpy(dtype=np.int64)
        position = np.searchsorted(self._seen, unique)
        found = np.zeros(len(unique), dtype=bool)
        inside = position < len(self._seen)
        found[inside] = self._seen[position[inside]] == unique[inside]
        earlier = np.zeros(len(unique), dtype=np.int64)
        for k in np.flatnonzero(found):
            key = int(unique[k])
            earlier[k] = self._repeats.get(key, 1)
            self._repeats[key] = int(earlier[k] + counts[k])
        for k in np.flatnonzero(~found & (counts > 1)):
            self._repeats[int(unique[k])] = int(counts[k])
        self._seen = np.insert(self._seen, position[~found], unique[~found])
        return earlier[inverse] + within


class _SeenIds:
    """Ids already written by this import, so each user and item is sent to the database once."""

    def __init__(self) -> None:
        self._seen = np.empty(0, dtype=np.int64)

    def new(self, ids: np.ndarray) -> np.ndarray:
        unique = np.unique(ids)
        position = np.searchsorted(self._seen, unique)
        found = np.zeros(len(unique), dtype=bool)
        inside = position < len(self._seen)
        found[inside] = self._seen[position[inside]] == unique[inside]
        fresh = unique[~found]
        self._seen = np.insert(self._seen, position[~found], fresh)
        return fresh


# --- writing ---------------------------------------------------------------------------------------------------
WRITE_BATCH = 20_000  # rows per insert: bounds the Python objects alive at once, whatever chunk_rows is


def _insert(conn: Connection, table: Table, columns: dict[str, np.ndarray]) -> int:
    """Insert column arrays (None for NULL) with ON CONFLICT DO NOTHING; returns how many rows were new."""
    names = list(columns)
    total = len(columns[names[0]])
    new = 0
    for start in range(0, total, WRITE_BATCH):
        values = []
        for array in columns.values():
            part = array[start : start + WRITE_BATCH]
            if np.issubdtype(part.dtype, np.datetime64):
                part = part.astype("datetime64[us]")  # .tolist() -> naive datetimes (UTC by convention)
            values.append(part.tolist())
        rows = [dict(zip(names, row, strict=True)) for row in zip(*values, strict=True)]
        new += wh.insert_ignoring_duplicates(conn, table, rows)
    return new


class _Writer:
    """Writes the good rows of each chunk inside the import's transaction and counts the new events."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.occurrences = _Occurrences()
        self.users = _SeenIds()
        self.items = _SeenIds()
        self.loaded = 0

    def write(self, good: dict[str, np.ndarray]) -> None:
        if len(good["user_id"]) == 0:
            return
        _insert(self.conn, wh.users, {"user_id": self.users.new(good["user_id"])})
        self._write_items(good)
        hashes = content_hashes(good["user_id"], good["item_id"], good["event_type"], good["ts"])
        ids = imported_event_ids(hashes, self.occurrences.index(hashes))
        # In key order the primary-key index is filled page by page instead of at random places.
        order = np.argsort(ids, kind="stable")
        events = {
            "event_id": ids[order],
            "user_id": good["user_id"][order],
            "item_id": good["item_id"][order],
            "event_type": good["event_type"][order],
            "ts": good["ts"][order].view("datetime64[us]"),
        }
        self.loaded += _insert(self.conn, wh.behavior_events, events)

    def _write_items(self, good: dict[str, np.ndarray]) -> None:
        attributes = [name for name in OPTIONAL_COLUMNS if name in good]
        fresh = self.items.new(good["item_id"])
        if not attributes or len(fresh) == 0:
            _insert(self.conn, wh.items, {"item_id": fresh})
            return
        frame = pd.DataFrame({name: good[name] for name in ("item_id", *attributes)})
        frame = frame[frame["item_id"].isin(fresh)]
        # An item's first non-blank value of each attribute in this chunk; existing items are left alone.
        first = frame.groupby("item_id", sort=True).first()
        columns = {"item_id": first.index.to_numpy(dtype=np.int64)}
        for name in attributes:
            columns[name] = first[name].astype(object).where(first[name].notna(), None).to_numpy(dtype=object)
        _insert(self.conn, wh.items, columns)


# --- the import --------------------------------------------------------------------------------------------------
def import_logs(
    path: str | Path,
    fmt: str | Path,
    engine: Engine,
    skip_bad: bool = False,
    max_reported: int = 5,
    chunk_rows: int = 200_000,
) -> ImportReport:
    """Import the behaviour log at ``path`` (layout ``fmt``: 'taobao' or a YAML mapping file's path).

    Without ``skip_bad`` any bad row aborts and nothing is written (``aborted=True``); the whole file is
    still read so the report counts every bad row. Re-importing a file adds nothing.
    """
    spec = load_format(fmt)
    source = Path(path)
    if not source.exists():
        raise MtlError(f"log file {source} does not exist")
    if not source.is_file():
        raise MtlError(f"log file {source} is not a file")
    try:
        with source.open("rb"):
            pass
    except OSError as exc:
        raise MtlError(f"log file {source} cannot be read: {exc.strerror or exc}") from None
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be at least 1")
    kind = "csv" if spec is TAOBAO_FORMAT else _file_format(source, spec)
    readers = {"parquet": _parquet_chunks, "jsonl": _jsonl_chunks, "csv": _csv_chunks}
    chunks = readers[kind](source, spec, chunk_rows)

    report = ImportReport()
    url = engine.url.render_as_string(hide_password=True)
    try:
        wh.create_schema(engine)
        with engine.connect() as conn, _bigger_sqlite_cache(conn), conn.begin() as transaction:
            writer = _Writer(conn)
            for chunk in _checked(chunks, source, spec):
                parsed = _parse(chunk, spec)
                report.rows_read += chunk.rows
                _record_bad(report, chunk, parsed, max_reported)
                if report.bad_rows and not skip_bad:
                    report.aborted = True
                    transaction.rollback()
                    break
                writer.write(parsed.good)
            else:
                report.rows_loaded = writer.loaded
    except SQLAlchemyError as exc:
        raise MtlError(
            f"writing to the warehouse at {url} failed: {exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0]}; nothing was imported"
        ) from exc
    if report.aborted:  # count the rest of the file's bad rows, without a database
        for chunk in _checked(chunks, source, spec):
            parsed = _parse(chunk, spec)
            report.rows_read += chunk.rows
            _record_bad(report, chunk, parsed, max_reported)
    return report


@contextlib.contextmanager
def _bigger_sqlite_cache(conn: Connection, kib: int = 131_072) -> Iterator[None]:
    """SQLite's default 2 MB page cache thrashes on the random-order keys of a big import; lend it more."""
    if conn.dialect.name != "sqlite":
        yield
        return
    previous = conn.exec_driver_sql("PRAGMA cache_size").scalar()
    conn.exec_driver_sql(f"PRAGMA cache_size=-{kib}")
    conn.commit()  # end the transaction SQLAlchemy began for the pragma (pragmas are not transactional)
    try:
        yield
    finally:  # the connection goes back to the engine's pool: leave it as it was
        with contextlib.suppress(SQLAlchemyError):
            conn.exec_driver_sql(f"PRAGMA cache_size={int(previous)}")
            conn.commit()


def _checked(chunks: Iterator[_RawChunk], source: Path, spec: LogFormat) -> Iterator[_RawChunk]:
    """Turn problems with the file as a whole (encoding, CSV syntax, I/O) into clear MtlErrors."""
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        except UnicodeDecodeError as exc:  # in the header line
            raise MtlError(
                f"{source} is not valid {spec.encoding.removesuffix('-sig')} text ({exc.reason}); is it "
                "compressed or binary? (a mapping file can set 'encoding')"
            ) from None
        except csv.Error as exc:
            raise MtlError(f"{source} is not readable as CSV: {exc}") from None
        except (OSError, EOFError) as exc:
            raise MtlError(f"{source} cannot be read: {exc}") from None
        except pa.ArrowException as exc:
            raise MtlError(f"{source} cannot be read as Parquet: {exc}") from None
        yield chunk
