"""The oracle: the shop's true probability behind each example, the best any model could score.

The only reader of the shop's truth outside the simulator (a test enforces it). On a warehouse that is not a
simulated shop there is no truth, and every oracle figure is None.
"""

from __future__ import annotations

import numpy as np
from sqlalchemy.engine import Engine

from mtl_core.config import TaskSpec
from mtl_core.data.shop import true_probabilities
from mtl_core.learn.examples import Examples


def oracle_probabilities(
    engine: Engine | None, task: TaskSpec, examples: Examples, rows: np.ndarray
) -> np.ndarray | None:
    """The shop's true probability behind each row's label (simulated data only; None without truth tables)."""
    if engine is None:
        return None
    truth = true_probabilities(
        engine, task.sample_space, task.label, examples.event_id[rows], examples.click_event_id[rows],
        examples.raw["user"][rows], examples.time[rows],
    )  # fmt: skip
    if truth is None or np.isnan(truth).any():
        return None
    return truth
