"""A value the warehouse stores against its column's type stops extraction with the table and column named.

Extraction writes each column with the schema's Parquet type, so such a row fails deep in the driver or in
Arrow; ``pipeline.extract`` then asks ``stored_value_problems`` where it is. A clean warehouse has none.
"""

from __future__ import annotations

import pickle
from datetime import date, datetime

import pytest

from mtl_core import pipeline
from mtl_core.config import Settings
from mtl_core.data import warehouse as wh
from mtl_core.data.corruption import corrupt_interval
from mtl_core.data.shop import ShopSpec, write_shop
from mtl_core.data.stored_values import StoredValueError, stored_value_problems

START, END = datetime(2026, 1, 5), datetime(2026, 1, 19)


def shop(url: str):
    engine = wh.make_engine(url)
    write_shop(engine, ShopSpec(users=200, items=80, days=14, start=date(2026, 1, 5), seed=2))
    return engine


def extract_for(url: str, data_dir) -> StoredValueError:
    """Run the pipeline step for the interval ending at END (lookback 7 + history 7 days = [START, END))."""
    settings = Settings(data_dir=data_dir, warehouse_url=url, pipeline={"lookback_days": 7})
    with pytest.raises(StoredValueError) as caught:
        pipeline.extract(settings, END)
    return caught.value


def test_a_clean_warehouse_has_no_stored_value_problems(any_url):
    assert stored_value_problems(shop(any_url), START, END) == []


def test_a_price_written_as_text_names_items_price(any_url, tmp_path):
    corrupt_interval(shop(any_url), "2026-01-12", END, kinds=("type_change",))

    error = extract_for(any_url, tmp_path)

    assert [(p["table"], p["column"]) for p in error.problems] == [("items", "price")]
    line = str(error).splitlines()[1]
    assert line.startswith("  - items | column price | ")
    assert ("stored as text" in line and "'" in line) if "sqlite" in any_url else "is text in the warehouse" in line
    assert str(pickle.loads(pickle.dumps(error))) == str(error)
    assert not list((tmp_path / "snapshots").glob("*/manifest.json"))


def test_a_title_that_is_not_utf8_names_items_title(sqlite_url, tmp_path):
    corrupt_interval(shop(sqlite_url), "2026-01-12", END, kinds=("invalid_utf8_titles",))

    error = extract_for(sqlite_url, tmp_path)

    assert [(p["table"], p["column"]) for p in error.problems] == [("items", "title")]
    assert "not valid UTF-8" in str(error) and "Caf\\xe9 cr\\xe8me'" in str(error)


def test_mtl_extract_names_the_table_and_column_on_its_one_line(sqlite_url, tmp_path, monkeypatch, capsys):
    from mtl_core.cli import main

    corrupt_interval(shop(sqlite_url), "2026-01-12", END, kinds=("type_change",))
    monkeypatch.setattr(
        "sys.argv", ["mtl", "extract", "--start", "2026-01-05", "--end", "2026-01-19", "--out", str(tmp_path / "s")]
    )
    monkeypatch.setenv("MTL_WAREHOUSE_URL", sqlite_url)
    monkeypatch.setenv("MTL_DATA_DIR", str(tmp_path))

    with pytest.raises(SystemExit) as exited:
        main()

    assert exited.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: cannot extract 2026-01-05T00:00:00 .. 2026-01-19T00:00:00: the warehouse holds ")
    assert "values its schema does not allow in items.price (below)" in line


def test_invalid_utf8_cannot_be_written_into_postgresql(pg_url):
    with pytest.raises(ValueError, match="PostgreSQL refuses invalid UTF-8"):
        corrupt_interval(shop(pg_url), "2026-01-12", END, kinds=("invalid_utf8_titles",))
