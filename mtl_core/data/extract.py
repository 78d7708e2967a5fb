"""Extraction: one data interval of the warehouse into a Parquet snapshot directory.

A snapshot holds one Parquet file per source table and a ``manifest.json`` (interval, row counts, schema,
per-table and overall content hashes). Event tables are cut to the half-open interval [start, end) by
event time; dimension tables (users, items) are taken as of ``end`` (every row created before it), since
events in the interval refer to users and items created long before.

Rows are streamed in chunks straight into the Parquet writer, so memory does not grow with the interval.
The snapshot is written to a temporary sibling directory and renamed into place: a failure or an
interruption never leaves a half-written snapshot, and a re-extraction replaces the old one only once
the new one is complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Iterator
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

from mtl_core.data import warehouse as wh
from mtl_core.data.pseudonyms import USER_ID_COLUMNS, Pseudonymiser
from mtl_core.errors import MtlError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
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


def _interval_query(table: Table, start: datetime, end: datetime):
    if table.name in wh.EVENT_TABLES:
        where = (table.c.ts >= start) & (table.c.ts < end)
        describe = f"ts >= {start.isoformat()} AND ts < {end.isoformat()}"
    else:
        created = table.c.signup_ts if table.name == "users" else table.c.created_ts
        where = or_(created < end, created.is_(None))
        describe = f"{created.name} < {end.isoformat()} OR {created.name} IS NULL (as of the interval's end)"
    key = list(table.primary_key.columns)[0]
    return select(table).where(where).order_by(key), describe


def _chunks(engine: Engine, table: Table, stmt, chunk_rows: int, pseudonyms: Pseudonymiser) -> Iterator[pa.Table]:
    schema = arrow_schema(table)
    names = [c.name for c in table.columns]
    with engine.connect() as conn:
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


def _rows_digest(batch: pa.Table) -> bytes:
    """Per-row hashes, so the table digest does not depend on how the rows were chunked."""
    frame = batch.to_pandas(types_mapper=None)
    return pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes()


@dataclass
class _TableResult:
    rows: int
    sha256: str
    seconds: float


def _new_digest(schema: pa.Schema):
    return hashlib.sha256(str(schema).encode())


def _write_table(
    engine: Engine, table: Table, stmt, path: Path, chunk_rows: int, pseudonyms: Pseudonymiser
) -> _TableResult:
    began = time.perf_counter()
    schema = arrow_schema(table)
    digest = _new_digest(schema)
    rows = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for batch in _chunks(engine, table, stmt, chunk_rows, pseudonyms):
            writer.write_table(batch)
            digest.update(_rows_digest(batch))
            rows += batch.num_rows
    return _TableResult(rows=rows, sha256=digest.hexdigest(), seconds=time.perf_counter() - began)


def extract_snapshot(
    engine: Engine,
    start: str | datetime,
    end: str | datetime,
    out_dir: str | Path,
    pseudonyms: Pseudonymiser,
    chunk_rows: int = 50_000,
) -> dict[str, Any]:
    """Write the snapshot of [start, end) to ``out_dir`` and return its manifest.

    Every user id is written as its pseudonym under ``pseudonyms``' key (mtl_core.data.pseudonyms).
    """
    start_at, end_at = parse_instant(start, "start"), parse_instant(end, "end")
    if start_at >= end_at:
        raise ExtractionError(f"empty interval: start {start_at.isoformat()} is not before end {end_at.isoformat()}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    began = time.perf_counter()
    try:
        tables: dict[str, Any] = {}
        for name in wh.SOURCE_TABLES:
            table = wh.metadata.tables[name]
            stmt, describe = _interval_query(table, start_at, end_at)
            try:
                result = _write_table(engine, table, stmt, staging / f"{name}.parquet", chunk_rows, pseudonyms)
            except SQLAlchemyError as exc:
                raise ExtractionError(
                    f"reading table {name} from the warehouse at {engine.url.render_as_string(hide_password=True)} "
                    f"failed: {exc.__class__.__name__}: {str(exc).splitlines()[0]}. Nothing was written: the "
                    f"snapshot {out} is as it was. Is the schema there (mtl simulate or mtl import-logs create it), "
                    "the URL right and the server up? A retry extracts the whole interval again."
                ) from exc
            except OSError as exc:
                raise ExtractionError(
                    f"writing table {name} of the snapshot {out} failed: {exc.strerror or exc} (errno "
                    f"{exc.errno}). The partial files were removed and the snapshot {out} is as it was; free "
                    "space under data_dir (old snapshots and runs) and retry."
                ) from exc
            tables[name] = {
                "file": f"{name}.parquet",
                "rows": result.rows,
                "sha256": result.sha256,
                "filter": describe,
                "schema": {f.name: str(f.type) for f in arrow_schema(table)},
            }
        content = hashlib.sha256()
        for name in sorted(tables):
            content.update(f"{name}:{tables[name]['sha256']};".encode())
        manifest = {
            "format_version": FORMAT_VERSION,
            "interval": {"start": start_at.isoformat() + "Z", "end": end_at.isoformat() + "Z"},
            "source": engine.url.render_as_string(hide_password=True),
            "tables": tables,
            "content_hash": content.hexdigest(),
            # Which key made the pseudonyms (a fingerprint, not the key): snapshots under different keys
            # do not share users.
            "user_ids": {"pseudonymised": list(USER_ID_COLUMNS), "key_id": pseudonyms.key_id},
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


def verify_snapshot(snapshot_dir: str | Path) -> dict[str, Any]:
    """The manifest, once every table's file is shown to hold the rows it was extracted with.

    Each table's digest is recomputed from the Parquet file as extraction computed it from the warehouse
    (the schema, then a hash per row, in order), so a changed, missing or truncated file is found before
    anything validates or trains on it, and the registry never records a content hash the files contradict.
    """
    snapshot = Path(snapshot_dir)
    manifest = read_manifest(snapshot)
    for meta in manifest["tables"].values():
        path = snapshot / meta["file"]
        if not path.is_file():
            raise SnapshotIntegrityError(f"snapshot {snapshot}: {meta['file']} is missing; re-extract the interval")
        try:
            parquet = pq.ParquetFile(path)
            digest = _new_digest(parquet.schema_arrow)
            rows = 0
            # One row group per chunk extraction wrote, hashed as that chunk was: a chunk whose integer column
            # holds a null becomes floats in pandas, so the digest depends on where the chunks end.
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group)
                digest.update(_rows_digest(table))
                rows += table.num_rows
        except (OSError, pa.ArrowException) as exc:
            raise SnapshotIntegrityError(
                f"snapshot {snapshot}: {meta['file']} cannot be read ({exc.__class__.__name__}); re-extract the "
                "interval"
            ) from None
        if rows != meta["rows"] or digest.hexdigest() != meta["sha256"]:
            raise SnapshotIntegrityError(
                f"snapshot {snapshot}: {meta['file']} ({rows:,} rows) does not match the manifest ({meta['rows']:,} "
                f"rows, sha256 {meta['sha256'][:12]}...): the file was changed after extraction; re-extract the "
                "interval (mtl extract) rather than train on it"
            )
    return manifest


def read_manifest(snapshot_dir: str | Path) -> dict[str, Any]:
    path = Path(snapshot_dir) / MANIFEST
    if not path.is_file():
        raise ExtractionError(f"{snapshot_dir} is not a snapshot: {MANIFEST} is missing (make one with mtl extract)")
    return json.loads(path.read_text())


def describe_snapshot(snapshot_dir: str | Path) -> dict[str, Any]:
    """Row counts and the label rate of each task, read from a snapshot (the demo's and on-call's view)."""
    snapshot = Path(snapshot_dir)
    manifest = read_manifest(snapshot)
    behavior = pq.read_table(snapshot / "behavior_events.parquet", columns=["user_id", "event_type", "ts"]).to_pandas()
    ads = pq.read_table(snapshot / "ad_events.parquet", columns=["user_id", "event_type", "ts"]).to_pandas()
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
