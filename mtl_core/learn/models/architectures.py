"""Shared representations per task: shared-bottom, MMoE (Ma et al. 2018), PLE with CGC layers (Tang et al. 2020).

Each takes the input vector [B, D] and returns one representation [B, H] per task.
"""

from __future__ import annotations

import torch
from torch import nn


def mlp(inp: int, out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, out), nn.ReLU(), nn.Dropout(dropout))


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
    """Experts shared by all tasks; each task mixes them with its own softmax gate."""

    def __init__(self, inp: int, n_tasks: int, dim: int, n_experts: int, dropout: float):
        super().__init__()
        self.experts = nn.ModuleList([mlp(inp, dim, dropout) for _ in range(n_experts)])
        self.gates = nn.ModuleList([nn.Linear(inp, n_experts) for _ in range(n_tasks)])
        self.output_dim = dim

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        experts = torch.stack([expert(x) for expert in self.experts], dim=1)  # [B, E, H]
        outputs = []
        for gate in self.gates:
            weights = torch.softmax(gate(x), dim=1).unsqueeze(2)  # [B, E, 1]
            outputs.append((weights * experts).sum(dim=1))
        return outputs

    def last_shared_layer(self) -> nn.Parameter:
        return self.experts[0][0].weight


class CGC(nn.Module):
    """One customised gate control layer: task-specific experts plus shared experts."""

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


class PLE(nn.Module):
    def __init__(self, inp: int, n_tasks: int, dim: int, n_experts: int, n_shared: int, layers: int, dropout: float):
        super().__init__()
        self.n_tasks = n_tasks
        self.layers = nn.ModuleList(
            [
                CGC(inp if i == 0 else dim, n_tasks, dim, n_experts, n_shared, dropout, last=i == layers - 1)
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
        return self.layers[-1].shared_experts[0][0].weight
