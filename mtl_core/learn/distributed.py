"""Training across processes: torch DistributedDataParallel, launched by ``train.nproc`` or by torchrun.

Two ways in, one training loop (``training.train_model``):

* ``train.nproc`` = N > 1 (``mtl train --nproc N``, the DAG's train task): ``launch`` starts N processes
  with ``torch.multiprocessing``'s spawn context, each one rank of a process group on this machine;
* torchrun (one or many nodes): every process it starts finds RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
  MASTER_PORT in its environment and joins that group (``current_group``); ``train.nproc`` is then ignored.

Backend gloo on CPU, nccl when every local rank has a GPU of its own. What each rank does:

* Batches: every rank runs the same ``TaskSampler`` (same seed), so every rank draws the same global batch
  of ``train.batch_size`` rows; each keeps every N-th of each task's rows (``shard_batch``). Within a pass
  over a task's rows the ranks' shards are disjoint and together they are that pass: DistributedSampler's
  semantics (one shared permutation, rank r takes positions r, r + N, ...), applied per task and per batch
  because the batches mix the tasks. A rank's batch is thus batch_size / N rows, the number of steps, the
  learning-rate schedule, the evaluations and the patience are the run's, and so are the examples seen.
* Losses: each rank's per-task means are rescaled (``LossScale``) so that DistributedDataParallel's average
  of the ranks' gradients is the gradient of the global batch's per-task means, as one process computes
  it, not an average of means over unequal shards.
* Gradients: DistributedDataParallel averages the model's; the weighting's own parameters (uncertainty's log
  variances) are averaged by ``average_gradients``. GradNorm and PCGrad need every task's gradient on the
  whole batch before they combine them; they are refused for more than one process (``check_weighting``).
* Decisions: rank 0 alone evaluates on the validation split, keeps the best weights, writes checkpoints,
  the model directory and logs; it broadcasts the early-stopping count, so every rank stops at the same step.
* Failures: a rank's exception reaches the launcher through a pipe and ends the run with a ``TrainingError``
  naming the rank; the other ranks are terminated, and collectives time out after ``TIMEOUT`` rather than
  wait forever for a rank that is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing.connection
import os
import queue
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing

from mtl_core.errors import MtlError
from mtl_core.learn import TrainingError

log = logging.getLogger(__name__)

# How long a collective waits for the other ranks. Rank 0 evaluates while the others wait at the next
# broadcast, and a fine-tuned encoder re-embeds every text for that, so this is minutes, not seconds; a rank
# that is gone without its launcher noticing ends the others' wait after it.
TIMEOUT = timedelta(minutes=30)

# Weightings that combine per-task gradients of the whole batch, which DistributedDataParallel's one
# all-reduce of the summed gradient does not provide.
PER_TASK_GRADIENT_WEIGHTINGS = ("gradnorm", "pcgrad")

_GROUP: Group | None = None  # the group this process initialised (a spawned rank, or a torchrun process)


@dataclasses.dataclass(frozen=True)
class Group:
    """This process's place in the training group."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    torchrun: bool = False  # joined from torchrun's environment (not started by ``launch``)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank (the others pass anything, e.g. None)."""
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self._object_device)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The ranks' mean of ``tensor``, on ``tensor``'s device (gloo has no AVG reduction: sum, then divide)."""
        total = tensor.detach().to(self.device, copy=True)  # nccl reduces GPU tensors only
        dist.all_reduce(total)
        return (total / self.world).to(tensor.device)

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Average gradients of parameters DistributedDataParallel does not own (the task weighting's).

        A parameter without a gradient on this rank joins with zeros: every rank must enter each all-reduce.
        """
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= self.world

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model under DistributedDataParallel: its forward, and its backward averages the gradients.

        Every parameter of the model's own layers is in every step's graph (each tower scores every row), but
        a fine-tuned pretrained encoder brings layers its forward never uses (BERT's pooler under
        ``text.finetune: full``): DistributedDataParallel must then look for them each step, or it stops the
        run at the second step. Without such an encoder that search is skipped (it walks the whole graph).

        No buffer changes while training (the text statistics are set before it, the transfer blend after it,
        and no layer keeps running statistics), so rank 0's buffers are copied once, when wrapped, rather
        than before every step (5 ms a step on the demo's model, a tenth of its step).
        """
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device] if self.device.type == "cuda" else None
        find_unused = getattr(model, "text_encoder", None) is not None
        return DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=find_unused, forward_sync_buffers=False
        )

    @property
    def _object_device(self) -> torch.device | None:
        # nccl moves pickled objects through a GPU buffer; gloo through CPU memory.
        return self.device if self.device.type == "cuda" else None


def current_group() -> Group | None:
    """The group this process trains in, or None for a one-process run.

    A rank started by ``launch`` is already in its group. A process started by torchrun (RANK and
    WORLD_SIZE in the environment) joins torchrun's group here, once.
    """
    global _GROUP
    if _GROUP is not None:
        return _GROUP
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise TrainingError(
                f"RANK and WORLD_SIZE are set (rank {rank} of {world}) but {' and '.join(missing)} not: launch "
                "the ranks with torchrun, which sets all of them, or unset RANK to train in one process"
            )
        _GROUP = dataclasses.replace(_init(rank, world, local_rank, "env://"), torchrun=True)
        _quiet_unless_main(rank)
        log.info("joined torchrun's group as rank %d of %d on %s", rank, world, _GROUP.device)
    return _GROUP


def check_weighting(weighting: str, world: int) -> None:
    """Refuse a weighting that needs per-task gradients of the whole batch when the batch is split."""
    if world > 1 and weighting in PER_TASK_GRADIENT_WEIGHTINGS:
        raise TrainingError(
            f"setting 'train.weighting' = {weighting!r} cannot train across {world} processes: it combines each "
            "task's gradient on the whole batch, which is split between the processes and not all-reduced per "
            "task; use train.weighting fixed, inverse_volume or uncertainty with train.nproc > 1, or set "
            f"train.nproc = 1 (mtl train --nproc 1, MTL_TRAIN__NPROC=1, one torchrun process) to keep {weighting}"
        )


# --------------------------------------------------------------------------------------------------
# Sharding the global batch.
@dataclasses.dataclass
class LossScale:
    """Factors that turn one rank's per-task means into its share of the global batch's means.

    A rank's mean over its n_r of the global batch's n rows, times world * n_r / n, averaged over the ranks
    (what DistributedDataParallel does to gradients), is the mean over all n rows. The same holds for the
    ESMM term (over the rows drawn for its first task) and each residual pair (over rows with both labels).
    """

    tasks: torch.Tensor  # [T]
    esmm: float
    pairs: list[float]
    present: torch.Tensor  # [T] bool: the task has rows in the global batch (on any rank)


def shard_batch(
    rows: np.ndarray,
    drawn_for: np.ndarray,
    labels: np.ndarray,
    group: Group,
    esmm_pair: tuple[int, int] | None,
    residual_pairs: Sequence[tuple[int, int, float]],
) -> tuple[np.ndarray, np.ndarray, LossScale]:
    """This rank's rows of the global batch ``rows`` (every world-th row of each task's) and its ``LossScale``.

    ``labels`` are all examples' labels [N, T]: every rank knows the whole global batch, so the counts the
    scale needs come without any communication.
    """
    n_tasks = labels.shape[1]
    keep = np.zeros(len(rows), dtype=bool)
    for t in range(n_tasks):
        keep[np.flatnonzero(drawn_for == t)[group.rank :: group.world]] = True
    defined = ~np.isnan(labels[rows])

    def factor(in_global: np.ndarray) -> float:
        n = int(in_global.sum())
        return group.world * int((in_global & keep).sum()) / n if n else 0.0

    drawn = [(drawn_for == t) & defined[:, t] for t in range(n_tasks)]
    task_factors = [factor(d) for d in drawn]
    scale = LossScale(
        tasks=torch.tensor(task_factors, dtype=torch.float32),
        esmm=task_factors[esmm_pair[0]] if esmm_pair is not None else 0.0,
        pairs=[factor(defined[:, i] & defined[:, j]) for i, j, _ in residual_pairs],
        present=torch.tensor([bool(d.any()) for d in drawn]),
    )
    return rows[keep], drawn_for[keep], scale


@contextlib.contextmanager
def main_first(group: Group | None) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills the text cache), the other ranks after it (and read it)."""
    if group is None:
        yield
        return
    if not group.main:
        dist.barrier()
    yield
    if group.main:
        dist.barrier()


def rank_seed(seed: int, rank: int) -> int:
    """Each rank's torch seed for dropout: one mask per row, not the same mask on every rank's i-th row."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor on the CPU: checkpoints and model files load on machines without a GPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_cpu(v) for v in value)
    return value


# --------------------------------------------------------------------------------------------------
# Starting the ranks on this machine.
def launch(fn: Callable[..., Any], nproc: int, args: tuple = (), kwargs: dict[str, Any] | None = None) -> Any:
    """Run ``fn(*args, **kwargs)`` in ``nproc`` new processes, each one rank of a group; return rank 0's result.

    ``fn`` must be importable by name (a module-level function) and ``args`` picklable: the processes are
    spawned, not forked (forking a process that holds threads or a CUDA context is unsafe). The first rank
    to fail ends the run: the others are terminated and a ``TrainingError`` names the rank and its error.
    """
    context = torch.multiprocessing.get_context("spawn")
    reports = context.Queue()
    port = _free_port()
    mtl_logger = logging.getLogger("mtl_core")
    logging_wanted = bool(logging.getLogger().handlers or mtl_logger.handlers)
    setup = (nproc, port, mtl_logger.getEffectiveLevel(), logging_wanted)
    with _children_allowed():  # a process copies its launcher's key when it is made, not when it starts
        processes = [
            context.Process(
                target=_rank_main, args=(rank, setup, fn, args, kwargs or {}, reports), name=f"mtl-rank-{rank}"
            )
            for rank in range(nproc)
        ]
    log.info("training in %d processes (ranks 0-%d on 127.0.0.1:%d)", nproc, nproc - 1, port)
    received: list[tuple] = []
    failed = None
    try:
        for process in processes:
            try:
                with _children_allowed():
                    process.start()
            except AssertionError as exc:  # multiprocessing's "daemonic processes are not allowed to have children"
                raise TrainingError(
                    f"train.nproc = {nproc} cannot start its training processes from this one ({exc}): train "
                    "from a process that may have children (not a daemonic multiprocessing worker), launch the "
                    "ranks with torchrun, or set train.nproc = 1"
                ) from None
        pending = list(processes)
        while pending and failed is None:
            multiprocessing.connection.wait([p.sentinel for p in pending], timeout=0.5)
            _drain(reports, received)  # also while waiting: a large result must not fill the pipe and block
            for process in list(pending):
                if process.exitcode is not None:
                    pending.remove(process)
                    if process.exitcode != 0 and failed is None:
                        failed = process
    finally:
        _stop(processes)
    _drain(reports, received)
    errors = [r for r in received if r[0] == "error"]
    if failed is not None or errors:
        raise _failure(processes, failed, errors, nproc)
    results = [r[2] for r in received if r[0] == "result"]
    if not results:
        raise TrainingError(f"training across {nproc} processes ended without rank 0's result (see the log above)")
    return results[0]


def _rank_main(
    rank: int, setup: tuple, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], reports: Any
) -> None:
    """One spawned rank: join the group, run ``fn``, report its result (rank 0) or its error (any rank)."""
    global _GROUP
    nproc, port, level, logging_wanted = setup
    _die_with_parent()
    if logging_wanted and rank == 0:
        logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mtl_core").setLevel(level)
    _quiet_unless_main(rank)
    try:
        _GROUP = _init(rank, nproc, rank, f"tcp://127.0.0.1:{port}")
        try:
            result = fn(*args, **kwargs)
        finally:
            dist.destroy_process_group()
            _GROUP = None
        if rank == 0:
            reports.put(("result", rank, result))
    except BaseException as exc:
        reports.put(
            ("error", rank, exc.__class__.__name__, str(exc), isinstance(exc, MtlError), traceback.format_exc())
        )
        # The launcher logs the traceback once, naming the rank; a re-raise would print it here again.
        raise SystemExit(1) from None


def _init(rank: int, world: int, local_rank: int, init_method: str) -> Group:
    use_gpu = torch.cuda.is_available() and local_rank < torch.cuda.device_count()
    device = torch.device("cuda", local_rank) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if use_gpu else "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=TIMEOUT,
        device_id=device if use_gpu else None,
    )
    return Group(rank=rank, world=world, local_rank=local_rank, device=device)


def leave() -> None:
    """Leave torchrun's group at the end of a training (a spawned rank leaves in ``_rank_main``)."""
    global _GROUP
    if _GROUP is not None and dist.is_initialized():
        dist.destroy_process_group()
    _GROUP = None


def _quiet_unless_main(rank: int) -> None:
    # Rank 0 writes the logs; the others would repeat every line. Their errors still show, and reach the
    # launcher, which names the rank.
    if rank != 0:
        logging.getLogger("mtl_core").setLevel(logging.ERROR)


@contextlib.contextmanager
def _children_allowed() -> Iterator[None]:
    """Let a Celery worker's task (where the DAG's train task runs) start the ranks, and spawn them clean.

    Celery's pool (billiard) runs tasks in daemonic processes and puts its own authentication key type into
    this process's multiprocessing state. multiprocessing refuses children to a daemonic process, so that
    none is orphaned when it ends without cleaning up; on Linux every rank asks the kernel to end it with its
    launcher (``_die_with_parent``), which is that guarantee, so the refusal is lifted while the ranks start
    (elsewhere it stands). And spawning pickles the key, which only the standard library's type allows then.
    """
    from multiprocessing.process import AuthenticationString

    config = multiprocessing.current_process()._config
    saved = dict(config)
    # A spawned process first runs its launcher's main script again, unless that is a module it can import by
    # name. Under Airflow the script is the `airflow` command, which would set Airflow up again in every rank,
    # and a task's environment denies it the metadata database: the rank dies before it trains. The ranks
    # run a function of this package, so they need nothing of the script: hide it while they are made.
    main = sys.modules["__main__"]
    main_file, main_spec = main.__dict__.get("__file__"), getattr(main, "__spec__", None)
    hide_main = main_file is not None and main_spec is None and getattr(main, "__name__", "") == "__main__"
    if hide_main:
        del main.__file__
    if config.get("daemon") and sys.platform.startswith("linux"):
        config["daemon"] = False
    if config.get("authkey") is not None and not isinstance(config["authkey"], AuthenticationString):
        config["authkey"] = AuthenticationString(bytes(config["authkey"]))
    try:
        yield
    finally:
        config.clear()
        config.update(saved)
        if hide_main:
            main.__file__ = main_file


def _die_with_parent() -> None:
    # A launcher killed outright (OOM killer, a task timeout's SIGKILL) cannot terminate its ranks; without
    # this they would train on and write into the model directory a retry is writing into too.
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drain(reports: Any, into: list[tuple]) -> None:
    while True:
        try:
            into.append(reports.get_nowait())
        except queue.Empty:
            return


def _stop(processes: list[Any]) -> None:
    """Terminate the ranks still running (after another's failure, or the launcher's interruption)."""
    for process in processes:
        if process.pid is not None and process.is_alive():
            process.terminate()
    for process in processes:
        if process.pid is not None:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()


def _failure(processes: list[Any], failed: Any, errors: list[tuple], nproc: int) -> TrainingError:
    if errors:
        # The first report is the cause: the other ranks fail only after it, when its connections close.
        _, rank, kind, message, known, trace = errors[0]
        log.error("rank %d of %d failed:\n%s", rank, nproc, trace)
        what = message if known else f"{kind}: {message}"
        # The same error on several ranks (the data all of them read) is one problem, not a failing rank.
        ranks = sorted({r[1] for r in errors if r[2:4] == (kind, message)})
        who = f"rank {rank}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
        return TrainingError(f"training {who} of {nproc} failed: {what}")
    rank = processes.index(failed)
    code = failed.exitcode
    if code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}"
    return TrainingError(
        f"training rank {rank} of {nproc} {how} without reporting an error (out of memory?); the other ranks "
        "were stopped"
    )
