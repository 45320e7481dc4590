"""End to end through the real `dagster` CLI in a subprocess, as an operator would run it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

ROOT = Path(__file__).resolve().parent.parent
DAGSTER = str(Path(sys.executable).with_name("dagster"))


@pytest.fixture
def cli_env(pg, pg_url, write_config, duckdb_path, tmp_path):
    pg.execute("CREATE SCHEMA app")
    pg.execute("CREATE TABLE app.events (id bigint PRIMARY KEY, kind text, happened_at timestamptz, payload jsonb)")
    pg.execute(
        "INSERT INTO app.events SELECT i, 'k' || (i % 5), now() - i * interval '1 minute', "
        "jsonb_build_object('i', i) FROM generate_series(1, 50000) i"
    )
    write_config({"tables": ["app.events"], "defaults": {"partitions": 4}})
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    return env


def _run(args, env, cwd):
    return subprocess.run([DAGSTER, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.mark.e2e
def test_cli_materialize_partition_range(cli_env, pg, duckdb_path, tmp_path):
    out = _run(
        ["asset", "materialize", "-m", "pg_replication.dagster.definitions", "--select", "app/events", "--partition-range", "000...003"],
        cli_env,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "BetaWarning" not in out.stderr and "PreviewWarning" not in out.stderr, out.stderr[-3000:]
    with duckdb.connect(str(duckdb_path), read_only=True) as wh:
        got = sorted(wh.execute('SELECT id, kind, happened_at, payload::VARCHAR FROM "app"."events"').fetchall())
    want = sorted(pg.execute("SELECT id, kind, happened_at, payload::text FROM app.events").fetchall())
    assert len(got) == 50000
    assert [(i, k, a) for i, k, a, _ in got] == [(i, k, a) for i, k, a, _ in want]


@pytest.mark.e2e
def test_definitions_validate(cli_env, tmp_path):
    out = _run(["definitions", "validate", "-w", str(ROOT / "workspace.yaml")], cli_env, ROOT)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    # No warning the user cannot act on (Dagster's beta notices about its own internal calls).
    assert "BetaWarning" not in out.stderr and "PreviewWarning" not in out.stderr, out.stderr[-3000:]


@pytest.mark.e2e
def test_definitions_load_and_say_why_when_source_is_down(cli_env, tmp_path):
    """No catalog snapshot yet (a fresh DAGSTER_HOME): the code location loads without tables,
    naming the outage (test_isolation.py covers loading from a snapshot)."""
    env = {**cli_env, "POSTGRES_URL": "postgresql://alice:s3cr3t-pw@127.0.0.1:1/db"}
    out = _run(["definitions", "validate", "-m", "pg_replication.dagster.definitions"], env, tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "source unavailable at load (cannot connect to Postgres at 127.0.0.1:1/db" in out.stdout + out.stderr
    assert "s3cr3t-pw" not in out.stdout + out.stderr
