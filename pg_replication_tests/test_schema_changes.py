"""Schema changes followed exactly, decided from what the warehouse stored.

Every drain runs in a fresh process that loaded the code location after the DDL (``reload()``
here; ``dagster job execute`` in test_definitions.py), so what the process saw at load says
nothing about which columns are new to the warehouse. Proves: ADD COLUMN gives existing rows
Postgres's value (rows inserted earlier in the same batch included); a default no change event
carries fails the table loudly; widening type changes and renames are followed in place.
"""

from __future__ import annotations

import pytest

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
