"""Values the warehouse stores against its schema: why an extraction stopped, by table and column.

SQLite keeps whatever a producer writes. A price written as ``'12,50'`` stays text in a REAL column (only
well-formed numbers are converted on the way in), and bytes written through ``CAST(... AS TEXT)`` stay text that
is not UTF-8. Extraction writes every column with the schema's Parquet type, so such a row stops it with a
driver or Arrow error that names neither the table nor the column (``Could not convert '12,50' with type str``).
``stored_value_problems`` finds those rows among the ones extraction reads (event rows of [start, end),
dimension rows as of the end) and says where they are. PostgreSQL enforces column types and UTF-8 itself, so
there a type change can only come from a migration: each column's declared type is compared with the schema.

``extract_or_explain`` (what ``pipeline.extract`` and ``mtl extract`` call) runs it only after an extraction
failed, not before every extraction: it scans the tables once more.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Float, Integer, LargeBinary, String, Table, case, cast, func, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from mtl_core.data import extract
from mtl_core.data import warehouse as wh
from mtl_core.data.extract import ExtractionError
from mtl_core.data.pseudonyms import Pseudonymiser

SAMPLES = 3
# SQLite storage classes (typeof) each schema type may hold; NULL is always allowed (validation judges it).
_SQLITE_STORAGE = ((Integer, ("integer",)), (Float, ("real", "integer")), (DateTime, ("text",)), (String, ("text",)))
# PostgreSQL information_schema data_type of each schema type.
_PG_TYPES = (
    (Integer, ("smallint", "integer", "bigint")),
    (Float, ("double precision", "real", "numeric")),
    (DateTime, ("timestamp without time zone", "timestamp with time zone")),
    (String, ("text", "character varying", "character")),
)


class StoredValueError(ExtractionError):
    """Rows of the interval hold values their column's type cannot carry; ``problems`` lists them per column."""

    def __init__(self, problems: list[dict[str, Any]], start: datetime, end: datetime):
        self.problems, self.start, self.end = problems, start, end
        where = ", ".join(dict.fromkeys(f"{p['table']}.{p['column']}" for p in problems))
        lines = [
            f"cannot extract {start.isoformat()} .. {end.isoformat()}: the warehouse holds values its schema does "
            f"not allow in {where} (below); fix the producer or the rows, then re-run the interval",
            *(f"  - {p['table']} | column {p['column']} | {p['problem']}" for p in problems),
        ]
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as cls(*args); this one is built from the problems, not the message.
        return (type(self), (self.problems, self.start, self.end))


def _allowed(column, table: Iterable[tuple[type, tuple[str, ...]]]) -> tuple[str, ...]:
    return next(allowed for base, allowed in table if isinstance(column.type, base))


def _rows_read(table: Table, start: datetime, end: datetime):
    """The rows extraction reads: events of [start, end), users and items as of the end."""
    if table.name in wh.EVENT_TABLES:
        return (table.c.ts >= start) & (table.c.ts < end)
    created = table.c.signup_ts if table.name == "users" else table.c.created_ts
    return or_(created < end, created.is_(None))


def _shown(raw: Any) -> str:
    text = raw.decode("utf-8", errors="backslashreplace") if isinstance(raw, bytes) else str(raw)
    return "'" + (text if len(text) <= 60 else text[:50] + "...") + "'"


def _sqlite_problems(conn, table: Table, start: datetime, end: datetime) -> list[dict[str, Any]]:
    where = _rows_read(table, start, end)
    wrong = {c.name: func.typeof(c).not_in((*_allowed(c, _SQLITE_STORAGE), "null")) for c in table.columns}
    counts = conn.execute(
        select(*(func.sum(case((bad, 1), else_=0)).label(name) for name, bad in wrong.items())).where(where)
    ).one()
    problems = []
    for column in table.columns:
        bad = int(getattr(counts, column.name) or 0)
        if bad:
            stored = conn.execute(
                select(func.typeof(column), cast(column, LargeBinary)).where(where, wrong[column.name]).limit(SAMPLES)
            ).all()
            expected = " or ".join(_allowed(column, _SQLITE_STORAGE))
            problems.append(
                {
                    "table": table.name,
                    "column": column.name,
                    "rows": bad,
                    "problem": f"{bad} rows are stored as {stored[0][0]} where the schema's {column.type} column "
                    f"holds {expected} (samples {', '.join(_shown(raw) for _, raw in stored)})",
                }
            )
        if isinstance(column.type, String):
            problems += _sqlite_not_utf8(conn, table, column, where)
    return problems


def _sqlite_not_utf8(conn, table: Table, column, where) -> list[dict[str, Any]]:
    """Text that is not UTF-8. Only rows with a byte outside printable ASCII need decoding; SQLite finds them."""
    candidates = conn.execute(
        select(cast(column, LargeBinary)).where(where, func.typeof(column) == "text", column.op("GLOB")("*[^ -~]*"))
    )
    bad, samples = 0, []
    for (raw,) in candidates:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad += 1
            if len(samples) < SAMPLES:  # the bytes around the first that is not UTF-8
                around = raw[max(0, exc.start - 30) : exc.end + 20]
                samples.append(_shown(b"..." + around if exc.start > 30 else around))
    if not bad:
        return []
    problem = f"{bad} rows hold text that is not valid UTF-8 (samples {', '.join(samples)})"
    return [{"table": table.name, "column": column.name, "rows": bad, "problem": problem}]


def _postgresql_problems(conn, tables: Iterable[Table]) -> list[dict[str, Any]]:
    from sqlalchemy import text

    declared = {
        (row.table_name, row.column_name): row.data_type
        for row in conn.execute(
            text(
                "SELECT table_name, column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = current_schema()"
            )
        )
    }
    problems = []
    for table in tables:
        for column in table.columns:
            actual = declared.get((table.name, column.name))
            allowed = _allowed(column, _PG_TYPES)
            if actual is not None and actual not in allowed:
                problems.append(
                    {
                        "table": table.name,
                        "column": column.name,
                        "rows": None,
                        "problem": f"the column is {actual} in the warehouse where the schema says {column.type} "
                        "(a migration changed its type)",
                    }
                )
    return problems


def stored_value_problems(engine: Engine, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Per table and column, the rows extraction reads whose stored value the schema's type cannot carry.

    Each problem has ``table``, ``column``, ``rows`` (None on PostgreSQL, where a whole column changed type)
    and ``problem``, a sentence with samples. Empty when every stored value fits.
    """
    tables = [wh.metadata.tables[name] for name in wh.SOURCE_TABLES]
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            return _postgresql_problems(conn, tables)
        return [problem for table in tables for problem in _sqlite_problems(conn, table, start, end)]


def extract_or_explain(
    engine: Engine,
    start: str | datetime,
    end: str | datetime,
    out_dir: str | Path,
    pseudonyms: Pseudonymiser,
    days_dir: str | Path | None = None,
) -> dict[str, Any]:
    """``extract_snapshot``, and when it fails because of stored values, a StoredValueError naming them.

    Any other failure is re-raised as it was (a warehouse that cannot answer the diagnosis explains nothing).
    """
    try:
        return extract.extract_snapshot(engine, start, end, out_dir, pseudonyms, days_dir=days_dir)
    except Exception as exc:
        try:
            start_at, end_at = extract.parse_instant(start, "start"), extract.parse_instant(end, "end")
            problems = stored_value_problems(engine, start_at, end_at)
        except (SQLAlchemyError, ExtractionError):  # a bad interval or a warehouse that does not answer
            problems = []
        if not problems:
            raise
        raise StoredValueError(problems, start_at, end_at) from exc
