"""The synthetic shop's examples, built as the training benchmarks need them (imported by bench/peers.py,
text_cost.py and scaling.py, which run as scripts from this folder)."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

START = date(2026, 1, 5)


def shop_examples(root: Path, settings, users: int, items: int, days: int, seed: int, keep_warehouse: bool = True):
    """Write a shop (``users`` x ``items``, ``days`` from START, ``seed``) into a SQLite warehouse under ``root``,
    extract all its days into ``root/snapshot`` and build ``settings``' examples of it, as bench/quality.py does.

    ``keep_warehouse=False`` removes the warehouse afterwards: the snapshot holds what training needs."""
    from mtl_core.data import warehouse as wh
    from mtl_core.data.extract import extract_snapshot
    from mtl_core.data.pseudonyms import pseudonymiser_for
    from mtl_core.data.shop import ShopSpec, write_shop
    from mtl_core.learn.examples import build_examples

    root.mkdir(parents=True, exist_ok=True)
    engine = wh.make_engine(f"sqlite:///{root / 'warehouse.db'}")
    write_shop(engine, ShopSpec(users=users, items=items, days=days, start=START, seed=seed), replace=True)
    snapshot = root / "snapshot"
    end = START + timedelta(days=days)
    extract_snapshot(engine, START.isoformat(), end.isoformat(), snapshot, pseudonymiser_for(settings))
    engine.dispose()
    if not keep_warehouse:
        (root / "warehouse.db").unlink()
    return build_examples(snapshot, settings.features, settings.tasks)
