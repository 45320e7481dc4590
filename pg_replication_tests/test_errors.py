"""Errors are classified (issue 11, point 5), on a real Postgres and real warehouses.

Proves: a transient warehouse error (DuckDB out of memory, a lock timeout on a Postgres
replica) is retried within the run and, when it persists, fails the drain as retryable without
marking any table failed, applying anything or moving the slot; a permanent error fails its
table once and later drains succeed for the others; ``pg-replication retry`` (and its job)
replays a failed table's change log; ``on_schema_change: resync`` restarts a table's backfill
after a type change the warehouse cannot follow; the change log is folded per key, and a folded
log replays to the source's content. Transient errors are provoked by real means: a tiny DuckDB
``memory_limit``, an ACCESS EXCLUSIVE lock held by another replica session.

Not covered here: deadlocks and serialization failures (classified by the same driver classes as
the lock timeout), Snowflake's transient errno codes (fakesnow raises none of them), a lost
connection.
"""

from __future__ import annotations

import threading
import time

import dagster as dg
import duckdb
import psycopg
import pytest

from pg_replication import cli, errors
from pg_replication.replicate import operations
from pg_replication.replicate.cdc import drain_once
from pg_replication.source.connection import connect
from pg_replication.source.slot import slot_status
from pg_replication.warehouse.duckdb import DuckDBWarehouse
from pg_replication_tests.replication import Harness
from pg_replication_tests.targets import DuckDBTarget, PostgresTarget

FAST = (0.01, 0.02)  # backoff of the persistent-error tests: the outcome, not the wait, is tested


def _confirmed(h: Harness) -> int:
    with connect(h.pg_url) as conn:
        return slot_status(conn, h.settings.slot).confirmed_lsn  # type: ignore[union-attr]


def _state(h: Harness) -> tuple[dict, int | None]:
    with h.target.open(read_only=True) as wh:
        return {k: s for k, (s, _) in wh.statuses().items()}, wh.drained_lsn(h.settings.slot)


def _two_tables(pg, pg_url, target, rows: int = 100) -> Harness:
    pg.execute("CREATE TABLE a (id int PRIMARY KEY, v text)")
    pg.execute("CREATE TABLE b (id int PRIMARY KEY, v int)")
    pg.execute(f"INSERT INTO a SELECT i, repeat('x', 100) FROM generate_series(1, {rows}) i")
    h = Harness(pg_url, target, ["a", "b"], partitions=1)
    h.backfill()
    return h


# -- transient errors ---------------------------------------------------------------------------


def test_out_of_memory_persisting_fails_the_run_retryable_and_marks_nothing(pg, pg_url, tmp_path):
    h = _two_tables(pg, pg_url, DuckDBTarget(tmp_path / "warehouse.duckdb"), rows=20_000)
    pg.execute("UPDATE a SET v = repeat('y', 100)")
    pg.execute("INSERT INTO b VALUES (1, 1)")
    before, confirmed = _state(h), _confirmed(h)
    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as conn:
        wh = DuckDBWarehouse(conn)
        wh.transient_delays = FAST
        conn.execute("SET memory_limit = '4MB'")  # the apply of 20,000 rows cannot fit
        with pytest.raises(errors.TransientWarehouseError) as err:
            drain_once(h.pg_url, wh, h.tables, h.settings)
    assert err.value.retryable and "out of memory" in str(err.value).lower()
    assert err.value.table == "public.a" and err.value.lsn
    assert _state(h) == before and _confirmed(h) == confirmed  # nothing applied, slot not advanced
    assert before[0] == {"public.a": "streaming", "public.b": "streaming"}
    h.drain_all()  # the next run, with memory again, applies everything
    h.assert_equal(pg, "a")
    h.assert_equal(pg, "b")


def _replica_lock(target: PostgresTarget, table: str) -> psycopg.Connection:
    """Another session of the replica holding ``table`` (what a long report query could do)."""
    locker = psycopg.connect(target.url)
    locker.execute(f'LOCK TABLE "public"."{table}" IN ACCESS EXCLUSIVE MODE')
    return locker


def _release_after_a_timeout(locker: psycopg.Connection, target: PostgresTarget, waited: threading.Event) -> None:
    """End the report once the drain has waited on its lock longer than its lock_timeout."""
    with psycopg.connect(target.url, autocommit=True) as watcher:
        for _ in range(200):
            if watcher.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0]:  # type: ignore[index]
                waited.set()
                break
            time.sleep(0.02)
    time.sleep(0.3)  # > lock_timeout: that attempt has failed by now
    locker.close()


def test_lock_timeout_is_retried_within_the_run(pg, pg_url, server_url, tmp_path):
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute("CREATE DATABASE pgr_wh_locks")
    try:
        target = PostgresTarget(server_url.rsplit("/", 1)[0] + "/pgr_wh_locks")
        h = _two_tables(pg, pg_url, target)
        pg.execute("UPDATE a SET v = 'changed' WHERE id <= 10")
        pg.execute("INSERT INTO b VALUES (1, 1)")
        locker = _replica_lock(target, "a")
        waited = threading.Event()
        threading.Thread(target=_release_after_a_timeout, args=(locker, target, waited)).start()
        with target.open() as wh:
            wh.execute("SET lock_timeout = '100ms'")
            result = drain_once(h.pg_url, wh, h.tables, h.settings)
        assert waited.is_set()  # the first attempt waited for the lock, timed out, and was retried
        assert result.tables["public.a"].mode == "applied" and not result.failed
        h.assert_equal(pg, "a")
        h.assert_equal(pg, "b")
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute("DROP DATABASE pgr_wh_locks WITH (FORCE)")


def test_lock_timeout_persisting_applies_nothing_and_the_next_run_applies(pg, pg_url, server_url):
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute("CREATE DATABASE pgr_wh_locks2")
    try:
        target = PostgresTarget(server_url.rsplit("/", 1)[0] + "/pgr_wh_locks2")
        h = _two_tables(pg, pg_url, target)
        pg.execute("UPDATE a SET v = 'changed' WHERE id <= 10")
        pg.execute("INSERT INTO b VALUES (1, 1)")
        before, confirmed = _state(h), _confirmed(h)
        locker = _replica_lock(target, "a")
        try:
            with target.open() as wh:
                wh.execute("SET lock_timeout = '50ms'")
                wh.transient_delays = FAST
                with pytest.raises(errors.TransientWarehouseError) as err:
                    drain_once(h.pg_url, wh, h.tables, h.settings)
        finally:
            locker.close()
        assert "public.a" in str(err.value) and "LSN" in str(err.value)
        assert _state(h) == before and _confirmed(h) == confirmed
        h.drain_all()
        h.assert_equal(pg, "a")
        h.assert_equal(pg, "b")
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute("DROP DATABASE pgr_wh_locks2 WITH (FORCE)")


# -- permanent errors: failed once, notified once ----------------------------------------------


@pytest.fixture
def shop(pg, write_config, duckdb_path):
    from pg_replication.dagster.definitions import build_definitions

    pg.execute("CREATE TABLE a (id int PRIMARY KEY, v numeric(6,2))")
    pg.execute("CREATE TABLE b (id int PRIMARY KEY, v int)")
    pg.execute("INSERT INTO a SELECT i, i FROM generate_series(1, 20) i")
    write_config({"tables": ["a", "b"], "defaults": {"partitions": 1}, "source": {"slot": "pgr_test", "publication": "pgr_test_pub"}})
    defs = build_definitions()
    job = defs.resolve_implicit_global_asset_job_def()
    for key in (dg.AssetKey(["public", "a"]), dg.AssetKey(["public", "b"])):
        assert job.execute_in_process(asset_selection=[key], partition_key="000").success
    return defs


def _drain_job(defs):
    return defs.resolve_job_def("postgres_cdc_drain").execute_in_process(raise_on_error=False)


def _status(duckdb_path, table: str) -> tuple[str, str | None]:
    with duckdb.connect(str(duckdb_path), read_only=True) as conn:
        return DuckDBWarehouse(conn, read_only=True).statuses()[table]


def test_permanent_failure_fails_one_run_and_later_runs_succeed(shop, pg, duckdb_path):
    pg.execute("INSERT INTO a VALUES (500, 'NaN')")  # DuckDB's DECIMAL has no NaN
    pg.execute("INSERT INTO b VALUES (1, 1)")
    first = _drain_job(shop)
    assert not first.success  # the one run that fails: the failure webhook fires once
    status, error = _status(duckdb_path, "public.a")
    assert status == "failed" and "public.a" in error and "LSN" in error
    pg.execute("INSERT INTO a VALUES (501, 1)")
    pg.execute("INSERT INTO b VALUES (2, 2)")
    second = _drain_job(shop)
    assert second.success  # the failed table's changes are logged; no second failure, no second webhook
    (event,) = second.asset_materializations_for_node("postgres_drain_slot")
    assert event.asset_key == dg.AssetKey(["public", "b"])
    assert _status(duckdb_path, "public.a") == (status, error)  # marked once: the first error stays


# -- retry ------------------------------------------------------------------------------------


def _reject(target, h: Harness) -> str:
    """Make table a's warehouse refuse v = 500 (DuckDB and Snowflake refuse NaN in numeric)."""
    if target.kind == "postgres":
        with target.open() as wh:
            wh.execute(f"ALTER TABLE {wh.table_name(h.table('a'))} ADD CONSTRAINT small CHECK (v < 100)")
        return "500"
    return "'NaN'"


def _numeric_tables(pg, pg_url, target) -> Harness:
    pg.execute("CREATE TABLE a (id int PRIMARY KEY, v numeric(6,2), n int DEFAULT 0, big text)")
    pg.execute("CREATE TABLE b (id int PRIMARY KEY, v int)")
    pg.execute("ALTER TABLE a ALTER COLUMN big SET STORAGE EXTERNAL")  # out of line, uncompressed: TOASTed
    pg.execute("INSERT INTO a SELECT i, i, 0, repeat(md5(i::text), 100) FROM generate_series(1, 50) i")
    h = Harness(pg_url, target, ["a", "b"], partitions=2)
    h.backfill()
    return h


def test_retry_replays_the_change_log_after_the_cause_is_fixed(pg, pg_url, target):
    h = _numeric_tables(pg, pg_url, target)
    bad = _reject(target, h)
    pg.execute(f"INSERT INTO a VALUES (999, {bad})")
    pg.execute("INSERT INTO b VALUES (1, 1)")
    (result,) = h.drain_all()
    assert result.tables["public.a"].mode == "failed"
    pg.execute("UPDATE a SET n = n + 1 WHERE id <= 10")
    pg.execute("DELETE FROM a WHERE id = 20")
    h.drain_all()
    with h.target.open() as wh:  # not fixed yet: retry fails and the table stays failed
        with pytest.raises(errors.PgReplicationError):
            operations.retry_table(h.pg_url, wh, h.table("a"))
        assert wh.statuses()["public.a"][0] == "failed"
    pg.execute("UPDATE a SET v = 5 WHERE id = 999")  # the cause, fixed at the source
    h.drain_all()
    with h.target.open() as wh:
        replayed = operations.retry_table(h.pg_url, wh, h.table("a"))
        assert replayed > 0 and wh.statuses()["public.a"] == ("streaming", None)
    h.assert_equal(pg, "a")
    pg.execute("UPDATE a SET n = 7 WHERE id = 1")
    (result,) = h.drain_all()
    assert result.tables["public.a"].mode == "applied"
    h.assert_equal(pg, "a")
    h.assert_equal(pg, "b")


def test_retry_command_and_job(shop, pg, duckdb_path, capsys):
    pg.execute("INSERT INTO a VALUES (500, 'NaN')")
    assert not _drain_job(shop).success
    assert cli.main(["retry", "public.a"]) == cli.EXIT_USAGE  # no terminal, no --yes: refuses
    assert cli.main(["retry", "public.b", "--yes"]) == cli.EXIT_ERROR  # b is not failed
    assert "not failed" in capsys.readouterr().err
    pg.execute("UPDATE a SET v = 5 WHERE id = 500")
    assert _drain_job(shop).success
    job = shop.resolve_job_def("postgres_retry_table")
    run_config = {"ops": {"postgres_replay_change_log": {"config": {"table": "public.a"}}}}
    assert job.execute_in_process(run_config=run_config).success
    assert _status(duckdb_path, "public.a") == ("streaming", None)
    pg.execute("INSERT INTO a VALUES (600, 'NaN')")
    assert not _drain_job(shop).success
    pg.execute("DELETE FROM a WHERE id = 600")
    assert _drain_job(shop).success
    capsys.readouterr()
    assert cli.main(["retry", "a", "--yes"]) == 0
    assert "streaming" in capsys.readouterr().out
    assert _status(duckdb_path, "public.a") == ("streaming", None)
    with duckdb.connect(str(duckdb_path), read_only=True) as conn:
        assert conn.execute('SELECT count(*), max(id) FROM "public"."a"').fetchone() == (21, 500)


# -- on_schema_change: resync --------------------------------------------------------------------


def test_on_schema_change_resync_restarts_the_backfill_while_others_stream(pg, pg_url, target):
    pg.execute("CREATE TABLE a (id int PRIMARY KEY, v int)")
    pg.execute("CREATE TABLE b (id int PRIMARY KEY, v int)")
    pg.execute("INSERT INTO a SELECT i, i FROM generate_series(1, 30) i")
    h = Harness(pg_url, target, [{"name": "a", "on_schema_change": "resync"}, "b"], partitions=2)
    h.backfill()
    pg.execute("ALTER TABLE a ALTER COLUMN v TYPE text")
    pg.execute("INSERT INTO a VALUES (31, 'thirty-one')")
    pg.execute("INSERT INTO b VALUES (1, 1)")
    (result,) = h.drain_all()
    assert result.tables["public.a"].mode == "resynced" and "changed type" in result.tables["public.a"].error
    assert result.tables["public.b"].mode == "applied" and not result.failed
    statuses, _ = _state(h)
    assert statuses["public.a"] == "backfilling"
    with h.target.open(read_only=True) as wh:
        assert "changed type" in wh.statuses()["public.a"][1]
    h.assert_equal(pg, "b")
    pg.execute("INSERT INTO a VALUES (32, 'thirty-two')")
    h.drain_all()
    h.reload()
    h.backfill("a")
    pg.execute("UPDATE a SET v = 'one' WHERE id = 1")
    h.drain_all()
    assert _state(h)[0]["public.a"] == "streaming"
    h.assert_equal(pg, "a")
    h.assert_equal(pg, "b")


# -- bounded change logs -------------------------------------------------------------------------


def _log_rows(h: Harness) -> int:
    with h.target.open(read_only=True) as wh:
        return int(wh.fetchall(f"SELECT count(*) FROM {wh.state(wh.log_name(h.table('a')))}")[0][0])


def test_folded_change_log_stays_bounded_and_replays_to_the_source(pg, pg_url, target):
    h = _numeric_tables(pg, pg_url, target)
    bad = _reject(target, h)
    pg.execute(f"INSERT INTO a (id, v) VALUES (999, {bad})")
    (result,) = h.drain_all()
    assert result.tables["public.a"].mode == "failed"
    steps = [
        "UPDATE a SET big = repeat(md5('new' || id), 100) WHERE id <= 10",
        "UPDATE a SET n = n + 1 WHERE id <= 20",  # big unchanged: TOAST 'u', from the log or the warehouse
        "UPDATE a SET id = id + 1000, n = n + 1 WHERE id IN (3, 15)",  # key change keeping big
        "DELETE FROM a WHERE id IN (4, 16)",
        "INSERT INTO a VALUES (4, 4, 4, 'back')",
        "UPDATE a SET n = n + 1 WHERE id <= 20",
    ]
    for step in steps:
        pg.execute(step)
        h.drain_all()
        assert _log_rows(h) <= 53  # one row per key the log holds, not one per change
    pg.execute("TRUNCATE a")
    pg.execute("INSERT INTO a SELECT i, i, 0, repeat(md5(i::text), 100) FROM generate_series(1, 30) i")
    pg.execute(f"INSERT INTO a (id, v) VALUES (999, {bad})")
    h.drain_all()
    for _ in range(3):
        pg.execute("UPDATE a SET n = n + 1 WHERE id <= 30")
        h.drain_all()
        assert _log_rows(h) <= 32  # the truncate, then one row per key
    pg.execute("UPDATE a SET v = 5 WHERE id = 999")
    h.drain_all()
    with h.target.open() as wh:
        operations.retry_table(h.pg_url, wh, h.table("a"))
    h.assert_equal(pg, "a")
