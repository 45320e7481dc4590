"""``python -m pg_replication.demo``: seed the demo tables, backfill them with the dagster CLI,
and print row counts in the source and the warehouse."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources

import duckdb
from psycopg import sql

from pg_replication.assets import partition_keys
from pg_replication.config import load_config
from pg_replication.source.catalog import introspect
from pg_replication.source.connection import connect, source_conninfo
from pg_replication.warehouse.duckdb import q


def main() -> int:
    config = load_config()
    with connect(source_conninfo()) as conn:
        conn.execute(resources.files("pg_replication.demo").joinpath("seed.sql").read_text())
        tables = introspect(conn, config)
    dagster = os.path.join(os.path.dirname(sys.executable), "dagster")
    for table in tables:
        keys = partition_keys((table.entry.partitions if table.entry else None) or config.defaults.partitions)
        select = f"{table.schema}/{table.name}"
        print(f"backfilling {table.display} ({len(keys)} partitions) ...", flush=True)
        subprocess.run(
            [dagster, "asset", "materialize", "-m", "pg_replication.definitions", "--select", select,
             "--partition-range", f"{keys[0]}...{keys[-1]}"],
            check=True, stdout=subprocess.DEVNULL,
        )
    print(f"\n{'table':<24}{'source rows':>14}{'warehouse rows':>16}")
    with connect(source_conninfo()) as conn, duckdb.connect(config.duckdb_path(), read_only=True) as wh:
        for table in tables:
            src = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table.ident)).fetchone()[0]
            dst = wh.execute(f"SELECT count(*) FROM {q(table.schema, table.name)}").fetchone()[0]
            print(f"{table.display:<24}{src:>14,}{dst:>16,}")
    print(f"\nWarehouse: {config.duckdb_path()}.  Open the UI with:  .venv/bin/dagster dev  (http://127.0.0.1:3000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
