"""Schema changes followed exactly, decided from what the warehouse stored.

Every drain runs in a fresh process that loaded the code location after the DDL (``reload()``
here; ``dagster job execute`` in test_definitions.py), so what the process saw at load says
nothing about which columns are new to the warehouse. Proves: ADD COLUMN gives existing rows
Postgres's value (rows inserted earlier in the same batch included); a default no change event
carries fails the table loudly; widening type changes and renames are followed in place.
"""

from __future__ import annotations

import duckdb
import pytest

from pg_replication_tests import operator
from pg_replication_tests.operator import dagster_env, run_cli
from pg_replication_tests.replication import Harness


@pytest.fixture
def items(pg, pg_url, target):
    pg.execute("CREATE TABLE items (id int PRIMARY KEY, qty int, price numeric(8,2), code varchar(5), note text)")
    pg.execute("INSERT INTO items SELECT i, i, i * 1.25, 'c' || i % 100, 'n' FROM generate_series(1, 300) i")
    h = Harness(pg_url, target, ["items"])
    h.backfill()
    return h


def test_add_column_with_a_default_in_a_fresh_process(items, pg):
    pg.execute("INSERT INTO items VALUES (1001, 1, 1, 'a', 'before the DDL, same batch')")
    pg.execute("UPDATE items SET qty = -1 WHERE id = 2")
    pg.execute("ALTER TABLE items ADD COLUMN status text DEFAULT 'open', ADD COLUMN score int DEFAULT 7")
    pg.execute("INSERT INTO items (id, qty, status) VALUES (1002, 2, 'closed')")
    pg.execute("UPDATE items SET score = 1 WHERE id = 3")
    items.reload()  # the drain's process knows the new columns from its load
    items.drain_all()
    items.assert_equal(pg, "items")


def test_add_column_without_default_then_default_for_new_rows(items, pg):
    pg.execute("ALTER TABLE items ADD COLUMN tag text")
    pg.execute("UPDATE items SET qty = 9 WHERE id = 9")  # the drain learns of the column with a change
    items.drain_all()
    pg.execute("ALTER TABLE items ALTER COLUMN tag SET DEFAULT 'later'")
    pg.execute("INSERT INTO items (id, qty) VALUES (1003, 3)")
    items.reload()
    items.drain_all()
    items.assert_equal(pg, "items")


@pytest.mark.parametrize(
    "ddl",
    [
        "ALTER TABLE items ADD COLUMN r float8 DEFAULT random()",  # rewrites: no change events
        # Indistinguishable in the catalog from a rewrite after a constant default: refused too.
        "ALTER TABLE items ADD COLUMN r float8; ALTER TABLE items ALTER COLUMN r SET DEFAULT 1",
    ],
)
def test_volatile_default_fails_the_table_loudly(items, pg, ddl):
    pg.execute(ddl)
    pg.execute("UPDATE items SET qty = 0 WHERE id = 1")
    items.reload()
    (result,) = items.drain_all()
    outcome = result.tables["public.items"]
    assert outcome.mode == "failed"
    assert "'r'" in outcome.error and "volatile" in outcome.error
    with items.target.open() as wh:
        assert wh.statuses()["public.items"][0] == "failed"


@pytest.mark.parametrize("target", ["clickhouse"], indirect=True)
def test_a_key_column_widened_fails_the_table_on_clickhouse_naming_the_resync(items, pg):
    pg.execute("ALTER TABLE items ALTER COLUMN id TYPE bigint")
    pg.execute("INSERT INTO items VALUES (5000000000, 1, 1, 'k', 'n')")
    items.reload()
    (result,) = items.drain_all()
    outcome = result.tables["public.items"]
    assert outcome.mode == "failed" and "key column 'id'" in outcome.error and "sorting key" in outcome.error


def test_widening_type_changes_are_followed(items, pg):
    pg.execute("ALTER TABLE items ALTER COLUMN qty TYPE bigint, ALTER COLUMN price TYPE numeric(14,4)")
    pg.execute("ALTER TABLE items ALTER COLUMN code TYPE varchar(40)")
    pg.execute("UPDATE items SET qty = 5000000000, price = 1234567890.1234, code = repeat('z', 40) WHERE id = 1")
    items.reload()
    items.drain_all()
    items.assert_equal(pg, "items")
    pg.execute("ALTER TABLE items ALTER COLUMN code TYPE text")
    pg.execute("UPDATE items SET code = repeat('w', 100) WHERE id = 2")
    items.reload()
    items.drain_all()
    items.assert_equal(pg, "items")


def test_rename_is_followed(items, pg):
    pg.execute("ALTER TABLE items RENAME COLUMN note TO remark")
    pg.execute("UPDATE items SET remark = 'renamed' WHERE id <= 10")
    items.reload()
    items.drain_all()
    items.assert_equal(pg, "items")
    assert "note" not in items.target.columns(items.table("items"))


@pytest.mark.e2e
def test_toast_and_add_column_through_the_cli(pg, write_config, duckdb_path, tmp_path):
    """The paths users take, each step a fresh process: a slice, a key change that keeps an
    out-of-line value, a drain, the other slice, then ADD COLUMN with a default around inserts
    and a drain started after the DDL."""
    pg.execute("CREATE TABLE docs (id int PRIMARY KEY, blob text, pad text)")
    pg.execute("ALTER TABLE docs ALTER COLUMN blob SET STORAGE EXTERNAL")
    pg.execute("ALTER TABLE docs ALTER COLUMN pad SET STORAGE PLAIN")
    pg.execute("INSERT INTO docs SELECT i, repeat(md5(i::text), 100), repeat('p', 900) FROM generate_series(1, 200) i")
    write_config({"source": {"slot": "pgr_cli_schema", "publication": "pgr_cli_schema"}, "tables": ["docs"], "defaults": {"partitions": 2}})
    env = dagster_env(tmp_path)

    def run(args):
        out = run_cli(args, env, tmp_path)
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]

    run(operator.materialize("public/docs", "001...001"))
    pg.execute("UPDATE docs SET id = 1000 WHERE id = 2")
    run(operator.drain())
    run(operator.materialize("public/docs", "000...000"))
    pg.execute("INSERT INTO docs VALUES (2000, 'before the DDL', 'x')")
    pg.execute("ALTER TABLE docs ADD COLUMN status text DEFAULT 'open'")
    pg.execute("INSERT INTO docs VALUES (2001, 'after the DDL', 'y', 'closed')")
    run(operator.drain())
    with duckdb.connect(str(duckdb_path), read_only=True) as wh:
        got = wh.execute('SELECT id, blob, pad, status FROM "public"."docs" ORDER BY id').fetchall()
    assert got == pg.execute("SELECT id, blob, pad, status FROM docs ORDER BY id").fetchall()


def test_changes_before_a_rename_in_the_same_batch(items, pg):
    pg.execute("UPDATE items SET note = 'before' WHERE id <= 5")
    pg.execute("ALTER TABLE items RENAME COLUMN note TO remark")
    pg.execute("UPDATE items SET remark = 'after' WHERE id = 5")
    items.reload()
    items.drain_all()
    items.assert_equal(pg, "items")


def test_changes_before_a_rename_logged_during_the_backfill(pg, pg_url, target):
    pg.execute("CREATE TABLE items (id int PRIMARY KEY, note text)")
    pg.execute("INSERT INTO items SELECT i, 'n' FROM generate_series(1, 300) i")
    h = Harness(pg_url, target, ["items"], partitions=2)
    h.backfill(slices=[0])
    pg.execute("UPDATE items SET note = 'before' WHERE id % 7 = 0")
    h.drain_all()  # logged: the backfill is not complete
    pg.execute("ALTER TABLE items RENAME COLUMN note TO remark")
    pg.execute("UPDATE items SET remark = 'after' WHERE id = 14")
    h.reload()
    h.drain_all()
    h.backfill(slices=[1])
    h.drain_all()
    h.assert_equal(pg, "items")
