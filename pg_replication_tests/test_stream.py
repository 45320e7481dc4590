"""Reads stream from the slot (issue 11, point 2): bounded by bytes on the source too, busy slots
reported, the slot confirmed only after the warehouse committed, heartbeats and idle sources
still advance it, a wall-clock budget ends a read at a commit, and one transaction bigger than
``max_bytes`` is read in parts (protocol 2 streaming, Postgres 14+)."""

from __future__ import annotations

import time

import psycopg
import psycopg2
import psycopg2.extras
import pytest

from pg_replication.source.pgoutput import lsn_to_int
from pg_replication.source.slot import SlotBusyError
from pg_replication_tests.replication import Harness
from pg_replication_tests.test_exactly_once import drain_in_subprocess


@pytest.fixture
def h(pg, pg_url, duckdb_path):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, pad text)")
    pg.execute("INSERT INTO t SELECT i, 'x' FROM generate_series(1, 100) i")
    harness = Harness(pg_url, duckdb_path, ["t"])
    harness.backfill()
    harness.drain_all()
    return harness


def _temp_bytes(pg: psycopg.Connection) -> int:
    pg.execute("SELECT pg_stat_clear_snapshot()")
    return pg.execute("SELECT temp_bytes FROM pg_stat_database WHERE datname = current_database()").fetchone()[0]


def _settled_temp_bytes(pg: psycopg.Connection) -> int:
    """Temp-file bytes of this database once the drain's backends have reported theirs."""
    last, stable_since = _temp_bytes(pg), time.monotonic()
    while time.monotonic() - stable_since < 1.5:
        time.sleep(0.25)
        now = _temp_bytes(pg)
        if now != last:
            last, stable_since = now, time.monotonic()
    return last


def test_a_bounded_read_does_not_materialize_the_backlog_on_the_source(h, pg):
    """40 pending transactions (~16 MB of pgoutput) and a 1 MB read: the source must not build
    the whole backlog (a peek's result spills to temp files past work_mem) to hand over 1 MB."""
    for i in range(40):
        pg.execute(
            "INSERT INTO t SELECT g, repeat('p', 300) FROM generate_series(%s::int, %s::int) g", (1000 + i * 1000, 1999 + i * 1000)
        )
    before = _settled_temp_bytes(pg)
    result = h.drain(max_bytes=1 << 20)
    after = _settled_temp_bytes(pg)
    assert not result.caught_up and result.bytes < 2 << 20
    assert after == before, f"the source wrote {after - before:,} bytes of temp files for a 1 MB read"
    h.drain_all()
    h.assert_equal(pg, "t")


def _confirmed(pg: psycopg.Connection, slot: str) -> int:
    row = pg.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    return lsn_to_int(row[0])


def test_a_busy_slot_is_reported(h, pg, pg_url):
    pg.execute("INSERT INTO t VALUES (5000, 'x')")
    other = psycopg2.connect(pg_url, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    try:
        other.cursor().start_replication(
            slot_name=h.settings.slot, decode=False, options={"proto_version": "1", "publication_names": h.settings.publication}
        )
        with pytest.raises(SlotBusyError):
            h.drain()
    finally:
        other.close()
    h.drain_all()  # the other session let go: the drain starts (waiting for it if needed)
    h.assert_equal(pg, "t")


@pytest.mark.parametrize("failpoint", ["after_read", "mid_apply"])
def test_the_slot_is_confirmed_only_after_the_warehouse_committed(h, pg, failpoint):
    pg.execute("UPDATE t SET pad = 'y' WHERE id <= 50")
    pg.execute("INSERT INTO t VALUES (5000, 'x')")
    before = _confirmed(pg, h.settings.slot)
    assert drain_in_subprocess(h, failpoint) == -9
    assert _confirmed(pg, h.settings.slot) == before
    h.drain_all()
    assert _confirmed(pg, h.settings.slot) > before
    h.assert_equal(pg, "t")


def test_heartbeats_and_idle_sources_advance_the_slot(h, pg):
    before = _confirmed(pg, h.settings.slot)
    lsn = lsn_to_int(pg.execute("SELECT pg_logical_emit_message(false, 'heartbeat', 'x')::text").fetchone()[0])
    pg.execute("SELECT pg_logical_emit_message(true, 'heartbeat', 'y')")
    (result,) = h.drain_all()
    assert result.changes == 0 and result.caught_up
    assert _confirmed(pg, h.settings.slot) > lsn > before
    (result,) = h.drain_all()  # nothing at all: still caught up, never moving back
    assert result.caught_up and _confirmed(pg, h.settings.slot) > lsn


def test_a_time_budget_ends_the_read_at_the_next_commit(h, pg):
    for i in range(5):
        pg.execute("INSERT INTO t SELECT g, 'z' FROM generate_series(%s::int, %s::int) g", (1000 + i * 10, 1009 + i * 10))
    results = h.drain_all(max_seconds=0)
    assert all(r.transactions <= 1 for r in results)  # the budget is spent at once: one commit each
    assert sum(r.transactions for r in results) == 5 and sum(r.changes for r in results) == 50
    h.assert_equal(pg, "t")


def test_one_transaction_larger_than_max_bytes_is_read_in_parts(h, pg):
    """Streamed by the server while in progress (protocol 2), staged in the warehouse past a
    bound: the drain holds a fraction of the transaction (test_large_transactions.py has more)."""
    pg.execute(psycopg.sql.SQL("ALTER DATABASE {} SET logical_decoding_work_mem = '64kB'").format(psycopg.sql.Identifier(pg.info.dbname)))
    pg.execute("INSERT INTO t SELECT g, repeat('p', 300) FROM generate_series(1000, 20999) g")  # ~7 MB
    result = h.drain(max_bytes=1 << 20)
    assert result.bytes > 5 << 20 and result.held_bytes < 2 << 20
    h.drain_all()
    h.assert_equal(pg, "t")


def test_many_small_transactions_read_in_c_reach_the_warehouse_exactly(h, pg):
    """The stream is read in C, many messages per call (source/_copyboth.c), the row changes of
    known relations going straight into their decoder: thousands of one-row transactions (more
    messages than one call takes), a key-changing update, deletes, and a Relation message in the
    middle of the stream (ADD COLUMN) followed by changes decoded under the new columns."""
    with pg.cursor() as cur:
        cur.executemany("INSERT INTO t VALUES (%s, %s)", [(i, f"one {i}") for i in range(1000, 7000)])  # autocommit: one each
        cur.executemany("UPDATE t SET pad = %s WHERE id = %s", [(f"upd {i}", i) for i in range(1000, 7000, 7)])
        cur.executemany("DELETE FROM t WHERE id = %s", [(i,) for i in range(1003, 7000, 11)])
    moved = pg.execute("UPDATE t SET id = id + 100000 WHERE id BETWEEN 2000 AND 2100").rowcount  # key changes
    pg.execute("ALTER TABLE t ADD COLUMN extra int DEFAULT 7")
    with pg.cursor() as cur:
        cur.executemany("INSERT INTO t VALUES (%s, %s, %s)", [(i, f"two {i}", i % 5) for i in range(7000, 8000)])
    again = pg.execute("UPDATE t SET extra = NULL, pad = 'again' WHERE id % 3 = 0").rowcount
    written = 6000 + len(range(1000, 7000, 7)) + len(range(1003, 7000, 11)) + moved + 1000 + again
    results = h.drain_all(max_changes=10**6)
    h.assert_equal(pg, "t")
    assert sum(r.changes for r in results) == written


def test_keepalives_are_answered_without_confirming_anything(h, pg, monkeypatch):
    """With ``wal_sender_timeout`` at 2 s the server asks for a reply every second and ends a
    silent session after two: the reader answers (the session lives on for 5 s) with the position
    last confirmed after a warehouse commit, never with what it has only read."""
    import pg_replication.source.stream as stream_module

    monkeypatch.setattr(stream_module, "SESSION_OPTIONS", stream_module.SESSION_OPTIONS + " -c wal_sender_timeout=2000")
    confirmed = _confirmed(pg, h.settings.slot)
    pg.execute("INSERT INTO t VALUES (9000, 'read, never applied')")
    start = confirmed
    seen = []
    with stream_module.SlotStream(h.pg_url, h.settings.slot, h.settings.publication, start) as stream:
        until = time.monotonic() + 5
        for data in stream:
            if data is not None:
                seen.append(data[:1])
            if time.monotonic() >= until:
                break
    assert b"I" in seen  # the insert was read, the session stayed up past the timeout
    assert _confirmed(pg, h.settings.slot) == confirmed  # and the slot was told nothing
    h.drain_all()
    h.assert_equal(pg, "t")
