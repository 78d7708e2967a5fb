"""The online feature store on the local Redis: published features equal training's, lookup + scorer equal
the pyfunc, cold start, no raw ids, atomic publishing, retention, served and reference scores."""

from __future__ import annotations

import uuid
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import redis
from conftest import REDIS_URL, drop_redis_keys, tiny_training_env
from support import PSEUDONYM_KEY, PSEUDONYMS, RAW_ID_OFFSET, leaks, renumber_users

from mtl_core.config import Settings, load_settings
from mtl_core.data import warehouse as wh
from mtl_core.data.extract import extract_snapshot
from mtl_core.data.shop import ShopSpec, write_shop
from mtl_core.learn.checkpoint import load_model
from mtl_core.learn.examples import CATEGORICAL, NUMERIC, FeatureSpace, build_examples, examples_frame
from mtl_core.learn.training import train_on_snapshot
from mtl_core.learn.variants import load_scorer
from mtl_core.serving.online import OnlineStore, ServingError

UNKNOWN_USER = RAW_ID_OFFSET + 10_000_000  # a raw id the warehouse does not hold
UNKNOWN_ITEM = 987_654_321
UNKNOWN_AD = 876_543_219


@pytest.fixture(scope="session")
def serving_shop(tmp_path_factory, tiny_bert_path):
    """A 600-user shop with distinctive raw user ids, its snapshot, and a tiny model trained on it (~1 s).

    Session-scoped: tests/unit/test_batch_scoring.py scores with the same shop and model.
    """
    root = tmp_path_factory.mktemp("serving_shop")
    engine = wh.make_engine(f"sqlite:///{root / 'warehouse.db'}")
    write_shop(engine, ShopSpec(users=600, items=150, days=35, start=date(2026, 1, 5), seed=5))
    renumber_users(engine)
    extract_snapshot(engine, "2026-01-05", "2026-02-09", root / "snap", pseudonyms=PSEUDONYMS)
    with engine.connect() as conn:
        raw_ids = pd.read_sql("SELECT user_id FROM users", conn)["user_id"].to_numpy(np.int64)
    engine.dispose()
    prefix = f"mtltest-online-{uuid.uuid4().hex[:8]}"
    env = tiny_training_env(root / "data", tiny_bert_path) | {
        "MTL_PRIVACY__PSEUDONYM_KEY": PSEUDONYM_KEY,
        "MTL_SERVE__REDIS_URL": REDIS_URL,
        "MTL_SERVE__KEY_PREFIX": prefix,
    }
    settings = load_settings(environ=env)
    train_on_snapshot(root / "snap", root / "model", settings, progress=False)
    loaded = load_model(root / "model")
    examples = build_examples(root / "snap", loaded.settings.features, loaded.settings.tasks)
    yield SimpleNamespace(
        root=root,
        snap=root / "snap",
        model=root / "model",
        settings=settings,
        env=env,
        loaded=loaded,
        examples=examples,
        raw_ids=raw_ids,
        raw_of=dict(zip(PSEUDONYMS.array(raw_ids).tolist(), raw_ids.tolist(), strict=True)),
        prefix=prefix,
    )
    drop_redis_keys(prefix)


def _serve(settings: Settings, **changes) -> Settings:
    return settings.model_copy(update={"serve": settings.serve.model_copy(update=changes)})


def _store(shop, name: str, **serve) -> OnlineStore:
    return OnlineStore(_serve(shop.settings, **serve) if serve else shop.settings, model_name=name)


def _request(shop, rows: np.ndarray, with_time: bool = True) -> pd.DataFrame:
    """Example rows as a request: raw user id, the item (feed) or the ad (ads), time, feed position."""
    ex = shop.examples
    feed = ex.raw["space"][rows] == "feed"
    position = np.rint(np.expm1(ex.numeric[rows, NUMERIC.index("position")].astype(np.float64)))
    frame = pd.DataFrame(
        {
            "user_id": [shop.raw_of[u] for u in ex.raw["user"][rows]],
            "item_id": pd.array([i if f else None for i, f in zip(ex.raw["item"][rows], feed, strict=True)], "Int64"),
            "ad_id": pd.array(ex.raw["ad"][rows], dtype="Int64"),
            "position": np.where(feed, position, np.nan),
        }
    )
    if with_time:
        frame["time"] = ex.time[rows]
    return frame


def _same_raw(a, b) -> bool:
    missing = (a is None or (isinstance(a, float) and np.isnan(a)), b is None or (isinstance(b, float) and np.isnan(b)))
    return all(missing) or (not any(missing) and a == b)


@pytest.fixture(scope="module")
def published(serving_shop):
    """The model's features as of the snapshot's end, with reference scores (v1 of model "main")."""
    store = _store(serving_shop, "main")
    reference = {"ctr": np.linspace(0.01, 0.5, 30), "cvr": np.linspace(0.02, 0.3, 20)}
    manifest = store.publish(1, serving_shop.model, serving_shop.snap, reference_scores=reference)
    return SimpleNamespace(store=store, manifest=manifest, reference=reference)


def test_published_features_equal_what_training_computes_at_the_publishing_time(serving_shop):
    """Publish as of an example's own time: its lookup must give exactly the example build_examples made."""
    ex = serving_shop.examples
    holdout = ex.split == "holdout"
    feed = np.flatnonzero(holdout & (ex.raw["space"] == "feed") & ~ex.new_user)
    with_position = feed[ex.numeric[feed, NUMERIC.index("position")] > 0]
    first_visit = np.flatnonzero((ex.split != "history") & (ex.raw["space"] == "feed") & ex.new_user)
    ads = np.flatnonzero(holdout & (ex.raw["space"] == "ads"))
    store = _store(serving_shop, "as_of", keep_versions=5)
    for version, row in enumerate([with_position[len(with_position) // 2], first_visit[0], ads[len(ads) // 2]], 1):
        # All the rows of that instant (several ads or impressions may share the second).
        rows = np.flatnonzero((ex.time == ex.time[row]) & np.isin(ex.raw["space"], ["feed", "ads"]))
        store.publish(version, serving_shop.model, serving_shop.snap, as_of=pd.Timestamp(ex.time[row]).to_pydatetime())
        got = store.lookup(
            version, _request(serving_shop, rows), serving_shop.loaded.space, serving_shop.loaded.settings
        )
        assert np.array_equal(got.examples.numeric, ex.numeric[rows]), (version, NUMERIC)
        for name in CATEGORICAL:
            assert all(map(_same_raw, got.examples.raw[name], ex.raw[name][rows])), name
        texts = np.array([None, *got.examples.texts], dtype=object)[got.examples.text_index]
        assert list(texts) == list(np.array([None, *ex.texts], dtype=object)[ex.text_index[rows]])
        assert np.array_equal(got.examples.new_user, ex.new_user[rows])
        assert np.array_equal(got.examples.cold_item, ex.cold_item[rows])
        assert not got.cold_user.any() and not got.cold_item.any()


def test_lookup_and_the_scorer_give_exactly_the_pyfunc_scores(serving_shop, published):
    ex = serving_shop.examples
    rows = np.concatenate(
        [np.flatnonzero((ex.split == "holdout") & (ex.raw["space"] == space))[:25] for space in ("feed", "ads")]
    )
    request = pd.concat(
        [
            _request(serving_shop, rows[::2]),
            _request(serving_shop, rows[1::2], with_time=False),  # scored at `now`
            pd.DataFrame(
                {
                    "user_id": [UNKNOWN_USER, UNKNOWN_USER, int(serving_shop.raw_ids[0]), int(serving_shop.raw_ids[1])],
                    "item_id": pd.array([int(ex.raw["item"][rows[0]]), None, UNKNOWN_ITEM, None], dtype="Int64"),
                    "ad_id": pd.array([None, int(ex.raw["ad"][rows[-1]]), None, UNKNOWN_AD], dtype="Int64"),
                }
            ),
        ],
        ignore_index=True,
    )
    loaded = serving_shop.loaded
    got = published.store.lookup(1, request, loaded.space, loaded.settings, now=pd.Timestamp("2026-02-10 18:30"))
    probs = load_scorer(serving_shop.model, "fp32").score(got.examples, got.texts)
    pyfunc = loaded.predict_frame(examples_frame(got.examples, np.arange(len(request))))
    assert probs.shape == (len(request), len(loaded.task_names))
    assert np.array_equal(probs, pyfunc.to_numpy())
    assert np.isfinite(probs).all() and ((probs > 0) & (probs < 1)).all()
    # The flags: only the unknown user's rows, the unknown item's and the unknown ad's.
    n = len(rows)
    assert list(np.flatnonzero(got.cold_user)) == [n, n + 1]
    assert list(np.flatnonzero(got.cold_item)) == [n + 2, n + 3]
    without_time = got.examples.time[len(rows[::2]) : n]
    assert (without_time == np.datetime64("2026-02-10T18:30", "us")).all()


def test_unknown_entities_get_the_cold_start_values_of_training(serving_shop, published):
    request = pd.DataFrame({"user_id": [UNKNOWN_USER], "item_id": [UNKNOWN_ITEM]})
    loaded = serving_shop.loaded
    got = published.store.lookup(1, request, loaded.space, loaded.settings)
    value = dict(zip(NUMERIC, got.examples.numeric[0].astype(np.float64), strict=True))
    # What build_examples gives an entity without history or attributes.
    assert value["user_events"] == value["user_clicks"] == value["item_impressions"] == 0
    assert value["user_ctr"] == np.float32(0.5 / 15.0) and value["item_ctr"] == np.float32(0.5 / 15.0)
    assert value["user_ad_ctr"] == np.float32(0.2 / 10.0)
    assert value["user_days_since_last"] == np.float32(np.log1p(60.0))
    assert value["user_days_since_signup"] == np.float32(np.log1p(365.0))
    assert value["has_item"] == 1 and value["log_price"] == 0 and value["item_age_days"] == 0
    assert got.examples.text_index[0] == 0 and got.examples.new_user[0]
    assert np.isnan(got.examples.raw["region"][0]) and np.isnan(got.examples.raw["category"][0])
    assert got.cold_user[0] and got.cold_item[0]


def test_no_raw_user_id_reaches_redis(serving_shop, published, tmp_path):
    loaded = serving_shop.loaded
    request = pd.DataFrame({"user_id": serving_shop.raw_ids[:50], "item_id": np.arange(50) % 150 + 1})
    got = published.store.lookup(1, request, loaded.space, loaded.settings)
    published.store.record_served(1, loaded.task_names, load_scorer(serving_shop.model).score(got.examples, got.texts))
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{serving_shop.prefix}:*", count=1000))
    assert any(b":u:" in key for key in keys) and any(b":served:" in key for key in keys)
    blobs = []
    for key in keys:
        kind = client.type(key)
        blobs += [key, *(client.lrange(key, 0, -1) if kind == b"list" else [client.get(key)])]
    client.close()
    (tmp_path / "redis.bin").write_bytes(b"\n".join(blobs))
    assert leaks(tmp_path, set(serving_shop.raw_ids.tolist()) | {UNKNOWN_USER}, [PSEUDONYM_KEY]) == []


def test_a_half_done_publish_is_not_served_and_a_re_publish_switches_at_once(serving_shop, monkeypatch):
    loaded = serving_shop.loaded
    writer = _store(serving_shop, "atomic")
    marker_set = writer._redis.set

    def dies_at_the_marker(key, value, *args, **kwargs):
        if ":published:" in key:
            raise redis.ConnectionError("connection lost")
        return marker_set(key, value, *args, **kwargs)

    monkeypatch.setattr(writer._redis, "set", dies_at_the_marker)
    with pytest.raises(ServingError, match="writing v7's marker failed"):
        writer.publish(7, serving_shop.model, serving_shop.snap)
    monkeypatch.setattr(writer._redis, "set", marker_set)
    client = redis.Redis.from_url(REDIS_URL)
    pattern = f"{serving_shop.prefix}:atomic:v7:g*"
    assert len(list(client.scan_iter(match=pattern))) > 600  # the partial keys are there ...
    reader = _store(serving_shop, "atomic")
    assert not reader.is_published(7) and reader.manifest(7) is None and reader.published_versions() == []
    request = pd.DataFrame({"user_id": serving_shop.raw_ids[:3], "item_id": [1, 2, 3]})
    with pytest.raises(ServingError, match=r"v7 is not published .*`mtl publish --version 7"):
        reader.lookup(7, request, loaded.space, loaded.settings)  # ... but not served

    first = writer.publish(7, serving_shop.model, serving_shop.snap)
    generations = {key.split(b":")[-3] for key in client.scan_iter(match=pattern)}
    assert generations == {b"g" + first["generation"].encode()}  # the partial attempt's keys are gone
    before = reader.lookup(7, request, loaded.space, loaded.settings)
    second = writer.publish(7, serving_shop.model, serving_shop.snap)  # the reader has cached the first generation
    after = reader.lookup(7, request, loaded.space, loaded.settings)
    assert second["generation"] != first["generation"]
    assert np.array_equal(before.examples.numeric, after.examples.numeric) and not after.cold_user.any()
    assert {key.split(b":")[-3] for key in client.scan_iter(match=pattern)} == {b"g" + second["generation"].encode()}
    client.close()


def test_retention_keeps_the_newest_versions_and_the_one_just_published(serving_shop):
    store = _store(serving_shop, "retention", keep_versions=2)
    client = redis.Redis.from_url(REDIS_URL)
    for version in (1, 2, 3):
        store.publish(version, serving_shop.model, serving_shop.snap)
    assert store.published_versions() == [2, 3]
    assert list(client.scan_iter(match=f"{serving_shop.prefix}:retention:v1:*")) == []
    store.publish(1, serving_shop.model, serving_shop.snap)  # a rollback's re-publish is never deleted at once
    assert store.published_versions() == [1, 2, 3]
    client.close()


def test_served_and_reference_scores_round_trip(serving_shop, published):
    store = _store(serving_shop, "main", served_sample=100)
    first, second = np.random.default_rng(0).random((2, 60, 2), dtype=np.float32)
    store.record_served(1, ["ctr", "cvr"], first)
    store.record_served(1, ["ctr", "cvr"], second)
    served = store.served_scores(1)
    assert set(served) >= {"ctr", "cvr"}
    for t, task in enumerate(["ctr", "cvr"]):  # newest first, capped at serve.served_sample
        assert np.array_equal(served[task], np.concatenate([second[::-1, t], first[::-1, t]])[:100])
    reference = store.reference_scores(1)
    assert set(reference) == {"ctr", "cvr"}
    assert np.array_equal(reference["ctr"], published.reference["ctr"])
    assert published.manifest["reference_scores"] == {"ctr": 30, "cvr": 20}
    with pytest.raises(ServingError, match="v99 is not published"):
        store.reference_scores(99)
    assert store.served_scores(99) == {}


def test_large_reference_scores_are_sampled(serving_shop):
    store = _store(serving_shop, "sampled", served_sample=100)
    scores = np.random.default_rng(1).random(1000)
    store.publish(1, serving_shop.model, serving_shop.snap, reference_scores={"ctr": scores})
    kept = store.reference_scores(1)["ctr"]
    assert len(kept) == 100 and np.isin(kept, scores).all()


def test_a_model_other_than_the_published_one_is_refused(serving_shop, published):
    space = serving_shop.loaded.space
    other = FeatureSpace(vocabs=space.vocabs, mean={**space.mean, "log_price": 0.0}, std=space.std)
    request = pd.DataFrame({"user_id": serving_shop.raw_ids[:1], "item_id": [1]})
    with pytest.raises(ServingError, match="published for another model directory.*mtl publish --version 1"):
        published.store.lookup(1, request, other, serving_shop.loaded.settings)


@pytest.mark.parametrize(
    ("request_rows", "message"),
    [
        ({"item_id": [1]}, "request: no user_id column"),
        ({"user_id": [1]}, "neither an item_id nor an ad_id column"),
        ({"user_id": [1, 2], "item_id": [1, 2], "ad_id": [None, 3]}, "row 1 names both an item_id and an ad_id"),
        ({"user_id": [1, 2], "item_id": [1, None]}, "row 1 names neither an item_id nor an ad_id"),
        ({"user_id": [1, 2.5], "item_id": [1, 2]}, "column 'user_id' must hold whole numbers .* row 1 holds 2.5"),
        ({"user_id": [1, None], "item_id": [1, 2]}, "column 'user_id' is empty in row 1"),
        ({"user_id": [1, "u7"], "item_id": [1, 2]}, "column 'user_id' must hold whole numbers .* row 1 holds 'u7'"),
        ({"user_id": [1], "item_id": [1], "position": [-1]}, "column 'position' must hold feed slots"),
        ({"user_id": [1], "item_id": [1], "time": ["yesterday"]}, "column 'time' must hold UTC times; row 0"),
    ],
)
def test_bad_request_rows_are_refused_with_the_column_and_row(serving_shop, published, request_rows, message):
    with pytest.raises(ServingError, match=message):
        published.store.lookup(1, pd.DataFrame(request_rows), serving_shop.loaded.space, serving_shop.loaded.settings)


def test_an_unreachable_redis_is_named_without_its_password(serving_shop):
    settings = _serve(serving_shop.settings, redis_url="redis://:s3cret-pw@127.0.0.1:1/0")
    with pytest.raises(ServingError) as caught:
        OnlineStore(settings)
    message = str(caught.value)
    assert "redis://:***@127.0.0.1:1/0" in message and "serve.redis_url" in message and "s3cret" not in message
    with pytest.raises(ServingError, match="serve.redis_url is empty"):
        OnlineStore(_serve(serving_shop.settings, redis_url=""))


def test_published_manifest_describes_the_version(serving_shop, published):
    manifest = published.store.manifest(1)
    assert manifest == published.manifest
    assert manifest["as_of"] == "2026-02-09T00:00:00.000000Z"
    assert manifest["counts"]["users"] == 600 and manifest["counts"]["items"] == 150
    assert manifest["counts"]["ads"] > 0 and manifest["counts"]["texts"] > 150
    assert manifest["snapshot"] == str(Path(serving_shop.snap).resolve())
    assert published.store.is_published(1) and 1 in published.store.published_versions()
