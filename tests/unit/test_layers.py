"""The layering rules of docs/ARCHITECTURE.md, checked on the imports of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mtl_core"

# package -> what it must not import (any module whose dotted name starts with one of these)
FORBIDDEN = {
    "mtl_core.data": (
        "mtl_core.learn",
        "mtl_core.judge",
        "mtl_core.quality",
        "mtl_core.registry",
        "mtl_core.pipeline",
        "mtl_core.artifacts",
        "mlflow",
        "airflow",
        "torch",
    ),
    "mtl_core.quality": (
        "mtl_core.learn",
        "mtl_core.judge",
        "mtl_core.registry",
        "mtl_core.pipeline",
        "mlflow",
        "airflow",
    ),
    "mtl_core.learn": (
        "mtl_core.registry",
        "mtl_core.quality",
        "mtl_core.pipeline",
        "mtl_core.artifacts",
        "mtl_core.judge.evaluate",
        "mtl_core.judge.gate",
        "mlflow",
        "airflow",
    ),
    "mtl_core.judge": ("mtl_core.registry", "mtl_core.quality", "mtl_core.pipeline", "mlflow", "airflow"),
    "mtl_core.registry": ("mtl_core.pipeline", "mtl_core.quality", "airflow"),
    "mtl_core.artifacts": ("mlflow", "airflow"),
    # Serving runs without Airflow and never reaches back into the retraining steps.
    "mtl_core.serving": ("mtl_core.pipeline", "mtl_core.artifacts", "airflow"),
    "mtl_core.pipeline": ("airflow",),
    "mtl_core.cli": ("airflow",),
    "mtl_core.config": ("mtl_core.data", "mtl_core.learn", "mtl_core.judge", "mtl_core.registry"),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_each_module_imports_only_what_its_layer_may(path):
    module = _module(path)
    rules = [forbidden for owner, forbidden in FORBIDDEN.items() if module == owner or module.startswith(owner + ".")]
    broken = sorted(
        name
        for name in _imports(path)
        for forbidden in rules
        for prefix in forbidden
        if name == prefix or name.startswith(prefix + ".")
    )
    assert broken == [], f"{module} imports {broken}, which its layer must not (docs/ARCHITECTURE.md)"


def test_only_the_embedded_airflow_module_and_the_doctor_import_airflow():
    importers = sorted(_module(p) for p in MODULES if any(n.split(".")[0] == "airflow" for n in _imports(p)))
    # The doctor parses the DAG folder with Airflow's DagBag, inside its check, as `mtl run-dag` runs it.
    assert importers in (["mtl_core.local_airflow"], ["mtl_core.doctor", "mtl_core.local_airflow"])


def test_the_rules_see_the_modules():
    assert len(MODULES) > 30 and "mtl_core.learn.training" in {_module(p) for p in MODULES}
    assert "mtl_core.judge.evaluate" in _imports(PACKAGE / "pipeline.py")
