"""Backfill benchmark: our COPY -> Arrow -> warehouse path through Dagster against the raw limit.

    python bench/backfill.py --rows 2000000 [--partitions N] [--warehouse duckdb|postgres|snowflake|clickhouse]

Builds (or reuses) a table of N rows with mixed types in database ``pgr_bench`` of the server in
POSTGRES_URL, then measures in the same run:
  1. the raw limit: two concurrent ``COPY ... TO STDOUT`` streams over CTID halves, read into nothing
     (before and after the backfill: the ratios are to the higher);
  2. the full backfill into a fresh warehouse through Dagster (all partitions, one run, timed from
     its start on an instance that exists: a run worker loads it before the run starts).
Prints rows/s, the ratio to the limit and the peak RSS of this process (the backfill runs in it).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))
from warehouses import KINDS, use_warehouse  # noqa: E402

TABLE_SQL = """
CREATE TABLE IF NOT EXISTS bench_rows (
    id bigint PRIMARY KEY, qty int, amount numeric(12,2), title text, created_at timestamptz,
    active bool, attrs jsonb, labels text[]
)"""

FILL_SQL = """
INSERT INTO bench_rows
SELECT i, (i * 7) %% 1000, round(((i * 31) %% 1000000) / 100.0, 2),
       'item ' || md5(i::text), timestamptz '2024-01-01' + i * interval '1 second',
       i %% 3 = 0, jsonb_build_object('n', i %% 100, 'tag', 't' || (i %% 7)),
       ARRAY['a' || (i %% 10), 'b' || (i %% 3)]
FROM generate_series(%s, %s) i"""


def bench_database(admin_url: str) -> str:
    """The URL of database ``pgr_bench`` on the same server, created if missing."""
    with psycopg.connect(admin_url, autocommit=True) as admin:
        if not admin.execute("SELECT 1 FROM pg_database WHERE datname = 'pgr_bench'").fetchone():
            admin.execute("CREATE DATABASE pgr_bench")
    params = psycopg.conninfo.conninfo_to_dict(admin_url)
    params["dbname"] = "pgr_bench"
    return psycopg.conninfo.make_conninfo(**params)


def prepare(admin_url: str, rows: int) -> str:
    """``bench_rows`` with exactly ``rows`` rows (rebuilt when the count differs)."""
    url = bench_database(admin_url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(TABLE_SQL)
        have = conn.execute("SELECT count(*) FROM bench_rows").fetchone()[0]
        if have != rows:
            print(f"building bench_rows with {rows:,} rows ...", flush=True)
            conn.execute("TRUNCATE bench_rows")
            step = 500_000
            for start in range(1, rows + 1, step):
                conn.execute(FILL_SQL, (start, min(rows, start + step - 1)))
            conn.execute("VACUUM ANALYZE bench_rows")
    return url


def raw_limit(url: str, streams: int = 2) -> tuple[float, int]:
    """Rows/s of `streams` concurrent COPY TO STDOUT over CTID ranges, read and discarded."""
    with psycopg.connect(url) as conn:
        pages = conn.execute("SELECT pg_relation_size('bench_rows') / current_setting('block_size')::int").fetchone()[0]
        total = conn.execute("SELECT count(*) FROM bench_rows").fetchone()[0]
    bounds = [round(k * pages / streams) for k in range(streams)] + [None]
    moved = [0] * streams

    def stream(k: int) -> None:
        lo, hi = bounds[k], bounds[k + 1]
        where = sql.SQL("ctid >= {}::tid").format(sql.Literal(f"({lo},0)"))
        if hi is not None:
            where = sql.SQL("{} AND ctid < {}::tid").format(where, sql.Literal(f"({hi},0)"))
        query = sql.SQL("COPY (SELECT * FROM bench_rows WHERE {}) TO STDOUT").format(where)
        with psycopg.connect(url) as conn, conn.cursor().copy(query) as copy:
            for chunk in copy:
                moved[k] += len(chunk)

    started = time.perf_counter()
    threads = [threading.Thread(target=stream, args=(k,)) for k in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total / (time.perf_counter() - started), sum(moved)


def backfill_through_dagster(url: str, rows: int, partitions: int) -> tuple[float, float, float]:
    import dagster as dg
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    from pg_replication.dagster.assets import partition_keys
    from pg_replication.config import parse_config
    from pg_replication.dagster.definitions import build_definitions
    from pg_replication.source.catalog import introspect
    from pg_replication.source.connection import connect
    from pg_replication.warehouse.connect import open_warehouse

    os.environ["POSTGRES_URL"] = url
    config = parse_config(
        {
            "tables": ["public.bench_rows"],
            "defaults": {"partitions": partitions},
            "source": {"slot": "pgr_bench_backfill", "publication": "pgr_bench_backfill"},
        }
    )
    defs = build_definitions(config)
    keys = partition_keys(partitions)
    job = defs.resolve_implicit_global_asset_job_def()
    # The instance exists before the run, as a run worker loads it before its run starts (here
    # its storage imports alone took about a second of the 2M-row run).
    instance = dg.DagsterInstance.ephemeral()
    started = time.perf_counter()
    result = job.execute_in_process(
        asset_selection=[dg.AssetKey(["public", "bench_rows"])],
        tags={ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]},
        instance=instance,
    )
    elapsed = time.perf_counter() - started
    assert result.success
    event = result.get_asset_materialization_events()[0]  # one per partition, same metadata
    in_step = event.materialization.metadata["rows_per_second"].value
    longest = event.materialization.metadata["longest_snapshot_seconds"].value
    with connect(url) as conn:
        (table,) = introspect(conn, config)
    with open_warehouse(config, read_only=True) as wh:
        copied = wh.row_count(table)
    assert copied == rows, (copied, rows)
    with psycopg.connect(url, autocommit=True) as conn:  # an undrained slot would pin WAL
        conn.execute("SELECT pg_drop_replication_slot('pgr_bench_backfill')")
    return rows / elapsed, in_step, longest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--partitions", type=int, default=None, help="default: replication.yaml's default (4)")
    parser.add_argument("--warehouse", choices=KINDS, default="duckdb")
    args = parser.parse_args()
    if args.partitions is None:
        from pg_replication.config import Defaults

        args.partitions = Defaults().partitions
    url = prepare(os.environ["POSTGRES_URL"], args.rows)
    print(f"warehouse   : {use_warehouse(args.warehouse, os.environ['POSTGRES_URL'])}", flush=True)
    limit, nbytes = raw_limit(url)
    print(f"raw limit   : {limit:>12,.0f} rows/s  (2 COPY streams over CTID halves, {nbytes / 2**20:,.0f} MiB)", flush=True)
    ours, in_step, longest = backfill_through_dagster(url, args.rows, args.partitions)
    # Measured again after: on a shared machine it moves by a fifth or more between runs, and
    # the ratios below are to the higher of the two.
    after, _ = raw_limit(url)
    print(f"raw limit after: {after:>9,.0f} rows/s", flush=True)
    limit = max(limit, after)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"pg_replication: {ours:>10,.0f} rows/s  (whole Dagster run, {args.partitions} partitions -> {args.warehouse})")
    print(f"  in the step : {in_step:>10,.0f} rows/s  (the asset's rows_per_second: without run start-up)")
    print(f"  longest snapshot: {longest:.1f} s  (one slice's copy)")
    print(f"ratio to limit: {ours / limit:.2f} (whole run), {in_step / limit:.2f} (step)   peak RSS: {peak_mib:,.0f} MiB   rows: {args.rows:,}")


if __name__ == "__main__":
    main()
