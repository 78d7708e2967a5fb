"""Architectures, heads, ESMM chaining, and the input layer's guard against churn label leakage."""

from __future__ import annotations

import pytest
import torch

from mtl_core.config import ModelSettings
from mtl_core.learn.examples import CATEGORICAL, NUMERIC
from mtl_core.learn.models import build_model
from mtl_core.learn.models.inputs import USERS_SPACE_INDEX

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


def _word_batch(n_texts: int = 5, words: int = 6, dim: int = 12, seed: int = 0):
    """Word vectors [texts + 1, words, dim] with a different number of words per text (row 0: no text)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(n_texts + 1, words, dim, generator=g)
    table[0] = 0
    for row in range(1, n_texts + 1):
        table[row, 1 + row % (words - 1) :] = 0  # padding after the text's last word
    return table


def test_word_pooling_ignores_padding_and_word_order():
    model = build_model(SIZES, TASKS, ModelSettings(dropout=0.0), 12, True, word_pooling=True).eval()
    table = _word_batch()
    batch, _ = _batch()
    batch["text"] = torch.randint(1, 6, (32,))
    reordered = table.clone()
    reordered[:, :2] = table[:, [1, 0]]  # the first two words swapped
    padded = torch.cat([table, torch.zeros(6, 4, 12)], dim=1)  # four more padding slots
    with torch.no_grad():
        expected = model(batch, table[batch["text"]])
        torch.testing.assert_close(model(batch, reordered[batch["text"]]), expected)
        torch.testing.assert_close(model(batch, padded[batch["text"]]), expected)
        # The batch form training uses: each distinct text once, and which row is which text.
        unique, rows = torch.unique(batch["text"], return_inverse=True)
        torch.testing.assert_close(model(dict(batch, text_row=rows), table[unique]), expected)


def test_word_pooling_gives_every_text_its_own_vector_and_a_change_of_word_moves_it():
    model = build_model(SIZES, TASKS, ModelSettings(dropout=0.0), 12, True, word_pooling=True).eval()
    table = _word_batch()
    batch, _ = _batch()
    batch["text"][:] = 1
    changed = table.clone()
    changed[1, 0] = torch.randn(12)
    with torch.no_grad():
        assert not torch.allclose(model(batch, table[batch["text"]]), model(batch, changed[batch["text"]]))


def test_transfer_starts_as_no_transfer_and_reads_the_source_tower_without_training_it():
    torch.manual_seed(0)
    plain = build_model(SIZES, TASKS, ModelSettings(dropout=0.0, transfer=[]), 12, True).eval()
    transfer = build_model(
        SIZES, TASKS, ModelSettings(dropout=0.0, transfer=[("ctr", "cvr"), ("ctr", "gone")]), 12, True
    ).eval()
    transfer.load_state_dict(plain.state_dict(), strict=False)
    assert transfer.transfer_pairs == [(0, 1)]  # pairs naming a task the model lacks are skipped
    batch, text = _batch()
    with torch.no_grad():
        torch.testing.assert_close(transfer(batch, text), plain(batch, text))  # zero read-out at the start
    with torch.no_grad():
        transfer.transfers[0].weight.fill_(1.0)
        moved = transfer(batch, text) - plain(batch, text)
    assert moved[:, 1].abs().sum() > 0
    torch.testing.assert_close(moved[:, [0, 2, 3]], torch.zeros(32, 3))  # only the target task moves
    transfer(batch, text)[:, 1].sum().backward()
    assert transfer.transfers[0].weight.grad.abs().sum() > 0
    # cvr reads ctr's tower but never trains it (zeros, not None: the slice of the concatenated logits)
    assert all(p.grad is None or not p.grad.any() for p in transfer.towers[0].parameters())


def test_relu_dropout_drops_at_its_rate_from_torchs_generator_and_only_in_training():
    from mtl_core.learn.models.architectures import ReLUDropout

    x = torch.ones(1000, 1000)
    layer = ReLUDropout(0.1)
    torch.manual_seed(3)
    out = layer(x)
    assert abs((out == 0).float().mean().item() - 0.1) < 0.002
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / 0.9))
    torch.manual_seed(3)
    torch.testing.assert_close(layer(x), out)  # the seed decides the mask
    assert not torch.equal(layer(x), out)
    assert torch.equal(layer(-x), torch.zeros_like(x))  # the ReLU
    odd = torch.randn(3, 7, requires_grad=True)  # a size that is not a multiple of the four masks per draw
    kept = layer(odd)
    kept.sum().backward()
    torch.testing.assert_close(odd.grad, kept.detach() / odd.detach().clamp_min(1e-12) * (odd > 0))
    assert torch.equal(layer.eval()(x - 2), torch.relu(x - 2))
    assert torch.equal(ReLUDropout(1.0).train()(odd), torch.zeros_like(odd))


@pytest.mark.parametrize("architecture", ["mmoe", "ple"])
def test_fused_experts_equal_separate_expert_layers(architecture):
    """The fused layers compute what one layer per expert and per gate computes (the earlier layout)."""
    from mtl_core.learn.models.architectures import PLE, MMoE

    torch.manual_seed(0)
    x = torch.randn(16, 12)
    if architecture == "mmoe":
        model = MMoE(12, 3, 8, 4, dropout=0.0).eval()
        weight, bias = model.experts.linear.weight, model.experts.linear.bias
        experts = [torch.relu(x @ w.T + b) for w, b in zip(weight.split(8), bias.split(8), strict=True)]
        gates = (x @ model.gates.weight.T + model.gates.bias).view(16, 3, 4).softmax(dim=2)
        expected = [(gates[:, t].unsqueeze(2) * torch.stack(experts, dim=1)).sum(dim=1) for t in range(3)]
    else:
        model = PLE(12, 3, 8, 2, 2, 1, dropout=0.0).eval()
        layer = model.layers[0]
        weight, bias = layer.experts.linear.weight, layer.experts.linear.bias
        experts = [torch.relu(x @ w.T + b) for w, b in zip(weight.split(8), bias.split(8), strict=True)]
        gates = (x @ layer.gates.weight.T + layer.gates.bias).view(16, 3, 4).softmax(dim=2)
        expected = []
        for t in range(3):
            chosen = torch.stack(experts[2 * t : 2 * t + 2] + experts[6:8], dim=1)  # own two, then the shared two
            expected.append((gates[:, t].unsqueeze(2) * chosen).sum(dim=1))
    for got, want in zip(model(x), expected, strict=True):
        torch.testing.assert_close(got, want)
