"""Data quality: is a snapshot fit to train on? Great Expectations suites plus whole-snapshot checks.

Owns the GX runner (``suites``), the checks GX cannot express (``checks``: label rates, label leakage,
references, volume against the previous snapshot) and how a validation is reported (``report``: the one-line
failures, the terminal summary, the HTML page). Drift monitoring belongs here too. Reads snapshots only;
must not import training, the registry or Airflow, and must not read the shop's truth.
"""

from mtl_core.quality.checks import check_label_rates, check_leakage, check_references
from mtl_core.quality.report import ValidationFailed, ValidationReport, failure_message, validate_command_output
from mtl_core.quality.suites import DEFAULT_EXPECTATIONS_DIR, ValidationSetupError, run_validation, validate_snapshot

__all__ = [
    "DEFAULT_EXPECTATIONS_DIR",
    "ValidationFailed",
    "ValidationReport",
    "ValidationSetupError",
    "check_label_rates",
    "check_leakage",
    "check_references",
    "failure_message",
    "run_validation",
    "validate_command_output",
    "validate_snapshot",
]
