"""Model directories and training checkpoints: what is written, and the one way to load a trained model.

A model directory holds the weights (``model.pt``), the fitted feature space (``features.json``), the
settings it was trained with (``settings.json``) and its validation metrics (``metrics.json``).
``load_model`` is the only reader: training (warm start), evaluation, the registry's pyfunc and the
benchmarks all go through it.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mtl_core.config import Settings, TaskSpec, redact
from mtl_core.learn import TrainingError
from mtl_core.learn.batches import TensorData, predict
from mtl_core.learn.examples import Examples, FeatureSpace, frame_examples
from mtl_core.learn.models import MultiTaskModel, build_model
from mtl_core.learn.text import finetuned_encoder, text_matrix, uses_word_vectors

log = logging.getLogger(__name__)


MODEL_FILE = "model.pt"
FEATURES_FILE = "features.json"
SETTINGS_FILE = "settings.json"
METRICS_FILE = "metrics.json"
CHECKPOINT_FILE = "checkpoint.pt"


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
        """Scoring request (see ``learn.examples.examples_frame``) -> one probability column per task."""
        examples = frame_examples(frame, self.task_names)
        probs = self.predict(examples, np.arange(len(frame)))
        return pd.DataFrame(probs, columns=self.task_names, index=frame.index)


def save_model(
    out: Path,
    model: MultiTaskModel,
    space: FeatureSpace,
    settings: Settings,
    tasks: list[TaskSpec],
    metrics: dict[str, Any],
) -> None:
    torch.save(
        {
            "state_dict": model.state_dict(),
            "task_names": model.task_names,
            "vocab_sizes": space.sizes(),
            "text_in": model.inputs.text_in,
        },
        out / MODEL_FILE,
    )
    space.save(out / FEATURES_FILE)
    stored = settings.model_copy(update={"tasks": tasks})
    # The model directory goes to the registry, where many can read it: no connection password in it.
    (out / SETTINGS_FILE).write_text(redact(stored.model_dump_json(indent=2)))
    (out / METRICS_FILE).write_text(json.dumps({"tasks": metrics}, indent=2))


def trained_task_names(model_dir: str | Path) -> list[str]:
    """The tasks a model directory was trained on, from its settings (no weights are loaded)."""
    path = Path(model_dir) / SETTINGS_FILE
    if not path.is_file():
        raise TrainingError(f"{model_dir} is not a whole model directory: {SETTINGS_FILE} is missing")
    return [task["name"] for task in json.loads(path.read_text())["tasks"]]


def load_model(model_dir: str | Path, cache_dir: str | Path | None = None) -> LoadedModel:
    """A trained model ready to score; ``cache_dir`` is where text vectors are cached (default: as trained)."""
    path = Path(model_dir)
    if not (path / MODEL_FILE).is_file():
        raise TrainingError(f"{path} is not a model directory: {MODEL_FILE} is missing (train one with mtl train)")
    for name in (SETTINGS_FILE, FEATURES_FILE):
        if not (path / name).is_file():
            raise TrainingError(
                f"{path} is not a whole model directory: {name} is missing (re-train or re-download it)"
            )
    stored = _load_tensors(path / MODEL_FILE)
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
        stored["vocab_sizes"],
        stored["task_names"],
        settings.model,
        stored["text_in"],
        stored["text_in"] > 0,
        encoder,
        word_pooling=uses_word_vectors(settings),
    )
    model.load_state_dict(stored["state_dict"])
    model.eval()
    return LoadedModel(
        model=model,
        space=space,
        settings=settings,
        task_names=stored["task_names"],
        text_in=stored["text_in"],
        cache_dir=Path(cache_dir) if cache_dir else settings.resolved_text_cache_dir,
    )


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """The training loop's whole state (weights, optimiser, sampler, best so far), replaced atomically."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The training state ``save_checkpoint`` wrote (the loop resumes from it when a task is retried)."""
    return _load_tensors(path)


def _load_tensors(path: Path) -> dict[str, Any]:
    """Tensors, numbers, text, lists and dicts only: a file that asks to build anything else is refused.

    Model files come from the artifact store and checkpoints from a shared disk; whoever can write there
    must not be able to run code on the machine that loads them, which a plain pickle would allow.
    """
    try:
        loaded = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise TrainingError(
            f"{path} refused: it holds more than tensors and plain values ({reason[:300]}); only files this "
            "project wrote load, so re-train the model or restore the file from a trusted copy"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise TrainingError(f"{path} refused: it is not a readable torch file ({exc.__class__.__name__})") from None
    if not isinstance(loaded, dict):
        raise TrainingError(f"{path} refused: it holds a {type(loaded).__name__}, not the dict this project writes")
    return loaded
