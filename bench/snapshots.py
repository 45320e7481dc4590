"""How long one backfill snapshot lives: short slices against the raw COPY limit.

    python bench/snapshots.py --rows 2000000 --max-snapshot-mb 64 [--warehouse duckdb|postgres]

Builds (or reuses) bench/backfill.py's table, then measures in the same run:
  1. the raw limit: two concurrent ``COPY ... TO STDOUT`` streams over CTID halves, read into nothing;
  2. one backfill partition copied as slices of at most ``--max-snapshot-mb`` of heap each, into a
     fresh warehouse (engine only, no Dagster), timing each slice from its snapshot to its commit.
Prints the heap size, the slices, the longest snapshot, the heap rate and its ratio to the
limit's, and what a 1 GiB slice (the default ``backfill.max_snapshot_bytes``) holds at that rate.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import prepare, raw_limit  # noqa: E402
from warehouses import KINDS, use_warehouse  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--max-snapshot-mb", type=int, default=64)
    parser.add_argument("--warehouse", choices=KINDS, default="duckdb")
    args = parser.parse_args()
    admin_url = os.environ["POSTGRES_URL"]
    url = prepare(admin_url, args.rows)
    with psycopg.connect(url) as conn:
        heap = conn.execute("SELECT pg_relation_size('bench_rows')").fetchone()[0]
    limit, _ = raw_limit(url)
    print(f"raw limit:   {limit:>12,.0f} rows/s  (2 COPY streams, read into nothing)")
    print(f"heap:        {heap / 2**20:>12,.0f} MiB  ({args.rows:,} rows, {heap / args.rows:.0f} bytes a row)")

    from pg_replication.replicate.backfill import SlotSettings, run_backfill
    from pg_replication.config import parse_config
    from pg_replication.source.catalog import introspect
    from pg_replication.source.connection import connect
    from pg_replication.warehouse.connect import open_warehouse

    print(f"warehouse:   {use_warehouse(args.warehouse, admin_url)}")
    os.environ["POSTGRES_URL"] = url
    config = parse_config(
        {"tables": ["public.bench_rows"], "defaults": {"partitions": 1}, "source": {"slot": "pgr_bench_snap", "publication": "pgr_bench_snap"}}
    )
    with connect(url) as conn:
        (table,) = introspect(conn, config)
    started = time.perf_counter()
    with open_warehouse(config) as wh:
        result = run_backfill(
            url, wh, table, [0], partitions=1, cdc=SlotSettings("pgr_bench_snap", "pgr_bench_snap"),
            max_snapshot_bytes=args.max_snapshot_mb << 20,
        )
    elapsed = time.perf_counter() - started
    with psycopg.connect(url, autocommit=True) as conn:  # an undrained slot would pin WAL
        conn.execute("SELECT pg_drop_replication_slot('pgr_bench_snap')")
    rate = heap / elapsed
    print(f"backfill:    {result.rows / elapsed:>12,.0f} rows/s  ratio {result.rows / elapsed / limit:.2f}  ({elapsed:.1f} s -> {args.warehouse})")
    print(f"slices:      {result.snapshots:>12}  of at most {args.max_snapshot_mb} MiB heap; longest snapshot {result.longest_snapshot_seconds:.1f} s")
    print(f"heap rate:   {rate / 2**20:>12,.1f} MiB/s: a 1 GiB slice holds its snapshot about {2**30 / rate:,.0f} s")


if __name__ == "__main__":
    main()
