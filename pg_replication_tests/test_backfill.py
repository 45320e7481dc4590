"""Backfill slices, on every warehouse: together they copy every row exactly once; each one re-runs alone."""

from __future__ import annotations

import duckdb
import psycopg
import pyarrow as pa
import pytest

from pg_replication.replicate.backfill import run_backfill
from pg_replication.config import parse_config
from pg_replication.errors import PlanMismatchError
from pg_replication.source.catalog import introspect
from pg_replication.source.connection import connect
from pg_replication.source.binary_copy import read_columns, staged_schema
from pg_replication.source.snapshot import FRESH_COLUMN, BackfillPlan, SliceReader, column_mappings, fresh_horizon, make_plan
from pg_replication.warehouse.base import SLICE_COLUMN
from pg_replication.warehouse.duckdb import DuckDBWarehouse


def _table(pg_url, entry):
    with connect(pg_url) as conn:
        (table,) = introspect(conn, parse_config({"tables": [entry]}))
    return table


def _warehouse_rows(target, table, columns):
    return sorted(target.rows(table, columns))


@pytest.mark.parametrize("partitions", [1, 3, 7, 64])
def test_slices_cover_every_row_once(pg, pg_url, target, partitions):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, pad text)")
    pg.execute("INSERT INTO t SELECT i, repeat('x', i % 300) FROM generate_series(1, 20000) i")
    pg.execute("DELETE FROM t WHERE id % 7 = 0")  # holes in pages
    table = _table(pg_url, "t")
    with target.open() as wh:
        result = run_backfill(pg_url, wh, table, range(partitions), partitions=partitions, readers=2)
        done = wh.load_state(table).slices_done
    source = sorted(pg.execute("SELECT id, pad FROM t").fetchall())
    assert _warehouse_rows(target, table, ["id", "pad"]) == source
    assert result.rows == len(source)
    assert done == frozenset(range(partitions))


def test_plan_segments_do_not_overlap_and_last_is_open(pg, pg_url):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, pad text)")
    pg.execute("INSERT INTO t SELECT i, repeat('y', 200) FROM generate_series(1, 5000) i")
    table = _table(pg_url, "t")
    with connect(pg_url) as conn:
        plan = make_plan(conn, table, 5, "0/0")
    segments = [s for sl in plan.slices for s in sl]
    assert segments[0].start == 0 and segments[-1].end is None
    for a, b in zip(segments, segments[1:]):
        assert a.end == b.start


def test_rows_added_after_planning_land_in_the_last_slice(pg, pg_url, target):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, pad text)")
    pg.execute("INSERT INTO t SELECT i, repeat('z', 100) FROM generate_series(1, 3000) i")
    table = _table(pg_url, "t")
    with target.open() as wh:
        run_backfill(pg_url, wh, table, [0], partitions=3)
        pg.execute("INSERT INTO t SELECT i, repeat('z', 100) FROM generate_series(3001, 9000) i")
        run_backfill(pg_url, wh, table, [1, 2], partitions=3)
    assert len(_warehouse_rows(target, table, ["id"])) == 9000


def test_rerun_slice_replaces_exactly_its_rows(pg, pg_url, target):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO t SELECT i, 'old' FROM generate_series(1, 6000) i")
    table = _table(pg_url, "t")
    with target.open() as wh:
        run_backfill(pg_url, wh, table, range(3), partitions=3)
        slice_ids = {r[0] for r in wh.fetchall(f"SELECT id FROM {wh.table_name(table)} WHERE {wh.ident(SLICE_COLUMN)} = 1")}
        assert slice_ids
        # Change rows everywhere, delete one row of slice 1, then re-run slice 1 alone.
        pg.execute("UPDATE t SET v = 'new'")
        victim = min(slice_ids)
        pg.execute("DELETE FROM t WHERE id = %s", (victim,))
        run_backfill(pg_url, wh, table, [1], partitions=3)
        rows = dict(wh.fetchall(f"SELECT id, v FROM {wh.table_name(table)}"))
    # The update moved rows to new pages (other slices): they stay, with the value the warehouse
    # had, until CDC or their new slice brings the change. The deleted row is gone.
    assert victim not in rows
    assert len(rows) == 5999
    now_in_slice = {r[0] for r in pg.execute("SELECT id FROM t").fetchall()}
    assert {i for i, v in rows.items() if v == "new"} <= now_in_slice


def test_row_moved_into_a_slice_not_yet_copied_is_stored_once(pg, pg_url, target):
    """A slice's first copy into an empty table evicts nothing; a later slice that finds a row
    an update moved to its pages from a copied slice replaces that row (one row per key)."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text) WITH (fillfactor = 100)")
    pg.execute("INSERT INTO t SELECT i, 'old' FROM generate_series(1, 6000) i")
    table = _table(pg_url, "t")
    with target.open() as wh:
        run_backfill(pg_url, wh, table, [0], partitions=3)
        moved = min(r[0] for r in wh.fetchall(f"SELECT id FROM {wh.table_name(table)}"))
        # Full pages: the new row version goes to the table's end, the last slice's pages.
        pg.execute("UPDATE t SET v = 'moved' WHERE id = %s", (moved,))
        assert pg.execute("SELECT (ctid::text::point)[0] > 0 FROM t WHERE id = %s", (moved,)).fetchone()[0]
        run_backfill(pg_url, wh, table, [1, 2], partitions=3)
    assert _warehouse_rows(target, table, ["id", "v"]) == sorted(pg.execute("SELECT id, v FROM t").fetchall())


def test_type_without_binary_io_keeps_the_text_path(pg, pg_url, target):
    """aclitem has no binary send/receive: the replica's binary copy cannot carry it, so that
    table travels as text (every warehouse gets its exact text)."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, acl aclitem, n numeric(12,2))")
    pg.execute("INSERT INTO t SELECT i, 'postgres=arwdDxt/postgres', i / 100.0 FROM generate_series(1, 300) i")
    table = _table(pg_url, "t")
    with target.open() as wh:
        run_backfill(pg_url, wh, table, range(2), partitions=2)
    rows = _warehouse_rows(target, table, ["id", "acl", "n"])
    assert [(i, str(a), n) for i, a, n in rows] == sorted(pg.execute("SELECT id, acl::text, n FROM t").fetchall())


def test_partitioned_table_backfills_all_leaves(pg, pg_url, target):
    pg.execute("CREATE TABLE m (id int, day date, PRIMARY KEY (id, day)) PARTITION BY RANGE (day)")
    pg.execute("CREATE TABLE m_a PARTITION OF m FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')")
    pg.execute("CREATE TABLE m_b PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    pg.execute("CREATE TABLE m_empty PARTITION OF m FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')")
    pg.execute("INSERT INTO m SELECT i, date '2024-01-01' + (i % 700) FROM generate_series(1, 10000) i")
    table = _table(pg_url, "m")
    with target.open() as wh:
        run_backfill(pg_url, wh, table, range(4), partitions=4)
    assert _warehouse_rows(target, table, ["id", "day"]) == sorted(pg.execute("SELECT id, day FROM m").fetchall())


def test_row_limit_for_trials(pg, pg_url, target):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    pg.execute("INSERT INTO t SELECT generate_series(1, 10000)")
    table = _table(pg_url, {"name": "t", "row_limit": 100})
    with target.open() as wh:
        result = run_backfill(pg_url, wh, table, range(2), partitions=2, row_limit=100)
    assert 0 < result.rows <= 100


def test_odd_identifiers_round_trip(pg, pg_url, target):
    pg.execute('CREATE SCHEMA "Ünï cödé"')
    pg.execute('CREATE TABLE "Ünï cödé"."we""ird; tab" ("Id ;" int PRIMARY KEY, "va""l" text, "SELECT" int)')
    pg.execute('INSERT INTO "Ünï cödé"."we""ird; tab" VALUES (1, \'a\', 2), (2, NULL, NULL)')
    table = _table(pg_url, '"Ünï cödé"."we""ird; tab"')
    with target.open() as wh:
        run_backfill(pg_url, wh, table, range(2), partitions=2)
    assert _warehouse_rows(target, table, ["Id ;", 'va"l', "SELECT"]) == [(1, "a", 2), (2, None, None)]


def test_changed_partition_count_is_refused(pg, pg_url, target):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    table = _table(pg_url, "t")
    with target.open() as wh:
        run_backfill(pg_url, wh, table, [0], partitions=2)
        with pytest.raises(PlanMismatchError, match="2 partitions"):
            run_backfill(pg_url, wh, table, [0], partitions=5)


def test_new_source_column_is_added(pg, pg_url, target):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    pg.execute("INSERT INTO t VALUES (1)")
    with target.open() as wh:
        run_backfill(pg_url, wh, _table(pg_url, "t"), [0], partitions=1)
        pg.execute("ALTER TABLE t ADD COLUMN note text DEFAULT 'hi'")
        run_backfill(pg_url, wh, _table(pg_url, "t"), [0], partitions=1)
    assert target.rows(_table(pg_url, "t"), ["id", "note"]) == [(1, "hi")]


def test_a_duckdb_slice_holds_a_few_batches_not_the_whole_slice(pg, pg_url, duckdb_path):
    """The memory a slice's copy takes in the warehouse process is that of the batches in flight,
    not of the slice: at 10M rows each slice kept hundreds of MiB until its commit."""
    pg.execute("CREATE TABLE wide (id int PRIMARY KEY, note text)")
    table = _table(pg_url, "wide")
    rows_per_batch, batches = 5_000, 40
    note = "x" * 400
    with duckdb.connect(str(duckdb_path)) as conn:
        wh = DuckDBWarehouse(conn)
        wh.ensure_table(table)
        schema = staged_schema(read_columns(column_mappings(table, wh.map_column)))
        pool, in_use = pa.default_memory_pool(), []

        def slice_batches():  # built in pyarrow's pool, so what is still held can be counted
            for b in range(batches):
                ids = pa.array(range(b * rows_per_batch, (b + 1) * rows_per_batch)).cast(schema.field("id").type)
                yield pa.record_batch([ids, pa.array([note] * rows_per_batch)], schema=schema)
                in_use.append(pool.bytes_allocated())

        batch_bytes = rows_per_batch * (len(note) + 8)
        wh.write_slice(table, 0, slice_batches())
        assert wh.row_count(table) == rows_per_batch * batches
    assert max(in_use) < 4 * batch_bytes, f"{max(in_use) / batch_bytes:.0f} batches held at once"


def test_a_slice_marks_the_rows_written_after_its_plan(pg, pg_url):
    """Only a row version written after the plan can repeat a key another slice copied: the reader
    marks those, so a slice's first copy evicts by their keys alone (and does nothing without
    any). A transaction still open when the plan was made counts as after it."""
    pg.execute("CREATE TABLE marked (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO marked SELECT i, 'old' FROM generate_series(1, 3000) i")
    table = _table(pg_url, "marked")
    with psycopg.connect(pg_url) as open_before_the_plan:
        open_before_the_plan.execute("INSERT INTO marked VALUES (6000, 'open at the plan')")
        with connect(pg_url) as conn:
            plan = make_plan(conn, table, 1, "0/0", fresh_before=fresh_horizon(conn, table))
        open_before_the_plan.commit()
    pg.execute("UPDATE marked SET v = 'new' WHERE id % 500 = 0")
    pg.execute("INSERT INTO marked VALUES (5000, 'inserted')")
    reader = SliceReader(pg_url, table, plan.slices[0], plan=plan, mark_fresh=True)
    try:
        marks = {i: fresh for b in reader for i, fresh in zip(b.column("id").to_pylist(), b.column(FRESH_COLUMN).to_pylist())}
    finally:
        reader.close()
    assert len(marks) == 3002
    assert {i for i, fresh in marks.items() if fresh} == {500, 1000, 1500, 2000, 2500, 3000, 5000, 6000}
    assert BackfillPlan.from_json(plan.to_json()) == plan  # stored with the plan
