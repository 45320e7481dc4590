"""DuckDB settings against the backfill: the whole in-process backfill (``run_backfill``: the
binary readers, DuckDB's inserts and commits) into a fresh DuckDB file per run, once per setting,
alternately, each run next to the raw limit measured just before it.

    python bench/duckdb_settings.py --rows 2000000 [--partitions 4] [--rounds 3]

Settings: DuckDB's (``write_buffer_row_group_count``, ``preserve_insertion_order``, disabled
compression methods) and the backfill's reader threads. Uses ``bench_rows`` (built by bench/backfill.py in database ``pgr_bench`` of POSTGRES_URL). No
Dagster: what is compared is the part a setting can change. Prints per run the seconds, rows/s,
the ratio to the limit, this process's CPU-seconds and the file size, and per setting the median
ratio.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import prepare, raw_limit  # noqa: E402

from pg_replication.config import parse_config  # noqa: E402
from pg_replication.replicate.backfill import run_backfill  # noqa: E402
from pg_replication.source.catalog import introspect  # noqa: E402
from pg_replication.source.connection import connect  # noqa: E402
from pg_replication.warehouse.duckdb import DuckDBWarehouse  # noqa: E402

# name -> (DuckDB statements run on the fresh file, run_backfill's reader threads)
VARIANTS: dict[str, tuple[list[str], int]] = {
    "defaults": ([], 2),
    # Row groups compressed and written as the INSERT fills them (one at a time, 122,880 rows),
    # while the readers keep reading, instead of five at a time or at the COMMIT.
    "flush each row group": (["SET write_buffer_row_group_count = 1"], 2),
    "no insertion order": (["SET preserve_insertion_order = false"], 2),
    "one reader": ([], 1),
    "three readers": ([], 3),
    # Strings stored as they are (no FSST): the cost of compressing them, at the price of the file size.
    "no fsst": (["SET disabled_compression_methods = 'fsst,dict_fsst'"], 2),
}


def one_run(url: str, table, partitions: int, settings: list[str], readers: int) -> tuple[float, float, int]:
    folder = tempfile.mkdtemp(prefix="pgr_bench_settings_")
    path = os.path.join(folder, "w.duckdb")
    cpu = _cpu()
    started = time.perf_counter()
    with duckdb.connect(path) as conn:
        for setting in settings:
            conn.execute(setting)
        wh = DuckDBWarehouse(conn)
        wh.ensure_table(table)
        run_backfill(url, wh, table, range(partitions), partitions=partitions, readers=readers)
    elapsed = time.perf_counter() - started  # the close (DuckDB's last checkpoint) included
    client_cpu = _cpu() - cpu
    size = os.path.getsize(path)
    os.remove(path)
    os.rmdir(folder)
    return elapsed, client_cpu, size


def _cpu() -> float:
    """CPU-seconds of this process: every thread (readers, DuckDB's workers)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="settings to compare (default: all)")
    args = parser.parse_args()
    url = prepare(os.environ["POSTGRES_URL"], args.rows)
    with connect(url) as conn:
        (table,) = introspect(conn, parse_config({"tables": ["public.bench_rows"]}))
    ratios: dict[str, list[float]] = {name: [] for name in args.only or VARIANTS}
    for _ in range(args.rounds):
        for name in ratios:
            limit, _ = raw_limit(url)
            elapsed, client_cpu, size = one_run(url, table, args.partitions, *VARIANTS[name])
            rate = args.rows / elapsed
            ratios[name].append(rate / limit)
            print(
                f"{name:22s}: {elapsed:6.2f} s  {rate:>9,.0f} rows/s  limit {limit:>9,.0f}  ratio {rate / limit:.2f}  "
                f"client {client_cpu:5.2f} CPU-s  file {size / 2**20:,.0f} MiB",
                flush=True,
            )
    for name, values in ratios.items():
        print(f"{name:22s}: median ratio {statistics.median(values):.2f}  ({', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
