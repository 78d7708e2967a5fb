"""The examples as tensors: batch assembly by row index, the mixed-task sampler, and batched inference."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mtl_core.learn.examples import Examples, FeatureSpace
from mtl_core.learn.models import MultiTaskModel

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    pass


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor  # [B, T] with NaN where undefined
    drawn_for: torch.Tensor  # [B] which task each row was drawn for
    text: torch.Tensor | None  # [B, dim] text vectors, or [distinct texts, words, dim] word vectors
    text_tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # fine-tuning: ids, mask, inverse

    def to(self, device: torch.device) -> Batch:
        """The batch on ``device`` (a GPU rank's); batches are assembled on the CPU, where the examples live."""
        return Batch(
            inputs={name: tensor.to(device) for name, tensor in self.inputs.items()},
            labels=self.labels.to(device),
            drawn_for=self.drawn_for.to(device),
            text=self.text.to(device) if self.text is not None else None,
            text_tokens=tuple(t.to(device) for t in self.text_tokens) if self.text_tokens is not None else None,
        )


class TensorData:
    """The examples as tensors, and batch assembly by row index."""

    def __init__(
        self,
        examples: Examples,
        space: FeatureSpace,
        texts: np.ndarray | None,
        tokens: dict[str, torch.Tensor] | None = None,
        packed_words: bool = False,
    ):
        encoded = examples.encode(space)
        # A feature with an empty vocabulary (an id the model does not learn) is 0 on every row: batches get
        # zeros instead of a gather per step.
        self.zeros = [name for name, vocab in space.vocabs.items() if len(vocab) == 1 and name in encoded]
        self.inputs = {
            name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in encoded.items() if name not in self.zeros
        }
        self.labels = torch.from_numpy(examples.labels)
        self.texts = torch.from_numpy(texts) if texts is not None else None
        # Fine-tuning: every distinct text tokenised once (row 0: no text); batches encode their own texts.
        self.tokens = tokens
        self.words = self.text_words = None
        if packed_words and self.texts is not None and self.texts.dim() == 3:
            # Word vectors by word: each distinct word vector once, and each text as word ids (-1: padding).
            # A batch then hands the model each of its distinct words once (a few hundred) instead of every
            # text's 16 padded word slots, and the per-word layer runs on those alone.
            real = self.texts.abs().sum(dim=2) > 0
            self.words, ids = torch.unique(self.texts[real], dim=0, return_inverse=True)
            self.text_words = torch.full(real.shape, -1, dtype=torch.int64)
            self.text_words[real] = ids

    def batch(self, rows: np.ndarray, drawn_for: np.ndarray | None = None) -> Batch:
        index = torch.from_numpy(rows)
        inputs = {name: tensor[index] for name, tensor in self.inputs.items()}
        inputs.update({name: torch.zeros(len(rows), dtype=torch.int64) for name in self.zeros})
        text = None
        if self.words is not None:
            unique, inputs["text_row"] = torch.unique(inputs["text"], return_inverse=True)
            ids = self.text_words[unique]  # [distinct texts, words]
            slots = ids >= 0
            words, inputs["word_of"] = torch.unique(ids[slots], return_inverse=True)
            inputs["word_text"] = slots.nonzero()[:, 0]  # which distinct text each word slot belongs to
            inputs["text_words"] = slots.sum(dim=1)
            text = self.words[words]
        elif self.texts is not None and self.texts.dim() == 3:
            # Word vectors are [words, dim] per text: gather each distinct text of the batch once and tell
            # the model which row is which (a batch of 1024 rows holds a few hundred distinct titles).
            unique, inputs["text_row"] = torch.unique(inputs["text"], return_inverse=True)
            text = self.texts[unique]
        elif self.texts is not None:
            text = self.texts[inputs["text"]]
        drawn = torch.from_numpy(drawn_for) if drawn_for is not None else torch.full((len(rows),), -1)
        tokens = None
        if self.tokens is not None:
            unique, inverse = torch.unique(inputs["text"], return_inverse=True)
            tokens = (self.tokens["input_ids"][unique], self.tokens["attention_mask"][unique], inverse)
        return Batch(inputs=inputs, labels=self.labels[index], drawn_for=drawn, text=text, text_tokens=tokens)


class TaskSampler:
    """Draws each batch from all tasks' rows: n_t ** (1 / T) shares (T = 1 is proportional).

    With ``row_weights`` (one array per task, e.g. recency weights), each pass over a task is a weighted
    draw of its rows, as many as the weights sum to: a row of weight 1 is seen about once per pass, one
    of weight 0.25 about every fourth pass. A task's volume is then the sum of its weights.
    """

    def __init__(
        self,
        task_rows: list[np.ndarray],
        batch_size: int,
        temperature: float,
        seed: int,
        row_weights: list[np.ndarray] | None = None,
    ):
        self.task_rows = task_rows
        self.rng = np.random.default_rng(seed)
        self.draw_p = None
        if row_weights is not None:
            self.draw_p = [w / w.sum() if len(w) and w.sum() > 0 else None for w in row_weights]
            volume = np.array([float(w.sum()) for w in row_weights], dtype=np.float64)
        else:
            volume = np.array([len(rows) for rows in task_rows], dtype=np.float64)
        self.volume = volume
        share = np.where(volume > 0, volume ** (1.0 / temperature), 0.0)
        self.share = share / share.sum()
        raw = self.share * batch_size
        counts = np.floor(raw).astype(int)
        # Largest remainders fill the batch; every task with data gets at least one row per batch.
        for i in np.argsort(-(raw - counts))[: batch_size - counts.sum()]:
            counts[i] += 1
        counts[(counts == 0) & (volume > 0)] = 1
        self.counts = counts
        self.order = [self._pass(t) for t in range(len(task_rows))]
        self.position = [0] * len(task_rows)

    def _pass(self, t: int) -> np.ndarray:
        """The order of one pass over task t's rows: a permutation, or a weighted draw of them."""
        rows = self.task_rows[t]
        if self.draw_p is None or self.draw_p[t] is None:
            return self.rng.permutation(rows)
        return self.rng.choice(rows, size=max(1, round(self.volume[t])), p=self.draw_p[t])

    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        rows, drawn_for = [], []
        for t, count in enumerate(self.counts):
            if count == 0:
                continue
            taken = []
            while count > 0:
                order, pos = self.order[t], self.position[t]
                chunk = order[pos : pos + count]
                taken.append(chunk)
                count -= len(chunk)
                self.position[t] = pos + len(chunk)
                if self.position[t] >= len(order):  # one pass over this task's rows done: reshuffle
                    self.order[t] = self._pass(t)
                    self.position[t] = 0
            chunk = np.concatenate(taken)
            rows.append(chunk)
            drawn_for.append(np.full(len(chunk), t))
        return np.concatenate(rows), np.concatenate(drawn_for)

    def state_dict(self) -> dict[str, Any]:
        # Tensors, not numpy arrays: checkpoints load with torch.load(weights_only=True), which builds no
        # numpy objects.
        order = [torch.from_numpy(np.ascontiguousarray(rows)) for rows in self.order]
        return {"rng": self.rng.bit_generator.state, "order": order, "position": list(self.position)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order = [rows.numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows) for rows in state["order"]]
        self.position = list(state["position"])


@torch.inference_mode()
def predict(model: MultiTaskModel, data: TensorData, rows: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Probabilities [len(rows), T] (each task's own head; cvr is p(buy | click)).

    The model's mode is restored afterwards, not set: a served model stays in eval mode throughout, so
    concurrent requests never see another request's switch to training mode (dropout on)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = (data.batch(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size))
    out = [
        torch.sigmoid(model(b.inputs, b.text, b.text_tokens)).cpu()
        for b in (b if device.type == "cpu" else b.to(device) for b in batches)
    ]
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, len(model.task_names)), dtype=np.float32)
