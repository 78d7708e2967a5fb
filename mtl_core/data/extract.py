"""Extraction: a window of the warehouse into a snapshot: one manifest over Parquet files.

Event tables (behaviour and ad events) are stored once per UTC day in a day store shared by every window
(``mtl_core.data.days``: layout, reuse rules, the warehouse checksum). A run reads from the warehouse only
the days of its window that no earlier run extracted, or whose source rows changed since (the checksum the
warehouse computes per day differs: late events, a backfill); every other day's file is reused as it is. A
window's first or last day, when the window cuts it, is read for the window alone and kept in its folder.

Dimension tables (users, items) are read whole for each window, as of its end (every row created before it):
they are one row per user or item (a small fraction of the events), carry no event time to partition by,
and change in place (a price, a region), so a day of them is not a thing to reuse.

A snapshot (the window) is a folder with ``manifest.json`` (interval, every table's files with their row
counts and digests, one content hash over them) and the dimension files; ``table_files`` and
``read_snapshot_table`` are how every reader finds a table's rows. Rows are streamed in chunks (server-side
cursors on PostgreSQL) straight into the Parquet writer, so memory does not grow with the window. Nothing is
half-written: a day file is written to a temporary sibling and renamed into place, and the window's folder
is built in a temporary sibling folder and renamed into place once complete, so a failure leaves the old
snapshot as it was (and the days finished before it, complete, for a retry to reuse).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import BigInteger, DateTime, Float, Integer, String, Table, Text, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from mtl_core.data import days as day_store
from mtl_core.data import warehouse as wh
from mtl_core.data.pseudonyms import USER_ID_COLUMNS, Pseudonymiser
from mtl_core.errors import MtlError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# 2: event tables as day partitions (``parts``); 1: one file per table (still readable).
FORMAT_VERSION = 2
DAYS_DIR = "days"
CHURN_HORIZON_DAYS = 14


class ExtractionError(MtlError):
    pass


class SnapshotIntegrityError(MtlError):
    """A snapshot's files do not hold what its manifest says: tampered with, damaged or half copied."""


def parse_instant(value: str | date | datetime, name: str) -> datetime:
    """'2026-01-05', '2026-01-05T12:00' or an aware ISO time -> naive UTC datetime (the warehouse's form)."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, date):
        parsed = datetime(value.year, value.month, value.day)
    else:
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ExtractionError(
                f"{name} {value!r} is not a date or time; use YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS][+HH:MM]"
            ) from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    return parsed


def _arrow_type(column) -> pa.DataType:
    kind = column.type
    if isinstance(kind, (BigInteger, Integer)):
        return pa.int64()
    if isinstance(kind, Float):
        return pa.float64()
    if isinstance(kind, DateTime):
        return pa.timestamp("us", tz="UTC")
    if isinstance(kind, (String, Text)):
        return pa.string()
    raise TypeError(f"no Parquet type for column {column.name} of type {kind}")  # pragma: no cover


def arrow_schema(table: Table) -> pa.Schema:
    return pa.schema(
        [pa.field(c.name, _arrow_type(c), nullable=c.nullable or not c.primary_key) for c in table.columns]
    )


def _dimension_query(table: Table, end: datetime):
    created = table.c.signup_ts if table.name == "users" else table.c.created_ts
    where = or_(created < end, created.is_(None))
    describe = f"{created.name} < {end.isoformat()} OR {created.name} IS NULL (as of the interval's end)"
    return select(table).where(where).order_by(list(table.primary_key.columns)[0]), describe


def _slice_query(table: Table, start: datetime, end: datetime):
    # (ts, event_id) follows the ts index: PostgreSQL plans a server-side cursor for its first rows, and
    # ORDER BY event_id alone would make it walk the primary key through the whole table for every day.
    return select(table).where(table.c.ts >= start, table.c.ts < end).order_by(table.c.ts, table.c.event_id)


def _chunks(engine: Engine, table: Table, stmt, chunk_rows: int, pseudonyms: Pseudonymiser) -> Iterator[pa.Table]:
    schema = arrow_schema(table)
    names = [c.name for c in table.columns]
    with engine.connect() as conn:
        # yield_per streams: on PostgreSQL (psycopg 3) a named server-side cursor fetched chunk_rows at a time,
        # so neither the driver nor SQLAlchemy holds more than one chunk (tests/unit/test_day_partitions.py).
        result = conn.execution_options(yield_per=chunk_rows).execute(stmt)
        for rows in result.partitions():
            columns = list(zip(*rows, strict=True))
            # Raw user ids never leave the warehouse: they are replaced before anything is written.
            for i, name in enumerate(names):
                if name in USER_ID_COLUMNS:
                    columns[i] = pseudonyms.values(columns[i])
            yield pa.table(
                [pa.array(values, type=schema.field(name).type) for name, values in zip(names, columns, strict=True)],
                schema=schema,
            )


def _rows_digest(batch: pa.Table, legacy: bool = False) -> bytes:
    """Per-row hashes, so the table digest does not depend on how the rows were chunked.

    Integers are hashed as pandas' nullable Int64, which hashes a value as NumPy's int64 does whether or not
    the chunk holds a null. Format 1 hashed plain NumPy columns, where a chunk with a null in an integer column
    turned floats and hashed otherwise, so its digests depended on where chunks ended (``legacy``: verify them
    as they were made). Days written under different ``chunk_rows`` must add up to one window digest.
    """
    frame = batch.to_pandas(types_mapper=None if legacy else {pa.int64(): pd.Int64Dtype()}.get)
    return pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes()


@dataclass
class _TableResult:
    rows: int
    sha256: str
    seconds: float


def _new_digest(schema: pa.Schema):
    # Without metadata: a day file's footer record is not part of its content.
    return hashlib.sha256(str(schema.remove_metadata()).encode())


def _write_table(
    engine: Engine,
    table: Table,
    stmt,
    path: Path,
    chunk_rows: int,
    pseudonyms: Pseudonymiser,
    record: dict[str, Any] | None = None,
) -> _TableResult:
    """Stream ``stmt``'s rows into the Parquet file ``path``; ``record`` (completed with the row count and
    digest) goes into the file's footer under ``days.META_KEY``."""
    began = time.perf_counter()
    schema = arrow_schema(table)
    digest = _new_digest(schema)
    rows = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for batch in _chunks(engine, table, stmt, chunk_rows, pseudonyms):
            writer.write_table(batch)
            digest.update(_rows_digest(batch))
            rows += batch.num_rows
        if record is not None:
            writer.add_key_value_metadata(
                {day_store.META_KEY: json.dumps(record | {"rows": rows, "sha256": digest.hexdigest()})}
            )
    return _TableResult(rows=rows, sha256=digest.hexdigest(), seconds=time.perf_counter() - began)


def _table_digest(parts: list[dict[str, Any]]) -> str:
    """A table's digest from its parts: a single undated file's own digest, else one over (day, digest)."""
    if len(parts) == 1 and "day" not in parts[0]:
        return parts[0]["sha256"]
    digest = hashlib.sha256()
    for part in parts:
        cut = f"{part['from']}..{part['to']}" if "from" in part else ""
        digest.update(f"{part['day']}{cut}:{part['sha256']};".encode())
    return digest.hexdigest()


@dataclass
class _Run:
    """What one extraction needs everywhere: the warehouse, the key, where things go, what was read."""

    engine: Engine
    pseudonyms: Pseudonymiser
    out: Path
    staging: Path
    store: Path
    chunk_rows: int
    rows_read: int = 0

    @property
    def source(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)


@contextmanager
def _explained(run: _Run, table: str, day: date | None = None) -> Iterator[None]:
    """Turn a warehouse or disk failure while reading ``table`` (one ``day`` of it) into an ExtractionError
    that names the table, the day, the warehouse (no password) and what was left as it was."""
    which = f"table {table}" + (f" day {day.isoformat()}" if day else "")
    kept = f"the snapshot {run.out} is as it was"
    if day is not None:
        kept += f"; the days finished before are complete in {run.store} and a retry reads only the others"
    try:
        yield
    except SQLAlchemyError as exc:
        raise ExtractionError(
            f"reading {which} from the warehouse at {run.source} failed: {exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0]}. Nothing of it was written: {kept}. Is the schema there (mtl simulate or "
            "mtl import-logs create it), the URL right and the server up?"
        ) from exc
    except OSError as exc:
        raise ExtractionError(
            f"writing {which} of the snapshot {run.out} failed: {exc.strerror or exc} (errno {exc.errno}). The "
            f"partial file was removed and {kept}; free space under data_dir (old snapshots and runs) and retry."
        ) from exc


def _write_file(run: _Run, table: Table, stmt, path: Path, record: dict[str, Any] | None = None) -> _TableResult:
    """``_write_table`` into a temporary sibling of ``path``, renamed into place once complete."""
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        result = _write_table(run.engine, table, stmt, staging, run.chunk_rows, run.pseudonyms, record)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    run.rows_read += result.rows
    return result


def _extract_dimension(run: _Run, table: Table, end: datetime) -> dict[str, Any]:
    stmt, describe = _dimension_query(table, end)
    with _explained(run, table.name):
        result = _write_file(run, table, stmt, run.staging / f"{table.name}.parquet")
    part = {"file": f"{table.name}.parquet", "rows": result.rows, "sha256": result.sha256}
    return {"rows": result.rows, "sha256": result.sha256, "filter": describe, "parts": [part]}


def _extract_events(run: _Run, table: Table, start: datetime, end: datetime) -> dict[str, Any]:
    """The window's days of an event table: reused from the day store, or read, or cut for this window."""
    slices = day_store.day_slices(start, end)
    whole = [s for s in slices if s.whole]
    checksums: dict[date, dict[str, int]] = {}
    began = time.perf_counter()
    if whole:
        # Taken before any row is read: an event that lands between the checksum and the read is then in the
        # file but not in the recorded checksum, so the next run sees a difference and reads the day again
        # (the other order would hide it for good).
        with _explained(run, table.name):
            checksums = day_store.day_checksums(run.engine, table, whole[0].start, whole[-1].end)
    checksum_seconds = time.perf_counter() - began
    parts, done = [], {"extracted": 0, "replaced": 0, "reused": 0, "cut": 0}
    for piece in slices:
        stmt = _slice_query(table, piece.start, piece.end)
        if not piece.whole:
            name = f"{table.name}.{piece.start:%Y%m%dT%H%M%S}-{piece.end:%Y%m%dT%H%M%S}.parquet"
            with _explained(run, table.name, piece.day):
                result = _write_file(run, table, stmt, run.staging / name)
            part = {"day": piece.day.isoformat(), "from": piece.start.isoformat(), "to": piece.end.isoformat()}
            parts.append(part | {"file": name, "rows": result.rows, "sha256": result.sha256, "this_run": "cut"})
            done["cut"] += 1
            continue
        path = day_store.day_path(run.store, table.name, piece.day)
        checksum = checksums.get(piece.day, day_store.EMPTY_DAY)
        record = day_store.read_day_record(path)
        if day_store.is_reusable(record, table.name, piece.day, run.pseudonyms.key_id, checksum):
            this_run = "reused"
        else:
            this_run = "extracted" if record is None else "replaced"
            record = {
                "format_version": day_store.DAY_FORMAT_VERSION,
                "table": table.name,
                "day": piece.day.isoformat(),
                "key_id": run.pseudonyms.key_id,
                "source": run.source,
                "checksum": checksum,
                "extracted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            with _explained(run, table.name, piece.day):
                result = _write_file(run, table, stmt, path, record)
            record |= {"rows": result.rows, "sha256": result.sha256}
        done[this_run] += 1
        parts.append(
            {
                "day": piece.day.isoformat(),
                "file": os.path.relpath(os.path.abspath(path), os.path.abspath(run.out)),
                "rows": record["rows"],
                "sha256": record["sha256"],
                "checksum": checksum,
                "this_run": this_run,
            }
        )
    log.info(
        "%s: %d days reused, %d extracted, %d replaced (source changed), %d cut to the window",
        table.name,
        done["reused"],
        done["extracted"],
        done["replaced"],
        done["cut"],
    )
    return {
        "rows": sum(p["rows"] for p in parts),
        "sha256": _table_digest(parts),
        "filter": f"ts >= {start.isoformat()} AND ts < {end.isoformat()}",
        "days": done,
        "checksum_seconds": round(checksum_seconds, 3),
        "parts": parts,
    }


def extract_snapshot(
    engine: Engine,
    start: str | datetime,
    end: str | datetime,
    out_dir: str | Path,
    pseudonyms: Pseudonymiser,
    chunk_rows: int = 50_000,
    days_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Write the snapshot of [start, end) to ``out_dir`` and return its manifest.

    Event days come from (and go to) the day store ``days_dir`` (default: ``days`` beside ``out_dir``, so the
    windows of one folder share their days). Every user id is written as its pseudonym under ``pseudonyms``'
    key (mtl_core.data.pseudonyms).
    """
    start_at, end_at = parse_instant(start, "start"), parse_instant(end, "end")
    if start_at >= end_at:
        raise ExtractionError(f"empty interval: start {start_at.isoformat()} is not before end {end_at.isoformat()}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    source = engine.url.render_as_string(hide_password=True)
    store = day_store.store_dir(
        Path(days_dir) if days_dir is not None else out.parent / DAYS_DIR, source, pseudonyms.key_id
    )
    run = _Run(engine, pseudonyms, out, staging, store, chunk_rows)
    staging.mkdir()
    began = time.perf_counter()
    try:
        tables: dict[str, Any] = {}
        for name in wh.SOURCE_TABLES:
            table = wh.metadata.tables[name]
            if name in wh.EVENT_TABLES:
                day_store.ensure_store(store, source, pseudonyms.key_id)
                tables[name] = _extract_events(run, table, start_at, end_at)
            else:
                tables[name] = _extract_dimension(run, table, end_at)
            tables[name]["schema"] = {f.name: str(f.type) for f in arrow_schema(table)}
        content = hashlib.sha256()
        for name in sorted(tables):
            content.update(f"{name}:{tables[name]['sha256']};".encode())
        manifest = {
            "format_version": FORMAT_VERSION,
            "interval": {"start": start_at.isoformat() + "Z", "end": end_at.isoformat() + "Z"},
            "source": source,
            "tables": tables,
            "content_hash": content.hexdigest(),
            "day_store": os.path.relpath(os.path.abspath(store), os.path.abspath(out)),
            # Which key made the pseudonyms (a fingerprint, not the key): snapshots under different keys
            # do not share users.
            "user_ids": {"pseudonymised": list(USER_ID_COLUMNS), "key_id": pseudonyms.key_id},
            "rows_read": run.rows_read,
            "extracted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - began, 3),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(staging, out)
    except OSError as exc:  # writing the manifest or moving the snapshot into place
        shutil.rmtree(staging, ignore_errors=True)
        raise ExtractionError(
            f"writing the snapshot {out} failed: {exc.strerror or exc} (errno {exc.errno}); the snapshot {out} is "
            "as it was; free space under data_dir and retry"
        ) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def replace_dir(staging: Path, out: Path) -> None:
    """Move a finished directory into place; an older one is moved aside first and removed after.

    Readers see the old directory or the new one, never a half-written mix.
    """
    if out.exists():
        aside = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(aside)
        staging.rename(out)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        staging.rename(out)


def read_manifest(snapshot_dir: str | Path) -> dict[str, Any]:
    path = Path(snapshot_dir) / MANIFEST
    if not path.is_file():
        raise ExtractionError(f"{snapshot_dir} is not a snapshot: {MANIFEST} is missing (make one with mtl extract)")
    return json.loads(path.read_text())


def table_parts(manifest: dict[str, Any], table: str) -> list[dict[str, Any]]:
    """A table's files as the manifest lists them (``file`` relative to the snapshot, ``rows``, ``sha256``,
    and ``day`` for an event table's days), in day order. Format 1 snapshots had one ``file`` per table."""
    meta = manifest.get("tables", {}).get(table)
    if meta is None:
        raise SnapshotIntegrityError(
            f"the snapshot's manifest lists no table {table} (it lists {', '.join(manifest.get('tables', {}))}); "
            "re-extract the interval (mtl extract)"
        )
    if "parts" in meta:
        return list(meta["parts"])
    return [{"file": meta["file"], "rows": meta["rows"], "sha256": meta["sha256"]}]


def _part_label(snapshot: Path, table: str, part: dict[str, Any]) -> str:
    """How messages name a file: ``items.parquet``, or the table, the day and where its file is."""
    if "day" not in part:
        return part["file"]
    return f"{table} day {part['day']} ({os.path.normpath(snapshot / part['file'])})"


def table_files(snapshot_dir: str | Path, table: str) -> list[Path]:
    """The Parquet files that hold a snapshot's ``table``, in day order: the one place that knows where a
    window's rows are (its folder for users and items, the day store for event days). Raises
    SnapshotIntegrityError naming the first file that is missing."""
    snapshot = Path(snapshot_dir)
    files = []
    for part in table_parts(read_manifest(snapshot), table):
        path = Path(os.path.normpath(snapshot / part["file"]))
        if not path.is_file():
            raise SnapshotIntegrityError(
                f"snapshot {snapshot}: {_part_label(snapshot, table, part)} is missing; re-extract the interval "
                "(mtl extract reads a missing day again)"
            )
        files.append(path)
    return files


def read_snapshot_table(snapshot_dir: str | Path, table: str, columns: list[str] | None = None) -> pa.Table:
    """A snapshot's ``table`` (its days concatenated in order) as one Arrow table, footer records dropped.

    A file that cannot be read, or whose columns differ from the first file's, is a SnapshotIntegrityError
    naming it: validation then reports the table's columns as they are, not a mix of days.
    """
    snapshot = Path(snapshot_dir)
    pieces = []
    for path in table_files(snapshot, table):
        try:
            piece = pq.read_table(path, columns=columns)
        except (OSError, pa.ArrowException) as exc:
            raise SnapshotIntegrityError(
                f"snapshot {snapshot}: {path} of table {table} cannot be read as Parquet ({exc.__class__.__name__}: "
                f"{str(exc).splitlines()[0][:200]}); re-extract the interval"
            ) from None
        piece = piece.replace_schema_metadata(None)
        if pieces and piece.schema != pieces[0].schema:
            raise SnapshotIntegrityError(
                f"snapshot {snapshot}: {path} of table {table} has columns {piece.schema.names} of types "
                f"{[str(t) for t in piece.schema.types]}, unlike the table's first file {pieces[0].schema.names}; "
                "re-extract the interval"
            )
        pieces.append(piece)
    return pa.concat_tables(pieces)


def verify_snapshot(snapshot_dir: str | Path) -> dict[str, Any]:
    """The manifest, once every file of every table is shown to hold the rows it was extracted with.

    Each file's digest is recomputed from the Parquet file as extraction computed it from the warehouse
    (the schema, then a hash per row, in order), so a changed, missing or truncated file (a day of an event
    table, named with its day) is found before anything validates or trains on it, and the registry never
    records a content hash the files contradict. A day replaced since the window was extracted (its source
    changed, and a later extraction read it again) is found the same way: re-extract the window.
    """
    snapshot = Path(snapshot_dir)
    manifest = read_manifest(snapshot)
    for name in manifest["tables"]:
        parts = table_parts(manifest, name)
        if _table_digest(parts) != manifest["tables"][name]["sha256"]:
            raise SnapshotIntegrityError(
                f"snapshot {snapshot}: the manifest's files of {name} do not add up to its digest: manifest.json "
                "was edited after extraction; re-extract the interval (mtl extract)"
            )
        for part in parts:
            _verify_part(snapshot, name, part, legacy=manifest.get("format_version", 1) < 2)
    return manifest


def _verify_part(snapshot: Path, table: str, part: dict[str, Any], legacy: bool) -> None:
    label = _part_label(snapshot, table, part)
    path = snapshot / part["file"]
    if not path.is_file():
        raise SnapshotIntegrityError(
            f"snapshot {snapshot}: {label} is missing; re-extract the interval (mtl extract reads a missing day again)"
        )
    try:
        parquet = pq.ParquetFile(path)
        digest = _new_digest(parquet.schema_arrow)
        rows = 0
        # Row group by row group, so memory holds one chunk; format 1's digests need the chunks as written.
        for group in range(parquet.num_row_groups):
            piece = parquet.read_row_group(group)
            digest.update(_rows_digest(piece, legacy))
            rows += piece.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise SnapshotIntegrityError(
            f"snapshot {snapshot}: {label} cannot be read ({exc.__class__.__name__}); re-extract the interval"
        ) from None
    if rows != part["rows"] or digest.hexdigest() != part["sha256"]:
        again = "re-extract the interval (mtl extract) rather than train on it"
        if "checksum" in part:  # a shared day: a later extraction may have replaced it, or someone edited it
            again = (
                "it was replaced after this window was extracted (its source rows changed and a later extraction "
                f"read the day again) or edited; {again}, and if the day stays wrong delete {path} so that it is "
                "read again"
            )
        raise SnapshotIntegrityError(
            f"snapshot {snapshot}: {label} ({rows:,} rows) does not match the manifest ({part['rows']:,} rows, "
            f"sha256 {part['sha256'][:12]}...): the file was changed after extraction; {again}"
        )


def copy_snapshot(snapshot_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """A self-contained copy of a snapshot in ``out_dir``: its manifest and every file it lists, the days
    under ``out_dir/<table>/`` (a plain copy of the folder would point at the day store it came from).

    Digests are unchanged (same rows); returns the copy's manifest. For taking a window elsewhere, or
    damaging one in a test without touching the shared days.
    """
    snapshot, out = Path(snapshot_dir), Path(out_dir)
    manifest = read_manifest(snapshot)
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        for name in manifest["tables"]:
            # table_parts returns the manifest's own part records: renaming a file here renames it there.
            for part, path in zip(table_parts(manifest, name), table_files(snapshot, name), strict=True):
                if "day" in part and "from" not in part:
                    part["file"] = f"{name}/{path.name}"
                target = staging / part["file"]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        manifest.pop("day_store", None)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def describe_snapshot(snapshot_dir: str | Path) -> dict[str, Any]:
    """Row counts and the label rate of each task, read from a snapshot (the demo's and on-call's view)."""
    snapshot = Path(snapshot_dir)
    manifest = read_manifest(snapshot)
    behavior = read_snapshot_table(snapshot, "behavior_events", ["user_id", "event_type", "ts"]).to_pandas()
    ads = read_snapshot_table(snapshot, "ad_events", ["user_id", "event_type", "ts"]).to_pandas()
    count = behavior["event_type"].value_counts()
    ad_count = ads["event_type"].value_counts()

    def ratio(num: float, den: float) -> float | None:
        return round(float(num) / float(den), 4) if den else None

    rates = {
        "ctr": ratio(count.get("click", 0), count.get("impression", 0)),
        "cvr": ratio(count.get("purchase", 0), count.get("click", 0)),
        "ad_ctr": ratio(ad_count.get("ad_click", 0), ad_count.get("ad_impression", 0)),
        "churn": _churn_rate(behavior, ads, manifest),
    }
    return {
        "interval": manifest["interval"],
        "content_hash": manifest["content_hash"],
        "rows": {name: meta["rows"] for name, meta in manifest["tables"].items()},
        "events": {str(k): int(v) for k, v in count.items()} | {str(k): int(v) for k, v in ad_count.items()},
        "label_rates": rates,
    }


def _churn_rate(behavior: pd.DataFrame, ads: pd.DataFrame, manifest: dict[str, Any]) -> float | None:
    """Share of users active before the last 14 days of the interval with no activity in those 14 days."""
    end = pd.Timestamp(manifest["interval"]["end"])
    cutoff = end - timedelta(days=CHURN_HORIZON_DAYS)
    if cutoff <= pd.Timestamp(manifest["interval"]["start"]):
        return None
    activity = pd.concat([behavior[["user_id", "ts"]], ads[["user_id", "ts"]]])
    before = set(activity.loc[activity["ts"] < cutoff, "user_id"].to_numpy())
    after = set(activity.loc[activity["ts"] >= cutoff, "user_id"].to_numpy())
    if not before:
        return None
    return round(float(np.mean([user not in after for user in before])), 4)
