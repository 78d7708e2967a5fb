"""Architectures, heads, ESMM chaining, and the input layer's guard against churn label leakage."""

from __future__ import annotations

import pytest
import torch

from mtl_core.config import ModelSettings
from mtl_core.features import CATEGORICAL, NUMERIC
from mtl_core.models import build_model
from mtl_core.models.inputs import USERS_SPACE_INDEX

SIZES = {name: 50 for name in CATEGORICAL} | {"space": 4}
TASKS = ["ctr", "cvr", "ad_ctr", "churn"]


def _batch(n: int = 32, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {name: torch.randint(0, 50, (n,), generator=g) for name in CATEGORICAL}
    batch["space"] = torch.randint(1, 4, (n,), generator=g)
    batch["numeric"] = torch.randn(n, len(NUMERIC), generator=g)
    batch["text"] = torch.randint(0, 3, (n,), generator=g)
    return batch, torch.randn(n, 12, generator=g)


@pytest.mark.parametrize("architecture", ["shared_bottom", "mmoe", "ple"])
@pytest.mark.parametrize("use_text", [True, False])
def test_every_architecture_gives_one_logit_per_task(architecture, use_text):
    settings = ModelSettings(architecture=architecture, ple_layers=2)
    model = build_model(SIZES, TASKS, settings, text_in=12, use_text=use_text)
    batch, text = _batch()
    logits = model(batch, text if use_text else None)
    assert logits.shape == (32, 4) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.towers.parameters())
    assert model.last_shared_layer().grad is not None


def test_esmm_pair_is_found_only_when_both_tasks_exist():
    assert build_model(SIZES, TASKS, ModelSettings(), 12, True).esmm_pair == (0, 1)
    assert build_model(SIZES, ["cvr", "churn"], ModelSettings(), 12, True).esmm_pair is None
    assert build_model(SIZES, TASKS, ModelSettings(esmm=False), 12, True).esmm_pair is None


def test_rows_without_text_use_the_learned_no_text_vector():
    model = build_model(SIZES, TASKS, ModelSettings(dropout=0.0), 12, True).eval()
    batch, text = _batch()
    batch["text"][:] = 0
    with torch.no_grad():
        a = model(batch, text)
        b = model(batch, torch.randn_like(text))
    torch.testing.assert_close(a, b)  # the text vector is ignored where there is no text


def test_churn_rows_do_not_see_the_user_id():
    model = build_model(SIZES, TASKS, ModelSettings(dropout=0.0, id_features=["user", "item"]), 12, True).eval()
    batch, text = _batch()
    batch["space"][:] = USERS_SPACE_INDEX
    other = dict(batch, user=(batch["user"] + 7) % 50)
    with torch.no_grad():
        torch.testing.assert_close(model(batch, text), model(other, text))
    batch["space"][:] = 1  # feed rows do use it
    other["space"] = batch["space"]
    with torch.no_grad():
        assert not torch.allclose(model(batch, text), model(other, text))


def test_id_embeddings_are_learned_only_when_configured():
    without = build_model(SIZES, TASKS, ModelSettings(), 12, True)
    assert not {"user", "item", "ad"} & set(without.inputs.embeddings)
    with_items = build_model(SIZES, TASKS, ModelSettings(id_features=["item"]), 12, True)
    assert "item" in with_items.inputs.embeddings and "user" not in with_items.inputs.embeddings
    batch, text = _batch()
    assert with_items(batch, text).shape == without(batch, text).shape == (32, 4)
