"""Tables that leave and re-enter the stream go back to backfilling, never `streaming` with a
gap (DESIGN 3.8, issue 10 point 7).

A table's stream is gap-free when every change of *its relation* after its plan position
reached the warehouse. Four ways it can silently stop doing so, each proven here:
- the relation is replaced (dropped and re-created, or another table renamed into its name):
  a new pg_class oid; the old rows and the new table's early changes are nowhere;
- the table is removed from replication.yaml and added back: drains in between skipped it;
- it leaves the publication and comes back: changes in between were never published;
- it is renamed away and back: changes made under the other name carry that name.
The first three restart its backfill with the reason in its status; the last follows the
relation by oid and keeps streaming.
"""

from __future__ import annotations

import json

import duckdb
import pytest

from pg_replication_tests import operator
from pg_replication_tests.operator import dagster_env, run_cli
from pg_replication_tests.replication import Harness



def _status(h: Harness, name: str) -> tuple[str, str | None]:
    with h.target.open(read_only=True) as wh:
        return wh.statuses()[f"public.{name}"]


def _streaming(pg, pg_url, target, tables=("t",)) -> Harness:
    for name in tables:
        pg.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
        pg.execute(f"INSERT INTO {name} SELECT i, 'v0' FROM generate_series(1, 2000) i")
    h = Harness(pg_url, target, list(tables))
    h.backfill()
    h.drain_all()
    assert _status(h, tables[0])[0] == "streaming"
    return h


def test_dropped_and_recreated_table_is_backfilled_again(pg, pg_url, target):
    h = _streaming(pg, pg_url, target)
    pg.execute("DROP TABLE t")
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO t SELECT i, 'new' FROM generate_series(1500, 2500) i")
    h.reload()
    pg.execute("UPDATE t SET v = 'newer' WHERE id % 10 = 0")
    h.drain_all()
    status, reason = _status(h, "t")
    assert status == "backfilling"
    assert "re-created" in reason
    h.backfill()
    h.drain_all()
    assert _status(h, "t") == ("streaming", None)
    h.assert_equal(pg, "t")


def test_table_removed_from_config_and_added_back_is_backfilled_again(pg, pg_url, target):
    h = _streaming(pg, pg_url, target, ("a", "t"))
    h.reload(["a"])
    pg.execute("UPDATE t SET v = 'while away' WHERE id <= 100")
    pg.execute("INSERT INTO a VALUES (9999, 'x')")
    h.drain_all()
    h.reload(["a", "t"])
    pg.execute("DELETE FROM t WHERE id > 1900")
    h.drain_all()
    status, reason = _status(h, "t")
    assert status == "backfilling"
    assert "without it" in reason
    assert _status(h, "a")[0] == "streaming"  # the other table is untouched
    h.backfill("t")
    h.drain_all()
    h.assert_equal(pg, "t")
    h.assert_equal(pg, "a")


def test_table_that_left_the_publication_is_backfilled_again(pg, pg_url, duckdb_path):
    h = _streaming(pg, pg_url, duckdb_path)
    pg.execute("ALTER PUBLICATION pgr_test_pub DROP TABLE t")
    pg.execute("UPDATE t SET v = 'unpublished' WHERE id <= 100")
    pg.execute("ALTER PUBLICATION pgr_test_pub ADD TABLE t")
    h.drain_all()
    status, reason = _status(h, "t")
    assert status == "backfilling" and "publication" in reason
    h.backfill()
    h.drain_all()
    h.assert_equal(pg, "t")


def test_renamed_away_and_back_keeps_streaming_without_a_gap(pg, pg_url, target):
    h = _streaming(pg, pg_url, target)
    pg.execute("ALTER TABLE t RENAME TO t_renamed")
    pg.execute("UPDATE t_renamed SET v = 'renamed' WHERE id <= 100")
    pg.execute("DELETE FROM t_renamed WHERE id > 1990")
    pg.execute("ALTER TABLE t_renamed RENAME TO t")
    pg.execute("INSERT INTO t VALUES (5000, 'back')")
    h.drain_all()
    assert _status(h, "t") == ("streaming", None)
    h.assert_equal(pg, "t")


@pytest.mark.e2e
def test_recreated_table_through_the_cli(pg, pg_url, write_config, duckdb_path, tmp_path):
    """What an operator runs: materialize the partitions, drain with `dagster job execute`,
    re-create the table, drain, read `pg-replication status`, materialize again, drain."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO t SELECT i, 'v0' FROM generate_series(1, 3000) i")
    write_config({"source": {"slot": "pgr_cli", "publication": "pgr_cli"}, "tables": ["t"], "defaults": {"partitions": 2}})
    env = dagster_env(tmp_path)
    materialize, drain = operator.materialize("public/t", "000...001"), operator.drain()
    for args in (materialize, drain):
        out = run_cli(args, env, tmp_path)
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    pg.execute("DROP TABLE t")
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO t SELECT i, 'new' FROM generate_series(100, 200) i")
    out = run_cli(drain, env, tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "backfill restarted" in out.stdout + out.stderr
    out = run_cli(["pg-replication", "--json", "status"], env, tmp_path)
    (row,) = json.loads(out.stdout)["tables"]
    assert row["status"] == "backfilling" and "re-created" in row["error"], out.stdout
    for args in (materialize, drain):
        out = run_cli(args, env, tmp_path)
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    with duckdb.connect(str(duckdb_path), read_only=True) as wh:
        got = wh.execute('SELECT id, v FROM "public"."t" ORDER BY id').fetchall()
    assert got == pg.execute("SELECT id, v FROM t ORDER BY id").fetchall()
