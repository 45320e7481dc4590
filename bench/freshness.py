"""End-to-end freshness with the real Dagster daemon and sensor: commit in Postgres -> visible in DuckDB.

    python bench/freshness.py --rate 1000 --seconds 60
    python bench/freshness.py --rate 0 --seconds 120 --run-seconds 20   # idle: runs it costs

Backfills a small table (database ``pgr_bench``) through the ``dagster`` CLI, starts
``dagster-daemon run`` (the CDC sensor with its default 10 s interval, the run queue, runs
launched as subprocesses; drain runs stay up ``--run-seconds``), waits until a drain run applied
a first change (the daemon, the code server and the first run take a while to start: that wait
is printed, not measured), writes ``--rate`` single-row transactions per second for
``--seconds``, then matches each row's commit time with the micro-batch that applied it (the
materialization event's time and last LSN) and prints the p50 / p90 / p99 / max freshness and
the drain runs used.

With ``--rate 0`` the source is idle but WAL keeps moving (``--noise`` rows per second into a
table the publication does not hold): it prints how many drain runs the sensor started meanwhile
and whether the slot advanced.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from bisect import bisect_left
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import bench_database  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=500, help="transactions per second")
    parser.add_argument("--seconds", type=int, default=90)
    parser.add_argument("--run-seconds", type=int, default=300, help="source.run_seconds: how long a drain run stays up")
    parser.add_argument("--noise", type=int, default=50, help="idle mode: rows per second into an unpublished table")
    args = parser.parse_args()

    url = bench_database(os.environ["POSTGRES_URL"])
    with psycopg.connect(url, autocommit=True) as conn:
        for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE slot_name = 'pgr_fresh'").fetchall():
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.execute("DROP PUBLICATION IF EXISTS pgr_fresh")
        conn.execute("DROP TABLE IF EXISTS fresh_events, fresh_noise")
        conn.execute("CREATE TABLE fresh_noise (id bigserial PRIMARY KEY, payload text)")
        conn.execute(
            "CREATE TABLE fresh_events (id bigserial PRIMARY KEY, payload text, "
            "created_at timestamptz DEFAULT clock_timestamp(), lsn pg_lsn DEFAULT pg_current_wal_insert_lsn())"
        )

    work = Path(tempfile.mkdtemp(prefix="pgr_fresh_"))
    (work / "replication.yaml").write_text(
        f"source: {{slot: pgr_fresh, publication: pgr_fresh, run_seconds: {args.run_seconds}}}\n"
        f"warehouse: {{path: {work / 'fresh.duckdb'}}}\n"
        "defaults: {partitions: 1}\ntables: [public.fresh_events]\n"
    )
    home = work / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    (work / "workspace.yaml").write_text(
        "load_from:\n  - python_module:\n      module_name: pg_replication.dagster.definitions\n      location_name: bench\n"
    )
    env = {**os.environ, "POSTGRES_URL": url, "DAGSTER_HOME": str(home), "PG_REPLICATION_CONFIG": str(work / "replication.yaml")}
    env.pop("DUCKDB_PATH", None)
    subprocess.run(
        [str(BIN / "dagster"), "asset", "materialize", "-m", "pg_replication.dagster.definitions", "--select", "public/fresh_events",
         "--partition-range", "000...000"],
        env=env, cwd=work, check=True, capture_output=True,
    )
    daemon = subprocess.Popen(
        [str(BIN / "dagster-daemon"), "run", "-w", str(work / "workspace.yaml")],
        env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        started = time.monotonic()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO fresh_events (payload) VALUES ('warm-up')")
            first = conn.execute("SELECT max(lsn)::text FROM fresh_events").fetchone()[0]
        wait_for_drains(env, first, deadline=time.monotonic() + 300)
        print(f"first change applied {time.monotonic() - started:.1f} s after the daemon started (not measured)", flush=True)
        if args.rate == 0:
            idle(url, env, args)
            return
        print(f"writing {args.rate} transactions/s for {args.seconds} s with the daemon running ...", flush=True)
        with psycopg.connect(url, autocommit=True) as conn:
            since = conn.execute("SELECT max(lsn) FROM fresh_events").fetchone()[0]
            started = time.monotonic()
            for i in range(args.rate * args.seconds):
                conn.execute("INSERT INTO fresh_events (payload) VALUES ('x')")
                ahead = started + (i + 1) / args.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)  # pacing the load generator, not synchronisation
            wrote = time.monotonic() - started
            last_lsn = conn.execute("SELECT max(lsn) FROM fresh_events").fetchone()[0]
            rows = conn.execute(
                "SELECT extract(epoch FROM created_at)::float8, lsn::text FROM fresh_events WHERE lsn > %s ORDER BY lsn", (since,)
            ).fetchall()
        events = wait_for_drains(env, last_lsn, deadline=time.monotonic() + 180)
        report(rows, events, args, wrote)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=60)
        with psycopg.connect(url, autocommit=True) as conn:  # an undrained slot would pin WAL
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'pgr_fresh'")


def idle(url: str, env: dict, args) -> None:
    """No change to apply for ``--seconds`` while WAL moves: the drain runs started meanwhile."""
    from dagster import DagsterInstance, RunsFilter

    with DagsterInstance.get() as instance:
        before = {r.run_id for r in instance.get_runs(RunsFilter(job_name="postgres_cdc_drain"))}
    print(f"idle for {args.seconds} s, {args.noise} rows/s into an unpublished table ...", flush=True)
    with psycopg.connect(url, autocommit=True) as conn:
        slot = "SELECT confirmed_flush_lsn, pg_current_wal_lsn() FROM pg_replication_slots WHERE slot_name = 'pgr_fresh'"
        confirmed_before, _ = conn.execute(slot).fetchone()
        started = time.monotonic()
        for i in range(max(1, args.noise * args.seconds)):
            conn.execute("INSERT INTO fresh_noise (payload) VALUES (repeat('x', 100))")
            ahead = started + (i + 1) / max(1, args.noise) - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        confirmed_after, current = conn.execute(slot).fetchone()
        moved = conn.execute("SELECT %s::pg_lsn - %s::pg_lsn", (current, confirmed_before)).fetchone()[0]
    with DagsterInstance.get() as instance:
        runs = [r for r in instance.get_runs(RunsFilter(job_name="postgres_cdc_drain")) if r.run_id not in before]
    print(f"idle {args.seconds} s: {len(runs)} drain run(s) started (one per 10 s sensor tick would be {args.seconds // 10}); "
          f"WAL moved {int(moved):,} bytes; slot confirmed {confirmed_before} -> {confirmed_after}")


def wait_for_drains(env: dict, last_lsn: str, deadline: float) -> list[tuple[int, float, str]]:
    """(last LSN applied, time, run id) of every CDC materialization, once one covers ``last_lsn``."""
    from dagster import AssetKey, DagsterInstance

    from pg_replication.source.pgoutput import lsn_to_int

    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    os.chdir(Path(env["DAGSTER_HOME"]).parent)  # dagster.yaml's storage path is relative to it
    target = lsn_to_int(last_lsn)
    with DagsterInstance.get() as instance:
        while True:
            records = instance.fetch_materializations(AssetKey(["public", "fresh_events"]), limit=10_000).records
            events = sorted(
                (lsn_to_int(r.asset_materialization.metadata["last_lsn"].value), r.timestamp, r.run_id)
                for r in records
                if "last_lsn" in r.asset_materialization.metadata
            )
            if events and events[-1][0] >= target:
                return events
            if time.monotonic() > deadline:
                raise SystemExit("the daemon did not drain everything in time")
            time.sleep(1)


def report(rows, events, args, wrote: float) -> None:
    from pg_replication.source.pgoutput import lsn_to_int

    events = [e for e in events if rows and e[0] >= lsn_to_int(rows[0][1])]  # the measured window's
    lsns = [e[0] for e in events]
    freshness = []
    for created, lsn in rows:
        i = bisect_left(lsns, lsn_to_int(lsn))
        if i < len(events):
            freshness.append(events[i][1] - created)
    freshness.sort()

    def runs_used(events) -> int:
        return len({e[2] for e in events})

    def pct(p: float) -> float:
        return freshness[min(len(freshness) - 1, int(p * len(freshness)))]

    print(f"rows: {len(rows):,}  micro-batches: {len(events)}  rate: {len(rows) / wrote:,.0f}/s for {wrote:.0f} s "
          f"(asked {args.rate}/s)  drain runs: {runs_used(events)}")
    print(f"freshness p50 {pct(0.5):.1f} s   p90 {pct(0.9):.1f} s   p99 {pct(0.99):.1f} s   max {freshness[-1]:.1f} s")


if __name__ == "__main__":
    main()
