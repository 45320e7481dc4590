"""What a backfill slice's query costs the source: server CPU-seconds of one backend running the
slice's ``COPY (SELECT …) TO STDOUT (FORMAT binary)`` against the limit's ``COPY (SELECT *) TO
STDOUT``, over the same rows, alternately.

    python bench/slice_query.py --rows 2000000 [--warehouse duckdb|snowflake|…] [--rounds 3]

Uses ``bench_rows`` (built by bench/backfill.py in database ``pgr_bench`` of POSTGRES_URL). The
backend's CPU time is read from /proc, so the source must run on this machine; CPU time moves
less than wall time when other work shares the cores, and the ratio is what to read.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import prepare  # noqa: E402

from pg_replication.config import parse_config  # noqa: E402
from pg_replication.source import binary_copy  # noqa: E402
from pg_replication.source.catalog import introspect  # noqa: E402
from pg_replication.source.connection import connect  # noqa: E402
from pg_replication.source.snapshot import column_mappings  # noqa: E402
from pg_replication.types import SESSION_OPTIONS  # noqa: E402
from pg_replication.warehouse.connect import type_mapper  # noqa: E402


def backend_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--warehouse", default="duckdb")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    url = prepare(os.environ["POSTGRES_URL"], args.rows)
    with connect(url) as conn:
        (table,) = introspect(conn, parse_config({"tables": ["public.bench_rows"]}))
    columns = binary_copy.read_columns(column_mappings(table, type_mapper(args.warehouse)))
    queries = {
        "limit (text, SELECT *)": sql.SQL("COPY (SELECT * FROM {}) TO STDOUT").format(table.ident),
        f"slice for {args.warehouse}": sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT (FORMAT binary)").format(
            binary_copy.select_list(columns), table.ident
        ),
    }
    spent: dict[str, list[float]] = {name: [] for name in queries}
    with psycopg.connect(url, options=SESSION_OPTIONS) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        for _ in range(args.rounds):
            for name, query in queries.items():
                cpu, began, moved = backend_cpu(pid), time.perf_counter(), 0
                with conn.cursor().copy(query) as copy:
                    for chunk in copy:
                        moved += len(chunk)
                spent[name].append(backend_cpu(pid) - cpu)
                print(f"{name:24s}: server {spent[name][-1]:5.2f} CPU-s, {time.perf_counter() - began:5.2f} s, {moved / 2**20:,.0f} MiB", flush=True)
    limit, ours = (min(v) for v in spent.values())
    print(f"slice query / limit, server CPU (best of {args.rounds} each): {ours / limit:.2f}")


if __name__ == "__main__":
    main()
