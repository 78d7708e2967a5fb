"""The joint model: shared input encoder -> shared architecture -> one tower (head) per task."""

from __future__ import annotations

import torch
from torch import nn

from mtl_core.config import ModelSettings
from mtl_core.learn.models.architectures import PLE, MMoE, SharedBottom, mlp

IDENTITY_BLEND = torch.tensor([[1.0, 0.0, 0.0]])


class MultiTaskModel(nn.Module):
    """Returns one logit per task for every row; the loss only looks at the tasks a row has labels for.

    With ``esmm`` the pair (ctr, cvr) is chained as in ESMM (Ma et al. 2018): besides each task's own
    loss, p(click and buy) = p(click) * p(buy | click) is trained over all impressions, so the sparse cvr
    head also learns from every impression, not only from clicked ones.
    """

    def __init__(
        self,
        vocab_sizes: dict[str, int],
        task_names: list[str],
        settings: ModelSettings,
        text_in: int,
        use_text: bool,
        text_encoder: nn.Module | None = None,
        word_pooling: bool = False,
    ):
        super().__init__()
        # Only when the text encoder is fine-tuned inside the joint loss; a frozen one lives outside.
        self.text_encoder = text_encoder
        from mtl_core.learn.models.inputs import InputEncoder

        self.task_names = list(task_names)
        self.settings = settings
        self.inputs = InputEncoder(
            vocab_sizes,
            settings.id_dim,
            text_in,
            settings.text_dim,
            use_text,
            tuple(settings.id_features),
            word_pooling,
        )
        inp, n = self.inputs.output_dim, len(task_names)
        if settings.architecture == "shared_bottom":
            self.shared = SharedBottom(inp, n, settings.expert_dim, settings.dropout)
        elif settings.architecture == "mmoe":
            self.shared = MMoE(inp, n, settings.expert_dim, settings.experts, settings.dropout)
        else:
            self.shared = PLE(
                inp,
                n,
                settings.expert_dim,
                settings.experts,
                settings.shared_experts,
                settings.ple_layers,
                settings.dropout,
            )
        self.towers = nn.ModuleList(
            [
                nn.Sequential(
                    mlp(self.shared.output_dim, settings.tower_dim, settings.dropout), nn.Linear(settings.tower_dim, 1)
                )
                for _ in task_names
            ]
        )
        # One read-out per transfer pair whose tasks both exist; zero-initialised, so training starts from
        # the towers alone and the target learns how much of the source's tower to use.
        self.transfer_pairs = [
            (self.task_names.index(source), self.task_names.index(target))
            for source, target in settings.transfer
            if source in self.task_names and target in self.task_names and source != target
        ]
        self.transfers = nn.ModuleList([nn.Linear(settings.tower_dim, 1, bias=False) for _ in self.transfer_pairs])
        for readout in self.transfers:
            nn.init.zeros_(readout.weight)
        # (own, source, bias) weights per pair: the identity while training; fit_transfer_blend sets them on the
        # validation split after training.
        if settings.transfer_blend and self.transfer_pairs:
            self.register_buffer("transfer_blend", IDENTITY_BLEND.repeat(len(self.transfer_pairs), 1))
        else:
            self.transfer_blend = None
        first, second = settings.esmm_pair
        self.esmm_pair = (
            (self.task_names.index(first), self.task_names.index(second))
            if settings.esmm and first in self.task_names and second in self.task_names
            else None
        )

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        text_embedding: torch.Tensor | None = None,
        text_tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if text_tokens is not None and self.text_encoder is not None:
            input_ids, attention_mask, inverse = text_tokens
            text_embedding = self.text_encoder(input_ids, attention_mask)[inverse]
        x = self.inputs(batch, text_embedding)
        representations = self.shared(x)
        hidden = [tower[0](h) for tower, h in zip(self.towers, representations, strict=True)]
        logits = [tower[1](h) for tower, h in zip(self.towers, hidden, strict=True)]
        for (source, target), readout in zip(self.transfer_pairs, self.transfers, strict=True):
            # The target reads the source's tower but does not train it: the small tasks' gradients in the
            # ctr tower pull it towards their noise, and what they read from it gets worse with it.
            logits[target] = logits[target] + readout(hidden[source].detach())
        if self.transfer_blend is not None and not self.training:
            # Scoring only: the blend is the identity while training, and leaving it out of the training graph
            # keeps training bit-for-bit what it is without it (extra ops shift the float rounding and, over
            # thousands of steps, the whole trajectory, as a new seed would).
            sources = [logits[source].detach() for source, _ in self.transfer_pairs]  # before any is blended
            for (_, target), source_logit, (own, weight, bias) in zip(
                self.transfer_pairs, sources, self.transfer_blend, strict=True
            ):
                logits[target] = own * logits[target] + weight * source_logit + bias
        return torch.cat(logits, dim=1)

    @torch.no_grad()
    def reset_transfer_blend(self) -> None:
        """Back to each target's own logit (what training sees)."""
        if self.transfer_blend is not None:
            self.transfer_blend.copy_(IDENTITY_BLEND.expand_as(self.transfer_blend))

    def shared_parameters(self) -> list[nn.Parameter]:
        """What every task's gradient flows through: the input encoder and the shared architecture."""
        modules = [self.inputs, self.shared] + ([self.text_encoder] if self.text_encoder is not None else [])
        return [p for module in modules for p in module.parameters() if p.requires_grad]

    def last_shared_layer(self) -> nn.Parameter:
        return self.shared.last_shared_layer()


# The name the training and scoring code builds models by; the constructor takes exactly its arguments.
build_model = MultiTaskModel
