"""Learning: examples and features, the text encoder and its cache, the models, losses and the training loop.

Owns everything from a snapshot's rows to a trained model directory. Must not import MLflow, Airflow or
the registry: the training loop knows nothing of where its model goes. It may use ``judge.metrics`` (pure
functions) for early stopping. Modules:

* ``examples``: sample spaces, labels, leakage-free history features, splits, vocabularies;
* ``text``: the pretrained encoder, the on-disk embedding cache, the text input of the model;
* ``models/``: shared-bottom, MMoE, PLE and ESMM over one input encoder;
* ``losses``: per-task losses and the task weighting strategies;
* ``batches``: examples as tensors, the mixed-task sampler, batched inference;
* ``training``: the training loop (early stopping, warm start, transfer blend);
* ``distributed``: training across processes and GPUs (DistributedDataParallel under spawn or torchrun);
* ``checkpoint``: model directories and training checkpoints, and ``load_model``.
"""

from mtl_core.errors import MtlError


class TrainingError(MtlError):
    """Training cannot start or finish: the message names the task, split or file and what to change."""
