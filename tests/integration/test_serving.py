"""`mtl serve` on loopback: scores equal the registered pyfunc's, bad requests name their field, the token is
required, /healthz and /metrics tell the state, and a new champion is picked up only once its features are
published, without a failed request during the switch."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import date

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import drop_redis_keys, tiny_training_env
from mlflow.exceptions import MlflowException
from pydantic import SecretStr
from sqlalchemy import text
from stack import BIN, Service, free_port, http_ok, wait_until
from support import PSEUDONYM_KEY, PSEUDONYMS

from mtl_core import registry as reg
from mtl_core.config import load_settings
from mtl_core.data import warehouse as wh
from mtl_core.data.extract import extract_snapshot
from mtl_core.data.shop import ShopSpec, write_shop
from mtl_core.learn.examples import build_examples, examples_frame
from mtl_core.learn.training import train_on_snapshot
from mtl_core.learn.variants import load_scorer
from mtl_core.serving.online import OnlineStore, ServingError
from mtl_core.serving.server import Metrics, ModelPoller, create_app

NAME = reg.MODEL_NAME
TOKEN = "test-token-" + uuid.uuid4().hex
AT = "2026-02-09T10:00:00+00:00"  # the request's time: the interval's end (2026-02-09) plus ten hours
MAX_BATCH = 50


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_bert_path):
    """A tiny shop, two models, v1 registered, champion and published, and `mtl serve` following the champion.

    The server starts before anything is registered (it boots while the models train) and must wait.
    """
    root = tmp_path_factory.mktemp("serving")
    engine = wh.make_engine(f"sqlite:///{root / 'warehouse.db'}")
    write_shop(engine, ShopSpec(users=600, items=150, days=35, start=date(2026, 1, 5), seed=5))
    extract_snapshot(engine, "2026-01-05", "2026-02-09", root / "snap", pseudonyms=PSEUDONYMS)
    with engine.connect() as conn:
        users = [r[0] for r in conn.execute(text("SELECT DISTINCT user_id FROM behavior_events ORDER BY 1 LIMIT 5"))]
        items = [r[0] for r in conn.execute(text("SELECT DISTINCT item_id FROM behavior_events ORDER BY 1 LIMIT 5"))]
        ads = [r[0] for r in conn.execute(text("SELECT DISTINCT ad_id FROM ad_events ORDER BY 1 LIMIT 3"))]
    engine.dispose()
    prefix = f"mtltest-serve-{uuid.uuid4().hex[:8]}"
    env = {
        **tiny_training_env(root / "data", tiny_bert_path),
        "MTL_MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "MTL_PRIVACY__PSEUDONYM_KEY": PSEUDONYM_KEY,
        "MTL_SERVE__REDIS_URL": os.environ.get("MTL_SERVE__REDIS_URL", "redis://127.0.0.1:6379/0"),
        "MTL_SERVE__KEY_PREFIX": prefix,
        "MTL_SERVE__TOKEN": TOKEN,
        "MTL_SERVE__POLL_SECONDS": "0.5",
        "MTL_SERVE__MAX_BATCH": str(MAX_BATCH),
    }
    settings = load_settings(environ=env)
    client = reg.configure(env["MTL_MLFLOW_TRACKING_URI"])
    port = free_port()
    server_env = {k: v for k, v in os.environ.items() if not k.startswith(("MTL_", "MLFLOW_TRACKING"))} | env
    server = Service("mtl-serve", [str(BIN / "mtl"), "serve", "--port", str(port)], server_env, root)
    base = f"http://127.0.0.1:{port}"
    try:
        train_on_snapshot(root / "snap", root / "model_a", settings, progress=False)
        other = settings.model_copy(update={"train": settings.train.model_copy(update={"seed": 1})})
        train_on_snapshot(root / "snap", root / "model_b", other, progress=False)
        examples = build_examples(root / "snap", settings.features, settings.tasks)
        rows = np.concatenate([examples.task_rows(t, "holdout")[:3] for t in range(len(examples.task_names))])
        input_example = examples_frame(examples, rows)
        v1 = reg.log_and_register_model(
            client, reg.run_for_key(client, "mtl", "v1"), root / "model_a", NAME, input_example
        )
        reg.make_champion(client, NAME, v1, actor="test", why="first champion")

        # Up, but nothing published: /healthz says why it cannot serve yet.
        waiting = wait_until(
            lambda: waiting_for(base, v1), f"mtl serve to wait for v{v1}'s features", 120, [server], every=0.3
        )
        store = OnlineStore(settings)
        store.publish(v1, root / "model_a", root / "snap")
        wait_until(lambda: http_ok(base + "/healthz"), "mtl serve to load v1", 60, [server], every=0.2)
        yield {
            "root": root,
            "base": base,
            "server": server,
            "settings": settings,
            "client": client,
            "store": store,
            "v1": v1,
            "input_example": input_example,
            "waiting": waiting,
            "users": users,
            "items": items,
            "ads": ads,
        }
    finally:
        server.stop()
        drop_redis_keys(prefix)


def waiting_for(base: str, version: int):
    """(status, JSON) of /healthz once the server knows it waits for ``version``; None before (or while down)."""
    try:
        status, _, body = call(base, "/healthz", token=None)
    except (urllib.error.URLError, OSError):
        return None
    return (status, body) if (body.get("waiting") or {}).get("version") == version else None


def call(base: str, path: str, body=None, token: str | None = TOKEN, raw: bytes | None = None):
    """(status, headers, parsed JSON or text) of one request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(base + path, data=data, method="POST" if data is not None else "GET")
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, headers, payload = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        status, headers, payload = exc.code, exc.headers, exc.read()
    kind = headers.get("Content-Type", "")
    return status, headers, json.loads(payload) if kind.startswith("application/json") else payload.decode()


def known_rows(stack) -> list[dict]:
    feed = [{"user_id": u, "item_id": i, "time": AT} for u, i in zip(stack["users"], stack["items"], strict=True)]
    ads = [
        {"user_id": u, "ad_id": a, "time": AT, "position": 2}
        for u, a in zip(stack["users"], stack["ads"], strict=False)
    ]
    return feed + ads


def lookup_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": np.array([r["user_id"] for r in rows], dtype=np.int64),
            "item_id": pd.array([r.get("item_id") for r in rows], dtype="Int64"),
            "ad_id": pd.array([r.get("ad_id") for r in rows], dtype="Int64"),
            "time": np.array([np.datetime64(r["time"][:19], "us") for r in rows]),
            "position": np.array([r.get("position", 0) for r in rows], dtype=np.int64),
        }
    )


def test_healthz_is_503_with_the_reason_until_the_champion_is_published(stack):
    status, health = stack["waiting"]
    assert status == 503 and health["status"] == "unavailable", health
    assert f"v{stack['v1']} holds 'champion' but its features are not published" in health["reason"], health
    assert health["waiting"]["version"] == stack["v1"]
    log = stack["server"].log.read_text()
    assert log.count("its features are not published") == 1, log  # said once, not at every poll
    assert f"serving {NAME} v{stack['v1']} (fp32)" in log


def test_scores_of_known_users_equal_the_registered_pyfunc(stack):
    rows = known_rows(stack)
    status, _, answer = call(stack["base"], "/predict", rows)
    assert status == 200, answer
    assert answer["model_version"] == stack["v1"] and answer["variant"] == "fp32"
    tasks = answer["tasks"]
    assert set(tasks) == {t.name for t in stack["settings"].tasks}
    assert len(answer["predictions"]) == len(rows)
    assert not any(p["cold_user"] or p["cold_item"] for p in answer["predictions"])

    scorer = load_scorer(stack["root"] / "model_a")
    assembled = stack["store"].lookup(stack["v1"], lookup_frame(rows), scorer.space, scorer.settings)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    expected = pyfunc.predict(examples_frame(assembled.examples, np.arange(len(rows))))
    served = pd.DataFrame([{t: p[t] for t in tasks} for p in answer["predictions"]])
    np.testing.assert_allclose(served[tasks].to_numpy(), expected[tasks].to_numpy(), atol=1e-5)
    # Feed and ad rows are told apart: an ad row's text is its ad copy, so the ad_ctr heads differ.
    assert served["ad_ctr"].nunique() > 1


def test_unknown_users_and_items_get_cold_start_scores_and_flags(stack):
    user, item, ad = stack["users"][0], stack["items"][0], stack["ads"][0]
    rows = [
        {"user_id": 987_654_321, "item_id": item},
        {"user_id": user, "item_id": 987_654_321},
        {"user_id": user, "ad_id": 987_654_321},
        {"user_id": 987_654_321, "ad_id": ad, "time": "2026-02-10T08:30:00+02:00"},
    ]
    status, _, answer = call(stack["base"], "/predict", rows)
    assert status == 200, answer
    flags = [(p["cold_user"], p["cold_item"]) for p in answer["predictions"]]
    assert flags == [(True, False), (False, True), (False, True), (True, False)]
    probs = np.array([[p[t] for t in answer["tasks"]] for p in answer["predictions"]])
    assert np.isfinite(probs).all() and ((probs > 0) & (probs < 1)).all()


def test_each_task_keeps_the_served_scores_of_its_own_sample_space_for_the_monitor(stack):
    """ad_ctr's holdout holds ad impressions only, so only ad rows' ad_ctr scores are comparable with it."""
    base, store, version = stack["base"], stack["store"], stack["v1"]

    def counts():
        return {task: len(scores) for task, scores in store.served_scores(version).items()}

    before = counts()
    rows = known_rows(stack)
    feed = sum("item_id" in r for r in rows)
    assert call(base, "/predict", rows)[0] == 200
    after = wait_until(
        # Both lists moved: the server writes them in one pipeline, which a read may see half-applied.
        lambda: (
            (c := counts()).get("ctr", 0) > before.get("ctr", 0) and c.get("ad_ctr", 0) > before.get("ad_ctr", 0) and c
        ),
        "the served scores",
        10,
        [stack["server"]],
        0.2,
    )
    assert after["ctr"] - before.get("ctr", 0) == after["cvr"] - before.get("cvr", 0) == feed
    assert after["ad_ctr"] - before.get("ad_ctr", 0) == len(rows) - feed
    assert after.get("churn", 0) == before.get("churn", 0) == 0  # no request row is a user row


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ([{"item_id": 3}], 422, "[0].user_id"),
        ([{"user_id": 1, "item_id": 3}, {"user_id": 1, "item_id": 3}, {"user_id": "7", "item_id": 3}], 422,
         "[2].user_id"),
        ([{"user_id": 1, "item_id": 3.5}], 422, "[0].item_id"),
        ([], 422, "body"),
        ({"user_id": 1, "item_id": 3}, 422, "body"),
        ([{"user_id": 1, "item_id": 3}] * (MAX_BATCH + 1), 413, "body"),
        ([{"user_id": 1, "item_id": 3, "ad_id": 4}], 422, "[0].item_id/ad_id"),
        ([{"user_id": 1}], 422, "[0].item_id/ad_id"),
        ([{"user_id": 1, "item_id": 3, "position": -1}], 422, "[0].position"),
        ([{"user_id": 1, "item_id": 3, "time": "yesterday"}], 422, "[0].time"),
        ([{"user_id": 1, "item": 3}], 422, "[0].item"),
    ],
)  # fmt: skip
def test_a_malformed_request_gets_a_4xx_naming_the_field(stack, body, status, field):
    got, _, answer = call(stack["base"], "/predict", body)
    assert got == status, answer
    assert field in [d["field"] for d in answer["detail"]], answer
    assert all(d["problem"] for d in answer["detail"])


def test_a_body_that_is_not_json_names_the_body(stack):
    status, _, answer = call(stack["base"], "/predict", raw=b"[{user_id: 1}")
    assert status == 422 and answer["detail"][0]["field"].startswith("body"), answer
    assert "JSON" in answer["detail"][0]["problem"]


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", ""])
def test_predict_needs_the_bearer_token(stack, token):
    status, headers, answer = call(stack["base"], "/predict", [{"user_id": 1, "item_id": 3}], token=token)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert TOKEN not in json.dumps(answer)


def test_healthz_and_metrics_need_no_token_and_tell_the_state(stack):
    status, _, health = call(stack["base"], "/healthz", token=None)
    assert status == 200, health
    assert health["status"] == "ok" and health["version"] == stack["v1"] and health["variant"] == "fp32"
    assert health["alias"] == "champion" and health["published_at"] and health["waiting"] is None
    status, _, metrics = call(stack["base"], "/metrics", token=None)
    assert status == 200
    assert f"mtl_serve_model_version {float(stack['v1'])}" in metrics
    assert 'mtl_serve_requests_total{path="/predict",status="200"}' in metrics
    assert 'mtl_serve_requests_total{path="/predict",status="401"}' in metrics
    assert 'mtl_serve_requests_total{path="/predict",status="422"}' in metrics
    assert 'mtl_serve_request_seconds_bucket{le="0.02",path="/predict"}' in metrics
    assert 'mtl_serve_score_count{task="ctr"}' in metrics
    assert 'mtl_serve_polls_total{result="unpublished"}' in metrics  # before v1 was published
    assert _sample(metrics, 'mtl_serve_polls_total{result="switched"}') == 1.0
    assert _sample(metrics, "mtl_serve_switches_total") == 1.0
    assert TOKEN not in metrics and TOKEN not in stack["server"].log.read_text()
    before = _sample(metrics, "mtl_serve_rows_total")
    call(stack["base"], "/predict", [{"user_id": 1, "item_id": 3}, {"user_id": 2, "ad_id": stack["ads"][0]}])
    # Recorded after the answer is sent (off the client's clock): soon, not necessarily at once.
    wait_until(
        lambda: _sample(call(stack["base"], "/metrics", token=None)[2], "mtl_serve_rows_total") == before + 2,
        "mtl_serve_rows_total to count the two rows", 10, every=0.1,
    )  # fmt: skip


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_concurrent_requests_get_the_same_scores_for_the_same_rows(stack):
    rows = known_rows(stack)
    answers: list = []

    def send():
        for _ in range(15):
            answers.append(call(stack["base"], "/predict", rows))

    senders = [threading.Thread(target=send) for _ in range(4)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(60)
    assert len(answers) == 60 and {status for status, _, _ in answers} == {200}
    # Scoring in eval mode every time: training-mode dropout in one request would change its scores.
    assert len({json.dumps(answer["predictions"]) for _, _, answer in answers}) == 1


def test_serve_refuses_to_start_without_a_token(stack):
    settings = stack["settings"].model_copy(
        update={"serve": stack["settings"].serve.model_copy(update={"token": SecretStr("")})}
    )
    with pytest.raises(ServingError, match="MTL_SERVE__TOKEN"):
        create_app(settings)


class Flaky:
    """An MLflow client that goes down on demand, as a tracking server does."""

    def __init__(self, real):
        self.real, self.down = real, False

    def __getattr__(self, name):
        if self.down:
            raise MlflowException("Max retries exceeded with url: /api/2.0/mlflow/ (Connection refused)")
        return getattr(self.real, name)


def test_a_failing_poll_keeps_the_version_in_service(stack):
    client = Flaky(stack["client"])
    metrics = Metrics()
    poller = ModelPoller(stack["settings"], "champion", stack["store"], metrics, client=client)
    try:
        assert poller.poll_once(strict=True) == "switched"
        served = poller.served
        client.down = True
        assert poller.poll_once() == "failed" and poller.poll_once() == "failed"
        assert poller.served is served  # still serving, the same state
        assert "tracking server is unreachable" in poller.last_poll["error"]
        assert metrics.registry.get_sample_value("mtl_serve_polls_total", {"result": "failed"}) == 2
        client.down = False
        assert poller.poll_once() == "unchanged" and poller.last_poll["result"] == "unchanged"
    finally:
        poller.stop()


def test_a_new_champion_serves_once_published_and_no_request_fails_during_the_switch(stack, tmp_path):
    base, client, store = stack["base"], stack["client"], stack["store"]
    rows = known_rows(stack)[:2]
    v2 = reg.log_and_register_model(
        client, reg.run_for_key(client, "mtl", "v2"), stack["root"] / "model_b", NAME, stack["input_example"]
    )
    reg.make_champion(client, NAME, v2, actor="test", why="second champion")

    # Not published: v1 keeps serving across more than two polls, and the wait is visible.
    for _ in range(2):
        time.sleep(1.2)
        status, _, answer = call(base, "/predict", rows)
        assert status == 200 and answer["model_version"] == stack["v1"], answer
    health = call(base, "/healthz", token=None)[2]
    assert health["version"] == stack["v1"] and health["waiting"]["version"] == v2, health
    assert f"mtl_serve_waiting_version {float(v2)}" in call(base, "/metrics", token=None)[2]

    # Requests all through the switch: every one answered, by v1 and then by v2.
    seen: list[tuple[int, int | None]] = []
    stop = threading.Event()

    def client_loop():
        while not stop.is_set():
            status, _, answer = call(base, "/predict", rows)
            seen.append((status, answer.get("model_version") if isinstance(answer, dict) else None))

    sender = threading.Thread(target=client_loop, daemon=True)
    sender.start()
    try:
        time.sleep(0.3)
        store.publish(v2, stack["root"] / "model_b", stack["root"] / "snap")
        switched = wait_until(
            lambda: call(base, "/healthz", token=None)[2].get("version") == v2, "the switch to v2", 30,
            [stack["server"]], every=0.2,
        )  # fmt: skip
        assert switched
        time.sleep(0.5)
    finally:
        stop.set()
        sender.join(15)
    statuses = {s for s, _ in seen}
    versions = [v for _, v in seen]
    assert statuses == {200}, seen
    assert versions[0] == stack["v1"] and versions[-1] == v2, versions
    # Once v2 answered, v1 never did again: one reference is swapped, not a mix.
    assert stack["v1"] not in versions[versions.index(v2) :]
    health = call(base, "/healthz", token=None)[2]
    assert health["waiting"] is None and health["version"] == v2
    metrics = call(base, "/metrics", token=None)[2]
    assert f"mtl_serve_model_version {float(v2)}" in metrics and _sample(metrics, "mtl_serve_switches_total") == 2.0


def test_the_monitor_raises_the_oncall_message_once_served_scores_move_away_from_the_holdouts(stack):
    """The hourly mtl_serving_monitor's step on the champion the server follows: its holdout scores published as
    `mtl publish` does, served scores like them pass, served scores piled on one value raise the message."""
    from mtl_core import pipeline
    from mtl_core.quality.drift import ScoresShifted
    from mtl_core.serving.online import publish_registered

    settings = stack["settings"]
    settings = settings.model_copy(
        update={
            "serve": settings.serve.model_copy(update={"served_sample": 2000}),
            "drift": settings.drift.model_copy(update={"min_served": 200}),
        }
    )
    version = publish_registered(settings, stack["root"] / "snap")["version"]
    store = OnlineStore(settings)
    reference = store.reference_scores(version)
    tasks = list(reference)
    rng = np.random.default_rng(0)
    like_holdout = np.column_stack([rng.choice(reference[t], 2000) for t in tasks])
    store.record_served(version, tasks, like_holdout)
    report = pipeline.monitor_served_scores(settings)
    assert report["version"] == version and report["shifted"] == [], report

    store.record_served(version, tasks, np.full((2000, len(tasks)), 0.97))
    with pytest.raises(ScoresShifted) as shifted:
        pipeline.monitor_served_scores(settings)
    message = str(shifted.value)
    assert f"v{version}" in message and all(t in message for t in tasks), message
    assert message.endswith("Runbook: docs/RUNBOOK.md#served-scores-shifted"), message
