"""Joint multi-task training: AdamW, warm-up + decay schedule, mixed-task batches, early stopping.

The loop, in one sitting:

1. Take the examples (built once per run from the snapshot) and fit (or, for a warm start, extend) the
   feature space on the training split. Text embeddings come from the on-disk cache (each distinct text encoded once).
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
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mtl_core.config import Settings, TaskSpec
from mtl_core.data.extract import verify_snapshot
from mtl_core.judge.metrics import fit_logistic, task_metrics
from mtl_core.learn import TrainingError, distributed
from mtl_core.learn.batches import Batch, TaskSampler, TensorData, predict
from mtl_core.learn.checkpoint import (
    CHECKPOINT_FILE,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_model,
)
from mtl_core.learn.examples import Examples, FeatureSpace, build_examples, split_summary, too_little_data
from mtl_core.learn.losses import make_weighting, masked_bce, residual_term, resolve_pairs
from mtl_core.learn.models import MultiTaskModel, build_model
from mtl_core.learn.text import finetuned_encoder, text_matrix, uses_word_vectors

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    pass


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
    model: MultiTaskModel,
    batch: Batch,
    residual_pairs: list[tuple[int, int, float]],
    forward: torch.nn.Module | None = None,
    scale: distributed.LossScale | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-task losses on the rows drawn for each task, the unweighted extra terms (ESMM, residual), and
    which tasks had rows in the batch.

    Across processes ``forward`` is the model under DistributedDataParallel and ``scale`` turns this rank's
    means into its share of the global batch's (``distributed.shard_batch``); presence is then the global
    batch's too.
    """
    logits = (forward or model)(batch.inputs, batch.text, batch.text_tokens)
    n_tasks = logits.shape[1]
    defined = ~torch.isnan(batch.labels)
    labels = torch.nan_to_num(batch.labels, nan=0.0)
    drawn = batch.drawn_for.unsqueeze(1) == torch.arange(n_tasks, device=logits.device).unsqueeze(0)
    task_mask = drawn & defined
    task_losses = masked_bce(logits, labels, task_mask)
    if scale is not None:
        task_losses = task_losses * scale.tasks.to(task_losses)
    extra = logits.new_zeros(())
    if model.esmm_pair is not None:
        first, second = model.esmm_pair
        # ESMM: over every row drawn for the first task, p(first) * p(second | first) against "both happened".
        rows = (batch.drawn_for == first) & defined[:, first]
        if rows.any():
            both = labels[rows, first] * labels[rows, second]
            p = torch.sigmoid(logits[rows, first]) * torch.sigmoid(logits[rows, second])
            esmm = torch.nn.functional.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), both)
            extra = extra + (esmm if scale is None else esmm * scale.esmm)
    if residual_pairs and scale is None:
        extra = extra + residual_term(torch.sigmoid(logits), labels, defined, residual_pairs)
    elif residual_pairs:
        probs = torch.sigmoid(logits)
        for pair, factor in zip(residual_pairs, scale.pairs, strict=True):
            extra = extra + residual_term(probs, labels, defined, [pair]) * factor
    present = task_mask.any(dim=0) if scale is None else scale.present.to(task_mask.device)
    return task_losses, extra, present


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
    # The checkpoint's step this run continued from (0: it started afresh).
    resumed_from_step: int = 0
    # The process's rank in a training across processes: the model directory is rank 0's, and so is the report.
    rank: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.metrics,
            "best_step": self.best_step,
            "steps": self.steps,
            "resumed_from_step": self.resumed_from_step,
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


def train_on_snapshot(
    snapshot_dir: str | Path,
    out_dir: str | Path,
    settings: Settings,
    single_task: str | None = None,
    warm_start: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Build the snapshot's examples and train on them (``mtl train``; the DAG builds its examples once)."""
    _select_tasks(settings, single_task)  # an unknown task fails before the snapshot is read
    verify_snapshot(snapshot_dir)
    # Every configured task's examples, even for one task's baseline: they set its step budget.
    examples = build_examples(snapshot_dir, settings.features, list(settings.tasks))
    return train_model(examples, out_dir, settings, single_task, warm_start, resume, progress, source=snapshot_dir)


def train_model(
    examples: Examples,
    out_dir: str | Path,
    settings: Settings,
    single_task: str | None = None,
    warm_start: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    source: str | Path | None = None,
    recency_half_life_days: float | None = None,
) -> TrainResult:
    """Train the joint model (or one task's baseline) on ``examples`` and write it to ``out_dir``.

    ``source`` names where the examples came from, for the messages. With ``recency_half_life_days`` a
    training example is drawn with weight 2^(-age / half-life), its age counted from the newest training
    example, and an epoch is as many rows as the weights sum to (``recency_weights``).

    A single-task baseline gets the joint model's optimiser budget: an epoch is as many steps as the joint
    model's, counted on every configured task's training rows, and so are its evaluations and patience.
    A baseline cut to its own task's rows would train a small task (cvr) for a fraction of the steps.

    With ``train.nproc`` > 1 the training runs in that many new processes under DistributedDataParallel
    (``learn.distributed``); launched by torchrun, this process is one rank of torchrun's group.
    """
    began = time.perf_counter()
    group = distributed.current_group()
    arguments = (examples, out_dir, settings, single_task, warm_start, resume, progress, source, recency_half_life_days)
    try:
        distributed.check_weighting(settings.train.weighting, group.world if group else settings.train.nproc)
        if group is None and settings.train.nproc > 1:
            _select_tasks(settings, single_task)  # a wrong --single-task is this process's error, not every rank's
            result = distributed.launch(train_model, settings.train.nproc, arguments)
            # The run's wall time, the processes' start and the examples' hand-over included.
            return dataclasses.replace(result, seconds=time.perf_counter() - began)
        return _train(*arguments, group=group, began=began)
    finally:
        if group is not None and group.torchrun:
            distributed.leave()  # joined by current_group() for this training; a spawned rank leaves on its own


def _train(
    examples: Examples,
    out_dir: str | Path,
    settings: Settings,
    single_task: str | None,
    warm_start: str | Path | None,
    resume: bool,
    progress: bool,
    source: str | Path | None,
    recency_half_life_days: float | None,
    group: distributed.Group | None,
    began: float,
) -> TrainResult:
    """``train_model``'s training, in this process: the whole of it, or one rank's part (``group``)."""
    cfg = settings.train
    main = group is None or group.main
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.threads)
    tasks = _select_tasks(settings, single_task)
    # Every configured task's training rows (and recency weights) before a single task's examples are cut
    # out: together they are the joint model's rows per epoch, its step budget.
    all_rows = {name: examples.task_rows(t, "train") for t, name in enumerate(examples.task_names)}
    all_weights = (
        {name: recency_weights(examples, rows, recency_half_life_days) for name, rows in all_rows.items()}
        if recency_half_life_days
        else None
    )
    budget_rows = sum(w.sum() for w in all_weights.values()) if all_weights else sum(map(len, all_rows.values()))
    if examples.task_names != [t.name for t in tasks]:
        examples = _subset_tasks(examples, [t.name for t in tasks])
    counts = split_summary(examples)
    empty = [name for name, c in counts.items() if c["train"] == 0 or c["valid"] == 0]
    if empty:
        days = (examples.interval[1] - examples.interval[0]) / np.timedelta64(1, "D")
        reason = too_little_data(counts, empty, tasks, settings.features, float(days))
        raise TrainingError(f"{source or 'the examples'}: {reason}")
    train_rows = np.flatnonzero(examples.split == "train")
    previous = load_model(warm_start) if warm_start else None
    if previous is not None:
        space = previous.space.extended(examples, train_rows, settings.model.id_features)
    else:
        space = FeatureSpace.fit(examples, train_rows, settings.model.id_features)
    cache_dir = settings.resolved_text_cache_dir
    encoder = finetuned_encoder(settings)
    if encoder is not None:
        tokens = encoder.tokenize(["", *examples.texts])
        data = TensorData(examples, space, None, tokens)
        text_in = encoder.dim
    else:
        with distributed.main_first(group):  # rank 0 fills the text cache, the other ranks then read it
            texts = (
                text_matrix(examples.texts, settings, cache_dir, progress and main) if settings.text.enabled else None
            )
        data = TensorData(examples, space, texts, packed_words=True)
        text_in = texts.shape[-1] if texts is not None else 0
    model = build_model(
        space.sizes(),
        examples.task_names,
        settings.model,
        text_in,
        settings.text.enabled,
        encoder,
        word_pooling=uses_word_vectors(settings),
    )
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
        initial = (
            data.texts
            if encoder is None
            else torch.from_numpy(text_matrix(examples.texts, settings, cache_dir, False, encoder))
        )
        model.inputs.set_text_statistics(initial[1:])
    device = group.device if group is not None else torch.device("cpu")
    model.to(device)

    task_rows = [all_rows[task.name] for task in tasks]
    temperature = cfg.temperature if cfg.sampling == "temperature" else 1.0
    weights = [all_weights[task.name] for task in tasks] if all_weights else None
    sampler = TaskSampler(task_rows, cfg.batch_size, temperature, cfg.seed, weights)
    steps_per_epoch = cfg.steps_per_epoch or max(1, math.ceil(budget_rows / cfg.batch_size))
    total_steps = steps_per_epoch * cfg.epochs
    eval_every = max(1, steps_per_epoch // cfg.evals_per_epoch)
    weighting = make_weighting(
        cfg.weighting, examples.task_names, [t.weight for t in tasks], [len(r) for r in task_rows], cfg.gradnorm_alpha
    ).to(device)
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
    if main:  # rank 0 alone writes: the checkpoints and the model directory
        out.mkdir(parents=True, exist_ok=True)
    step, best_value, best_step, best_state, best_metrics, stale = 0, float("-inf"), 0, None, {}, 0
    history: list[dict[str, Any]] = []
    checkpoint_path = out / CHECKPOINT_FILE
    if group is not None:
        # The ranks' models start equal (DistributedDataParallel copies rank 0's weights), their dropout masks not.
        torch.manual_seed(distributed.rank_seed(cfg.seed, group.rank))
    state = None
    if resume and group is None and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path)
    elif resume and group is not None:
        # Rank 0 reads the checkpoint (only its disk need hold it) and every rank continues from that state.
        state = group.broadcast(load_checkpoint(checkpoint_path) if main and checkpoint_path.is_file() else None)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        weighting.load_state_dict(state["weighting"])
        sampler.load_state_dict(state["sampler"])
        rank_rngs = state.get("rank_rngs")
        if group is None:
            torch.set_rng_state(state["torch_rng"])
        elif rank_rngs is not None and len(rank_rngs) == group.world:
            torch.set_rng_state(rank_rngs[group.rank])
        else:  # a checkpoint of another number of processes: fresh masks, not a replay of the first steps'
            torch.manual_seed(distributed.rank_seed(cfg.seed + state["step"], group.rank))
        step, best_value, best_step = state["step"], state["best_value"], state["best_step"]
        best_state, best_metrics, stale, history = (
            state["best_state"],
            state["best_metrics"],
            state["stale"],
            state["history"],
        )
        log.info("resuming from the checkpoint %s at step %d", checkpoint_path, step)
    resumed_from_step = step

    def scoring_data() -> TensorData:
        """The examples as the model scores them now: a fine-tuned encoder re-embeds the texts as trained so far."""
        if encoder is None:
            return data
        return TensorData(examples, space, text_matrix(examples.texts, settings, cache_dir, False, encoder))

    shared = [model.last_shared_layer()] if cfg.weighting == "gradnorm" else model.shared_parameters()
    forward = group.wrap(model) if group is not None else None
    bar = tqdm(total=total_steps, initial=step, disable=not (progress and main), desc="train", unit="step")
    running = np.zeros(len(tasks))
    model.train()
    while step < total_steps and (cfg.patience == 0 or stale <= cfg.patience):
        rows, drawn_for = sampler.draw()
        scale = None
        if group is not None:  # every rank drew the same global batch; this rank trains on its shard of it
            rows, drawn_for, scale = distributed.shard_batch(
                rows, drawn_for, examples.labels, group, model.esmm_pair, residual_pairs
            )
        batch = data.batch(rows, drawn_for)
        if device.type != "cpu":
            batch = batch.to(device)
        optimizer.zero_grad(set_to_none=True)
        task_losses, extra, present = joint_losses(model, batch, residual_pairs, forward, scale)
        weighting.backward(task_losses, shared, extra, present=present)
        if group is not None:
            group.average_gradients(list(weighting.parameters()))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        scheduler.step()
        step += 1
        # Across processes each rank averages its own (scaled) losses; the mean of the ranks' running averages,
        # taken at each evaluation, is the global batch's running average, without a collective every step.
        losses = task_losses.detach().cpu().numpy()
        running = 0.98 * running + 0.02 * losses if step > 1 else losses
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix({name: f"{running[i]:.4f}" for i, name in enumerate(examples.task_names)})
        if step % eval_every == 0 or step == total_steps:
            rank_rngs = group.gather(torch.get_rng_state()) if group is not None else None
            train_loss = running if group is None else group.mean(torch.from_numpy(running)).numpy()
            if main:
                scoring = scoring_data()
                metrics = evaluate_split(model, scoring, examples, "valid")
                value = criterion_value(metrics, cfg.early_stopping_metric)
                history.append(
                    {
                        "step": step,
                        "criterion": value,
                        "train_loss": dict(zip(examples.task_names, map(float, train_loss), strict=True)),
                        "valid": metrics,
                    }
                )
                if value > best_value:
                    best_value, best_step, best_metrics, stale = value, step, metrics, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    stale += 1
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "weighting": weighting.state_dict(),
                    "sampler": sampler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "step": step,
                    "best_value": best_value,
                    "best_step": best_step,
                    "best_state": best_state,
                    "best_metrics": best_metrics,
                    "stale": stale,
                    "history": history,
                }
                if group is not None:
                    state["rank_rngs"] = rank_rngs  # each rank's dropout stream, for a resume with as many ranks
                save_checkpoint(checkpoint_path, state if device.type == "cpu" else distributed.to_cpu(state))
            if group is not None:
                # Rank 0's decision for all: every rank stops at the same step, none waits for a missing one.
                stale = group.broadcast(stale)
    bar.close()
    result = None
    if main:
        if best_state is not None:
            model.load_state_dict(best_state)
        model.cpu()  # the model directory loads on any machine
        if model.transfer_blend is not None:
            # The blend is fitted on the validation split, so the validation metrics stay the checkpoint's from
            # before it: scored after it they would be in-sample. The holdout tells what the saved model does.
            fit_transfer_blend(model, scoring_data(), examples)
        save_model(out, model, space, settings, tasks, best_metrics)
        checkpoint_path.unlink(missing_ok=True)
        result = TrainResult(
            model_dir=out,
            metrics=best_metrics,
            best_step=best_step,
            steps=step,
            seconds=time.perf_counter() - began,
            history=history,
            examples=counts,
            resumed_from_step=resumed_from_step,
        )
    if group is not None:
        # Every rank returns rank 0's result (a torchrun launch runs the caller on every rank); only rank 0's
        # caller reports it (``TrainResult.rank``).
        result = dataclasses.replace(group.broadcast(result), rank=group.rank)
    return result


def recency_weights(examples: Examples, rows: np.ndarray, half_life_days: float) -> np.ndarray:
    """2^(-age / half-life) per row, the age in days from the newest training example."""
    train_times = examples.time[examples.split == "train"]
    newest = train_times.max() if len(train_times) else examples.interval[1]
    age_days = (newest - examples.time[rows]) / np.timedelta64(1, "D")
    return np.exp2(-np.maximum(age_days, 0.0) / half_life_days)


def _subset_tasks(examples: Examples, names: list[str]) -> Examples:
    keep = [examples.task_names.index(name) for name in names]
    return dataclasses.replace(examples, labels=examples.labels[:, keep], task_names=names)


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
