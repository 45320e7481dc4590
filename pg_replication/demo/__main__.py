"""``python -m pg_replication.demo``: seed the demo tables, backfill them with the dagster CLI,
change rows in Postgres and drain them with the CDC job, printing source and warehouse counts."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import duckdb
from psycopg import sql

from pg_replication.dagster.assets import partition_keys
from pg_replication.config import load_config
from pg_replication.source.catalog import introspect
from pg_replication.source.connection import connect, source_conninfo
from pg_replication.warehouse.base import quote

DAGSTER = os.path.join(os.path.dirname(sys.executable), "dagster")

CHANGES = """
UPDATE shop.orders SET status = 'shipped' WHERE id % 50 = 0 AND status <> 'cancelled';
INSERT INTO shop.customers (id, name, email, country, signed_up_at, balance, active, tags, profile)
SELECT i, 'New customer ' || i, 'new' || i || '@example.com', 'PT', now(), 0, true, ARRAY['new'], '{"plan": "free"}'
FROM generate_series(20001, 20010) AS i;
DELETE FROM shop.order_lines WHERE order_id BETWEEN 1 AND 5;
"""


def dagster(*args: str) -> None:
    out = subprocess.run([DAGSTER, *args], capture_output=True, text=True)
    if out.returncode != 0:  # dagster logs to stderr: show it only when something failed
        sys.stderr.write(out.stderr[-5000:])
        raise SystemExit(f"`dagster {' '.join(args)}` failed with exit code {out.returncode}")


def print_counts(config, tables) -> None:
    print(f"\n{'table':<24}{'source rows':>14}{'warehouse rows':>16}")
    with connect(source_conninfo()) as conn, duckdb.connect(config.duckdb_path(), read_only=True) as wh:
        for table in tables:
            src = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table.ident)).fetchone()[0]  # type: ignore[index]
            dst = wh.execute(f"SELECT count(*) FROM {quote(table.schema, table.name)}").fetchall()[0][0]
            print(f"{table.display:<24}{src:>14,}{dst:>16,}")


def reset(config) -> None:
    """Start over: the demo's slot, publication and warehouse file."""
    with connect(source_conninfo()) as conn:
        if conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (config.source.slot,)).fetchone():
            conn.execute("SELECT pg_drop_replication_slot(%s)", (config.source.slot,))
        conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(config.source.publication)))
        conn.execute(resources.files("pg_replication.demo").joinpath("seed.sql").read_text())
    for suffix in ("", ".wal"):
        Path(config.duckdb_path() + suffix).unlink(missing_ok=True)


def main() -> int:
    config = load_config()
    reset(config)
    with connect(source_conninfo()) as conn:
        tables = introspect(conn, config)
    for table in tables:
        keys = partition_keys((table.entry.partitions if table.entry else None) or config.defaults.partitions)
        print(f"backfilling {table.display} ({len(keys)} partitions) with `dagster asset materialize` ...", flush=True)
        dagster("asset", "materialize", "-m", "pg_replication.dagster.definitions", "--select",
                f"{table.schema}/{table.name}", "--partition-range", f"{keys[0]}...{keys[-1]}")
    print_counts(config, tables)
    print("\nchanging rows in Postgres (updates, inserts, deletes) and running the CDC drain job ...", flush=True)
    with connect(source_conninfo()) as conn:
        conn.execute(CHANGES)
    dagster("job", "execute", "-m", "pg_replication.dagster.definitions", "-j", f"{config.source.name}_cdc_drain")
    print_counts(config, tables)
    with duckdb.connect(config.duckdb_path(), read_only=True) as wh:
        shipped = wh.execute("SELECT count(*) FROM shop.orders WHERE status = 'shipped'").fetchall()[0][0]
    with connect(source_conninfo()) as conn:
        expected = conn.execute("SELECT count(*) FROM shop.orders WHERE status = 'shipped'").fetchone()[0]  # type: ignore[index]
    print(f"shipped orders: {expected:,} in Postgres, {shipped:,} in DuckDB")
    print(
        f"\nWarehouse: {config.duckdb_path()}.  Keep CDC running (the {config.source.name}_cdc_sensor drains "
        "every 10 s) with the UI:\n  make dev    # http://127.0.0.1:3000\n"
        f"Operators: POSTGRES_URL={os.environ.get('POSTGRES_URL', '...')} .venv/bin/pg-replication status"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
