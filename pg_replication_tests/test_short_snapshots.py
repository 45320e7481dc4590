"""Short snapshots (issue 12, part 3): a partition holding more heap than
``backfill.max_snapshot_bytes`` is copied as several slices, each under its own snapshot and
committed on its own, so the source's xmin horizon is held only while one slice copies.

Proves: the plan cuts each partition into slices of at most that many heap pages, every page in
exactly one slice, the table's open end on the last; between two slices the backfill holds no
snapshot on the source but, into DuckDB, the next slice's (opened early), newer at every slice,
and a failed backfill leaves none; short slices interleaved with drains, a partition re-run and
a backfill killed between two of its slices, while a writer inserts, updates (moving rows
between pages), deletes, truncates and adds a column, end with the warehouse equal to the source
row for row; replication.yaml refuses a size below one page, naming the key.
Leaves out: TOAST bytes (slices are sized by heap pages, the TOAST table is read along with them).
"""

from __future__ import annotations

import os
import subprocess
import sys

import duckdb
import pytest

from pg_replication.replicate.backfill import run_backfill
from pg_replication.config import parse_config
from pg_replication.errors import BackfillRestartedError, ConfigError, WarehouseError
from pg_replication.source.connection import connect
from pg_replication.source.snapshot import block_size, make_plan, relation_pages
from pg_replication.warehouse.duckdb import DuckDBWarehouse
from pg_replication_tests.operator import wait_for
from pg_replication_tests.replication import Harness
from pg_replication_tests.test_backfill import _table
from pg_replication_tests.test_exactly_once import ROOT, converge, crash_or_drain, create_writers_table

PAGE = 8192


def test_plan_cuts_partitions_into_short_slices(pg, pg_url):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, pad text)")
    pg.execute("INSERT INTO t SELECT i, repeat('y', 200) FROM generate_series(1, 5000) i")
    table = _table(pg_url, "t")
    with connect(pg_url) as conn:
        assert block_size(conn) == PAGE
        pages = relation_pages(conn, "public", "t")
        plan = make_plan(conn, table, 3, "0/0", max_bytes=10 * PAGE)
    assert plan.partitions == 3 and len(plan.slices) >= pages // 10
    assert list(plan.owners) == sorted(plan.owners) and set(plan.owners) == {0, 1, 2}
    sizes = [sum((s.end if s.end is not None else pages) - s.start for s in sl) for sl in plan.slices]
    assert max(sizes) <= 10 and sum(sizes) == pages
    segments = [s for sl in plan.slices for s in sl]
    assert segments[0].start == 0 and segments[-1].end is None
    assert all(s.end is not None for s in segments[:-1])
    for a, b in zip(segments, segments[1:]):
        assert a.end == b.start
    # Stored and read back, the plan is the same (older plans without owners: one slice each).
    from pg_replication.source.snapshot import BackfillPlan

    assert BackfillPlan.from_json(plan.to_json()) == plan
    old = BackfillPlan("0/0", plan.slices[:2])
    assert BackfillPlan.from_json(old.to_json()).partitions == 2 and old.slices_of(1) == [1]


def test_between_slices_no_snapshot_outlives_its_slice(pg, pg_url, target):
    """Between two slices the backfill holds no snapshot, or (into a warehouse it writes alone)
    only the next slice's, opened once the slice before was read: each is newer than the last,
    so the source's xmin horizon moves on at every slice."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, pad text)")
    pg.execute("CREATE TABLE tick (n int)")
    pg.execute("INSERT INTO t SELECT i, repeat('x', 300) FROM generate_series(1, 3000) i")
    table = _table(pg_url, "t")
    held: list[set[int]] = []

    def between() -> None:  # the horizons our sessions pin with a snapshot, then a new xid
        held.append(_snapshots_held(pg))
        pg.execute("INSERT INTO tick VALUES (1)")  # a later snapshot has a later horizon

    with target.open() as wh:
        result = run_backfill(pg_url, wh, table, range(2), partitions=2, max_snapshot_bytes=16 * PAGE, between_slices=between)
        early = wh.sole_writer
    assert result.snapshots >= 6 and len(held) == result.snapshots - 1
    if early:
        assert all(len(h) == 1 for h in held), held  # the next slice's, and nothing else
        horizons = [h.pop() for h in held]
        assert horizons == sorted(set(horizons)), horizons  # a new one at every slice
    else:
        assert held == [set()] * len(held)
    wait_for(lambda: not _snapshots_held(pg), "the backfill's sessions to hold no snapshot", 60)
    assert sorted(target.rows(table, ["id", "pad"])) == sorted(pg.execute("SELECT id, pad FROM t").fetchall())


def test_a_failed_backfill_leaves_no_snapshot_open(pg, pg_url, duckdb_path):
    """A slice the warehouse refuses ends the backfill with no snapshot left on the source (not
    even the next slice's, opened early), and the slices before it stay copied."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, at timestamp, pad text)")
    pg.execute(
        "INSERT INTO t SELECT i, CASE WHEN i = 1500 THEN '294270-01-01' ELSE '2024-01-01' END::timestamp, "
        "repeat('x', 300) FROM generate_series(1, 3000) i"
    )
    table = _table(pg_url, "t")
    with duckdb.connect(str(duckdb_path)) as conn:
        wh = DuckDBWarehouse(conn)
        with pytest.raises(WarehouseError, match="294270"):
            run_backfill(pg_url, wh, table, range(2), partitions=2, max_snapshot_bytes=16 * PAGE)
        assert 0 in wh.load_state(table).slices_done
    # A connection closed in a failure ends its backend a moment later; one left open never does.
    wait_for(lambda: not _snapshots_held(pg), "the failed backfill's sessions to hold no snapshot", 60)


def _snapshots_held(pg) -> set[int]:
    """The xmin horizons other sessions of the test database pin with a snapshot."""
    return {
        int(xmin)
        for (xmin,) in pg.execute(
            "SELECT backend_xmin::text FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_xmin IS NOT NULL AND backend_type = 'client backend'"
        )
    }


CRASHING_BACKFILL = """
import sys
from pg_replication_tests.replication import Harness
from pg_replication_tests.targets import from_spec
h = Harness(sys.argv[1], from_spec(sys.argv[2]), ["t"], partitions=4, slot=sys.argv[3], max_snapshot_bytes=int(sys.argv[4]))
h.backfill(slices=[int(sys.argv[5])])
"""


def backfill_killed_after_a_slice(h: Harness, partition: int) -> None:
    """Backfill ``partition`` in another process, killed right after its first slice commits."""
    env = {**os.environ, "PGR_FAILPOINT": "after_slice", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", CRASHING_BACKFILL, h.pg_url, h.target.spec(), h.settings.slot, str(h.max_snapshot_bytes), str(partition)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == -9, out.stderr[-2000:]


def test_short_slices_converge_under_concurrent_writes(pg, pg_url, duckdb_path):
    """On DuckDB alone (about two minutes, paced by the writer): the slices are the same for
    every warehouse, test_exactly_once covers each warehouse with one slice per partition."""
    create_writers_table(pg)
    h = Harness(pg_url, duckdb_path, ["t"], partitions=4, max_snapshot_bytes=8 * PAGE)

    # The plan first, on the whole table: a writer already past its TRUNCATE would leave
    # partitions too small to need a second slice.
    h.backfill(slices=[2])

    def interleave():
        h.drain(max_changes=500)
        backfill_killed_after_a_slice(h, 0)  # a kill between two slices of partition 0; its re-run copies it all
        with h.target.open() as wh:
            state = wh.load_state(h.table("t"))
        first, *rest = state.plan.slices_of(0)
        assert rest and first in state.slices_done and not set(rest) & state.slices_done
        h.drain(max_changes=500)
        h.backfill(slices=[0])
        crash_or_drain(h, "mid_apply")
        h.backfill(slices=[3, 1])  # completes the backfill: the log is replayed
        h.drain()
        with h.target.open() as wh:
            state = wh.load_state(h.table("t"))
        assert len(state.plan.slices) > 4 and state.status == "streaming"
        h.backfill(slices=[1])  # a partition re-run, slice by slice, while CDC is live
        crash_or_drain(h, "after_read")

    converge(pg, h, interleave)


@pytest.mark.parametrize("value, expected", [("1 GiB", 1 << 30), ("64MiB", 64 << 20), (8192, 8192), ("2 GB", 2 * 10**9)])
def test_snapshot_size_in_replication_yaml(value, expected):
    config = parse_config({"tables": ["t"], "backfill": {"max_snapshot_bytes": value}})
    assert config.backfill.max_snapshot_bytes == expected
    assert parse_config({"tables": ["t"]}).backfill.max_snapshot_bytes == 1 << 30


@pytest.mark.parametrize("value", [100, "1 Gib", "lots", True])
def test_bad_snapshot_size_names_the_key(value):
    with pytest.raises(ConfigError) as err:
        parse_config({"tables": ["t"], "backfill": {"max_snapshot_bytes": value}})
    assert "backfill.max_snapshot_bytes" in str(err.value)


def test_a_slice_read_before_a_drain_restarted_the_backfill_is_not_recorded(pg, pg_url, target):
    """A drain between two slices that sends the table back to backfilling (a gap in its stream:
    restart_if_gap drops its rows, plan and slices) leaves the rest of the run without a plan: its
    next slice fails naming the restart instead of recording itself under no plan, which would make
    the next backfill count it as copied."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, pad text)")
    pg.execute("INSERT INTO t SELECT i, repeat('x', 300) FROM generate_series(1, 3000) i")
    table = _table(pg_url, "t")
    with target.open() as wh:

        def restart_as_a_drain_would() -> None:
            wh.reset_table(table)

        with pytest.raises(BackfillRestartedError, match="backfill restarted"):
            run_backfill(pg_url, wh, table, range(2), partitions=2, max_snapshot_bytes=16 * PAGE, between_slices=restart_as_a_drain_would)
        assert wh.load_state(table).slices_done == set() and wh.load_state(table).plan is None
