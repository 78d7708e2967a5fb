"""Typed settings: defaults < YAML file (``--config`` or ``MTL_CONFIG``) < ``MTL_*`` environment variables.

Every file the project writes lives under ``data_dir`` so that pointing ``MTL_DATA_DIR`` elsewhere gives a
second, independent installation. Nested settings are reachable from the environment with a double
underscore, e.g. ``MTL_SHOP__USERS=5000``. Unknown keys are refused, so a typo is reported instead of
silently ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mtl_core.errors import MtlError

ENV_PREFIX = "MTL_"
CONFIG_ENV_VAR = "MTL_CONFIG"


class ConfigError(MtlError):
    """A setting is wrong; the message names it, where it came from, and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ShopSettings(_Strict):
    """Defaults of the synthetic shop (``mtl simulate`` flags override them)."""

    users: int = Field(2000, ge=1)
    items: int = Field(500, ge=1)
    days: int = Field(35, ge=1)
    start: str = "2026-01-05"
    seed: int = 7
    drift_day: int | None = Field(None, ge=0)


class Settings(_Strict):
    data_dir: Path = Path("data")
    # Empty means the embedded default: sqlite:///<data_dir>/warehouse.db
    warehouse_url: str = ""
    # Empty means MLflow's own MLFLOW_TRACKING_URI (read by load_settings), else sqlite:///<data_dir>/mlflow.db
    mlflow_tracking_uri: str = ""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    shop: ShopSettings = ShopSettings()

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
