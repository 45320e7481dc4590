"""Exactly once under crashes, and convergence under concurrent writes.

Proves: a drain killed with SIGKILL after reading, in the middle of the warehouse transaction, or
after the commit but before the slot advanced, loses and duplicates nothing when re-run; and a
backfill interleaved with CDC drains, a slice re-run and crashes, while a writer inserts, updates
(moving rows between pages), deletes, truncates and adds a column, ends with the warehouse equal to
the source row for row. Leaves out: a crash of Postgres itself (the slot is crash-safe there).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from pg_replication_tests.replication import Harness

ROOT = Path(__file__).resolve().parent.parent

CRASHING_DRAIN = """
import sys
from pg_replication_tests.replication import Harness
from pg_replication_tests.targets import from_spec
h = Harness(sys.argv[1], from_spec(sys.argv[2]), sys.argv[3].split(","), slot=sys.argv[4])
h.drain()
"""

NOT_CRASH_SAFE = "fakesnow's emulated Snowflake lives in the test process: a SIGKILL would take it along"


def drain_in_subprocess(h: Harness, failpoint: str) -> int:
    env = {**os.environ, "PGR_FAILPOINT": failpoint, "PYTHONPATH": str(ROOT)}
    tables = ",".join(t if isinstance(t, str) else t["name"] for t in h.raw_tables)
    out = subprocess.run(
        [sys.executable, "-c", CRASHING_DRAIN, h.pg_url, h.target.spec(), tables, h.settings.slot],
        env=env, capture_output=True, text=True, timeout=900,
    )
    return out.returncode


def crash_or_drain(h: Harness, failpoint: str) -> None:
    """A drain killed at ``failpoint``; where the warehouse cannot outlive a kill, a plain drain."""
    if h.target.crash_safe:
        assert drain_in_subprocess(h, failpoint) == -9
    else:
        h.drain()


@pytest.mark.parametrize("failpoint", ["after_read", "mid_apply", "after_commit"])
def test_killed_drain_resumes_exactly_once(pg, pg_url, target, failpoint):
    if not target.crash_safe:
        pytest.skip(NOT_CRASH_SAFE)
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, n int)")
    pg.execute("INSERT INTO t SELECT i, 0 FROM generate_series(1, 500) i")
    h = Harness(pg_url, target, ["t"])
    h.backfill()
    pg.execute("UPDATE t SET n = n + 1 WHERE id <= 100")  # not idempotent if applied twice as a delta
    pg.execute("DELETE FROM t WHERE id > 450")
    pg.execute("INSERT INTO t VALUES (1000, 7)")
    assert drain_in_subprocess(h, failpoint) == -9
    h.drain_all()
    h.assert_equal(pg, "t")
    pg.execute("UPDATE t SET n = n + 1 WHERE id <= 10")
    h.drain_all()
    h.assert_equal(pg, "t")


class Writer(threading.Thread):
    """Random transactions against the table until stopped; one TRUNCATE and one ADD COLUMN.

    ``blob`` is stored out of line (several kB, STORAGE EXTERNAL): updates that leave it alone,
    page-moving ones and key changes included, send it as pgoutput's 'unchanged TOAST' marker."""

    def __init__(self, url: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.url, self.rng = url, random.Random(seed)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.transactions = 0
        self.next_id = 100_000
        self.moved_id = 10_000_000

    def run(self) -> None:
        try:
            with psycopg.connect(self.url, autocommit=True) as conn:
                while not self.stop.is_set():
                    with conn.transaction():
                        for _ in range(self.rng.randint(1, 20)):
                            self.step(conn)
                    self.transactions += 1
                    if self.transactions == 40:
                        conn.execute("ALTER TABLE t ADD COLUMN extra int DEFAULT 42")
                    if self.transactions == 120:
                        conn.execute("TRUNCATE t")
                        conn.execute(
                            "INSERT INTO t (id, pad, n, blob) SELECT i, 'reborn', 1, repeat(md5(i::text), 120) "
                            "FROM generate_series(1, 300) i"
                        )
        except BaseException as exc:  # surfaced by the test
            self.error = exc

    def step(self, conn: psycopg.Connection) -> None:
        op = self.rng.random()
        key = self.rng.randint(1, 3000)
        if op < 0.35:
            self.next_id += 1
            conn.execute(
                "INSERT INTO t (id, pad, n, blob) VALUES (%s, %s, 0, %s)",
                (self.next_id, "x" * self.rng.randint(0, 300), self.blob()),
            )
        elif op < 0.75:  # a longer pad moves the row to another page, often another slice
            conn.execute("UPDATE t SET pad = %s, n = n + 1 WHERE id = %s", ("y" * self.rng.randint(0, 600), key))
        elif op < 0.8:
            conn.execute("UPDATE t SET blob = %s WHERE id = %s", (self.blob(), key))
        elif op < 0.95:
            conn.execute("DELETE FROM t WHERE id = %s", (key,))
        else:
            self.moved_id += 1
            conn.execute("UPDATE t SET id = %s WHERE id = %s", (self.moved_id, key))  # blob unchanged

    def blob(self) -> str:
        return "".join(self.rng.choice("abcdefgh") for _ in range(16)) * self.rng.randint(150, 400)


def create_writers_table(pg: psycopg.Connection) -> None:
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, pad text, n int, blob text)")
    pg.execute("ALTER TABLE t ALTER COLUMN blob SET STORAGE EXTERNAL")  # out of line, several kB
    pg.execute("INSERT INTO t SELECT i, repeat('p', i % 200), 0, repeat(md5(i::text), 100) FROM generate_series(1, 3000) i")


def converge(
    pg: psycopg.Connection,
    h: Harness,
    interleave: Callable[[], None],
    *,
    drain: Callable[[], object] | None = None,
    drain_rest: Callable[[], object] | None = None,
    seed: str = "7",
) -> None:
    """While a Writer changes table t, run ``interleave()`` (slices, drains, crashes), keep
    calling ``drain()`` until the writer is past its TRUNCATE and ADD COLUMN, ``drain_rest()``
    after it stopped, then compare every row. By default the drains are ``h.drain``'s."""
    drain = drain or (lambda: h.drain(max_changes=3000))
    drain_rest = drain_rest or h.drain_all
    writer = Writer(h.pg_url, seed=int(os.environ.get("PGR_SEED", seed)))
    writer.start()
    try:
        interleave()
        for _ in range(200):
            if writer.transactions > 160 or writer.error:
                break
            drain()
    finally:
        writer.stop.set()
        writer.join(timeout=600)
    assert not writer.is_alive(), "the writer did not stop within 600 s"
    assert writer.error is None, writer.error
    assert writer.transactions > 160
    drain_rest()
    h.reload()
    h.assert_equal(pg, "t")


def test_convergence_under_concurrent_writes(pg, pg_url, target):
    create_writers_table(pg)
    h = Harness(pg_url, target, ["t"], partitions=4)

    def interleave():
        h.backfill(slices=[2])
        h.drain(max_changes=500)
        h.backfill(slices=[0])
        crash_or_drain(h, "mid_apply")
        h.drain(max_changes=2000)
        h.backfill(slices=[3])
        crash_or_drain(h, "after_commit")
        h.backfill(slices=[1])  # completes the backfill: the log is replayed
        h.drain()
        h.backfill(slices=[2])  # a partition re-run while CDC is live
        crash_or_drain(h, "after_read")

    converge(pg, h, interleave)
