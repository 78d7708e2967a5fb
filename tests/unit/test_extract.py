"""Extraction: interval edges, idempotent content hash, chunking, atomic replace."""

from __future__ import annotations

import json
from datetime import date, datetime

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from support import PSEUDONYMS

from mtl_core.data import extract as ingest
from mtl_core.data import warehouse as wh
from mtl_core.data.extract import (
    ExtractionError,
    describe_snapshot,
    extract_snapshot,
    read_manifest,
    read_snapshot_table,
    table_files,
)
from mtl_core.data.shop import ShopSpec, write_shop

T0, T1 = datetime(2026, 1, 10), datetime(2026, 1, 17)


def _events(engine, rows):
    cols = {k: np.asarray([r[k] for r in rows], dtype=object) for k in rows[0]}
    cols["ts"] = np.asarray([r["ts"] for r in rows], dtype="datetime64[us]")
    with engine.begin() as conn:
        wh.bulk_insert(conn, wh.behavior_events, cols)


def _edge_rows():
    base = dict(user_id=1, item_id=1, event_type="impression", session_id=None, parent_event_id=None, position=0)
    times = {
        1: datetime(2026, 1, 9, 23, 59, 59, 999999),  # just before T0: out
        2: T0,  # exactly T0: in
        3: datetime(2026, 1, 12, 8, 30),  # inside: in
        4: datetime(2026, 1, 16, 23, 59, 59, 999999),  # just before T1: in
        5: T1,  # exactly T1: out
    }
    return [dict(base, event_id=i, ts=t) for i, t in times.items()]


def test_interval_is_half_open(any_url, tmp_path):
    engine = wh.make_engine(any_url)
    wh.create_schema(engine)
    _events(engine, _edge_rows())
    manifest = extract_snapshot(engine, T0, T1, tmp_path / "snap", pseudonyms=PSEUDONYMS)
    got = read_snapshot_table(tmp_path / "snap", "behavior_events").to_pandas()
    assert sorted(got["event_id"]) == [2, 3, 4]
    assert manifest["tables"]["behavior_events"]["rows"] == 3
    assert str(got["ts"].dtype) == "datetime64[us, UTC]"
    assert got["ts"].min() == pd.Timestamp(T0, tz="UTC")
    engine.dispose()


def test_aware_times_are_converted_to_utc(engine, tmp_path):
    _events(engine, _edge_rows())
    manifest = extract_snapshot(
        engine, "2026-01-10T01:00:00+01:00", "2026-01-17", tmp_path / "snap", pseudonyms=PSEUDONYMS
    )
    assert manifest["interval"]["start"] == "2026-01-10T00:00:00Z"
    assert manifest["tables"]["behavior_events"]["rows"] == 3


@pytest.fixture(scope="module")
def shop_url(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('shop') / 'warehouse.db'}"
    write_shop(wh.make_engine(url), ShopSpec(users=400, items=120, days=21, start=date(2026, 1, 5), seed=3))
    return url


def test_same_interval_same_hash_whatever_the_chunking(shop_url, tmp_path):
    engine = wh.make_engine(shop_url)
    first = extract_snapshot(
        engine, "2026-01-08", "2026-01-22", tmp_path / "a", pseudonyms=PSEUDONYMS, chunk_rows=50_000
    )
    again = extract_snapshot(engine, "2026-01-08", "2026-01-22", tmp_path / "a", pseudonyms=PSEUDONYMS, chunk_rows=777)
    assert first["content_hash"] == again["content_hash"]
    assert first["tables"]["behavior_events"]["rows"] > 1000
    other = extract_snapshot(engine, "2026-01-08", "2026-01-21", tmp_path / "b", pseudonyms=PSEUDONYMS)
    assert other["content_hash"] != first["content_hash"]
    # the manifest on disk is the one returned, and the files hold what it counts
    assert read_manifest(tmp_path / "a") == again
    for name, meta in again["tables"].items():
        assert sum(pq.read_metadata(f).num_rows for f in table_files(tmp_path / "a", name)) == meta["rows"], name


def test_dimensions_are_taken_as_of_the_interval_end(shop_url, tmp_path):
    engine = wh.make_engine(shop_url)
    extract_snapshot(engine, "2026-01-08", "2026-01-15", tmp_path / "s", pseudonyms=PSEUDONYMS)
    items = read_snapshot_table(tmp_path / "s", "items").to_pandas()
    events = read_snapshot_table(tmp_path / "s", "behavior_events").to_pandas()
    assert (items["created_ts"] < pd.Timestamp("2026-01-15", tz="UTC")).all()
    assert set(events["item_id"]) <= set(items["item_id"])


def test_interrupted_extraction_leaves_no_snapshot_and_keeps_the_old_one(shop_url, tmp_path, monkeypatch):
    engine = wh.make_engine(shop_url)
    out = tmp_path / "snap"
    old = extract_snapshot(engine, "2026-01-08", "2026-01-15", out, pseudonyms=PSEUDONYMS)
    real_write = ingest._write_table
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the worker was killed halfway through
        return real_write(*args, **kwargs)

    monkeypatch.setattr(ingest, "_write_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_snapshot(engine, "2026-01-08", "2026-01-22", out, pseudonyms=PSEUDONYMS)
    assert read_manifest(out) == old  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["days", "snap"]  # no staging directory left behind
    assert not [p for p in (tmp_path / "days").rglob("*") if ".tmp-" in p.name]  # nor a half-written day
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        extract_snapshot(engine, "2026-01-08", "2026-01-22", tmp_path / "fresh", pseudonyms=PSEUDONYMS)
    assert not (tmp_path / "fresh").exists()


def test_bad_interval_and_bad_warehouse_give_clear_errors(tmp_path):
    engine = wh.make_engine(f"sqlite:///{tmp_path / 'empty.db'}")  # no schema at all
    with pytest.raises(ExtractionError, match="not a date"):
        extract_snapshot(engine, "yesterday", "2026-01-02", tmp_path / "s", pseudonyms=PSEUDONYMS)
    with pytest.raises(ExtractionError, match="empty interval"):
        extract_snapshot(engine, "2026-01-02", "2026-01-02", tmp_path / "s", pseudonyms=PSEUDONYMS)
    with pytest.raises(ExtractionError, match="reading table users from the warehouse .* failed"):
        extract_snapshot(engine, "2026-01-01", "2026-01-02", tmp_path / "s", pseudonyms=PSEUDONYMS)
    assert not [p.name for p in tmp_path.iterdir() if not p.name.startswith("empty.db")]


def test_describe_gives_counts_and_label_rates(shop_url, tmp_path):
    engine = wh.make_engine(shop_url)
    extract_snapshot(engine, "2026-01-05", "2026-01-26", tmp_path / "s", pseudonyms=PSEUDONYMS)
    info = describe_snapshot(tmp_path / "s")
    assert info["rows"]["users"] == 400
    rates = info["label_rates"]
    assert 0.01 < rates["ctr"] < 0.08 and 0.0 < rates["cvr"] < 0.3 and 0.0 < rates["churn"] < 0.6
    assert rates["ad_ctr"] == pytest.approx(info["events"]["ad_click"] / info["events"]["ad_impression"], abs=1e-4)
    json.dumps(info)  # JSON-ready for --json


def test_a_tampered_snapshot_is_refused_naming_the_table(shop_url, tmp_path):
    from mtl_core.data.extract import SnapshotIntegrityError, verify_snapshot

    engine = wh.make_engine(shop_url)
    manifest = extract_snapshot(engine, "2026-01-08", "2026-01-22", tmp_path / "snap", pseudonyms=PSEUDONYMS)
    assert verify_snapshot(tmp_path / "snap") == manifest  # an untouched snapshot passes
    path = table_files(tmp_path / "snap", "behavior_events")[3]  # the window's fourth day
    table = pq.read_table(path).to_pandas()
    table.loc[table.index[:5], "user_id"] = 999_999  # a few rows rewritten: same row count, same schema
    table.to_parquet(path, index=False)
    with pytest.raises(
        SnapshotIntegrityError, match=r"behavior_events day 2026-01-11 \(.*\) .*does not match the manifest"
    ):
        verify_snapshot(tmp_path / "snap")
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    with pytest.raises(SnapshotIntegrityError, match=r"behavior_events day 2026-01-11 .*cannot be read"):
        verify_snapshot(tmp_path / "snap")
    path.unlink()
    with pytest.raises(
        SnapshotIntegrityError, match=r"behavior_events day 2026-01-11 .*day=2026-01-11.parquet\) is missing"
    ):
        verify_snapshot(tmp_path / "snap")


def test_an_untouched_snapshot_with_nulls_passes_verification_in_any_chunking(tmp_path):
    """A NULL in an integer column turns that chunk's column into floats: verification must hash as extraction did."""
    from mtl_core.data.corruption import corrupt_interval
    from mtl_core.data.extract import verify_snapshot

    url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    write_shop(wh.make_engine(url), ShopSpec(users=400, items=120, days=21, start=date(2026, 1, 5), seed=3))
    corrupt_interval(wh.make_engine(url), "2026-01-15", "2026-01-22", kinds=("null_ids",))
    for chunk_rows in (50_000, 777):
        manifest = extract_snapshot(
            wh.make_engine(url), "2026-01-08", "2026-01-22", tmp_path / "s", PSEUDONYMS, chunk_rows
        )
        assert verify_snapshot(tmp_path / "s") == manifest
