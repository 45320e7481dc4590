"""CDC benchmark: drain + apply throughput against the server's own decode limit.

    python bench/cdc.py [--changes 1000000] [--warehouse duckdb|postgres|snowflake|clickhouse] [--batch N]
        [--per-drain-sessions | --job-path] [--profile FILE]

On the backfill benchmark's table (``bench_rows`` in database ``pgr_bench``, built if missing, 2M
rows by default) backfilled into a fresh warehouse (bench/warehouses.py) and caught up (a drain
that reads past the WAL the backfill wrote: the replica's own 2M rows share the source's server),
it writes N changes (40% inserts, 40% updates, 20% deletes, in transactions of 1,000), then
measures in the same run, over the same WAL (a second slot created just before the changes):
  1. the decode limit: ``SELECT count(*) FROM pg_logical_slot_peek_binary_changes(...)``;
  2. Postgres's own streaming client, ``pg_recvlogical`` (C), receiving the same changes into
     /dev/null: a reference, not a limit (it reads each message as it comes, and we read faster
     over TCP: 1M-change runs took 136-173 k changes/s into DuckDB beside its 116-145 k);
  3. our drain: stream (START_REPLICATION) + decode + fold + apply + commit + slot confirm,
     until caught up: batches of ``--batch`` changes through one replication session, each
     applied while the next is read (``drain_session``), or with ``--per-drain-sessions`` one
     ``drain_once`` (a session) per batch, as the tree before it did; or with ``--job-path`` what
     the drain job runs in a long-lived run (``drain_loop.drain_run``: 1 s micro-batches of at
     most ``--batch`` changes, the DuckDB file opened for each warehouse call).
Prints changes/s, the ratio to the limit, the CPU time this process spent on the drains (user +
system: the client's own cost, which the other load on a shared machine moves much less than the
wall-clock time) and its peak RSS. ``--profile`` writes a cProfile of the drains (read it with
``python -m pstats FILE``).
"""

from __future__ import annotations

import argparse
import cProfile
import glob
import os
import resource
import shutil
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import prepare  # noqa: E402
from warehouses import KINDS, use_warehouse  # noqa: E402

from pg_replication.replicate.backfill import SlotSettings, run_backfill  # noqa: E402
from pg_replication.replicate.cdc import DrainSettings, drain_once  # noqa: E402
from pg_replication.config import parse_config  # noqa: E402
from pg_replication.source.catalog import introspect  # noqa: E402
from pg_replication.source.connection import connect  # noqa: E402
from pg_replication.warehouse.connect import open_warehouse  # noqa: E402

SLOT, PUBLICATION = "pgr_bench_cdc", "pgr_bench_cdc"
STREAM_SLOT = "pgr_bench_cdc_stream"  # read by pg_recvlogical only


def write_changes(url: str, changes: int, rows: int) -> None:
    """Transactions of 1,000 changes: 400 inserts, 400 updates, 200 deletes."""
    with psycopg.connect(url, autocommit=True) as conn:
        top = conn.execute("SELECT max(id) FROM bench_rows").fetchone()[0]
        for t in range(changes // 1000):
            base = 1 + (t * 600) % (rows - 1000)
            with conn.transaction():
                conn.execute(
                    "INSERT INTO bench_rows SELECT i, 1, 2.50, 'new ' || i, now(), true, '{\"k\": 1}', ARRAY['x'] "
                    "FROM generate_series(%s::bigint, %s::bigint) i", (top + 1, top + 400),
                )
                conn.execute("UPDATE bench_rows SET qty = qty + 1, title = title || '!' WHERE id BETWEEN %s AND %s", (base, base + 399))
                conn.execute("DELETE FROM bench_rows WHERE id BETWEEN %s AND %s", (base + 400, base + 599))
            top += 400


def decode_limit(url: str) -> tuple[float, int]:
    """Messages/s the server decodes from STREAM_SLOT (a peek: the slot does not move)."""
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        n = conn.execute(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, 'proto_version', '1', "
            "'publication_names', %s)", (STREAM_SLOT, PUBLICATION),
        ).fetchone()[0]
        return n / (time.perf_counter() - started), n


def _pg_recvlogical() -> str | None:
    found = shutil.which("pg_recvlogical")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_recvlogical"))
    return candidates[-1] if candidates else None


def _drop_slot(url: str, slot: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone():
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))


def pg_recvlogical_rate(url: str, messages: int) -> float | None:
    """Messages/s ``pg_recvlogical`` receives from STREAM_SLOT up to the current WAL position."""
    binary = _pg_recvlogical()
    if binary is None:
        return None
    with psycopg.connect(url, autocommit=True) as conn:
        end = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
    command = [binary, "-d", url, "--slot", STREAM_SLOT, "--start", "-o", "proto_version=1", "-o", f"publication_names={PUBLICATION}",
               "-E", end, "--no-loop", "-f", "/dev/null"]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return messages / (time.perf_counter() - started)


def catch_up(url: str, wh, table) -> None:
    """Drain past the backfill's own WAL (a replica on this server wrote it), twice after a
    CHECKPOINT: the slot's restart point moves only to a snapshot record (which a CHECKPOINT
    writes) decoded and then confirmed, so the drains measured next start near the changes."""
    for _ in range(2):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
        while not drain_once(url, wh, [table], DrainSettings(SLOT, PUBLICATION)).caught_up:
            pass
    with psycopg.connect(url, autocommit=True) as conn:
        lag = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn) FROM pg_replication_slots WHERE slot_name = %s", (SLOT,)
        ).fetchone()[0]
    print(f"caught up     : the slot's restart point is {int(lag) / 1e6:,.1f} MB of WAL behind", flush=True)


def drain(url: str, config, table, settings: DrainSettings, args) -> tuple[int, int]:
    """Drain until every change is applied, the way ``args`` says: (changes applied, batches)."""
    applied = drains = 0
    if args.job_path:
        from pg_replication.replicate.drain_loop import LoopSettings, drain_run

        read = replace(settings, max_seconds=1.0)  # the drain job's batch_seconds in a long-lived run
        run = drain_run(url, lambda: open_warehouse(config), [table], [], read, LoopSettings(run_seconds=600), lambda m: None,
                        per_call=args.warehouse == "duckdb")
        with closing(run):
            for batch in run:
                applied, drains = applied + batch.slot.changes, drains + 1
                if applied >= args.changes and batch.slot.caught_up:
                    return applied, drains
        return applied, drains
    with open_warehouse(config) as wh:
        if args.per_drain_sessions:
            while True:
                result = drain_once(url, wh, [table], settings)
                applied, drains = applied + result.changes, drains + 1
                if result.caught_up:
                    return applied, drains
        from pg_replication.replicate.drain_session import drain_session

        for result in drain_session(url, wh, [table], settings, max_seconds=600):
            applied, drains = applied + result.changes, drains + 1
    return applied, drains


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    # A million: the steady rate of a backlog; at 200,000 the session's start and the last batch's
    # apply, which no read overlaps (about 0.3 s together), are a fifth of the run.
    parser.add_argument("--changes", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=50_000, help="max changes per batch (the tree before used 200,000)")
    parser.add_argument("--per-drain-sessions", action="store_true", help="one drain_once (and replication session) per batch")
    parser.add_argument("--job-path", action="store_true", help="the drain job's long-lived run (drain_loop.drain_run)")
    parser.add_argument("--warehouse", choices=KINDS, default="duckdb")
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of the drains to FILE (slows them down)")
    args = parser.parse_args()
    url = prepare(os.environ["POSTGRES_URL"], args.rows)
    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (SLOT,)).fetchone():
            conn.execute("SELECT pg_drop_replication_slot(%s)", (SLOT,))
    config = parse_config({"tables": ["bench_rows"]})
    with connect(url) as conn:
        (table,) = introspect(conn, config)
    where = use_warehouse(args.warehouse, os.environ["POSTGRES_URL"])
    print(f"backfilling {args.rows:,} rows into {where} ...", flush=True)
    with open_warehouse(config) as wh:
        run_backfill(url, wh, table, range(4), partitions=4, cdc=SlotSettings(SLOT, PUBLICATION))
        catch_up(url, wh, table)
    _drop_slot(url, STREAM_SLOT)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (STREAM_SLOT,))
    print(f"writing {args.changes:,} changes ...", flush=True)
    write_changes(url, args.changes, args.rows)
    limit, messages = decode_limit(url)
    print(f"decode limit  : {limit:>10,.0f} messages/s  (server-side count over peek, {messages:,} messages)")
    streamed = pg_recvlogical_rate(url, messages)
    _drop_slot(url, STREAM_SLOT)
    if streamed is None:
        print("pg_recvlogical: not measured (not installed)")
    else:
        print(f"pg_recvlogical: {streamed:>10,.0f} messages/s  (Postgres's own client into /dev/null, the same changes)")
    settings = DrainSettings(SLOT, PUBLICATION, max_changes=args.batch)
    profiler = cProfile.Profile() if args.profile else None
    started, cpu_started = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    applied, drains = drain(url, config, table, settings, args)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    if profiler:
        profiler.disable()
        profiler.dump_stats(args.profile)
    ours = messages / elapsed
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"pg_replication: {applied / elapsed:>9,.0f} changes/s applied into {args.warehouse} ({applied:,} changes, {drains} batches of <= {args.batch:,}, "
          f"{'a session each' if args.per_drain_sessions else 'the drain job path' if args.job_path else 'one session'}, {elapsed:.1f} s)")
    print(f"ratio to limit: {ours / limit:.2f} (messages/s over the same stream)   peak RSS: {peak_mib:,.0f} MiB")
    if streamed is not None:
        print(f"ratio to pg_recvlogical: {ours / streamed:.2f}")
    print(f"client CPU    : {cpu:.2f} s ({cpu / max(applied, 1) * 1e6:.1f} µs per change; the rest of the wall time waits on the servers)")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (SLOT,))


if __name__ == "__main__":
    main()
