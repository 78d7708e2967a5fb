"""``mtl serve``: the champion behind an HTTP API (FastAPI under uvicorn).

``POST /predict`` takes a JSON list of ``{user_id, item_id}`` (a feed item) or ``{user_id, ad_id}`` (an ad),
looks the rows' features up in the online store (``serving.online``: raw user ids are pseudonymised there and
never stored), and answers one probability per task and row, with the model version. Unknown users and items
are scored with the cold-start features training gives an entity without history, and flagged.

The model in service is ONE reference to an immutable ``Served`` (version + scorer). A background thread
polls the alias and, once the new version's features are published, loads it and replaces that reference:
a request reads the reference once, so it finishes on the version it started with and none is dropped.

``/healthz`` and ``/metrics`` (Prometheus) need no token; ``/predict`` needs ``Authorization: Bearer
<serve.token>``. With several workers, uvicorn starts each from ``app_from_environment`` (settings from the
MTL_* variables, as every ``mtl`` command reads them) and the metrics use prometheus_client's multiprocess
mode, in a directory of this server's own (``PROMETHEUS_MULTIPROC_DIR`` if set).
"""

from __future__ import annotations

import hmac
import json
import logging
import logging.config
import os
import shutil
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
from fastapi import Body, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, StrictInt, TypeAdapter, ValidationError
from starlette.background import BackgroundTask

from mtl_core.config import Settings, load_settings, redact
from mtl_core.errors import MtlError
from mtl_core.serving.online import OnlineStore, ServingError

log = logging.getLogger(__name__)

# uvicorn starts every worker of `--workers N` from this import string, with factory=True.
APP_FACTORY = "mtl_core.serving.server:app_from_environment"
# The alias a worker serves; not MTL_*, since the settings refuse variables they do not know.
ALIAS_ENV_VAR = "MTLSERVE_ALIAS"
WORKERS_ENV_VAR = "MTLSERVE_WORKERS"
MULTIPROC_ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"
# A version whose download or load failed is tried again after this long, not at every poll.
RETRY_FAILED_LOAD_SECONDS = 60.0
# A malformed request's answer lists at most this many problems: enough to fix a batch, short to read.
MAX_PROBLEMS = 20
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 20))
_PATHS = ("/predict", "/healthz", "/metrics")


# --------------------------------------------------------------------------------------------------
# Requests.
class PredictRow(BaseModel):
    """One row to score: a user and either a feed item or an ad."""

    model_config = ConfigDict(extra="forbid")

    user_id: Annotated[StrictInt, Field(ge=0, le=2**63 - 1, description="The warehouse's user id")]
    item_id: Annotated[StrictInt | None, Field(ge=0, le=2**63 - 1, description="A feed item (or give ad_id)")] = None
    ad_id: Annotated[StrictInt | None, Field(ge=0, le=2**63 - 1, description="An ad (or give item_id)")] = None
    time: datetime | None = Field(None, description="When the row is shown, ISO-8601 (default: now, UTC)")
    position: Annotated[StrictInt | None, Field(ge=0, le=10_000, description="Slot on the page (default 0)")] = None


_ROWS = TypeAdapter(list[PredictRow])
_FIELDS = ", ".join(PredictRow.model_fields)


class RequestProblem(Exception):
    """A request the server refuses; ``problems`` name the field of each."""

    def __init__(self, status: int, problems: list[dict[str, str]]):
        super().__init__(f"{status}: {problems}")
        self.status = status
        self.problems = problems


def _field(loc: tuple | list) -> str:
    """pydantic's location as a reader names it: ``[2].user_id``; ``body`` for the request as a whole."""
    if loc and loc[0] == "body" and len(loc) == 2 and isinstance(loc[1], int):
        return "body"  # a JSON syntax error: the number is a character position, not a row
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
    return text or "body"


def _problem(error: dict[str, Any]) -> str:
    kind = error.get("type", "")
    if kind == "missing":
        return "missing"
    if kind == "extra_forbidden":
        return f"unknown field (a row has {_FIELDS})"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return 'must be an object like {"user_id": 17, "item_id": 4}'
    if kind == "json_invalid":
        where = error["loc"][-1] if isinstance(error["loc"][-1], int) else "?"
        return f"not valid JSON at character {where} ({error.get('ctx', {}).get('error', 'parse error')})"
    if kind.startswith(("datetime", "date_")):
        return f"must be an ISO-8601 time such as 2026-02-09T10:00:00Z ({error.get('msg', kind)})"
    if kind in ("int_type", "int_parsing"):
        return f"must be an integer, not {type(error.get('input')).__name__}"
    return error.get("msg", kind)


def _one(field: str, problem: str) -> list[dict[str, str]]:
    return [{"field": field, "problem": problem}]


_EXAMPLE = '[{"user_id": 17, "item_id": 4}]'


def parse_rows(body: Any, max_batch: int) -> list[PredictRow]:
    """The request body as rows, or ``RequestProblem`` naming each bad field."""
    if body is None:
        raise RequestProblem(422, _one("body", f"missing: send a JSON list of rows like {_EXAMPLE}"))
    if not isinstance(body, list):
        raise RequestProblem(
            422, _one("body", f"must be a JSON list of rows like {_EXAMPLE}, not {type(body).__name__}")
        )
    if not body:
        raise RequestProblem(422, _one("body", "empty list: send at least one row"))
    if len(body) > max_batch:
        raise RequestProblem(
            413,
            _one(
                "body",
                f"{len(body)} rows, more than serve.max_batch = {max_batch} per request "
                "(score large sets with `mtl score`)",
            ),
        )
    try:
        rows = _ROWS.validate_python(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        problems = [{"field": _field(e["loc"]), "problem": _problem(e)} for e in errors[:MAX_PROBLEMS]]
        if len(errors) > MAX_PROBLEMS:
            problems += _one("body", f"and {len(errors) - MAX_PROBLEMS} more problem(s)")
        raise RequestProblem(422, problems) from None
    problems = []
    for i, row in enumerate(rows):
        if (row.item_id is None) == (row.ad_id is None):
            which = "both given" if row.item_id is not None else "neither given"
            problems += _one(
                f"[{i}].item_id/ad_id", f"{which}: a row scores a feed item (item_id) or an ad (ad_id), exactly one"
            )
            if len(problems) == MAX_PROBLEMS:
                break
    if problems:
        raise RequestProblem(422, problems)
    return rows


def _utc_naive(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo is not None else moment


def rows_frame(rows: list[PredictRow]) -> pd.DataFrame:
    """The rows in the online store's lookup layout (optional columns only when a row has them)."""
    frame = pd.DataFrame(
        {
            "user_id": np.fromiter((r.user_id for r in rows), dtype=np.int64, count=len(rows)),
            "item_id": pd.array([r.item_id for r in rows], dtype="Int64"),
            "ad_id": pd.array([r.ad_id for r in rows], dtype="Int64"),
        }
    )
    if any(r.time is not None for r in rows):
        times = [np.datetime64("NaT") if r.time is None else np.datetime64(_utc_naive(r.time), "us") for r in rows]
        frame["time"] = np.array(times, dtype="datetime64[us]")
    if any(r.position is not None for r in rows):
        frame["position"] = np.array([np.nan if r.position is None else r.position for r in rows], dtype=np.float64)
    return frame


# --------------------------------------------------------------------------------------------------
# The model in service, and the poller that replaces it.
@dataclass(frozen=True)
class Served:
    """One version ready to score; never changed, only replaced as a whole."""

    version: int
    scorer: Any  # learn.variants.Scorer
    task_names: tuple[str, ...]
    variant: str
    published_at: str | None
    loaded_at: str


class Metrics:
    """The server's Prometheus metrics; in multiprocess mode their values live in PROMETHEUS_MULTIPROC_DIR."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV_VAR))
        r = self.registry
        self.requests = Counter("mtl_serve_requests", "Requests by path and status", ["path", "status"], registry=r)
        self.latency = Histogram(
            "mtl_serve_request_seconds", "Time to answer, by path", ["path"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.rows = Counter("mtl_serve_rows", "Rows scored", registry=r)
        self.cold = Counter("mtl_serve_cold_rows", "Rows scored with cold-start features", ["side"], registry=r)
        self.scores = Histogram(
            "mtl_serve_score", "Served probabilities per task", ["task"], buckets=SCORE_BUCKETS, registry=r
        )
        # Per worker ("liveall"): during a switch the workers may briefly serve different versions.
        self.version = Gauge(
            "mtl_serve_model_version", "Model version in service (0: none)", registry=r, multiprocess_mode="liveall"
        )
        self.waiting = Gauge(
            "mtl_serve_waiting_version",
            "Version the alias names that is not served yet: features unpublished or load failed (0: none)",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.polls = Counter("mtl_serve_polls", "Polls of the alias by result", ["result"], registry=r)
        self.switches = Counter("mtl_serve_switches", "Switches to a new version", registry=r)
        self.record_errors = Counter("mtl_serve_record_errors", "Scores not recorded for the monitor", registry=r)

    def exposition(self) -> bytes:
        if self.multiprocess:
            registry = CollectorRegistry()
            prometheus_multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class ModelPoller:
    """Holds the model in service and replaces it when the alias moves to a version whose features are published."""

    def __init__(self, settings: Settings, alias: str, store: OnlineStore, metrics: Metrics, client=None):
        """``client``: the MLflow client to read the registry with (default: one for the settings' store)."""
        self.settings = settings
        self.alias = alias
        self.model_name = settings.pipeline.model_name
        self.store = store
        self.metrics = metrics
        self.served: Served | None = None
        # Why the alias's version is not the one in service (None: it is); shown by /healthz.
        self.waiting: dict[str, Any] | None = {"version": None, "reason": "the alias has not been read yet"}
        self.last_poll: dict[str, Any] = {}
        self._client = client
        self._failed: dict[int, tuple[float, str]] = {}  # version -> when its load failed, and why
        self._announced: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._downloads = Path(tempfile.mkdtemp(prefix="mtl-serve-"))

    # --- polling ----------------------------------------------------------------------------------
    def poll_once(self, strict: bool = False) -> str:
        """Read the alias once and switch if a new, published version is there; returns what happened.

        Not strict (the background poll): a failure is logged and counted, and the current version keeps
        serving. Strict (before the server starts): a failure to read the registry or to load the version
        raises, so `mtl serve` says what is wrong instead of starting a server that cannot serve.
        """
        try:
            result = self._poll()
        except Exception as exc:  # never kill the poller: the version in service keeps serving
            result = "failed"
            message = _one_line(exc)
            self.last_poll = {"at": _now(), "result": result, "error": message}
            self.metrics.polls.labels(result).inc()
            if strict:
                raise ServingError(f"cannot serve {self.model_name}@{self.alias}: {message}") from exc
            log.warning("polling %s@%s failed, %s: %s", self.model_name, self.alias, self._keeps(), message)
            return result
        self.last_poll = {"at": _now(), "result": result}
        self.metrics.polls.labels(result).inc()
        return result

    def _keeps(self) -> str:
        return f"v{self.served.version} keeps serving" if self.served else "nothing is served yet"

    def _poll(self) -> str:
        if self._client is None:
            from mtl_core.registry.store import configure

            self._client = configure(self.settings.resolved_mlflow_tracking_uri)
        from mtl_core.registry.aliases import current_alias
        from mtl_core.registry.store import mlflow_errors

        with mlflow_errors(f"reading the alias {self.alias!r} of {self.model_name}"):
            version = current_alias(self._client, self.model_name, self.alias)
        if version is None:
            self._wait(None, f"no version of {self.model_name} holds the alias {self.alias!r} yet")
            return "no_version"
        if self.served is not None and self.served.version == version:
            self._wait(None, None)
            return "unchanged"
        if not self.store.is_published(version):
            reason = (
                f"v{version} holds {self.alias!r} but its features are not published to the online store yet "
                f"(mtl publish --version {version}); {self._keeps()}"
            )
            if self._announced != version:  # once per version, not at every poll
                log.warning(reason)
                self._announced = version
            self._wait(version, reason)
            return "unpublished"
        failed = self._failed.get(version)
        if failed is not None and time.monotonic() - failed[0] < RETRY_FAILED_LOAD_SECONDS:
            return "failed"  # said when it failed; /healthz still shows why
        try:
            served = self._load(version)
        except Exception as exc:
            why = _one_line(exc)
            self._failed[version] = (time.monotonic(), why)
            retry = f"tried again in {RETRY_FAILED_LOAD_SECONDS:.0f} s"
            self._wait(
                version, f"v{version} holds {self.alias!r} but cannot be loaded ({why}); {self._keeps()}, {retry}"
            )
            raise
        self._switch(served)
        return "switched"

    def _wait(self, version: int | None, reason: str | None) -> None:
        self.waiting = None if reason is None else {"version": version, "reason": reason}
        self.metrics.waiting.set(version or 0)

    def _load(self, version: int) -> Served:
        from mtl_core.learn.variants import load_scorer
        from mtl_core.registry.pyfunc import download_model_dir

        dest = self._downloads / f"v{version}-{int(time.time() * 1000)}"
        model_dir = download_model_dir(self._client, self.model_name, version, dest)
        serve = self.settings.serve
        variant = serve.variant
        variants_dir = None
        if variant != "fp32":  # the int8 / ONNX files are artifacts of the version's run (None: it has none)
            from mtl_core.registry.variants import download_variants

            variants_dir = download_variants(self._client, self.model_name, version, dest / "variants")
        try:
            scorer = load_scorer(model_dir, variant, variants_dir, max_auc_loss=serve.variant_max_auc_loss)
        except (ValueError, MtlError) as exc:
            raise ServingError(f"loading v{version} as serve.variant={variant!r} failed: {_one_line(exc)}") from exc
        manifest = self.store.manifest(version) or {}
        # A first request must not pay for lazy initialisation, and a version whose published features do not
        # fit it must not replace one that works: score one cold row before switching.
        warm = self.store.lookup(version, rows_frame([PredictRow(user_id=0, item_id=0)]), scorer.space, scorer.settings)
        scorer.score(warm.examples, warm.texts)
        return Served(
            version=version,
            scorer=scorer,
            task_names=tuple(scorer.task_names),
            variant=getattr(scorer, "variant", variant),
            published_at=manifest.get("published_at"),
            loaded_at=_now(),
        )

    def _switch(self, served: Served) -> None:
        old = self.served
        self.served = served  # the one write requests see: before it the old version, after it the new one
        self._wait(None, None)
        self._failed.pop(served.version, None)
        self.metrics.version.set(served.version)
        self.metrics.switches.inc()
        log.info(
            "serving %s v%d (%s) for alias %r%s",
            self.model_name,
            served.version,
            served.variant,
            self.alias,
            f", replacing v{old.version}" if old else "",
        )
        # The model directories of older versions are loaded already; keep the previous one's files for its
        # in-flight requests' sake, drop the rest.
        keep = {f"v{served.version}-", *([f"v{old.version}-"] if old else [])}
        for path in self._downloads.iterdir():
            if not any(path.name.startswith(k) for k in keep):
                shutil.rmtree(path, ignore_errors=True)

    # --- the thread -------------------------------------------------------------------------------
    def start(self) -> None:
        if self.served is None and not self.last_poll:
            self.poll_once()
        self._thread = threading.Thread(target=self._run, name="mtl-serve-poller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.serve.poll_seconds):
            self.poll_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        shutil.rmtree(self._downloads, ignore_errors=True)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _one_line(exc: BaseException) -> str:
    text = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__)
    return text[:500]


# --------------------------------------------------------------------------------------------------
# The app.
class _AuthAndMetrics:
    """ASGI middleware: counts and times every request, and checks the bearer token of /predict before
    anything reads the body (an unauthenticated caller learns nothing about what a valid request is)."""

    def __init__(self, app, expected: bytes, metrics: Metrics):
        self.app = app
        self.expected = expected
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        path = scope["path"] if scope["path"] in _PATHS else "other"
        state = {"status": 500, "counted": False}

        def count() -> None:
            if not state["counted"]:
                state["counted"] = True
                self.metrics.requests.labels(path, str(state["status"])).inc()
                self.metrics.latency.labels(path).observe(time.perf_counter() - started)

        async def send_and_count(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)
            # Timed until the answer's last byte is sent: what the client waits for, without the recording of
            # the served scores that runs after it (a background task).
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                count()

        try:
            if path == "/predict" and not self._authorised(scope):
                await _unauthorised(send_and_count)
            else:
                await self.app(scope, receive, send_and_count)
        finally:
            count()  # a request that failed before it was answered

    def _authorised(self, scope) -> bool:
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":  # the scheme is case-insensitive (RFC 9110)
                    given = credentials.strip()
                break
        return hmac.compare_digest(given, self.expected)


async def _unauthorised(send) -> None:
    body = json.dumps(
        {"detail": [{"field": "Authorization", "problem": "missing or wrong bearer token (header: Bearer <token>)"}]}
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b"Bearer"),
    ]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _problem_response(status: int, problems: list[dict[str, str]]) -> JSONResponse:
    return JSONResponse({"detail": problems}, status_code=status)


def create_app(settings: Settings, alias: str = "champion") -> FastAPI:
    """The scoring app of ``settings``'s model at ``alias``; its poller starts with the app (lifespan)."""
    token = settings.serve.token.get_secret_value()
    if not token:
        raise ServingError(
            "no bearer token for POST /predict: set MTL_SERVE__TOKEN (or serve.token in the settings file) "
            "to a long random string"
        )
    store = OnlineStore(settings)  # refuses an empty or unreachable serve.redis_url
    metrics = Metrics()
    poller = ModelPoller(settings, alias, store, metrics)
    max_batch = settings.serve.max_batch

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # The first poll runs before the port answers, so a started server serves at once.
        poller.start()
        try:
            yield
        finally:
            poller.stop()

    app = FastAPI(
        title="mtl serve",
        summary=f"{settings.pipeline.model_name}@{alias}: one probability per task and row",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.poller = poller
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        return _problem_response(422, [{"field": _field(e["loc"]), "problem": _problem(e)} for e in exc.errors()])

    @app.post("/predict")
    def predict(rows: Any = Body(None)) -> Response:  # noqa: B008 -- FastAPI's way to declare the body
        # A plain `def`: FastAPI runs it in its threadpool, so scoring never blocks the poller or /healthz.
        try:
            parsed = parse_rows(rows, max_batch)
        except RequestProblem as problem:
            return _problem_response(problem.status, problem.problems)
        served = poller.served  # read once: this request finishes on this version whatever the poller does
        if served is None:
            reason = (poller.waiting or {}).get("reason") or "no model loaded yet"
            return _problem_response(503, _one("model", reason))
        try:
            assembled = store.lookup(served.version, rows_frame(parsed), served.scorer.space, served.scorer.settings)
        except MtlError as exc:
            return _problem_response(503, _one("features", _one_line(exc)))
        # No lock: every scorer is read-only while serving (the fp32 model stays in eval mode, onnxruntime's
        # session is thread-safe), so concurrent requests score at once.
        probs = served.scorer.score(assembled.examples, assembled.texts)
        # The metrics and the monitor's sample are written after the answer is sent, off the client's clock.
        spaces = assembled.examples.raw["space"]
        recording = BackgroundTask(_record, served, probs, assembled.cold_user, assembled.cold_item, spaces)
        return Response(_answer(served, probs, assembled), media_type="application/json", background=recording)

    def _record(
        served: Served, probs: np.ndarray, cold_user: np.ndarray, cold_item: np.ndarray, spaces: np.ndarray
    ) -> None:
        metrics.rows.inc(len(probs))
        cold_users, cold_items = int(cold_user.sum()), int(cold_item.sum())
        if cold_users:
            metrics.cold.labels("user").inc(cold_users)
        if cold_items:
            metrics.cold.labels("item").inc(cold_items)
        rows_of = task_rows(served, spaces)
        for t, task in enumerate(served.task_names):
            histogram = metrics.scores.labels(task)
            for p in probs[rows_of[task], t].tolist():
                histogram.observe(p)
        try:
            store.record_served(served.version, list(served.task_names), probs, rows_of)
        except Exception as exc:  # the monitor's sample is not worth a failed request
            metrics.record_errors.inc()
            log.warning("recording served scores of v%d failed: %s", served.version, _one_line(exc))

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        served = poller.served
        body: dict[str, Any] = {
            "model": settings.pipeline.model_name,
            "alias": alias,
            "waiting": poller.waiting,
            "last_poll": poller.last_poll,
        }
        if served is None:
            reason = (poller.waiting or {}).get("reason") or poller.last_poll.get("error") or "no model loaded yet"
            return JSONResponse({"status": "unavailable", "reason": reason, **body}, status_code=503)
        body.update(
            status="ok",
            version=served.version,
            variant=served.variant,
            tasks=list(served.task_names),
            published_at=served.published_at,
            loaded_at=served.loaded_at,
        )
        return JSONResponse(body)

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_AuthAndMetrics, expected=token.encode(), metrics=metrics)
    return app


# A request row is a feed impression (item_id) or an ad impression (ad_id); a task scored on clicks (cvr as
# p(buy | click)) is served on feed rows. Churn (users) has no request rows: /predict serves it as a
# by-product, and its served scores are not comparable with its holdout's.
SERVED_SPACE = {"feed": "feed", "clicks": "feed", "ads": "ads", "users": "users"}


def task_rows(served: Served, spaces: np.ndarray) -> dict[str, np.ndarray]:
    """Per task, the rows of its own sample space: what its served-score histogram and monitor sample hold."""
    space_of = {task.name: SERVED_SPACE[task.sample_space] for task in served.scorer.settings.tasks}
    return {task: spaces == space_of.get(task) for task in served.task_names}


def _answer(served: Served, probs: np.ndarray, assembled) -> bytes:
    names = served.task_names
    cold_user, cold_item = assembled.cold_user.tolist(), assembled.cold_item.tolist()
    predictions = [
        {**dict(zip(names, row, strict=True)), "cold_user": cu, "cold_item": ci}
        for row, cu, ci in zip(probs.tolist(), cold_user, cold_item, strict=True)
    ]
    return json.dumps(
        {"model_version": served.version, "variant": served.variant, "tasks": list(names), "predictions": predictions}
    ).encode()


# --------------------------------------------------------------------------------------------------
# Running it.
def app_from_environment() -> FastAPI:
    """uvicorn's factory for each worker of ``--workers N``: the settings of the MTL_* variables."""
    settings = load_settings()
    disable_created_metrics()
    _configure_torch(int(os.environ.get(WORKERS_ENV_VAR, "1")))
    return create_app(settings, os.environ.get(ALIAS_ENV_VAR, "champion"))


def _configure_torch(workers: int) -> None:
    import torch

    # One request scores a few rows: splitting that across threads costs more than it saves, and the
    # workers share the cores.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers) // 2) or 1)


def _log_config(level: str) -> dict[str, Any]:
    from uvicorn.config import LOGGING_CONFIG

    config = json.loads(json.dumps(LOGGING_CONFIG))
    config["loggers"]["mtl_core"] = {"handlers": ["default"], "level": level, "propagate": False}
    return config


def serve(
    settings: Settings,
    alias: str = "champion",
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int = 1,
    config_file: str | Path | None = None,
) -> None:
    """Run the server until interrupted.

    Refuses to start (``ServingError``) without a token, when Redis or the registry is unreachable, or when the
    version at ``alias`` cannot be loaded in ``serve.variant``; starts and answers 503 while no version holds the
    alias or its features are not published yet. ``config_file``: the settings file the workers of
    ``workers > 1`` read (they build their settings from the environment, as `mtl` does).
    """
    import uvicorn

    if workers < 1:
        raise ServingError(f"--workers {workers}: give at least 1")
    log_config = _log_config(settings.log_level)
    logging.config.dictConfig(log_config)  # uvicorn applies it too, but only once it runs: after the first poll
    # `*_created` series double what /metrics holds and no dashboard of ours reads them.
    disable_created_metrics()
    app = create_app(settings, alias)  # checks the token and Redis
    try:
        app.state.poller.poll_once(strict=True)
    except BaseException:
        app.state.poller.stop()  # removes what it downloaded
        raise
    common = dict(host=host, port=port, log_config=log_config, access_log=False)
    if workers == 1:
        _configure_torch(1)
        uvicorn.run(app, **common)
        return
    # Each worker builds its own app from the environment: make sure that gives these settings.
    app.state.poller.stop()
    if config_file is not None:
        os.environ["MTL_CONFIG"] = str(Path(config_file).resolve())
    if load_settings() != settings:
        raise ServingError(
            f"--workers {workers}: each worker reads its settings from the environment (MTL_* variables and "
            "MTL_CONFIG), which give other settings than this process has; pass them that way, or use --workers 1"
        )
    os.environ[ALIAS_ENV_VAR] = alias
    os.environ[WORKERS_ENV_VAR] = str(workers)
    own_dir = None
    if not os.environ.get(MULTIPROC_ENV_VAR):
        own_dir = tempfile.mkdtemp(prefix="mtl-serve-metrics-")
        os.environ[MULTIPROC_ENV_VAR] = own_dir
    try:
        uvicorn.run(APP_FACTORY, factory=True, workers=workers, **common)
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
