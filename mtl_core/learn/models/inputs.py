"""The shared input layer: id embeddings, the projected text embedding, standardised numerics, and the
user-item interaction.

An MLP over concatenated embeddings is poor at learning dot products, yet "does this user's taste match
this item" is the heart of click prediction. So, as in factorisation machines and DLRM, the layer also
hands the architecture the element-wise product of a user-side vector (user, region, age band) and an
item-side vector (item, category, brand, ad, text): summing that product is the dot product.
"""

from __future__ import annotations

import torch
from torch import nn

from mtl_core.learn.examples import CATEGORICAL, ID_FEATURES, NUMERIC, SPACES

USER_SIDE = ("user", "region", "age_band")
ITEM_SIDE = ("item", "category", "brand", "ad")
# Index of the "users" sample space in the space vocabulary (0 is out of vocabulary).
USERS_SPACE_INDEX = SPACES.index("users") + 1


class InputEncoder(nn.Module):
    """Turns a batch of feature tensors into one vector per row.

    Text arrives as a precomputed sentence embedding (frozen encoder, the default) or is computed by the
    fine-tuned encoder inside the joint loss; either way it goes through a trainable projection. Rows
    without text (user rows, items with no title) get a learned "no text" vector instead.
    """

    def __init__(
        self,
        vocab_sizes: dict[str, int],
        id_dim: int,
        text_in: int,
        text_dim: int,
        use_text: bool,
        id_features: tuple[str, ...] = ("user", "item", "ad"),
        word_pooling: bool = False,
    ):
        super().__init__()
        self.names = [name for name in CATEGORICAL if name not in ID_FEATURES or name in id_features]
        self.embeddings = nn.ModuleDict({name: nn.Embedding(vocab_sizes[name], id_dim) for name in self.names})
        for embedding in self.embeddings.values():
            nn.init.normal_(embedding.weight, std=0.05)
        self.use_text = use_text
        self.text_in = text_in if use_text else 0
        # Word vectors ([B, words, text_in]) go through one shared per-word layer with a ReLU before they are
        # averaged, so a word's feature fires where the word (or a synonym) occurs, whatever else the title
        # says; sentence vectors ([B, text_in]) go straight to the projection.
        self.word_layer = nn.Sequential(nn.Linear(text_in, text_dim), nn.ReLU()) if use_text and word_pooling else None
        projection_in = text_dim if self.word_layer is not None else text_in
        self.text_projection = nn.Linear(projection_in, text_dim) if use_text else None
        # Sentence embeddings of short titles share a large common component (per-dimension mean ~0.1 against
        # a spread of ~0.3 between items); standardising each dimension with the training texts' statistics
        # lets the projection see what tells items apart from the first step.
        self.register_buffer("text_mean", torch.zeros(max(text_in, 1)))
        self.register_buffer("text_std", torch.ones(max(text_in, 1)))
        self.no_text = nn.Parameter(torch.zeros(text_dim)) if use_text else None
        self.text_to_item_side = nn.Linear(text_dim, id_dim, bias=False) if use_text else None
        # The numeric features as one more field, so they interact with the embeddings (price x age band).
        self.dense_field = nn.Linear(len(NUMERIC), id_dim)
        n_fields = len(self.names) + 1 + (1 if use_text else 0)
        self.pairs = torch.triu_indices(n_fields, n_fields, offset=1)
        self.output_dim = (
            len(self.names) * id_dim + len(NUMERIC) + id_dim + (text_dim if use_text else 0) + self.pairs.shape[1]
        )

    def set_text_statistics(self, vectors: torch.Tensor) -> None:
        """Per-dimension mean and spread of the training texts' (or words') embeddings (saved with the model)."""
        if vectors.dim() == 3:  # word vectors: the real words, not the padding
            vectors = vectors.reshape(-1, vectors.shape[-1])
            vectors = vectors[vectors.abs().sum(dim=1) > 0]
        if len(vectors) > 1:
            self.text_mean.copy_(vectors.mean(dim=0))
            self.text_std.copy_(vectors.std(dim=0).clamp_min(1e-4))

    def forward(self, batch: dict[str, torch.Tensor], text_embedding: torch.Tensor | None) -> torch.Tensor:
        embedded = {name: self.embeddings[name](batch[name]) for name in self.names}
        if "user" in embedded:
            # Churn rows see no user id embedding: whether a user's embedding got trained by events after
            # the cut-off would tell the model the label. Their history aggregates describe them instead.
            not_users_space = (batch["space"] != USERS_SPACE_INDEX).unsqueeze(1)
            embedded["user"] = embedded["user"] * not_users_space
        user_side = sum(embedded[name] for name in USER_SIDE if name in embedded)
        item_side = sum(embedded[name] for name in ITEM_SIDE if name in embedded)
        parts = [embedded[name] for name in self.names] + [batch["numeric"]]
        fields = [embedded[name] for name in self.names] + [self.dense_field(batch["numeric"])]
        if self.use_text:
            standardised = (text_embedding - self.text_mean) / self.text_std
            if self.word_layer is not None and "word_of" in batch:
                # Packed words (training, TensorData(packed_words=True)): each distinct word of the batch once;
                # the same mean over each text's words as the padded form below.
                per_word = self.word_layer(standardised)[batch["word_of"]]
                pooled = per_word.new_zeros(len(batch["text_words"]), per_word.shape[1])
                pooled = pooled.index_add(0, batch["word_text"], per_word)
                standardised = (pooled / batch["text_words"].clamp_min(1).unsqueeze(1).to(pooled.dtype))[
                    batch["text_row"]
                ]
            elif self.word_layer is not None:
                is_word = (text_embedding.abs().sum(dim=2, keepdim=True) > 0).to(standardised.dtype)
                per_word = self.word_layer(standardised) * is_word
                standardised = per_word.sum(dim=1) / is_word.sum(dim=1).clamp_min(1.0)
                if "text_row" in batch:  # one row per distinct text of the batch: spread them to the rows
                    standardised = standardised[batch["text_row"]]
            projected = self.text_projection(standardised)
            has_text = (batch["text"] > 0).unsqueeze(1)
            text = torch.where(has_text, projected, self.no_text.expand_as(projected))
            parts.append(text)
            text_field = self.text_to_item_side(text)
            item_side = item_side + text_field
            fields.append(text_field)
        parts.append(user_side * item_side)
        # Pairwise dot products of all fields (as in DLRM): every two-way interaction, ready-made.
        stacked = torch.stack(fields, dim=1)
        dots = torch.bmm(stacked, stacked.transpose(1, 2))
        parts.append(dots[:, self.pairs[0], self.pairs[1]])
        return torch.cat(parts, dim=1)
