"""The source's own writes never break: a table is published only when its replica identity
carries the configured key (and its column list covers the identity); a declared key must be
unique. Every refusal names the table and the statement that fixes it."""

from __future__ import annotations

import psycopg
import pytest

from pg_replication.config import parse_config
from pg_replication.errors import TableNotReplicableError
from pg_replication.source.catalog import introspect
from pg_replication.source.connection import connect
from pg_replication.source.slot import sync_publication
from pg_replication_tests.replication import Harness

def _introspect(pg_url, tables):
    with connect(pg_url) as conn:
        return introspect(conn, parse_config({"tables": tables}))


def _published(pg, name: str) -> bool:
    return pg.execute("SELECT count(*) FROM pg_publication_tables WHERE tablename = %s", (name,)).fetchone()[0] > 0


def test_table_without_primary_key_is_refused_until_it_has_an_identity(pg, pg_url, duckdb_path):
    pg.execute("CREATE TABLE no_pk (k int NOT NULL, v text)")
    pg.execute("INSERT INTO no_pk SELECT i, 'a' FROM generate_series(1, 20) i")
    entry = {"name": "no_pk", "primary_key": ["k"]}
    with pytest.raises(TableNotReplicableError) as err:
        _introspect(pg_url, [entry])
    text = str(err.value)
    assert '"public"."no_pk"' in text and "replica identity" in text
    fix = 'ALTER TABLE "public"."no_pk" REPLICA IDENTITY FULL'
    assert fix in text
    pg.execute(fix)  # the statement the message gives is enough
    h = Harness(pg_url, duckdb_path, [entry], partitions=2)
    h.backfill()
    assert _published(pg, "no_pk")
    pg.execute("UPDATE no_pk SET v = 'b' WHERE k < 5")  # the application's writes keep working
    pg.execute("UPDATE no_pk SET k = 100 WHERE k = 5")
    pg.execute("DELETE FROM no_pk WHERE k = 6")
    h.drain_all()
    h.assert_equal(pg, "no_pk")


def test_identity_nothing_is_refused(pg, pg_url):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pg.execute("ALTER TABLE t REPLICA IDENTITY NOTHING")
    with pytest.raises(TableNotReplicableError) as err:
        _introspect(pg_url, ["t"])
    assert 'ALTER TABLE "public"."t" REPLICA IDENTITY DEFAULT' in str(err.value)


def test_identity_index_over_other_columns_is_refused(pg, pg_url):
    """Deletes and key changes would arrive carrying ``code``, not the key ``id``."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, code text NOT NULL, v text)")
    pg.execute("CREATE UNIQUE INDEX t_code ON t (code)")
    pg.execute("ALTER TABLE t REPLICA IDENTITY USING INDEX t_code")
    with pytest.raises(TableNotReplicableError) as err:
        _introspect(pg_url, ["t"])
    text = str(err.value)
    assert '"public"."t"' in text and "id" in text
    assert 'ALTER TABLE "public"."t" REPLICA IDENTITY DEFAULT' in text
    # a declared key the index carries is fine (old tuples hold every key column)
    (table,) = _introspect(pg_url, [{"name": "t", "primary_key": ["code"]}])
    assert table.primary_key == ("code",)


def test_declared_key_without_index_gets_the_index_statements(pg, pg_url):
    pg.execute("CREATE TABLE ev (k bigint, v text, secret text)")
    with pytest.raises(TableNotReplicableError) as err:
        _introspect(pg_url, [{"name": "ev", "primary_key": ["k"], "exclude_columns": ["secret"]}])
    text = str(err.value)
    # FULL would make the column list fail every UPDATE: the fix is a unique index on the key
    assert "REPLICA IDENTITY FULL" not in text
    assert 'ALTER TABLE "public"."ev" ALTER COLUMN "k" SET NOT NULL' in text
    assert 'CREATE UNIQUE INDEX "ev_pgr_key" ON "public"."ev" ("k")' in text
    assert 'ALTER TABLE "public"."ev" REPLICA IDENTITY USING INDEX "ev_pgr_key"' in text
    pg.execute('ALTER TABLE "public"."ev" ALTER COLUMN "k" SET NOT NULL')
    pg.execute('CREATE UNIQUE INDEX "ev_pgr_key" ON "public"."ev" ("k")')
    pg.execute('ALTER TABLE "public"."ev" REPLICA IDENTITY USING INDEX "ev_pgr_key"')
    (table,) = _introspect(pg_url, [{"name": "ev", "primary_key": ["k"], "exclude_columns": ["secret"]}])
    assert [c.name for c in table.columns] == ["k", "v"]


def test_column_list_that_does_not_cover_the_identity_is_refused(pg, pg_url, duckdb_path):
    """With REPLICA IDENTITY FULL, a column list leaving out ``secret`` fails every UPDATE."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, secret text, v int)")
    pg.execute("ALTER TABLE t REPLICA IDENTITY FULL")
    pg.execute("INSERT INTO t SELECT i, 's', i FROM generate_series(1, 10) i")
    entry = {"name": "t", "exclude_columns": ["secret"]}
    with pytest.raises(TableNotReplicableError) as err:
        _introspect(pg_url, [entry])
    text = str(err.value)
    assert "column list" in text and "secret" in text
    assert 'ALTER TABLE "public"."t" REPLICA IDENTITY DEFAULT' in text
    pg.execute('ALTER TABLE "public"."t" REPLICA IDENTITY DEFAULT')
    h = Harness(pg_url, duckdb_path, [entry])
    h.backfill()
    pg.execute("UPDATE t SET v = -v, secret = 'new'")  # the application's writes keep working
    pg.execute("DELETE FROM t WHERE id = 3")
    h.drain_all()
    h.assert_equal(pg, "t", ["id", "v"])


def test_identity_changed_after_load_is_never_published(pg, pg_url, duckdb_path):
    pg.execute("CREATE TABLE no_pk (k int, v text)")
    pg.execute("ALTER TABLE no_pk REPLICA IDENTITY FULL")
    pg.execute("INSERT INTO no_pk VALUES (1, 'a')")
    h = Harness(pg_url, duckdb_path, [{"name": "no_pk", "primary_key": ["k"]}])  # loads fine
    pg.execute("ALTER TABLE no_pk REPLICA IDENTITY DEFAULT")  # then someone changes it back
    with pytest.raises(TableNotReplicableError, match="REPLICA IDENTITY FULL"):
        h.backfill()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        sync_publication(conn, h.settings.publication, h.tables)  # what every drain does first
    assert not _published(pg, "no_pk")
    pg.execute("UPDATE no_pk SET v = 'b'")  # the application's writes keep working
    pg.execute("DELETE FROM no_pk")


def test_declared_key_with_duplicates_is_refused_before_the_plan(pg, pg_url, duckdb_path):
    pg.execute("CREATE TABLE dup (k int, v text)")
    pg.execute("ALTER TABLE dup REPLICA IDENTITY FULL")
    pg.execute("INSERT INTO dup VALUES (1, 'a'), (7, 'b'), (7, 'c'), (8, 'd')")
    h = Harness(pg_url, duckdb_path, [{"name": "dup", "primary_key": ["k"]}])  # load stays cheap
    with pytest.raises(TableNotReplicableError) as err:
        h.backfill()
    text = str(err.value)
    assert '"public"."dup"' in text and "k=7" in text and "not unique" in text
    assert not _published(pg, "dup")
    pg.execute("DELETE FROM dup WHERE v = 'c'")
    h.backfill()
    h.assert_equal(pg, "dup")


def test_each_partition_needs_its_own_identity(pg, pg_url):
    """An UPDATE is checked against the partition it touches; ALTER TABLE on the root does not recurse."""
    pg.execute("CREATE TABLE m (id int NOT NULL, day date NOT NULL) PARTITION BY RANGE (day)")
    pg.execute("CREATE TABLE m_2024 PARTITION OF m FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')")
    pg.execute("ALTER TABLE m REPLICA IDENTITY FULL")
    with pytest.raises(TableNotReplicableError) as err:
        _introspect(pg_url, [{"name": "m", "primary_key": ["id", "day"]}])
    assert '"public"."m_2024" (a partition of "public"."m")' in str(err.value)
    assert 'ALTER TABLE "public"."m_2024" REPLICA IDENTITY FULL' in str(err.value)
    pg.execute('ALTER TABLE "public"."m_2024" REPLICA IDENTITY FULL')
    (table,) = _introspect(pg_url, [{"name": "m", "primary_key": ["id", "day"]}])
    assert table.primary_key == ("id", "day")


def test_query_strategies_are_not_published_so_need_no_identity(pg, pg_url):
    pg.execute("CREATE TABLE log (seq int, v text)")
    (table,) = _introspect(pg_url, [{"name": "log", "primary_key": ["seq"], "strategy": "append"}])
    assert table.strategy == "append"


def test_declared_key_with_nulls_is_refused(pg, pg_url, duckdb_path):
    pg.execute("CREATE TABLE nk (k int, v text)")
    pg.execute("ALTER TABLE nk REPLICA IDENTITY FULL")
    pg.execute("INSERT INTO nk VALUES (1, 'a'), (NULL, 'b')")
    h = Harness(pg_url, duckdb_path, [{"name": "nk", "primary_key": ["k"]}])
    with pytest.raises(TableNotReplicableError, match="NULL key column \\(k=NULL\\)"):
        h.backfill()
