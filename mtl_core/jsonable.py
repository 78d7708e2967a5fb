"""One way to turn what the pipeline computes into JSON: numpy scalars, NaN, timestamps and paths included.

JSON has no NaN, and MLflow's UI and most readers choke on the bare ``NaN`` that ``json.dumps`` writes, so
a missing or undefined number becomes ``null``. Anything JSON cannot hold natively becomes its text.
"""

from __future__ import annotations

import math
from datetime import date, datetime
from typing import Any

import numpy as np
import pandas as pd


def to_jsonable(value: Any) -> Any:
    """``value`` with every part a JSON value: dicts (keys as text), lists, text, numbers, booleans, null."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [to_jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, (pd.Timestamp, datetime, date)):
        return value.isoformat()
    return str(value)
