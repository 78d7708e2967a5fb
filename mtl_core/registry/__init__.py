"""The MLflow registry: runs and lineage, the pyfunc model, aliases and promotion, decisions, status.

Owns every MLflow call of the project. Must not import Airflow, and knows training only through the
model directory it packages (``learn.checkpoint``). Modules:

* ``store``: connecting to the tracking store and turning its failures into one clear line;
* ``runs``: one MLflow run per DAG run and what it is logged with (params, metrics, lineage, plots);
* ``plots``: ROC and calibration plots;
* ``pyfunc``: the model as an MLflow pyfunc, its registration, the champion's download;
* ``aliases``: champion / challenger / previous, promotion and rollback;
* ``decisions``: the gate's decision written onto a version;
* ``status``: what the registry says now.
"""

import os

# MLflow 3 starts its telemetry client when it is imported; the variable must be set before that, and
# every module of this package imports mlflow after this line has run.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mtl_core.registry.aliases import CHALLENGER, CHAMPION, PREVIOUS, current_alias, make_champion, rollback  # noqa: E402
from mtl_core.registry.decisions import record_decision  # noqa: E402
from mtl_core.registry.pyfunc import champion_model_dir, log_and_register_model  # noqa: E402
from mtl_core.registry.runs import RUN_KEY_TAG, finish_run, log_training, run_for_key  # noqa: E402
from mtl_core.registry.status import format_status, status  # noqa: E402
from mtl_core.registry.store import MODEL_NAME, RegistryError, configure  # noqa: E402

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "MODEL_NAME",
    "PREVIOUS",
    "RUN_KEY_TAG",
    "RegistryError",
    "champion_model_dir",
    "configure",
    "current_alias",
    "finish_run",
    "format_status",
    "log_and_register_model",
    "log_training",
    "make_champion",
    "record_decision",
    "rollback",
    "run_for_key",
    "status",
]
