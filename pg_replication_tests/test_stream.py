"""Reads stream from the slot (issue 11, point 2): bounded by bytes on the source too, busy slots
reported, the slot confirmed only after the warehouse committed, heartbeats and idle sources
still advance it, and a wall-clock budget ends a read at a commit.

Leaves out (not done yet): protocol 2 streaming of large in-progress transactions; one
transaction bigger than ``max_bytes`` is still read whole (``test_one_transaction_...``)."""

from __future__ import annotations

import time

import psycopg
import pytest

from pg_replication_tests.replication import Harness


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
