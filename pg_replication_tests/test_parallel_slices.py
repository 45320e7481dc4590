"""Parallel slices across runs (issue 12, part 5): where the warehouse takes parallel writers (the
Postgres replica), two runs copy two partitions of one table at the same time, and the table
ends equal to the source value by value.

Proves: both partitions' write transactions are open at once (each waits, after its first batch
is in the table, until the other has got as far: a slice that had to wait for the other's commit
never meets it), while rows moved between pages and were deleted after the plan; the backfill
then completes and streams. Again with each slice read by its real reader, as one binary COPY
into the table each, started together. The multi-run backfill itself is Dagster's (a run per
partition, `max_partitions_per_run: 1`, as many at once as the source pool admits: README,
Operations).
Leaves out: Snowflake (fakesnow runs in the test process on one DuckDB) and DuckDB (one writer).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pytest

from pg_replication.replicate.backfill import SlotSettings, run_backfill
from pg_replication_tests.replication import Harness
from pg_replication_tests.targets import make_target


@pytest.fixture
def replica(tmp_path, server_url):
    with make_target("postgres", tmp_path, server_url) as target:
        yield target


class Rendezvous:
    """The warehouse, but a slice's write waits at ``meet`` once its first batch is loaded."""

    def __init__(self, warehouse, meet: threading.Barrier) -> None:
        self.warehouse, self.meet = warehouse, meet

    def __getattr__(self, name: str):
        return getattr(self.warehouse, name)

    def write_slice(self, table, index, batches: Iterable[pa.RecordBatch], *args, **kwargs):
        def then_meet() -> Iterator[pa.RecordBatch]:
            met = False
            for batch in batches:
                yield batch
                if not met:
                    self.meet.wait(timeout=120)  # generous: a loaded machine, both runs must get here
                    met = True
            if not met:
                self.meet.wait(timeout=120)

        return self.warehouse.write_slice(table, index, then_meet(), *args, **kwargs)


@pytest.mark.parametrize("meet", [True, False], ids=["staged_batches_meet", "one_copy_each"])
def test_two_partitions_copy_at_once_into_the_replica(pg, pg_url, replica, meet):
    """``meet``: each slice's batches wait for the other's first (the staged path: a generator of
    batches is not a slice reader); otherwise each slice is one COPY into the table, started
    together."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v numeric(12,2), pad text, at timestamptz)")
    pg.execute(
        "INSERT INTO t SELECT i, i / 7.0, repeat('p', i % 300), timestamptz '2024-01-01' + i * interval '1 minute' "
        "FROM generate_series(1, 20000) i"
    )
    h = Harness(pg_url, replica, ["t"], partitions=3, slot="pgr_parallel")
    h.backfill(slices=[2])  # plans the table; the last partition is copied first, alone
    pg.execute("UPDATE t SET pad = pad || 'moved' WHERE id % 97 = 0")  # new versions on other pages
    pg.execute("DELETE FROM t WHERE id % 101 = 0")
    meeting, errors = threading.Barrier(2), []

    def copy(partition: int) -> None:
        try:
            with replica.open() as wh:
                run_backfill(
                    pg_url, Rendezvous(wh, meeting) if meet else wh, h.table("t"), [partition], partitions=3,
                    cdc=SlotSettings(h.settings.slot, h.settings.publication),
                )
        except BaseException as exc:  # reported below, after the other run ended too
            errors.append(exc)
            meeting.abort()

    runs = [threading.Thread(target=copy, args=(p,)) for p in (0, 1)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(600)
    assert not any(run.is_alive() for run in runs), "a run did not end within 600 s"
    assert not errors, errors
    h.drain_all()
    h.assert_equal(pg, "t")
    with replica.open() as wh:
        assert wh.statuses()["public.t"][0] == "streaming"


def test_a_process_with_many_open_files_copies_into_the_replica(pg, pg_url, replica):
    """A run worker or test process may hold more than 1024 descriptors, where select() cannot
    watch the replica's socket: the copy into the table must not depend on it."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 5000) i")
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        h = Harness(pg_url, replica, ["t"], partitions=2, slot="pgr_many_files")
        h.backfill()
    finally:
        for fd in held:
            os.close(fd)
    h.assert_equal(pg, "t")
