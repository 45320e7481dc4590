"""One replication session, many batches, each applied while the next is read (drain_session.py).

Proves: batches read in one session and applied in a worker thread leave the warehouse equal to
the source value by value, with the slot confirmed exactly to what the warehouse committed; a
session killed while a batch is applied and the next one read (or right after a commit, before
the slot heard of it) loses and duplicates nothing when drained again; and sessions run while a
writer inserts, updates (unchanged TOAST values, key changes), deletes, truncates and adds a
column converge on the source. Leaves out: large transactions streamed in parts (a batch that
holds one ends the session; test_large_transactions.py covers their drain).
"""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg
import pytest

from pg_replication.errors import SourceUnavailableError
from pg_replication.replicate.cdc import DrainSettings
from pg_replication.source.pgoutput import lsn_to_int
from pg_replication_tests.operator import wait_for
from pg_replication_tests.replication import Harness
from pg_replication_tests.test_exactly_once import NOT_CRASH_SAFE, ROOT, converge, create_writers_table

SESSION_DRAIN = """
import sys
from pg_replication_tests.replication import Harness
from pg_replication_tests.targets import from_spec
h = Harness(sys.argv[1], from_spec(sys.argv[2]), ["t"], slot=sys.argv[3])
h.drain_session(max_changes=100)
"""


def _write_mixed(pg: psycopg.Connection, transactions: int, first: int = 0) -> None:
    """Transactions of inserts, updates (some twice to one key) and deletes."""
    for t in range(first, first + transactions):
        with pg.transaction():
            base = 1 + (t * 37) % 400
            pg.execute("INSERT INTO t SELECT i, 'new ' || i, i * 0.25, now(), true, NULL FROM generate_series(%s::int, %s::int) i",
                       (10_000 + t * 20, 10_000 + t * 20 + 19))
            pg.execute("UPDATE t SET title = title || '!', price = price + 1 WHERE id BETWEEN %s AND %s", (base, base + 15))
            pg.execute("UPDATE t SET price = -0.0 WHERE id = %s", (base,))
            pg.execute("DELETE FROM t WHERE id BETWEEN %s AND %s", (base + 16, base + 20))


def _create_table(pg: psycopg.Connection) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, title text, price numeric(12,2), at timestamptz, flag bool, qty bigint)")
    pg.execute("INSERT INTO t SELECT i, 'row ' || i, i, now(), false, i * 1000 FROM generate_series(1, 500) i")


def _slot_confirmed(pg: psycopg.Connection, slot: str) -> int:
    return lsn_to_int(pg.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()[0])


def test_session_batches_equal_the_source(pg, pg_url, target):
    _create_table(pg)
    h = Harness(pg_url, target, ["t"])
    h.backfill()
    _write_mixed(pg, 30)
    results = h.drain_session(max_changes=200)
    assert len(results) > 3, "the changes should take several batches"
    # The session lasts while batches come: it ends after one that found nothing left to apply.
    assert results[-1].caught_up and results[-1].changes == 0
    assert not any(r.caught_up for r in results[:-2])
    positions = [r.drained_lsn for r in results]
    assert positions == sorted(positions)
    h.assert_equal(pg, "t")
    with h.target.open() as wh:
        assert _slot_confirmed(pg, h.settings.slot) == wh.drained_lsn(h.settings.slot) == positions[-1]
    _write_mixed(pg, 3, first=30)  # the next session goes on from there
    h.drain_session(max_changes=200)
    h.assert_equal(pg, "t")


@pytest.mark.parametrize("failpoint", ["after_read", "mid_apply", "after_commit"])
def test_killed_session_resumes_exactly_once(pg, pg_url, target, failpoint):
    """``mid_apply`` kills inside the apply thread's transaction while the next batch is read;
    ``after_commit``, once the first batch committed, before the slot was told."""
    if not target.crash_safe:
        pytest.skip(NOT_CRASH_SAFE)
    _create_table(pg)
    h = Harness(pg_url, target, ["t"])
    h.backfill()
    _write_mixed(pg, 10)
    env = {**os.environ, "PGR_FAILPOINT": failpoint, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", SESSION_DRAIN, h.pg_url, h.target.spec(), h.settings.slot],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == -9, out.stderr[-2000:]
    h.drain_session(max_changes=100)
    h.assert_equal(pg, "t")
    _write_mixed(pg, 2, first=10)
    h.drain_all()
    h.assert_equal(pg, "t")


def test_sessions_converge_under_concurrent_writes(pg, pg_url, target):
    create_writers_table(pg)
    h = Harness(pg_url, target, ["t"], partitions=2)
    h.backfill()
    converge(
        pg, h, lambda: None,
        drain=lambda: h.drain_session(max_seconds=3, max_changes=300),
        drain_rest=lambda: h.drain_session(max_changes=300),
        seed="11",
    )


class _StreamCutDuringFirstApply:
    """The warehouse, except that its first apply first ends the session's walsender (as a
    failover or a network cut would) and waits until the slot is let go: the read running beside
    that apply, or the one after it, fails while the batch commits."""

    def __init__(self, warehouse, pg_url: str, slot: str) -> None:
        self._warehouse, self._pg_url, self._slot, self._cut = warehouse, pg_url, slot, False

    def __getattr__(self, name: str):
        return getattr(self._warehouse, name)

    def apply_drain(self, *args, **kwargs):
        if not self._cut:
            self._cut = True
            with psycopg.connect(self._pg_url, autocommit=True) as pg:
                pg.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = %s", (self._slot,))
                wait_for(
                    lambda: not pg.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (self._slot,)).fetchone()[0],
                    "the slot to be let go", timeout=120, poll=0.05,
                )
        return self._warehouse.apply_drain(*args, **kwargs)


def test_a_batch_committed_while_the_next_read_fails_is_reported_and_confirmed(pg, pg_url, duckdb_path):
    from pg_replication.replicate.drain_session import drain_session

    _create_table(pg)
    h = Harness(pg_url, duckdb_path, ["t"])
    h.backfill()
    _write_mixed(pg, 10)
    reported = []
    with h.target.open() as wh:
        cut = _StreamCutDuringFirstApply(wh, pg_url, h.settings.slot)
        settings = DrainSettings(**{**h.settings.__dict__, "max_changes": 100})
        with pytest.raises(SourceUnavailableError):
            for result in drain_session(pg_url, cut, h.tables, settings):
                reported.append(result)
        committed = wh.drained_lsn(h.settings.slot)
    assert reported, "the batch applied while the stream broke was not reported"
    assert reported[-1].drained_lsn == committed, "a committed batch was not reported"
    assert _slot_confirmed(pg, h.settings.slot) == committed  # confirmed by SQL once the broken session let go
    h.drain_session(max_changes=100)
    h.assert_equal(pg, "t")


class _RefusingApply:
    """The warehouse, except that its apply logs a line and then refuses the batch."""

    def __init__(self, warehouse) -> None:
        self._warehouse = warehouse

    def __getattr__(self, name: str):
        return getattr(self._warehouse, name)

    def apply_drain(self, *args, log, **kwargs):
        log("t: the warehouse refused the batch")
        raise RuntimeError("the warehouse refused the batch")


def test_a_failed_apply_is_told_once(pg, pg_url, duckdb_path):
    """The batch's error reaches the caller and its log lines are passed on once, not again when
    the session closes; nothing is confirmed past what the warehouse holds."""
    from pg_replication.replicate.drain_session import drain_session

    _create_table(pg)
    h = Harness(pg_url, duckdb_path, ["t"])
    h.backfill()
    _write_mixed(pg, 3)
    lines: list[str] = []
    with h.target.open() as wh:
        before = wh.drained_lsn(h.settings.slot)
        with pytest.raises(RuntimeError, match="refused the batch"):
            for _ in drain_session(pg_url, _RefusingApply(wh), h.tables, h.settings, lines.append):
                pass
        assert wh.drained_lsn(h.settings.slot) == before
    assert lines.count("t: the warehouse refused the batch") == 1, lines
    h.drain_session()
    h.assert_equal(pg, "t")
