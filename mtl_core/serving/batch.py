"""Batch scoring: a Parquet file of candidate pairs scored by an alias's model, chunk by chunk.

`mtl score --alias champion --candidates FILE.parquet --out FILE.parquet` reads ``serve.score_chunk_rows`` rows
at a time, looks them up in the online store (the version's published features, as the server does), scores
them and appends them to the output, so memory holds one chunk whatever the file's size. The output is
written beside ``out`` and renamed into place once complete.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtl_core.config import Settings
from mtl_core.serving.online import OnlineStore, ServingError, check_rows, resolve_model

log = logging.getLogger(__name__)

FLAG_COLUMNS = ("cold_user", "cold_item")
VERSION_COLUMN = "model_version"
# Arrow integers with nulls become pandas' nullable Int64, not floats (ids above 2**53 stay exact).
_NULLABLE_INTS = {
    pa.int8(): "Int8",
    pa.int16(): "Int16",
    pa.int32(): "Int32",
    pa.int64(): "Int64",
    pa.uint8(): "UInt8",
    pa.uint16(): "UInt16",
    pa.uint32(): "UInt32",
    pa.uint64(): "UInt64",
}


def _pandas_type(arrow_type: pa.DataType):
    import pandas as pd

    name = _NULLABLE_INTS.get(arrow_type)
    return pd.api.types.pandas_dtype(name) if name else None


def _open(candidates: Path) -> pq.ParquetFile:
    if not candidates.is_file():
        raise ServingError(f"candidates file {candidates} does not exist")
    try:
        return pq.ParquetFile(candidates)
    except (pa.ArrowInvalid, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ServingError(f"candidates file {candidates} is not a Parquet file ({reason[:200]})") from None


def _check_columns(schema: pa.Schema, candidates: Path) -> None:
    names = schema.names
    if "user_id" not in names:
        raise ServingError(f"candidates file {candidates}: no user_id column (columns: {', '.join(names) or 'none'})")
    if "item_id" not in names and "ad_id" not in names:
        raise ServingError(
            f"candidates file {candidates}: neither an item_id nor an ad_id column; each row names one of them"
        )
    for name in ("user_id", "item_id", "ad_id"):
        kind = schema.field(name).type if name in names else pa.null()
        # Floats are let through: pandas stores an id column with gaps as floats (check_rows refuses 1.5).
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)):
            raise ServingError(f"candidates file {candidates}: column {name!r} holds {kind}, not whole numbers (ids)")


def _check_names(schema: pa.Schema, candidates: Path, task_names: list[str]) -> None:
    clash = [name for name in (*task_names, *FLAG_COLUMNS, VERSION_COLUMN) if name in schema.names]
    if clash:
        raise ServingError(
            f"candidates file {candidates}: column(s) {', '.join(clash)} would be overwritten by the scores; "
            "rename them"
        )


def _variants(settings: Settings, version: int, dest: Path) -> Path | None:
    """The int8 / ONNX forms registered with ``version`` (None for a version registered before them)."""
    from mtl_core.registry.store import configure
    from mtl_core.registry.variants import download_variants

    client = configure(settings.resolved_mlflow_tracking_uri)
    return download_variants(client, settings.pipeline.model_name, version, dest)


def score_file(
    settings: Settings,
    candidates: str | Path,
    out: str | Path,
    alias: str = "champion",
    variant: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every row of ``candidates`` (``user_id`` with ``item_id`` or ``ad_id``; optional ``time``,
    ``position``) with the model ``alias`` names, in the form ``variant`` (fp32, int8, onnx or fastest; default
    ``serve.variant``, the form the servers use), into ``out``: the candidate columns, one probability column
    per task, ``cold_user``, ``cold_item`` and ``model_version``.

    Rows without a time are scored as of the start of the call, all of them at the same moment.
    """
    from tqdm.auto import tqdm

    from mtl_core.learn.variants import CHOICES, load_scorer

    started = time.perf_counter()
    variant = variant or settings.serve.variant
    if variant not in CHOICES:
        raise ServingError(f"unknown model variant {variant!r}: expected one of {', '.join(CHOICES)}")
    candidates, out = Path(candidates), Path(out)
    source = _open(candidates)
    schema = source.schema_arrow
    _check_columns(schema, candidates)
    now = datetime.now(UTC).replace(tzinfo=None)
    with tempfile.TemporaryDirectory(prefix="mtl-score-") as tmp:
        version, model_dir = resolve_model(settings, tmp, alias)
        variants_dir = None if variant == "fp32" else _variants(settings, version, Path(tmp) / "variants")
        scorer = load_scorer(model_dir, variant, variants_dir, max_auc_loss=settings.serve.variant_max_auc_loss)
        tasks = list(scorer.task_names)
        _check_names(schema, candidates, tasks)
        store = OnlineStore(settings)
        if not store.is_published(version):
            raise ServingError(
                f"model {store.model_name!r} v{version} (alias {alias!r}) has no published features in the online "
                f"store: run `mtl publish --version {version} --snapshot <its training snapshot>` first"
            )
        output = pa.schema(
            [*schema, *(pa.field(t, pa.float32()) for t in tasks)]
            + [pa.field(f, pa.bool_()) for f in FLAG_COLUMNS]
            + [pa.field(VERSION_COLUMN, pa.int64())],
            metadata=schema.metadata,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        rows = 0
        try:
            with (
                pq.ParquetWriter(staging, output) as writer,
                tqdm(
                    total=source.metadata.num_rows,
                    unit="rows",
                    desc=f"scoring {candidates.name}",
                    file=sys.stderr,
                    disable=not progress,
                ) as bar,
            ):
                for batch in source.iter_batches(batch_size=settings.serve.score_chunk_rows):
                    frame = batch.to_pandas(types_mapper=_pandas_type)
                    check_rows(frame, f"candidates file {candidates}", first_row=rows, now=now)
                    assembled = store.lookup(version, frame, scorer.space, scorer.settings, now=now)
                    probs = np.asarray(scorer.score(assembled.examples, assembled.texts), dtype=np.float32)
                    columns = [
                        *batch.columns,
                        *(pa.array(probs[:, t]) for t in range(len(tasks))),
                        pa.array(assembled.cold_user),
                        pa.array(assembled.cold_item),
                        pa.array(np.full(len(frame), version, dtype=np.int64)),
                    ]
                    writer.write_table(pa.Table.from_arrays(columns, schema=output))
                    rows += len(frame)
                    bar.update(len(frame))
            os.replace(staging, out)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
    seconds = round(time.perf_counter() - started, 2)
    log.info("scored %d rows of %s with %s v%s in %.1f s", rows, candidates, store.model_name, version, seconds)
    return {"rows": rows, "version": version, "out": str(out), "seconds": seconds}
