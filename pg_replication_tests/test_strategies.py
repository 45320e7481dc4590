"""The query strategies on a real Postgres and every warehouse: append, updated_at, reload."""

from __future__ import annotations

import threading
from datetime import date

import psycopg
import pytest

from pg_replication.replicate.strategies import sync_table
from pg_replication_tests.replication import Harness


def _sync(h: Harness, name: str, **kw):
    with h.target.open() as wh:
        return sync_table(h.pg_url, wh, h.table(name), **kw)


def test_append_copies_rows_past_the_largest_key_including_composite_text_keys(pg, pg_url, target):
    pg.execute("CREATE TABLE events (site text COLLATE \"C\", seq int, body text, PRIMARY KEY (site, seq))")
    pg.execute("INSERT INTO events SELECT 's' || (i % 3), i, 'b' FROM generate_series(1, 300) i")
    h = Harness(pg_url, target, [{"name": "events", "strategy": "append"}], slot="unused")
    h.backfill()
    pg.execute("INSERT INTO events VALUES ('s2', 1000, 'new'), ('s9', 1, 'new'), ('s0', 2000, 'new')")
    pg.execute("UPDATE events SET body = 'changed' WHERE seq = 3")  # append does not see updates
    result = _sync(h, "events")
    assert result.mode == "appended" and result.rows == 2  # ('s2', 1000) and ('s9', 1): after ('s2', 299)
    assert result.watermark.mark == ["s2", "299"] and result.watermark.candidate == ["s9", "1"]
    assert "several columns" in result.warning  # a composite key is not allocated in order: said so
    second = _sync(h, "events")  # nothing was running with the candidate: it becomes the floor
    assert second.rows == 2 and second.watermark.mark == ["s9", "1"]  # keys above the old floor, read again
    assert _sync(h, "events").rows == 0
    rows = dict(((s, q), b) for s, q, b in h.warehouse_rows("events"))
    assert rows[("s9", 1)] == "new" and ("s0", 2000) not in rows and rows[("s0", 3)] == "b"


def test_updated_at_upserts_changed_rows_with_a_look_back_window(pg, pg_url, target):
    pg.execute("CREATE TABLE items (id int PRIMARY KEY, v text, updated timestamptz NOT NULL)")
    pg.execute("INSERT INTO items SELECT i, 'v', '2026-01-01'::timestamptz + i * interval '1 s' FROM generate_series(1, 200) i")
    h = Harness(pg_url, target, [{"name": "items", "strategy": "updated_at", "cursor": "updated", "lookback": "1 hour"}], slot="unused")
    h.backfill()
    pg.execute("UPDATE items SET v = 'new', updated = '2026-01-02' WHERE id <= 5")
    pg.execute("INSERT INTO items VALUES (500, 'ins', '2026-01-02')")
    first = _sync(h, "items")
    assert first.mode == "upserted" and first.watermark.mark.startswith("2026-01-02 00:00:00")
    # A transaction that committed late, with a cursor value older than the watermark: the
    # look-back window catches it on the next sync.
    pg.execute("UPDATE items SET v = 'late', updated = '2026-01-01 23:30' WHERE id = 100")
    second = _sync(h, "items")
    assert second.rows >= 1
    h.assert_equal(pg, "items")


def test_reload_swaps_the_new_copy_in_and_catches_deletes_on_listed_days(pg, pg_url, target):
    pg.execute("CREATE TABLE dims (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO dims SELECT i, 'a' FROM generate_series(1, 100) i")
    h = Harness(pg_url, target, [{"name": "dims", "strategy": "reload", "reload_on": ["sun"]}], slot="unused")
    h.backfill()
    pg.execute("DELETE FROM dims WHERE id > 50")
    pg.execute("UPDATE dims SET v = 'b'")
    monday, sunday = date(2026, 11, 23), date(2026, 11, 22)
    assert _sync(h, "dims", today=monday).mode == "skipped"
    assert len(h.warehouse_rows("dims")) == 100
    assert _sync(h, "dims", today=sunday).mode == "reloaded"
    h.assert_equal(pg, "dims")
    assert _sync(h, "dims", today=sunday).mode == "skipped"  # once per listed day


@pytest.mark.parametrize("target", ["duckdb", "clickhouse"], indirect=True)
def test_a_periodic_reload_gives_updated_at_the_deletes_it_cannot_see(pg, pg_url, target):
    pg.execute("CREATE TABLE items (id int PRIMARY KEY, updated timestamptz NOT NULL DEFAULT now())")
    pg.execute("INSERT INTO items SELECT i FROM generate_series(1, 50) i")
    entry = {"name": "items", "strategy": "updated_at", "cursor": "updated", "reload_on": "1"}
    h = Harness(pg_url, target, [entry], slot="unused")
    h.backfill()
    pg.execute("DELETE FROM items WHERE id <= 10")
    assert _sync(h, "items", today=date(2026, 11, 22)).mode == "upserted"
    assert len(h.warehouse_rows("items")) == 50  # deletes are invisible to a cursor
    assert _sync(h, "items", today=date(2026, 12, 1)).mode == "reloaded"
    h.assert_equal(pg, "items")


def test_a_sync_before_the_backfill_completes_is_skipped(pg, pg_url, target):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    h = Harness(pg_url, target, [{"name": "t", "strategy": "append"}], slot="unused")
    result = _sync(h, "t")
    assert result.mode == "skipped" and "backfill" in result.reason


@pytest.mark.parametrize("allocate", ["insert", "nextval"])
def test_append_keeps_a_key_whose_transaction_commits_after_a_higher_key_was_copied(pg, pg_url, target, allocate):
    """A key taken by a long transaction (N), a higher key (N+1) committed and synced, then N
    commits: the next sync copies it. ``nextval``: the key is allocated before the transaction
    has a transaction id (a sequence hands out values without one), then inserted."""
    pg.execute("CREATE TABLE events (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, body text)")
    pg.execute("INSERT INTO events (body) SELECT 'old' FROM generate_series(1, 100)")
    h = Harness(pg_url, target, [{"name": "events", "strategy": "append"}], slot="unused")
    h.backfill()
    with psycopg.connect(pg_url) as slow:  # a transaction, not autocommit
        if allocate == "insert":
            n = slow.execute("INSERT INTO events (body) VALUES ('slow') RETURNING id").fetchone()[0]
        else:
            n = slow.execute("SELECT nextval(pg_get_serial_sequence('events', 'id'))").fetchone()[0]
        fast = pg.execute("INSERT INTO events (body) VALUES ('fast') RETURNING id").fetchone()[0]
        assert fast == n + 1
        assert _sync(h, "events").warning is None  # one column, from an identity: exact
        assert (fast, "fast") in h.warehouse_rows("events")
        if allocate == "nextval":
            slow.execute("INSERT INTO events VALUES (%s, 'slow')", (n,))
        slow.commit()
    _sync(h, "events")
    h.assert_equal(pg, "events")
    assert _sync(h, "events").mode == "appended"  # later syncs keep it
    h.assert_equal(pg, "events")


@pytest.mark.parametrize("target", ["duckdb", "clickhouse"], indirect=True)
def test_append_keeps_a_key_whose_transaction_is_open_across_the_backfill(pg, pg_url, target):
    pg.execute("CREATE TABLE events (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, body text)")
    pg.execute("INSERT INTO events (body) SELECT 'old' FROM generate_series(1, 100)")
    h = Harness(pg_url, target, [{"name": "events", "strategy": "append"}], slot="unused")
    with psycopg.connect(pg_url) as slow:
        slow.execute("INSERT INTO events (body) VALUES ('slow')")
        pg.execute("INSERT INTO events (body) VALUES ('fast')")
        backfill = threading.Thread(target=h.backfill)
        backfill.start()
        backfill.join(timeout=3)
        waited = backfill.is_alive()  # the plan waits for `slow`, which could commit a key below the mark
        slow.commit()
    backfill.join(timeout=300)
    assert waited and not backfill.is_alive()
    _sync(h, "events")
    _sync(h, "events")
    h.assert_equal(pg, "events")


def test_a_partition_copied_again_repairs_rows_syncs_wrote(pg, pg_url, target):
    """The operator's repair (a partition materialized again) wins over what earlier syncs wrote:
    a row fixed in the source without moving its cursor reaches the warehouse."""
    pg.execute("CREATE TABLE item (id int PRIMARY KEY, name text, updated timestamptz NOT NULL)")
    pg.execute("INSERT INTO item SELECT i, 'n', '2026-01-01' FROM generate_series(1, 20) i")
    h = Harness(pg_url, target, [{"name": "item", "strategy": "updated_at", "cursor": "updated", "lookback": "1 second"}], slot="unused")
    h.backfill()
    for name, day in (("a", "2026-01-02"), ("b", "2026-01-03")):
        pg.execute("UPDATE item SET name = %s, updated = %s WHERE id = 2", (name, day))
        assert _sync(h, "item").rows >= 1
    pg.execute("UPDATE item SET name = 'repaired'")  # the cursor does not move: syncs do not see it
    h.backfill("item")
    h.assert_equal(pg, "item")
