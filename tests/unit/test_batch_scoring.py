"""`mtl score`'s library function: a candidates file scored in chunks by the champion, through the online store."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_online_store import UNKNOWN_AD, UNKNOWN_USER, serving_shop  # noqa: F401 (a session fixture)
from typer.testing import CliRunner

from mtl_core import registry as reg
from mtl_core.cli import app
from mtl_core.learn.examples import examples_frame
from mtl_core.learn.variants import load_scorer
from mtl_core.serving.batch import score_file
from mtl_core.serving.online import OnlineStore, ServingError


@pytest.fixture(scope="module")
def champion(serving_shop, tmp_path_factory):  # noqa: F811
    """The shop's model registered as v1 and made champion in a SQLite MLflow store, its features published."""
    root = tmp_path_factory.mktemp("batch_scoring")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = reg.configure(uri)
    run_id = reg.run_for_key(client, "mtl", "batch")
    ex = serving_shop.examples
    sample = np.flatnonzero(ex.split == "holdout")[:: max(1, int((ex.split == "holdout").sum()) // 12)][:12]
    version = reg.log_and_register_model(client, run_id, serving_shop.model, reg.MODEL_NAME, examples_frame(ex, sample))
    reg.make_champion(client, reg.MODEL_NAME, version, actor="test", why="batch scoring")
    settings = serving_shop.settings.model_copy(update={"mlflow_tracking_uri": uri})
    OnlineStore(settings).publish(version, serving_shop.model, serving_shop.snap)
    return {"settings": settings, "version": version, "root": root, "uri": uri}


@pytest.fixture(scope="module")
def candidates(serving_shop, champion):  # noqa: F811
    """31 candidate pairs: holdout feed and ad rows of known users, an unknown user, an unknown ad."""
    ex = serving_shop.examples
    rows = np.concatenate(
        [np.flatnonzero((ex.split == "holdout") & (ex.raw["space"] == space))[:15] for space in ("feed", "ads")]
    )
    feed = ex.raw["space"][rows] == "feed"
    frame = pd.DataFrame(
        {
            "user_id": [serving_shop.raw_of[u] for u in ex.raw["user"][rows]] + [UNKNOWN_USER],
            "item_id": pd.array(
                [i if f else None for i, f in zip(ex.raw["item"][rows], feed, strict=True)] + [None], "Int64"
            ),
            "ad_id": pd.array(
                [None if f else a for a, f in zip(ex.raw["ad"][rows], feed, strict=True)] + [UNKNOWN_AD], "Int64"
            ),
            "time": np.append(ex.time[rows], np.datetime64("2026-02-09T12:00", "us")),
            "request": [f"r{i}" for i in range(len(rows) + 1)],  # a column of the caller's, passed through
        }
    )
    path = champion["root"] / "candidates.parquet"
    frame.to_parquet(path, index=False)
    return path, frame


def _chunked(settings, rows: int):
    return settings.model_copy(update={"serve": settings.serve.model_copy(update={"score_chunk_rows": rows})})


def test_scoring_in_chunks_equals_scoring_at_once(serving_shop, champion, candidates, tmp_path):  # noqa: F811
    path, frame = candidates
    whole = score_file(_chunked(champion["settings"], 1000), path, tmp_path / "whole.parquet", progress=False)
    chunked = score_file(_chunked(champion["settings"], 7), path, tmp_path / "chunked.parquet", progress=False)
    assert whole["rows"] == chunked["rows"] == len(frame) and whole["version"] == champion["version"]
    at_once, in_chunks = pq.read_table(tmp_path / "whole.parquet"), pq.read_table(tmp_path / "chunked.parquet")
    tasks = serving_shop.loaded.task_names
    assert in_chunks.schema.equals(at_once.schema, check_metadata=True)
    assert in_chunks.drop_columns(tasks).equals(at_once.drop_columns(tasks))
    # torch's CPU kernels round differently for 7 rows than for 31 (last float32 bits), nothing more.
    for task in tasks:
        np.testing.assert_allclose(in_chunks[task].to_numpy(), at_once[task].to_numpy(), rtol=1e-5, atol=1e-7)
    assert at_once.column_names == [*frame.columns, *tasks, "cold_user", "cold_item", "model_version"]
    assert pq.ParquetFile(tmp_path / "chunked.parquet").metadata.num_row_groups == 5  # 31 rows, 7 at a time
    scored = at_once.to_pandas()
    assert scored["request"].tolist() == frame["request"].tolist()
    assert (scored["model_version"] == champion["version"]).all()
    assert scored["cold_user"].tolist() == [False] * (len(frame) - 1) + [True]
    assert scored["cold_item"].tolist() == [False] * (len(frame) - 1) + [True]
    # The same scores as one lookup of the whole file and the fp32 scorer.
    looked_up = OnlineStore(champion["settings"]).lookup(
        champion["version"], frame, serving_shop.loaded.space, serving_shop.loaded.settings
    )
    expected = load_scorer(serving_shop.model).score(looked_up.examples, looked_up.texts)
    assert np.array_equal(scored[tasks].to_numpy(dtype=np.float32), expected)
    assert not list(tmp_path.glob(".*tmp*"))


def _written(tmp_path, name: str, frame: pd.DataFrame):
    path = tmp_path / name
    frame.to_parquet(path, index=False)
    return path


def test_bad_candidate_files_are_named_with_the_column_and_row(champion, tmp_path):
    settings = _chunked(champion["settings"], 7)
    out = tmp_path / "out.parquet"
    (tmp_path / "notes.parquet").write_text("user_id,item_id\n1,2\n")
    cases = [
        (tmp_path / "missing.parquet", "missing.parquet does not exist"),
        (tmp_path / "notes.parquet", "notes.parquet is not a Parquet file"),
        (_written(tmp_path, "no_user.parquet", pd.DataFrame({"item_id": [1]})), "no_user.parquet: no user_id column"),
        (
            _written(tmp_path, "no_ids.parquet", pd.DataFrame({"user_id": [1], "score": [0.5]})),
            "no_ids.parquet: neither an item_id nor an ad_id column",
        ),
        (
            _written(tmp_path, "text_ids.parquet", pd.DataFrame({"user_id": ["a"], "item_id": [1]})),
            "text_ids.parquet: column 'user_id' holds (large_)?string, not whole numbers",
        ),
    ]
    for path, message in cases:
        with pytest.raises(ServingError, match=message):
            score_file(settings, path, out, progress=False)
    both = pd.DataFrame(
        {"user_id": np.arange(12), "item_id": pd.array([1] * 12, "Int64"), "ad_id": pd.array([None] * 12, "Int64")}
    )
    both.loc[9, "ad_id"] = 3  # in the second chunk: the row is counted from the file's start
    with pytest.raises(ServingError, match=r"both\.parquet: row 9 names both an item_id and an ad_id"):
        score_file(settings, _written(tmp_path, "both.parquet", both), out, progress=False)
    neither = both.assign(ad_id=pd.array([None] * 12, "Int64"))
    neither.loc[2, "item_id"] = None
    with pytest.raises(ServingError, match=r"neither\.parquet: row 2 names neither an item_id nor an ad_id"):
        score_file(settings, _written(tmp_path, "neither.parquet", neither), out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out.parquet.tmp*"))  # nothing half-written


def test_a_version_without_published_features_is_refused(champion, candidates, tmp_path):
    path, _ = candidates
    settings = champion["settings"]
    settings = settings.model_copy(update={"serve": settings.serve.model_copy(update={"key_prefix": "mtltest-empty"})})
    with pytest.raises(
        ServingError, match=r"v1 \(alias 'champion'\) has no published features.*mtl publish --version 1"
    ):
        score_file(settings, path, tmp_path / "out.parquet", progress=False)
    with pytest.raises(ServingError, match="no version of model 'mtl_recommender' holds the alias 'nobody'"):
        score_file(settings, path, tmp_path / "out.parquet", alias="nobody", progress=False)


def test_a_float_id_column_with_gaps_is_read_as_ids(serving_shop, champion, candidates, tmp_path):  # noqa: F811
    path, frame = candidates
    floats = frame.assign(item_id=frame["item_id"].astype("float64"), ad_id=frame["ad_id"].astype("float64"))
    table = pa.Table.from_pandas(floats, preserve_index=False)
    assert pa.types.is_floating(table.schema.field("item_id").type)
    pq.write_table(table, tmp_path / "floats.parquet")
    score_file(champion["settings"], tmp_path / "floats.parquet", tmp_path / "floats_out.parquet", progress=False)
    score_file(champion["settings"], path, tmp_path / "ints_out.parquet", progress=False)
    tasks = serving_shop.loaded.task_names
    got = pq.read_table(tmp_path / "floats_out.parquet").to_pandas()[tasks]
    assert got.equals(pq.read_table(tmp_path / "ints_out.parquet").to_pandas()[tasks])


def test_the_publish_and_score_commands(serving_shop, champion, candidates, tmp_path, monkeypatch):  # noqa: F811
    for name, value in serving_shop.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MTL_MLFLOW_TRACKING_URI", champion["uri"])
    runner = CliRunner()
    published = runner.invoke(app, ["publish", "--snapshot", str(serving_shop.snap), "--json"])
    assert published.exit_code == 0, published.output
    manifest = json.loads(published.stdout)
    assert manifest["version"] == champion["version"] and manifest["counts"]["users"] == 600
    assert set(manifest["reference_scores"]) == set(serving_shop.loaded.task_names)  # the snapshot's holdout scores
    path, frame = candidates
    scored = runner.invoke(app, ["score", "--candidates", str(path), "--out", str(tmp_path / "s.parquet"), "--json"])
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["rows"] == len(frame) == pq.read_metadata(tmp_path / "s.parquet").num_rows


def test_the_variant_is_chosen_as_the_server_chooses_it(serving_shop, champion, candidates, tmp_path):  # noqa: F811
    path, _ = candidates
    settings = champion["settings"]
    # This version was registered without int8 / ONNX forms: "fastest" falls back to the fp32 model.
    score_file(settings, path, tmp_path / "fastest.parquet", variant="fastest", progress=False)
    score_file(settings, path, tmp_path / "fp32.parquet", progress=False)
    assert pq.read_table(tmp_path / "fastest.parquet").equals(pq.read_table(tmp_path / "fp32.parquet"))
    with pytest.raises(ServingError, match="unknown model variant 'int9': expected one of fp32, int8, onnx, fastest"):
        score_file(settings, path, tmp_path / "out.parquet", variant="int9", progress=False)


def test_the_dags_score_candidates_step_scores_the_days_file_into_the_data_dir(champion, candidates, tmp_path):
    from mtl_core import pipeline

    path, frame = candidates
    day_file = tmp_path / "candidates-2026-02-09.parquet"
    day_file.write_bytes(path.read_bytes())
    settings = champion["settings"].model_copy(
        update={
            "data_dir": tmp_path / "data",
            "serve": champion["settings"].serve.model_copy(
                update={"candidates": str(tmp_path / "candidates-{ds}.parquet")}
            ),
        }
    )
    assert pipeline.candidates_file(settings, "2026-02-09T00:00:00+00:00") == day_file
    result = pipeline.score_candidates(settings, "2026-02-09T00:00:00+00:00")
    scored = pd.read_parquet(tmp_path / "data" / "scores" / "2026-02-09.parquet")
    assert result["scored"] and result["rows"] == len(frame) == len(scored)
    assert (scored["model_version"] == champion["version"]).all()
    off = champion["settings"].model_copy(
        update={"serve": champion["settings"].serve.model_copy(update={"candidates": ""})}
    )
    assert pipeline.score_candidates(off, "2026-02-09") == {"scored": False, "reason": "serve.candidates is empty"}
