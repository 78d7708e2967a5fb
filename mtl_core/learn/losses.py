"""Per-task losses over mixed batches, the cross-task residual term, and task weighting strategies.

A batch mixes rows sampled for different tasks (each task has its own sample space), so every loss here is
masked: ``mask[b, t]`` says whether row ``b`` carries a label for task ``t``. A task without rows in a batch
gets a loss of exactly 0 whose gradient is 0; the weighting strategies treat such a task as absent from
that step (no gradient norm, no projection, no uncertainty regulariser) instead of letting it pull on the
model or on its own weight.

A strategy owns the backward pass, because GradNorm and PCGrad need per-task gradients rather than one
``loss.backward()``. The training loop is the same for all of them::

    optimizer.zero_grad()
    weighting.backward(task_losses, shared_params, extra)
    optimizer.step()

with ``weighting.parameters()`` in the optimizer (best in a group with ``weight_decay=0``: decaying a log
variance or a GradNorm weight towards 0 is a pull nobody asked for).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_core.errors import MtlError

WEIGHTING_KINDS = ("fixed", "inverse_volume", "uncertainty", "gradnorm", "pcgrad")

# GradNorm weights are clamped to this before renormalising, so a weight pushed below 0 stays positive.
_MIN_GRADNORM_WEIGHT = 1e-3


class LossSettingsError(MtlError, ValueError):
    """A weighting kind, weight list or residual pair is wrong; the message says what is allowed."""


def masked_bce(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Per-task mean binary cross-entropy over the rows that carry the task's label.

    Returns ``Tensor[T]``. Rows outside the mask are replaced before the loss (not multiplied by 0
    afterwards), so NaN labels or non-finite logits there cannot leak NaN into the value or the gradient.
    A task with no rows gets 0 (0 / max(count, 1)) and a zero gradient.
    """
    mask = mask.bool()
    zeros = torch.zeros_like(logits)
    safe_logits = torch.where(mask, logits, zeros)
    safe_labels = torch.where(mask, labels.to(logits.dtype), zeros)
    # binary_cross_entropy_with_logits uses the log-sum-exp form: stable for logits of any size.
    per_row = F.binary_cross_entropy_with_logits(safe_logits, safe_labels, reduction="none")
    per_row = torch.where(mask, per_row, zeros)
    counts = mask.sum(dim=0).clamp(min=1).to(logits.dtype)
    return per_row.sum(dim=0) / counts


def residual_term(probs: Tensor, labels: Tensor, mask: Tensor, pairs: Sequence[tuple[int, int, float]]) -> Tensor:
    """``sum_ij lambda_ij * mean over rows with both labels i and j of (y_i - yhat_j)^2``, a scalar.

    Ties task ``j``'s prediction to task ``i``'s label where both are observed (the design's cross-task
    residual). A pair without such rows in the batch adds 0; no pairs gives a plain 0 tensor.
    """
    mask = mask.bool()
    total = probs.new_zeros(())
    for i, j, weight in pairs:
        both = mask[:, i] & mask[:, j]
        target = torch.where(both, labels[:, i].to(probs.dtype), torch.zeros_like(probs[:, j]))
        pred = torch.where(both, probs[:, j], torch.zeros_like(probs[:, j]))
        squared = (target - pred) ** 2  # 0 on rows outside `both`
        total = total + weight * squared.sum() / both.sum().clamp(min=1).to(probs.dtype)
    return total


def resolve_pairs(pairs: Sequence[tuple[str, str, float]], task_names: Sequence[str]) -> list[tuple[int, int, float]]:
    """Turn the configured ``(task_i, task_j, lambda)`` names into column indices for ``residual_term``."""
    index = {name: k for k, name in enumerate(task_names)}
    resolved = []
    for i, j, weight in pairs:
        unknown = [name for name in (i, j) if name not in index]
        if unknown:
            raise LossSettingsError(
                f"setting 'train.residual_pairs': unknown task {unknown[0]!r} in pair ({i}, {j}, {weight}); "
                f"tasks are {', '.join(task_names)}"
            )
        if weight < 0:
            raise LossSettingsError(f"setting 'train.residual_pairs': weight of ({i}, {j}) must be >= 0, got {weight}")
        resolved.append((index[i], index[j], float(weight)))
    return resolved


class TaskWeighting(nn.Module):
    """How the per-task losses become one training signal; subclasses own the backward pass."""

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__()
        if not task_names:
            raise LossSettingsError("task weighting needs at least one task")
        self.task_names = list(task_names)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def weights(self) -> Tensor:
        """The current lambdas, ``Tensor[T]``, detached (for logging)."""
        raise NotImplementedError

    def backward(
        self,
        task_losses: Tensor,
        shared_params: Sequence[nn.Parameter],
        extra: Tensor | None = None,
        present: Tensor | None = None,
    ) -> Tensor:
        """Accumulate into ``.grad`` the gradients of the weighted joint loss plus ``extra`` (unweighted).

        ``present`` (``Tensor[T]`` bool) says which tasks had rows in the batch; by default a task whose
        loss is exactly 0 counts as absent. Returns ``sum_t lambda_t L_t + extra``, detached.
        """
        raise NotImplementedError

    def _check(self, task_losses: Tensor, present: Tensor | None) -> Tensor:
        if task_losses.shape != (self.num_tasks,):
            raise ValueError(
                f"expected {self.num_tasks} task losses ({', '.join(self.task_names)}), "
                f"got shape {tuple(task_losses.shape)}"
            )
        if present is None:
            return task_losses.detach() != 0
        return present.to(device=task_losses.device, dtype=torch.bool)

    def extra_repr(self) -> str:
        return f"tasks={self.task_names}"


def _plus(value: Tensor, extra: Tensor | None) -> Tensor:
    return value if extra is None else value + extra


def _backward_if_needed(total: Tensor) -> None:
    # All tasks absent and no extra: nothing depends on a parameter, and backward() would raise.
    if total.requires_grad:
        total.backward()


class _StaticWeighting(TaskWeighting):
    """Constant lambdas: a weighted sum and one ordinary backward pass."""

    def __init__(self, task_names: Sequence[str], lambdas: Sequence[float]) -> None:
        super().__init__(task_names)
        if len(lambdas) != len(task_names):
            raise LossSettingsError(f"got {len(lambdas)} weights for {len(task_names)} tasks")
        self.register_buffer("lambdas", torch.tensor([float(x) for x in lambdas]))

    def weights(self) -> Tensor:
        return self.lambdas.detach().clone()

    def backward(
        self,
        task_losses: Tensor,
        shared_params: Sequence[nn.Parameter],
        extra: Tensor | None = None,
        present: Tensor | None = None,
    ) -> Tensor:
        self._check(task_losses, present)
        total = _plus((self.lambdas.to(task_losses) * task_losses).sum(), extra)
        _backward_if_needed(total)
        return total.detach()


class FixedWeighting(_StaticWeighting):
    """The configured ``TaskSpec.weight`` of each task."""


class InverseVolumeWeighting(_StaticWeighting):
    """``lambda_t ∝ 1 / n_t``, normalised to sum to T, so small tasks are not drowned by large ones.

    Each ``L_t`` is already a per-task mean, so this deliberately shifts the balance towards small tasks
    beyond what their batch share gives them.
    """

    def __init__(self, task_names: Sequence[str], task_volumes: Sequence[int]) -> None:
        if len(task_volumes) != len(task_names):
            raise LossSettingsError(f"got {len(task_volumes)} data volumes for {len(task_names)} tasks")
        empty = [name for name, n in zip(task_names, task_volumes, strict=True) if n <= 0]
        if empty:
            raise LossSettingsError(f"inverse_volume weighting needs data for every task; none for {', '.join(empty)}")
        inverse = [1.0 / n for n in task_volumes]
        scale = len(inverse) / sum(inverse)
        super().__init__(task_names, [x * scale for x in inverse])


class UncertaintyWeighting(TaskWeighting):
    """Homoscedastic uncertainty (Kendall, Gal & Cipolla 2018), classification form.

    Learns ``s_t = log sigma_t^2`` and minimises ``sum_t exp(-s_t) L_t + s_t / 2``: the paper's
    ``L / sigma^2 + log sigma`` for a softmax/Bernoulli likelihood (the regression form would halve the
    first term). At the optimum ``exp(-s_t) = 1 / (2 L_t)``: a noisier, higher-loss task gets a lower weight.
    An absent task contributes neither term, otherwise ``s_t / 2`` alone would drive its weight up.
    """

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__(task_names)
        self.log_vars = nn.Parameter(torch.zeros(len(task_names)))

    def weights(self) -> Tensor:
        return torch.exp(-self.log_vars.detach())

    def backward(
        self,
        task_losses: Tensor,
        shared_params: Sequence[nn.Parameter],
        extra: Tensor | None = None,
        present: Tensor | None = None,
    ) -> Tensor:
        present = self._check(task_losses, present)
        s = self.log_vars.to(task_losses)
        weighted = torch.exp(-s) * task_losses
        objective = _plus(torch.where(present, weighted + s / 2, torch.zeros_like(s)).sum(), extra)
        _backward_if_needed(objective)
        return _plus(weighted.sum(), extra).detach()


def _trainable_unique(params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    """Shared parameters that can receive a gradient (frozen encoder layers are skipped), each once."""
    seen: set[int] = set()
    out = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    if not out:
        raise ValueError("this weighting needs the model's shared parameters; none (trainable) were given")
    return out


def _flat_grad(loss: Tensor, params: Sequence[Tensor]) -> Tensor:
    """``d loss / d params`` as one flat vector (zeros where a parameter is not reached), graph retained."""
    if not loss.requires_grad:
        return torch.cat([torch.zeros_like(p).reshape(-1) for p in params])
    grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params, strict=True)]
    )


class GradNormWeighting(TaskWeighting):
    """GradNorm (Chen et al. 2018): learn weights that balance the tasks' gradient norms on shared weights.

    ``G_t = ||grad_W (w_t L_t)|| = w_t ||grad_W L_t||`` on ``W``, the last matrix of ``shared_params``
    (pass them in forward order; a trailing bias is skipped, as the paper uses the last shared layer's
    weights). With inverse training rates ``r_t = (L_t / L_t(0)) / mean`` the weights minimise
    ``sum_t |G_t - G_mean * r_t^alpha|`` with the target held constant; the model gets the gradient of
    ``sum_t w_t L_t`` with the weights held constant. ``L_t(0)`` is a task's first non-zero loss (a task may
    be absent from the first batch). Weights stay positive and are renormalised to sum to T before each
    use, i.e. after every optimizer step; ``weights()`` always reports the normalised values.
    """

    def __init__(self, task_names: Sequence[str], alpha: float = 1.5) -> None:
        super().__init__(task_names)
        if alpha < 0:
            raise LossSettingsError(f"gradnorm alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.task_weights = nn.Parameter(torch.ones(len(task_names)))
        # Kept in the state dict so a resumed run measures training rates from the same start.
        self.register_buffer("initial_losses", torch.full((len(task_names),), math.nan))

    def _normalised(self, w: Tensor) -> Tensor:
        w = w.clamp(min=_MIN_GRADNORM_WEIGHT)
        return w * (self.num_tasks / w.sum())

    def weights(self) -> Tensor:
        return self._normalised(self.task_weights.detach())

    @torch.no_grad()
    def renormalise(self) -> None:
        """Clamp the weights positive and rescale them to sum to T (in place)."""
        self.task_weights.copy_(self._normalised(self.task_weights))

    def backward(
        self,
        task_losses: Tensor,
        shared_params: Sequence[nn.Parameter],
        extra: Tensor | None = None,
        present: Tensor | None = None,
    ) -> Tensor:
        present = self._check(task_losses, present)
        self.renormalise()
        last = _last_matrix(_trainable_unique(shared_params))
        w = self.task_weights.to(task_losses)
        idx = present.nonzero().flatten().tolist()
        if idx:
            losses = task_losses.detach()
            start = self.initial_losses
            first = present.to(start.device) & torch.isnan(start)
            start[first] = losses.to(start)[first]
            norms = torch.stack([_flat_grad(task_losses[t], [last]).norm() for t in idx]).detach()
            norms = norms.to(w.dtype)
            grad_norms = w[idx] * norms
            rates = losses[idx] / start.to(losses)[idx]
            inverse_rates = rates / rates.mean()
            target = (grad_norms.detach().mean() * inverse_rates**self.alpha).detach()
            balance = (grad_norms - target).abs().sum()
            (grad_w,) = torch.autograd.grad(balance, self.task_weights)
            self.task_weights.grad = grad_w if self.task_weights.grad is None else self.task_weights.grad + grad_w
        weighted = (w.detach() * task_losses).sum()
        total = _plus(weighted, extra)
        _backward_if_needed(total)
        return total.detach()


def _last_matrix(params: Sequence[nn.Parameter]) -> nn.Parameter:
    for p in reversed(params):
        if p.dim() >= 2:
            return p
    return params[-1]


def pcgrad_project(grads: Sequence[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
    """PCGrad's gradient surgery (Yu et al. 2020, Algorithm 1) on per-task gradients of the same shape.

    For each ``g_i``, visiting the other tasks in random order, a conflict with the original ``g_j``
    (negative dot product) is removed by projecting onto ``g_j``'s normal plane:
    ``g_i -= (g_i . g_j) / ||g_j||^2 * g_j``. Branch-free, so it never forces a device sync.
    """
    flat = [g.reshape(-1) for g in grads]
    projected = []
    for i, g_i in enumerate(flat):
        g = g_i.clone()
        order = torch.randperm(len(flat), generator=generator).tolist()
        for j in order:
            if j == i:
                continue
            g_j = flat[j]
            conflict = torch.dot(g, g_j).clamp(max=0)  # 0 unless they conflict
            g = g - conflict / torch.dot(g_j, g_j).clamp(min=torch.finfo(g_j.dtype).tiny) * g_j
        projected.append(g.view_as(grads[i]))
    return projected


class PCGradWeighting(_StaticWeighting):
    """PCGrad on the shared parameters; task-specific parameters get their plain gradients.

    Per-task gradients are those of ``lambda_t L_t`` with the configured fixed lambdas (1 by default, i.e.
    plain ``L_t``); the shared parameters receive the sum of the projected ones plus ``extra``'s own
    gradient (not projected: it is not a task). Absent tasks are left out of the surgery.
    """

    def __init__(
        self,
        task_names: Sequence[str],
        lambdas: Sequence[float] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(task_names, [1.0] * len(task_names) if lambdas is None else list(lambdas))
        # None: torch's global RNG, which the trainer seeds.
        self.generator = generator

    def backward(
        self,
        task_losses: Tensor,
        shared_params: Sequence[nn.Parameter],
        extra: Tensor | None = None,
        present: Tensor | None = None,
    ) -> Tensor:
        present = self._check(task_losses, present)
        shared = _trainable_unique(shared_params)
        weighted = self.lambdas.to(task_losses) * task_losses
        idx = present.nonzero().flatten().tolist()
        surgery = torch.cat([torch.zeros_like(p).reshape(-1) for p in shared])
        if idx:
            surgery = sum(pcgrad_project([_flat_grad(weighted[t], shared) for t in idx], self.generator))
        if extra is not None:
            surgery = surgery + _flat_grad(extra, shared)
        before = [None if p.grad is None else p.grad.clone() for p in shared]
        total = _plus(weighted.sum(), extra)
        # One ordinary pass gives the task heads (and every non-shared parameter) their plain gradients;
        # the shared parameters' plain gradients from it are then replaced by the surgery's result.
        _backward_if_needed(total)
        for p, old, chunk in zip(shared, before, surgery.split([p.numel() for p in shared]), strict=True):
            chunk = chunk.view_as(p).to(p.dtype)
            p.grad = chunk if old is None else old + chunk
        return total.detach()


def make_weighting(
    kind: str,
    task_names: Sequence[str],
    fixed_weights: Sequence[float],
    task_volumes: Sequence[int],
    alpha: float = 1.5,
) -> TaskWeighting:
    """Build the strategy named by ``train.weighting`` for the configured tasks.

    ``fixed_weights`` (``TaskSpec.weight``) are used by ``fixed`` and ``pcgrad``; ``task_volumes`` (training
    rows per task) by ``inverse_volume``; ``alpha`` (``train.gradnorm_alpha``) by ``gradnorm``.
    """
    if kind == "fixed":
        return FixedWeighting(task_names, fixed_weights)
    if kind == "inverse_volume":
        return InverseVolumeWeighting(task_names, task_volumes)
    if kind == "uncertainty":
        return UncertaintyWeighting(task_names)
    if kind == "gradnorm":
        return GradNormWeighting(task_names, alpha=alpha)
    if kind == "pcgrad":
        return PCGradWeighting(task_names, fixed_weights)
    raise LossSettingsError(f"unknown task weighting {kind!r}; allowed: {', '.join(WEIGHTING_KINDS)}")
