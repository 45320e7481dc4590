"""Progress never moves backwards: the drained position is compare-and-set, a backfill plan is
created once when runs race, and a slice re-run while its table streams never overwrites a change
applied after its snapshot.

The races are made deterministic by letting the competing run happen at the worst moment: a
warehouse wrapper runs it just before this run's write. Both runs use the real engine, source and
warehouse.
"""

from __future__ import annotations

import itertools
import threading

import pytest

from pg_replication.replicate.backfill import SlotSettings, run_backfill
from pg_replication.replicate.cdc import drain_once
from pg_replication.errors import ConcurrentDrainError
from pg_replication.source.connection import connect
from pg_replication.source.snapshot import make_plan
from pg_replication_tests.replication import Harness


class OtherRunFirst:
    """The warehouse, with ``other()`` run just before the named write method (for a slice:
    after its first batch was read, so its snapshot certainly precedes the other run; for
    ``drained_lsn``, just after this run read its position)."""

    def __init__(self, warehouse, method: str, other) -> None:
        self._warehouse, self._method, self._other = warehouse, method, other

    def __getattr__(self, name: str):
        attr = getattr(self._warehouse, name)
        if name != self._method:
            return attr

        def first_the_other_run(*args, **kwargs):
            if name == "write_slice":
                batches = iter(args[2])
                first = next(batches)
                args = (args[0], args[1], itertools.chain([first], batches), *args[3:])
            if name == "drained_lsn":
                result = attr(*args, **kwargs)
                self._other()
                return result
            self._other()
            return attr(*args, **kwargs)

        return first_the_other_run


@pytest.fixture
def counters(pg, pg_url, target):
    pg.execute("CREATE TABLE counters (id int PRIMARY KEY, n int)")
    pg.execute("INSERT INTO counters SELECT i, 0 FROM generate_series(1, 100) i")
    h = Harness(pg_url, target, ["counters"], partitions=2, slot="pgr_progress")
    h.backfill()
    h.drain_all()
    return h


def test_a_drain_that_lost_the_race_applies_nothing(counters, pg):
    pg.execute("UPDATE counters SET n = 1 WHERE id = 1")

    def newer_drain():  # reads the first change and a later one, and commits first
        pg.execute("UPDATE counters SET n = 2 WHERE id = 1")
        counters.drain_all()

    # A drain holds the slot's stream from its read to its commit, so the other drain can only
    # run between this one reading its position and opening its stream.
    with counters.target.open() as wh:
        with pytest.raises(ConcurrentDrainError):
            drain_once(counters.pg_url, OtherRunFirst(wh, "drained_lsn", newer_drain), counters.tables, counters.settings)
    counters.drain_all()
    counters.assert_equal(pg, "counters")
    assert counters.warehouse_rows("counters")[0] == (1, 2)


def test_slice_rerun_never_overwrites_a_newer_change(counters, pg):
    def drain_after_the_snapshot():  # the re-run's reader holds its snapshot already
        pg.execute("UPDATE counters SET n = 99 WHERE id = 1")
        counters.drain_all()

    with counters.target.open() as wh:
        run_backfill(
            counters.pg_url, OtherRunFirst(wh, "write_slice", drain_after_the_snapshot), counters.table("counters"), [1],
            partitions=2, cdc=SlotSettings(counters.settings.slot, counters.settings.publication),
        )
    counters.drain_all()
    counters.assert_equal(pg, "counters")
    with counters.target.open() as wh:
        assert wh.statuses()["public.counters"][0] == "streaming"


def test_racing_planners_store_one_plan(pg, pg_url, target):
    if target.kind != "postgres":
        pytest.skip("runs need concurrent writers: the Postgres replica takes them")
    pg.execute("CREATE TABLE planned (id int PRIMARY KEY)")
    pg.execute("INSERT INTO planned SELECT generate_series(1, 1000)")
    h = Harness(pg_url, target, ["planned"], slot="pgr_progress")
    table = h.table("planned")
    with target.open() as wh:
        wh.ensure_table(table)
    with connect(pg_url) as conn:
        plans = [make_plan(conn, table, 2 + i % 3, f"0/{i + 1:X}") for i in range(6)]
    start, got = threading.Barrier(len(plans)), []

    def plan_it(plan):
        with target.open() as wh:
            start.wait()
            got.append(wh.save_plan(table, plan))

    threads = [threading.Thread(target=plan_it, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    with target.open() as wh:
        stored = wh.load_state(table).plan
    assert len(got) == len(plans) and all(p == stored for p in got)


def test_two_slice_reruns_at_once_never_overwrite_a_newer_change(counters, pg):
    def the_other_rerun_completes_then_a_change_is_drained():
        counters.backfill(slices=[0])
        pg.execute("UPDATE counters SET n = 99 WHERE id = 1")
        counters.drain_all()

    with counters.target.open() as wh:
        run_backfill(
            counters.pg_url, OtherRunFirst(wh, "write_slice", the_other_rerun_completes_then_a_change_is_drained),
            counters.table("counters"), [1],
            partitions=2, cdc=SlotSettings(counters.settings.slot, counters.settings.publication),
        )
    counters.drain_all()
    counters.assert_equal(pg, "counters")
