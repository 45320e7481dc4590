"""The operator CLI against a real Postgres and DuckDB file: output, --json, exit codes."""

from __future__ import annotations

import json

import pytest

from pg_replication import cli
from pg_replication_tests.replication import Harness


@pytest.fixture
def setup(pg, pg_url, write_config, duckdb_path):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    pg.execute("CREATE TABLE nokey (v int)")
    pg.execute("INSERT INTO t SELECT i, i FROM generate_series(1, 50) i")
    write_config({"tables": ["t"], "source": {"slot": "pgr_test", "publication": "pgr_test_pub"}})
    h = Harness(pg_url, duckdb_path, ["t"])
    h.backfill()
    return h


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_status_json(setup, capsys):
    code, out, _ = _run(capsys, "--json", "status")
    data = json.loads(out)
    assert code == 0
    assert data["slot"]["name"] == "pgr_test" and data["slot"]["wal_status"] == "reserved"
    (row,) = data["tables"]
    assert row["table"] == "public.t" and row["status"] == "streaming" and row["backfill"] == "3/3"
    assert row["warehouse_rows"] == 50


def test_status_is_unhealthy_without_slot(setup, pg, capsys):
    pg.execute("SELECT pg_drop_replication_slot('pgr_test')")
    code, out, _ = _run(capsys, "status")
    assert code == cli.EXIT_UNHEALTHY and "slot pgr_test: missing" in out


def test_list_and_listwh(setup, capsys):
    code, out, _ = _run(capsys, "--json", "list")
    rows = {r["table"]: r for r in json.loads(out)}
    assert rows['"public"."t"']["configured"] and rows['"public"."t"']["qualifies"]
    assert not rows['"public"."nokey"']["qualifies"]
    code, out, _ = _run(capsys, "listwh")
    assert code == 0 and "public.t" in out and "50" in out


def test_resync_and_drop_slot_need_confirmation(setup, capsys, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)  # `make test` sets the checkout's own instance
    code, _, err = _run(capsys, "resync", "t")
    assert code == cli.EXIT_USAGE and "--yes" in err
    code, out, _ = _run(capsys, "resync", "t", "--yes")
    assert code == 0 and "reset" in out and "DAGSTER_HOME is not set" in out
    code, out, _ = _run(capsys, "drop-slot", "--yes")
    assert code == 0 and "dropped" in out


def test_wait_for_lsn(setup, pg, capsys):
    pg.execute("INSERT INTO t VALUES (100, 1)")
    lsn = pg.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
    code, _, err = _run(capsys, "wait-for-lsn", lsn, "--timeout", "0.5")
    assert code == cli.EXIT_TIMEOUT and "timed out" in err
    setup.drain_all()
    code, out, _ = _run(capsys, "wait-for-lsn", lsn, "--timeout", "300")  # returns once reached
    assert code == 0


def test_errors_are_one_clean_message(setup, capsys, monkeypatch):
    monkeypatch.setenv("POSTGRES_URL", "postgresql://u:hunter2@127.0.0.1:1/x")
    code, _, err = _run(capsys, "status")
    assert code == cli.EXIT_ERROR and "cannot connect" in err and "hunter2" not in err and "Traceback" not in err


def test_install_and_uninstall_triggers(pg, write_config, capsys):
    pg.execute("CREATE TABLE c (id int PRIMARY KEY)")
    write_config({"tables": [{"name": "c", "strategy": "triggers"}]})
    code, out, _ = _run(capsys, "install-triggers")
    assert code == 0 and '"public"."c": changes captured' in out
    pg.execute("INSERT INTO c VALUES (1)")
    assert pg.execute("SELECT op, key FROM _pg_replication_capture.changes").fetchall() == [("I", [1])]
    code, _, err = _run(capsys, "uninstall-triggers")  # no terminal: refuses without --yes
    assert code == cli.EXIT_USAGE and "--yes" in err
    code, out, _ = _run(capsys, "uninstall-triggers", "--yes")
    assert code == 0 and "removed capture from 1 table(s)" in out
    write_config({"tables": ["c"]})
    code, _, err = _run(capsys, "install-triggers")
    assert code == cli.EXIT_ERROR and "no table in replication.yaml has strategy triggers" in err


@pytest.mark.e2e
def test_resync_clears_the_partition_status_in_dagster(pg, write_config, duckdb_path, tmp_path, monkeypatch):
    """Materialized through `dagster asset materialize`, resynced through `pg-replication resync`:
    Dagster's instance (DAGSTER_HOME) no longer counts any partition as materialized."""
    import dagster as dg

    from pg_replication_tests.operator import dagster_env, materialize, run_cli

    pg.execute("CREATE SCHEMA shop; CREATE TABLE shop.t (id int PRIMARY KEY, v int)")
    pg.execute("INSERT INTO shop.t SELECT i, i FROM generate_series(1, 500) i")
    write_config({"tables": ["shop.t"], "defaults": {"partitions": 2}})
    env = dagster_env(tmp_path)
    done = run_cli(materialize("shop/t", "000...001"), env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    monkeypatch.chdir(tmp_path)  # the shipped dagster.yaml's storage is relative to the working directory

    def materialized() -> set[str]:  # what the UI's partition bar shows green
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            return instance.get_materialized_partitions(dg.AssetKey(["shop", "t"]))

    assert materialized() == {"000", "001"}
    done = run_cli(["pg-replication", "resync", "shop.t", "--yes"], env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert materialized() == set()
    assert "partition" in done.stdout  # says what happened to Dagster's status
