"""The forms a trained model can serve in: the trained fp32 model, and smaller, faster variants of it.

Every form is a ``Scorer``: examples (``learn.examples.Examples``, e.g. from ``frame_examples`` or the online
store) and their text matrix (``learn.text.text_matrix``'s layout: row 0 is "no text") in, one probability
per task and row out. The server and batch scoring hold a Scorer and never care which form it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from mtl_core.config import Settings
from mtl_core.learn.batches import TensorData, predict
from mtl_core.learn.checkpoint import LoadedModel, load_model
from mtl_core.learn.examples import Examples, FeatureSpace

VARIANTS = ("fp32", "int8", "onnx")


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


def load_scorer(model_dir: str | Path, variant: str = "fp32") -> Scorer:
    """The model directory's scorer in the given form."""
    if variant == "fp32":
        return Fp32Scorer(load_model(model_dir))
    raise ValueError(f"unknown model variant {variant!r}: expected one of {', '.join(VARIANTS)}")
