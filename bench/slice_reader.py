"""One slice in process, without Dagster: the binary COPY reader alone and with DuckDB's insert.

    python bench/slice_reader.py --rows 2000000

Uses the table of bench/backfill.py (database ``pgr_bench`` of the server in POSTGRES_URL) and
measures in the same run: the raw limit (two COPY streams into nothing), the whole table read
as one slice by ``SliceReader`` into nothing, then read and written by ``write_slice`` into an
in-memory DuckDB. Prints rows/s, the ratios to the limit and the client CPU-seconds of each.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import prepare, raw_limit  # noqa: E402

from pg_replication.config import parse_config  # noqa: E402
from pg_replication.source.catalog import introspect  # noqa: E402
from pg_replication.source.connection import connect  # noqa: E402
from pg_replication.source.snapshot import SliceReader, make_plan  # noqa: E402
from pg_replication.warehouse.duckdb import DuckDBWarehouse  # noqa: E402


def timed(work) -> tuple[int, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    rows = work()
    return rows, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    args = parser.parse_args()
    url = prepare(os.environ["POSTGRES_URL"], args.rows)
    with connect(url) as conn:
        (table,) = introspect(conn, parse_config({"tables": ["public.bench_rows"]}))
        plan = make_plan(conn, table, 1, "0/0")
    warehouse = DuckDBWarehouse(duckdb.connect())
    warehouse.ensure_table(table)

    def read_only() -> int:
        reader = SliceReader(url, table, plan.slices[0], mapper=warehouse.map_column)
        try:
            return sum(batch.num_rows for batch in reader)
        finally:
            reader.close()

    def read_and_insert() -> int:
        reader = SliceReader(url, table, plan.slices[0], mapper=warehouse.map_column)
        try:
            return warehouse.write_slice(table, 0, reader).rows
        finally:
            reader.close()

    limit, _ = raw_limit(url)
    print(f"raw limit      : {limit:>10,.0f} rows/s  (2 COPY streams over CTID halves)")
    for name, work in (("read only", read_only), ("read + DuckDB", read_and_insert)):
        rows, wall, cpu = timed(work)
        print(f"{name:15s}: {rows / wall:>10,.0f} rows/s  ratio {rows / wall / limit:.2f}   client CPU {cpu:.1f} s for {rows:,} rows")


if __name__ == "__main__":
    main()
