"""CDC semantics on a real Postgres: every kind of change reaches every warehouse exactly."""

from __future__ import annotations

import pytest

from pg_replication_tests.replication import Harness


@pytest.fixture
def orders(pg, pg_url, target):
    pg.execute("CREATE TABLE orders (id int PRIMARY KEY, status text, amount numeric(10,2), note text)")
    pg.execute("INSERT INTO orders SELECT i, 'new', i * 1.5, NULL FROM generate_series(1, 1000) i")
    h = Harness(pg_url, target, ["orders"])
    h.backfill()
    return h


def test_insert_update_delete(orders, pg):
    pg.execute("INSERT INTO orders VALUES (1001, 'new', 1, 'x'), (1002, 'new', 2, NULL)")
    pg.execute("UPDATE orders SET status = 'paid', note = 'n' WHERE id % 10 = 0")
    pg.execute("UPDATE orders SET note = NULL WHERE id = 1001")
    pg.execute("DELETE FROM orders WHERE id % 7 = 0")
    (result,) = orders.drain_all()
    orders.assert_equal(pg, "orders")
    stats = result.tables["public.orders"].stats
    assert (stats.inserted, stats.updated, stats.deleted) == (2, 101, 143)
    assert result.tables["public.orders"].mode == "applied"
    counted = orders.target.kind not in ("postgres", "clickhouse")  # count(*) scans the table (a replica; FINAL): not per batch
    assert result.tables["public.orders"].rows_now == (1002 - 143 if counted else None)


def test_primary_key_change_and_reinsert(orders, pg):
    pg.execute("UPDATE orders SET id = id + 5000 WHERE id <= 10")
    pg.execute("UPDATE orders SET id = 1 WHERE id = 5001")  # back to an old key
    pg.execute("DELETE FROM orders WHERE id = 2")
    pg.execute("INSERT INTO orders VALUES (2, 'again', 0, NULL)")
    orders.drain_all()
    orders.assert_equal(pg, "orders")


def test_truncate_then_new_rows(orders, pg):
    pg.execute("TRUNCATE orders")
    pg.execute("INSERT INTO orders VALUES (1, 'after', 1, NULL)")
    orders.drain_all()
    orders.assert_equal(pg, "orders")
    assert len(orders.warehouse_rows("orders")) == 1


def test_many_changes_to_one_key_in_one_batch(orders, pg):
    for i in range(50):
        pg.execute("UPDATE orders SET amount = %s WHERE id = 1", (i,))
    pg.execute("DELETE FROM orders WHERE id = 1")
    pg.execute("INSERT INTO orders VALUES (1, 'back', 99, NULL)")
    orders.drain_all()
    orders.assert_equal(pg, "orders")


def test_bounded_batches_drain_everything_exactly_once(orders, pg):
    for i in range(30):
        pg.execute("UPDATE orders SET amount = amount + 1 WHERE id <= 20")
    results = orders.drain_all(max_changes=50)
    assert len(results) > 3
    orders.assert_equal(pg, "orders")


def test_unchanged_toast_keeps_the_value(pg, pg_url, target):
    pg.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, n int)")
    pg.execute("ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL")  # force out-of-line TOAST
    pg.execute("INSERT INTO docs SELECT i, repeat(md5(i::text), 5000), 0 FROM generate_series(1, 20) i")
    h = Harness(pg_url, target, ["docs"])
    h.backfill()
    pg.execute("UPDATE docs SET n = n + 1")  # body arrives as 'unchanged TOAST'
    pg.execute("UPDATE docs SET id = id + 100 WHERE id <= 5")  # key change with unchanged TOAST
    pg.execute("UPDATE docs SET n = 7 WHERE id = 106")
    h.drain_all()
    h.assert_equal(pg, "docs")


def test_unchanged_toast_for_a_row_inserted_in_the_same_batch(pg, pg_url, target):
    pg.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, n int)")
    pg.execute("ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL")
    h = Harness(pg_url, target, ["docs"])
    h.backfill()
    pg.execute("INSERT INTO docs SELECT i, repeat(md5(i::text), 5000), 0 FROM generate_series(1, 5) i")
    pg.execute("UPDATE docs SET n = 1")
    h.drain_all()
    h.assert_equal(pg, "docs")


def test_composite_key_and_replica_identity_full(pg, pg_url, target):
    pg.execute("CREATE TABLE lines (order_id int, line int, qty int, big text, PRIMARY KEY (order_id, line))")
    pg.execute("ALTER TABLE lines REPLICA IDENTITY FULL")
    pg.execute("INSERT INTO lines SELECT o, l, 1, repeat('z', 10000) FROM generate_series(1, 50) o, generate_series(1, 3) l")
    h = Harness(pg_url, target, ["lines"])
    h.backfill()
    pg.execute("UPDATE lines SET qty = qty + line WHERE order_id < 10")
    pg.execute("UPDATE lines SET line = line + 10 WHERE order_id = 20")
    pg.execute("DELETE FROM lines WHERE order_id = 30")
    h.drain_all()
    h.assert_equal(pg, "lines")


def test_nulls_stay_null(orders, pg):
    pg.execute("UPDATE orders SET status = NULL, amount = NULL, note = '' WHERE id < 5")
    orders.drain_all()
    orders.assert_equal(pg, "orders")
    assert orders.warehouse_rows("orders")[0] == (1, None, None, "")


def test_add_column_with_default_and_drop_column(orders, pg):
    pg.execute("ALTER TABLE orders ADD COLUMN priority int DEFAULT 3")
    pg.execute("UPDATE orders SET priority = 1 WHERE id = 1")
    pg.execute("INSERT INTO orders VALUES (5000, 'x', 1, NULL, 9)")
    orders.drain_all()
    orders.reload()
    orders.assert_equal(pg, "orders")
    pg.execute("ALTER TABLE orders DROP COLUMN note")
    pg.execute("INSERT INTO orders (id, status, amount, priority) VALUES (5001, 'y', 2, 2)")
    orders.drain_all()
    orders.reload()
    orders.assert_equal(pg, "orders")  # compares the columns the source still has
    assert "note" in orders.target.columns(orders.table("orders"))  # a dropped source column is kept (documented)


def test_alter_column_type_fails_that_table_only(pg, pg_url, target):
    pg.execute("CREATE TABLE a (id int PRIMARY KEY, v int)")
    pg.execute("CREATE TABLE b (id int PRIMARY KEY, v int)")
    h = Harness(pg_url, target, ["a", "b"])
    h.backfill()
    pg.execute("ALTER TABLE a ALTER COLUMN v TYPE text")
    pg.execute("INSERT INTO a VALUES (1, 'one')")
    pg.execute("INSERT INTO b VALUES (1, 1)")
    (result,) = h.drain_all()
    assert result.tables["public.a"].mode == "failed"
    assert "changed type" in result.tables["public.a"].error and "LSN" in result.tables["public.a"].error
    assert result.tables["public.b"].mode == "applied"
    h.assert_equal(pg, "b")
    pg.execute("INSERT INTO b VALUES (2, 2)")
    pg.execute("INSERT INTO a VALUES (2, 'two')")
    (result,) = h.drain_all()  # failed once: later drains hold its changes and fail nothing
    assert result.tables["public.a"].mode == "held" and result.tables["public.b"].mode == "applied"
    assert not result.failed
    h.assert_equal(pg, "b")


def test_warehouse_rejecting_a_value_fails_that_table_only(pg, pg_url, target):
    pg.execute("CREATE TABLE a (id int PRIMARY KEY, v numeric(6,2))")
    pg.execute("CREATE TABLE b (id int PRIMARY KEY)")
    h = Harness(pg_url, target, ["a", "b"])
    h.backfill()
    bad, named = "'NaN'", "NaN"  # DuckDB's DECIMAL and Snowflake's NUMBER have no NaN
    if target.kind == "postgres":  # a replica takes every Postgres value: make it refuse one
        with target.open() as wh:
            wh.execute(f"ALTER TABLE {wh.table_name(h.table('a'))} ADD CONSTRAINT small CHECK (v < 100)")
        bad, named = "500", "small"
    pg.execute(f"INSERT INTO a VALUES (1, {bad})")
    pg.execute("INSERT INTO b VALUES (1)")
    (result,) = h.drain_all()
    assert result.tables["public.a"].mode == "failed" and named in result.tables["public.a"].error
    h.assert_equal(pg, "b")


def test_changes_during_backfill_are_replayed(pg, pg_url, target):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO t SELECT i, 'v0' FROM generate_series(1, 3000) i")
    h = Harness(pg_url, target, ["t"])
    h.backfill(slices=[0])
    pg.execute("UPDATE t SET v = 'v1'")  # moves rows across pages, i.e. across slices
    pg.execute("DELETE FROM t WHERE id % 3 = 0")
    h.drain_all()  # logged: the backfill is not complete
    h.backfill(slices=[1])
    pg.execute("INSERT INTO t VALUES (9999, 'late')")
    h.drain_all()
    h.backfill(slices=[2])  # completes: replays the log
    h.drain_all()
    h.assert_equal(pg, "t")


def test_table_added_later_and_table_removed(orders, pg):
    pg.execute("CREATE TABLE extra (id int PRIMARY KEY, v int)")
    pg.execute("INSERT INTO extra SELECT i, i FROM generate_series(1, 100) i")
    orders.reload(["orders", "extra"])
    orders.drain_all()
    pg.execute("UPDATE extra SET v = -v WHERE id < 50")
    orders.backfill("extra")
    orders.drain_all()
    orders.assert_equal(pg, "extra")
    kept = orders.table("orders")
    orders.reload(["extra"])  # orders removed from the config: kept, no longer applied
    pg.execute("DELETE FROM orders WHERE id < 100")
    pg.execute("UPDATE extra SET v = 0")
    orders.drain_all()
    orders.assert_equal(pg, "extra")
    with orders.target.open(read_only=True) as wh:
        assert wh.row_count(kept) == 1000
    assert ("public", "orders") not in {(s, t) for s, t in pg.execute("SELECT schemaname, tablename FROM pg_publication_tables")}


def test_partitioned_table_streams_through_its_root(pg, pg_url, target):
    pg.execute("CREATE TABLE m (id int, day date, v int, PRIMARY KEY (id, day)) PARTITION BY RANGE (day)")
    pg.execute("CREATE TABLE m_a PARTITION OF m FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')")
    pg.execute("CREATE TABLE m_b PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    pg.execute("INSERT INTO m SELECT i, date '2024-06-01' + (i % 400), 0 FROM generate_series(1, 2000) i")
    h = Harness(pg_url, target, ["m"])
    h.backfill()
    pg.execute("UPDATE m SET v = 1 WHERE id % 10 = 0")
    pg.execute("UPDATE m SET day = day + 300 WHERE id % 7 = 0 AND day < date '2025-01-01'")  # moves rows between partitions
    pg.execute("DELETE FROM m WHERE id % 11 = 0")
    # (TRUNCATE of one partition is not sent by pgoutput when publishing via the root: see README.)
    (result,) = h.drain_all()
    assert set(result.tables) == {"public.m"}  # changes arrive under the root's name
    h.assert_equal(pg, "m")


def test_excluded_columns_never_leave_the_source(pg, pg_url, target):
    pg.execute("CREATE TABLE people (id int PRIMARY KEY, name text, ssn text)")
    pg.execute("INSERT INTO people SELECT i, 'n' || i, 'secret-' || i FROM generate_series(1, 100) i")
    h = Harness(pg_url, target, [{"name": "people", "exclude_columns": ["ssn"]}])
    h.backfill()
    pg.execute("UPDATE people SET name = 'x', ssn = 'secret-new' WHERE id < 10")
    pg.execute("INSERT INTO people VALUES (500, 'new', 'secret-500')")
    h.drain_all()
    h.assert_equal(pg, "people", ["id", "name"])
    published = pg.execute("SELECT attnames FROM pg_publication_tables WHERE tablename = 'people'").fetchone()[0]
    assert "ssn" not in published  # a publication column list: pgoutput never sends it
    with target.open(read_only=True) as wh:  # not in the table, not in a change log
        assert wh.fetchall("SELECT count(*) FROM information_schema.columns WHERE lower(column_name) = 'ssn'") == [(0,)]


def test_odd_identifiers_stream(pg, pg_url, target):
    pg.execute('CREATE SCHEMA "Ünï cödé"')
    pg.execute('CREATE TABLE "Ünï cödé"."we""ird; tab" ("Id ;" int PRIMARY KEY, "va""l" text)')
    pg.execute('INSERT INTO "Ünï cödé"."we""ird; tab" VALUES (1, \'a\'), (2, \'b\')')
    h = Harness(pg_url, target, ['"Ünï cödé"."we""ird; tab"'], partitions=2)
    h.backfill(slices=[0])  # changes while backfilling go through the change log, named after the table
    pg.execute('UPDATE "Ünï cödé"."we""ird; tab" SET "va""l" = \'; DROP TABLE x; --\' WHERE "Id ;" = 1')
    pg.execute('INSERT INTO "Ünï cödé"."we""ird; tab" VALUES (3, \'c\')')
    h.drain_all()
    h.backfill(slices=[1])
    pg.execute('DELETE FROM "Ünï cödé"."we""ird; tab" WHERE "Id ;" = 2')
    h.drain_all()
    h.assert_equal(pg, 'we"ird; tab')
