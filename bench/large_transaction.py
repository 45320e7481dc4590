"""One large transaction: drain it and report the drain's peak memory and the source's disk use.

    python bench/large_transaction.py --changes 5000000 [--warehouse duckdb|postgres]

In database ``pgr_bench_large`` (recreated), a table is backfilled (empty) into a fresh warehouse
(bench/warehouses.py); then ONE transaction inserts N rows and updates a tenth of them, and
drains run until caught up. With Postgres 14+ the server streams the transaction in parts while
it is in progress (pgoutput protocol 2) and the drain stages them in the warehouse, applying them
at the commit. Prints: drain time and changes/s, peak RSS of this process (the drain), the
source's temp-file bytes written meanwhile (``pg_stat_database.temp_bytes`` delta) and what the
slot streamed and spilled to disk (``pg_stat_replication_slots``), and checks the warehouse
holds the source's row count and sum.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))
from warehouses import use_warehouse  # noqa: E402

from pg_replication.replicate.backfill import SlotSettings, run_backfill  # noqa: E402
from pg_replication.replicate.cdc import DrainSettings, drain_once  # noqa: E402
from pg_replication.config import parse_config  # noqa: E402
from pg_replication.source.catalog import introspect  # noqa: E402
from pg_replication.source.connection import connect  # noqa: E402
from pg_replication.warehouse.connect import open_warehouse  # noqa: E402

SLOT, PUBLICATION, DATABASE = "pgr_bench_large", "pgr_bench_large", "pgr_bench_large"


def _database(admin_url: str) -> str:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        for (slot,) in admin.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s", (DATABASE,)):
            admin.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DATABASE)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    params = psycopg.conninfo.conninfo_to_dict(admin_url)
    params["dbname"] = DATABASE
    return psycopg.conninfo.make_conninfo(**params)


def _source_disk(conn: psycopg.Connection) -> tuple[int, int, int]:
    """(temp_bytes of the database, stream_bytes and spill_bytes of the slot)."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    temp = conn.execute("SELECT temp_bytes FROM pg_stat_database WHERE datname = current_database()").fetchone()[0]
    row = conn.execute("SELECT stream_bytes, spill_bytes FROM pg_stat_replication_slots WHERE slot_name = %s", (SLOT,)).fetchone()
    return int(temp), int(row[0]) if row else 0, int(row[1]) if row else 0


def _settled(conn: psycopg.Connection, deadline: float = 60.0) -> tuple[int, int, int]:
    """The source's counters once the drain's backends have reported them (stable for 2 s)."""
    last, since, give_up = _source_disk(conn), time.monotonic(), time.monotonic() + deadline
    while time.monotonic() - since < 2.0 and time.monotonic() < give_up:
        time.sleep(0.25)
        now = _source_disk(conn)
        if now != last:
            last, since = now, time.monotonic()
    return last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=5_000_000, help="rows inserted by the one transaction")
    parser.add_argument("--warehouse", choices=("duckdb", "postgres"), default="duckdb")
    args = parser.parse_args()
    url = _database(os.environ["POSTGRES_URL"])
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE big (id bigint PRIMARY KEY, n int, note text)")
        work_mem = conn.execute("SHOW logical_decoding_work_mem").fetchone()[0]
        version = conn.info.server_version
    config = parse_config({"tables": ["big"]})
    with connect(url) as conn:
        (table,) = introspect(conn, config)
    where = use_warehouse(args.warehouse, os.environ["POSTGRES_URL"])
    with open_warehouse(config) as wh:
        run_backfill(url, wh, table, range(1), partitions=1, cdc=SlotSettings(SLOT, PUBLICATION))
    updates = args.changes // 10
    print(f"one transaction: {args.changes:,} inserts + {updates:,} updates (Postgres {version}, "
          f"logical_decoding_work_mem {work_mem}) ...", flush=True)
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("INSERT INTO big SELECT g, g %% 1000, 'row ' || g FROM generate_series(1, %s::bigint) g", (args.changes,))
            conn.execute("UPDATE big SET n = -n WHERE id % 10 = 0")
        before = _settled(conn)
        baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        drains = applied = staged = 0
        seconds = 0.0  # in the drains (not in settling the source's counters between them)
        last = before
        with open_warehouse(config) as wh:
            while True:
                result = drain_once(url, wh, [table], DrainSettings(SLOT, PUBLICATION))
                drains, applied, staged = drains + 1, applied + result.changes, staged + result.staged_parts
                seconds += result.seconds
                now = _settled(conn)  # per drain: which session made the source write what
                print(f"  drain {drains}: {result.changes:,} changes, {result.bytes:,} bytes of pgoutput read, at most "
                      f"{result.held_bytes:,} held in memory, {result.staged_parts} part(s) staged, {result.seconds:.1f} s; "
                      f"source: temp files +{now[0] - last[0]:,} bytes, slot spilled +{now[2] - last[2]:,} bytes", flush=True)
                last = now
                if result.caught_up:
                    break
            count, total = wh.fetchall(f"SELECT count(*), sum(n) FROM {wh.table_name(table)}")[0]
        after = _settled(conn)
        expected = conn.execute("SELECT count(*), sum(n) FROM big").fetchone()
        conn.execute("SELECT pg_drop_replication_slot(%s)", (SLOT,))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"drained       : {applied:,} changes in {seconds:.1f} s ({applied / seconds:,.0f}/s), {drains} drain(s), "
          f"{staged} part(s) staged in {where}")
    print(f"drain RSS     : peak {peak_rss:,.0f} MiB (before the drain: {baseline_rss:,.0f} MiB)")
    print(f"source disk   : temp files +{after[0] - before[0]:,} bytes; slot streamed {after[1] - before[1]:,} bytes, "
          f"spilled to disk {after[2] - before[2]:,} bytes")
    ok = (int(count), int(total or 0)) == (int(expected[0]), int(expected[1] or 0))
    print(f"warehouse     : {int(count):,} rows, sum {int(total or 0):,} — {'equal to' if ok else 'DIFFERENT FROM'} the source")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
