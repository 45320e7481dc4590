"""Dagster resources: the Postgres source, and the warehouse a run writes to.

Each warehouse resource opens one connection per use and hands back the engine's dialect for
it; jobs, checks and the IO manager only see ``WarehouseResource.open()``. DuckDB rides on
dagster-duckdb's DuckDBResource; Snowflake on the Snowflake connector itself
(``resources_snowflake.py``, imported only when chosen: the connector takes seconds to load).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import dagster as dg
from dagster_duckdb import DuckDBResource
from pydantic import Field

from pg_replication.source.connection import connect, describe_target
from pg_replication.warehouse.connect import duckdb_connect_waiting
from pg_replication.warehouse.engine import SqlWarehouse


class PostgresSource(dg.ConfigurableResource):
    """The Postgres database tables are replicated from.

    Example::

        PostgresSource(conninfo=dg.EnvVar("POSTGRES_URL"))  # the UI shows the variable, not the URL
    """

    conninfo: str = Field(
        default="",
        description="libpq connection string or URL; empty means the standard PG* variables.",
    )

    def connect(self):
        return connect(self.conninfo)

    def describe(self) -> str:
        return describe_target(self.conninfo)


class WarehouseResource(dg.ConfigurableResource):
    """Where replicated tables live. Subclasses open one kind of warehouse."""

    @contextmanager
    def open(self, *, read_only: bool = False) -> Iterator[SqlWarehouse]:
        """A warehouse on a fresh connection; ``read_only`` creates nothing (checks)."""
        raise NotImplementedError
        yield


class DuckDBWarehouseResource(WarehouseResource):
    """A DuckDB file. Example::

        DuckDBWarehouseResource(duckdb=DuckDBResource(database="warehouse.duckdb"))
    """

    duckdb: DuckDBResource

    @contextmanager
    def open(self, *, read_only: bool = False) -> Iterator[SqlWarehouse]:
        from pg_replication.warehouse.duckdb import DuckDBWarehouse

        if read_only:  # checks: a shared lock, so a drain waits only while they read, never for a writer's checkpoint
            conn = _duckdb_read_only(self.duckdb.database, self.duckdb.connection_config)
            try:
                yield DuckDBWarehouse(conn, read_only=True)
            finally:
                conn.close()
            return
        with self.duckdb.get_connection() as conn:  # waits (with backoff) while another process holds the file
            try:
                yield DuckDBWarehouse(conn, read_only=read_only)
            finally:  # DuckDBResource closes only on success: a failed write must let go of the file too
                conn.close()


def _duckdb_read_only(path: str, config: dict, wait_seconds: float = 300.0):
    """A read-only connection, waiting (bounded, generously) while a drain or backfill writes."""
    import duckdb

    if path != ":memory:" and not os.path.exists(path):  # nothing replicated yet: an empty warehouse
        return duckdb.connect(":memory:")
    return duckdb_connect_waiting(
        path, read_only=True, config=config, wait_seconds=wait_seconds, purpose=" to read",
        hint="a backfill or drain held it all along; the check runs again at its next tick",
    )


class PostgresWarehouseResource(WarehouseResource):
    """A Postgres reporting replica. Example::

        PostgresWarehouseResource(conninfo=dg.EnvVar("WAREHOUSE_POSTGRES_URL"), schema_prefix="")
    """

    conninfo: str = Field(description="libpq connection string or URL of the replica database.")
    schema_prefix: str = Field("", description="Warehouse schema = prefix + source schema.")

    @contextmanager
    def open(self, *, read_only: bool = False) -> Iterator[SqlWarehouse]:
        from pg_replication.warehouse.connect import connect_postgres_warehouse
        from pg_replication.warehouse.postgres import PostgresWarehouse

        with connect_postgres_warehouse(self.conninfo) as conn:
            yield PostgresWarehouse(conn, schema_prefix=self.schema_prefix, read_only=read_only)


@dataclass(frozen=True)
class ResourceKeys:
    """The keys one source's resources go by in Definitions. Dagster refuses two different
    resources under one key, so each component instance derives its own from its source name;
    the single replication.yaml path keeps the plain "source" and "warehouse"."""

    source: str = "source"
    warehouse: str = "warehouse"
    io_manager: str = "warehouse_io_manager"

    @classmethod
    def for_source(cls, name: str) -> ResourceKeys:
        return cls(f"{name}_source", f"{name}_warehouse", f"{name}_warehouse_io_manager")

    @property
    def both(self) -> set[str]:
        return {self.source, self.warehouse}

    def source_of(self, context) -> PostgresSource:
        return getattr(context.resources, self.source)

    def warehouse_of(self, context) -> WarehouseResource:
        return getattr(context.resources, self.warehouse)
