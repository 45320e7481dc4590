"""Strategy triggers on a real Postgres and every warehouse: capture, drain, convergence."""

from __future__ import annotations

import os

import psycopg
import pytest
from psycopg import sql

from pg_replication.replicate.capture import CaptureSettings, drain_captured
from pg_replication.errors import SourceNotReadyError
from pg_replication.source.connection import connect
from pg_replication.source.triggers import install, uninstall
from pg_replication_tests.replication import Harness
from pg_replication_tests.test_exactly_once import converge, create_writers_table


class CaptureHarness(Harness):
    """The CDC harness, draining the change table instead of a slot."""

    def __init__(self, pg_url, target, names, partitions=3):
        super().__init__(pg_url, target, [{"name": n, "strategy": "triggers"} for n in names], partitions, slot="unused")
        with connect(pg_url) as conn:
            install(conn, self.tables)

    def drain(self, max_changes: int = 100_000):
        with self.target.open() as wh:
            return drain_captured(self.pg_url, wh, self.tables, CaptureSettings(max_changes=max_changes))

    def drain_all(self, limit: int = 100, **overrides):
        results = [self.drain(**overrides)]
        while not results[-1].caught_up:
            assert len(results) < limit, "the change table did not drain"
            results.append(self.drain(**overrides))
        return results


def test_every_kind_of_change_arrives(pg, pg_url, target):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text, n numeric(8,2), at timestamptz)")
    pg.execute("INSERT INTO t SELECT i, 'v' || i, i / 3.0, now() FROM generate_series(1, 500) i")
    h = CaptureHarness(pg_url, target, ["t"])
    h.backfill()
    pg.execute("INSERT INTO t VALUES (1000, 'new', 1.5, NULL)")
    pg.execute("UPDATE t SET v = 'upd', at = '2020-02-29 12:00:00.123456+03' WHERE id % 10 = 0")
    pg.execute("UPDATE t SET id = id + 5000 WHERE id BETWEEN 1 AND 5")  # key changes
    pg.execute("DELETE FROM t WHERE id % 7 = 0")
    (result,) = h.drain_all()
    outcome = result.tables["public.t"]
    # 72 deletes, and 5 old keys gone by key changes (a trigger sees those as deletes)
    assert outcome.mode == "applied" and (outcome.stats.inserted, outcome.stats.deleted) == (1, 77)
    h.assert_equal(pg, "t")
    pg.execute("TRUNCATE t")
    pg.execute("INSERT INTO t VALUES (1, 'after truncate', 0, NULL)")
    h.drain_all()
    h.assert_equal(pg, "t")
    assert pg.execute("SELECT count(*) FROM _pg_replication_capture.changes").fetchone() == (0,)  # applied rows are deleted


def test_changes_during_the_backfill_wait_in_the_log(pg, pg_url, target):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO t SELECT i, 'v0' FROM generate_series(1, 3000) i")
    h = CaptureHarness(pg_url, target, ["t"])
    h.backfill(slices=[0])
    pg.execute("UPDATE t SET v = 'v1' WHERE id % 2 = 0")
    pg.execute("DELETE FROM t WHERE id % 5 = 0")
    # ClickHouse applies them at once, versioned above the slices (README, ClickHouse)
    assert h.drain().tables["public.t"].mode == ("applied" if target.kind == "clickhouse" else "logged")
    h.backfill(slices=[1, 2])  # completes: the log is replayed
    h.drain_all()
    h.assert_equal(pg, "t")


def test_backfill_refuses_a_table_whose_changes_are_not_captured(pg, pg_url, target):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)")
    h = Harness(pg_url, target, [{"name": "t", "strategy": "triggers"}], slot="unused")
    with pytest.raises(SourceNotReadyError, match="install-triggers"):
        h.backfill()


@pytest.mark.parametrize("target", ["duckdb"], indirect=True)
def test_uninstall_removes_everything_and_a_least_privilege_role_drains(pg, pg_url, server_url, target):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO t VALUES (1, 'a')")
    role = f"pgr_reader_{os.getpid()}"
    pg.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
    pg.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        pg.execute(sql.SQL("GRANT SELECT ON t TO {}").format(sql.Identifier(role)))
        h = CaptureHarness(pg_url, target, ["t"])
        with connect(pg_url) as conn:
            install(conn, h.tables, grant_to=role)
        params = psycopg.conninfo.conninfo_to_dict(pg_url)
        h.pg_url = psycopg.conninfo.make_conninfo(**{**params, "user": role})  # no owner rights, no REPLICATION
        h.backfill()
        pg.execute("INSERT INTO t VALUES (2, 'b')")
        h.drain_all()
        h.assert_equal(pg, "t")
        with connect(pg_url) as conn:
            assert uninstall(conn) == ['"public"."t"']
        assert pg.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pg_replication%'").fetchone() == (0,)
        assert pg.execute("SELECT count(*) FROM pg_namespace WHERE nspname = '_pg_replication_capture'").fetchone() == (0,)
        pg.execute("INSERT INTO t VALUES (3, 'c')")  # writes still work without the triggers
    finally:
        pg.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        pg.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_convergence_under_concurrent_writes(pg, pg_url, target):
    create_writers_table(pg)
    h = CaptureHarness(pg_url, target, ["t"], partitions=4)

    def interleave():
        h.backfill(slices=[2])
        h.drain(max_changes=500)
        h.backfill(slices=[0, 3])
        h.drain(max_changes=2000)
        h.backfill(slices=[1])  # completes the backfill: the log is replayed
        h.drain()
        h.backfill(slices=[2])  # a partition re-run while capture is live

    converge(pg, h, interleave)


@pytest.mark.parametrize("target", ["duckdb", "clickhouse"], indirect=True)
def test_a_table_that_cannot_be_read_keeps_its_changes_and_stops_only_itself(pg, pg_url, target):
    for name in ("a", "b"):
        pg.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
    h = CaptureHarness(pg_url, target, ["a", "b"])
    h.backfill()
    pg.execute("INSERT INTO a VALUES (1, 'x')")
    pg.execute("INSERT INTO b VALUES (1, 'y')")
    pg.execute("ALTER TABLE b DROP CONSTRAINT b_pkey")  # its changes can no longer be matched
    (result,) = h.drain_all()
    assert result.tables["public.a"].mode == "applied"
    assert result.tables["public.b"].mode == "failed" and "primary key" in result.tables["public.b"].error
    h.assert_equal(pg, "a")
    waiting = pg.execute("SELECT table_name FROM _pg_replication_capture.changes").fetchall()
    assert waiting == [("b",)]
