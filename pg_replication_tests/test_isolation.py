"""One table's trouble is its own, end to end (issue 11 item 4), through what an operator runs:
`dagster job execute` / `dagster definitions validate` / `dagster asset list` / `pg-replication
status` in fresh processes.

Proven here:
- a key column renamed during CDC (the drain cannot key that table's changes) fails that table
  only: its changes go, in order, to its change log, the slot advances, the other table streams;
  `retry` then refuses that log cleanly (changes not keyed by the key) and `resync` is the way back;
- a table dropped during CDC does not fail the code location: the other table keeps streaming,
  `status` says the dropped one is missing, and its asset stays, marked missing; a key column
  dropped the same (the table is skipped: no key);
- a table that matches a `schema.*` pattern but does not qualify (no primary key) is skipped
  with a warning shown by `status` and in the CDC sensor's description;
- a source that is down when the code location loads: definitions load from the last catalog
  snapshot (assets and sensor kept) and the sensor skips, naming the outage.
Not covered: values a type converter rejects (none of today's converters raises on a value
Postgres prints).
"""

from __future__ import annotations

import json
import os

import dagster as dg
import duckdb
import pytest

from pg_replication_tests import operator
from pg_replication_tests.operator import dagster_env, run_cli

DOWN_URL = "postgresql://alice:s3cr3t-pw@127.0.0.1:1/db"


def _ok(out) -> None:
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]


def _warehouse(duckdb_path, query: str) -> list[tuple]:
    with duckdb.connect(str(duckdb_path), read_only=True) as wh:
        return wh.execute(query).fetchall()


def _status_rows(env, cwd) -> dict[str, dict]:
    out = run_cli(["pg-replication", "--json", "status"], env, cwd)
    assert out.returncode in (0, 4), (out.stdout + out.stderr)[-3000:]
    return {row["table"]: row for row in json.loads(out.stdout)["tables"]}


@pytest.fixture
def two_tables(pg, write_config, duckdb_path, tmp_path):
    """Tables a and t, backfilled and streaming through the CLI."""
    for name in ("a", "t"):
        pg.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
        pg.execute(f"INSERT INTO {name} SELECT i, 'v0' FROM generate_series(1, 500) i")
    write_config({"source": {"slot": "pgr_iso", "publication": "pgr_iso"}, "tables": ["a", "t"], "defaults": {"partitions": 1}})
    env = dagster_env(tmp_path)
    for args in (operator.materialize("public/a,public/t", "000...000"), operator.drain()):
        _ok(run_cli(args, env, tmp_path))
    return env


@pytest.mark.e2e
def test_renamed_key_column_fails_that_table_only(two_tables, pg, duckdb_path, tmp_path):
    env = two_tables
    pg.execute("UPDATE t SET v = 'before rename' WHERE id <= 10")
    pg.execute("ALTER TABLE t RENAME COLUMN id TO key_id")
    pg.execute("UPDATE t SET v = 'after rename' WHERE key_id > 490")
    pg.execute("INSERT INTO a VALUES (1001, 'streams')")
    wal_end = pg.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    out = run_cli(operator.drain(), env, tmp_path)
    assert out.returncode != 0  # the one run that reports the newly failed table
    assert "public.t" in out.stdout + out.stderr
    assert _warehouse(duckdb_path, 'SELECT v FROM "public"."a" WHERE id = 1001') == [("streams",)]
    row = _status_rows(env, tmp_path)["public.t"]
    assert row["status"] == "failed" and "key" in row["error"], row
    logged = _warehouse(duckdb_path, 'SELECT count(*) FROM "_pg_replication"."log.public.t"')[0][0]
    assert logged == 20  # the 10 changes before the rename and the 10 after, kept for `retry`
    caught_up = pg.execute(
        "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = 'pgr_iso'", (wal_end,)
    ).fetchone()[0]
    assert caught_up  # the slot moved on for every table

    pg.execute("UPDATE t SET v = 'later' WHERE key_id = 1")
    pg.execute("INSERT INTO a VALUES (1002, 'still streams')")
    _ok(run_cli(operator.drain(), env, tmp_path))  # held, not failed again
    assert _warehouse(duckdb_path, 'SELECT v FROM "public"."a" WHERE id = 1002') == [("still streams",)]
    again = _status_rows(env, tmp_path)["public.t"]
    assert (again["status"], again["error"]) == (row["status"], row["error"])  # marked failed once


@pytest.mark.e2e
def test_dropped_table_leaves_the_others_streaming(two_tables, pg, duckdb_path, tmp_path, monkeypatch):
    env = two_tables
    pg.execute("UPDATE t SET v = 'last words' WHERE id = 1")
    pg.execute("DROP TABLE t")
    pg.execute("INSERT INTO a VALUES (1001, 'streams')")
    _ok(run_cli(["dagster", "definitions", "validate", "-m", "pg_replication.dagster.definitions"], env, tmp_path))
    _ok(run_cli(operator.drain(), env, tmp_path))
    assert _warehouse(duckdb_path, 'SELECT v FROM "public"."a" WHERE id = 1001') == [("streams",)]
    row = _status_rows(env, tmp_path)["public.t"]
    assert row["status"] == "missing" and "does not exist" in row["error"], row

    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    from pg_replication.dagster.definitions import build_definitions

    defs = build_definitions()  # the asset stays (from the last catalog snapshot), marked missing
    spec = next(s for a in defs.resolve_asset_graph().assets_defs for s in a.specs if s.key == dg.AssetKey(["public", "t"]))
    assert spec.description.startswith("MISSING: ") and "does not exist" in spec.metadata["pg_replication/unavailable"]
    assert "public.t missing" in defs.get_sensor_def("postgres_cdc_sensor").description


@pytest.mark.e2e
def test_dropped_key_column_leaves_the_others_streaming(two_tables, pg, duckdb_path, tmp_path, monkeypatch):
    env = two_tables
    pg.execute("ALTER TABLE t DROP COLUMN id")  # its primary key goes with it
    pg.execute("INSERT INTO a VALUES (1001, 'streams')")
    _ok(run_cli(operator.drain(), env, tmp_path))
    assert _warehouse(duckdb_path, 'SELECT v FROM "public"."a" WHERE id = 1001') == [("streams",)]
    row = _status_rows(env, tmp_path)["public.t"]
    assert row["status"] == "skipped" and "no primary key" in row["error"], row

    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    from pg_replication.dagster.definitions import build_definitions

    defs = build_definitions()
    spec = next(s for a in defs.resolve_asset_graph().assets_defs for s in a.specs if s.key == dg.AssetKey(["public", "t"]))
    assert spec.description.startswith("SKIPPED: ") and "no primary key" in spec.description


@pytest.mark.e2e
def test_pattern_table_without_a_key_is_skipped_with_a_warning(pg, write_config, duckdb_path, tmp_path):
    pg.execute("CREATE TABLE a (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO a SELECT i, 'v0' FROM generate_series(1, 100) i")
    pg.execute("CREATE TABLE no_key (v text)")
    write_config({"source": {"slot": "pgr_iso", "publication": "pgr_iso"}, "tables": ["public.*"], "defaults": {"partitions": 1}})
    env = dagster_env(tmp_path)
    _ok(run_cli(["dagster", "definitions", "validate", "-m", "pg_replication.dagster.definitions"], env, tmp_path))
    _ok(run_cli(operator.materialize("public/a", "000...000"), env, tmp_path))
    rows = _status_rows(env, tmp_path)
    assert rows["public.no_key"]["status"] == "skipped" and "primary key" in rows["public.no_key"]["error"]
    assert rows["public.a"]["warehouse_rows"] == 100

    from pg_replication.dagster.definitions import build_definitions

    sensor = build_definitions().get_sensor_def("postgres_cdc_sensor")
    assert "public.no_key" in sensor.description and "primary key" in sensor.description


@pytest.mark.e2e
def test_source_down_at_load_keeps_the_code_location_and_its_sensor(pg, write_config, duckdb_path, tmp_path, monkeypatch):
    pg.execute("CREATE TABLE a (id int PRIMARY KEY, v text)")
    write_config({"source": {"slot": "pgr_iso", "publication": "pgr_iso"}, "tables": ["a"], "defaults": {"partitions": 1}})
    env = dagster_env(tmp_path)
    _ok(run_cli(["dagster", "definitions", "validate", "-m", "pg_replication.dagster.definitions"], env, tmp_path))  # source up

    down = {**env, "POSTGRES_URL": DOWN_URL}
    out = run_cli(["dagster", "asset", "list", "-m", "pg_replication.dagster.definitions"], down, tmp_path)
    _ok(out)
    assert "public/a" in out.stdout
    assert "s3cr3t-pw" not in out.stdout + out.stderr

    monkeypatch.setenv("POSTGRES_URL", DOWN_URL)
    monkeypatch.setenv("DAGSTER_HOME", down["DAGSTER_HOME"])
    from pg_replication.dagster.definitions import build_definitions

    defs = build_definitions()
    sensor = defs.get_sensor_def("postgres_cdc_sensor")
    assert "unavailable" in sensor.description
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources={"source": defs.resources["source"]})
        result = sensor.evaluate_tick(context)
    assert not result.run_requests
    assert "cannot connect" in (result.skip_message or "")
    assert "s3cr3t-pw" not in (result.skip_message or "") + sensor.description
    assert os.environ["POSTGRES_URL"] == DOWN_URL


@pytest.mark.e2e
def test_table_failed_by_its_key_rename_refuses_retry_cleanly_and_resyncs(two_tables, pg, duckdb_path, tmp_path):
    """Changes logged while the key column had another name cannot be keyed to warehouse rows:
    `retry` says so (no traceback, the log kept, the table still failed) and `resync` is the way
    back, the other table streaming throughout."""
    env = two_tables
    pg.execute("UPDATE t SET v = 'before rename' WHERE id <= 10")
    pg.execute("ALTER TABLE t RENAME COLUMN id TO key_id")
    pg.execute("UPDATE t SET v = 'renamed' WHERE key_id > 490")
    assert run_cli(operator.drain(), env, tmp_path).returncode != 0  # t fails, alone
    pg.execute("ALTER TABLE t RENAME COLUMN key_id TO id")
    _ok(run_cli(operator.drain(), env, tmp_path))
    out = run_cli(["pg-replication", "retry", "public.t", "--yes"], env, tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "without key column(s) id" in out.stderr and "pg-replication resync public.t" in out.stderr
    assert _status_rows(env, tmp_path)["public.t"]["status"] == "failed"
    assert _warehouse(duckdb_path, 'SELECT count(*) FROM "_pg_replication"."log.public.t"')[0][0] > 0  # kept

    pg.execute("INSERT INTO a VALUES (1001, 'streams')")
    for args in (["pg-replication", "resync", "public.t", "--yes"], operator.materialize("public/t", "000...000"), operator.drain()):
        _ok(run_cli(args, env, tmp_path))
    for name in ("a", "t"):
        got = _warehouse(duckdb_path, f'SELECT id, v FROM "public"."{name}" ORDER BY id')
        assert got == pg.execute(f"SELECT id, v FROM {name} ORDER BY id").fetchall()
