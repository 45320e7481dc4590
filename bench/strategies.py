"""Slot-less strategies: reload, updated_at and triggers throughput, and what triggers cost writers.

    python bench/strategies.py --rows 2000000 --changes 200000 [--warehouse duckdb|postgres]

On the backfill benchmark's table (``bench_rows`` in database ``pgr_bench``), each in a fresh
warehouse (bench/warehouses.py), measured in the same run:
  1. the raw limit: two concurrent COPY streams over CTID halves, read into nothing;
  2. reload: one full sync of strategy reload (read, load beside, swap), rows/s and ratio;
  3. updated_at: N rows updated (cursor moved forward), then one sync, rows/s applied;
  4. triggers: N rows updated with capture installed, then drains until caught up, rows/s;
  5. the write path: pgbench TPS (simple-update, 2 clients, 20 s) on pgbench's own tables,
     without and with capture triggers on them.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import prepare, raw_limit  # noqa: E402
from warehouses import use_warehouse  # noqa: E402

from pg_replication.replicate.backfill import run_backfill  # noqa: E402
from pg_replication.replicate.capture import CaptureSettings, drain_captured  # noqa: E402
from pg_replication.config import parse_config  # noqa: E402
from pg_replication.source.catalog import introspect  # noqa: E402
from pg_replication.source.connection import connect  # noqa: E402
from pg_replication.source.triggers import install, uninstall  # noqa: E402
from pg_replication.replicate.strategies import sync_table  # noqa: E402
from pg_replication.warehouse.connect import open_warehouse  # noqa: E402

PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"


def _table(url: str, entry: dict):
    config = parse_config({"tables": [entry]})
    with connect(url) as conn:
        (table,) = introspect(conn, config)
    return config, table


def _backfilled(url: str, kind: str, entry: dict):
    use_warehouse(kind, os.environ["POSTGRES_URL"])
    config, table = _table(url, entry)
    with open_warehouse(config) as wh:
        run_backfill(url, wh, table, range(4), partitions=4)
    return config, table


def _update(url: str, changes: int) -> None:
    """``changes`` rows updated in transactions of 1,000, their cursor moved past every watermark."""
    with psycopg.connect(url, autocommit=True) as conn:
        for start in range(1, changes + 1, 1000):
            conn.execute(
                "UPDATE bench_rows SET qty = qty + 1, created_at = now() + interval '1 day' WHERE id BETWEEN %s AND %s",
                (start, start + 999),
            )


def bench_reload(url: str, kind: str, rows: int) -> float:
    config, table = _backfilled(url, kind, {"name": "bench_rows", "strategy": "reload"})
    with open_warehouse(config) as wh:
        started = time.perf_counter()
        result = sync_table(url, wh, table)
        elapsed = time.perf_counter() - started
    assert result.mode == "reloaded" and result.rows == rows, result
    return rows / elapsed


def bench_updated_at(url: str, kind: str, changes: int) -> float:
    config, table = _backfilled(url, kind, {"name": "bench_rows", "strategy": "updated_at", "cursor": "created_at", "lookback": "0 s"})
    _update(url, changes)
    with open_warehouse(config) as wh:
        started = time.perf_counter()
        result = sync_table(url, wh, table)
        elapsed = time.perf_counter() - started
    assert result.rows >= changes, result  # and the rows at the old watermark itself
    return result.rows / elapsed


def bench_triggers(url: str, kind: str, changes: int) -> float:
    config, table = _table(url, {"name": "bench_rows", "strategy": "triggers"})
    with connect(url) as conn:
        install(conn, [table])
    try:
        config, table = _backfilled(url, kind, {"name": "bench_rows", "strategy": "triggers"})
        _update(url, changes)
        with open_warehouse(config) as wh:
            started = time.perf_counter()
            applied = 0
            while True:
                result = drain_captured(url, wh, [table], CaptureSettings(max_changes=100_000))
                applied += result.changes
                if result.caught_up:
                    break
            elapsed = time.perf_counter() - started
    finally:
        with connect(url) as conn:
            uninstall(conn)
    assert applied == changes, applied
    return changes / elapsed


def pgbench_tps(admin_url: str, seconds: int) -> tuple[float, float]:
    """simple-update TPS on pgbench's tables, without and with capture triggers."""
    params = psycopg.conninfo.conninfo_to_dict(admin_url)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS pgr_bench_pgbench WITH (FORCE)")
        admin.execute("CREATE DATABASE pgr_bench_pgbench")
    params["dbname"] = "pgr_bench_pgbench"
    url = psycopg.conninfo.make_conninfo(**params)
    env = {**os.environ, "PGHOST": params.get("host", ""), "PGPORT": str(params.get("port", "")), "PGUSER": params.get("user", "")}
    subprocess.run([PGBENCH, "-i", "-q", "-s", "10", "pgr_bench_pgbench"], check=True, env=env, capture_output=True)

    def run() -> float:
        out = subprocess.run(
            [PGBENCH, "-N", "-c", "2", "-j", "2", "-T", str(seconds), "pgr_bench_pgbench"], check=True, env=env, capture_output=True, text=True
        ).stdout
        return float(re.search(r"tps = ([0-9.]+)", out).group(1))  # type: ignore[union-attr]

    without = run()
    config = parse_config({"tables": [{"name": n, "strategy": "triggers"} for n in ("pgbench_accounts", "pgbench_tellers", "pgbench_branches")]})
    with connect(url) as conn:
        install(conn, introspect(conn, config))
    with_triggers = run()
    return without, with_triggers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--changes", type=int, default=200_000)
    parser.add_argument("--warehouse", choices=("duckdb", "postgres"), default="duckdb")
    parser.add_argument("--pgbench-seconds", type=int, default=20)
    args = parser.parse_args()
    admin = os.environ["POSTGRES_URL"]
    url = prepare(admin, args.rows)
    limit, _ = raw_limit(url)
    print(f"raw limit     : {limit:>10,.0f} rows/s (2 COPY streams over CTID halves)", flush=True)
    reload = bench_reload(url, args.warehouse, args.rows)
    print(f"reload        : {reload:>10,.0f} rows/s   ratio to limit {reload / limit:.2f}  ({args.rows:,} rows, read + load + swap)", flush=True)
    prepare(admin, args.rows)
    updated = bench_updated_at(url, args.warehouse, args.changes)
    print(f"updated_at    : {updated:>10,.0f} rows/s applied  ({args.changes:,} updated rows, one sync)", flush=True)
    prepare(admin, args.rows)
    captured = bench_triggers(url, args.warehouse, args.changes)
    print(f"triggers      : {captured:>10,.0f} rows/s applied  ({args.changes:,} captured updates, drained)", flush=True)
    without, with_triggers = pgbench_tps(admin, args.pgbench_seconds)
    print(f"pgbench -N    : {without:>10,.0f} TPS without triggers, {with_triggers:,.0f} with ({with_triggers / without:.2f} of it)")


if __name__ == "__main__":
    main()
