"""What a document set costs a sync of a query-strategy table: the same sync with and without it.

    python bench/document_syncs.py [--renames 500] [--warehouse duckdb|postgres] [--rounds 3]

The tree of bench/documents.py (2,000 publishers, 5,000 authors, 50,000 books, 100,000 reviews) in
database ``pgr_bench_doc_syncs`` (recreated), with ``author`` synced by a query: by updated_at
(a trigger sets its cursor column) and by reload. Each round renames N authors, then syncs author
by updated_at, once without the document set (its stored definition removed) and once with it
(built again first), alternately; then the same for a reload of author. Prints the seconds of
each sync, the ratio (with / without: the limit measured in the same run), the documents each
recomputed, and a full build of the set for comparison.
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
from documents import DOCUMENTS, SCHEMA, TABLES  # noqa: E402
from warehouses import use_warehouse  # noqa: E402

from pg_replication.config import DocumentSetConfig, parse_config  # noqa: E402
from pg_replication.replicate.backfill import run_backfill  # noqa: E402
from pg_replication.replicate.document_tree import resolve_document_sets  # noqa: E402
from pg_replication.replicate.strategies import sync_table  # noqa: E402
from pg_replication.source.catalog import introspect  # noqa: E402
from pg_replication.source.connection import connect  # noqa: E402
from pg_replication.source.foreign_keys import foreign_keys  # noqa: E402
from pg_replication.warehouse.connect import open_warehouse  # noqa: E402

DATABASE = "pgr_bench_doc_syncs"
CURSOR = """
ALTER TABLE author ADD COLUMN updated timestamptz NOT NULL DEFAULT '2026-01-01';
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.updated := clock_timestamp(); RETURN NEW; END $$;
CREATE TRIGGER author_touch BEFORE UPDATE ON author FOR EACH ROW EXECUTE FUNCTION touch();
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--renames", type=int, default=500)
    parser.add_argument("--warehouse", choices=("duckdb", "postgres"), default="duckdb")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    admin = os.environ.get("POSTGRES_URL", "postgresql://postgres@127.0.0.1:54329/postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DATABASE)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    params = psycopg.conninfo.conninfo_to_dict(admin)
    params["dbname"] = DATABASE
    url = psycopg.conninfo.make_conninfo(**params)
    where = use_warehouse(args.warehouse, admin)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(CURSOR)
    entries = {
        "updated_at": {"name": "author", "strategy": "updated_at", "cursor": "updated", "lookback": "1 second"},
        "reload": {"name": "author", "strategy": "reload"},
    }

    def tables_for(strategy: str):
        raw = [t if t != "author" else entries[strategy] for t in TABLES]
        config = parse_config({"tables": raw})
        with connect(url) as conn:
            return config, introspect(conn, config)

    config, tables = tables_for("updated_at")
    with connect(url) as conn:
        fks = foreign_keys(conn, {(t.schema, t.name) for t in tables})
    (dset,) = resolve_document_sets([DocumentSetConfig.model_validate(DOCUMENTS)], tables, fks)
    print(f"warehouse: {where}; {args.renames:,} authors renamed per updated_at sync")
    with open_warehouse(config) as wh:
        for table in tables:
            run_backfill(url, wh, table, [0], partitions=1)
        started = time.perf_counter()
        built = wh.materialize_documents(dset)
        print(f"  full build: {built:,} documents in {time.perf_counter() - started:.2f} s")

    def sync(strategy: str, with_documents: bool, round_no: int) -> tuple[float, int, int]:
        config, tables = tables_for(strategy)
        author = next(t for t in tables if t.name == "author")
        with open_warehouse(config) as wh:
            if with_documents:
                wh.materialize_documents(dset)
            else:
                wh.execute(f"DELETE FROM {wh.state('documents')}")  # no sync refreshes the set
        if strategy == "updated_at":
            first = (round_no * args.renames) % 4500 + 1
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("UPDATE author SET name = name || '!' WHERE id BETWEEN %s AND %s", (first, first + args.renames - 1))
            time.sleep(1.1)  # past the look-back window of the sync before: only these rows are read
        with open_warehouse(config) as wh:
            result = sync_table(url, wh, author)
        return result.seconds, result.rows, result.documents.get(dset.name, 0)

    for strategy in ("updated_at", "reload"):
        timings: dict[bool, list[float]] = {False: [], True: []}
        sync(strategy, False, 0)  # the first sync reads from the backfill's mark
        for round_no in range(args.rounds):
            for with_documents in (False, True):
                seconds, rows, documents = sync(strategy, with_documents, 1 + 2 * round_no + with_documents)
                timings[with_documents].append(seconds)
                label = "with documents   " if with_documents else "without documents"
                print(f"  {strategy} round {round_no + 1} {label}: {rows:,} rows in {seconds:.2f} s, {documents:,} documents recomputed")
        without, with_ = min(timings[False]), min(timings[True])
        print(f"{strategy} sync of author: {without:.2f} s without, {with_:.2f} s with the document set: ratio {with_ / without:.2f} (best of {args.rounds})")


if __name__ == "__main__":
    main()
