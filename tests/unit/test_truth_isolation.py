"""The ground truth of the synthetic shop must never reach features or training."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The shop writes the truth, the warehouse declares its tables, the judge reports oracle AUCs.
ALLOWED = {"mtl_core/data/shop.py", "mtl_core/data/warehouse.py", "mtl_core/judge/oracle.py"}
TRUTH = re.compile(
    r"\btruth_(events|users|shop)\b|TRUTH_TABLES|true_churn_probability|true_probabilities|oracle_report"
)


def test_only_simulator_and_evaluation_mention_the_truth_tables():
    offenders = []
    for path in sorted((ROOT / "mtl_core").rglob("*.py")) + sorted((ROOT / "dags").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative not in ALLOWED and TRUTH.search(path.read_text()):
            offenders.append(relative)
    assert offenders == [], f"these modules mention the truth tables: {offenders}"


def test_the_check_itself_sees_the_simulator():
    assert TRUTH.search((ROOT / "mtl_core/data/shop.py").read_text())
