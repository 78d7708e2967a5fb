"""The online feature store: a model version's serving features in Redis, and their lookup per request.

Training computes every history feature at each example's own time from the snapshot's event tables; a
request carries only ``user_id`` with ``item_id`` or ``ad_id``. ``OnlineStore.publish`` therefore writes,
per model version, what the features need as of the interval's end: per user the counts (events, clicks,
purchases, ads...) and the anchors of the time-dependent features (last event, signup); per item its
attributes, counts and anchors (created, first seen) and its title's text vector; per ad its item's all that
and its copy's text vector. ``OnlineStore.lookup`` turns request rows into ``learn.examples.Examples`` with
the formulas training uses (``learn.examples``: ``user_count_columns``, ``time_columns``, ...), computing
the time-dependent features at the request's time, so that a scorer gives what the registered pyfunc gives
for the same rows.

Why no Feast: its Redis online store serves feature values as of materialisation, so the features that
change with the request's time (days since the user's last event, item age, hour of day) would be either
stale or a second copy of the formulas in Feast's on-demand transformations, and the text vectors (a
[words, dim] matrix per title) have no Feast value type. Its registry, offline store and materialisation
jobs would add a second metadata store beside MLflow for what is a few MSETs here.

Keys (``P`` = ``<serve.key_prefix>:<model name>:``): ``P v<version>:g<generation>:u:<pseudonym>`` (user),
``...:i:<item id>``, ``...:a:<ad id>``, ``...:ref:<task>`` (holdout scores), ``P v<version>:served:<task>``
(served scores), and the marker ``P published:<version>``, a JSON manifest written after every other key
of its generation. Readers use only the generation the marker names, so a version is served once complete
and a re-publish switches generations at once. Users are keyed by their HMAC pseudonym
(``data.pseudonyms``): raw warehouse ids never reach Redis.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtl_core.config import Settings, redact
from mtl_core.data.extract import ExtractionError, SnapshotIntegrityError, read_manifest, read_snapshot_table
from mtl_core.data.pseudonyms import pseudonymiser_for
from mtl_core.errors import MtlError
from mtl_core.learn.examples import (
    ITEM_AGE_DAYS,
    ITEM_COUNT_FEATURES,
    LAST_EVENT,
    USER_COUNT_FEATURES,
    USER_EVENT_COUNT,
    EventHistory,
    Examples,
    FeatureSpace,
    item_attribute_columns,
    item_count_columns,
    numeric_matrix,
    position_columns,
    time_columns,
    user_count_columns,
)

log = logging.getLogger(__name__)

ID_COLUMNS = ("item_id", "ad_id")  # a request row names an item (sample space "feed") or an ad ("ads")
# Keys per MSET / UNLINK while publishing or deleting: large enough to be few round trips, small enough
# not to block Redis for other clients.
WRITE_CHUNK = 2000
# A JSON record, then (for items and ads with a text) the text's vector as float32 bytes; JSON never holds
# a NUL byte (it escapes control characters), so the first one splits the two.
_SEP = b"\x00"


class ServingError(MtlError):
    """Serving cannot go on: the online store is unreachable, a version is not published, a request is bad."""


@dataclass
class Assembled:
    """Request rows as the model's input."""

    examples: Examples  # one row per request row, labels NaN
    texts: np.ndarray | None  # text matrix in learn.text.text_matrix's layout (row 0: no text); None without text
    cold_user: np.ndarray  # bool per row: the user has no published features (cold-start defaults used)
    cold_item: np.ndarray  # bool per row: the item / ad is unknown to the published features


def features_digest(space: FeatureSpace, settings: Settings) -> str:
    """What the published features depend on of a model: its feature space and its feature and text settings.

    A server holding another model than the one a version's features were published for is refused.
    """
    payload = {
        "space": space.to_json(),
        "features": settings.features.model_dump(mode="json"),
        "text": settings.text.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _glob(text: str) -> str:
    """``text`` as a literal inside a Redis SCAN pattern."""
    return "".join(f"\\{ch}" if ch in "*?[]\\" else ch for ch in text)


def _naive_utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo is not None else moment


_NAT = np.iinfo(np.int64).min  # numpy's NaT as int64


def _us(values: pd.Series | np.ndarray) -> list[int | None]:
    """datetime64 values as epoch microseconds (JSON-ready), None for NaT."""
    ints = np.asarray(values).astype("datetime64[us]").astype(np.int64)
    return [None if v == _NAT else v for v in ints.tolist()]


def _from_us(values: list[int | None]) -> np.ndarray:
    """The inverse of ``_us``: datetime64[us], NaT for None."""
    return np.array([_NAT if v is None else v for v in values], dtype=np.int64).view("datetime64[us]")


def _int_or_none(value: Any) -> int | None:
    return None if value is None or pd.isna(value) else int(value)


def _str_or_none(value: Any) -> str | None:
    return None if value is None or pd.isna(value) else str(value)


def _text_or_none(value: Any) -> str | None:
    """A title or ad copy as ``learn.examples`` uses it: missing or blank is no text."""
    if value is None or pd.isna(value) or str(value).strip() == "":
        return None
    return str(value)


# ---- request rows: checked, then split into ids, times, positions --------------------------------------
def _id_column(frame: pd.DataFrame, name: str, where: str, first_row: int) -> tuple[np.ndarray, np.ndarray]:
    """(int64 values, present) of an id column; a value that is no whole number is refused with its row."""
    series = frame[name]
    n = len(series)
    if pd.api.types.is_bool_dtype(series.dtype):
        raise ServingError(f"{where}: column {name!r} holds true/false values; it must hold whole numbers (ids)")
    if pd.api.types.is_integer_dtype(series.dtype):
        present = series.notna().to_numpy()
        return series.to_numpy(dtype=np.int64, na_value=0), present
    if pd.api.types.is_float_dtype(series.dtype):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        present = ~np.isnan(values)
        whole = np.zeros(n, dtype=bool)
        whole[present] = (values[present] == np.floor(values[present])) & (np.abs(values[present]) < 2.0**63)
        bad = np.flatnonzero(present & ~whole)
        if len(bad):
            row = int(bad[0])
            shown = float(values[row])
            raise ServingError(
                f"{where}: column {name!r} must hold whole numbers (ids); row {first_row + row} holds {shown!r}"
            )
        return np.where(present, values, 0).astype(np.int64), present
    values = np.zeros(n, dtype=np.int64)
    present = np.zeros(n, dtype=bool)
    for row, value in enumerate(series.to_numpy(dtype=object)):
        if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
            continue
        if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer | float | np.floating):
            shown = repr(value)[:40]
            raise ServingError(
                f"{where}: column {name!r} must hold whole numbers (ids); row {first_row + row} holds {shown} "
                f"({type(value).__name__})"
            )
        if isinstance(value, float | np.floating) and value != np.floor(value):
            raise ServingError(
                f"{where}: column {name!r} must hold whole numbers (ids); row {first_row + row} holds {value!r}"
            )
        values[row], present[row] = int(value), True
    return values, present


@dataclass
class RequestRows:
    """Checked request rows: raw user ids, the item or ad of each row, its time and feed position."""

    user: np.ndarray  # int64 raw warehouse ids
    item: np.ndarray  # int64, valid where is_feed
    ad: np.ndarray  # int64, valid where ~is_feed
    is_feed: np.ndarray  # bool: the row names an item (sample space "feed"), else an ad ("ads")
    time: np.ndarray  # datetime64[us]
    position: np.ndarray  # float64, NaN where none


def check_rows(
    rows: pd.DataFrame, where: str = "request", first_row: int = 0, now: datetime | None = None
) -> RequestRows:
    """Request rows checked: ``user_id`` in every row, exactly one of ``item_id`` / ``ad_id`` per row, whole
    numbers, an optional ``time`` (UTC; missing or empty: ``now``) and ``position`` (missing: none).

    Raises ``ServingError`` naming ``where``, the column and the first bad row (numbered from ``first_row``).
    """
    n = len(rows)
    if "user_id" not in rows.columns:
        raise ServingError(f"{where}: no user_id column (columns: {', '.join(map(str, rows.columns)) or 'none'})")
    id_columns = [name for name in ID_COLUMNS if name in rows.columns]
    if not id_columns:
        raise ServingError(f"{where}: neither an item_id nor an ad_id column; each row names one of them")
    user, has_user = _id_column(rows, "user_id", where, first_row)
    if not has_user.all():
        raise ServingError(f"{where}: column 'user_id' is empty in row {first_row + int(np.argmin(has_user))}")
    absent = (np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool))
    item, has_item = _id_column(rows, "item_id", where, first_row) if "item_id" in rows else absent
    ad, has_ad = _id_column(rows, "ad_id", where, first_row) if "ad_id" in rows else absent
    both = np.flatnonzero(has_item & has_ad)
    if len(both):
        raise ServingError(
            f"{where}: row {first_row + int(both[0])} names both an item_id and an ad_id; a row scores one of them"
        )
    neither = np.flatnonzero(~has_item & ~has_ad)
    if len(neither):
        raise ServingError(
            f"{where}: row {first_row + int(neither[0])} names neither an item_id nor an ad_id "
            f"(columns {' and '.join(repr(c) for c in id_columns)} are empty there)"
        )
    moment = np.datetime64(_naive_utc(now or datetime.now(UTC)), "us")
    times = np.full(n, moment, dtype="datetime64[us]")
    if "time" in rows.columns:
        column = rows["time"]
        if pd.api.types.is_numeric_dtype(column.dtype) and not pd.api.types.is_datetime64_any_dtype(column.dtype):
            raise ServingError(f"{where}: column 'time' holds numbers ({column.dtype}); it must hold UTC times")
        parsed = pd.to_datetime(column, errors="coerce", utc=True)
        bad = np.flatnonzero(column.notna().to_numpy() & parsed.isna().to_numpy())
        if len(bad):
            row = int(bad[0])
            shown = repr(column.iloc[row])[:40]
            raise ServingError(f"{where}: column 'time' must hold UTC times; row {first_row + row} holds {shown}")
        given = parsed.dt.tz_convert(None).to_numpy().astype("datetime64[us]")
        times = np.where(np.isnat(given), times, given)
    position = np.full(n, np.nan)
    if "position" in rows.columns:
        position = pd.to_numeric(rows["position"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.flatnonzero((rows["position"].notna().to_numpy() & np.isnan(position)) | (position < 0))
        if len(bad):
            row = int(bad[0])
            shown = repr(rows["position"].iloc[row])[:40]
            raise ServingError(
                f"{where}: column 'position' must hold feed slots (0, 1, ...); row {first_row + row} holds {shown}"
            )
    return RequestRows(user=user, item=item, ad=ad, is_feed=has_item, time=times, position=position)


# ---- what a version publishes -----------------------------------------------------------------------------
def _table(snapshot: Path, name: str) -> pd.DataFrame:
    try:
        frame = read_snapshot_table(snapshot, name).to_pandas()
    except (SnapshotIntegrityError, ExtractionError) as exc:
        raise ServingError(f"cannot publish from {snapshot}: {exc}") from None
    for column in frame.columns:
        if isinstance(frame[column].dtype, pd.DatetimeTZDtype):
            frame[column] = frame[column].dt.tz_convert(None).astype("datetime64[us]")
    return frame


@dataclass
class PublishedFeatures:
    """The records of one version: JSON-ready dicts per user pseudonym, item id and ad id, and the texts."""

    users: dict[int, dict[str, Any]]
    items: dict[int, dict[str, Any]]
    ads: dict[int, dict[str, Any]]
    texts: list[str]  # distinct titles and ad copies, in the order of their vectors


def published_features(snapshot_dir: str | Path, as_of: np.datetime64) -> PublishedFeatures:
    """Every user's, item's and ad's record as of ``as_of`` (datetime64[us]): counts of the events strictly
    before it, the anchors of the time-dependent features, the attributes and the text.

    Users are those of the snapshot's users table and events, items those of its items table and events,
    ads those of its ad events (with the item and copy of their newest event).
    """
    snapshot = Path(snapshot_dir)
    users = _table(snapshot, "users")
    items = _table(snapshot, "items")
    behavior = _table(snapshot, "behavior_events")
    ads = _table(snapshot, "ad_events")

    user_ids = pd.unique(
        np.concatenate(
            [users["user_id"].to_numpy(np.int64), behavior["user_id"].dropna().to_numpy(np.int64)]
            + [ads["user_id"].dropna().to_numpy(np.int64)]
        )
    )
    item_ids = pd.unique(
        np.concatenate(
            [items["item_id"].to_numpy(np.int64), behavior["item_id"].dropna().to_numpy(np.int64)]
            + [ads["item_id"].dropna().to_numpy(np.int64)]
        )
    )
    history = EventHistory(behavior, ads, user_ids, item_ids)
    user_side = history.user_columns(user_ids, np.full(len(user_ids), as_of))
    item_side = history.item_columns(item_ids, np.full(len(item_ids), as_of))

    info = users.drop_duplicates("user_id", keep="last").set_index("user_id").reindex(user_ids)
    user_counts = np.column_stack([user_side[name] for name in USER_COUNT_FEATURES]).tolist()
    user_records = {
        user: {
            "region": _str_or_none(region),
            "age_band": _str_or_none(age_band),
            "signup": signup,
            "last": last,
            "events": events,
            "counts": counts,
        }
        for user, region, age_band, signup, last, events, counts in zip(
            user_ids.tolist(),
            info["region"].tolist(),
            info["age_band"].tolist(),
            _us(info["signup_ts"]),
            user_side[LAST_EVENT].tolist(),
            user_side[USER_EVENT_COUNT].tolist(),
            user_counts,
            strict=True,
        )
    }

    attrs = items.drop_duplicates("item_id", keep="last").set_index("item_id").reindex(item_ids)
    item_counts = np.column_stack([item_side[name] for name in ITEM_COUNT_FEATURES]).tolist()
    item_records = {
        item: {
            "item": item,
            "category": _str_or_none(category),
            "brand": _str_or_none(brand),
            "price": None if pd.isna(price) else float(price),
            "created": created,
            "seen": seen,
            "counts": counts,
            "text": _text_or_none(title),
        }
        for item, category, brand, price, created, seen, counts, title in zip(
            item_ids.tolist(),
            attrs["category"].tolist(),
            attrs["brand"].tolist(),
            attrs["price"].tolist(),
            _us(attrs["created_ts"]),
            _us(pd.Series(item_ids).map(history.first_seen).to_numpy()),
            item_counts,
            attrs["title"].tolist(),
            strict=True,
        )
    }

    newest = ads.dropna(subset=["ad_id"]).sort_values("ts", kind="stable").drop_duplicates("ad_id", keep="last")
    ad_records = {}
    for ad, item, copy in zip(
        newest["ad_id"].astype(np.int64).tolist(),
        newest["item_id"].tolist(),
        newest["ad_text"].tolist(),
        strict=True,
    ):
        item = _int_or_none(item)
        base = item_records[item] if item is not None else _unknown_item(None)
        ad_records[ad] = {**base, "text": _text_or_none(copy)}

    texts = pd.unique(
        pd.Series([r["text"] for r in (*item_records.values(), *ad_records.values())], dtype=object).dropna()
    ).tolist()
    return PublishedFeatures(users=user_records, items=item_records, ads=ad_records, texts=texts)


def _unknown_item(item: int | None) -> dict[str, Any]:
    """What training gives an item without attributes or events (an ad without an item: item None)."""
    return {
        "item": item,
        "category": None,
        "brand": None,
        "price": None,
        "created": None,
        "seen": None,
        "counts": None,
        "text": None,
    }


_UNKNOWN_USER = {"region": None, "age_band": None, "signup": None, "last": -1, "events": 0.0, "counts": None}


def _trimmed(vector: np.ndarray) -> bytes:
    """A text's float32 vector as bytes; a word matrix without its trailing all-zero (padding) rows."""
    if vector.ndim == 2:
        used = np.flatnonzero(np.any(vector != 0, axis=1))
        vector = vector[: used[-1] + 1 if len(used) else 0]
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def _encode(record: dict[str, Any], vector: bytes | None = None) -> bytes:
    body = json.dumps(record, separators=(",", ":")).encode()
    return body if vector is None else body + _SEP + vector


def _decode(raw: bytes) -> tuple[dict[str, Any], bytes | None]:
    body, sep, vector = raw.partition(_SEP)
    return json.loads(body), (vector if sep else None)


# ---- the store ---------------------------------------------------------------------------------------------
class OnlineStore:
    """One model's published versions in Redis (``serve.redis_url``), under ``<serve.key_prefix>:<model>:``."""

    def __init__(self, settings: Settings, model_name: str | None = None):
        import redis

        self.settings = settings
        self.model_name = model_name or settings.pipeline.model_name
        self.prefix = f"{settings.serve.key_prefix}:{self.model_name}:"
        url = settings.serve.redis_url
        self._where = f"the online store at {redact(url)} (serve.redis_url)"
        if not url:
            raise ServingError(
                "serve.redis_url is empty: no online store is configured; set it (MTL_SERVE__REDIS_URL), "
                "e.g. redis://127.0.0.1:6379/0"
            )
        try:
            self._redis = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10)
            self._redis.ping()
        except (redis.RedisError, ValueError, OSError) as exc:
            raise ServingError(f"{self._where} is unreachable: {self._reason(exc)}; is Redis running there?") from None
        self._pseudonyms = pseudonymiser_for(settings)
        self._manifests: dict[int, tuple[bytes, dict[str, Any]]] = {}
        self._digests: dict[tuple[int, int], tuple[FeatureSpace, Settings, str]] = {}

    @staticmethod
    def _reason(exc: Exception) -> str:
        # Redis errors may quote the URL they were given; the password must not reach a log.
        first = str(exc).strip().splitlines()[0].rstrip(". ") if str(exc).strip() else ""
        return redact(f"{exc.__class__.__name__}: {first}")

    def _call(self, what: str, fn, *args, **kwargs):
        import redis

        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise ServingError(f"{what} failed at {self._where}: {self._reason(exc)}") from None

    # -- keys
    def _marker(self, version: int) -> str:
        return f"{self.prefix}published:{int(version)}"

    def _data(self, version: int, generation: str) -> str:
        return f"{self.prefix}v{int(version)}:g{generation}:"

    def _served(self, version: int, task: str) -> str:
        return f"{self.prefix}v{int(version)}:served:{task}"

    def _scan(self, pattern: str) -> Iterator[bytes]:
        import redis

        try:
            yield from self._redis.scan_iter(match=pattern, count=1000)
        except redis.RedisError as exc:
            raise ServingError(f"listing keys failed at {self._where}: {self._reason(exc)}") from None

    def _unlink_matching(self, pattern: str, keep: str | None = None) -> int:
        """UNLINK every key matching ``pattern`` (a SCAN pattern), except those starting with ``keep``."""
        removed, batch = 0, []
        kept = keep.encode() if keep else None
        for key in self._scan(pattern):
            if kept is not None and key.startswith(kept):
                continue
            batch.append(key)
            if len(batch) >= WRITE_CHUNK:
                removed += self._call("deleting keys", self._redis.unlink, *batch)
                batch = []
        if batch:
            removed += self._call("deleting keys", self._redis.unlink, *batch)
        return removed

    # -- reading the markers
    def is_published(self, version: int) -> bool:
        return bool(self._call(f"reading v{version}'s marker", self._redis.exists, self._marker(version)))

    def manifest(self, version: int) -> dict[str, Any] | None:
        raw = self._call(f"reading v{version}'s marker", self._redis.get, self._marker(version))
        return None if raw is None else json.loads(raw)

    def published_versions(self) -> list[int]:
        marker = self._marker(0)[:-1]
        versions = []
        for key in self._scan(_glob(marker) + "*"):
            tail = key.decode()[len(marker) :]
            if tail.isdigit():
                versions.append(int(tail))
        return sorted(versions)

    def _not_published(self, version: int) -> ServingError:
        return ServingError(
            f"model {self.model_name!r} v{version} is not published in {self._where}: run "
            f"`mtl publish --version {version} --snapshot <its training snapshot>` (the DAG's publish_features "
            "task does it after promotion)"
        )

    # -- publishing
    def publish(
        self,
        version: int,
        model_dir: str | Path,
        snapshot_dir: str | Path,
        as_of: datetime | None = None,
        reference_scores: dict[str, np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """Write ``version``'s serving features as of ``as_of`` (default: the snapshot's interval end).

        The marker (the returned manifest) is written last; readers see the version only then. A re-publish
        writes a new generation beside the served one, switches the marker to it, then deletes the old one,
        so a served version never disappears. Afterwards, published versions beyond the newest
        ``serve.keep_versions`` are deleted, never ``version`` itself.
        """
        import redis

        from mtl_core.learn.checkpoint import load_model
        from mtl_core.learn.text import text_matrix

        started = time.perf_counter()
        version = int(version)
        snapshot = Path(snapshot_dir)
        try:
            snapshot_manifest = read_manifest(snapshot)
        except ExtractionError as exc:
            raise ServingError(f"cannot publish v{version}: {exc}") from None
        moment = (
            np.datetime64(_naive_utc(as_of), "us")
            if as_of is not None
            else np.datetime64(snapshot_manifest["interval"]["end"].rstrip("Z"), "us")
        )
        loaded = load_model(model_dir, cache_dir=self.settings.resolved_text_cache_dir)
        features = published_features(snapshot, moment)
        vectors: dict[str, bytes] = {}
        shape: list[int] = []
        if loaded.text_in and features.texts:
            matrix = text_matrix(
                features.texts, loaded.settings, loaded.cache_dir, progress=False, encoder=loaded.model.text_encoder
            )
            shape = list(matrix.shape[1:])
            vectors = {text: _trimmed(matrix[i + 1]) for i, text in enumerate(features.texts)}
        elif loaded.text_in:
            dim = loaded.text_in
            shape = [loaded.settings.text.max_words, dim] if _word_layout(loaded) else [dim]

        # Two publishes of one version at once would delete each other's keys as partial ones.
        lock = self._redis.lock(f"{self.prefix}publishing:{version}", timeout=600, blocking_timeout=600)
        if not self._call(f"locking v{version} for publishing", lock.acquire):
            raise ServingError(
                f"another publish of {self.model_name!r} v{version} has held its lock for 10 minutes; "
                "wait for it or delete the key " + f"{self.prefix}publishing:{version}"
            )
        try:
            manifest = self._write(
                version,
                loaded,
                features,
                vectors,
                shape,
                reference_scores,
                snapshot,
                snapshot_manifest,
                moment,
                started,
            )
            self._retain(version)
        finally:
            try:
                lock.release()
            except redis.RedisError as exc:  # never hide the publish's own error behind the lock's
                log.warning("the publishing lock of v%s was not released: %s", version, self._reason(exc))
        log.info(
            "published %s v%s: %d users, %d items, %d ads, %d texts in %.2f s",
            self.model_name,
            version,
            len(features.users),
            len(features.items),
            len(features.ads),
            len(features.texts),
            manifest["seconds"],
        )
        return manifest

    def _write(
        self,
        version: int,
        loaded,
        features: PublishedFeatures,
        vectors: dict[str, bytes],
        shape: list[int],
        reference_scores: dict[str, np.ndarray] | None,
        snapshot: Path,
        snapshot_manifest: dict[str, Any],
        moment: np.datetime64,
        started: float,
    ) -> dict[str, Any]:
        previous = self.manifest(version)
        served_generation = previous["generation"] if previous else None
        # Partial keys of an attempt that died before its marker: every generation but the served one.
        keep = self._data(version, served_generation) if served_generation else None
        self._unlink_matching(_glob(f"{self.prefix}v{version}:g") + "*", keep=keep)

        generation = uuid.uuid4().hex[:12]
        base = self._data(version, generation)
        pending: dict[str, bytes] = {}

        def put(key: str, value: bytes) -> None:
            pending[key] = value
            if len(pending) >= WRITE_CHUNK:
                flush()

        def flush() -> None:
            if pending:
                self._call(f"writing v{version}'s features", self._redis.mset, pending)
                pending.clear()

        for user, record in features.users.items():
            put(f"{base}u:{user}", _encode(record))
        for item, record in features.items.items():
            put(f"{base}i:{item}", _encode(record, vectors.get(record["text"])))
        for ad, record in features.ads.items():
            put(f"{base}a:{ad}", _encode(record, vectors.get(record["text"])))
        reference = {}
        for task, scores in (reference_scores or {}).items():
            sample = _sample(np.asarray(scores, dtype=np.float64), self.settings.serve.served_sample)
            put(f"{base}ref:{task}", sample.tobytes())
            reference[task] = len(sample)
        flush()

        manifest = {
            "model": self.model_name,
            "version": version,
            "generation": generation,
            "as_of": str(moment) + "Z",
            "snapshot": str(snapshot.resolve()),
            "snapshot_hash": snapshot_manifest.get("content_hash"),
            "snapshot_interval": snapshot_manifest.get("interval"),
            "counts": {
                "users": len(features.users),
                "items": len(features.items),
                "ads": len(features.ads),
                "texts": len(features.texts),
            },
            "text_shape": shape,
            "task_names": list(loaded.task_names),
            "reference_scores": reference,
            "features_digest": features_digest(loaded.space, loaded.settings),
            "published_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - started, 3),
        }
        self._call(f"writing v{version}'s marker", self._redis.set, self._marker(version), json.dumps(manifest))
        if served_generation:
            self._unlink_matching(_glob(self._data(version, served_generation)) + "*")
        return manifest

    def _retain(self, just_published: int) -> list[int]:
        """Delete the published versions beyond the newest ``serve.keep_versions`` (never ``just_published``)."""
        versions = self.published_versions()
        keep = set(sorted(versions)[-self.settings.serve.keep_versions :]) | {just_published}
        dropped = [v for v in versions if v not in keep]
        for version in dropped:
            # The marker first: from then on no reader uses the version's keys, whatever is left of them.
            self._call(f"deleting v{version}'s marker", self._redis.unlink, self._marker(version))
            self._unlink_matching(_glob(f"{self.prefix}v{version}:") + "*")
            self._manifests.pop(version, None)
        if dropped:
            log.info("online store: deleted the features of %s", ", ".join(f"v{v}" for v in dropped))
        return dropped

    # -- lookup
    def _check_model(self, manifest: dict[str, Any], space: FeatureSpace, settings: Settings) -> None:
        key = (id(space), id(settings))
        cached = self._digests.get(key)
        if cached is None or cached[0] is not space or cached[1] is not settings:
            cached = (space, settings, features_digest(space, settings))
            self._digests = {key: cached}  # one model at a time; a switch replaces it
        if cached[2] != manifest["features_digest"]:
            version = manifest["version"]
            raise ServingError(
                f"model {self.model_name!r} v{version}'s features were published for another model directory "
                f"(features digest {manifest['features_digest']}, this model's {cached[2]}); re-publish them: "
                f"mtl publish --version {version} --snapshot <its training snapshot>"
            )

    def _fetch(self, version: int, keys: list[str]) -> tuple[dict[str, Any], list[bytes | None]]:
        """The manifest and the values of ``keys`` (relative to the version's data prefix), in one MGET.

        The marker is read in the same MGET, so the values belong to the generation it names; only when a
        re-publish switched generations since the last call is a second MGET needed.
        """
        marker = self._marker(version)
        cached = self._manifests.get(version)
        if cached is None:
            raw = self._call(f"reading v{version}'s marker", self._redis.get, marker)
            if raw is None:
                raise self._not_published(version)
            cached = (raw, json.loads(raw))
            self._manifests[version] = cached
        for _ in range(3):
            base = self._data(version, cached[1]["generation"])
            values = self._call(f"reading v{version}'s features", self._redis.mget, [marker] + [base + k for k in keys])
            raw = values[0]
            if raw is None:
                self._manifests.pop(version, None)
                raise self._not_published(version)
            if raw == cached[0]:
                return cached[1], values[1:]
            fresh = (raw, json.loads(raw))
            self._manifests[version] = fresh
            if fresh[1]["generation"] == cached[1]["generation"]:
                return fresh[1], values[1:]
            cached = fresh
        raise ServingError(f"v{version} was re-published three times during one lookup; retry")

    def lookup(
        self,
        version: int,
        rows: pd.DataFrame,
        space: FeatureSpace,
        settings: Settings,
        now: datetime | None = None,
    ) -> Assembled:
        """Request rows (``user_id`` with ``item_id`` or ``ad_id``, optional ``time`` and ``position``) as
        examples of ``version``'s model, whose ``space`` and ``settings`` (``load_model(dir)``'s) are given.

        Counts are as of publishing; the time-dependent features are computed at each row's ``time`` (missing:
        ``now``). An unknown user, item or ad gets what training gives an entity without history, and is
        flagged. ``position`` applies to feed rows; training never saw one on an ad row, so ad rows get none.
        One round trip to Redis.
        """
        checked = check_rows(rows, "request", now=now)
        n = len(checked.user)
        pseudonyms = self._pseudonyms.array(checked.user) if n else np.zeros(0, dtype=np.int64)
        users, user_of = np.unique(pseudonyms, return_inverse=True)
        feed = checked.is_feed
        items, item_of = np.unique(checked.item[feed], return_inverse=True)
        ads, ad_of = np.unique(checked.ad[~feed], return_inverse=True)
        keys = (
            [f"u:{u}" for u in users.tolist()] + [f"i:{i}" for i in items.tolist()] + [f"a:{a}" for a in ads.tolist()]
        )
        manifest, values = self._fetch(version, keys)
        self._check_model(manifest, space, settings)

        user_values = values[: len(users)]
        item_values = values[len(users) : len(users) + len(items)]
        ad_values = values[len(users) + len(items) :]
        user_found = np.array([v is not None for v in user_values], dtype=bool)
        user_records = [_UNKNOWN_USER if v is None else _decode(v)[0] for v in user_values]
        entity_found = np.array([v is not None for v in (*item_values, *ad_values)], dtype=bool)
        entity_records, entity_vectors = [], []
        for value, item in zip(item_values, items.tolist(), strict=True):
            record, vector = (_unknown_item(item), None) if value is None else _decode(value)
            entity_records.append(record)
            entity_vectors.append(vector)
        for value in ad_values:
            record, vector = (_unknown_item(None), None) if value is None else _decode(value)
            entity_records.append(record)
            entity_vectors.append(vector)
        # Per row: its user's record, and its item's (feed) or ad's record (ads).
        entity_of = np.empty(n, dtype=np.int64)
        entity_of[feed] = item_of
        entity_of[~feed] = len(items) + ad_of
        return self._assemble(
            checked, pseudonyms, manifest, settings, user_records, user_of, user_found,
            entity_records, entity_vectors, entity_of, entity_found,
        )  # fmt: skip

    def _assemble(
        self,
        checked: RequestRows,
        pseudonyms: np.ndarray,
        manifest: dict[str, Any],
        settings: Settings,
        user_records: list[dict[str, Any]],
        user_of: np.ndarray,
        user_found: np.ndarray,
        entity_records: list[dict[str, Any]],
        entity_vectors: list[bytes | None],
        entity_of: np.ndarray,
        entity_found: np.ndarray,
    ) -> Assembled:
        n = len(checked.user)
        ts = checked.time
        zero = np.zeros(1)
        user_default = user_count_columns(zero, zero, zero, zero, zero, zero, zero, zero)
        item_default = item_count_columns(zero, zero, zero)
        user_counts = np.array(
            [r["counts"] or [float(user_default[f][0]) for f in USER_COUNT_FEATURES] for r in user_records],
            dtype=np.float64,
        ).reshape(len(user_records), len(USER_COUNT_FEATURES))[user_of]
        item_counts = np.array(
            [r["counts"] or [float(item_default[f][0]) for f in ITEM_COUNT_FEATURES] for r in entity_records],
            dtype=np.float64,
        ).reshape(len(entity_records), len(ITEM_COUNT_FEATURES))[entity_of]

        def per_user(field: str) -> list[Any]:
            values = [r[field] for r in user_records]
            return [values[i] for i in user_of]

        def per_entity(field: str) -> list[Any]:
            values = [r[field] for r in entity_records]
            return [values[i] for i in entity_of]

        item_ids = per_entity("item")
        has_item = np.array([i is not None for i in item_ids], dtype=bool)
        price = np.array([np.nan if p is None else p for p in per_entity("price")], dtype=np.float64)
        position = np.where(checked.is_feed, checked.position, np.nan)
        timed = time_columns(
            ts,
            last_event=np.array(per_user("last"), dtype=np.int64),
            signup=_from_us(per_user("signup")),
            created=_from_us(per_entity("created")),
            first_seen=_from_us(per_entity("seen")),
        )
        columns = {
            **item_attribute_columns(price, has_item),
            **position_columns(position),
            **dict(zip(USER_COUNT_FEATURES, user_counts.T, strict=True)),
            **dict(zip(ITEM_COUNT_FEATURES, item_counts.T, strict=True)),
            **timed,
        }
        user_known = user_found[user_of]

        def attribute(values: list[Any], known: np.ndarray) -> np.ndarray:
            # build_examples' joins leave NaN for an id the dimension table does not hold.
            return np.array([v if k else np.nan for v, k in zip(values, known, strict=True)], dtype=object)

        entity_known = entity_found[entity_of]
        item_known = entity_known & has_item
        raw = {
            "user": np.array(pseudonyms.tolist(), dtype=object),
            "item": np.array(item_ids, dtype=object),
            "category": attribute(per_entity("category"), item_known),
            "brand": attribute(per_entity("brand"), item_known),
            "region": attribute(per_user("region"), user_known),
            "age_band": attribute(per_user("age_band"), user_known),
            "ad": np.array(
                [None if f else a for a, f in zip(checked.ad.tolist(), checked.is_feed, strict=True)], dtype=object
            ),
            "space": np.where(checked.is_feed, "feed", "ads").astype(object),
        }
        # Texts as frame_examples numbers them (first appearance), so the model sees the same text rows.
        text = pd.Series(per_entity("text"), dtype=object)
        codes, uniques = pd.factorize(text, use_na_sentinel=True)
        texts = [str(u) for u in uniques]
        vector_of = {}
        for record, vector in zip(entity_records, entity_vectors, strict=True):
            if record["text"] is not None and vector is not None:
                vector_of[record["text"]] = vector
        matrix = _text_rows(texts, vector_of, manifest["text_shape"]) if manifest["text_shape"] else None
        task_names = [task.name for task in settings.tasks]
        events = np.array(per_user("events"), dtype=np.float64)
        examples = Examples(
            raw=raw,
            numeric=numeric_matrix(columns),
            text_index=(codes + 1).astype(np.int64),
            texts=texts,
            labels=np.full((n, len(task_names)), np.nan, dtype=np.float32),
            task_names=task_names,
            split=np.full(n, "holdout", dtype=object),
            time=ts,
            event_id=np.zeros(n, dtype=np.int64),
            click_event_id=np.zeros(n, dtype=np.int64),
            new_user=events == 0,
            cold_item=has_item & (timed[ITEM_AGE_DAYS] < settings.features.cold_start_days),
            interval=(np.datetime64("NaT"), np.datetime64("NaT")),
        )
        return Assembled(examples=examples, texts=matrix, cold_user=~user_known, cold_item=~entity_known)

    # -- scores for the monitor
    def record_served(
        self, version: int, task_names: list[str], probs: np.ndarray, rows_of: dict[str, np.ndarray] | None = None
    ) -> None:
        """Keep the newest ``serve.served_sample`` served scores per task (LPUSH + LTRIM, one round trip).

        ``rows_of``: per task, which rows count (a boolean mask): the monitor compares a task's served scores
        with its holdout's, which hold only rows of the task's own sample space (ad_ctr's are ad impressions),
        so a feed row's ad_ctr score is no evidence of a shift. Without it, every row counts for every task.
        """
        probs = np.asarray(probs, dtype=np.float32).reshape(-1, len(task_names))
        if not len(probs):
            return
        pipe = self._redis.pipeline(transaction=False)
        for t, task in enumerate(task_names):
            values = probs[:, t] if rows_of is None else probs[rows_of[task], t]
            if not len(values):
                continue
            key = self._served(version, task)
            pipe.lpush(key, *[value.tobytes() for value in values])
            pipe.ltrim(key, 0, self.settings.serve.served_sample - 1)
        self._call(f"recording v{version}'s served scores", pipe.execute)

    def served_scores(self, version: int) -> dict[str, np.ndarray]:
        """The served scores kept per task, newest first (float32)."""
        prefix = self._served(version, "")
        keys = sorted(self._scan(_glob(prefix) + "*"))
        if not keys:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.lrange(key, 0, -1)
        lists = self._call(f"reading v{version}'s served scores", pipe.execute)
        return {
            key.decode()[len(prefix) :]: np.frombuffer(b"".join(values), dtype=np.float32)
            for key, values in zip(keys, lists, strict=True)
        }

    def reference_scores(self, version: int) -> dict[str, np.ndarray]:
        """The holdout scores per task published with ``version`` (a sample of at most ``serve.served_sample``)."""
        manifest = self.manifest(version)
        if manifest is None:
            raise self._not_published(version)
        tasks = list(manifest.get("reference_scores", {}))
        if not tasks:
            return {}
        base = self._data(version, manifest["generation"])
        values = self._call(
            f"reading v{version}'s reference scores", self._redis.mget, [f"{base}ref:{t}" for t in tasks]
        )
        return {
            t: np.frombuffer(v, dtype=np.float64).copy() for t, v in zip(tasks, values, strict=True) if v is not None
        }


def _word_layout(loaded) -> bool:
    from mtl_core.learn.text import uses_word_vectors

    return uses_word_vectors(loaded.settings)


def _sample(scores: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` of ``scores``, drawn without replacement with a fixed seed (the same every publish)."""
    scores = scores[~np.isnan(scores)]
    if len(scores) <= limit:
        return scores
    return np.sort(np.random.default_rng(0).choice(scores, size=limit, replace=False))


def _text_rows(texts: list[str], vector_of: dict[str, bytes], shape: list[int]) -> np.ndarray:
    """text_matrix's layout for ``texts``: row 0 zeros, row i the stored vector of texts[i - 1]."""
    out = np.zeros((len(texts) + 1, *shape), dtype=np.float32)
    for row, text in enumerate(texts, start=1):
        vector = np.frombuffer(vector_of[text], dtype=np.float32)
        if len(shape) == 2:
            words = len(vector) // shape[1]
            out[row, :words] = vector.reshape(words, shape[1])
        else:
            out[row] = vector
    return out


# ---- versions from the registry ---------------------------------------------------------------------------
def resolve_model(
    settings: Settings, dest: str | Path, alias: str = "champion", version: int | None = None
) -> tuple[int, Path]:
    """The version ``alias`` names in MLflow (or ``version`` itself) and its model directory, downloaded into
    ``dest``. Raises ``ServingError`` when no version holds the alias."""
    from mtl_core.registry.aliases import current_alias
    from mtl_core.registry.pyfunc import download_model_dir
    from mtl_core.registry.store import configure, mlflow_errors

    uri = settings.resolved_mlflow_tracking_uri
    client = configure(uri)
    name = settings.pipeline.model_name
    if version is None:
        with mlflow_errors(f"reading the alias {alias!r} of {name}"):
            version = current_alias(client, name, alias)
        if version is None:
            raise ServingError(
                f"no version of model {name!r} holds the alias {alias!r} in the MLflow store at {redact(uri)}: "
                "promote one first (the DAG, or mtl promote --version N --by <you> --why <reason>)"
            )
    return int(version), download_model_dir(client, name, int(version), dest)


def publish_registered(
    settings: Settings,
    snapshot_dir: str | Path,
    version: int | None = None,
    alias: str = "champion",
    as_of: datetime | None = None,
) -> dict[str, Any]:
    """`mtl publish`: a registered version's features (``version``, else the one ``alias`` names) from a
    snapshot, with the model's scores on the snapshot's holdout as the score monitor's reference."""
    import tempfile

    from mtl_core.judge.evaluate import holdout_predictions

    with tempfile.TemporaryDirectory(prefix="mtl-publish-") as tmp:
        version, model_dir = resolve_model(settings, tmp, alias, version)
        _, reference = holdout_predictions(model_dir, snapshot_dir)
        return OnlineStore(settings).publish(version, model_dir, snapshot_dir, as_of=as_of, reference_scores=reference)
