"""The typed artifacts the DAG's steps hand each other: each saves itself and loads back equal."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mtl_core.artifacts import ArtifactError, Comparison, GateDecision, RegisteredModel, TrainedModel
from mtl_core.errors import MtlError


def test_a_record_loads_back_equal_and_its_json_has_no_nan(tmp_path):
    trained = TrainedModel(
        uri=str(tmp_path / "run" / "challenger.json"),
        model_dir=str(tmp_path / "run" / "challenger"),
        task_names=["ctr", "cvr"],
        valid_metrics={"ctr": {"auc": 0.71, "ece": float("nan")}},
        history=[{"step": 10, "criterion": 0.7}],
    ).save()
    loaded = TrainedModel.load(trained.uri)
    assert loaded.model_dir == trained.model_dir and loaded.task_names == ["ctr", "cvr"]
    assert loaded.valid_metrics == {"ctr": {"auc": 0.71, "ece": None}}  # JSON has no NaN: null
    assert json.loads((tmp_path / "run" / "challenger.json").read_text())["artifact"] == "trained_model"
    assert not list((tmp_path / "run").glob(".*tmp"))  # written to a temporary file, then renamed


def test_loading_the_wrong_kind_or_a_missing_file_names_the_file(tmp_path):
    registered = RegisteredModel(
        uri=str(tmp_path / "registered.json"), model_name="m", version=3, run_id="r", comparison="c"
    ).save()
    with pytest.raises(ArtifactError, match=r"registered\.json holds a registered_model, not a gate_decision"):
        GateDecision.load(registered.uri)
    with pytest.raises(MtlError, match=r"nothing\.json is not a saved comparison \(the file is missing\)"):
        Comparison.load(tmp_path / "nothing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ArtifactError, match="broken.json is not a saved comparison"):
        Comparison.load(tmp_path / "broken.json")


def test_the_comparison_keeps_the_challengers_holdout_scores(tmp_path):
    labels = {"ctr": np.array([0.0, 1.0, 0.0]), "cvr": np.array([1.0, 0.0])}
    probs = {"ctr": np.array([0.1, 0.8, 0.3]), "cvr": np.array([0.6, 0.2])}
    Comparison.save_predictions(tmp_path / "predictions.parquet", labels, probs)
    comparison = Comparison(
        uri=str(tmp_path / "comparison.json"),
        challenger="c.json",
        champion=None,
        examples="examples",
        split="holdout",
        tasks={"ctr": {"challenger": {"auc": 1.0}, "champion": None, "auc_delta": None}},
        predictions=str(tmp_path / "predictions.parquet"),
    ).save()
    again = Comparison.load(comparison.uri)
    assert again.as_gate_input() == {"tasks": comparison.tasks, "split": "holdout"}
    got_labels, got_probs = again.holdout_predictions()
    for task in labels:
        np.testing.assert_array_equal(got_labels[task], labels[task])
        np.testing.assert_array_equal(got_probs[task], probs[task])
