"""The mtl command line: each step runs by hand; mistakes give one clear line, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from mtl_core.cli import app

runner = CliRunner()


def test_simulate_extract_describe_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_DATA_DIR", str(tmp_path))
    sim = runner.invoke(
        app,
        [
            "simulate",
            "--users",
            "200",
            "--items",
            "60",
            "--days",
            "10",
            "--start",
            "2026-03-02",
            "--seed",
            "5",
            "--json",
        ],
    )
    assert sim.exit_code == 0, sim.output
    summary = json.loads(sim.output)
    assert summary["rows"]["users"] == 200 and summary["rows"]["impressions"] > 0
    assert (tmp_path / "warehouse.db").exists()  # the embedded default lives in the data dir

    out = tmp_path / "snap"
    ext = runner.invoke(app, ["extract", "--start", "2026-03-02", "--end", "2026-03-12", "--out", str(out), "--json"])
    assert ext.exit_code == 0, ext.output
    manifest = json.loads(ext.output)
    assert manifest["tables"]["behavior_events"]["rows"] == summary["rows"]["behavior_events"]

    desc = runner.invoke(app, ["describe", str(out)])
    assert desc.exit_code == 0 and "label rate ctr" in desc.output


def _mtl(*args: str, env_dir, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    code = "import sys; from mtl_core.cli import main; sys.argv = ['mtl', *sys.argv[1:]]; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env={"MTL_DATA_DIR": str(env_dir), "PATH": "/usr/bin:/bin", **(extra_env or {})},
    )


def test_errors_are_one_clear_line_with_exit_code_2(tmp_path):
    bad_date = _mtl("extract", "--start", "soon", "--end", "2026-01-02", "--out", str(tmp_path / "s"), env_dir=tmp_path)
    assert bad_date.returncode == 2
    assert (
        bad_date.stderr.strip().startswith("error: start 'soon' is not a date") and "Traceback" not in bad_date.stderr
    )

    no_snapshot = _mtl("describe", str(tmp_path / "nothing"), env_dir=tmp_path)
    assert no_snapshot.returncode == 2 and "manifest.json is missing" in no_snapshot.stderr

    bad_setting = _mtl(
        "extract",
        "--start",
        "2026-01-01",
        "--end",
        "2026-01-02",
        "--out",
        str(tmp_path / "s"),
        env_dir=tmp_path,
        extra_env={"MTL_LOG_LEVEL": "LOUD"},
    )
    assert bad_setting.returncode == 2 and "Traceback" not in bad_setting.stderr
    assert "setting 'log_level' (from environment variable MTL_LOG_LEVEL)" in bad_setting.stderr


def test_bad_simulate_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_DATA_DIR", str(tmp_path))
    result = runner.invoke(app, ["simulate", "--days", "5", "--drift-day", "9"])
    assert result.exit_code == 2 and "outside the simulated days" in result.output
    result = runner.invoke(app, ["simulate", "--start", "March"])
    assert result.exit_code == 2 and "not a date" in result.output


def _one_error_line(result: subprocess.CompletedProcess, *parts: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert len(lines[0]) <= 1000, f"an error line of {len(lines[0])} characters"
    for part in parts:
        assert part in lines[0], (part, lines[0])


def test_more_mistakes_are_one_short_error_line_never_a_traceback(tmp_path):
    bad_driver = {"MTL_WAREHOUSE_URL": "mysqlx://etl:s3cret@db/shop"}
    _one_error_line(_mtl("simulate", "--users", "50", env_dir=tmp_path, extra_env=bad_driver), "mysqlx", "driver")
    assert "s3cret" not in _mtl("simulate", env_dir=tmp_path, extra_env=bad_driver).stderr
    unparsable = {"MTL_WAREHOUSE_URL": "not a url at all"}
    _one_error_line(_mtl("simulate", env_dir=tmp_path, extra_env=unparsable), "warehouse URL")
    nobody_home = {"MTL_WAREHOUSE_URL": "postgresql+psycopg://nobody@127.0.0.1:9/shop"}
    _one_error_line(_mtl("simulate", "--users", "50", env_dir=tmp_path, extra_env=nobody_home), "127.0.0.1:9")

    first = _mtl("simulate", "--users", "50", "--items", "20", "--days", "3", env_dir=tmp_path)
    assert first.returncode == 0, first.stderr
    again = _mtl("simulate", "--users", "50", "--items", "20", "--days", "3", env_dir=tmp_path)
    _one_error_line(again, "already holds events", "--replace")

    for flag in ("--users", "--items", "--days"):
        for size in ("0", "-3"):
            _one_error_line(_mtl("simulate", flag, size, env_dir=tmp_path), "must be positive")

    _one_error_line(_mtl("run-dag", "--logical-date", "next tuesday", env_dir=tmp_path), "--logical-date", "YYYY-MM-DD")

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.pt").write_bytes(b"")
    _one_error_line(
        _mtl("evaluate", "--model", str(tmp_path / "model"), "--snapshot", str(tmp_path), env_dir=tmp_path),
        "settings.json",
    )


def test_a_very_long_error_is_cut_to_one_readable_line(tmp_path):
    header = ",".join(f"column_{i}" for i in range(2000))  # the shape of the OTTO header mismatch
    (tmp_path / "log.csv").write_text(header + "\n1,2,3\n")
    (tmp_path / "mapping.yaml").write_text(
        "columns: {uid: user_id, sku: item_id, action: event_type, t: ts}\nevent_types: {view: click}\n"
    )
    result = _mtl(
        "import-logs", str(tmp_path / "log.csv"), "--format", str(tmp_path / "mapping.yaml"), env_dir=tmp_path
    )
    _one_error_line(result)
