"""A long-lived drain run: `dagster job execute` in a fresh process stays up for run_seconds and
applies each change as it comes (one materialization per batch), while the test process opens
the DuckDB file read-only, as an analyst or a BI tool would, and reads the mirrored table."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import duckdb
import psycopg
import pytest
import yaml

from pg_replication_tests.operator import dagster_env, drain, materialize, run_cli, wait_for

BIN = Path(sys.executable).parent
RUN_SECONDS = 90
DEADLINE = 120  # seconds for a change to show in DuckDB: generous for a loaded 2-core box

pytestmark = pytest.mark.e2e


def _read_only(path: Path, query: str) -> list[tuple] | None:
    """The query's rows on a read-only connection, None while a batch holds the file's write lock."""
    try:
        with duckdb.connect(str(path), read_only=True) as conn:
            return conn.execute(query).fetchall()
    except duckdb.IOException:
        return None


def _wait(condition, what: str, timeout: float = DEADLINE):
    return wait_for(condition, what, timeout, poll=0.2)


CHANGES = [
    "UPDATE shop.orders SET n = n + 1 WHERE id <= 50",
    "INSERT INTO shop.orders SELECT i, i, 'new ' || i FROM generate_series(101, 150) i",
    "DELETE FROM shop.orders WHERE id % 7 = 0",
    "UPDATE shop.orders SET note = NULL WHERE id % 3 = 0",
]


def test_a_long_lived_drain_applies_changes_as_they_come_while_duckdb_stays_readable(pg, orders, duckdb_path, tmp_path, monkeypatch):
    env = orders
    started = time.monotonic()
    process = _start_drain(tmp_path, env, RUN_SECONDS, "drain")
    query = "SELECT id, n, note FROM shop.orders ORDER BY id"
    try:
        for change in CHANGES:
            pg.execute(change)
            source = pg.execute(query).fetchall()
            _wait(lambda: _read_only(duckdb_path, query) == source, f"{change!r} read from DuckDB while the run is up")
            assert process.poll() is None, "the drain run ended before the change was applied: not long-lived"
        returncode = process.wait(timeout=RUN_SECONDS + 300)
        lived = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert returncode == 0, (tmp_path / "drain.log").read_text()[-3000:]
    assert lived >= RUN_SECONDS, f"the run ended after {lived:.0f} s, before its {RUN_SECONDS} s"

    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    monkeypatch.chdir(tmp_path)  # dagster.yaml's storage path is relative to the working directory
    with dg.DagsterInstance.get() as instance:
        (run,) = instance.get_runs(dg.RunsFilter(job_name="postgres_cdc_drain"))
        records = instance.fetch_materializations(dg.AssetKey(["shop", "orders"]), limit=100).records
        batches = [r for r in records if r.run_id == run.run_id and "last_lsn" in r.asset_materialization.metadata]  # not caught_up reports
    # One materialization per batch that touched the table: each change was applied (and read)
    # before the next was made, so each came in a batch of its own; idle batches apply nothing.
    assert len(batches) == len(CHANGES)
    assert all(r.asset_materialization.metadata["last_lsn"] for r in batches)


def _start_drain(tmp_path: Path, env: dict, run_seconds: int, name: str, **config) -> subprocess.Popen:
    """`dagster job execute` of the drain job for ``run_seconds`` (more op config in ``config``),
    its output in ``name``.log."""
    op_config = {"run_seconds": run_seconds, **config}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"ops": {"postgres_drain_slot": {"config": op_config}}}))
    return subprocess.Popen(
        [str(BIN / drain()[0]), *drain()[1:], "-c", str(tmp_path / f"{name}.yaml")],
        env=env, cwd=tmp_path, stdout=open(tmp_path / f"{name}.log", "w"), stderr=subprocess.STDOUT,
    )


@pytest.fixture
def orders(pg, write_config, duckdb_path, tmp_path) -> dict:
    """shop.orders backfilled through the CLI; the environment of the `dagster` commands."""
    pg.execute("CREATE SCHEMA shop")
    pg.execute("CREATE TABLE shop.orders (id int PRIMARY KEY, n int, note text)")
    pg.execute("INSERT INTO shop.orders SELECT i, 0, 'note ' || i FROM generate_series(1, 100) i")
    write_config({"tables": ["shop.orders"], "defaults": {"partitions": 2}})
    env = dagster_env(tmp_path)
    out = run_cli(materialize("shop/orders", "000...001"), env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return env


def _mirrored(pg, path: Path) -> bool:
    query = "SELECT id, n, note FROM shop.orders ORDER BY id"
    return _read_only(path, query) == pg.execute(query).fetchall()


class _SlotSessions(threading.Thread):
    """Samples which walsender reads the slot (``pg_replication_slots.active_pid``) every 20 ms:
    pid -> (first seen, last seen), wall-clock times comparable with Dagster's event times."""

    def __init__(self, pg_url: str) -> None:
        super().__init__(daemon=True)
        self.pg_url, self.seen, self.stop = pg_url, {}, threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            while not self.stop.wait(0.02):
                row = conn.execute(
                    "SELECT active_pid FROM pg_replication_slots WHERE database = current_database() AND active_pid IS NOT NULL"
                ).fetchone()
                if row is not None:
                    now = time.time()
                    self.seen[row[0]] = (self.seen.get(row[0], (now, now))[0], now)


def test_a_long_lived_run_reads_its_micro_batches_through_one_session(orders, pg, pg_url, duckdb_path, tmp_path, monkeypatch):
    """A backlog of 20 transactions of 50 changes, with batches of at most 50 changes: the run
    applies them in many micro-batches, all read by one walsender (one replication session), and
    the DuckDB file still opens read-only from this process while the run is up."""
    process = _start_drain(tmp_path, orders, 600, "drain", max_changes=50)
    sessions = _SlotSessions(pg_url)
    try:
        pg.execute("UPDATE shop.orders SET n = 1")
        _wait(lambda: _mirrored(pg, duckdb_path), "the first change in DuckDB")
        sessions.start()
        backlog_from = time.time()
        for i in range(20):
            with pg.transaction():
                pg.execute("INSERT INTO shop.orders SELECT i, %s, 'batch ' || i FROM generate_series(%s::int, %s::int) i",
                           (i, 1000 + i * 25, 1024 + i * 25))
                pg.execute("UPDATE shop.orders SET n = n + %s, note = CASE WHEN id %% 2 = 0 THEN NULL ELSE note || '!' END "
                           "WHERE id BETWEEN %s AND %s", (i, 1 + (i * 5) % 75, 25 + (i * 5) % 75))
        _wait(lambda: _mirrored(pg, duckdb_path), "the backlog in DuckDB, value by value")  # read-only opens while the run is up
        assert process.poll() is None, (tmp_path / "drain.log").read_text()[-3000:]
        monkeypatch.setenv("DAGSTER_HOME", orders["DAGSTER_HOME"])
        monkeypatch.chdir(tmp_path)  # dagster.yaml's storage path is relative to the working directory
        with dg.DagsterInstance.get() as instance:
            records = instance.fetch_materializations(dg.AssetKey(["shop", "orders"]), limit=100).records
        batches = sorted(r.timestamp for r in records if r.timestamp >= backlog_from)
    finally:
        sessions.stop.set()
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=120)
    sessions.join(timeout=60)
    assert len(batches) >= 10, f"{len(batches)} micro-batch(es): the backlog should take many"
    # Dagster records a batch's materialization while its session reads the next one.
    per_session = {pid: sum(first - 0.1 <= t <= last + 0.1 for t in batches) for pid, (first, last) in sessions.seen.items()}
    assert max(per_session.values(), default=0) >= len(batches) - 1, (
        f"{len(batches)} micro-batches were read by {len(sessions.seen)} sessions ({per_session})"
    )


def test_a_lost_source_connection_is_retried_inside_the_run(orders, pg, duckdb_path, tmp_path):
    """Every session of the drain is terminated for a few seconds (as a failover or a restart
    would): the run retries with backoff and goes on applying; it is not failed."""
    process = _start_drain(tmp_path, orders, 60, "drain")
    try:
        pg.execute("UPDATE shop.orders SET n = 1")
        _wait(lambda: _mirrored(pg, duckdb_path), "the first change in DuckDB")
        until = time.monotonic() + 5
        while time.monotonic() < until:
            pg.execute("UPDATE shop.orders SET n = n + 1 WHERE id = 1")  # gives the drain something to read
            pg.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'pg_replication' AND pid <> pg_backend_pid()"
            )
            time.sleep(0.05)
        pg.execute("UPDATE shop.orders SET n = 2, note = 'after'")
        _wait(lambda: _mirrored(pg, duckdb_path), "a change made after the outage in DuckDB")
        assert process.poll() is None, "the run ended: the outage killed it"
        assert process.wait(timeout=600) == 0, (tmp_path / "drain.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "transient error, batch retried" in (tmp_path / "drain.log").read_text()


def test_a_backfill_waiting_for_the_pool_is_let_in(orders, pg, duckdb_path, tmp_path):
    """A long-lived drain holds the source pool; a backfill that needs it does not wait for the
    drain's whole run_seconds: the drain ends after its batch and the backfill runs."""
    process = _start_drain(tmp_path, orders, 600, "drain")
    try:
        pg.execute("UPDATE shop.orders SET n = 1")
        _wait(lambda: _mirrored(pg, duckdb_path), "the first change in DuckDB")
        started = time.monotonic()
        out = run_cli(materialize("shop/orders", "001...001"), orders, tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        assert process.wait(timeout=300) == 0, (tmp_path / "drain.log").read_text()[-3000:]
        waited = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert waited < 300, f"the backfill waited {waited:.0f} s for the drain"
    assert _mirrored(pg, duckdb_path)
