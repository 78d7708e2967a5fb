"""The int8 and ONNX variants of a trained model: close to fp32, measured in a report, chosen by serve.variant,
and logged to / downloaded from MLflow with the version."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from datetime import date

import numpy as np
import pytest
import torch
from conftest import tiny_training_env
from support import PSEUDONYMS

from mtl_core import registry as reg
from mtl_core.config import load_settings
from mtl_core.data import warehouse as wh
from mtl_core.data.extract import extract_snapshot
from mtl_core.data.shop import ShopSpec, write_shop
from mtl_core.learn.batches import TensorData
from mtl_core.learn.checkpoint import load_model
from mtl_core.learn.examples import build_examples
from mtl_core.learn.models import build_model
from mtl_core.learn.text import text_matrix
from mtl_core.learn.training import train_on_snapshot
from mtl_core.learn.variants import (
    INT8_FILE,
    ONNX_FILE,
    ONNX_INPUTS,
    REPORT_FILE,
    Fp32Scorer,
    Int8Scorer,
    OnnxScorer,
    VariantError,
    _smooth,
    _SmoothedInput,
    _subset,
    build_variants,
    export_onnx,
    load_scorer,
)
from mtl_core.registry import variants as reg_variants

CALLS = 20  # timed calls per latency figure: enough to exercise the timing, the figures are the bench's job


@pytest.fixture(scope="module")
def shop(tmp_path_factory, tiny_bert_path):
    """The tiny shop of test_registry (600 users, 35 days) and its snapshot; models train on it in about a second."""
    root = tmp_path_factory.mktemp("variants_shop")
    engine = wh.make_engine(f"sqlite:///{root / 'warehouse.db'}")
    write_shop(engine, ShopSpec(users=600, items=150, days=35, start=date(2026, 1, 5), seed=5))
    extract_snapshot(engine, "2026-01-05", "2026-02-09", root / "snap", pseudonyms=PSEUDONYMS)
    engine.dispose()
    return {"root": root, "env": tiny_training_env(root / "data", tiny_bert_path)}


@pytest.fixture(scope="module")
def built(shop):
    """A model with the default text pooling (word vectors), its variants, and its holdout with text vectors."""
    root = shop["root"]
    settings = load_settings(environ=shop["env"])
    train_on_snapshot(root / "snap", root / "model", settings, progress=False)
    examples = build_examples(root / "snap", settings.features, settings.tasks)
    rows = np.flatnonzero(examples.split == "holdout")
    report = build_variants(root / "model", root / "variants", examples, rows, calls=CALLS)
    loaded = load_model(root / "model")
    holdout, _ = _subset(examples, rows, None)
    texts = text_matrix(holdout.texts, loaded.settings, loaded.cache_dir, False)
    return {
        "model": root / "model",
        "variants": root / "variants",
        "examples": examples,
        "settings": settings,
        "report": report,
        "holdout": holdout,
        "texts": texts,
    }


def _scores(built, variant):
    return load_scorer(built["model"], variant, built["variants"]).score(built["holdout"], built["texts"])


def test_int8_and_onnx_score_like_fp32_on_every_sample_space(built):
    holdout, texts = built["holdout"], built["texts"]
    fp32 = Fp32Scorer(load_model(built["model"])).score(holdout, texts)
    int8 = Int8Scorer.load(load_model(built["model"]), built["variants"] / INT8_FILE).score(holdout, texts)
    onnx = OnnxScorer(load_model(built["model"]), built["variants"] / ONNX_FILE).score(holdout, texts)
    assert fp32.shape == int8.shape == onnx.shape == (len(holdout), 4)
    assert fp32.dtype == int8.dtype == onnx.dtype == np.float32

    no_text = holdout.text_index == 0
    no_item = np.array([v is None for v in holdout.raw["item"]])
    spaces = holdout.raw["space"]
    # The synthetic shop logs every click's impression, so its holdout has no "clicks" rows.
    assert set(spaces) == {"feed", "ads", "users"} and no_text.any() and no_item.any()
    for rows in [spaces == space for space in set(spaces)] + [no_text, no_item]:
        np.testing.assert_allclose(onnx[rows], fp32[rows], atol=1e-4)
        # Dynamic int8 quantizes each batch's activations with the batch's own range, so a row's score moves a
        # little with its batch. This tiny model's ad_ctr blend (fit on a small validation split) multiplies
        # its logit by about 38, and the rounding errors with it (max 0.018 here): the bound is looser than a
        # real model needs (0.009 on the 9,000-user shop's).
        assert np.abs(int8[rows] - fp32[rows]).max() < 0.03
        assert np.abs(int8[rows] - fp32[rows]).mean() < 0.003

    # One row at a time, as the server scores a single request (the dynamic axes hold at 1 row, 1 text).
    for row in np.flatnonzero(no_text)[:2].tolist() + np.flatnonzero(~no_text)[:2].tolist():
        single, single_texts = _subset(holdout, np.array([row]), texts)
        np.testing.assert_allclose(_scores_of(built, "onnx", single, single_texts), fp32[[row]], atol=1e-4)


def _scores_of(built, variant, examples, texts):
    return load_scorer(built["model"], variant, built["variants"]).score(examples, texts)


def test_report_holds_auc_deltas_latencies_and_sizes(built):
    report = json.loads((built["variants"] / REPORT_FILE).read_text())
    assert report == built["report"]
    assert report["holdout_rows"] == int((built["examples"].split == "holdout").sum())
    assert report["max_auc_loss"] == built["settings"].serve.variant_max_auc_loss
    fp32 = report["variants"]["fp32"]
    for name in ("int8", "onnx"):
        entry = report["variants"][name]
        assert (built["variants"] / entry["file"]).stat().st_size == entry["size_bytes"] > 0
        assert set(entry["tasks"]) == {"ctr", "cvr", "ad_ctr", "churn"}
        for task, figures in entry["tasks"].items():
            assert figures["fp32_auc"] == fp32["tasks"][task]["auc"]
            assert figures["auc_delta"] == pytest.approx(figures["auc"] - figures["fp32_auc"])
            assert figures["n"] == fp32["tasks"][task]["n"] > 0
        losses = [-figures["auc_delta"] for figures in entry["tasks"].values()]
        assert entry["within_bound"] == (max(losses) < report["max_auc_loss"])
        for rows in ("1", "100"):
            assert 0 < entry["latency_ms"][rows]["p50"] <= entry["latency_ms"][rows]["p99"]
        assert entry["rows_per_s"] > 0
        assert entry["speedup_1row_p99"] == pytest.approx(
            fp32["latency_ms"]["1"]["p99"] / entry["latency_ms"]["1"]["p99"]
        )
    assert report["variants"]["onnx"]["within_bound"]  # the same float32 graph: no AUC lost
    assert report["variants"]["onnx"]["max_abs_score_diff"] < 1e-4
    assert report["variants"]["int8"]["size_bytes"] < fp32["size_bytes"] / 2  # int8 linear weights
    assert not list(built["variants"].parent.glob(".variants.tmp-*"))  # the staging directory was renamed


def test_smoothing_keeps_the_fp32_function_and_evens_out_the_input_columns(built):
    loaded = load_model(built["model"])
    calibration = TensorData(built["holdout"], loaded.space, built["texts"]).batch(np.arange(2000))
    model = copy.deepcopy(loaded.model).eval()
    smoothed = _SmoothedInput(model.shared, model.inputs.output_dim)
    _smooth(model, smoothed, calibration)
    model.shared = smoothed
    with torch.no_grad():
        before = loaded.model.eval()(calibration.inputs, calibration.text)
        after = model(calibration.inputs, calibration.text)
        x = model.inputs(calibration.inputs, calibration.text)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    spread = x.abs().amax(dim=0)
    even = (x / smoothed.scale).abs().amax(dim=0)
    used = spread > 0
    # What int8 has to round: the widest column against the narrowest, before and after smoothing.
    assert (even[used].max() / even[used].min()) < (spread[used].max() / spread[used].min()) / 10


class Payload:
    """Any object a plain pickle would build (and so could run code while building)."""


def test_int8_weights_load_without_pickle_and_a_pickled_file_is_refused(built, tmp_path):
    stored = torch.load(built["variants"] / INT8_FILE, weights_only=True)
    assert any(key.endswith("_packed_params._packed_params") for key in stored["state_dict"])
    assert not torch.equal(stored["state_dict"]["shared.scale"], torch.ones_like(stored["state_dict"]["shared.scale"]))

    forged = tmp_path / "model_int8.pt"
    torch.save({"state_dict": stored["state_dict"], "extra": Payload()}, forged)
    with pytest.raises(VariantError, match="refused as the int8 variant.*serve.variant"):
        Int8Scorer.load(load_model(built["model"]), forged)


def _forged(built, tmp_path, latencies: dict[str, float], deltas: dict[str, float | None]):
    """A copy of the variants whose report says the given 1-row p99 latencies and worst AUC change."""
    copy = tmp_path / "variants"
    shutil.copytree(built["variants"], copy)
    report = json.loads((copy / REPORT_FILE).read_text())
    for name, p99 in latencies.items():
        report["variants"][name]["latency_ms"]["1"]["p99"] = p99
    for name, delta in deltas.items():
        report["variants"][name]["tasks"]["cvr"]["auc_delta"] = delta
        others = [t for t in report["variants"][name]["tasks"] if t != "cvr"]
        for task in others:
            report["variants"][name]["tasks"][task]["auc_delta"] = 0.0
        report["variants"][name]["within_bound"] = delta is not None and -delta < report["max_auc_loss"]
    (copy / REPORT_FILE).write_text(json.dumps(report))
    return copy


@pytest.mark.parametrize(
    ("latencies", "deltas", "expected"),
    [
        ({"fp32": 3.0, "int8": 2.0, "onnx": 1.0}, {"int8": 0.0, "onnx": -0.001}, "onnx"),
        ({"fp32": 3.0, "int8": 2.0, "onnx": 1.0}, {"int8": -0.0015, "onnx": -0.01}, "int8"),  # onnx loses too much
        ({"fp32": 3.0, "int8": 2.0, "onnx": 1.0}, {"int8": -0.003, "onnx": None}, "fp32"),  # none within the bound
        ({"fp32": 1.0, "int8": 2.0, "onnx": 1.5}, {"int8": 0.0, "onnx": 0.0}, "fp32"),  # fp32 is the fastest
    ],
)
def test_fastest_picks_the_quickest_variant_within_the_bound(built, tmp_path, latencies, deltas, expected):
    variants = _forged(built, tmp_path, latencies, deltas)
    assert load_scorer(built["model"], "fastest", variants).variant == expected


def test_fastest_judges_again_with_a_bound_given_at_load(built, tmp_path):
    variants = _forged(built, tmp_path, {"fp32": 3.0, "int8": 2.0, "onnx": 1.0}, {"int8": -0.003, "onnx": -0.01})
    assert load_scorer(built["model"], "fastest", variants).variant == "fp32"
    assert load_scorer(built["model"], "fastest", variants, max_auc_loss=0.005).variant == "int8"
    assert load_scorer(built["model"], "fastest", variants, max_auc_loss=0.02).variant == "onnx"
    assert load_scorer(built["model"], "int8", variants, max_auc_loss=0.005).variant == "int8"


def test_unknown_missing_and_out_of_bound_variants_are_refused(built, tmp_path):
    model = built["model"]
    with pytest.raises(VariantError, match=rf"unknown model variant 'fp16' for {model}: serve.variant must be"):
        load_scorer(model, "fp16", built["variants"])
    with pytest.raises(VariantError, match=rf"the int8 variant of {model} is missing .*set serve.variant"):
        load_scorer(model, "int8", None)
    # A version registered before variants existed still serves under "fastest", as fp32.
    assert load_scorer(model, "fastest", None).variant == "fp32"
    assert load_scorer(model, "fastest", tmp_path / "nothing_here").variant == "fp32"

    variants = _forged(built, tmp_path, {"fp32": 3.0, "int8": 2.0, "onnx": 1.0}, {"int8": -0.003, "onnx": 0.0})
    with pytest.raises(VariantError, match=r"int8 variant .* outside the AUC bound .*cvr.*serve.variant_max_auc_loss"):
        load_scorer(model, "int8", variants)
    (variants / ONNX_FILE).unlink()
    with pytest.raises(
        VariantError, match=rf"the onnx variant of {model} is missing: .*onnx/model.onnx.*serve.variant"
    ):
        load_scorer(model, "onnx", variants)
    with pytest.raises(VariantError, match="onnx variant .* missing"):
        load_scorer(model, "fastest", variants)  # the report promises a file the download lacks

    other = tmp_path / "other_model"
    shutil.copytree(model, other)
    weights = torch.load(other / "model.pt", weights_only=True)
    weights["state_dict"]["inputs.no_text"] += 1.0
    torch.save(weights, other / "model.pt")
    with pytest.raises(VariantError, match="built from another model"):
        load_scorer(other, "onnx", built["variants"])


@pytest.mark.parametrize("text", [{"pooling": "sentence"}, {"enabled": False}], ids=["sentence", "no_text"])
def test_onnx_export_of_sentence_vectors_and_of_a_model_without_text(built, tmp_path, text):
    # Untrained weights of the other text layouts: the export must reproduce the model, whatever it learned.
    trained = load_model(built["model"])
    settings = trained.settings.model_copy(update={"text": trained.settings.text.model_copy(update=text)})
    text_in = trained.text_in if settings.text.enabled else 0
    torch.manual_seed(0)
    model = build_model(trained.space.sizes(), trained.task_names, settings.model, text_in, text_in > 0).eval()
    loaded = dataclasses.replace(trained, model=model, settings=settings, text_in=text_in)
    holdout = built["holdout"]
    texts = None
    if text_in:
        texts = np.random.default_rng(0).normal(size=(len(holdout.texts) + 1, text_in)).astype(np.float32)
        texts[0] = 0.0
    export_onnx(loaded, tmp_path / "model.onnx")
    onnx = OnnxScorer(loaded, tmp_path / "model.onnx")
    assert onnx.uses_text == bool(text_in) and onnx.inputs == (list(ONNX_INPUTS) if text_in else list(ONNX_INPUTS[:2]))
    np.testing.assert_allclose(onnx.score(holdout, texts), Fp32Scorer(loaded).score(holdout, texts), atol=1e-4)


@pytest.fixture
def client(tmp_path):
    return reg.configure(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_log_and_download_variants_round_trip(built, client, tmp_path, monkeypatch):
    run_id = reg.run_for_key(client, "mtl", "variants")
    settings = built["settings"].model_copy(
        update={"serve": built["settings"].serve.model_copy(update={"variant_max_auc_loss": 0.004})}
    )
    seen = {}

    def prebuilt(model_dir, out_dir, examples, rows, *, max_auc_loss, calls, cache_dir):
        # build_variants itself is tested above; this checks what log_variants asks of it and logs what it wrote.
        seen.update(rows=rows, max_auc_loss=max_auc_loss)
        shutil.copytree(built["variants"], out_dir)
        return built["report"]

    monkeypatch.setattr(reg_variants, "build_variants", prebuilt)
    report = reg_variants.log_variants(client, run_id, built["model"], built["examples"], settings)
    assert report == built["report"]
    np.testing.assert_array_equal(seen["rows"], np.flatnonzero(built["examples"].split == "holdout"))
    assert seen["max_auc_loss"] == 0.004

    metrics = client.get_run(run_id).data.metrics
    for task in ("ctr", "cvr", "ad_ctr", "churn"):
        for name in ("int8", "onnx"):
            assert metrics[f"variant.{name}.auc_delta.{task}"] == pytest.approx(
                report["variants"][name]["tasks"][task]["auc_delta"]
            )
    for name in ("fp32", "int8", "onnx"):
        assert metrics[f"variant.{name}.p99_ms_1row"] == pytest.approx(
            report["variants"][name]["latency_ms"]["1"]["p99"]
        )
        assert metrics[f"variant.{name}.p50_ms_100rows"] > 0 and metrics[f"variant.{name}.rows_per_s"] > 0
    assert metrics["variant.onnx.within_bound"] == 1.0

    # A retried register task finds the logged report and builds nothing again.
    monkeypatch.setattr(reg_variants, "build_variants", lambda *a, **k: pytest.fail("variants built twice"))
    assert reg_variants.log_variants(client, run_id, built["model"], built["examples"], settings) == report

    client.create_registered_model("m")
    client.create_model_version("m", source=f"runs:/{run_id}/variants", run_id=run_id)
    older = reg.run_for_key(client, "mtl", "before variants")
    client.create_model_version("m", source=f"runs:/{older}/model", run_id=older)
    downloaded = reg_variants.download_variants(client, "m", 1, tmp_path / "download")
    assert downloaded is not None and json.loads((downloaded / REPORT_FILE).read_text()) == report
    scorer = load_scorer(built["model"], "onnx", downloaded)
    np.testing.assert_allclose(scorer.score(built["holdout"], built["texts"]), _scores(built, "fp32"), atol=1e-4)
    assert reg_variants.download_variants(client, "m", 2, tmp_path / "download2") is None
