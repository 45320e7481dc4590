"""What DuckDB's side of a backfill costs: the bench table's rows, already read into Arrow,
inserted into a fresh DuckDB file slice by slice (one transaction each), then the file closed.

    python bench/duckdb_writes.py --rows 2000000 [--slices 8]

Reads ``bench_rows`` (built by bench/backfill.py in database ``pgr_bench`` of POSTGRES_URL) once
with the backfill's own reader, then times insert, commit and close (DuckDB's final checkpoint)
with DuckDB's defaults, with compression forced off, with the checkpoint left to the close (no
checkpoint at a commit), without FSST, without insertion order and on one thread, alternately
(``--only`` picks some).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import prepare  # noqa: E402

from pg_replication.config import parse_config  # noqa: E402
from pg_replication.source.catalog import introspect  # noqa: E402
from pg_replication.source.connection import connect  # noqa: E402
from pg_replication.source.snapshot import Segment, read_slice  # noqa: E402
from pg_replication.warehouse.connect import type_mapper  # noqa: E402


def write(batches: list[pa.RecordBatch], slices: int, setting: str | None) -> tuple[float, float, float, int]:
    folder = tempfile.mkdtemp(prefix="pgr_bench_duckdb_")
    path = os.path.join(folder, "w.duckdb")
    db = duckdb.connect(path)
    if setting:
        db.execute(setting)
    db.register("first", batches[0])
    db.execute("CREATE TABLE t AS SELECT * FROM first LIMIT 0")
    per_slice = -(-len(batches) // slices)
    inserting = committing = 0.0
    for start in range(0, len(batches), per_slice):
        began = time.perf_counter()
        db.execute("BEGIN")
        for batch in batches[start : start + per_slice]:
            db.register("pgr_batch", batch)
            db.execute("INSERT INTO t SELECT * FROM pgr_batch")
        inserted = time.perf_counter()
        db.execute("COMMIT")
        inserting += inserted - began
        committing += time.perf_counter() - inserted
    began = time.perf_counter()
    db.close()
    closing = time.perf_counter() - began
    size = os.path.getsize(path)
    os.remove(path)
    os.rmdir(folder)
    return inserting, committing, closing, size


VARIANTS = (
    ("default compression", None),
    ("uncompressed", "PRAGMA force_compression='uncompressed'"),
    ("checkpoint at close", "SET checkpoint_threshold = '16GB'"),
    ("no fsst", "SET disabled_compression_methods = 'fsst,dict_fsst'"),
    ("no insertion order", "SET preserve_insertion_order = false"),
    ("one thread", "SET threads = 1"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="variants to run (default: all): " + ", ".join(v[0] for v in VARIANTS))
    args = parser.parse_args()
    url = prepare(os.environ["POSTGRES_URL"], args.rows)
    os.environ["POSTGRES_URL"] = url
    config = parse_config({"tables": ["public.bench_rows"]})
    with connect(url) as conn:
        (table,) = introspect(conn, config)
    batches = list(read_slice(url, table, (Segment("public", "bench_rows", 0, None),), mapper=type_mapper("duckdb")))
    print(f"{sum(b.num_rows for b in batches):,} rows in {len(batches)} batches, {sum(b.nbytes for b in batches) / 2**20:,.0f} MiB of Arrow", flush=True)
    for _ in range(args.rounds):
        for label, setting in VARIANTS:
            if args.only and label not in args.only:
                continue
            inserting, committing, closing, size = write(batches, args.slices, setting)
            total = inserting + committing + closing
            print(
                f"{label:20s}: insert {inserting:.2f} s, {args.slices} commits {committing:.2f} s, close {closing:.2f} s, "
                f"total {total:.2f} s ({args.rows / total:,.0f} rows/s), file {size / 2**20:,.0f} MiB",
                flush=True,
            )


if __name__ == "__main__":
    main()
