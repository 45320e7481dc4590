"""Large transactions are streamed in parts while in progress (pgoutput protocol 2, Postgres 14+),
staged in the warehouse in chunks and applied at their commit (issue 11, point 2).

Proves, with ``logical_decoding_work_mem`` at its 64kB minimum for the test database (so the
server streams anything bigger): one transaction many times larger than the drain's ``max_bytes``
drains exactly, value by value, with the drain holding under 2x ``max_bytes`` and the source
spilling nothing to disk while it streams it; a streamed transaction rolled back leaves nothing; a subtransaction
rolled back inside a large committed transaction leaves out only its own changes; small
transactions committed while a large one streams apply in commit order; a drain killed while a
streamed transaction is staged, or in the middle of its apply, converges when run again; and
the operator's path (`dagster asset materialize`, `dagster job execute`) drains one exactly.
Leaves out: the next session's decode from the slot's restart point, which Postgres moves only at
its next running-transactions record (about every 15 s): a session started before then decodes
the applied transaction again and, being before its start point, spills it instead of streaming.
Postgres < 14 (protocol 1, no streaming: the plain path, covered by every other test).
"""

from __future__ import annotations

import time
from contextlib import closing

import duckdb
import psycopg
import pytest
from psycopg import sql

from pg_replication.replicate.cdc import DrainSettings
from pg_replication_tests import operator
from pg_replication_tests.operator import dagster_env, run_cli
from pg_replication_tests.replication import Harness
from pg_replication_tests.targets import Target
from pg_replication_tests.test_exactly_once import drain_in_subprocess


@pytest.fixture
def h(pg, pg_url, duckdb_path):
    if pg.info.server_version < 140000:
        pytest.skip("streaming of in-progress transactions needs Postgres 14+")
    # The walsender of every later session takes the database's setting: stream past 64kB.
    pg.execute(sql.SQL("ALTER DATABASE {} SET logical_decoding_work_mem = '64kB'").format(sql.Identifier(pg.info.dbname)))
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, n int, pad text)")
    pg.execute("INSERT INTO t SELECT i, 0, 'x' FROM generate_series(1, 100) i")
    harness = Harness(pg_url, duckdb_path, ["t"])
    harness.backfill()
    harness.drain_all()
    return harness


def _slot_stats(pg: psycopg.Connection, slot: str) -> tuple[int, int]:
    """(stream_bytes, spill_bytes) of the slot: what the server streamed, what it wrote to disk."""
    pg.execute("SELECT pg_stat_clear_snapshot()")
    row = pg.execute("SELECT stream_bytes, spill_bytes FROM pg_stat_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def _wait_streamed(pg: psycopg.Connection, slot: str, beyond: int, deadline: float = 60.0) -> tuple[int, int]:
    """The slot's statistics once the server has reported streaming past ``beyond`` bytes."""
    give_up = time.monotonic() + deadline
    while True:
        stats = _slot_stats(pg, slot)
        if stats[0] > beyond or time.monotonic() > give_up:
            return stats
        time.sleep(0.2)


def _staged_rows(h: Harness) -> int:
    """Rows left in the warehouse's stream staging (none once every drain has ended)."""
    with h.target.open() as wh:
        tables = wh.fetchall(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = '_pg_replication' AND table_name LIKE 'stream.%'"
        )
        return sum(int(wh.fetchall(f"SELECT count(*) FROM {wh.state(name)}")[0][0]) for (name,) in tables)


def test_one_transaction_much_larger_than_max_bytes_drains_exactly_in_parts(h, pg):
    streamed_before, spilled_before = _slot_stats(pg, h.settings.slot)
    with pg.transaction():
        pg.execute("INSERT INTO t SELECT g, g, repeat(md5(g::text), 10) FROM generate_series(1000, 20999) g")  # ~7 MB
        pg.execute("UPDATE t SET n = -n, pad = NULL WHERE id % 7 = 0")
        pg.execute("DELETE FROM t WHERE id % 11 = 0")
        pg.execute("UPDATE t SET id = id + 100000 WHERE id BETWEEN 2000 AND 2099")  # key changes
    result = h.drain(max_bytes=1 << 20)
    assert result.bytes > 5 << 20 and result.staged_parts >= 3, result
    assert result.held_bytes < 2 << 20, f"held {result.held_bytes:,} bytes of pgoutput for a 1 MB bound"
    streamed, spilled = _wait_streamed(pg, h.settings.slot, streamed_before)
    assert streamed > streamed_before and spilled == spilled_before, "the source spilled the transaction to disk"
    h.drain_all()
    h.assert_equal(pg, "t")
    assert _staged_rows(h) == 0


def test_a_large_transaction_is_staged_and_applied_in_every_warehouse(pg, pg_url, target: Target):
    if pg.info.server_version < 140000:
        pytest.skip("streaming of in-progress transactions needs Postgres 14+")
    pg.execute(sql.SQL("ALTER DATABASE {} SET logical_decoding_work_mem = '64kB'").format(sql.Identifier(pg.info.dbname)))
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, n numeric(12, 2), pad text)")
    pg.execute("INSERT INTO t SELECT i, i, 'x' FROM generate_series(1, 100) i")
    pg.execute("CREATE TABLE backfilling (id int PRIMARY KEY, pad text)")  # its changes go to its change log
    pg.execute("INSERT INTO backfilling SELECT i, 'x' FROM generate_series(1, 300) i")
    h = Harness(pg_url, target, ["t", "backfilling"])
    h.backfill("t")
    h.backfill("backfilling", slices=[0])
    with pg.transaction():
        pg.execute("INSERT INTO t SELECT g, g / 3.0, repeat(md5(g::text), 5) FROM generate_series(1000, 8999) g")
        pg.execute("UPDATE t SET n = NULL WHERE id % 5 = 0")
        pg.execute("DELETE FROM t WHERE id % 9 = 0")
        pg.execute("INSERT INTO backfilling SELECT g, repeat(md5(g::text), 5) FROM generate_series(1000, 4999) g")
        pg.execute("UPDATE backfilling SET pad = 'y' WHERE id <= 300")
    result = h.drain(max_bytes=1 << 20)
    assert result.staged_parts >= 2, result
    h.backfill("backfilling", slices=[1, 2])
    h.drain_all()
    h.assert_equal(pg, "t")
    h.assert_equal(pg, "backfilling")


def test_a_streamed_transaction_rolled_back_leaves_nothing(h, pg):
    streamed_before, _ = _slot_stats(pg, h.settings.slot)
    with pytest.raises(psycopg.errors.RaiseException):
        with pg.transaction():
            pg.execute("INSERT INTO t SELECT g, g, repeat('r', 300) FROM generate_series(1000, 20999) g")
            pg.execute("UPDATE t SET n = 99 WHERE id <= 100")
            pg.execute("DO $$ BEGIN RAISE EXCEPTION 'roll back'; END $$")
    pg.execute("INSERT INTO t VALUES (500, 5, 'after')")
    results = h.drain_all(max_bytes=1 << 20)
    assert sum(r.changes for r in results) == 1
    h.assert_equal(pg, "t")
    assert _wait_streamed(pg, h.settings.slot, streamed_before)[0] > streamed_before  # it was streamed
    assert _staged_rows(h) == 0


def test_a_rolled_back_subtransaction_leaves_only_its_changes_out(h, pg):
    with pg.transaction():
        pg.execute("INSERT INTO t SELECT g, 1, repeat('a', 300) FROM generate_series(1000, 5999) g")
        pg.execute("SAVEPOINT s1")
        pg.execute("INSERT INTO t SELECT g, 2, repeat('b', 300) FROM generate_series(6000, 10999) g")
        pg.execute("UPDATE t SET n = 22, pad = 'gone' WHERE id BETWEEN 1000 AND 2999")
        pg.execute("DELETE FROM t WHERE id <= 50")
        pg.execute("ROLLBACK TO SAVEPOINT s1")
        pg.execute("UPDATE t SET n = 3 WHERE id BETWEEN 2000 AND 3999")
        pg.execute("SAVEPOINT s2")
        pg.execute("INSERT INTO t SELECT g, 4, repeat('c', 300) FROM generate_series(11000, 15999) g")
        pg.execute("SAVEPOINT s3")
        pg.execute("DELETE FROM t WHERE id BETWEEN 11000 AND 11999")
        pg.execute("ROLLBACK TO SAVEPOINT s3")  # nested inside s2, which is kept
        pg.execute("RELEASE SAVEPOINT s2")
        pg.execute("UPDATE t SET pad = 'kept' WHERE id BETWEEN 12000 AND 12099")
    result = h.drain(max_bytes=1 << 20)
    assert result.staged_parts >= 3, result
    h.drain_all()
    h.assert_equal(pg, "t")
    assert len(h.warehouse_rows("t")) == 100 + 5000 + 5000


def test_small_transactions_committed_while_a_large_one_streams_apply_in_commit_order(h, pg, pg_url):
    with psycopg.connect(pg_url, autocommit=True) as other:
        with pg.transaction():
            pg.execute("INSERT INTO t SELECT g, 0, repeat('l', 300) FROM generate_series(1000, 20999) g")
            other.execute("UPDATE t SET n = 1 WHERE id = 1")  # commits first: the large one overwrites it
            other.execute("INSERT INTO t VALUES (50000, 1, 'small')")
            pg.execute("UPDATE t SET n = 2 WHERE id = 1")
            pg.execute("DELETE FROM t WHERE id = 50000")  # sees the small insert: deletes it after it
            pg.execute("INSERT INTO t SELECT g, 0, repeat('m', 300) FROM generate_series(21000, 30999) g")
            other.execute("UPDATE t SET n = 7 WHERE id = 2")  # commits before the large one: kept
        other.execute("UPDATE t SET n = 3 WHERE id = 21000")  # commits after it
    h.drain_all(max_bytes=1 << 20)
    h.assert_equal(pg, "t")
    assert dict(pg.execute("SELECT id, n FROM t WHERE id IN (1, 2, 21000, 50000)").fetchall()) == {1: 2, 2: 7, 21000: 3}


@pytest.mark.parametrize("failpoint", ["stream_staged", "mid_apply"])
def test_a_drain_killed_while_a_streamed_transaction_is_staged_converges(h, pg, failpoint):
    """Default drain settings (the subprocess's): the transaction outgrows the 8 MB spill bound."""
    with pg.transaction():
        pg.execute("INSERT INTO t SELECT g, g, repeat(md5(g::text), 10) FROM generate_series(1000, 80999) g")  # ~27 MB
        pg.execute("UPDATE t SET n = n + 1 WHERE id <= 100")  # not idempotent if applied twice as a delta
    assert drain_in_subprocess(h, failpoint) == -9
    h.drain_all()
    h.assert_equal(pg, "t")
    assert _staged_rows(h) == 0


@pytest.mark.e2e
def test_a_large_transaction_through_the_cli(pg, pg_url, write_config, duckdb_path, tmp_path):
    """What an operator runs: materialize the partitions, one transaction of ~25 MB of pgoutput
    (three times the drain's 8 MB spill bound), drain with `dagster job execute`."""
    if pg.info.server_version < 140000:
        pytest.skip("streaming of in-progress transactions needs Postgres 14+")
    pg.execute(sql.SQL("ALTER DATABASE {} SET logical_decoding_work_mem = '64kB'").format(sql.Identifier(pg.info.dbname)))
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, n int, pad text)")
    pg.execute("INSERT INTO t SELECT i, 0, 'x' FROM generate_series(1, 1000) i")
    write_config({"source": {"slot": "pgr_cli", "publication": "pgr_cli"}, "tables": ["t"], "defaults": {"partitions": 2}})
    env = dagster_env(tmp_path)
    out = run_cli(operator.materialize("public/t", "000...001"), env, tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    with pg.transaction():
        pg.execute("INSERT INTO t SELECT g, g, repeat(md5(g::text), 10) FROM generate_series(2000, 76999) g")
        pg.execute("UPDATE t SET n = -1, pad = NULL WHERE id <= 1000")
        pg.execute("DELETE FROM t WHERE id % 13 = 0")
    out = run_cli(operator.drain(), env, tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    with duckdb.connect(str(duckdb_path), read_only=True) as wh:
        got = wh.execute('SELECT id, n, pad FROM "public"."t" ORDER BY id').fetchall()
        staged = wh.execute('SELECT count(*) FROM "_pg_replication"."stream.pgr_cli"').fetchone()[0]
    assert got == pg.execute("SELECT id, n, pad FROM t ORDER BY id").fetchall()
    assert staged == 0  # the staging table exists (parts were staged) and was emptied


def test_many_subtransactions_with_unchanged_toast_and_key_changes_fold_exactly(h, pg):
    """One subtransaction per row (a PL/pgSQL loop with an EXCEPTION block), out-of-line values
    left unchanged ('u') and keys changed in later subtransactions: folded into one segment at
    the commit, the warehouse still takes every value from the right version."""
    pg.execute("ALTER TABLE t ALTER COLUMN pad SET STORAGE EXTERNAL")  # out of line: unchanged ones arrive as 'u'
    pg.execute("UPDATE t SET pad = repeat(md5(id::text), 100) WHERE id <= 20")  # already in the warehouse
    h.drain_all()
    pg.execute(
        """DO $$ BEGIN
             FOR i IN 1000..3499 LOOP
               BEGIN INSERT INTO t VALUES (i, 0, repeat(md5(i::text), 70)); EXCEPTION WHEN others THEN NULL; END;
             END LOOP;
             FOR i IN 1000..1999 LOOP
               BEGIN UPDATE t SET n = n + 1 WHERE id = i; EXCEPTION WHEN others THEN NULL; END;
             END LOOP;
             FOR i IN 1..20 LOOP
               BEGIN UPDATE t SET n = 5 WHERE id = i; EXCEPTION WHEN others THEN NULL; END;
               BEGIN UPDATE t SET id = id + 100000 WHERE id = i; EXCEPTION WHEN others THEN NULL; END;
             END LOOP;
             FOR i IN 2000..2099 LOOP
               BEGIN UPDATE t SET id = id + 100000 WHERE id = i; EXCEPTION WHEN others THEN NULL; END;
               BEGIN UPDATE t SET n = 7 WHERE id = i + 100000; EXCEPTION WHEN others THEN NULL; END;
               BEGIN UPDATE t SET n = 8 WHERE id = i + 100000; PERFORM 1 / 0; EXCEPTION WHEN others THEN NULL; END;
             END LOOP;
           END $$"""
    )
    h.drain_all()
    h.assert_equal(pg, "t")


def test_ddl_in_a_streamed_transaction_rolled_back_never_reaches_the_warehouse(h, pg):
    """Relation messages inside a streamed transaction's blocks count only once it commits: an
    ALTER rolled back (or still in progress when the read ends) never alters the warehouse."""
    pg.execute("INSERT INTO t VALUES (500, 5, 'before')")  # the batch holds a change of t
    with pytest.raises(psycopg.errors.RaiseException):
        with pg.transaction():
            pg.execute("ALTER TABLE t ADD COLUMN never int DEFAULT 7")
            pg.execute("INSERT INTO t SELECT g, g, repeat('r', 300), 8 FROM generate_series(1000, 9999) g")
            pg.execute("DO $$ BEGIN RAISE EXCEPTION 'roll back'; END $$")
    h.drain_all(max_bytes=1 << 20)
    with h.target.open() as wh:
        columns = {c for (c,) in wh.fetchall("SELECT column_name FROM information_schema.columns WHERE table_name = 't'")}
    assert "never" not in columns, columns
    h.assert_equal(pg, "t")


def test_the_drain_jobs_path_stages_a_large_transaction_through_a_warehouse_open_per_call(h, pg, duckdb_path):
    """The drain job's engine path on DuckDB (``drain_run``, per call: a long-lived run): each
    staged part, the apply and the emptying of the staging are calls complete on their own, and
    nothing holds the file once a batch is yielded (a read-only open succeeds then)."""
    from pg_replication.replicate.drain_loop import LoopSettings, drain_run

    with pg.transaction():
        pg.execute("INSERT INTO t SELECT g, g, repeat(md5(g::text), 10) FROM generate_series(1000, 20999) g")  # ~7 MB
        pg.execute("UPDATE t SET n = -n, pad = NULL WHERE id % 7 = 0")
        pg.execute("DELETE FROM t WHERE id % 11 = 0")
    for i in range(5):  # small transactions after it: the session goes on with them
        pg.execute("UPDATE t SET n = n + 1 WHERE id BETWEEN %s AND %s", (1000 + i * 10, 1009 + i * 10))
    read = DrainSettings(h.settings.slot, h.settings.publication, max_bytes=1 << 20, max_seconds=1.0)
    run = drain_run(h.pg_url, h.target.open, h.tables, [], read, LoopSettings(run_seconds=120), print, per_call=True)
    staged = changes = 0
    with closing(run):
        for batch in run:
            staged += batch.slot.staged_parts
            changes += batch.slot.changes
            with duckdb.connect(str(duckdb_path), read_only=True) as reader:  # fails while a connection is open in this process
                reader.execute('SELECT count(*) FROM "public"."t"').fetchone()
            if batch.applied_nothing and changes:
                break
    assert staged >= 3, f"{staged} parts staged: the transaction should have been streamed and staged"
    h.assert_equal(pg, "t")
    assert _staged_rows(h) == 0
