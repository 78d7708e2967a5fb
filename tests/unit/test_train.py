"""Training loop: artifacts, determinism, resume, warm start, single task, weighting strategies, fine-tuning."""

from __future__ import annotations

import json
from datetime import date

import numpy as np
import pytest
import torch
from conftest import tiny_training_env
from support import PSEUDONYM_KEY, PSEUDONYMS
from typer.testing import CliRunner

from mtl_core.cli import app
from mtl_core.config import load_settings
from mtl_core.data import warehouse as wh
from mtl_core.data.extract import extract_snapshot
from mtl_core.data.shop import ShopSpec, write_shop
from mtl_core.learn import TrainingError
from mtl_core.learn.checkpoint import load_model
from mtl_core.learn.examples import build_examples
from mtl_core.learn.training import _warm_start, train_on_snapshot


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_shop")
    engine = wh.make_engine(f"sqlite:///{root / 'warehouse.db'}")
    write_shop(engine, ShopSpec(users=600, items=150, days=35, start=date(2026, 1, 5), seed=5))
    extract_snapshot(engine, "2026-01-05", "2026-02-09", root / "snap", pseudonyms=PSEUDONYMS)
    extract_snapshot(engine, "2026-01-05", "2026-01-30", root / "mid", pseudonyms=PSEUDONYMS)
    extract_snapshot(engine, "2026-01-05", "2026-01-21", root / "short", pseudonyms=PSEUDONYMS)
    return root


@pytest.fixture
def settings(shop, tiny_bert_path, tmp_path):
    return load_settings(environ=tiny_training_env(tmp_path, tiny_bert_path))


def test_training_writes_a_model_that_scores_unseen_ids(shop, settings, tmp_path):
    result = train_on_snapshot(shop / "snap", tmp_path / "model", settings, progress=False)
    assert set(result.metrics) == {"ctr", "cvr", "ad_ctr", "churn"}
    assert all(0 <= m["auc"] <= 1 and m["logloss"] > 0 for m in result.metrics.values())
    assert result.steps == 24 and not (tmp_path / "model" / "checkpoint.pt").exists()
    saved = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert saved["tasks"]["ctr"]["auc"] == pytest.approx(result.metrics["ctr"]["auc"])

    loaded = load_model(tmp_path / "model")
    examples = build_examples(shop / "snap", loaded.settings.features, loaded.settings.tasks)
    rows = np.flatnonzero(examples.split == "holdout")
    encoded = examples.encode(loaded.space)
    assert (encoded["item"][rows] == 0).any(), "the holdout should hold items unseen in training"
    probs = loaded.predict(examples, rows)
    assert probs.shape == (len(rows), 4) and np.isfinite(probs).all() and ((probs > 0) & (probs < 1)).all()


def test_same_seed_same_model(shop, settings, tmp_path):
    a = train_on_snapshot(shop / "snap", tmp_path / "a", settings, progress=False)
    b = train_on_snapshot(shop / "snap", tmp_path / "b", settings, progress=False)
    assert a.metrics == b.metrics
    wa, wb = torch.load(tmp_path / "a" / "model.pt"), torch.load(tmp_path / "b" / "model.pt")
    assert all(torch.equal(wa["state_dict"][k], wb["state_dict"][k]) for k in wa["state_dict"])


def test_resume_after_interruption_gives_the_same_model(shop, settings, tmp_path, monkeypatch):
    straight = train_on_snapshot(shop / "snap", tmp_path / "straight", settings, progress=False)

    import mtl_core.learn.training as training

    real_draw = training.TaskSampler.draw
    calls = {"n": 0}

    def dying_draw(self):
        calls["n"] += 1
        if calls["n"] == 15:  # after the checkpoint at step 12
            raise KeyboardInterrupt
        return real_draw(self)

    monkeypatch.setattr(training.TaskSampler, "draw", dying_draw)
    with pytest.raises(KeyboardInterrupt):
        train_on_snapshot(shop / "snap", tmp_path / "resumed", settings, progress=False)
    assert (tmp_path / "resumed" / "checkpoint.pt").exists()
    monkeypatch.setattr(training.TaskSampler, "draw", real_draw)
    resumed = train_on_snapshot(shop / "snap", tmp_path / "resumed", settings, resume=True, progress=False)
    assert resumed.steps == straight.steps and resumed.metrics == straight.metrics
    wa, wb = (torch.load(tmp_path / name / "model.pt")["state_dict"] for name in ("straight", "resumed"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_warm_start_keeps_old_weights_and_grows_vocabularies(shop, settings, tmp_path):
    settings = settings.model_copy(update={"model": settings.model.model_copy(update={"id_features": ["item"]})})
    train_on_snapshot(shop / "mid", tmp_path / "old", settings, progress=False)
    old = load_model(tmp_path / "old")
    new = train_on_snapshot(shop / "snap", tmp_path / "new", settings, warm_start=tmp_path / "old", progress=False)
    grown = load_model(tmp_path / "new")
    assert len(grown.space.vocabs["item"]) > len(old.space.vocabs["item"])
    assert grown.space.vocabs["item"].values[: len(old.space.vocabs["item"].values)] == old.space.vocabs["item"].values
    assert new.metrics
    # the copy itself: old rows kept, new rows left as initialised
    fresh = load_model(tmp_path / "new").model
    before = fresh.inputs.embeddings["item"].weight.detach().clone()
    _warm_start(fresh, old.model)
    after = fresh.inputs.embeddings["item"].weight
    n_old = old.model.inputs.embeddings["item"].weight.shape[0]
    assert torch.equal(after[:n_old], old.model.inputs.embeddings["item"].weight)
    assert torch.equal(after[n_old:], before[n_old:])


def test_warm_start_keeps_text_statistics_unless_the_text_form_changes(shop, settings, tmp_path):
    sentence = settings.model_copy(update={"text": settings.text.model_copy(update={"pooling": "sentence"})})
    train_on_snapshot(shop / "mid", tmp_path / "sentence", sentence, progress=False)
    train_on_snapshot(shop / "mid", tmp_path / "words", settings, warm_start=tmp_path / "sentence", progress=False)
    train_on_snapshot(shop / "snap", tmp_path / "words_later", settings, warm_start=tmp_path / "words", progress=False)
    train_on_snapshot(shop / "snap", tmp_path / "words_fresh", settings, progress=False)
    mean = {
        name: load_model(tmp_path / name).model.inputs.text_mean
        for name in ("sentence", "words", "words_later", "words_fresh")
    }
    assert not torch.allclose(mean["words"], mean["sentence"])  # word vectors got their own statistics
    assert torch.equal(mean["words_later"], mean["words"])  # same form: kept from the earlier model
    assert not torch.equal(mean["words_fresh"], mean["words"])  # (which is not what the new texts would give)


def test_a_model_saved_before_word_vectors_and_transfer_existed_still_loads(shop, settings, tmp_path):
    old_style = settings.model_copy(
        update={
            "text": settings.text.model_copy(update={"pooling": "sentence"}),
            "model": settings.model.model_copy(update={"transfer": []}),
        }
    )
    train_on_snapshot(shop / "mid", tmp_path / "old", old_style, progress=False)
    examples = build_examples(shop / "snap", settings.features, settings.tasks)
    rows = np.arange(200)
    expected = load_model(tmp_path / "old").predict(examples, rows)
    saved = json.loads((tmp_path / "old" / "settings.json").read_text())
    del saved["text"]["pooling"], saved["text"]["max_words"], saved["model"]["transfer"]
    del saved["model"]["transfer_blend"]
    (tmp_path / "old" / "settings.json").write_text(json.dumps(saved))
    np.testing.assert_allclose(load_model(tmp_path / "old").predict(examples, rows), expected)


def test_transfer_blend_is_fit_on_validation_and_never_raises_its_log_loss(shop, settings, tmp_path):
    from mtl_core.judge.metrics import log_loss
    from mtl_core.learn.models.multitask import IDENTITY_BLEND

    result = train_on_snapshot(shop / "snap", tmp_path / "model", settings, progress=False)
    loaded = load_model(tmp_path / "model")
    blend = loaded.model.transfer_blend.clone()
    assert loaded.model.transfer_pairs and not torch.equal(blend, IDENTITY_BLEND.expand_as(blend))
    examples = build_examples(shop / "snap", loaded.settings.features, loaded.settings.tasks)
    for _, target in loaded.model.transfer_pairs:
        rows = examples.task_rows(target, "valid")
        labels = examples.labels[rows, target]
        blended = loaded.predict(examples, rows)[:, target]
        loaded.model.transfer_blend.copy_(IDENTITY_BLEND.expand_as(blend))  # the heads as trained
        own = loaded.predict(examples, rows)[:, target]
        loaded.model.transfer_blend.copy_(blend)
        assert log_loss(labels, blended) <= log_loss(labels, own) + 1e-6
        # The validation metrics reported are the heads' before the blend: after it they would be in-sample.
        assert result.metrics[examples.task_names[target]]["logloss"] == pytest.approx(log_loss(labels, own))


def by_volume(settings):
    """The settings with an epoch as long as the data (not a fixed number of steps), in big batches."""
    return settings.model_copy(
        update={"train": settings.train.model_copy(update={"steps_per_epoch": None, "batch_size": 2048})}
    )


def test_single_task_baseline_gets_the_joint_models_optimiser_budget(shop, settings, tmp_path):
    settings = by_volume(settings)
    joint = train_on_snapshot(shop / "snap", tmp_path / "joint", settings, progress=False)
    result = train_on_snapshot(shop / "snap", tmp_path / "cvr_only", settings, single_task="cvr", progress=False)
    assert list(result.metrics) == ["cvr"]
    # The same steps per epoch (so the same evaluation steps and patience), though cvr has a few % of the rows.
    assert [h["step"] for h in result.history] == [h["step"] for h in joint.history]
    assert result.steps == joint.steps > 20
    assert load_model(tmp_path / "cvr_only").model.esmm_pair is None
    with pytest.raises(TrainingError, match="--single-task 'nope' is not a configured task"):
        train_on_snapshot(shop / "snap", tmp_path / "x", settings, single_task="nope", progress=False)


@pytest.mark.parametrize("weighting", ["inverse_volume", "uncertainty", "gradnorm", "pcgrad"])
def test_every_weighting_strategy_trains(shop, settings, tmp_path, weighting):
    settings = settings.model_copy(
        update={
            "train": settings.train.model_copy(
                update={"weighting": weighting, "epochs": 1, "residual_pairs": [("ctr", "cvr", 0.1)]}
            )
        }
    )
    result = train_on_snapshot(shop / "snap", tmp_path / weighting, settings, progress=False)
    assert all(np.isfinite(m["logloss"]) for m in result.metrics.values())


@pytest.mark.parametrize("architecture", ["shared_bottom", "ple"])
def test_other_architectures_train(shop, settings, tmp_path, architecture):
    settings = settings.model_copy(update={"model": settings.model.model_copy(update={"architecture": architecture})})
    assert train_on_snapshot(shop / "snap", tmp_path / architecture, settings, progress=False).metrics


def test_top_k_fine_tuning_trains_only_the_top_layers(shop, settings, tmp_path, tiny_bert_path):
    from mtl_core.learn.text import TextEncoder

    settings = settings.model_copy(
        update={
            "text": settings.text.model_copy(update={"finetune": "top_k", "top_k": 1}),
            "train": settings.train.model_copy(update={"epochs": 1}),
        }
    )
    train_on_snapshot(shop / "snap", tmp_path / "ft", settings, progress=False)
    tuned = load_model(tmp_path / "ft").model.text_encoder.state_dict()
    original = TextEncoder(tiny_bert_path).state_dict()
    changed = {name for name in original if not torch.equal(original[name], tuned[name])}
    assert changed and all(".layer.3." in name for name in changed), changed


def test_too_short_a_snapshot_is_a_clear_error(shop, settings, tmp_path):
    with pytest.raises(Exception, match="too short|have no examples in some split"):
        train_on_snapshot(shop / "short", tmp_path / "m", settings, progress=False)


def test_cli_train_and_evaluate_print_per_task_json(shop, settings, tmp_path, monkeypatch, tiny_bert_path):
    monkeypatch.setenv("MTL_PRIVACY__PSEUDONYM_KEY", PSEUDONYM_KEY)  # the key the snapshot was made with
    config = tmp_path / "mtl.yaml"
    config.write_text(
        f"data_dir: {tmp_path}\ntext:\n  model_path: {tiny_bert_path}\n"
        "features: {history_days: 3, valid_days: 3, holdout_days: 4}\n"
        "train: {epochs: 1, steps_per_epoch: 10, batch_size: 256}\n"
    )
    runner = CliRunner()
    out = runner.invoke(
        app,
        ["train", "--snapshot", str(shop / "snap"), "--out", str(tmp_path / "m"), "--config", str(config), "--json"],
    )
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output)
    assert set(payload["tasks"]) == {"ctr", "cvr", "ad_ctr", "churn"} and "auc" in payload["tasks"]["ctr"]
    db = f"sqlite:///{shop / 'warehouse.db'}"
    out = runner.invoke(
        app,
        [
            "evaluate",
            "--model",
            str(tmp_path / "m"),
            "--snapshot",
            str(shop / "snap"),
            "--db",
            db,
            "--config",
            str(config),
            "--json",
        ],
    )
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)["tasks"]
    for task in ("ctr", "cvr", "ad_ctr", "churn"):
        assert {"auc", "logloss", "ece", "n", "oracle_auc", "slices"} <= set(report[task])
        assert 0.5 < report[task]["oracle_auc"] < 1
    assert "cold_start_items" in report["ctr"]["slices"] and "new_users" in report["ctr"]["slices"]


class _Payload:
    """What an attacker who can write the artifact store would put into a model file: code run on unpickling."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_crafted_model_file_is_refused_without_running_its_code(shop, settings, tmp_path):
    train_on_snapshot(shop / "snap", tmp_path / "model", settings, progress=False)
    marker = tmp_path / "pwned"
    torch.save({"state_dict": _Payload(marker), "task_names": ["ctr"]}, tmp_path / "model" / "model.pt")
    with pytest.raises(TrainingError, match=r"model\.pt .*refused"):
        load_model(tmp_path / "model")
    assert not marker.exists(), "loading the model ran the code inside it"


def test_a_crafted_checkpoint_is_refused_without_running_its_code(shop, settings, tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "resumed").mkdir()
    torch.save({"model": _Payload(marker)}, tmp_path / "resumed" / "checkpoint.pt")
    with pytest.raises(TrainingError, match=r"checkpoint\.pt .*refused"):
        train_on_snapshot(shop / "snap", tmp_path / "resumed", settings, resume=True, progress=False)
    assert not marker.exists(), "resuming ran the code inside the checkpoint"


def test_no_settings_file_of_a_model_holds_a_password(shop, settings, tmp_path):
    secret = settings.model_copy(
        update={
            "warehouse_url": "postgresql+psycopg://etl:s3cret-pw@db:5432/shop",
            "mlflow_tracking_uri": "postgresql+psycopg://ml:other-pw@db:5432/mlflow",
        }
    )
    train_on_snapshot(shop / "snap", tmp_path / "model", secret, progress=False)
    for path in (tmp_path / "model").rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert b"s3cret-pw" not in content and b"other-pw" not in content, path
    assert load_model(tmp_path / "model").settings.warehouse_url == "postgresql+psycopg://etl:***@db:5432/shop"


def test_recency_weights_halve_per_half_life_and_the_sampler_draws_by_them():
    from mtl_core.learn.batches import TaskSampler
    from mtl_core.learn.training import recency_weights

    days = np.datetime64("2026-01-05") + np.array([0, 7, 14, 14], dtype="timedelta64[D]")
    examples = type("E", (), {})()
    examples.time, examples.split = days.astype("datetime64[us]"), np.array(["train"] * 3 + ["valid"])
    examples.interval = (days[0], days[-1])
    assert recency_weights(examples, np.arange(3), 7.0) == pytest.approx([0.25, 0.5, 1.0])

    rows = np.arange(1000)
    weights = np.exp2(-(999 - rows) / 100)  # row 999 newest; each 100 rows older weigh half
    sampler = TaskSampler([rows], batch_size=100, temperature=1.0, seed=0, row_weights=[weights])
    drawn = np.concatenate([sampler.draw()[0] for _ in range(50)])
    assert round(weights.sum()) == len(sampler.order[0])  # a pass is as long as the weights sum to
    assert np.mean(drawn >= 900) == pytest.approx(0.5, abs=0.05)  # the newest 100 rows hold half the weight


def test_recency_weighted_training_spends_an_epoch_on_the_weights_sum(shop, settings, tmp_path):
    from mtl_core.learn.training import train_model

    settings = by_volume(settings)
    examples = build_examples(shop / "snap", settings.features, settings.tasks)
    uniform = train_model(examples, tmp_path / "uniform", settings, progress=False)
    recent = train_model(examples, tmp_path / "recent", settings, progress=False, recency_half_life_days=3.0)
    assert recent.steps < uniform.steps
    assert all(0 <= m["auc"] <= 1 for m in recent.metrics.values())


def test_a_model_saved_before_the_experts_were_fused_loads_and_scores_the_same(shop, settings, tmp_path):
    # A champion registered before the fused layout: its file holds one layer per expert and per gate.
    from mtl_core.learn.checkpoint import MODEL_FILE

    train_on_snapshot(shop / "mid", tmp_path / "m", settings, progress=False)
    examples = build_examples(shop / "snap", settings.features, settings.tasks)
    rows = np.arange(300)
    expected = load_model(tmp_path / "m").predict(examples, rows)
    stored = torch.load(tmp_path / "m" / MODEL_FILE, weights_only=True)
    state = stored["state_dict"]
    m = settings.model
    n_tasks = len(settings.tasks)
    prefix = "shared.layers.0."
    experts = state.pop(prefix + "experts.linear.weight"), state.pop(prefix + "experts.linear.bias")
    names = [f"task_experts.{t}.{j}" for t in range(n_tasks) for j in range(m.experts)]
    names += [f"shared_experts.{j}" for j in range(m.shared_experts)]
    for name, weight, bias in zip(names, experts[0].split(m.expert_dim), experts[1].split(m.expert_dim), strict=True):
        state[f"{prefix}{name}.0.weight"], state[f"{prefix}{name}.0.bias"] = weight.clone(), bias.clone()
    gates = state.pop(prefix + "gates.weight"), state.pop(prefix + "gates.bias")
    width = m.experts + m.shared_experts
    for t, (weight, bias) in enumerate(zip(gates[0].split(width), gates[1].split(width), strict=True)):
        state[f"{prefix}task_gates.{t}.weight"], state[f"{prefix}task_gates.{t}.bias"] = weight.clone(), bias.clone()
    torch.save(stored, tmp_path / "m" / MODEL_FILE)
    np.testing.assert_allclose(load_model(tmp_path / "m").predict(examples, rows), expected, atol=1e-6)


def test_packed_word_batches_score_as_padded_ones(shop, settings, tmp_path):
    from mtl_core.learn.batches import TensorData, predict
    from mtl_core.learn.text import text_matrix

    train_on_snapshot(shop / "mid", tmp_path / "m", settings, progress=False)
    loaded = load_model(tmp_path / "m")
    examples = build_examples(shop / "snap", settings.features, settings.tasks)
    texts = text_matrix(examples.texts, settings, settings.resolved_text_cache_dir, progress=False)
    padded = TensorData(examples, loaded.space, texts)
    packed = TensorData(examples, loaded.space, texts, packed_words=True)
    rows = np.arange(0, len(examples), 3)
    assert "word_of" in packed.batch(rows[:64]).inputs and "word_of" not in padded.batch(rows[:64]).inputs
    assert len(packed.words) < (texts.any(axis=2)).sum()  # each distinct word once
    np.testing.assert_allclose(predict(loaded.model, packed, rows), predict(loaded.model, padded, rows), atol=1e-6)
