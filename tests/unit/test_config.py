"""Settings: defaults < YAML file < MTL_* environment; wrong settings are named with what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtl_core.config import ConfigError, load_settings, redact


def test_defaults_put_everything_under_the_data_dir(tmp_path):
    settings = load_settings(environ={"MTL_DATA_DIR": str(tmp_path)})
    assert settings.data_dir == tmp_path
    assert settings.resolved_warehouse_url == f"sqlite:///{tmp_path.resolve()}/warehouse.db"
    assert settings.resolved_mlflow_tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_file_overrides_defaults_and_environment_overrides_file(tmp_path):
    config = tmp_path / "mtl.yaml"
    config.write_text("data_dir: /srv/mtl\nshop:\n  users: 123\n  days: 9\n")
    settings = load_settings(config, environ={"MTL_SHOP__DAYS": "11"})
    assert settings.data_dir == Path("/srv/mtl") and settings.shop.users == 123 and settings.shop.days == 11
    # MTL_CONFIG names the file when --config is not given
    assert load_settings(environ={"MTL_CONFIG": str(config)}).shop.users == 123


def test_mlflow_tracking_uri_is_honoured():
    settings = load_settings(environ={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert settings.resolved_mlflow_tracking_uri == "http://mlflow:5000"
    mine = load_settings(environ={"MLFLOW_TRACKING_URI": "http://a", "MTL_MLFLOW_TRACKING_URI": "http://b"})
    assert mine.resolved_mlflow_tracking_uri == "http://b"


def test_wrong_value_is_named_with_its_source_and_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_settings(environ={"MTL_LOG_LEVEL": "LOUD"})
    message = str(err.value)
    assert "log_level" in message and "MTL_LOG_LEVEL" in message and "'DEBUG'" in message and "LOUD" in message


def test_unknown_setting_is_refused_by_name(tmp_path):
    config = tmp_path / "mtl.yaml"
    config.write_text("shop:\n  user: 5\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'shop.user' \(from config file"):
        load_settings(config, environ={})
    with pytest.raises(ConfigError, match="unknown setting 'warehouse'.*MTL_WAREHOUSE"):
        load_settings(environ={"MTL_WAREHOUSE": "x"})


@pytest.mark.parametrize(
    ("content", "problem"),
    [("- a\n- b\n", "must hold a mapping"), ("a: [\n", "not valid YAML"), ("shop:\n  users: -3\n", "shop.users")],
)
def test_broken_config_file(tmp_path, content, problem):
    config = tmp_path / "mtl.yaml"
    config.write_text(content)
    with pytest.raises(ConfigError, match=problem):
        load_settings(config, environ={})


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings("/nonexistent/mtl.yaml", environ={})


def test_the_paths_outside_the_data_dir_are_settings_from_their_mtl_variables(tmp_path):
    """MTL_TEXT_CACHE_DIR and MTL_EXPECTATIONS_DIR are settings: setting them must not stop everything."""
    settings = load_settings(
        environ={
            "MTL_DATA_DIR": str(tmp_path),
            "MTL_TEXT_CACHE_DIR": str(tmp_path / "shared_cache"),
            "MTL_EXPECTATIONS_DIR": str(tmp_path / "suites"),
        }
    )
    assert settings.resolved_text_cache_dir == tmp_path / "shared_cache"
    assert settings.expectations_dir == tmp_path / "suites"
    assert load_settings(environ={"MTL_DATA_DIR": str(tmp_path)}).resolved_text_cache_dir == tmp_path / "text_cache"


def test_a_runs_conf_cannot_change_what_decides_promotion_unless_allowed(tmp_path):
    from mtl_core.config import gate_overrides, merge_overrides

    base = load_settings(environ={"MTL_DATA_DIR": str(tmp_path)})
    lowered = [t.model_dump() | {"floor": 0.0} for t in base.tasks]
    for conf, named in (
        ({"tasks": lowered}, "tasks.ctr.floor: 0.6 -> 0.0"),
        ({"tasks": [t.model_dump() for t in base.tasks if t.name != "churn"]}, "tasks: ctr,cvr,ad_ctr,churn -> "),
        ({"gate": {"min_delta": 0.0, "require_significance": True}}, "gate.require_significance: False -> True"),
    ):
        with pytest.raises(ConfigError, match="changes what decides promotion") as caught:
            merge_overrides(base, conf)
        assert named in str(caught.value) and "pipeline.allow_gate_overrides" in str(caught.value)
    with pytest.raises(ConfigError, match="cannot change pipeline.allow_gate_overrides"):
        merge_overrides(base, {"pipeline": {"allow_gate_overrides": True}, "tasks": lowered})

    # Training settings stay the conf's to change, task weights included: they do not decide promotion.
    reweighted = [t.model_dump() | ({"weight": 0.0} if t.name == "churn" else {}) for t in base.tasks]
    assert merge_overrides(base, {"tasks": reweighted, "train": {"epochs": 1}}).train.epochs == 1

    allowed = load_settings(environ={"MTL_DATA_DIR": str(tmp_path), "MTL_PIPELINE__ALLOW_GATE_OVERRIDES": "true"})
    merged = merge_overrides(allowed, {"tasks": lowered})
    assert gate_overrides(allowed, merged)["tasks.churn.floor"] == "0.6 -> 0.0"
    with pytest.raises(ConfigError, match="unknown setting 'trian'"):
        merge_overrides(base, {"trian": {"epochs": 1}})


def test_a_connections_fields_become_the_url_sqlalchemy_and_mlflow_accept_without_the_mlflow_password():
    from mtl_core.config import connection_url, mlflow_credentials

    fields = ("postgres", "db.internal", 5432, "etl", "s3cr@t/pw", "warehouse")
    url = connection_url("mtl_warehouse", "warehouse", *fields)
    from sqlalchemy.engine import make_url

    parsed = make_url(url)  # Airflow's own get_uri() says postgres://, which SQLAlchemy 2 refuses
    assert (parsed.drivername, parsed.host, parsed.port, parsed.database) == (
        "postgresql+psycopg",
        "db.internal",
        5432,
        "warehouse",
    )
    assert parsed.password == "s3cr@t/pw"  # quoted in the URL, intact for the driver
    assert connection_url("w", "warehouse", "sqlite", "/data/wh.db") == "sqlite:////data/wh.db"
    mlflow = connection_url("mtl_mlflow", "mlflow", "http", "mlflow", 5000, "bot", "pw-123", None)
    assert mlflow == "http://mlflow:5000" and "pw-123" not in mlflow
    assert connection_url("m", "mlflow", "generic", "https://ml.example.org/", None) == "https://ml.example.org"
    assert mlflow_credentials("bot", "pw-123") == {
        "MLFLOW_TRACKING_USERNAME": "bot",
        "MLFLOW_TRACKING_PASSWORD": "pw-123",
    }
    for bad, match in (
        (("w", "warehouse", "mysql", "h", 3306, None, None, "db"), "conn_type postgres or sqlite"),
        (("w", "warehouse", "postgres", "h", 5432, None, None, None), "schema"),
        (("m", "mlflow", "postgres", "h"), "http, https or generic"),
    ):
        with pytest.raises(ConfigError, match=match):
            connection_url(*bad)


def test_secrets_are_in_no_dump_of_the_settings_and_survive_a_runs_conf():
    from mtl_core.config import merge_overrides
    from mtl_core.registry.runs import flatten_settings

    secrets = {
        "MTL_SERVE__TOKEN": "serve-token-5f1e",
        "MTL_PIPELINE__WEBHOOK_URL": "https://hooks.example.com/services/T000/B000/webhook-secret-9a2c",
        "MTL_PRIVACY__PSEUDONYM_KEY": "pseudonym-key-77d0",
        "MTL_SERVE__REDIS_URL": "redis://:redis-pass-31@127.0.0.1:6379/0",
    }
    settings = load_settings(environ=secrets)
    merged = merge_overrides(settings, {"train": {"epochs": 1}})
    dumps = [settings.model_dump_json(), str(flatten_settings(settings)), redact(settings.model_dump_json())]
    for secret in ("serve-token-5f1e", "webhook-secret-9a2c", "pseudonym-key-77d0"):
        assert not any(secret in dump for dump in dumps), secret
    assert "redis-pass-31" not in str(flatten_settings(settings)) and "redis-pass-31" not in dumps[2]
    assert merged.serve.token.get_secret_value() == "serve-token-5f1e"
    assert merged.pipeline.webhook_url.get_secret_value().endswith("webhook-secret-9a2c")
    with pytest.raises(ConfigError, match="serve.token"):
        merge_overrides(settings, {"serve": {"token": "other"}})
