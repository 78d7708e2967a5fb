"""Joint multi-task training: AdamW, warm-up + decay schedule, mixed-task batches, early stopping.

The loop, in one sitting:

1. Build the examples of the snapshot and fit (or, for a warm start, extend) the feature space on the
   training split. Text embeddings come from the on-disk cache (each distinct text encoded once).
2. Every step draws one batch from all tasks' training rows (proportional or temperature sampling, so a
   small task is not drowned by the feed), computes each task's loss on the rows drawn for it, adds the
   ESMM and cross-task residual terms, and lets the task weighting strategy turn that into gradients.
3. A few times per epoch the model is scored on the validation split; the best checkpoint by the early
   stopping criterion is kept, and training stops after ``patience`` evaluations without improvement.
4. The best weights, the feature space and the settings are written to the model directory.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mtl_core.config import Settings, TaskSpec
from mtl_core.errors import MtlError
from mtl_core.features import Examples, FeatureSpace, build_examples, frame_examples, split_summary
from mtl_core.losses import make_weighting, masked_bce, residual_term, resolve_pairs
from mtl_core.metrics import fit_logistic, task_metrics
from mtl_core.models import MultiTaskModel, build_model

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from mtl_core.text import EmbeddingCache

MODEL_FILE = "model.pt"
FEATURES_FILE = "features.json"
SETTINGS_FILE = "settings.json"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"


class TrainingError(MtlError):
    pass


# --------------------------------------------------------------------------------------------------
# Text embeddings for the examples (frozen encoder) or the encoder itself (fine-tuning).
def text_matrix(
    texts: list[str], settings: Settings, cache_dir: Path, progress: bool = True, encoder: torch.nn.Module | None = None
) -> np.ndarray:
    """Row 0 (no text) is zeros and replaced by a learned vector in the model.

    ``text.pooling`` "sentence": [len(texts) + 1, dim], one vector per text. "words": [len(texts) + 1,
    max_words, dim], one vector per word, zero rows after the last word (the model's padding mask).
    A frozen encoder's vectors come from the on-disk cache; a fine-tuned encoder (``encoder``) embeds the
    texts itself, since its vectors change as it trains.
    """
    from mtl_core.text import EmbeddingCache, encoder_from_settings

    if encoder is not None:
        vectors, dim = encoder.encode(texts, batch_size=settings.text.batch_size, progress=progress), encoder.dim
    else:
        frozen = encoder_from_settings(settings.text)
        cache = EmbeddingCache(cache_dir, frozen)
        if uses_word_vectors(settings):
            return _word_matrix(texts, settings, cache, frozen.dim, progress)
        vectors, dim = cache.get(texts, progress=progress, batch_size=settings.text.batch_size), frozen.dim
    return np.vstack([np.zeros((1, dim), dtype=np.float32), np.asarray(vectors, dtype=np.float32)])


def _word_matrix(
    texts: list[str], settings: Settings, cache: EmbeddingCache, dim: int, progress: bool
) -> np.ndarray:
    """[len(texts) + 1, max_words, dim]: each distinct word's vector from the cache, zero rows as padding."""
    from mtl_core.text import split_words

    limit = settings.text.max_words
    words = [split_words(text) for text in texts]
    longer = [text_words for text_words in words if len(text_words) > limit]
    if longer:
        log.warning(
            "%d of %d texts have more than text.max_words = %d words (the longest %d); the words after the %dth "
            "are ignored", len(longer), len(texts), limit, max(map(len, longer)), limit,
        )  # fmt: skip
        words = [text_words[:limit] for text_words in words]
    vocabulary = sorted({word for text_words in words for word in text_words})
    word_vectors = np.asarray(
        cache.get(vocabulary, progress=progress, batch_size=settings.text.batch_size), dtype=np.float32
    ).reshape(len(vocabulary), dim)
    index = {word: i for i, word in enumerate(vocabulary)}
    out = np.zeros((len(texts) + 1, settings.text.max_words, dim), dtype=np.float32)
    for row, text_words in enumerate(words, start=1):
        if text_words:
            out[row, : len(text_words)] = word_vectors[[index[word] for word in text_words]]
    return out


def uses_word_vectors(settings: Settings) -> bool:
    """Whether texts reach the model as word vectors (a fine-tuned encoder always embeds whole texts)."""
    return settings.text.pooling == "words" and settings.text.finetune == "frozen"


def finetuned_encoder(settings: Settings) -> torch.nn.Module | None:
    """The text encoder trained inside the joint loss (``top_k`` or ``full``), or None when it is frozen."""
    if not settings.text.enabled or settings.text.finetune == "frozen":
        return None
    from mtl_core.text import TextEncoder

    t = settings.text
    return TextEncoder(t.model_path or None, max_length=t.max_length, finetune=t.finetune, top_k=t.top_k)


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor  # [B, T] with NaN where undefined
    drawn_for: torch.Tensor  # [B] which task each row was drawn for
    text: torch.Tensor | None  # [B, dim] text vectors, or [distinct texts, words, dim] word vectors
    text_tokens: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # fine-tuning: ids, mask, inverse


class TensorData:
    """The examples as tensors, and batch assembly by row index."""

    def __init__(
        self,
        examples: Examples,
        space: FeatureSpace,
        texts: np.ndarray | None,
        tokens: dict[str, torch.Tensor] | None = None,
    ):
        encoded = examples.encode(space)
        self.inputs = {name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in encoded.items()}
        self.labels = torch.from_numpy(examples.labels)
        self.texts = torch.from_numpy(texts) if texts is not None else None
        # Fine-tuning: every distinct text tokenised once (row 0: no text); batches encode their own texts.
        self.tokens = tokens

    def batch(self, rows: np.ndarray, drawn_for: np.ndarray | None = None) -> Batch:
        index = torch.from_numpy(rows)
        inputs = {name: tensor[index] for name, tensor in self.inputs.items()}
        text = None
        if self.texts is not None and self.texts.dim() == 3:
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
    """Draws each batch from all tasks' rows: n_t ** (1 / T) shares (T = 1 is proportional)."""

    def __init__(self, task_rows: list[np.ndarray], batch_size: int, temperature: float, seed: int):
        self.task_rows = task_rows
        self.rng = np.random.default_rng(seed)
        volume = np.array([len(rows) for rows in task_rows], dtype=np.float64)
        share = np.where(volume > 0, volume ** (1.0 / temperature), 0.0)
        self.share = share / share.sum()
        raw = self.share * batch_size
        counts = np.floor(raw).astype(int)
        # Largest remainders fill the batch; every task with data gets at least one row per batch.
        for i in np.argsort(-(raw - counts))[: batch_size - counts.sum()]:
            counts[i] += 1
        counts[(counts == 0) & (volume > 0)] = 1
        self.counts = counts
        self.order = [self.rng.permutation(rows) for rows in task_rows]
        self.position = [0] * len(task_rows)

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
                    self.order[t] = self.rng.permutation(self.task_rows[t])
                    self.position[t] = 0
            chunk = np.concatenate(taken)
            rows.append(chunk)
            drawn_for.append(np.full(len(chunk), t))
        return np.concatenate(rows), np.concatenate(drawn_for)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order, self.position = state["order"], state["position"]


def _schedule(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "cosine":
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))
        if kind == "linear":
            return max(0.05, 1.0 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def joint_losses(
    model: MultiTaskModel, batch: Batch, residual_pairs: list[tuple[int, int, float]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-task losses on the rows drawn for each task, the unweighted extra terms (ESMM, residual), and
    which tasks had rows in the batch."""
    logits = model(batch.inputs, batch.text, batch.text_tokens)
    n_tasks = logits.shape[1]
    defined = ~torch.isnan(batch.labels)
    labels = torch.nan_to_num(batch.labels, nan=0.0)
    drawn = batch.drawn_for.unsqueeze(1) == torch.arange(n_tasks).unsqueeze(0)
    task_mask = drawn & defined
    task_losses = masked_bce(logits, labels, task_mask)
    extra = logits.new_zeros(())
    if model.esmm_pair is not None:
        first, second = model.esmm_pair
        # ESMM: over every row drawn for the first task, p(first) * p(second | first) against "both happened".
        rows = (batch.drawn_for == first) & defined[:, first]
        if rows.any():
            both = labels[rows, first] * labels[rows, second]
            p = torch.sigmoid(logits[rows, first]) * torch.sigmoid(logits[rows, second])
            extra = extra + torch.nn.functional.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), both)
    if residual_pairs:
        extra = extra + residual_term(torch.sigmoid(logits), labels, defined, residual_pairs)
    return task_losses, extra, task_mask.any(dim=0)


@torch.inference_mode()
def predict(model: MultiTaskModel, data: TensorData, rows: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Probabilities [len(rows), T] (each task's own head; cvr is p(buy | click))."""
    model.eval()
    out = [torch.sigmoid(model(b.inputs, b.text, b.text_tokens)) for b in (data.batch(rows[i : i + batch_size])
                                                             for i in range(0, len(rows), batch_size))]  # fmt: skip
    model.train()
    return torch.cat(out).numpy() if out else np.zeros((0, len(model.task_names)), dtype=np.float32)


def evaluate_split(model: MultiTaskModel, data: TensorData, examples: Examples, split: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for t, name in enumerate(examples.task_names):
        rows = examples.task_rows(t, split)
        if len(rows) == 0:
            continue
        probs = predict(model, data, rows)[:, t]
        results[name] = task_metrics(examples.labels[rows, t], probs)
    return results


@torch.no_grad()
def fit_transfer_blend(model: MultiTaskModel, data: TensorData, examples: Examples) -> None:
    """Per transfer pair, logistic regression of the target's validation labels on [own logit, source logit]."""
    model.reset_transfer_blend()
    for i, (source, target) in enumerate(model.transfer_pairs):
        rows = examples.task_rows(target, "valid")
        labels = examples.labels[rows, target]
        if len(rows) == 0 or labels.min() == labels.max():
            continue  # nothing to fit: the pair keeps its own logit
        probs = np.clip(predict(model, data, rows).astype(np.float64), 1e-7, 1 - 1e-7)
        logits = np.log(probs / (1 - probs))
        weights = fit_logistic(np.column_stack([logits[:, target], logits[:, source]]), labels)
        model.transfer_blend[i] = torch.from_numpy(weights).to(model.transfer_blend.dtype)


def criterion_value(metrics: dict[str, Any], kind: str) -> float:
    aucs = [m["auc"] for m in metrics.values() if not math.isnan(m["auc"])]
    if not aucs:
        return float("-inf")
    if kind == "min_auc":
        return min(aucs)
    if kind == "joint_loss":
        return -sum(m["logloss"] for m in metrics.values())
    return float(np.mean(aucs))


@dataclass
class TrainResult:
    model_dir: Path
    metrics: dict[str, Any]
    best_step: int
    steps: int
    seconds: float
    history: list[dict[str, Any]]
    examples: dict[str, dict[str, int]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.metrics,
            "best_step": self.best_step,
            "steps": self.steps,
            "seconds": round(self.seconds, 1),
            "examples": self.examples,
            "model_dir": str(self.model_dir),
        }


def _select_tasks(settings: Settings, single_task: str | None) -> list[TaskSpec]:
    if single_task is None:
        return list(settings.tasks)
    chosen = [task for task in settings.tasks if task.name == single_task]
    if not chosen:
        names = ", ".join(task.name for task in settings.tasks)
        raise TrainingError(f"--single-task {single_task!r} is not a configured task (tasks: {names})")
    return chosen


def train(
    snapshot_dir: str | Path,
    out_dir: str | Path,
    settings: Settings,
    single_task: str | None = None,
    warm_start: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    examples: Examples | None = None,
) -> TrainResult:
    """Train the joint model (or one task's baseline) on a snapshot and write it to ``out_dir``."""
    began = time.perf_counter()
    cfg = settings.train
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.threads)
    tasks = _select_tasks(settings, single_task)
    if examples is None:
        examples = build_examples(snapshot_dir, settings.features, tasks)
    elif examples.task_names != [t.name for t in tasks]:
        examples = _subset_tasks(examples, [t.name for t in tasks])
    counts = split_summary(examples)
    empty = [name for name, c in counts.items() if c["train"] == 0 or c["valid"] == 0]
    if empty:
        raise TrainingError(
            f"no training or validation examples for task(s) {', '.join(empty)} in snapshot {snapshot_dir} "
            f"(examples per split: {json.dumps({n: counts[n] for n in empty})}); use a longer interval or drop "
            "the task from the configuration"
        )
    train_rows = np.flatnonzero(examples.split == "train")
    previous = load_model(warm_start) if warm_start else None
    if previous is not None:
        space = previous.space.extended(examples, train_rows)
    else:
        space = FeatureSpace.fit(examples, train_rows)
    cache_dir = settings.data_dir / "text_cache"
    encoder = finetuned_encoder(settings)
    if encoder is not None:
        tokens = encoder.tokenize(["", *examples.texts])
        data = TensorData(examples, space, None, tokens)
        text_in = encoder.dim
    else:
        texts = text_matrix(examples.texts, settings, cache_dir, progress) if settings.text.enabled else None
        data = TensorData(examples, space, texts)
        text_in = texts.shape[-1] if texts is not None else 0
    model = build_model(
        space.sizes(), examples.task_names, settings.model, text_in, settings.text.enabled, encoder,
        word_pooling=uses_word_vectors(settings),
    )  # fmt: skip
    if previous is not None:
        _warm_start(model, previous.model)
        model.reset_transfer_blend()  # the blend belongs to the earlier model's heads; refit after training
    # A warm start keeps the earlier text statistics, unless the text arrives in another form now
    # (sentence vs word vectors, another encoder): statistics of one form would mis-scale the other.
    same_text_form = (
        previous is not None
        and previous.text_in == text_in
        and (previous.model.inputs.word_layer is None) == (model.inputs.word_layer is None)
    )
    if settings.text.enabled and not same_text_form:
        initial = data.texts if encoder is None else torch.from_numpy(
            text_matrix(examples.texts, settings, cache_dir, False, encoder))  # fmt: skip
        model.inputs.set_text_statistics(initial[1:])

    task_rows = [examples.task_rows(t, "train") for t in range(len(tasks))]
    temperature = cfg.temperature if cfg.sampling == "temperature" else 1.0
    sampler = TaskSampler(task_rows, cfg.batch_size, temperature, cfg.seed)
    steps_per_epoch = cfg.steps_per_epoch or max(1, math.ceil(sum(map(len, task_rows)) / cfg.batch_size))
    total_steps = steps_per_epoch * cfg.epochs
    eval_every = max(1, steps_per_epoch // cfg.evals_per_epoch)
    weighting = make_weighting(
        cfg.weighting, examples.task_names, [t.weight for t in tasks], [len(r) for r in task_rows], cfg.gradnorm_alpha
    )
    # The weighting's own parameters (log variances, GradNorm weights) get no weight decay: it would pull them to 0.
    optimizer = torch.optim.AdamW(
        [{"params": list(model.parameters())}, {"params": list(weighting.parameters()), "weight_decay": 0.0}],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    scheduler = _schedule(optimizer, cfg.schedule, cfg.warmup_steps, total_steps)
    # Pairs naming an unknown task are an error; in a single-task run pairs with the other tasks just don't apply.
    resolve_pairs(cfg.residual_pairs, [t.name for t in settings.tasks])
    active_pairs = [p for p in cfg.residual_pairs if p[0] in examples.task_names and p[1] in examples.task_names]
    residual_pairs = resolve_pairs(active_pairs, examples.task_names)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    step, best_value, best_step, best_state, best_metrics, stale = 0, float("-inf"), 0, None, {}, 0
    history: list[dict[str, Any]] = []
    checkpoint_path = out / CHECKPOINT_FILE
    if resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        weighting.load_state_dict(state["weighting"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        step, best_value, best_step = state["step"], state["best_value"], state["best_step"]
        best_state, best_metrics, stale, history = (
            state["best_state"],
            state["best_metrics"],
            state["stale"],
            state["history"],
        )

    def scoring_data() -> TensorData:
        """The examples as the model scores them now: a fine-tuned encoder re-embeds the texts as trained so far."""
        if encoder is None:
            return data
        return TensorData(examples, space, text_matrix(examples.texts, settings, cache_dir, False, encoder))

    shared = [model.last_shared_layer()] if cfg.weighting == "gradnorm" else model.shared_parameters()
    bar = tqdm(total=total_steps, initial=step, disable=not progress, desc="train", unit="step")
    running = np.zeros(len(tasks))
    model.train()
    while step < total_steps and (cfg.patience == 0 or stale <= cfg.patience):
        rows, drawn_for = sampler.draw()
        batch = data.batch(rows, drawn_for)
        optimizer.zero_grad(set_to_none=True)
        task_losses, extra, present = joint_losses(model, batch, residual_pairs)
        weighting.backward(task_losses, shared, extra, present=present)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        scheduler.step()
        step += 1
        running = 0.98 * running + 0.02 * task_losses.detach().numpy() if step > 1 else task_losses.detach().numpy()
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix({name: f"{running[i]:.4f}" for i, name in enumerate(examples.task_names)})
        if step % eval_every == 0 or step == total_steps:
            scoring = scoring_data()
            metrics = evaluate_split(model, scoring, examples, "valid")
            value = criterion_value(metrics, cfg.early_stopping_metric)
            history.append({"step": step, "criterion": value, "train_loss": dict(zip(examples.task_names,
                            map(float, running), strict=True)), "valid": metrics})  # fmt: skip
            if value > best_value:
                best_value, best_step, best_metrics, stale = value, step, metrics, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            _save_checkpoint(checkpoint_path, model, optimizer, scheduler, weighting, sampler, step, best_value,
                             best_step, best_state, best_metrics, stale, history)  # fmt: skip
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    if model.transfer_blend is not None:
        scoring = scoring_data()
        fit_transfer_blend(model, scoring, examples)
        best_metrics = evaluate_split(model, scoring, examples, "valid")  # what the saved model scores
    save_model(out, model, space, settings, tasks, best_metrics)
    checkpoint_path.unlink(missing_ok=True)
    return TrainResult(
        model_dir=out, metrics=best_metrics, best_step=best_step, steps=step,
        seconds=time.perf_counter() - began, history=history, examples=counts,
    )  # fmt: skip


def _subset_tasks(examples: Examples, names: list[str]) -> Examples:
    keep = [examples.task_names.index(name) for name in names]
    return dataclasses.replace(examples, labels=examples.labels[:, keep], task_names=names)


def _save_checkpoint(path: Path, model, optimizer, scheduler, weighting, sampler, step, best_value, best_step,
                     best_state, best_metrics, stale, history) -> None:  # fmt: skip
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "weighting": weighting.state_dict(), "sampler": sampler.state_dict(), "torch_rng": torch.get_rng_state(),
        "step": step, "best_value": best_value, "best_step": best_step, "best_state": best_state,
        "best_metrics": best_metrics, "stale": stale, "history": history,
    }  # fmt: skip
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _warm_start(model: MultiTaskModel, previous: MultiTaskModel) -> None:
    """Copy an earlier model's weights; embedding tables keep old rows and grow for new ids."""
    old = previous.state_dict()
    new = model.state_dict()
    for name, tensor in new.items():
        if name not in old:
            continue
        source = old[name]
        if source.shape == tensor.shape:
            new[name] = source.clone()
        elif source.dim() == 2 and source.shape[1] == tensor.shape[1] and source.shape[0] <= tensor.shape[0]:
            grown = tensor.clone()
            grown[: source.shape[0]] = source
            new[name] = grown
    model.load_state_dict(new)


# --------------------------------------------------------------------------------------------------
# Model directory: weights, feature space, settings, validation metrics.
@dataclass
class LoadedModel:
    model: MultiTaskModel
    space: FeatureSpace
    settings: Settings
    task_names: list[str]
    text_in: int
    cache_dir: Path

    def predict(self, examples: Examples, rows: np.ndarray, progress: bool = False) -> np.ndarray:
        texts = None
        if self.text_in:
            texts = text_matrix(examples.texts, self.settings, self.cache_dir, progress, self.model.text_encoder)
        return predict(self.model, TensorData(examples, self.space, texts), rows)

    def predict_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Scoring request (see ``features.examples_frame``) -> one probability column per task."""
        examples = frame_examples(frame, self.task_names)
        probs = self.predict(examples, np.arange(len(frame)))
        return pd.DataFrame(probs, columns=self.task_names, index=frame.index)


def save_model(out: Path, model: MultiTaskModel, space: FeatureSpace, settings: Settings, tasks: list[TaskSpec],
               metrics: dict[str, Any]) -> None:  # fmt: skip
    torch.save(
        {"state_dict": model.state_dict(), "task_names": model.task_names, "vocab_sizes": space.sizes(),
         "text_in": model.inputs.text_in},
        out / MODEL_FILE,
    )  # fmt: skip
    space.save(out / FEATURES_FILE)
    stored = settings.model_copy(update={"tasks": tasks})
    (out / SETTINGS_FILE).write_text(stored.model_dump_json(indent=2))
    (out / METRICS_FILE).write_text(json.dumps({"tasks": metrics}, indent=2))


def load_model(model_dir: str | Path, cache_dir: str | Path | None = None) -> LoadedModel:
    """A trained model ready to score; ``cache_dir`` is where text vectors are cached (default: as trained)."""
    path = Path(model_dir)
    if not (path / MODEL_FILE).is_file():
        raise TrainingError(f"{path} is not a model directory: {MODEL_FILE} is missing (train one with mtl train)")
    stored = torch.load(path / MODEL_FILE, weights_only=False)
    saved = json.loads((path / SETTINGS_FILE).read_text())
    # A model saved before text.pooling and model.transfer existed was trained with whole-text vectors and
    # without transfer; today's defaults would not fit its weights.
    saved.setdefault("text", {}).setdefault("pooling", "sentence")
    saved.setdefault("model", {}).setdefault("transfer", [])
    saved["model"].setdefault("transfer_blend", False)
    settings = Settings.model_validate(saved)
    space = FeatureSpace.load(path / FEATURES_FILE)
    encoder = finetuned_encoder(settings)
    model = build_model(
        stored["vocab_sizes"], stored["task_names"], settings.model, stored["text_in"], stored["text_in"] > 0, encoder,
        word_pooling=uses_word_vectors(settings),
    )  # fmt: skip
    model.load_state_dict(stored["state_dict"])
    model.eval()
    return LoadedModel(
        model=model, space=space, settings=settings, task_names=stored["task_names"], text_in=stored["text_in"],
        cache_dir=Path(cache_dir) if cache_dir else settings.data_dir / "text_cache",
    )  # fmt: skip
