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
