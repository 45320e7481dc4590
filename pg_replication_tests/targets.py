"""The warehouses the suite runs against: a real DuckDB file, a real Postgres database,
Snowflake through fakesnow (an emulation on DuckDB; see README, Warehouses), and ClickHouse
embedded through chDB (the same engine as a server; see README, ClickHouse).

A target opens a fresh ``Warehouse`` per use, like a Dagster run does, and reads a table back
in key order for comparison with the source.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import psycopg
from psycopg import sql

from pg_replication.source.catalog import Table
from pg_replication.warehouse.duckdb import DuckDBWarehouse
from pg_replication.warehouse.postgres import PostgresWarehouse

KINDS = ("duckdb", "postgres", "snowflake", "clickhouse")
# The test modules that run on ClickHouse; the others skip it (README, ClickHouse: what is covered).
CLICKHOUSE_MODULES = {
    "test_backfill",
    "test_capture",
    "test_cdc",
    "test_drain_session",
    "test_errors",
    "test_exactly_once",
    "test_large_transactions",
    "test_progress",
    "test_reads",
    "test_relation_identity",
    "test_rewrites",
    "test_schema_changes",
    "test_short_snapshots",
    "test_strategies",
    "test_table_joins_slot",
    "test_toast",
    "test_types",
    "test_warehouses",
}


class Target:
    kind = ""
    crash_safe = True  # survives its process being killed (False: the state lives in the process)

    def spec(self) -> str:
        """How another process opens the same warehouse (see ``from_spec``)."""
        raise NotImplementedError

    @contextmanager
    def open(self, *, read_only: bool = False) -> Iterator:
        raise NotImplementedError
        yield

    def rows(self, table: Table, columns: list[str] | None = None) -> list[tuple]:
        names = columns or [c.name for c in table.columns]
        with self.open(read_only=True) as wh:
            select = ", ".join(wh.ident(c) for c in names)
            order = ", ".join(wh.ident(k) for k in table.primary_key)
            return wh.fetchall(f"SELECT {select} FROM {wh.table_name(table)} ORDER BY {order}")

    def columns(self, table: Table) -> list[str]:
        """The warehouse table's columns, lower-cased (Snowflake stores plain names upper-case)."""
        with self.open(read_only=True) as wh:
            return [c.lower() for c in wh.physical_columns(wh.schema_of(table), table.name) or []]


class DuckDBTarget(Target):
    kind = "duckdb"

    def __init__(self, path: Path) -> None:
        self.path = path

    def spec(self) -> str:
        return f"duckdb:{self.path}"

    @contextmanager
    def open(self, *, read_only: bool = False) -> Iterator[DuckDBWarehouse]:
        with duckdb.connect(str(self.path), read_only=read_only) as conn:
            yield DuckDBWarehouse(conn, read_only=read_only)


class PostgresTarget(Target):
    """A database of its own on the test server: the reporting-replica set-up."""

    kind = "postgres"

    def __init__(self, url: str, schema_prefix: str = "") -> None:
        self.url, self.schema_prefix = url, schema_prefix

    def spec(self) -> str:
        return f"postgres:{self.url}"

    @contextmanager
    def open(self, *, read_only: bool = False) -> Iterator[PostgresWarehouse]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            yield PostgresWarehouse(conn, schema_prefix=self.schema_prefix, read_only=read_only)


class SnowflakeTarget(Target):
    """fakesnow patches the connector for the test's duration; every connection shares one
    in-memory database, as every run shares one Snowflake account."""

    kind = "snowflake"
    crash_safe = False

    @contextmanager
    def open(self, *, read_only: bool = False) -> Iterator:
        import snowflake.connector

        from pg_replication.warehouse.snowflake import SnowflakeWarehouse

        conn = snowflake.connector.connect(database="PGR", schema="PUBLIC", paramstyle="qmark")
        try:
            # fakesnow runs MERGE as several statements through a temporary table, which DuckDB
            # refuses inside a transaction: the equivalent DELETE + INSERT path runs here, and
            # test_snowflake.py proves MERGE gives the same table.
            yield SnowflakeWarehouse(conn, read_only=read_only, merge=False)
        finally:
            conn.close()


class ClickHouseTarget(Target):
    """A chDB directory: ClickHouse in this process, opened per use (chDB admits one session
    per process, and one process per directory, at a time). Reads see each key's latest version
    (the warehouse's sessions read with ``final = 1``)."""

    kind = "clickhouse"

    def __init__(self, path: Path) -> None:
        self.path = path

    def spec(self) -> str:
        return f"clickhouse:{self.path}"

    @contextmanager
    def open(self, *, read_only: bool = False) -> Iterator:
        from pg_replication.warehouse.clickhouse import ClickHouseWarehouse
        from pg_replication.warehouse.clickhouse_client import ChdbClient

        client = ChdbClient(str(self.path))
        try:
            yield ClickHouseWarehouse(client, read_only=read_only)
        finally:
            client.close()


def from_spec(spec: str) -> Target:
    kind, _, where = spec.partition(":")
    if kind == "clickhouse":
        return ClickHouseTarget(Path(where))
    return DuckDBTarget(Path(where)) if kind == "duckdb" else PostgresTarget(where)


@contextmanager
def make_target(kind: str, tmp_path: Path, server_url: str) -> Iterator[Target]:
    if kind == "duckdb":
        yield DuckDBTarget(tmp_path / "warehouse.duckdb")
    elif kind == "postgres":
        name = f"pgr_wh_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        params = psycopg.conninfo.conninfo_to_dict(server_url)
        params["dbname"] = name
        try:
            yield PostgresTarget(psycopg.conninfo.make_conninfo(**params))
        finally:
            with psycopg.connect(server_url, autocommit=True) as admin:
                admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    elif kind == "clickhouse":
        yield ClickHouseTarget(tmp_path / "warehouse.chdb")
    elif kind == "snowflake":
        from pg_replication_tests.fake_snowflake import fake_snowflake

        with fake_snowflake():
            yield SnowflakeTarget()
    else:
        raise ValueError(kind)
