"""Importing external behaviour logs: Taobao layout, YAML mappings, bad rows, idempotence, the CLI."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from mtl_core.cli import app, main
from mtl_core.data import warehouse as wh
from mtl_core.data.import_logs import (
    IMPORTED_ID_MIN,
    ImportReport,
    content_hashes,
    import_logs,
    imported_event_ids,
)
from mtl_core.errors import MtlError

T0 = 1511544070  # 2017-11-24 17:21:10 UTC

GOOD_TAOBAO = [
    f"1,2268318,2520377,pv,{T0}",
    f"1,2333346,2520771,cart,{T0 + 1}",
    f"1,2576651,149192,fav,{T0 + 2}",
    f"100,2268318,2520377,buy,{T0 + 3}",
    f"100,4756105,4756105,pv,{T0 + 4}",
]


def write_lines(path: Path, lines: list[str], end: str = "\n") -> Path:
    path.write_text(end.join(lines) + end)
    return path


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            name: conn.execute(select(func.count()).select_from(wh.metadata.tables[name])).scalar_one()
            for name in ("users", "items", "behavior_events")
        }


def events(engine: Engine) -> pd.DataFrame:
    with engine.connect() as conn:
        rows = conn.execute(select(wh.behavior_events).order_by(wh.behavior_events.c.ts)).mappings().all()
    return pd.DataFrame([dict(row) for row in rows])


@pytest.fixture
def sqlite_engine(sqlite_url):
    engine = wh.make_engine(sqlite_url)
    yield engine
    engine.dispose()


@pytest.fixture
def any_engine(any_url):
    engine = wh.make_engine(any_url)
    yield engine
    engine.dispose()


# --- Taobao ------------------------------------------------------------------------------------------------
def test_taobao_file_loads_with_the_documented_mapping(any_engine, tmp_path):
    log = write_lines(tmp_path / "UserBehavior.csv", GOOD_TAOBAO)
    report = import_logs(log, "taobao", any_engine)

    assert report == ImportReport(rows_read=5, rows_loaded=5, bad_rows=0, first_bad=[], aborted=False)
    assert report.as_dict() == {"rows_read": 5, "rows_loaded": 5, "bad_rows": 0, "first_bad": [], "aborted": False}
    assert counts(any_engine) == {"users": 2, "items": 4, "behavior_events": 5}
    got = events(any_engine)
    assert got["event_type"].tolist() == ["click", "add_to_cart", "favorite", "purchase", "click"]
    assert got["user_id"].tolist() == [1, 1, 1, 100, 100]
    assert got["item_id"].tolist() == [2268318, 2333346, 2576651, 2268318, 4756105]
    first_ts = got["ts"].iloc[0]
    assert first_ts == datetime.fromtimestamp(T0, UTC).replace(tzinfo=None) == datetime(2017, 11, 24, 17, 21, 10)
    assert first_ts.tzinfo is None
    assert all(IMPORTED_ID_MIN <= event_id < 2**63 for event_id in got["event_id"])
    assert got["session_id"].isna().all() and got["parent_event_id"].isna().all()
    with any_engine.connect() as conn:
        item = conn.execute(select(wh.items).where(wh.items.c.item_id == 4756105)).mappings().one()
        user = conn.execute(select(wh.users).where(wh.users.c.user_id == 100)).mappings().one()
    assert item["category"] == "4756105" and isinstance(item["category"], str)
    assert item["title"] is None and item["brand"] is None and item["price"] is None
    assert user["signup_ts"] is None and user["region"] is None and user["age_band"] is None


def test_reimport_adds_nothing(any_engine, tmp_path):
    log = write_lines(tmp_path / "log.csv", GOOD_TAOBAO)
    assert import_logs(log, "taobao", any_engine).rows_loaded == 5
    before = counts(any_engine)

    again = import_logs(log, "taobao", any_engine, chunk_rows=2)  # other chunking, same ids

    assert (again.rows_read, again.rows_loaded, again.bad_rows) == (5, 0, 0)
    assert counts(any_engine) == before


def test_overlapping_file_adds_only_the_new_events(sqlite_engine, tmp_path):
    import_logs(write_lines(tmp_path / "a.csv", GOOD_TAOBAO[:3]), "taobao", sqlite_engine)
    report = import_logs(write_lines(tmp_path / "b.csv", GOOD_TAOBAO), "taobao", sqlite_engine)
    assert (report.rows_read, report.rows_loaded) == (5, 2)
    assert counts(sqlite_engine)["behavior_events"] == 5


def test_repeated_identical_rows_are_distinct_events_even_across_chunks(sqlite_engine, tmp_path):
    row = f"7,8,9,pv,{T0}"
    log = write_lines(tmp_path / "log.csv", [row, f"7,8,9,buy,{T0}", row, row])
    report = import_logs(log, "taobao", sqlite_engine, chunk_rows=1)
    assert report.rows_loaded == 4
    ids = set(events(sqlite_engine)["event_id"])
    assert len(ids) == 4
    # the same file read in one chunk gives the same ids: occurrence counts span chunks
    assert import_logs(log, "taobao", sqlite_engine).rows_loaded == 0


def test_event_ids_are_pinned():
    """Changing the id function would make every re-import of an old file duplicate its events."""
    hashes = content_hashes(
        np.array([1, 1]), np.array([2268318, 2268318]), np.array(["click", "click"]), np.array([T0 * 10**6] * 2)
    )
    assert imported_event_ids(hashes, np.array([0, 1])).tolist() == [5611771359729304240, 7373156762315153889]


def test_existing_item_titles_are_kept(sqlite_engine, tmp_path):
    wh.create_schema(sqlite_engine)
    with sqlite_engine.begin() as conn:
        conn.execute(wh.items.insert(), [{"item_id": 2268318, "title": "red shoes", "category": "shoes"}])
    import_logs(write_lines(tmp_path / "log.csv", GOOD_TAOBAO), "taobao", sqlite_engine)
    with sqlite_engine.connect() as conn:
        item = conn.execute(select(wh.items).where(wh.items.c.item_id == 2268318)).mappings().one()
    assert (item["title"], item["category"]) == ("red shoes", "shoes")


# --- bad rows ------------------------------------------------------------------------------------------------
BAD_ROWS = {
    "unknown behaviour": (f"1,2,3,click,{T0}", "unknown behaviour 'click'"),
    "unparsable timestamp": ("1,2,3,pv,yesterday", "timestamp 'yesterday' is not a number of seconds"),
    "timestamp in ms": (f"1,2,3,pv,{T0 * 1000}", "outside 1970-01-01 .. 2100-01-01"),
    "missing user id": (f",2,3,pv,{T0}", "missing user_id"),
    "missing item id": (f"1, ,3,pv,{T0}", "missing item_id"),
    "non-integer id": (f"1,2.5,3,pv,{T0}", "item_id '2.5' is not an integer"),
    "non-numeric id": (f"u1,2,3,pv,{T0}", "user_id 'u1' is not an integer"),
    "id beyond BigInteger": (f"99999999999999999999,2,3,pv,{T0}", "user_id '99999999999999999999' is not an integer"),
    "category too long": (f"1,2,{'9' * 65},pv,{T0}", "category is longer than 64 characters"),
    "too many fields": (f"1,2,3,pv,{T0},extra", "expected 5 fields, found 6"),
    "too few fields": ("1,2,3,pv", "expected 5 fields, found 4"),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_a_bad_row_is_reported_with_its_line_and_aborts(sqlite_engine, tmp_path, kind):
    bad, reason = BAD_ROWS[kind]
    log = write_lines(tmp_path / "log.csv", [*GOOD_TAOBAO[:2], bad, *GOOD_TAOBAO[2:]])

    report = import_logs(log, "taobao", sqlite_engine)

    assert report.aborted and report.rows_loaded == 0
    assert (report.rows_read, report.bad_rows) == (6, 1)
    [reported] = report.first_bad
    assert (reported["line"], reported["content"]) == (3, bad)
    assert reason in reported["reason"]
    assert counts(sqlite_engine) == {"users": 0, "items": 0, "behavior_events": 0}


def test_abort_rolls_back_chunks_already_written(any_engine, tmp_path):
    log = write_lines(tmp_path / "log.csv", [*GOOD_TAOBAO, "1,2,3,pv"])
    report = import_logs(log, "taobao", any_engine, chunk_rows=2)
    assert report.aborted and report.rows_loaded == 0 and report.bad_rows == 1
    assert report.first_bad[0]["line"] == 6
    assert counts(any_engine) == {"users": 0, "items": 0, "behavior_events": 0}


def test_every_bad_row_is_counted_and_the_first_ones_reported_in_line_order(sqlite_engine, tmp_path):
    lines = [
        GOOD_TAOBAO[0],
        "1,2,3,pv",  # 2: too few fields
        f"1,2,3,view,{T0}",  # 3: unknown behaviour
        "",  # 4: blank, skipped
        GOOD_TAOBAO[1],
        f"x,2,3,pv,{T0},1",  # 6: too many fields (checked before the values)
        f"1,2,3,pv,{T0}x",  # 7: bad timestamp
        f"1,,3,pv,{T0}",  # 8: missing item id
        f"1,2,3,pv,{T0}.5",  # 9: fractional seconds are fine
        "",
        "1,2,3,buy,",  # 11: missing timestamp
        f"1,2,3,,{T0}",  # 12: missing behaviour
    ]
    log = write_lines(tmp_path / "log.csv", lines)

    report = import_logs(log, "taobao", sqlite_engine, max_reported=5, chunk_rows=3)

    assert report.rows_read == 10 and report.bad_rows == 7 and report.aborted
    assert [bad["line"] for bad in report.first_bad] == [2, 3, 6, 7, 8]
    assert [bad["reason"] for bad in report.first_bad] == [
        "expected 5 fields, found 4",
        "unknown behaviour 'view' (expected one of: pv, cart, fav, buy)",
        "expected 5 fields, found 6",
        f"timestamp '{T0}x' is not a number of seconds",
        "missing item_id",
    ]


def test_skip_bad_loads_the_good_rows_and_reports_the_bad(any_engine, tmp_path):
    log = write_lines(tmp_path / "log.csv", [GOOD_TAOBAO[0], "1,2,3,pv", *GOOD_TAOBAO[1:], f"1,2,3,pv,{T0},0"])
    report = import_logs(log, "taobao", any_engine, skip_bad=True, chunk_rows=2)
    assert not report.aborted
    assert (report.rows_read, report.rows_loaded, report.bad_rows) == (7, 5, 2)
    assert [bad["line"] for bad in report.first_bad] == [2, 7]
    assert counts(any_engine)["behavior_events"] == 5


def test_crlf_line_endings_and_a_missing_final_newline(sqlite_engine, tmp_path):
    log = tmp_path / "log.csv"
    log.write_bytes(("\r\n".join([*GOOD_TAOBAO[:2], "1,2,3,pv", GOOD_TAOBAO[2]])).encode())
    report = import_logs(log, "taobao", sqlite_engine, skip_bad=True)
    assert (report.rows_loaded, report.first_bad[0]["line"]) == (3, 3)


def test_gzipped_file(sqlite_engine, tmp_path):
    log = tmp_path / "UserBehavior.csv.gz"
    log.write_bytes(gzip.compress(("\n".join(GOOD_TAOBAO) + "\n").encode()))
    assert import_logs(log, "taobao", sqlite_engine).rows_loaded == 5


# --- YAML mappings ---------------------------------------------------------------------------------------------
MAPPING = """\
format: csv
header: true
delimiter: ";"
columns:
  uid: user_id
  sku: item_id
  action: event_type
  time_ms: ts
  cat: category
  name: title
  cost: price
event_types:
  view: impression
  tap: click
  order: purchase
timestamp: {unit: ms}
"""


def test_yaml_mapping_with_header_ms_timestamps_and_an_event_map(sqlite_engine, tmp_path):
    mapping = tmp_path / "shop.yaml"
    mapping.write_text(MAPPING)
    ms = T0 * 1000 + 250
    log = write_lines(
        tmp_path / "shop.csv",
        [
            "time_ms;uid;sku;action;cat;name;cost;ignored",
            f"{ms};5;50;view;shoes;Red shoes;19.90;x",
            f"{ms + 1000};5;50;tap;shoes;;;x",
            f'{ms + 2000};6;51;order;bags;"Bag; leather\nwith strap";120;x',  # quoted ; and newline: lines 4-5
            f"{ms + 3000};6;51;return;bags;;;x",  # line 6: not in the event map
        ],
    )

    aborted = import_logs(log, mapping, sqlite_engine)
    assert aborted.aborted and aborted.first_bad[0]["line"] == 6
    assert "unknown behaviour 'return' (expected one of: view, tap, order)" == aborted.first_bad[0]["reason"]

    report = import_logs(log, str(mapping), sqlite_engine, skip_bad=True)
    assert (report.rows_read, report.rows_loaded, report.bad_rows) == (4, 3, 1)
    got = events(sqlite_engine)
    assert got["event_type"].tolist() == ["impression", "click", "purchase"]
    assert got["ts"].iloc[0] == datetime(2017, 11, 24, 17, 21, 10, 250_000)
    with sqlite_engine.connect() as conn:
        items = {row.item_id: row for row in conn.execute(select(wh.items))}
    assert (items[50].title, items[50].category, items[50].price) == ("Red shoes", "shoes", 19.9)
    assert (items[51].title, items[51].price) == ("Bag; leather\nwith strap", 120.0)


def test_yaml_mapping_for_a_headerless_csv_by_position_with_a_time_format(sqlite_engine, tmp_path):
    mapping = tmp_path / "m.yaml"
    mapping.write_text(
        "header: false\ncolumns: {0: user_id, 1: item_id, 3: event_type, '4': ts}\n"
        "event_types: {v: impression, c: click}\ntimestamp: {format: '%Y-%m-%d %H:%M:%S'}\n"
    )
    log = write_lines(
        tmp_path / "log.txt",
        [
            "1,2,unused,v,2024-03-01 10:00:00",
            "1,2,unused,c,2024-03-01 10:00:05",
            "1,2,unused,c,01/03/2024 10:00",
            "1,2,v,2024-03-01 10:00:05",
        ],
    )
    report = import_logs(log, mapping, sqlite_engine, skip_bad=True)
    assert (report.rows_loaded, report.bad_rows) == (2, 2)
    assert report.first_bad[0] == {
        "line": 3,
        "reason": "timestamp '01/03/2024 10:00' is not in format '%Y-%m-%d %H:%M:%S'",
        "content": "1,2,unused,c,01/03/2024 10:00",
    }
    assert report.first_bad[1]["reason"] == "expected 5 fields, found 4"
    assert events(sqlite_engine)["ts"].tolist() == [datetime(2024, 3, 1, 10, 0), datetime(2024, 3, 1, 10, 0, 5)]


OTTO_MAPPING = """
format: jsonl
events: events
columns: {session: user_id, aid: item_id, type: event_type, ts: ts}
event_types: {clicks: click, carts: add_to_cart, orders: purchase}
timestamp: {unit: ms}
"""


def test_jsonl_with_nested_event_lists_in_the_otto_sessions_layout(sqlite_engine, tmp_path):
    mapping = tmp_path / "otto.yaml"
    mapping.write_text(OTTO_MAPPING)
    ms = T0 * 1000
    sessions = [
        {"session": 12899779, "events": [{"aid": 59625, "ts": ms, "type": "clicks"}]},
        {
            "session": 12899780,
            "events": [
                {"aid": 1142000, "ts": ms + 1000, "type": "clicks"},
                {"aid": 582732, "ts": ms + 2000, "type": "carts"},
                {"aid": 582732, "ts": ms + 3000, "type": "orders"},
            ],
        },
    ]
    lines = [json.dumps(s) for s in sessions]
    log = write_lines(tmp_path / "otto.jsonl", [lines[0], "", lines[1], '{"session": 5, "events": "x"}', "[1]"])

    aborted = import_logs(log, mapping, sqlite_engine)
    assert aborted.aborted and [(b["line"], b["reason"]) for b in aborted.first_bad] == [
        (4, "'events' is not a list of event objects"),
        (5, "not a JSON object"),
    ]
    report = import_logs(log, mapping, sqlite_engine, skip_bad=True, chunk_rows=2)
    assert (report.rows_read, report.rows_loaded, report.bad_rows) == (6, 4, 2)
    got = events(sqlite_engine)
    assert got["user_id"].tolist() == [12899779, 12899780, 12899780, 12899780]
    assert got["item_id"].tolist() == [59625, 1142000, 582732, 582732]
    assert got["event_type"].tolist() == ["click", "click", "add_to_cart", "purchase"]
    assert got["ts"].iloc[3] == datetime(2017, 11, 24, 17, 21, 13)
    # gzip'd, and found by its suffix without 'format'
    gz = tmp_path / "otto.jsonl.gz"
    gz.write_bytes(gzip.compress((lines[1] + "\n").encode()))
    mapping.write_text(OTTO_MAPPING.replace("format: jsonl\nevents: events", "events: events"))
    with pytest.raises(MtlError, match="'events' .* needs 'format: jsonl'"):
        import_logs(gz, mapping, sqlite_engine)


def test_jsonl_one_event_per_line_with_dotted_paths_and_bad_lines(sqlite_engine, tmp_path):
    mapping = tmp_path / "flat.yaml"
    mapping.write_text(
        "columns: {user.id: user_id, item: item_id, kind: event_type, at: ts, user.tier: category}\n"
        "event_types: {view: impression, tap: click}\n"
    )
    log = write_lines(
        tmp_path / "flat.ndjson",
        [
            json.dumps({"user": {"id": 7}, "item": 70, "kind": "view", "at": T0}),
            json.dumps({"user": {"id": 7}, "item": 70, "kind": "tap", "at": T0 + 5}),
            '{"user": {"id": 8}, "item": 80, "kind": "tap", "at": ',  # truncated line
            json.dumps({"user": {}, "item": 80, "kind": "tap", "at": T0 + 9}),  # no user id
        ],
    )
    report = import_logs(log, mapping, sqlite_engine)
    assert report.aborted and [b["line"] for b in report.first_bad] == [3, 4]
    assert report.first_bad[0]["reason"].startswith("not valid JSON")
    assert "user_id" in report.first_bad[1]["reason"]
    report = import_logs(log, mapping, sqlite_engine, skip_bad=True)
    assert report.rows_loaded == 2 and events(sqlite_engine)["event_type"].tolist() == ["impression", "click"]


def test_yaml_mapping_for_parquet(sqlite_engine, tmp_path):
    mapping = tmp_path / "m.yaml"
    mapping.write_text("columns: {u: user_id, i: item_id, e: event_type, t: ts}\nevent_types: {fav: favorite}\n")
    log = tmp_path / "log.parquet"
    pd.DataFrame(
        {
            "u": pd.array([1, 2, None], dtype="Int64"),
            "i": [10, 11, 12],
            "e": ["fav", "fav", "fav"],
            "t": pd.to_datetime(["2024-01-01 00:00:00+01:00"] * 3),
        }
    ).to_parquet(log)
    report = import_logs(log, mapping, sqlite_engine, skip_bad=True)
    assert (report.rows_read, report.rows_loaded, report.bad_rows) == (3, 2, 1)
    assert report.first_bad[0]["line"] == 3 and report.first_bad[0]["reason"] == "missing user_id"
    assert events(sqlite_engine)["ts"].tolist() == [datetime(2023, 12, 31, 23, 0)] * 2


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "columns: {a: user_id, b: item, c: event_type, d: ts}\nevent_types: {x: click}\n",
            "unknown warehouse column 'item'",
        ),
        (
            "columns: {a: user_id, b: item_id, c: event_type}\nevent_types: {x: click}\n",
            "required warehouse column(s) ts not mapped",
        ),
        (
            "columns: {a: user_id, b: item_id, c: event_type, d: ts}\nevent_types: {x: like}\n",
            "'like', which is not a behaviour event type; allowed: impression, click, add_to_cart",
        ),
        (
            "columns: {a: user_id, b: item_id, c: event_type, d: ts}\nevent_types: {x: click}\n"
            "timestamp: {unit: minutes}\n",
            "unknown unit 'minutes'; allowed: s, ms, us",
        ),
        ("colums: {a: user_id}\n", "unknown key(s) 'colums'"),
        (
            "header: false\ncolumns: {a: user_id, b: item_id, c: event_type, d: ts}\nevent_types: {x: click}\n",
            "'a' is not a 0-based column position",
        ),
        ("- just\n- a list\n", "must be a YAML mapping"),
        ("columns: {a: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_mapping_files_are_refused_with_a_clear_message(sqlite_engine, tmp_path, text, problem):
    mapping = tmp_path / "bad.yaml"
    mapping.write_text(text)
    log = write_lines(tmp_path / "log.csv", ["a,b,c,d", "1,2,x,3"])
    with pytest.raises(MtlError) as caught:
        import_logs(log, mapping, sqlite_engine)
    assert str(mapping) in str(caught.value) and problem in str(caught.value)


def test_a_mapped_column_missing_from_the_header_is_named(sqlite_engine, tmp_path):
    mapping = tmp_path / "m.yaml"
    mapping.write_text("columns: {uid: user_id, sku: item_id, act: event_type, t: ts}\nevent_types: {x: click}\n")
    log = write_lines(tmp_path / "log.csv", ["uid,item,act,t", "1,2,x,3"])
    with pytest.raises(MtlError, match=r"column 'sku' of mapping file .* is not in the header; the header has: uid"):
        import_logs(log, mapping, sqlite_engine)


def test_unknown_format_missing_file_and_unreadable_text(sqlite_engine, tmp_path):
    log = write_lines(tmp_path / "log.csv", GOOD_TAOBAO)
    with pytest.raises(MtlError, match="format 'foo' is neither 'taobao' nor an existing YAML mapping file"):
        import_logs(log, "foo", sqlite_engine)
    with pytest.raises(MtlError, match="log file .*nope.csv does not exist"):
        import_logs(tmp_path / "nope.csv", "taobao", sqlite_engine)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"1,2,3,pv,1511544070\n\xff\xfe\x00garbage\n")
    with pytest.raises(MtlError, match="is not valid utf-8 text"):
        import_logs(binary, "taobao", sqlite_engine)
    assert counts(sqlite_engine)["behavior_events"] == 0


# --- the command line ----------------------------------------------------------------------------------------
def test_cli_imports_and_prints_the_report_as_json(sqlite_url, tmp_path):
    log = write_lines(tmp_path / "log.csv", GOOD_TAOBAO)
    args = ["import-logs", str(log), "--format", "taobao", "--db", sqlite_url, "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "rows_read": 5,
        "rows_loaded": 5,
        "bad_rows": 0,
        "first_bad": [],
        "aborted": False,
    }
    again = CliRunner().invoke(app, args)
    assert json.loads(again.stdout)["rows_loaded"] == 0


def test_cli_exits_1_with_the_report_when_rows_are_bad(sqlite_url, tmp_path):
    log = write_lines(tmp_path / "log.csv", [*GOOD_TAOBAO, f"1,2,3,pv,{T0},0"])
    base = ["import-logs", str(log), "--format", "taobao", "--db", sqlite_url]

    result = CliRunner().invoke(app, [*base, "--json"])
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    assert payload["aborted"] and payload["rows_loaded"] == 0 and payload["bad_rows"] == 1
    assert payload["first_bad"][0]["line"] == 6

    text = CliRunner().invoke(app, base)
    assert text.exit_code == 1 and "line 6: expected 5 fields, found 6" in text.stdout

    skipped = CliRunner().invoke(app, [*base, "--skip-bad", "--json"])
    assert skipped.exit_code == 0 and json.loads(skipped.stdout)["rows_loaded"] == 5


def test_the_mtl_entry_point_turns_a_bad_format_into_exit_2(sqlite_url, tmp_path, monkeypatch, capsys):
    log = write_lines(tmp_path / "log.csv", GOOD_TAOBAO)
    monkeypatch.setattr("sys.argv", ["mtl", "import-logs", str(log), "--format", "nope", "--db", sqlite_url])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2
    assert "format 'nope' is neither 'taobao' nor an existing YAML mapping file" in capsys.readouterr().err


def test_the_mtl_entry_point_exits_1_when_the_import_aborts(sqlite_url, tmp_path, monkeypatch):
    log = write_lines(tmp_path / "log.csv", [*GOOD_TAOBAO, "1,2,3,pv"])
    monkeypatch.setattr("sys.argv", ["mtl", "import-logs", str(log), "--format", "taobao", "--db", sqlite_url])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 1
