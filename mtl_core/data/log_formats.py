"""The layouts of external behaviour logs the importer reads: the Taobao dump, or a YAML mapping file.

Taobao UserBehavior (``--format taobao``)
-----------------------------------------
The public Taobao dump is a CSV file without a header, one event per line, five columns::

    user_id,item_id,category_id,behavior_type,timestamp
    1,2268318,2520377,pv,1511544070

It maps onto the warehouse like this:

===================  ========================================================================
Taobao               warehouse
===================  ========================================================================
user_id              ``users.user_id`` and ``behavior_events.user_id``
item_id              ``items.item_id`` and ``behavior_events.item_id``
category_id          ``items.category``, kept as text ("4756105"): it is a label, not a number
behavior_type pv     ``click``: a pv is a view of the item's detail page, i.e. the user clicked
                     through to the item
behavior_type cart   ``add_to_cart``
behavior_type fav    ``favorite``
behavior_type buy    ``purchase``
timestamp            ``behavior_events.ts``: unix seconds, stored as a naive UTC datetime
===================  ========================================================================

The dump has no item titles, brands or prices and no user attributes: items get NULL title, brand and
price (the model has a learned "no text" embedding for missing titles) and users get NULL signup_ts,
region and age_band. Nor does it have impressions (items shown but not clicked) or say which click a
purchase follows (parent_event_id stays NULL), so on its own it gives no examples to tasks defined over
impressions and their click chains; it does give activity histories (history features, churn).

YAML mapping (``--format path/to/mapping.yaml``)
-------------------------------------------------
Any other log is described by a mapping file::

    format: csv            # csv, parquet or jsonl (default: from the log file's suffix: .csv, .parquet,
                           # .jsonl/.ndjson; with .gz after it the text is gunzipped)
    header: true           # csv only; default true
    delimiter: ","         # csv only; default ","
    encoding: utf-8        # csv only; default utf-8 (a byte-order mark is skipped)
    columns:               # source column -> warehouse column
      uid: user_id         # required: user_id, item_id, event_type, ts
      sku: item_id         # optional: category, title, brand, price
      action: event_type
      time: ts
      cat: category
    event_types:           # source value -> one of impression, click, add_to_cart, purchase, favorite
      view: impression
      order: purchase
    timestamp: {unit: s}   # unit s, ms or us (numbers since the epoch; the default), or
                           # {format: "%Y-%m-%d %H:%M:%S"} (strftime codes, or ISO8601); times are UTC

JSON Lines (``format: jsonl``) holds one JSON object per line. ``columns`` keys are field names, or dotted
paths into nested objects (``meta.uid``). When a line holds a list of events, as the OTTO sessions dump
does (``{"session": 12899779, "events": [{"aid": 59625, "ts": 1661724000278, "type": "clicks"}, ...]}``),
``events: events`` (a dotted path) names the list: each element is one event, and a column is looked up
in the event first, then in the line's object (so ``session: user_id`` takes the session of every event)::

    format: jsonl
    events: events
    columns: {session: user_id, aid: item_id, type: event_type, ts: ts}
    event_types: {clicks: click, carts: add_to_cart, orders: purchase}
    timestamp: {unit: ms}

A line that is not a JSON object, or whose ``events`` is not a list of objects, is a bad row of that line.

For a CSV file without a header the ``columns`` keys are 0-based column positions; rows must then have
as many fields as the first row (or at least enough for the highest mapped position). Event type values
are matched exactly after stripping surrounding blanks. Columns not mapped are ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mtl_core.data import warehouse as wh
from mtl_core.errors import MtlError

TAOBAO = "taobao"
REQUIRED_COLUMNS = ("user_id", "item_id", "event_type", "ts")
OPTIONAL_COLUMNS = ("category", "title", "brand", "price")
WAREHOUSE_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
TIME_UNITS = {"s": 1_000_000, "ms": 1_000, "us": 1}
MAPPING_KEYS = ("format", "header", "delimiter", "encoding", "columns", "event_types", "timestamp", "events")
FILE_FORMATS = ("csv", "parquet", "jsonl")


@dataclass(frozen=True)
class LogFormat:
    """A parsed source layout: the built-in Taobao one or a validated YAML mapping."""

    name: str  # 'taobao' or the mapping file's path, for messages
    file_format: str | None  # 'csv', 'parquet', 'jsonl' or None (decided by the log file's suffix)
    columns: dict[str | int, str]  # source column (name or 0-based position) -> warehouse column
    event_types: dict[str, str]  # source value -> warehouse event type
    header: bool = True
    delimiter: str = ","
    encoding: str = "utf-8-sig"
    ts_unit: str | None = "s"
    ts_format: str | None = None
    field_count: int | None = None  # fields per CSV row; None: as the header or the first row
    events_path: str | None = None  # jsonl: dotted path of a line's list of events; None: a line is one event


TAOBAO_FORMAT = LogFormat(
    name=TAOBAO,
    file_format="csv",
    columns={0: "user_id", 1: "item_id", 2: "category", 3: "event_type", 4: "ts"},
    event_types={"pv": "click", "cart": "add_to_cart", "fav": "favorite", "buy": "purchase"},
    header=False,
    ts_unit="s",
    field_count=5,
)


# --- the format: 'taobao' or a YAML mapping file ------------------------------------------------------
def load_format(fmt: str | Path) -> LogFormat:
    """``'taobao'`` or the path of a YAML mapping file -> a validated LogFormat (MtlError if it is neither)."""
    if str(fmt).strip().lower() == TAOBAO:
        return TAOBAO_FORMAT
    path = Path(fmt)
    if not path.is_file():
        raise MtlError(f"format {str(fmt)!r} is neither {TAOBAO!r} nor an existing YAML mapping file")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise MtlError(f"mapping file {path}: cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise MtlError(f"mapping file {path}: not valid YAML: {exc}") from None
    return _parse_mapping(spec, path)


def _parse_mapping(spec: Any, path: Path) -> LogFormat:
    def fail(message: str) -> MtlError:
        return MtlError(f"mapping file {path}: {message}")

    if not isinstance(spec, dict):
        raise fail("must be a YAML mapping with at least 'columns' and 'event_types'")
    unknown = [str(key) for key in spec if key not in MAPPING_KEYS]
    if unknown:
        raise fail(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(MAPPING_KEYS)}")

    file_format = spec.get("format")
    if file_format is not None and file_format not in FILE_FORMATS:
        raise fail(f"format {file_format!r} is not one of {', '.join(FILE_FORMATS)}")
    events_path = spec.get("events")
    if events_path is not None:
        if file_format != "jsonl":
            raise fail("'events' (the path of a line's list of events) needs 'format: jsonl'")
        if not isinstance(events_path, str) or not events_path.strip() or "" in events_path.split("."):
            raise fail(f"events {events_path!r} must be a field name or a dotted path such as 'session.events'")
    header = spec.get("header", True)
    if not isinstance(header, bool):
        raise fail(f"header {header!r} must be true or false")
    delimiter = spec.get("delimiter", ",")
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise fail(f'delimiter {delimiter!r} must be a single character (write a tab as "\\t")')
    encoding = spec.get("encoding", "utf-8-sig")
    if not isinstance(encoding, str):
        raise fail(f"encoding {encoding!r} must be a text encoding name such as utf-8")
    try:
        "".encode(encoding)
    except LookupError:
        raise fail(f"encoding {encoding!r} is not a known text encoding") from None
    if encoding.lower().replace("_", "-") in ("utf-8", "utf8"):
        encoding = "utf-8-sig"  # same decoding, but a byte-order mark does not stick to the first column

    columns = spec.get("columns")
    if not isinstance(columns, dict) or not columns:
        raise fail("'columns' must map source columns to warehouse columns, e.g. {uid: user_id, ...}")
    mapped: dict[str | int, str] = {}
    for source, target in columns.items():
        if target not in WAREHOUSE_COLUMNS:
            raise fail(
                f"columns: {source!r} maps to unknown warehouse column {target!r}; "
                f"allowed: {', '.join(WAREHOUSE_COLUMNS)}"
            )
        if target in mapped.values():
            raise fail(f"columns: warehouse column {target!r} is mapped from more than one source column")
        mapped[_source_key(source, header, file_format, fail)] = target
    missing = [name for name in REQUIRED_COLUMNS if name not in mapped.values()]
    if missing:
        raise fail(f"columns: required warehouse column(s) {', '.join(missing)} not mapped")

    event_types = spec.get("event_types")
    if not isinstance(event_types, dict) or not event_types:
        raise fail("'event_types' must map source values to warehouse event types, e.g. {view: impression}")
    values: dict[str, str] = {}
    for source, target in event_types.items():
        if isinstance(source, bool) or source is None:
            raise fail(f"event_types: a key was read by YAML as {source!r} (yes/no/on/off/null); quote it")
        if target not in wh.BEHAVIOR_EVENT_TYPES:
            raise fail(
                f"event_types: {source!r} maps to {target!r}, which is not a behaviour event type; "
                f"allowed: {', '.join(wh.BEHAVIOR_EVENT_TYPES)}"
            )
        values[str(source).strip()] = target

    timestamp = spec.get("timestamp", {"unit": "s"})
    if not isinstance(timestamp, dict) or len(timestamp) != 1 or not {"unit", "format"} >= set(timestamp):
        raise fail('timestamp must be {unit: s|ms|us} or {format: "%Y-%m-%d %H:%M:%S"}')
    ts_unit = timestamp.get("unit")
    ts_format = timestamp.get("format")
    if "unit" in timestamp and ts_unit not in TIME_UNITS:
        raise fail(f"timestamp: unknown unit {ts_unit!r}; allowed: {', '.join(TIME_UNITS)}")
    if "format" in timestamp and (not isinstance(ts_format, str) or not ts_format.strip()):
        raise fail(f'timestamp: format {ts_format!r} must be a strftime pattern such as "%Y-%m-%d %H:%M:%S"')

    return LogFormat(
        name=str(path),
        file_format=file_format,
        columns=mapped,
        event_types=values,
        header=header,
        delimiter=delimiter,
        encoding=encoding,
        ts_unit=ts_unit,
        ts_format=ts_format,
        events_path=events_path,
    )


def _source_key(source: Any, header: bool, file_format: str | None, fail: Callable[[str], MtlError]) -> str | int:
    """Header-less CSV columns are addressed by position, everything else by name."""
    if header or file_format in ("parquet", "jsonl"):
        if isinstance(source, bool) or source is None:
            raise fail(f"columns: a key was read by YAML as {source!r} (yes/no/on/off/null); quote it")
        return str(source)
    if isinstance(source, int) and not isinstance(source, bool) and source >= 0:
        return source
    if isinstance(source, str) and source.strip().isdigit():
        return int(source)
    raise fail(f"columns: {source!r} is not a 0-based column position (header: false, so columns have no names)")
