"""Raw user ids stay in the warehouse: snapshots, feature spaces and settings dumps hold only keyed pseudonyms."""

from __future__ import annotations

import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import text
from support import PSEUDONYMS, RAW_ID_OFFSET, leaks, renumber_users

from mtl_core.config import ConfigError, Settings, load_settings, merge_overrides
from mtl_core.data import warehouse as wh
from mtl_core.data.extract import extract_snapshot, read_snapshot_table, verify_snapshot
from mtl_core.data.pseudonyms import KEY_FILE, Pseudonymiser, PseudonymKeyError, load_or_create_key, pseudonymiser_for
from mtl_core.data.shop import ShopSpec, write_shop
from mtl_core.learn.examples import FeatureSpace, build_examples

KEY = "a-production-like-secret-key-5f1c0e9b"


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory):
    root = tmp_path_factory.mktemp("pseudonyms")
    engine = wh.make_engine(f"sqlite:///{root / 'warehouse.db'}")
    write_shop(engine, ShopSpec(users=300, items=100, days=21, start=date(2026, 1, 5), seed=4))
    renumber_users(engine)
    with engine.connect() as conn:
        raw = {row[0] for row in conn.execute(text("SELECT user_id FROM users"))}
    return engine, raw


def _user_ids(snapshot) -> set[int]:
    ids: set[int] = set()
    for table in ("users", "behavior_events", "ad_events"):
        ids |= set(read_snapshot_table(snapshot, table, ["user_id"])["user_id"].to_pylist())
    return ids


def test_a_snapshot_holds_pseudonyms_and_no_raw_user_id(warehouse, tmp_path):
    engine, raw = warehouse
    manifest = extract_snapshot(engine, "2026-01-05", "2026-01-26", tmp_path / "snap", Pseudonymiser(KEY))
    ids = _user_ids(tmp_path / "snap")
    assert ids and not ids & raw
    assert ids == {Pseudonymiser(KEY).one(u) for u in raw} & ids  # each one is the keyed hash of a warehouse id
    assert manifest["user_ids"] == {"pseudonymised": ["user_id"], "key_id": Pseudonymiser(KEY).key_id}
    assert leaks(tmp_path, raw, [KEY]) == []  # the window's folder and the day store beside it
    verify_snapshot(tmp_path / "snap")  # the manifest's hashes are of the pseudonymised rows


def test_pseudonyms_are_stable_under_one_key_and_unrelated_under_another(warehouse, tmp_path):
    engine, _ = warehouse
    a = extract_snapshot(engine, "2026-01-05", "2026-01-12", tmp_path / "a", Pseudonymiser(KEY))
    b = extract_snapshot(engine, "2026-01-05", "2026-01-12", tmp_path / "b", Pseudonymiser(KEY))
    c = extract_snapshot(engine, "2026-01-05", "2026-01-12", tmp_path / "c", PSEUDONYMS)
    assert a["content_hash"] == b["content_hash"]
    assert a["content_hash"] != c["content_hash"]
    assert not _user_ids(tmp_path / "a") & _user_ids(tmp_path / "c")
    assert a["user_ids"]["key_id"] != c["user_ids"]["key_id"]


def test_a_null_user_id_stays_null_for_validation_to_report():
    assert Pseudonymiser(KEY).values([5, None, 5]) == [Pseudonymiser(KEY).one(5), None, Pseudonymiser(KEY).one(5)]
    mapped = Pseudonymiser(KEY).array(np.array([3, 1, 3]))
    assert mapped.dtype == np.int64 and mapped[0] == mapped[2] != mapped[1] and (mapped >= 0).all()


def test_a_short_key_is_refused_and_the_key_is_never_in_a_repr():
    with pytest.raises(PseudonymKeyError, match="at least 16"):
        Pseudonymiser("short")
    assert KEY not in repr(Pseudonymiser(KEY))


def test_the_embedded_default_creates_one_private_key_file_even_when_raced(tmp_path):
    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: load_or_create_key(tmp_path), range(16)))
    assert len(keys) == 1
    path = tmp_path / KEY_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    settings = load_settings(environ={"MTL_DATA_DIR": str(tmp_path)})
    assert pseudonymiser_for(settings).key_id == Pseudonymiser(keys.pop()).key_id


def test_the_configured_key_wins_and_no_settings_dump_holds_it(tmp_path):
    settings = load_settings(environ={"MTL_DATA_DIR": str(tmp_path), "MTL_PRIVACY__PSEUDONYM_KEY": KEY})
    assert pseudonymiser_for(settings).key_id == Pseudonymiser(KEY).key_id
    assert not (tmp_path / KEY_FILE).exists()
    for dump in (settings.model_dump_json(), json.dumps(settings.model_dump(mode="json")), repr(settings)):
        assert KEY not in dump
    # A run's conf keeps the key, and may not set one (the conf is stored and shown in the Airflow UI).
    assert merge_overrides(settings, {"train": {"epochs": 1}}).privacy.pseudonym_key.get_secret_value() == KEY
    with pytest.raises(ConfigError, match="cannot set privacy.pseudonym_key"):
        merge_overrides(settings, {"privacy": {"pseudonym_key": "x" * 32}})


def test_a_model_that_learns_no_user_embedding_keeps_no_user_vocabulary(warehouse, tmp_path):
    engine, _ = warehouse
    extract_snapshot(engine, "2026-01-05", "2026-01-26", tmp_path / "snap", PSEUDONYMS)
    settings = Settings()
    examples = build_examples(tmp_path / "snap", settings.features, list(settings.tasks))
    rows = np.flatnonzero(examples.split == "train")
    space = FeatureSpace.fit(examples, rows, id_features=[])
    assert space.vocabs["user"].values == [] and space.vocabs["item"].values == []
    assert len(space.vocabs["category"]) > 1
    grown = FeatureSpace.fit(examples, rows, id_features=["user"])
    assert len(grown.vocabs["user"]) > 1 and grown.extended(examples, rows, []).vocabs["user"].values == []


def test_the_leak_finder_finds_a_raw_id_in_text_binary_and_parquet(tmp_path):
    raw = {RAW_ID_OFFSET + 17, RAW_ID_OFFSET + 70_000}
    (tmp_path / "a.json").write_text(json.dumps({"user": RAW_ID_OFFSET + 17}))
    (tmp_path / "b.bin").write_bytes(b"xx" + np.array([float(RAW_ID_OFFSET + 70_000)]).tobytes())
    pq.write_table(pa.table({"u": [RAW_ID_OFFSET + 17]}), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text(f"{RAW_ID_OFFSET + 170} {KEY}")
    found = "\n".join(leaks(tmp_path, raw, [KEY]))
    assert "a.json: a raw id as text" in found and "b.bin: a raw id as float64" in found
    assert "c.parquet:u: a raw id as int64" in found and "d.txt: the secret" in found
    assert "d.txt: a raw id" not in found  # 731000000170 is not 731000000017


def test_a_data_dir_where_the_key_file_cannot_be_created_is_a_clear_error(tmp_path):
    (tmp_path / "secrets").write_text("a file where the secrets folder should be")
    with pytest.raises(PseudonymKeyError, match="cannot create the pseudonymisation key file .*MTL_PRIVACY__"):
        load_or_create_key(tmp_path)
