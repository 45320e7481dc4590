"""End-to-end freshness with the real Dagster daemon and sensor: commit in Postgres -> visible in DuckDB.

    python bench/freshness.py --rate 500 --seconds 90

Backfills a small table (database ``pgr_bench``) through the ``dagster`` CLI, starts
``dagster-daemon run`` (the CDC sensor with its default 10 s interval, the run queue, runs
launched as subprocesses), writes ``--rate`` single-row transactions per second for ``--seconds``,
then matches each row's commit time with the drain run that applied it (the materialization
event's time and last LSN) and prints the p50 / p90 / p99 / max freshness.
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
    args = parser.parse_args()

    url = bench_database(os.environ["POSTGRES_URL"])
    with psycopg.connect(url, autocommit=True) as conn:
        for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE slot_name = 'pgr_fresh'").fetchall():
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.execute("DROP PUBLICATION IF EXISTS pgr_fresh")
        conn.execute("DROP TABLE IF EXISTS fresh_events")
        conn.execute(
            "CREATE TABLE fresh_events (id bigserial PRIMARY KEY, payload text, "
            "created_at timestamptz DEFAULT clock_timestamp(), lsn pg_lsn DEFAULT pg_current_wal_insert_lsn())"
        )

    work = Path(tempfile.mkdtemp(prefix="pgr_fresh_"))
    (work / "replication.yaml").write_text(
        "source: {slot: pgr_fresh, publication: pgr_fresh}\n"
        f"warehouse: {{path: {work / 'fresh.duckdb'}}}\n"
        "defaults: {partitions: 1}\ntables: [public.fresh_events]\n"
    )
    home = work / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    (work / "workspace.yaml").write_text(
        "load_from:\n  - python_module:\n      module_name: pg_replication.definitions\n      location_name: bench\n"
    )
    env = {**os.environ, "POSTGRES_URL": url, "DAGSTER_HOME": str(home), "PG_REPLICATION_CONFIG": str(work / "replication.yaml")}
    env.pop("DUCKDB_PATH", None)
    subprocess.run(
        [str(BIN / "dagster"), "asset", "materialize", "-m", "pg_replication.definitions", "--select", "public/fresh_events",
         "--partition-range", "000...000"],
        env=env, cwd=work, check=True, capture_output=True,
    )
    daemon = subprocess.Popen(
        [str(BIN / "dagster-daemon"), "run", "-w", str(work / "workspace.yaml")],
        env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        print(f"writing {args.rate} transactions/s for {args.seconds} s with the daemon running ...", flush=True)
        with psycopg.connect(url, autocommit=True) as conn:
            started = time.monotonic()
            for i in range(args.rate * args.seconds):
                conn.execute("INSERT INTO fresh_events (payload) VALUES ('x')")
                ahead = started + (i + 1) / args.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)  # pacing the load generator, not synchronisation
            last_lsn = conn.execute("SELECT max(lsn) FROM fresh_events").fetchone()[0]
            rows = conn.execute("SELECT extract(epoch FROM created_at)::float8, lsn::text FROM fresh_events ORDER BY lsn").fetchall()
        events = wait_for_drains(env, last_lsn, deadline=time.monotonic() + 180)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=60)
        with psycopg.connect(url, autocommit=True) as conn:  # an undrained slot would pin WAL
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'pgr_fresh'")
    report(rows, events, args)


def wait_for_drains(env: dict, last_lsn: str, deadline: float) -> list[tuple[int, float]]:
    """(last LSN applied, time) of every CDC materialization, once one covers ``last_lsn``."""
    from dagster import AssetKey, DagsterInstance

    from pg_replication.source.pgoutput import lsn_to_int

    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    os.chdir(Path(env["DAGSTER_HOME"]).parent)  # dagster.yaml's storage path is relative to it
    target = lsn_to_int(last_lsn)
    with DagsterInstance.get() as instance:
        while True:
            records = instance.fetch_materializations(AssetKey(["public", "fresh_events"]), limit=10_000).records
            events = sorted(
                (lsn_to_int(r.asset_materialization.metadata["last_lsn"].value), r.timestamp)
                for r in records
                if "last_lsn" in r.asset_materialization.metadata
            )
            if events and events[-1][0] >= target:
                return events
            if time.monotonic() > deadline:
                raise SystemExit("the daemon did not drain everything within 180 s after the writes")
            time.sleep(1)


def report(rows, events, args) -> None:
    from pg_replication.source.pgoutput import lsn_to_int

    lsns = [e[0] for e in events]
    freshness = []
    for created, lsn in rows:
        i = bisect_left(lsns, lsn_to_int(lsn))
        if i < len(events):
            freshness.append(events[i][1] - created)
    freshness.sort()

    def pct(p: float) -> float:
        return freshness[min(len(freshness) - 1, int(p * len(freshness)))]

    print(f"rows: {len(rows):,}  drains: {len(events)}  rate: {args.rate}/s for {args.seconds} s")
    print(f"freshness p50 {pct(0.5):.1f} s   p90 {pct(0.9):.1f} s   p99 {pct(0.99):.1f} s   max {freshness[-1]:.1f} s")


if __name__ == "__main__":
    main()
