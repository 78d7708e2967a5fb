"""Masked per-task losses, the residual term, and every task weighting strategy on a toy multi-task problem."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_core.learn.losses import (
    WEIGHTING_KINDS,
    FixedWeighting,
    GradNormWeighting,
    InverseVolumeWeighting,
    PCGradWeighting,
    TaskWeighting,
    UncertaintyWeighting,
    make_weighting,
    masked_bce,
    pcgrad_project,
    residual_term,
    resolve_pairs,
)

TASKS = ["ctr", "cvr", "churn"]


@pytest.fixture(autouse=True)
def one_thread():
    """The toy models are tiny: intra-op threads only add contention (10x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- masked_bce -------------------------------------------------------------------------------------------


def _batch(seed: int = 0, rows: int = 40, tasks: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, tasks, generator=g) * 3
    labels = (torch.rand(rows, tasks, generator=g) < 0.4).float()
    mask = torch.rand(rows, tasks, generator=g) < 0.5
    return logits, labels, mask


def test_masked_bce_matches_torch_on_the_masked_rows():
    logits, labels, mask = _batch()
    losses = masked_bce(logits, labels, mask)
    assert losses.shape == (3,)
    for t in range(3):
        rows = mask[:, t]
        expected = F.binary_cross_entropy_with_logits(logits[rows, t], labels[rows, t])
        torch.testing.assert_close(losses[t], expected)


def test_masked_bce_ignores_rows_outside_the_mask():
    logits, labels, mask = _batch(seed=1)
    before = masked_bce(logits, labels, mask)
    other_labels = torch.where(mask, labels, 1 - labels)
    torch.testing.assert_close(masked_bce(logits, other_labels, mask), before)
    # Even a missing label stored as NaN, or a garbage logit, outside the mask changes nothing.
    nan_labels = torch.where(mask, labels, torch.full_like(labels, math.nan))
    inf_logits = torch.where(mask, logits, torch.full_like(logits, math.inf)).requires_grad_()
    after = masked_bce(inf_logits, nan_labels, mask)
    torch.testing.assert_close(after, before)
    after.sum().backward()
    assert torch.isfinite(inf_logits.grad).all()
    assert (inf_logits.grad[~mask] == 0).all()


def test_task_without_rows_gives_zero_and_no_nan_gradient():
    logits, labels, mask = _batch(seed=2)
    mask[:, 1] = False
    logits.requires_grad_()
    losses = masked_bce(logits, labels, mask)
    assert losses[1].item() == 0.0
    losses.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[:, 1] == 0).all()


def test_masked_bce_is_stable_for_extreme_logits():
    logits = torch.tensor([[1000.0], [-1000.0], [50.0]], requires_grad=True)
    labels = torch.tensor([[0.0], [1.0], [1.0]])
    loss = masked_bce(logits, labels, torch.ones(3, 1, dtype=torch.bool))
    torch.testing.assert_close(loss, torch.tensor([2000.0 / 3]), rtol=1e-4, atol=1e-3)
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()


# --- residual term ----------------------------------------------------------------------------------------


def test_residual_term_by_hand():
    probs = torch.tensor([[0.9, 0.2], [0.4, 0.6], [0.5, 0.5], [0.3, 0.7]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    mask = torch.tensor([[True, True], [True, True], [False, True], [True, False]])
    # Rows 0 and 1 carry both labels.
    # (0, 1, 0.5): y_0 vs yhat_1 -> ((1 - 0.2)^2 + (0 - 0.6)^2) / 2 = (0.64 + 0.36) / 2 = 0.5, times 0.5
    # (1, 0, 2.0): y_1 vs yhat_0 -> ((0 - 0.9)^2 + (1 - 0.4)^2) / 2 = (0.81 + 0.36) / 2 = 0.585, times 2
    value = residual_term(probs, labels, mask, [(0, 1, 0.5), (1, 0, 2.0)])
    torch.testing.assert_close(value, torch.tensor(0.5 * 0.5 + 2.0 * 0.585))


def test_residual_term_is_zero_without_overlapping_labels():
    probs = torch.tensor([[0.9, 0.2], [0.4, 0.6]], requires_grad=True)
    labels = torch.tensor([[1.0, math.nan], [math.nan, 1.0]])
    mask = torch.tensor([[True, False], [False, True]])
    value = residual_term(probs, labels, mask, [(0, 1, 1.0)])
    assert value.item() == 0.0
    value.backward()
    assert (probs.grad == 0).all()
    assert residual_term(probs, labels, mask, []).item() == 0.0


def test_resolve_pairs_names_unknown_tasks():
    assert resolve_pairs([("ctr", "cvr", 0.1)], TASKS) == [(0, 1, 0.1)]
    with pytest.raises(ValueError, match="unknown task 'ctcvr'.*ctr, cvr, churn"):
        resolve_pairs([("ctcvr", "cvr", 0.1)], TASKS)


# --- make_weighting ---------------------------------------------------------------------------------------


def test_make_weighting_builds_each_kind_and_refuses_unknown_ones():
    classes = {
        "fixed": FixedWeighting,
        "inverse_volume": InverseVolumeWeighting,
        "uncertainty": UncertaintyWeighting,
        "gradnorm": GradNormWeighting,
        "pcgrad": PCGradWeighting,
    }
    assert set(classes) == set(WEIGHTING_KINDS)
    for kind, cls in classes.items():
        assert isinstance(make_weighting(kind, TASKS, [1.0, 2.0, 0.5], [10, 20, 30]), cls)
    with pytest.raises(ValueError) as excinfo:
        make_weighting("bogus", TASKS, [1.0] * 3, [1] * 3)
    for kind in WEIGHTING_KINDS:
        assert kind in str(excinfo.value)


def test_fixed_weights_come_from_the_config():
    weighting = make_weighting("fixed", TASKS, [1.0, 2.0, 0.5], [1, 1, 1])
    torch.testing.assert_close(weighting.weights(), torch.tensor([1.0, 2.0, 0.5]))
    with pytest.raises(ValueError, match="2 weights for 3 tasks"):
        make_weighting("fixed", TASKS, [1.0, 2.0], [1, 1, 1])


def test_fixed_backward_is_the_gradient_of_the_weighted_sum_plus_extra():
    torch.manual_seed(0)
    x, labels, mask = toy_data(0, rows=64)
    model = Toy()
    losses = masked_bce(model(x), labels, mask)
    extra = 0.2 * losses[0] ** 2
    params = list(model.parameters())
    objective = 1.0 * losses[0] + 2.0 * losses[1] + 0.5 * losses[2] + extra
    expected = torch.autograd.grad(objective, params, retain_graph=True)
    value = make_weighting("fixed", TASKS, [1.0, 2.0, 0.5], [1, 1, 1]).backward(losses, model.shared_params(), extra)
    torch.testing.assert_close(value, objective.detach())
    for p, g in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_inverse_volume_weights_are_proportional_to_one_over_n_and_sum_to_t():
    volumes = [100, 300, 600]
    weights = make_weighting("inverse_volume", TASKS, [1.0] * 3, volumes).weights()
    torch.testing.assert_close(weights.sum(), torch.tensor(3.0))
    products = weights * torch.tensor(volumes, dtype=torch.float32)
    torch.testing.assert_close(products, products[0].expand(3))  # w_t * n_t is the same for every task
    torch.testing.assert_close(weights, torch.tensor([2.0, 2 / 3, 1 / 3]))
    with pytest.raises(ValueError, match="none for cvr"):
        make_weighting("inverse_volume", TASKS, [1.0] * 3, [10, 0, 5])


# --- a toy multi-task problem -----------------------------------------------------------------------------


class Toy(nn.Module):
    """Shared MLP bottom and one linear head per task, as the real models are built."""

    def __init__(self, d_in: int = 8, hidden: int = 16, tasks: int = 3) -> None:
        super().__init__()
        self.bottom = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(tasks))

    def forward(self, x: Tensor) -> Tensor:
        h = self.bottom(x)
        return torch.cat([head(h) for head in self.heads], dim=1)

    def shared_params(self) -> list[nn.Parameter]:
        return list(self.bottom.parameters())


def toy_data(seed: int, rows: int = 2048, noisy_task: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Three tasks on their own rows (60/30/10 %); the ``cvr`` rows also carry a ``ctr`` label."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 8, generator=g)
    directions = F.normalize(torch.randn(8, 3, generator=g), dim=0)
    labels = torch.bernoulli(torch.sigmoid(4 * x @ directions), generator=g)
    if noisy_task is not None:
        labels[:, noisy_task] = torch.bernoulli(torch.full((rows,), 0.5), generator=g)
    owner = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), rows, replacement=True, generator=g)
    mask = F.one_hot(owner, 3).bool()
    mask[:, 0] |= mask[:, 1]
    return x, labels, mask


def joint_loss(model: nn.Module, x: Tensor, labels: Tensor, mask: Tensor) -> float:
    """The unweighted sum_t L_t over the whole data set: what every strategy should lower."""
    with torch.no_grad():
        return masked_bce(model(x), labels, mask).sum().item()


def make_optimizer(model: nn.Module, weighting: TaskWeighting, lr: float = 1e-2) -> torch.optim.Optimizer:
    groups = [{"params": list(model.parameters())}]
    own = list(weighting.parameters())
    if own:
        groups.append({"params": own, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr)


def train(
    weighting: TaskWeighting,
    steps: int = 300,
    seed: int = 0,
    noisy_task: int | None = None,
    loss_scale: Tensor | None = None,
    on_step=None,
) -> tuple[float, float, Toy]:
    torch.manual_seed(seed)
    x, labels, mask = toy_data(seed, noisy_task=noisy_task)
    model = Toy(tasks=labels.shape[1])
    optimizer = make_optimizer(model, weighting)
    start = joint_loss(model, x, labels, mask)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        rows = torch.randint(0, len(x), (64,), generator=g)
        logits = model(x[rows])
        losses = masked_bce(logits, labels[rows], mask[rows])
        if loss_scale is not None:
            losses = losses * loss_scale
        extra = residual_term(torch.sigmoid(logits), labels[rows], mask[rows], [(0, 1, 0.05)])
        optimizer.zero_grad()
        value = weighting.backward(losses, model.shared_params(), extra)
        assert torch.isfinite(value) and not value.requires_grad
        optimizer.step()
        if on_step is not None:
            on_step(weighting)
    return start, joint_loss(model, x, labels, mask), model


def build(kind: str, tasks: int = 3) -> TaskWeighting:
    names = TASKS[:tasks]
    return make_weighting(kind, names, [1.0] * tasks, [1200, 600, 200][:tasks], alpha=1.5)


@pytest.mark.parametrize("kind", WEIGHTING_KINDS)
def test_every_strategy_lowers_the_joint_loss(kind):
    start, end, _ = train(build(kind))
    assert end < 0.6 * start, f"{kind}: joint loss {start:.3f} -> {end:.3f}"


@pytest.mark.parametrize("kind", WEIGHTING_KINDS)
def test_a_task_without_rows_breaks_no_strategy(kind):
    torch.manual_seed(0)
    x, labels, mask = toy_data(0, rows=64)
    mask[:, 2] = False
    model = Toy()
    weighting = build(kind)
    losses = masked_bce(model(x), labels, mask)
    assert losses[2].item() == 0.0
    value = weighting.backward(losses, model.shared_params())
    assert torch.isfinite(value)
    for p in list(model.parameters()) + list(weighting.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert all((p.grad == 0).all() for p in model.heads[2].parameters())
    if isinstance(weighting, UncertaintyWeighting):
        assert weighting.log_vars.grad[2] == 0  # the s_t / 2 term alone would push an absent task's weight up
    if isinstance(weighting, GradNormWeighting):
        assert weighting.task_weights.grad[2] == 0
        assert math.isnan(weighting.initial_losses[2]) and not math.isnan(weighting.initial_losses[0])
    # A batch with no labelled rows at all is a no-op, not an error.
    empty = masked_bce(model(x), labels, torch.zeros_like(mask))
    assert weighting.backward(empty, model.shared_params()).item() == 0.0


def test_uncertainty_learns_lower_weights_for_noisier_tasks():
    weighting = build("uncertainty", tasks=3)
    start, end, _ = train(weighting, noisy_task=1)  # cvr labels are coin flips: its loss stays near log 2
    s = weighting.log_vars.detach()
    assert s.abs().min() > 0.1, f"log variances did not move: {s}"
    weights = weighting.weights()
    torch.testing.assert_close(weights, torch.exp(-s))
    assert weights[1] < weights[0] and weights[1] < weights[2], weights


def test_gradnorm_keeps_weights_positive_summing_to_t_and_damps_a_dominant_task():
    seen = []

    def check(weighting: GradNormWeighting) -> None:
        w = weighting.weights()
        assert (w > 0).all()
        torch.testing.assert_close(w.sum(), torch.tensor(3.0))
        seen.append(w)

    weighting = build("gradnorm")
    # Task 0's loss scaled by 10 has 10x the gradient norm on the shared layer: GradNorm must shrink its weight.
    train(weighting, loss_scale=torch.tensor([10.0, 1.0, 1.0]), on_step=check)
    weighting.renormalise()
    torch.testing.assert_close(weighting.task_weights.detach().sum(), torch.tensor(3.0))
    final = seen[-1]
    assert final[0] < 0.6 and final[0] < final[1] and final[0] < final[2], final


# --- PCGrad -----------------------------------------------------------------------------------------------


def test_pcgrad_removes_the_conflicting_component():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    assert torch.dot(g1, g2) < 0
    p1, p2 = pcgrad_project([g1, g2])
    assert torch.dot(p1, g2).abs() < 1e-6 and torch.dot(p2, g1).abs() < 1e-6
    torch.testing.assert_close(p1, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(p2, torch.tensor([0.0, 1.0]))


def test_pcgrad_leaves_agreeing_gradients_and_shapes_alone():
    g1, g2 = torch.randn(3, 4), torch.randn(3, 4)
    g2 = torch.where((g1 * g2).sum() < 0, -g2, g2)  # make them agree
    g3 = torch.zeros(3, 4)  # an absent task: no NaN from dividing by its zero norm
    out = pcgrad_project([g1, g2, g3], generator=torch.Generator().manual_seed(0))
    for before, after in zip([g1, g2, g3], out, strict=True):
        assert after.shape == before.shape
        torch.testing.assert_close(after, before)


def test_pcgrad_visits_the_other_tasks_in_a_seeded_random_order():
    grads = [torch.randn(6, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    a = pcgrad_project(grads, generator=torch.Generator().manual_seed(3))
    b = pcgrad_project(grads, generator=torch.Generator().manual_seed(3))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)


def _flat(grads) -> Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def test_pcgrad_class_gives_shared_params_the_projected_sum_and_heads_plain_gradients():
    torch.manual_seed(0)
    model = Toy(tasks=2)
    model.heads[1].load_state_dict(model.heads[0].state_dict())
    x = torch.randn(32, 8)
    y = (torch.rand(32) < 0.5).float()
    labels = torch.stack([y, 1 - y], dim=1)  # opposite labels through identical heads: the tasks conflict
    mask = torch.ones(32, 2, dtype=torch.bool)
    shared = model.shared_params()
    losses = masked_bce(model(x), labels, mask)
    per_task = [_flat(torch.autograd.grad(losses[t], shared, retain_graph=True)) for t in range(2)]
    assert torch.dot(per_task[0], per_task[1]) < 0
    expected_shared = sum(pcgrad_project(per_task))
    assert not torch.allclose(expected_shared, per_task[0] + per_task[1])
    # An extra term (residual, ESMM auxiliary) reaches the shared params unprojected.
    extra = 0.3 * (model.bottom[0].weight ** 2).sum()
    expected_shared = expected_shared + _flat(
        torch.autograd.grad(extra, shared, retain_graph=True, materialize_grads=True)
    )
    heads = list(model.heads.parameters())
    expected_heads = torch.autograd.grad(losses.sum(), heads, retain_graph=True)

    weighting = make_weighting("pcgrad", ["ctr", "churn"], [1.0, 1.0], [1, 1])
    value = weighting.backward(losses, shared, extra)
    torch.testing.assert_close(value, (losses.sum() + extra).detach())
    torch.testing.assert_close(_flat(p.grad for p in shared), expected_shared)
    for p, g in zip(heads, expected_heads, strict=True):
        torch.testing.assert_close(p.grad, g)
