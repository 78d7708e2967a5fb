"""The forms a trained model can serve in: the trained fp32 model, and smaller, faster variants of it.

Every form is a ``Scorer``: examples (``learn.examples.Examples``, e.g. from ``frame_examples`` or the online
store) and their text matrix (``learn.text.text_matrix``'s layout: row 0 is "no text") in, one probability
per task and row out. The server and batch scoring hold a Scorer and never care which form it is.

The variants (``build_variants``), written beside each other in one directory:

* ``int8/model_int8.pt``: the model with every ``nn.Linear`` dynamically quantized to int8 (torch.ao), its
  input vector smoothed first (``_SmoothedInput``);
* ``onnx/model.onnx``: the model's scoring graph (text vectors in, probabilities out) for onnxruntime;
* ``report.json``: per variant and task the holdout AUC against the fp32 model's, the latency for 1 and 100
  rows, rows/s, the file size, and whether every task's AUC loss stayed within the bound
  (``serve.variant_max_auc_loss``).

Neither variant holds a text encoder: text reaches them as vectors (the online store's, or
``text_matrix``'s), so a fine-tuned encoder's vectors are computed by the fp32 model's encoder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from mtl_core.config import Settings
from mtl_core.data.extract import replace_dir
from mtl_core.errors import MtlError
from mtl_core.jsonable import to_jsonable
from mtl_core.judge.metrics import roc_auc
from mtl_core.learn.batches import Batch, TensorData, predict
from mtl_core.learn.checkpoint import MODEL_FILE, LoadedModel, load_model
from mtl_core.learn.examples import Examples, FeatureSpace
from mtl_core.learn.models import MultiTaskModel
from mtl_core.learn.text import file_sha256, text_matrix, uses_word_vectors

log = logging.getLogger(__name__)

VARIANTS = ("fp32", "int8", "onnx")
CHOICES = (*VARIANTS, "fastest")
INT8_FILE = "int8/model_int8.pt"
ONNX_FILE = "onnx/model.onnx"
REPORT_FILE = "report.json"
VARIANT_FILES = {"int8": INT8_FILE, "onnx": ONNX_FILE}
# Rows per call of the scoring graph, as ``batches.predict`` scores: memory stays flat on big inputs.
CHUNK_ROWS = 8192
ONNX_INPUTS = ("categorical", "numeric", "text", "text_row", "text_vectors")


class VariantError(MtlError):
    """A model variant cannot be built or served: the message names the variant, the directory and the setting."""


class Scorer(Protocol):
    variant: str
    task_names: list[str]
    space: FeatureSpace
    settings: Settings

    def score(self, examples: Examples, texts: np.ndarray | None) -> np.ndarray:
        """Probabilities [len(examples), len(task_names)], float32."""
        ...


class Fp32Scorer:
    """The trained model as it was trained."""

    variant = "fp32"

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.task_names = loaded.task_names
        self.space = loaded.space
        self.settings = loaded.settings

    def score(self, examples: Examples, texts: np.ndarray | None) -> np.ndarray:
        return predict(self.loaded.model, TensorData(examples, self.space, texts), np.arange(len(examples)))


# --------------------------------------------------------------------------------------------------
# int8: dynamic quantization of the linear layers, after smoothing the input vector.
@contextmanager
def _without_text_encoder(model: MultiTaskModel) -> Iterator[MultiTaskModel]:
    """The model without its fine-tuned text encoder (if any): variants take text as vectors, and quantizing
    or exporting the encoder would only make their files bigger."""
    encoder, model.text_encoder = model.text_encoder, None
    try:
        yield model
    finally:
        model.text_encoder = encoder


class _SmoothedInput(nn.Module):
    """The shared architecture reading its input vector divided by a per-column scale (SmoothQuant, Xiao et al.
    2023); the linear layers that read the vector hold their weights multiplied by the same scale, so the fp32
    function is unchanged.

    Why: dynamic quantization gives a batch's whole input vector one int8 range. The vector concatenates
    embeddings (|x| < 0.4 on a trained model) with history numerics and field dot products (up to ~15), so
    one range rounds the embeddings away: quantized as is, the 9,000-user shop's model lost 0.0035 AUC on
    cvr and 0.0028 on ctr (the bound is 0.002). These layers hold ~90 % of the linear weights, so leaving
    them in fp32 would leave little to quantize. Dividing column j by s_j = sqrt(max|x_j| / max|W_j|) moves
    half of each column's range into the weights: the AUC loss fell to <= 0.0005 per task on that model.
    """

    def __init__(self, inner: nn.Module, dim: int):
        super().__init__()
        self.inner = inner
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.inner(x / self.scale)


def _quantize(model: MultiTaskModel, calibration: Batch | None = None) -> nn.Module:
    """An int8 copy of ``model`` (which is left as it is).

    With ``calibration`` (a batch of typical rows) the input vector is smoothed first (``_SmoothedInput``);
    without, only the structure is built, for ``Int8Scorer.load`` to load the saved weights into.
    """
    with _without_text_encoder(model):
        copy = deepcopy(model)
    copy.eval()
    dim = copy.inputs.output_dim
    smoothed = _SmoothedInput(copy.shared, dim)
    if calibration is not None:
        _smooth(copy, smoothed, calibration)
    copy.shared = smoothed
    with warnings.catch_warnings():
        # torch 2.13 still ships torch.ao.quantization's eager dynamic quantization and warns that it moves to
        # torchao; the issue asks for torch.ao, which needs no extra package.
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        quantized = torch.ao.quantization.quantize_dynamic(copy, {nn.Linear}, dtype=torch.qint8, inplace=True)
    quantized.eval()
    return quantized


@torch.no_grad()
def _smooth(model: MultiTaskModel, smoothed: _SmoothedInput, calibration: Batch) -> None:
    """Set the smoothing scale from the calibration rows and fold it into the layers that read the input."""
    x = model.inputs(calibration.inputs, calibration.text)
    readers: list[nn.Linear] = []
    # The layers that read the input vector itself (whatever the architecture): found by watching which
    # linear layers receive that very tensor.
    hooks = [
        module.register_forward_hook(lambda module, args, _: readers.append(module) if args[0] is x else None)
        for module in model.shared.modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        model.shared(x)
    finally:
        for hook in hooks:
            hook.remove()
    if not readers:
        return
    x_max = x.abs().amax(dim=0)
    w_max = torch.stack([layer.weight.abs().amax(dim=0) for layer in readers]).amax(dim=0).clamp_min(1e-8)
    # A column the calibration rows never set (max 0) keeps scale 1: dividing by a tiny scale would blow it
    # up on the first row that does set it.
    scale = torch.where(x_max > 1e-6, (x_max / w_max).sqrt(), torch.ones_like(x_max))
    for layer in readers:
        layer.weight.mul_(scale)
    smoothed.scale.copy_(scale)


class Int8Scorer:
    """The model with int8 weights in its linear layers (activations quantized on the fly, per batch)."""

    variant = "int8"

    def __init__(self, loaded: LoadedModel, quantized: nn.Module):
        self.model = quantized
        self.task_names = loaded.task_names
        self.space = loaded.space
        self.settings = loaded.settings

    @classmethod
    def build(cls, loaded: LoadedModel, path: Path, calibration: Batch) -> Int8Scorer:
        """Quantize the loaded fp32 model, smoothed on the ``calibration`` rows, and save it at ``path``."""
        quantized = _quantize(loaded.model, calibration)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        torch.save({"state_dict": quantized.state_dict()}, tmp)
        os.replace(tmp, path)
        return cls(loaded, quantized)

    @classmethod
    def load(cls, loaded: LoadedModel, path: Path) -> Int8Scorer:
        """The int8 model saved by ``build``.

        On torch 2.13 a dynamically quantized state dict (int8 tensors with their scales, packed-parameter
        dtypes) loads with ``weights_only=True``, so no pickle runs. The saved weights are what is served,
        not a new quantization of the fp32 weights: the smoothing scales came from calibration rows the
        server does not have, and the int8 model served is then exactly the one whose AUC and latency the
        report measured, whatever a later torch's quantizer would round differently.
        """
        try:
            with warnings.catch_warnings():
                # Quantized tensors still rebuild through TypedStorage, which torch warns about on every load.
                warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
                stored = torch.load(path, weights_only=True)
        except Exception as exc:  # an unpickling refusal, a truncated file, a foreign format
            raise VariantError(
                f"{path} refused as the int8 variant ({exc.__class__.__name__}: {_first_line(exc)}); rebuild the "
                "variants of this model or set serve.variant to fp32"
            ) from None
        quantized = _quantize(loaded.model)
        try:
            quantized.load_state_dict(stored["state_dict"])
        except (KeyError, TypeError, RuntimeError) as exc:
            raise VariantError(
                f"{path} does not fit the model it is loaded with ({exc.__class__.__name__}: {_first_line(exc)}); "
                "rebuild the variants of this model or set serve.variant to fp32"
            ) from None
        quantized.eval()
        return cls(loaded, quantized)

    def score(self, examples: Examples, texts: np.ndarray | None) -> np.ndarray:
        return predict(self.model, TensorData(examples, self.space, texts), np.arange(len(examples)))


# --------------------------------------------------------------------------------------------------
# ONNX: the scoring graph, text vectors in, probabilities out, run by onnxruntime.
class _ScoringGraph(nn.Module):
    """The model's forward with plain tensor inputs, the layout ``TensorData.batch`` gives the model.

    ``categorical`` [rows, fields] holds the vocabulary indices in ``InputEncoder.names`` order; ``text``
    [rows] each row's text index (0: no text); ``text_vectors`` the batch's distinct texts ([texts, words,
    dim] word vectors, or [texts, dim] sentence vectors) and ``text_row`` [rows] which of them each row
    has. Sentence vectors are spread to the rows here, word vectors by the model after pooling them once
    per distinct text.
    """

    def __init__(self, model: MultiTaskModel, word_pooling: bool):
        super().__init__()
        self.model = model
        self.names = list(model.inputs.names)
        self.word_pooling = word_pooling

    def _batch(self, categorical: torch.Tensor, numeric: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = {name: categorical[:, i] for i, name in enumerate(self.names)}
        batch["numeric"] = numeric
        return batch

    def forward(
        self,
        categorical: torch.Tensor,
        numeric: torch.Tensor,
        text: torch.Tensor,
        text_row: torch.Tensor,
        text_vectors: torch.Tensor,
    ) -> torch.Tensor:
        batch = self._batch(categorical, numeric)
        batch["text"] = text
        if self.word_pooling:
            batch["text_row"] = text_row
        else:
            text_vectors = text_vectors[text_row]
        return torch.sigmoid(self.model(batch, text_vectors))


class _TextlessScoringGraph(_ScoringGraph):
    """A model trained without text (``text.enabled: false``) takes no text inputs."""

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.sigmoid(self.model(self._batch(categorical, numeric), None))


def _uses_text(loaded: LoadedModel) -> bool:
    return loaded.model.inputs.use_text


def _text_shape(loaded: LoadedModel) -> tuple[int, ...]:
    """The shape of one text's vectors as the model reads them: (words, dim) or (dim,)."""
    if uses_word_vectors(loaded.settings):
        return (loaded.settings.text.max_words, loaded.text_in)
    return (loaded.text_in,)


def export_onnx(loaded: LoadedModel, path: Path) -> None:
    """Export the model's scoring graph to ONNX with dynamic row and distinct-text axes.

    torch 2.13's exporter is ``torch.onnx.export(dynamo=True)`` (torch.export, then onnxscript); the
    TorchScript exporter still runs but is deprecated. The example inputs are synthetic, with different
    sizes on the two dynamic axes (7 rows, 3 texts), so neither size is specialised into the graph.
    """
    word_pooling = uses_word_vectors(loaded.settings)
    rows, texts = torch.export.Dim("rows"), torch.export.Dim("texts")
    fields = len(loaded.model.inputs.names)
    categorical = torch.zeros((7, fields), dtype=torch.int64)
    numeric = torch.zeros((7, loaded.model.inputs.dense_field.in_features), dtype=torch.float32)
    with _without_text_encoder(loaded.model) as model:
        model.eval()
        if _uses_text(loaded):
            graph: nn.Module = _ScoringGraph(model, word_pooling)
            args: tuple[torch.Tensor, ...] = (
                categorical,
                numeric,
                torch.tensor([1, 2, 0, 1, 3, 2, 1]),
                torch.tensor([1, 2, 0, 1, 2, 2, 1]),
                torch.randn((3, *_text_shape(loaded)), generator=torch.Generator().manual_seed(0)),
            )
            names = list(ONNX_INPUTS)
            dynamic: dict[str, dict[int, Any]] = {
                "categorical": {0: rows},
                "numeric": {0: rows},
                "text": {0: rows},
                "text_row": {0: rows},
                "text_vectors": {0: texts},
            }
        else:
            graph = _TextlessScoringGraph(model, word_pooling)
            args = (categorical, numeric)
            names = list(ONNX_INPUTS[:2])
            dynamic = {"categorical": {0: rows}, "numeric": {0: rows}}
        graph.eval()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with _quiet_exporter(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    graph,
                    args,
                    dynamo=True,
                    input_names=names,
                    output_names=["probabilities"],
                    dynamic_shapes=dynamic,
                    verbose=False,
                )
            program.save(str(tmp), external_data=False)
            os.replace(tmp, path)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise VariantError(
                f"exporting the model to ONNX failed ({exc.__class__.__name__}: {_first_line(exc)}); the onnx "
                "variant cannot be built for this model (serve it with serve.variant fp32 or int8)"
            ) from exc


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs a warning per optional torchvision operator it cannot register, and its graph passes
    a line per constant they fold or merge: hundreds of lines that say nothing to whoever reads a task log."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class OnnxScorer:
    """The exported scoring graph run by onnxruntime on the CPU."""

    variant = "onnx"

    def __init__(self, loaded: LoadedModel, path: Path):
        import onnxruntime as ort

        self.task_names = loaded.task_names
        self.space = loaded.space
        self.settings = loaded.settings
        self.names = list(loaded.model.inputs.names)
        self.uses_text = _uses_text(loaded)
        self.text_shape = _text_shape(loaded)
        options = ort.SessionOptions()
        # As many threads as torch uses, so every variant runs with the same CPU share (one knob:
        # torch.set_num_threads / OMP_NUM_THREADS); the graph is a chain of small ops, nothing to run in parallel.
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for a truncated or foreign file
            raise VariantError(
                f"{path} is not a loadable ONNX model ({exc.__class__.__name__}: {_first_line(exc)}); rebuild the "
                "variants of this model or set serve.variant to fp32"
            ) from None
        self.inputs = [i.name for i in self.session.get_inputs()]

    def score(self, examples: Examples, texts: np.ndarray | None) -> np.ndarray:
        if self.uses_text:
            if texts is None:
                raise VariantError("the onnx variant of this model reads text vectors: pass the text matrix")
            if tuple(texts.shape[1:]) != self.text_shape:
                raise VariantError(
                    f"text vectors of shape {tuple(texts.shape[1:])} per text, the onnx variant takes "
                    f"{self.text_shape} (text.max_words, encoder dim) as the model was trained"
                )
        encoded = examples.encode(self.space)
        categorical = np.column_stack([encoded[name] for name in self.names]).astype(np.int64, copy=False)
        numeric = np.ascontiguousarray(encoded["numeric"], dtype=np.float32)
        text_index = np.asarray(encoded["text"], dtype=np.int64)
        out = [np.zeros((0, len(self.task_names)), dtype=np.float32)]
        for start in range(0, len(examples), CHUNK_ROWS):
            chunk = slice(start, start + CHUNK_ROWS)
            feed = {"categorical": categorical[chunk], "numeric": numeric[chunk]}
            if self.uses_text:
                # Each distinct text of the chunk once, as TensorData.batch gathers them.
                distinct, text_row = np.unique(text_index[chunk], return_inverse=True)
                feed |= {
                    "text": text_index[chunk],
                    "text_row": text_row.astype(np.int64),
                    "text_vectors": np.ascontiguousarray(texts[distinct], dtype=np.float32),
                }
            out.append(self.session.run(None, {name: feed[name] for name in self.inputs})[0])
        return np.concatenate(out).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------------
# Building the variants and their report.
def build_variants(
    model_dir: str | Path,
    out_dir: str | Path,
    examples: Examples,
    rows: np.ndarray,
    *,
    max_auc_loss: float | None = None,
    calls: int = 300,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Write the int8 and ONNX variants of ``model_dir`` and their report into ``out_dir``; return the report.

    ``rows``: the holdout rows of ``examples`` the AUC and speed are measured on (each task's AUC on its
    ``task_rows(t, "holdout")`` among them). ``max_auc_loss``: the bound every task's AUC loss must stay
    under (default: the model's ``serve.variant_max_auc_loss``). ``calls``: timed calls per latency figure,
    after a warm-up. The directory appears whole or not at all.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        raise VariantError(f"no holdout rows to measure the variants of {model_dir} on")
    loaded = load_model(model_dir, cache_dir)
    bound = loaded.settings.serve.variant_max_auc_loss if max_auc_loss is None else float(max_auc_loss)
    holdout, texts = _with_texts(loaded, examples, rows)
    calibration = _calibration(loaded, examples, rows)

    staging = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        Int8Scorer.build(loaded, staging / INT8_FILE, calibration)
        export_onnx(loaded, staging / ONNX_FILE)
        # Measured as served: each variant loaded back from its file.
        scorers: dict[str, Scorer] = {
            "fp32": Fp32Scorer(loaded),
            "int8": Int8Scorer.load(loaded, staging / INT8_FILE),
            "onnx": OnnxScorer(loaded, staging / ONNX_FILE),
        }
        files = {"fp32": model_dir / MODEL_FILE, "int8": staging / INT8_FILE, "onnx": staging / ONNX_FILE}
        task_rows = _task_rows(examples, rows)
        report: dict[str, Any] = {
            "model_sha256": file_sha256(model_dir / MODEL_FILE),
            "max_auc_loss": bound,
            "holdout_rows": len(rows),
            "calibration_rows": len(calibration.labels),
            "timing": {"calls": calls, "warmup": _warmup(calls), "torch_threads": torch.get_num_threads()},
            "variants": {name: _auc_entry(task_rows, holdout, texts, scorer) for name, scorer in scorers.items()},
        }
        single, hundred = _timing_rows(len(holdout), calls)
        latency = {
            size: _latencies(scorers, holdout, texts, requests, _warmup(calls))
            for size, requests in (("1", single), ("100", hundred))
        }
        fp32 = report["variants"]["fp32"]
        for name, entry in report["variants"].items():
            entry.update(file=_relative(files[name], staging), size_bytes=files[name].stat().st_size)
            entry["latency_ms"] = {size: latency[size][name] for size in latency}
            if name == "fp32":
                entry.update(within_bound=True, why="the trained model")
                continue
            for task, figures in entry["tasks"].items():
                figures.update(
                    fp32_auc=fp32["tasks"][task]["auc"], auc_delta=figures["auc"] - fp32["tasks"][task]["auc"]
                )
            entry["max_abs_score_diff"] = float(np.abs(entry.pop("probabilities") - fp32["probabilities"]).max())
            entry["within_bound"], entry["why"] = _judge(entry["tasks"], bound)
        fp32.pop("probabilities")
        for entry in report["variants"].values():
            entry["speedup_1row_p99"] = fp32["latency_ms"]["1"]["p99"] / entry["latency_ms"]["1"]["p99"]
            entry["speedup_rows_per_s"] = entry["rows_per_s"] / fp32["rows_per_s"]
        report = to_jsonable(report)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2))
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for name in VARIANTS[1:]:
        entry = report["variants"][name]
        log.info(
            "variant %s: 1-row p99 %.2f ms (fp32 %.2f), %.0f rows/s (fp32 %.0f), %s",
            name,
            entry["latency_ms"]["1"]["p99"],
            report["variants"]["fp32"]["latency_ms"]["1"]["p99"],
            entry["rows_per_s"],
            report["variants"]["fp32"]["rows_per_s"],
            entry["why"],
        )
    return report


def _with_texts(loaded: LoadedModel, examples: Examples, rows: np.ndarray) -> tuple[Examples, np.ndarray | None]:
    """The rows as Examples of their own and their text matrix (vectors of the model's encoder)."""
    subset, _ = _subset(examples, rows, None)
    if not _uses_text(loaded):
        return subset, None
    return subset, text_matrix(subset.texts, loaded.settings, loaded.cache_dir, False, loaded.model.text_encoder)


def _calibration(loaded: LoadedModel, examples: Examples, rows: np.ndarray, size: int = 20_000) -> Batch:
    """Rows the int8 smoothing scales are set on: the validation split (the holdout judges the variant), else
    the given rows; a seeded sample, so a rebuilt variant is the same."""
    valid = np.flatnonzero(examples.split == "valid")
    pool = valid if len(valid) else rows
    chosen = np.sort(np.random.default_rng(0).choice(pool, size=min(size, len(pool)), replace=False))
    subset, texts = _with_texts(loaded, examples, chosen)
    return TensorData(subset, loaded.space, texts).batch(np.arange(len(subset)))


def _auc_entry(
    task_rows: dict[str, tuple[np.ndarray, np.ndarray]], holdout: Examples, texts: np.ndarray | None, scorer: Scorer
) -> dict[str, Any]:
    """Per task the holdout AUC of the scorer's probabilities, and rows/s of that scoring pass (after a short
    warm-up pass, which pays for first-call allocations instead)."""
    warm, warm_texts = _subset(holdout, np.arange(min(len(holdout), 1000)), texts)
    scorer.score(warm, warm_texts)
    start = time.perf_counter()
    probs = scorer.score(holdout, texts)
    spent = time.perf_counter() - start
    tasks = {}
    for task, (where, labels) in task_rows.items():
        tasks[task] = {"auc": roc_auc(labels, probs[where, scorer.task_names.index(task)]), "n": len(where)}
    return {"tasks": tasks, "rows_per_s": len(holdout) / max(spent, 1e-9), "probabilities": probs}


def _judge(tasks: dict[str, dict[str, Any]], bound: float) -> tuple[bool, str]:
    """Within the bound when every task's AUC loss is below it; a task whose AUC is undefined on the holdout
    (one class only) gives no evidence, so the variant is not cleared on it."""
    undefined = [task for task, entry in tasks.items() if not np.isfinite(entry["auc_delta"])]
    if undefined:
        return False, f"AUC undefined on the holdout for {', '.join(undefined)}: the loss cannot be checked"
    if not tasks:
        return False, "no task has holdout rows: the loss cannot be checked"
    worst = min(tasks, key=lambda task: tasks[task]["auc_delta"])
    loss = -tasks[worst]["auc_delta"]
    if loss < bound:
        return True, f"largest AUC loss {loss:.4f} ({worst}) < {bound}"
    return False, f"AUC loss {loss:.4f} on {worst} >= {bound}"


def _task_rows(examples: Examples, rows: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task: positions within ``rows`` of its holdout rows, and their labels."""
    position = np.full(len(examples), -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    found = {}
    for t, task in enumerate(examples.task_names):
        own = np.intersect1d(examples.task_rows(t, "holdout"), rows)
        if len(own):
            found[task] = (position[own], examples.labels[own, t])
    return found


def _subset(examples: Examples, rows: np.ndarray, texts: np.ndarray | None) -> tuple[Examples, np.ndarray | None]:
    """The examples' ``rows`` as Examples of their own, with only their texts (and text matrix rows)."""
    index = examples.text_index[rows]
    kept = np.union1d([0], index)  # row 0 (no text) stays row 0
    per_row = {name: getattr(examples, name)[rows] for name in ("numeric", "split", "time", "event_id")}
    subset = dataclasses.replace(
        examples,
        raw={name: values[rows] for name, values in examples.raw.items()},
        text_index=np.searchsorted(kept, index).astype(np.int64),
        texts=[examples.texts[i - 1] for i in kept[1:]],
        labels=examples.labels[rows],
        click_event_id=examples.click_event_id[rows],
        new_user=examples.new_user[rows],
        cold_item=examples.cold_item[rows],
        **per_row,
    )
    return subset, (texts[kept] if texts is not None else None)


def _warmup(calls: int) -> int:
    return max(5, calls // 10)


def _timing_rows(n: int, calls: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Rows of requests of 1 and of 100 rows, spread over the whole holdout (every sample space, rows with and
    without text), as the server would receive them: warm-up calls first, then ``calls`` timed ones."""
    starts = np.linspace(0, max(n - 1, 0), calls + _warmup(calls)).astype(np.int64)
    width = min(100, n)
    return [np.array([s]) for s in starts], [np.arange(s, s + width) % n for s in starts]


def _latencies(
    scorers: dict[str, Scorer],
    holdout: Examples,
    texts: np.ndarray | None,
    requests: list[np.ndarray],
    warmup: int,
) -> dict[str, dict[str, float]]:
    """p50 and p99 ms of one ``score`` call per scorer. The scorers take turns on each request (in a rotating
    order), so a burst of load from other processes on the machine falls on all of them alike; the first
    ``warmup`` requests (allocator, thread pools, onnxruntime's first runs) are not timed. Each request is
    cut from the holdout before the clock starts, one at a time (all at once would hold hundreds of copies of
    their word vectors)."""
    names = list(scorers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i, rows in enumerate(requests):
        examples, request_texts = _subset(holdout, rows, texts)
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            scorers[name].score(examples, request_texts)
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    return {
        name: {"p50": float(np.percentile(spent, 50)), "p99": float(np.percentile(spent, 99))}
        for name, spent in times.items()
    }


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name  # the fp32 weights live in the model directory, not among the variants


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


# --------------------------------------------------------------------------------------------------
# Loading the form the settings ask for.
def read_report(variants_dir: str | Path) -> dict[str, Any]:
    """The report ``build_variants`` wrote into ``variants_dir``."""
    path = Path(variants_dir) / REPORT_FILE
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VariantError(
            f"{variants_dir} holds no readable variant report ({REPORT_FILE}: {exc.__class__.__name__}); rebuild "
            "or re-download the variants, or set serve.variant to fp32"
        ) from None
    if not isinstance(report, dict) or not isinstance(report.get("variants"), dict):
        raise VariantError(f"{path} is not a variant report; rebuild the variants or set serve.variant to fp32")
    return report


def judge_variant(report: dict[str, Any], variant: str, max_auc_loss: float | None = None) -> tuple[bool, str]:
    """Whether ``variant`` lost less AUC than the bound on every task, and why, from the report's AUC changes;
    the bound is ``max_auc_loss`` when given (today's ``serve.variant_max_auc_loss``), else the report's."""
    if variant == "fp32":
        return True, "the trained model"
    entry = report["variants"].get(variant)
    if entry is None:
        return False, "not in the report"
    bound = report.get("max_auc_loss") if max_auc_loss is None else max_auc_loss
    if bound is None:
        return False, "the report states no AUC bound"
    tasks = {
        task: {"auc_delta": np.nan if figures.get("auc_delta") is None else figures["auc_delta"]}
        for task, figures in entry.get("tasks", {}).items()
    }
    return _judge(tasks, float(bound))


def within_bound(report: dict[str, Any], variant: str, max_auc_loss: float | None = None) -> bool:
    return judge_variant(report, variant, max_auc_loss)[0]


def fastest_variant(report: dict[str, Any], max_auc_loss: float | None = None) -> str:
    """The variant with the lowest 1-row p99 latency among those within the bound (fp32 always is)."""
    timed = {
        name: entry["latency_ms"]["1"]["p99"]
        for name, entry in report["variants"].items()
        if name in VARIANTS and within_bound(report, name, max_auc_loss)
    }
    return min(timed, key=timed.get) if timed else "fp32"


def load_scorer(
    model_dir: str | Path,
    variant: str = "fp32",
    variants_dir: str | Path | None = None,
    *,
    max_auc_loss: float | None = None,
) -> Scorer:
    """The model directory's scorer in the given form (``serve.variant``).

    "fp32" | "int8" | "onnx" | "fastest": the variant with the lowest 1-row p99 among those within the AUC
    bound (fp32 when none is, or when the version has no variants). ``variants_dir``: what ``build_variants``
    wrote for this model (``registry.variants.download_variants``). ``max_auc_loss``: judge the bound again
    with today's ``serve.variant_max_auc_loss`` instead of the report's verdict.
    """
    model_dir = Path(model_dir)
    if variant not in CHOICES:
        raise VariantError(
            f"unknown model variant {variant!r} for {model_dir}: serve.variant must be one of {', '.join(CHOICES)}"
        )
    if variant == "fp32":
        return Fp32Scorer(load_model(model_dir))
    if variants_dir is None or not (Path(variants_dir) / REPORT_FILE).is_file():
        where = "no variants directory was given" if variants_dir is None else f"{variants_dir} holds no {REPORT_FILE}"
        if variant == "fastest":
            log.warning(
                "serving fp32 for serve.variant fastest: %s for %s (registered before variants?)", where, model_dir
            )
            return Fp32Scorer(load_model(model_dir))
        raise VariantError(
            f"the {variant} variant of {model_dir} is missing ({where}; versions registered before variants have "
            "none): set serve.variant to fp32 or fastest"
        )
    variants_dir = Path(variants_dir)
    report = read_report(variants_dir)
    weights = model_dir / MODEL_FILE
    if weights.is_file() and report.get("model_sha256") != file_sha256(weights):
        raise VariantError(
            f"the variants in {variants_dir} were built from another model than {model_dir} (weights differ): "
            "download the variants of this version, or set serve.variant to fp32"
        )
    chosen = fastest_variant(report, max_auc_loss) if variant == "fastest" else variant
    if chosen == "fp32":
        return Fp32Scorer(load_model(model_dir))
    cleared, why = judge_variant(report, chosen, max_auc_loss)
    if not cleared:
        bound = report.get("max_auc_loss") if max_auc_loss is None else max_auc_loss
        raise VariantError(
            f"the {chosen} variant of {model_dir} is outside the AUC bound ({why}; serve.variant_max_auc_loss = "
            f"{bound}): set serve.variant to fastest or fp32"
        )
    path = variants_dir / VARIANT_FILES[chosen]
    if not path.is_file():
        raise VariantError(
            f"the {chosen} variant of {model_dir} is missing: {path} does not exist (re-download the variants), or "
            "set serve.variant to fp32"
        )
    loaded = load_model(model_dir)
    scorer: Scorer = Int8Scorer.load(loaded, path) if chosen == "int8" else OnnxScorer(loaded, path)
    if variant == "fastest":
        log.info("serve.variant fastest: serving %s of %s", chosen, model_dir)
    return scorer
