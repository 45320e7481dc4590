"""``--warehouse`` for the benchmarks: point the environment at a fresh warehouse of that kind.

duckdb: a new file in a temporary directory. postgres: database ``pgr_bench_wh`` on the source's
server, recreated (so the replica competes with the source for the same two cores, as it
would on a one-machine set-up). snowflake: the account in SNOWFLAKE_*; fakesnow is refused,
because it would time DuckDB, not Snowflake. clickhouse: a new chDB directory (ClickHouse in the
benchmark's process, competing for the same two cores).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import psycopg
from psycopg import sql

KINDS = ("duckdb", "postgres", "snowflake", "clickhouse")


def use_warehouse(kind: str, admin_url: str) -> str:
    """Set PG_REPLICATION_WAREHOUSE and the connection variables; returns a description."""
    os.environ["PG_REPLICATION_WAREHOUSE"] = kind
    if kind == "duckdb":
        path = Path(tempfile.mkdtemp(prefix="pgr_bench_")) / "bench.duckdb"
        os.environ["DUCKDB_PATH"] = str(path)
        return f"DuckDB file {path}"
    if kind == "clickhouse":
        path = Path(tempfile.mkdtemp(prefix="pgr_bench_")) / "bench.chdb"
        os.environ["CHDB_PATH"] = str(path)
        return f"chDB directory {path}"
    if kind == "postgres":
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute("DROP DATABASE IF EXISTS pgr_bench_wh WITH (FORCE)")
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier("pgr_bench_wh")))
        params = psycopg.conninfo.conninfo_to_dict(admin_url)
        params["dbname"] = "pgr_bench_wh"
        os.environ["WAREHOUSE_POSTGRES_URL"] = psycopg.conninfo.make_conninfo(**params)
        return "Postgres database pgr_bench_wh (same server)"
    if not os.environ.get("SNOWFLAKE_ACCOUNT"):
        raise SystemExit("--warehouse snowflake needs a real account in SNOWFLAKE_* (fakesnow would time DuckDB)")
    return f"Snowflake account {os.environ['SNOWFLAKE_ACCOUNT']}"
