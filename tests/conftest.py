"""Shared fixtures: an isolated warehouse per test, on SQLite and on the local PostgreSQL server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from mtl_core.data import warehouse as wh

# The local server of the development and CI machines; override to point the tests elsewhere.
# Not MTL_*: that prefix belongs to the settings, which refuse a variable they do not know.
PG_ADMIN_URL = os.environ.get("MTLTEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# Every run that promotes publishes the champion's features to the online store on the local Redis (the
# default serve.redis_url): this session's keys get a prefix of their own, so tests never read a stale
# version of another session (or of `make demo`), and are removed at the end.
REDIS_URL = os.environ.get("MTLTEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SESSION_KEY_PREFIX = f"mtltest-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session", autouse=True)
def _session_online_store() -> Iterator[None]:
    os.environ.setdefault("MTL_SERVE__REDIS_URL", REDIS_URL)
    os.environ["MTL_SERVE__KEY_PREFIX"] = SESSION_KEY_PREFIX
    # Building the int8 and ONNX variants adds seconds to every registration: the tests that need them
    # (test_variants, the DAG's drift run) ask for them.
    os.environ.setdefault("MTL_SERVE__BUILD_VARIANTS", "false")
    yield
    drop_redis_keys(SESSION_KEY_PREFIX)


def drop_redis_keys(prefix: str) -> None:
    """Remove every key under ``prefix`` (a test's own, or the session's)."""
    import redis

    client = redis.Redis.from_url(os.environ.get("MTL_SERVE__REDIS_URL", REDIS_URL), socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.unlink(*keys[start : start + 1000])
    except redis.RedisError:
        pass  # no Redis: nothing was written
    finally:
        client.close()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'warehouse.db'}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL whose connections see only a fresh schema, dropped afterwards (parallel runs don't collide)."""
    schema = f"mtl_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # a missing server is a failure, not a skip: CI has one
        admin.dispose()
        raise RuntimeError(f"PostgreSQL at {PG_ADMIN_URL} is not reachable: {exc}") from exc
    yield f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request) -> str:
    """Run a test once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
def engine(sqlite_url) -> Iterator[Engine]:
    eng = wh.make_engine(sqlite_url)
    wh.create_schema(eng)
    yield eng
    eng.dispose()


# --- a tiny random BERT: the text path at test speed -------------------------------------------------
WORDS = (
    "premium luxury leather shoes blue red running board game for kids nordwind waterproof lamp desk "
    "coffee grinder wallet jacket winter bottle water yoga mat black green"
).split()


def make_tiny_bert(path: Path, seed: int, hidden: int = 32) -> Path:
    """A random 4-layer BERT with a word-level vocabulary, saved like any local transformers model.

    transformers 5 builds BERT tokenizers from a ``vocab`` dict (a ``vocab_file`` argument is silently
    ignored and every word becomes [UNK]), hence the dict.
    """
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    BertTokenizer(vocab=vocab).save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_path(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert_shared"), seed=0)


def tiny_training_env(data_dir: Path, tiny_bert_path: Path) -> dict[str, str]:
    """Settings for training in about a second on a small shop: the tiny BERT, short splits, few steps."""
    return {
        "MTL_DATA_DIR": str(data_dir),
        "MTL_TEXT__MODEL_PATH": str(tiny_bert_path),
        "MTL_FEATURES__HISTORY_DAYS": "3",
        "MTL_FEATURES__VALID_DAYS": "3",
        "MTL_FEATURES__HOLDOUT_DAYS": "4",
        "MTL_FEATURES__CHURN_CUTOFF_STEP_DAYS": "2",
        "MTL_TRAIN__EPOCHS": "2",
        "MTL_TRAIN__STEPS_PER_EPOCH": "12",
        "MTL_TRAIN__EVALS_PER_EPOCH": "2",
        "MTL_TRAIN__BATCH_SIZE": "256",
        "MTL_TRAIN__PATIENCE": "0",
    }
