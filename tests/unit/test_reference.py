"""The offline reference: trained once from scratch on all history up to a run's cut-off, scored row for row."""

from __future__ import annotations

from datetime import date

import numpy as np
import pytest
from conftest import tiny_training_env

from mtl_core.config import load_settings
from mtl_core.data import warehouse as wh
from mtl_core.data.shop import ShopSpec, write_shop
from mtl_core.judge.reference import compare_with_reference, first_event, reference_dir, train_reference
from mtl_core.learn.checkpoint import load_model
from mtl_core.pipeline import challenger_is_its_reference


def test_the_reference_learns_all_history_once_and_scores_a_run_row_for_row(tmp_path, tiny_bert_path):
    settings = load_settings(environ=tiny_training_env(tmp_path, tiny_bert_path))
    engine = wh.make_engine(settings.resolved_warehouse_url)
    write_shop(engine, ShopSpec(users=400, items=100, days=35, start=date(2026, 1, 5), seed=4))
    assert first_event(engine).date() == date(2026, 1, 5)

    out = reference_dir(settings, "2026-02-09T00:00:00")
    model_dir = train_reference(settings, engine, "2026-02-09", out)
    assert model_dir == settings.data_dir / "references" / "2026-02-09" / "model"
    assert not (out / "snapshot").exists() and not (out / "building").exists()
    made = (model_dir / "model.pt").stat().st_mtime_ns
    assert train_reference(settings, engine, "2026-02-09", out) == model_dir  # reused, not retrained
    assert (model_dir / "model.pt").stat().st_mtime_ns == made

    # Against itself on a run's examples: the same AUC, a difference of exactly 0.
    from mtl_core.data.extract import extract_snapshot
    from mtl_core.data.pseudonyms import pseudonymiser_for
    from mtl_core.learn.examples import build_examples

    extract_snapshot(engine, "2026-01-19", "2026-02-09", tmp_path / "run", pseudonymiser_for(settings))
    examples = build_examples(tmp_path / "run", settings.features, settings.tasks)
    gap = compare_with_reference(model_dir, model_dir, examples)
    assert set(gap.tasks) == {"ctr", "cvr", "ad_ctr", "churn"}
    for entry in gap.tasks.values():
        assert entry["champion_auc"] == pytest.approx(entry["auc"]) and entry["champion_minus_reference"]["delta"] == 0
    assert np.isfinite([e["auc"] for e in gap.tasks.values()]).all()
    assert load_model(model_dir).task_names == ["ctr", "cvr", "ad_ctr", "churn"]


def test_under_the_expanding_policy_the_runs_challenger_is_its_reference(tmp_path, tiny_bert_path):
    from mtl_core import pipeline
    from mtl_core.artifacts import TrainedModel

    env = {**tiny_training_env(tmp_path, tiny_bert_path), "MTL_PIPELINE__POLICY": "expanding"}
    settings = load_settings(environ=env)
    engine = wh.make_engine(settings.resolved_warehouse_url)
    write_shop(engine, ShopSpec(users=400, items=100, days=35, start=date(2026, 1, 5), seed=4))
    end = "2026-02-09T00:00:00+00:00"
    assert challenger_is_its_reference(settings, engine, end)

    # The DAG's own steps, then the reference trained on its own: the same predictions, to the last bit.
    snapshot = pipeline.validate(settings, pipeline.extract(settings, end))
    example_set = pipeline.build_features(settings, snapshot, "run1")
    challenger = TrainedModel.load(pipeline.train_challenger(settings, example_set, "run1").uri)
    reference = train_reference(settings, engine, end, reference_dir(settings, end))
    examples = example_set.examples()
    rows = np.flatnonzero(examples.split == "holdout")
    ours = load_model(challenger.model_dir).predict(examples, rows)
    np.testing.assert_array_equal(ours, load_model(reference).predict(examples, rows))

    capped = load_settings(environ={**env, "MTL_PIPELINE__EXPANDING_MAX_DAYS": "14"})
    assert not challenger_is_its_reference(capped, engine, end)  # a capped window no longer holds all history
    warm = load_settings(environ={**env, "MTL_PIPELINE__POLICY": "warm_start"})
    assert not challenger_is_its_reference(warm, engine, end)


def test_an_empty_warehouse_has_no_history_to_learn(tmp_path):
    engine = wh.make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    wh.create_schema(engine)
    with pytest.raises(ValueError, match="holds no behaviour events"):
        first_event(engine)
