"""Shared representations per task: shared-bottom, MMoE (Ma et al. 2018), PLE with CGC layers (Tang et al. 2020).

Each takes the input vector [B, D] and returns one representation [B, H] per task.

Experts that read the same input are one matrix product (``Experts``): ten 64-wide experts as one
[D, 640] layer cost one call instead of ten, and the gates of all tasks are one layer too. Training at 1
thread spends most of its time in these layers and in dropout's random numbers (``ReLUDropout``).
"""

from __future__ import annotations

import torch
from torch import nn

# Dropout draws 15-bit uniforms: the drop probability is p rounded to a multiple of 1/32768 (0.1 -> 0.100006).
_LANE_BITS = 15


def _keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Bernoulli(1 - p) per element of ``x`` (bool), four elements per 64-bit draw of torch's generator.

    One Bernoulli draw per element (``nn.Dropout``) took longer at 1 thread than the matrix product before
    it: 5.2 ms for a [1024, 1152] batch against 3.4 ms. The same generator as before, so seeds, checkpoints
    (which store its state) and the distributed ranks' streams work as they did.
    """
    n = x.numel()
    # random_() on int64 fills bits 0-62; bit 63 is 0, so the top lane is masked like the others.
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
    lanes = draws.view(torch.int16).bitwise_and_((1 << _LANE_BITS) - 1)[:n].view(x.shape)
    return lanes >= round(p * (1 << _LANE_BITS))


class _ReLUDropoutFunction(torch.autograd.Function):
    """relu(x) * keep / (1 - p) as x * m, with m = (x > 0) * keep / (1 - p): one mask saved, one product back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        mask = ((x > 0) & _keep_mask(x, p)).to(x.dtype).mul_(1.0 / (1.0 - p))
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


class ReLUDropout(nn.Dropout):
    """ReLU then dropout in one step (training); the plain ReLU in evaluation.

    As two modules they walk the activations more often forward and back (ReLU, dropout's draws, its product,
    then both backward) and keep two tensors for the backward pass; here one mask does both. A training
    step of the default model went from 17.5 to 15.5 ms with it (1 thread, batch 1024).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return torch.relu(x)
        if self.p >= 1:
            return torch.zeros_like(x)
        return _ReLUDropoutFunction.apply(x, self.p)


def mlp(inp: int, out: int, dropout: float) -> nn.Sequential:
    # Index 0 is the linear layer, as when ReLU and dropout were modules of their own: state dicts still match.
    return nn.Sequential(nn.Linear(inp, out), ReLUDropout(dropout))


class Experts(nn.Module):
    """``n`` experts, each ``mlp(inp, dim)``, over the same input as one layer: [B, inp] -> [B, n, dim].

    Expert ``j`` is rows ``j * dim .. (j + 1) * dim`` of the weight, initialised as its own ``nn.Linear`` would
    be (same fan-in). A state dict of the earlier layout (a list of ``mlp``) loads too: models registered
    before the experts were fused stay loadable, servable and warm-startable.
    """

    def __init__(self, inp: int, n: int, dim: int, dropout: float):
        super().__init__()
        self.n, self.dim = n, dim
        self.linear = nn.Linear(inp, n * dim)
        self.activation = ReLUDropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x)).view(-1, self.n, self.dim)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _fuse_legacy(state_dict, prefix + "linear", [f"{prefix}{j}.0" for j in range(self.n)])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _fuse_legacy(state_dict: dict, fused: str, parts: list[str]) -> None:
    """Concatenate the earlier separate layers ``parts`` (weight, bias) into the fused layer ``fused``."""
    if f"{fused}.weight" in state_dict or f"{parts[0]}.weight" not in state_dict:
        return
    for kind in ("weight", "bias"):
        state_dict[f"{fused}.{kind}"] = torch.cat([state_dict.pop(f"{part}.{kind}") for part in parts])


def _mix(groups: list[torch.Tensor], gate_logits: torch.Tensor, spans: list[list[int]]) -> list[torch.Tensor]:
    """Each gate's softmax-weighted sum of the experts it weighs.

    ``groups`` are the experts in groups ([B, n_i, H] each), ``gate_logits`` [B, G, K], and ``spans[g]`` the
    groups gate ``g`` weighs, K experts in all, in its logits' order. A weighted sum per group: at these sizes
    3x faster forward and backward than one batched product of [G, N] x [N, H] per row; and groups made by
    ``split`` (not slices) keep the backward pass from filling a zero tensor of all experts per slice.
    """
    outputs = []
    for weights, span in zip(torch.softmax(gate_logits, dim=2).unbind(dim=1), spans, strict=True):
        parts = weights.split([groups[i].shape[1] for i in span], dim=1)
        mixed = [(part.unsqueeze(2) * groups[i]).sum(dim=1) for part, i in zip(parts, span, strict=True)]
        outputs.append(sum(mixed[1:], mixed[0]))
    return outputs


class SharedBottom(nn.Module):
    def __init__(self, inp: int, n_tasks: int, dim: int, dropout: float):
        super().__init__()
        self.n_tasks = n_tasks
        self.bottom = nn.Sequential(mlp(inp, dim * 2, dropout), mlp(dim * 2, dim, dropout))
        self.output_dim = dim

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        shared = self.bottom(x)
        return [shared] * self.n_tasks

    def last_shared_layer(self) -> nn.Parameter:
        return self.bottom[-1][0].weight


class MMoE(nn.Module):
    """Experts shared by all tasks; each task mixes them with its own softmax gate (one layer for all gates)."""

    def __init__(self, inp: int, n_tasks: int, dim: int, n_experts: int, dropout: float):
        super().__init__()
        self.n_tasks, self.n_experts = n_tasks, n_experts
        self.experts = Experts(inp, n_experts, dim, dropout)
        self.gates = nn.Linear(inp, n_tasks * n_experts)
        self.output_dim = dim

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        gate_logits = self.gates(x).view(-1, self.n_tasks, self.n_experts)
        return _mix([self.experts(x)], gate_logits, [[0]] * self.n_tasks)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _fuse_legacy(state_dict, prefix + "gates", [f"{prefix}gates.{t}" for t in range(self.n_tasks)])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def last_shared_layer(self) -> nn.Parameter:
        return self.experts.linear.weight


class FusedCGC(nn.Module):
    """A customised gate control layer whose tasks all read the same input (PLE's first layer).

    All experts (each task's own, then the shared ones) are one ``Experts`` layer and all gates one linear
    layer; each task's gate weighs its own experts and the shared ones. Same function as ``CGC`` fed one input.
    """

    def __init__(
        self, inp: int, n_tasks: int, dim: int, n_task_experts: int, n_shared: int, dropout: float, last: bool
    ):
        super().__init__()
        self.n_tasks, self.n_task_experts, self.n_shared, self.last = n_tasks, n_task_experts, n_shared, last
        n_all = n_tasks * n_task_experts + n_shared
        self.experts = Experts(inp, n_all, dim, dropout)
        # Gate outputs: each task's (own + shared) weights, then (not in the last layer) the shared gate's over all.
        self.gates = nn.Linear(inp, n_tasks * (n_task_experts + n_shared) + (0 if last else n_all))
        # The experts in groups: each task's own, then the shared ones (group n_tasks). Task t's gate weighs
        # its own group, then the shared one; the shared gate weighs all groups.
        self.group_sizes = [n_task_experts] * n_tasks + [n_shared]
        self.spans = [[t, n_tasks] for t in range(n_tasks)]

    def forward(self, task_inputs: list[torch.Tensor], shared_input: torch.Tensor):
        x = shared_input
        groups = list(self.experts(x).split(self.group_sizes, dim=1))
        gate_logits = self.gates(x)
        per_task = self.n_task_experts + self.n_shared
        task_logits = gate_logits[:, : self.n_tasks * per_task].view(-1, self.n_tasks, per_task)
        if self.last:
            return _mix(groups, task_logits, self.spans), None
        shared_logits = gate_logits[:, self.n_tasks * per_task :].unsqueeze(1)
        everything = list(range(self.n_tasks + 1))
        return _mix(groups, task_logits, self.spans), _mix(groups, shared_logits, [everything])[0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The earlier layout: task_experts.<t>.<j>, shared_experts.<j>, task_gates.<t>, shared_gate.
        experts = [f"{prefix}task_experts.{t}.{j}.0" for t in range(self.n_tasks) for j in range(self.n_task_experts)]
        experts += [f"{prefix}shared_experts.{j}.0" for j in range(self.n_shared)]
        _fuse_legacy(state_dict, prefix + "experts.linear", experts)
        gates = [f"{prefix}task_gates.{t}" for t in range(self.n_tasks)] + (
            [] if self.last else [prefix + "shared_gate"]
        )
        _fuse_legacy(state_dict, prefix + "gates", gates)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def last_shared_layer(self) -> nn.Parameter:
        return self.experts.linear.weight


class CGC(nn.Module):
    """One customised gate control layer: task-specific experts plus shared experts (each task's own input)."""

    def __init__(
        self, inp: int, n_tasks: int, dim: int, n_task_experts: int, n_shared: int, dropout: float, last: bool
    ):
        super().__init__()
        self.n_tasks, self.last = n_tasks, last
        self.task_experts = nn.ModuleList(
            [nn.ModuleList([mlp(inp, dim, dropout) for _ in range(n_task_experts)]) for _ in range(n_tasks)]
        )
        self.shared_experts = nn.ModuleList([mlp(inp, dim, dropout) for _ in range(n_shared)])
        self.task_gates = nn.ModuleList([nn.Linear(inp, n_task_experts + n_shared) for _ in range(n_tasks)])
        # The shared gate feeds the next layer's shared experts; the last layer needs none.
        self.shared_gate = None if last else nn.Linear(inp, n_tasks * n_task_experts + n_shared)

    def forward(self, task_inputs: list[torch.Tensor], shared_input: torch.Tensor):
        shared = [expert(shared_input) for expert in self.shared_experts]
        outputs, all_task = [], []
        for t in range(self.n_tasks):
            own = [expert(task_inputs[t]) for expert in self.task_experts[t]]
            all_task += own
            stacked = torch.stack(own + shared, dim=1)
            weights = torch.softmax(self.task_gates[t](task_inputs[t]), dim=1).unsqueeze(2)
            outputs.append((weights * stacked).sum(dim=1))
        if self.last:
            return outputs, None
        stacked = torch.stack(all_task + shared, dim=1)
        weights = torch.softmax(self.shared_gate(shared_input), dim=1).unsqueeze(2)
        return outputs, (weights * stacked).sum(dim=1)

    def last_shared_layer(self) -> nn.Parameter:
        return self.shared_experts[0][0].weight


class PLE(nn.Module):
    def __init__(self, inp: int, n_tasks: int, dim: int, n_experts: int, n_shared: int, layers: int, dropout: float):
        super().__init__()
        self.n_tasks = n_tasks
        # The first layer's tasks all read the input vector: fused. Later layers read each task's own output.
        self.layers = nn.ModuleList(
            [
                (FusedCGC if i == 0 else CGC)(
                    inp if i == 0 else dim, n_tasks, dim, n_experts, n_shared, dropout, last=i == layers - 1
                )
                for i in range(layers)
            ]
        )
        self.output_dim = dim

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        task_inputs, shared = [x] * self.n_tasks, x
        for layer in self.layers:
            task_inputs, shared = layer(task_inputs, shared)
        return task_inputs

    def last_shared_layer(self) -> nn.Parameter:
        return self.layers[-1].last_shared_layer()
