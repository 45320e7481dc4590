"""A table that joins an existing slot misses nothing (DESIGN 3.1, issue 10 point 5).

pgoutput decides whether a change is published with the catalog as of that change. A
transaction that wrote the table before ``ALTER PUBLICATION … ADD TABLE`` committed has those
changes decoded as "not published", yet it may commit after the backfill's plan position and its
slices' snapshots: without a wait, its changes are in neither. Proven here with a second session
that holds such a write open while the backfill plans and copies, and commits afterwards.

Not covered: a prepared transaction holding the write (waited for the same way, by its locks).
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from pg_replication.source import inflight
from pg_replication.source.inflight import WritersInFlightError
from pg_replication_tests.replication import Harness


def _wait_until(condition, what: str, deadline: float = 120.0) -> None:
    stop = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > stop:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _planner_waits(pg) -> bool:
    """Some session of this database sleeps in the writers' wait (see inflight.py)."""
    return bool(
        pg.execute(
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s",
            (inflight.WAITING_APPLICATION_NAME,),
        ).fetchone()
    )


def _existing_slot(pg, pg_url, target) -> Harness:
    """A slot and publication already streaming another table, and the table about to join."""
    pg.execute("CREATE TABLE first (id int PRIMARY KEY)")
    pg.execute("INSERT INTO first SELECT generate_series(1, 10)")
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO t SELECT i, 'v0' FROM generate_series(1, 3000) i")
    h = Harness(pg_url, target, ["first"])
    h.backfill("first")
    h.drain_all()
    h.reload(["first", "t"])  # t joins: its backfill publishes it
    return h


def test_write_open_across_the_plan_is_not_lost(pg, pg_url, target):
    h = _existing_slot(pg, pg_url, target)
    with psycopg.connect(pg_url) as writer:  # a transaction, held open
        writer.execute("UPDATE t SET v = 'in flight' WHERE id <= 20")  # rows of slice 0's pages
        writer.execute("DELETE FROM t WHERE id BETWEEN 21 AND 30")
        writer.execute("INSERT INTO t VALUES (5000, 'in flight')")
        errors: list[BaseException] = []

        def backfill() -> None:
            try:
                h.backfill("t")
            except BaseException as exc:  # re-raised below
                errors.append(exc)

        thread = threading.Thread(target=backfill)
        thread.start()
        _wait_until(lambda: not thread.is_alive() or _planner_waits(pg), "the backfill to finish or to wait")
        writer.commit()
    thread.join(timeout=300)
    assert not thread.is_alive()
    if errors:
        raise errors[0]
    h.drain_all()
    h.assert_equal(pg, "t")


def test_a_writer_that_never_ends_fails_the_plan_naming_it(pg, pg_url, duckdb_path, monkeypatch):
    h = _existing_slot(pg, pg_url, duckdb_path)
    monkeypatch.setattr(inflight, "WRITERS_DEADLINE_SECONDS", 1.0)
    with psycopg.connect(pg_url) as writer:
        writer.execute("INSERT INTO t VALUES (5000, 'never committed')")
        pid = writer.info.backend_pid
        with pytest.raises(WritersInFlightError, match=f"pid {pid}"):
            h.backfill("t")
        writer.rollback()
    h.backfill("t")  # nothing was planned: the next run plans and copies
    h.drain_all()
    h.assert_equal(pg, "t")
