"""Catalog introspection and table selection against a real Postgres."""

from __future__ import annotations

import pytest

from pg_replication.config import parse_config
from pg_replication.errors import SourceUnavailableError, TableNotReplicableError
from pg_replication.source.catalog import introspect
from pg_replication.source.connection import connect


def _introspect(pg_url, tables):
    with connect(pg_url) as conn:
        return introspect(conn, parse_config({"tables": tables}))


def test_patterns_excludes_and_first_entry_wins(pg, pg_url):
    pg.execute("CREATE SCHEMA sales")
    for name in ("orders", "order_lines", "tmp_scratch"):
        pg.execute(f"CREATE TABLE sales.{name} (id int PRIMARY KEY)")
    pg.execute("CREATE TABLE public.other (id int PRIMARY KEY)")
    tables = _introspect(
        pg_url,
        [{"name": "sales.orders", "partitions": 9}, {"name": "sales.*", "exclude": ["sales.tmp_*"]}],
    )
    assert [(t.schema, t.name) for t in tables] == [("sales", "orders"), ("sales", "order_lines")]
    assert tables[0].entry.partitions == 9 and tables[1].entry.partitions is None


def test_missing_table_names_it(pg, pg_url):
    with pytest.raises(TableNotReplicableError) as err:
        _introspect(pg_url, ["public.nope"])
    assert '"public"."nope"' in str(err.value) and "does not exist" in str(err.value)
    assert "pg-replication list" in str(err.value)


def test_table_without_primary_key_needs_a_declared_key(pg, pg_url):
    pg.execute("CREATE TABLE events (id bigint, payload text)")
    with pytest.raises(TableNotReplicableError) as err:
        _introspect(pg_url, ["events"])
    assert "no primary key" in str(err.value) and "primary_key:" in str(err.value)
    pg.execute("ALTER TABLE events REPLICA IDENTITY FULL")  # else publishing it breaks its UPDATEs
    (table,) = _introspect(pg_url, [{"name": "events", "primary_key": ["id"]}])
    assert table.primary_key == ("id",) and not table.primary_key_declared


def test_declared_key_and_excluded_columns_must_exist(pg, pg_url):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, secret text, v int)")
    with pytest.raises(TableNotReplicableError, match="'nope'"):
        _introspect(pg_url, [{"name": "t", "primary_key": ["nope"]}])
    with pytest.raises(TableNotReplicableError, match="'gone'"):
        _introspect(pg_url, [{"name": "t", "exclude_columns": ["gone"]}])
    (table,) = _introspect(pg_url, [{"name": "t", "exclude_columns": ["secret"]}])
    assert [c.name for c in table.columns] == ["id", "v"]


def test_columns_types_keys_identity(pg, pg_url):
    pg.execute("CREATE TYPE color AS ENUM ('red')")
    pg.execute("CREATE DOMAIN d_text AS text")
    pg.execute(
        "CREATE TABLE t (a int, b text, c int[][], d color, e d_text, f numeric(5,1), "
        "g int GENERATED ALWAYS AS (a * 2) STORED, PRIMARY KEY (b, a))"
    )
    pg.execute("ALTER TABLE t REPLICA IDENTITY FULL")
    (table,) = _introspect(pg_url, ["t"])
    assert table.primary_key == ("b", "a")
    assert table.replica_identity == "f"
    cols = {c.name: c for c in table.columns}
    assert "g" not in cols  # generated columns are not replicated (pgoutput does not send them)
    assert cols["c"].type.kind == "array" and cols["c"].ndims == 2
    assert cols["d"].type.kind == "enum"
    assert cols["e"].type.resolved(cols["e"].typmod)[0].name == "text"
    assert cols["f"].type_sql == "numeric(5,1)"


def test_partitioned_table_is_replicated_through_its_root(pg, pg_url):
    pg.execute("CREATE TABLE m (id int, day date, PRIMARY KEY (id, day)) PARTITION BY RANGE (day)")
    pg.execute("CREATE TABLE m_2024 PARTITION OF m FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')")
    pg.execute("CREATE TABLE m_2025 PARTITION OF m FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')")
    tables = _introspect(pg_url, ["public.*"])
    assert [(t.name, t.relkind) for t in tables] == [("m", "p")]
    assert tables[0].leaves == (("public", "m_2024"), ("public", "m_2025"))


def test_odd_identifiers(pg, pg_url):
    pg.execute('CREATE SCHEMA "Ünï cödé"')
    pg.execute('CREATE TABLE "Ünï cödé"."we""ird; DROP TABLE x; --" ("Id ;" int PRIMARY KEY, "va""l" text)')
    (table,) = _introspect(pg_url, ['"Ünï cödé"."we""ird; DROP TABLE x; --"'])
    assert table.name == 'we"ird; DROP TABLE x; --'
    assert table.primary_key == ("Id ;",)


def test_source_down_is_a_clear_error_without_password():
    with pytest.raises(SourceUnavailableError) as err:
        connect("postgresql://alice:s3cr3t-pw@127.0.0.1:1/db")
    text = str(err.value)
    assert "cannot connect to Postgres at 127.0.0.1:1/db" in text
    assert "s3cr3t-pw" not in text and "Traceback" not in text
    assert err.value.__cause__ is None and err.value.__suppress_context__
