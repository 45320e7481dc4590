"""Slot safety: bounded reads, idle sources do not pin WAL, lost or dropped slots and a warehouse
behind its slot are reported loudly, and the documented recovery (resync) works."""

from __future__ import annotations

import duckdb
import psycopg
import pytest

from pg_replication.replicate.cdc import StateBehindSlotError
from pg_replication.replicate.operations import drop_slot, resync_table
from pg_replication.source.pgoutput import lsn_to_int
from pg_replication.source.slot import SlotLostError, SlotMissingError
from pg_replication.warehouse.duckdb import DuckDBWarehouse
from pg_replication_tests.replication import Harness


@pytest.fixture
def h(pg, pg_url, duckdb_path):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    pg.execute("CREATE TABLE busy (id serial PRIMARY KEY, v int)")  # not replicated
    pg.execute("INSERT INTO t SELECT i, i FROM generate_series(1, 100) i")
    harness = Harness(pg_url, duckdb_path, ["t"])
    harness.backfill()
    harness.drain_all()
    return harness


def _confirmed(pg, slot) -> int:
    return lsn_to_int(pg.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()[0])


def test_idle_published_tables_do_not_pin_wal(h, pg):
    before = _confirmed(pg, h.settings.slot)
    pg.execute("INSERT INTO busy (v) SELECT generate_series(1, 5000)")
    flushed = lsn_to_int(pg.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0])
    (result,) = h.drain_all()
    assert result.changes == 0
    assert _confirmed(pg, h.settings.slot) >= flushed > before


def test_every_read_is_bounded(h, pg):
    pg.execute("INSERT INTO t SELECT i, i FROM generate_series(1000, 1999) i")  # one transaction of 1000
    for i in range(20):
        pg.execute("UPDATE t SET v = v + 1 WHERE id = %s", (i + 1,))
    results = h.drain_all(max_changes=5)
    assert all(r.changes <= 1000 for r in results)  # whole transactions, never more than one past the bound
    assert len(results) >= 5
    h.assert_equal(pg, "t")


def test_dropped_slot_is_reported_and_resync_recovers(h, pg, duckdb_path):
    pg.execute("SELECT pg_drop_replication_slot(%s)", (h.settings.slot,))
    pg.execute("UPDATE t SET v = -v")
    with pytest.raises(SlotMissingError) as err:
        h.drain()
    assert "does not exist" in str(err.value) and "resync" in str(err.value).lower()
    with duckdb.connect(str(duckdb_path)) as conn:
        wh = DuckDBWarehouse(conn)
        drop_slot(h.pg_url, wh, h.settings.slot)
        resync_table(wh, h.table("t"))
    h.backfill()
    pg.execute("INSERT INTO t VALUES (5000, 1)")
    h.drain_all()
    h.assert_equal(pg, "t")


def test_slot_recreated_behind_the_warehouse_is_refused(h, pg):
    pg.execute("SELECT pg_drop_replication_slot(%s)", (h.settings.slot,))
    pg.execute("UPDATE t SET v = 0")  # lost: no slot saw it
    pg.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (h.settings.slot,))
    with pytest.raises(StateBehindSlotError) as err:
        h.drain()
    assert "Resync" in str(err.value)


def test_lost_slot_is_reported(h, pg, server_url):
    with psycopg.connect(server_url, autocommit=True) as admin:
        others = admin.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE slot_name <> %s", (h.settings.slot,)
        ).fetchall()
        if others:  # max_slot_wal_keep_size is server-wide: it would invalidate them too
            pytest.skip(f"other replication slots on this server ({', '.join(s for (s,) in others)}) would be lost")
        admin.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        admin.execute("SELECT pg_reload_conf()")
        try:
            for _ in range(6):
                pg.execute("INSERT INTO busy (v) SELECT generate_series(1, 2000)")
                pg.execute("SELECT pg_switch_wal()")
            pg.execute("CHECKPOINT")
            status = pg.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (h.settings.slot,)).fetchone()[0]
        finally:
            admin.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            admin.execute("SELECT pg_reload_conf()")
    assert status == "lost"
    with pytest.raises(SlotLostError) as err:
        h.drain()
    assert "max_slot_wal_keep_size" in str(err.value)


def test_least_privilege_role_from_the_script(pg, pg_url, duckdb_path):
    """scripts/source-role.sql: a REPLICATION role that only reads, with a publication its
    owner created for the whole schema. Backfill and CDC work without altering it."""
    from pathlib import Path

    import subprocess

    script = Path(__file__).resolve().parent.parent / "scripts" / "source-role.sql"
    pg.execute("CREATE SCHEMA app")
    pg.execute("CREATE TABLE app.t (id int PRIMARY KEY, v text)")
    pg.execute("CREATE TABLE app.other (id int PRIMARY KEY)")  # published by the script, not replicated
    pg.execute("INSERT INTO app.t SELECT i, 'x' FROM generate_series(1, 100) i")
    try:
        subprocess.run(
            ["psql", pg_url, "-q", "-v", "ON_ERROR_STOP=1", "-v", "password='pw'", "-v", "schema=app",
             "-v", "publication=pgr_test_pub", "-f", str(script)],
            check=True, capture_output=True, text=True,
        )
        params = psycopg.conninfo.conninfo_to_dict(pg_url)
        role_url = psycopg.conninfo.make_conninfo(**{**params, "user": "replicator", "password": "pw"})
        h = Harness(role_url, duckdb_path, ["app.t"])
        h.backfill()
        pg.execute("UPDATE app.t SET v = 'y' WHERE id < 10")
        pg.execute("INSERT INTO app.other VALUES (1)")
        h.drain_all()
        h.assert_equal(pg, "t")
    finally:
        for (slot,) in pg.execute("SELECT slot_name FROM pg_replication_slots WHERE database = current_database()").fetchall():
            pg.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        pg.execute("DROP PUBLICATION IF EXISTS pgr_test_pub")
        pg.execute("DROP OWNED BY replicator")
        pg.execute("DROP ROLE IF EXISTS replicator")
