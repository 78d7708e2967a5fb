"""Training across processes (DistributedDataParallel, gloo on CPU): the same model as one process, the
shards, the refused weightings, a failing rank, resuming, and that rank 0 alone writes.

Dropout is off here: with it each rank draws its own masks, so two processes differ from one as two seeds
do (a few thousandths of AUC on the demo shop, README), which would hide what these tests look for. Without
it two processes compute one process's gradients up to float rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_training_env
from support import PSEUDONYMS

from mtl_core.config import load_settings
from mtl_core.data import warehouse as wh
from mtl_core.data.extract import extract_snapshot
from mtl_core.data.shop import ShopSpec, write_shop
from mtl_core.judge.metrics import task_metrics
from mtl_core.learn import TrainingError, distributed
from mtl_core.learn.batches import TaskSampler
from mtl_core.learn.checkpoint import load_model
from mtl_core.learn.examples import build_examples
from mtl_core.learn.training import train_model


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_shop")
    engine = wh.make_engine(f"sqlite:///{root / 'warehouse.db'}")
    write_shop(engine, ShopSpec(users=600, items=150, days=35, start=date(2026, 1, 5), seed=5))
    extract_snapshot(engine, "2026-01-05", "2026-02-09", root / "snap", pseudonyms=PSEUDONYMS)
    return root


@pytest.fixture(scope="module")
def env(shop, tiny_bert_path) -> dict[str, str]:
    return {
        **tiny_training_env(shop / "data", tiny_bert_path),
        "MTL_MODEL__DROPOUT": "0",
        # Learned task weights (averaged across ranks apart from the model's gradients) and a residual pair
        # (a loss term over its own rows): the two parts of the loss the shards must also add up right.
        "MTL_TRAIN__WEIGHTING": "uncertainty",
        "MTL_TRAIN__RESIDUAL_PAIRS": '[["ctr", "cvr", 0.1]]',
    }


@pytest.fixture(scope="module")
def settings(env):
    return load_settings(environ=env)


@pytest.fixture(scope="module")
def examples(shop, settings):
    return build_examples(shop / "snap", settings.features, settings.tasks)


def with_train(settings, **update):
    return settings.model_copy(update={"train": settings.train.model_copy(update=update)})


def holdout_aucs(model_dir: Path, examples) -> dict[str, float]:
    model = load_model(model_dir)
    aucs = {}
    for t, name in enumerate(examples.task_names):
        rows = examples.task_rows(t, "holdout")
        aucs[name] = task_metrics(examples.labels[rows, t], model.predict(examples, rows)[:, t])["auc"]
    return aucs


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(model_dir / "model.pt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def one_process(shop, settings, examples):
    out = shop / "one"
    train_model(examples, out, settings, progress=False)  # also fills the text cache the ranks then read
    return holdout_aucs(out, examples)


@pytest.fixture(scope="module")
def two_processes(shop, settings, examples):
    out = shop / "two"
    result = train_model(examples, out, with_train(settings, nproc=2), progress=False)
    return out, result


def test_two_processes_give_one_processs_holdout_auc_on_the_same_budget(one_process, two_processes, examples):
    out, result = two_processes
    # The same steps of the same global batch (each rank half of it): the same examples seen, the same schedule.
    assert result.steps == 24 and [h["step"] for h in result.history] == [6, 12, 18, 24] and result.rank == 0
    assert not (out / "checkpoint.pt").exists()
    two = holdout_aucs(out, examples)
    for task, auc in one_process.items():
        assert two[task] == pytest.approx(auc, abs=0.01), (task, one_process, two)


def test_the_ranks_shards_partition_every_batch_and_every_pass():
    # Per batch of 100: 90, 6, 3 and 1 rows of the four tasks, so ten batches are one pass over each, the
    # third task splits 2 + 1 between the ranks and the fourth's one row goes to rank 0 alone.
    sizes = [900, 60, 30, 10]
    starts = np.cumsum([0, *sizes])
    rows = [np.arange(a, a + n) for a, n in zip(starts, sizes, strict=False)]
    labels = np.full((starts[-1], 4), np.nan, dtype=np.float32)
    for t, task_rows in enumerate(rows):
        labels[task_rows, t] = np.random.default_rng(t).random(len(task_rows))
    ranks = [distributed.Group(rank=r, world=2, local_rank=r, device=torch.device("cpu")) for r in range(2)]
    samplers = [TaskSampler(rows, batch_size=100, temperature=1.0, seed=3) for _ in ranks]
    seen = [[], []]
    for _ in range(10):
        drawn = [sampler.draw() for sampler in samplers]
        assert np.array_equal(drawn[0][0], drawn[1][0])  # every rank draws the same global batch
        global_rows, drawn_for = drawn[0]
        shards = [distributed.shard_batch(global_rows, drawn_for, labels, g, None, []) for g in ranks]
        mine = [shard[0] for shard in shards]
        assert not set(mine[0]) & set(mine[1]) and sorted(np.concatenate(mine)) == sorted(global_rows)
        for t in range(4):  # the scaled means average to the global batch's mean, however unequal the split
            scaled = [
                labels[rows_r[drawn_r == t], t].mean() * scale.tasks[t].item() if (drawn_r == t).any() else 0.0
                for rows_r, drawn_r, scale in shards
            ]
            assert np.mean(scaled) == pytest.approx(labels[global_rows[drawn_for == t], t].mean(), rel=1e-5)
        assert all(scale.present.all() for _, _, scale in shards)  # present on rank 1 too, which lacks task 3
        for r in range(2):
            seen[r].append(mine[r])
    passes = [np.concatenate(s) for s in seen]  # one pass over every task's rows
    assert not set(passes[0]) & set(passes[1]) and sorted(np.concatenate(passes)) == list(range(starts[-1]))


@pytest.mark.parametrize("weighting", ["gradnorm", "pcgrad"])
def test_per_task_gradient_weightings_are_refused_across_processes(shop, settings, examples, weighting):
    refused = with_train(settings, nproc=2, weighting=weighting)
    with pytest.raises(TrainingError, match=rf"'train.weighting' = '{weighting}' cannot train across 2 processes"):
        train_model(examples, shop / weighting, refused, progress=False)
    assert not (shop / weighting).exists()
    with pytest.raises(TrainingError, match=r"use train.weighting fixed, inverse_volume or uncertainty"):
        distributed.check_weighting(weighting, world=4)  # torchrun's world, whatever train.nproc says
    distributed.check_weighting("uncertainty", world=4)


def _train_recording_writes(record: Path, fail_at_draw: int | None, *args, **kwargs):
    """One rank's training (under ``distributed.launch``), noting every file this process creates, writes,
    renames or removes; with ``fail_at_draw`` rank 1 fails at that batch, as a rank losing its disk would."""
    from mtl_core.learn import training

    rank = distributed.current_group().rank
    written: list[str] = []

    def audit(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str | os.PathLike):
            if args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND):
                written.append(str(args[0]))
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"):
            written.append(str(args[0]))

    sys.addaudithook(audit)
    if fail_at_draw and rank == 1:
        real_draw, calls = training.TaskSampler.draw, [0]

        def failing_draw(self):
            calls[0] += 1
            if calls[0] == fail_at_draw:
                raise OSError("rank 1 lost its disk")
            return real_draw(self)

        training.TaskSampler.draw = failing_draw
    try:
        return training.train_model(*args, **kwargs)
    finally:
        (record / f"rank{rank}.json").write_text(json.dumps(written))


def written(record: Path, rank: int, under: Path) -> list[Path]:
    """What ``rank`` wrote under ``under`` (torch itself may make a cache directory in /tmp), its notes aside."""
    paths = map(Path, json.loads((record / f"rank{rank}.json").read_text()))
    return [p for p in paths if under in p.parents and record not in p.parents]


def test_a_failing_rank_ends_the_run_rank_0_alone_writes_and_the_run_resumes(shop, settings, examples, two_processes):
    out, record = shop / "resumed", shop / "record"
    record.mkdir()
    two = with_train(settings, nproc=2)
    began = time.perf_counter()
    with pytest.raises(TrainingError, match=r"training rank 1 of 2 failed: OSError: rank 1 lost its disk"):
        distributed.launch(_train_recording_writes, 2, (record, 15, examples, out, two), {"progress": False})
    assert time.perf_counter() - began < 120, "the other rank was left waiting for the failed one"
    assert (out / "checkpoint.pt").exists()  # rank 0's, at step 12
    assert written(record, 1, shop) == []  # not into the model directory, the data dir or its text cache

    result = distributed.launch(_train_recording_writes, 2, (record, None, examples, out, two), {"resume": True})
    assert result.resumed_from_step == 12 and result.steps == 24
    assert written(record, 1, shop) == []
    rank0 = {path.name for path in written(record, 0, out)}
    assert {"features.json", "settings.json", "metrics.json", "checkpoint.pt"} <= rank0
    assert not (out / "checkpoint.pt").exists()
    # Resumed, it is the model of the run that was never interrupted: weights, optimiser, sampler and each
    # rank's random state all came back.
    straight, resumed = weights(two_processes[0]), weights(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_torchrun_launches_mtl_train_once_per_rank_and_rank_0_reports(shop, env, examples, two_processes):
    out = shop / "torchrun"
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python"),
        *(str(Path(sys.executable).parent / "mtl"), "train", "--snapshot", str(shop / "snap"), "--out", str(out)),
        "--json",
    ]
    done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # one report, rank 0's
    assert report["steps"] == 24 and set(report["tasks"]) == {"ctr", "cvr", "ad_ctr", "churn"}
    # The ranks joined torchrun's group (RANK, WORLD_SIZE, MASTER_ADDR...) and trained as the spawned ones did.
    straight, launched = weights(two_processes[0]), weights(out)
    assert all(torch.equal(straight[k], launched[k]) for k in straight)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size()


def test_a_daemonic_process_like_a_celery_workers_task_starts_the_ranks(monkeypatch):
    """The DAG's train task runs in a daemonic process under Celery, which multiprocessing forbids children;
    the ranks die with their launcher, so the launcher may start them anyway (test_scheduler runs it for real)."""
    import multiprocessing

    import billiard.process

    config = multiprocessing.current_process()._config
    # What Celery's pool leaves in its task processes: the daemon flag, and billiard's own key type.
    monkeypatch.setitem(config, "daemon", True)
    monkeypatch.setitem(config, "authkey", billiard.process.AuthenticationString(bytes(config["authkey"])))
    assert distributed.launch(_world_size, 2) == 2
    assert config["daemon"] is True and isinstance(config["authkey"], billiard.process.AuthenticationString)
