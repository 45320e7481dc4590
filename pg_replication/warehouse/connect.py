"""Open the configured warehouse from the environment, outside Dagster (the CLI, the demo).

Dagster runs open the same warehouses through resources (``resources.py``); both read the
connection from the same environment variables, listed here, so a secret never has to be in
replication.yaml.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from pg_replication.config import ReplicationConfig
from pg_replication.errors import ConfigError, PgReplicationError, SourceUnavailableError, redact
from pg_replication.source.connection import describe_target, source_conninfo
from pg_replication.source.snapshot import Mapper
from pg_replication.warehouse.engine import SqlWarehouse

POSTGRES_WAREHOUSE_ENV = "WAREHOUSE_POSTGRES_URL"
# connect() argument -> environment variable; the first three are required.
SNOWFLAKE_ENV = {
    "account": "SNOWFLAKE_ACCOUNT",
    "user": "SNOWFLAKE_USER",
    "database": "SNOWFLAKE_DATABASE",
    "password": "SNOWFLAKE_PASSWORD",
    "warehouse": "SNOWFLAKE_WAREHOUSE",
    "role": "SNOWFLAKE_ROLE",
    "schema": "SNOWFLAKE_SCHEMA",
    "authenticator": "SNOWFLAKE_AUTHENTICATOR",
}
SNOWFLAKE_REQUIRED = ("account", "user", "database")
# ClickHouse server settings -> environment variable; with neither url nor host, chDB at CHDB_PATH.
CLICKHOUSE_ENV = {
    "url": "CLICKHOUSE_URL",
    "host": "CLICKHOUSE_HOST",
    "port": "CLICKHOUSE_PORT",
    "user": "CLICKHOUSE_USER",
    "password": "CLICKHOUSE_PASSWORD",
    "database": "CLICKHOUSE_DATABASE",
}


def type_mapper(kind: str) -> Mapper:
    """The type mapping of a warehouse kind, without opening (or importing) its driver."""
    if kind == "postgres":
        from pg_replication.warehouse.postgres import map_column
    elif kind == "snowflake":
        from pg_replication.warehouse.snowflake_types import map_column
    elif kind == "clickhouse":
        from pg_replication.warehouse.clickhouse_types import map_column
    else:
        from pg_replication.types import map_column
    return map_column


def table_location(config: ReplicationConfig, schema: str, table: str) -> str:
    """``database.schema.table`` of a replicated table as the warehouse names it (what dbt and
    Dagster's ``dagster/table_name`` use to match a source to its model), read from the
    configuration and the environment without connecting: DuckDB's database is its file's stem,
    the replica's the database of its URL, Snowflake's ``SNOWFLAKE_DATABASE``; ClickHouse has
    database.table, the database named after the source schema."""
    kind = config.warehouse_kind()
    if kind == "postgres":
        try:
            database = psycopg.conninfo.conninfo_to_dict(os.environ.get(POSTGRES_WAREHOUSE_ENV, "")).get("dbname") or "postgres"
        except psycopg.ProgrammingError:
            database = "postgres"
        return f"{database}.{config.warehouse.schema_prefix}{schema}.{table}"
    if kind == "snowflake":
        from pg_replication.warehouse.snowflake_types import fold

        database = os.environ.get(SNOWFLAKE_ENV["database"], "")
        return ".".join(n for n in (database, fold(schema), fold(table)) if n)
    if kind == "clickhouse":  # no schema level: the source schema is the ClickHouse database
        return f"{schema}.{table}"
    stem = os.path.splitext(os.path.basename(config.duckdb_path()))[0] or "memory"
    return f"{stem}.{schema}.{table}"


def snowflake_settings() -> dict[str, str]:
    """The SNOWFLAKE_* variables that are set, by connect() argument; missing required ones fail."""
    missing = [SNOWFLAKE_ENV[k] for k in SNOWFLAKE_REQUIRED if not os.environ.get(SNOWFLAKE_ENV[k])]
    if missing:
        raise ConfigError(f"the snowflake warehouse needs {', '.join(missing)} in the environment", setting=missing[0])
    return {arg: os.environ[var] for arg, var in SNOWFLAKE_ENV.items() if os.environ.get(var)}


def postgres_warehouse_url(config: ReplicationConfig) -> str:
    """WAREHOUSE_POSTGRES_URL, refused when it is the source database without a schema prefix
    (the replica's tables would be the source's own)."""
    url = os.environ.get(POSTGRES_WAREHOUSE_ENV, "")
    if not url:
        raise ConfigError(f"the postgres warehouse needs {POSTGRES_WAREHOUSE_ENV} in the environment", setting=POSTGRES_WAREHOUSE_ENV)
    if describe_target(url) == describe_target(source_conninfo()) and not config.warehouse.schema_prefix:
        raise ConfigError(
            f"{POSTGRES_WAREHOUSE_ENV} is the source database ({describe_target(url)}): set warehouse.schema_prefix "
            "so the replica's tables do not overwrite the source's",
            setting="warehouse.schema_prefix",
        )
    return url


def connect_postgres_warehouse(url: str) -> psycopg.Connection:
    try:
        return psycopg.connect(url, autocommit=True, application_name="pg_replication", connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise SourceUnavailableError(
            f"cannot connect to the postgres warehouse at {describe_target(url)}: {redact(str(exc).strip().splitlines()[-1])}",
            setting=POSTGRES_WAREHOUSE_ENV,
        ) from None


@contextmanager
def open_warehouse(config: ReplicationConfig, *, read_only: bool = False, wait_seconds: float = 30.0) -> Iterator[SqlWarehouse]:
    kind = config.warehouse_kind()
    if kind == "duckdb":
        from pg_replication.warehouse.duckdb import DuckDBWarehouse

        with _duckdb_connect(config, read_only, wait_seconds) as conn:
            yield DuckDBWarehouse(conn, read_only=read_only)
    elif kind == "postgres":
        from pg_replication.warehouse.postgres import PostgresWarehouse

        with connect_postgres_warehouse(postgres_warehouse_url(config)) as conn:
            yield PostgresWarehouse(conn, schema_prefix=config.warehouse.schema_prefix, read_only=read_only)
    elif kind == "clickhouse":
        from pg_replication.warehouse.clickhouse import ClickHouseWarehouse
        from pg_replication.warehouse.clickhouse_client import open_client

        env = {name: os.environ.get(var) for name, var in CLICKHOUSE_ENV.items()}
        server = env["url"] or env["host"]
        client = open_client(
            path=None if server else config.clickhouse_path(), url=env["url"], host=env["host"],
            port=int(env["port"]) if env["port"] else None, username=env["user"], password=env["password"],
            database=env["database"],
        )
        try:
            yield ClickHouseWarehouse(client, read_only=read_only)
        finally:
            client.close()
    else:
        import snowflake.connector

        from pg_replication.warehouse.snowflake import SnowflakeWarehouse

        conn = snowflake.connector.connect(**snowflake_settings(), paramstyle="qmark")
        try:
            yield SnowflakeWarehouse(conn, read_only=read_only, merge=config.warehouse.merge)
        finally:
            conn.close()


def _duckdb_connect(config: ReplicationConfig, read_only: bool, wait_seconds: float):
    return duckdb_connect_waiting(
        config.duckdb_path(), read_only=read_only, config={"memory_limit": config.warehouse.memory_limit},
        wait_seconds=wait_seconds, hint="another process holds it; retry when the running drain or backfill ends",
    )


def duckdb_connect_waiting(path: str, *, read_only: bool, config: dict, wait_seconds: float, hint: str, purpose: str = ""):
    """DuckDB allows one writing process: wait (bounded) while a drain or backfill holds the file.
    A lock held past ``wait_seconds`` fails with ``hint``; any other error at once."""
    import duckdb

    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return duckdb.connect(path, read_only=read_only, config=dict(config))
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise PgReplicationError(f"cannot open the warehouse {path}{purpose}: {str(exc).splitlines()[0]}", hint=hint) from None
            time.sleep(0.2)
