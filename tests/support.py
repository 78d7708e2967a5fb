"""Test-only helpers shared by several test modules (importable since pytest puts tests/ on sys.path)."""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import text

from mtl_core.data.pseudonyms import Pseudonymiser

# The key the tests' snapshots are pseudonymised with; never a production key.
PSEUDONYM_KEY = "tests-only pseudonym key, not a secret"
PSEUDONYMS = Pseudonymiser(PSEUDONYM_KEY)

# Warehouse user ids no hash or counter produces by chance, so finding one in a file means it leaked.
RAW_ID_OFFSET = 731_000_000_000


def renumber_users(engine, offset: int = RAW_ID_OFFSET) -> None:
    """Give a simulated shop's users distinctive raw ids (its 1..N would turn up in any file by chance)."""
    with engine.begin() as conn:
        for table in ("users", "behavior_events", "ad_events", "truth_users"):
            conn.execute(text(f"UPDATE {table} SET user_id = user_id + {offset}"))


def _binary_forms(ids: set[int]) -> dict[bytes, str]:
    """Byte prefixes that any int64 or float64 (either byte order) of one of ``ids`` must contain."""
    forms: dict[bytes, str] = {}
    for value in ids:
        forms[struct.pack("<q", value)[2:]] = "int64"
        forms[struct.pack(">q", value)[:6]] = "int64"
        forms[struct.pack("<d", float(value))[3:]] = "float64"
        forms[struct.pack(">d", float(value))[:5]] = "float64"
    return forms


def _blobs(path: Path) -> Iterable[tuple[str, bytes]]:
    if path.suffix == ".parquet":  # compressed columns: compare values, not bytes
        table = pq.read_table(path)
        for name in table.column_names:
            column = table[name]
            if pa.types.is_integer(column.type):
                yield f"{path}:{name}", column.drop_null().to_numpy().astype("<i8").tobytes()
            elif pa.types.is_floating(column.type):
                values = column.drop_null().to_numpy().astype("<f8")
                yield f"{path}:{name}", values.tobytes()  # float64 forms are searched for, too
            elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                yield f"{path}:{name}", "\n".join(column.drop_null().to_pylist()).encode()
        return
    data = path.read_bytes()
    yield str(path), data
    if zipfile.is_zipfile(path):  # torch's model.pt, MLflow's zipped artifacts
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                yield f"{path}!{member}", archive.read(member)


def leaks(root: Path, raw_ids: set[int], secrets: Iterable[str], skip: Iterable[Path] = ()) -> list[str]:
    """Where under ``root`` a raw id (as text, int64 or float64) or a secret occurs; [] when nowhere."""
    skipped = {Path(p).resolve() for p in skip}
    texts = {str(v).encode() for v in raw_ids}
    prefixes = {t[:7] for t in texts}  # the ids share their leading digits: find candidates fast
    forms = _binary_forms(raw_ids)
    found: list[str] = []
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        if path.resolve() in skipped:
            continue
        for where, data in _blobs(path):
            for secret in secrets:
                if secret.encode() in data:
                    found.append(f"{where}: the secret {secret[:4]}...")
            for prefix in prefixes:
                at = data.find(prefix)
                while at >= 0:
                    digits = data[at : at + 20]
                    if any(digits.startswith(t) and not digits[len(t) : len(t) + 1].isdigit() for t in texts):
                        found.append(f"{where}: a raw id as text near byte {at}")
                        break
                    at = data.find(prefix, at + 1)
            for form, kind in forms.items():
                if form in data:
                    found.append(f"{where}: a raw id as {kind}")
                    break
    return found
