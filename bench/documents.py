"""What a document set costs a drain: the same drain of N changes with and without it.

    python bench/documents.py [--changes 20000] [--warehouse duckdb|postgres|clickhouse] [--rounds 2]

In database ``pgr_bench_docs`` (recreated) on the server of POSTGRES_URL, a tree of 2,000
publishers, 5,000 authors, 50,000 books (one publisher, one author each) and 100,000 reviews is
backfilled into a fresh warehouse (bench/warehouses.py), with the document set of README,
Documents (publisher -> books -> author, reviews). Each round writes N changes in transactions of
1,000 (40% review updates, 20% book updates, 10% books moved to another publisher, 10% author
renames... see ``write_changes``) and drains them until caught up, once without the document set
(its stored definition removed) and once with it (built again first), alternately; the other load
on a shared machine moves both alike. Prints the drain seconds of each, the ratio (with / without:
the limit measured in the same run) and the documents each drain recomputed.
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
from warehouses import use_warehouse  # noqa: E402

from pg_replication.config import DocumentSetConfig, parse_config  # noqa: E402
from pg_replication.replicate.backfill import SlotSettings, run_backfill  # noqa: E402
from pg_replication.replicate.cdc import DrainSettings, drain_once  # noqa: E402
from pg_replication.replicate.document_tree import resolve_document_sets  # noqa: E402
from pg_replication.source.catalog import introspect  # noqa: E402
from pg_replication.source.connection import connect  # noqa: E402
from pg_replication.source.foreign_keys import foreign_keys  # noqa: E402
from pg_replication.warehouse.connect import open_warehouse  # noqa: E402

DATABASE, SLOT = "pgr_bench_docs", "pgr_bench_docs"
TABLES = ["publisher", "author", "book", "review"]
SCHEMA = """
CREATE TABLE publisher (id int PRIMARY KEY, name text);
CREATE TABLE author (id int PRIMARY KEY, name text);
CREATE TABLE book (isbn text PRIMARY KEY, title text, price numeric(8,2),
    publisher_id int REFERENCES publisher ON UPDATE CASCADE ON DELETE SET NULL,
    author_id int REFERENCES author ON UPDATE CASCADE ON DELETE SET NULL);
CREATE INDEX ON book (publisher_id);
CREATE INDEX ON book (author_id);
CREATE TABLE review (book_isbn text REFERENCES book ON UPDATE CASCADE ON DELETE CASCADE, n int, stars int, body text,
    PRIMARY KEY (book_isbn, n));
INSERT INTO publisher SELECT i, 'publisher ' || i FROM generate_series(1, 2000) i;
INSERT INTO author SELECT i, 'author ' || i FROM generate_series(1, 5000) i;
INSERT INTO book SELECT 'b' || lpad(i::text, 6, '0'), 'title ' || i, i % 100 + 0.99, 1 + i % 2000, 1 + i % 5000
    FROM generate_series(1, 50000) i;
INSERT INTO review SELECT 'b' || lpad((1 + i % 50000)::text, 6, '0'), i, 1 + i % 5, 'review ' || i FROM generate_series(1, 100000) i;
"""
DOCUMENTS = {
    "name": "publisher_docs", "root": "public.publisher", "columns": {"id": "id", "name": "publisher"},
    "children": [{
        "table": "public.book", "as": "books", "relationship": "one_to_many", "columns": ["isbn", "title", "price"],
        "children": [
            {"table": "public.author", "as": "author", "relationship": "many_to_one", "columns": ["id", "name"]},
            {"table": "public.review", "as": "reviews", "relationship": "one_to_many", "columns": ["n", "stars"]},
        ],
    }],
}


def write_changes(url: str, changes: int, round_no: int) -> None:
    """Per 1,000 changes: 400 review updates, 200 book updates, 100 books moved, 100 author
    renames, 100 review inserts, 100 review deletes; each round on other rows."""
    with psycopg.connect(url, autocommit=True) as conn:
        for t in range(changes // 1000):
            k = (round_no * 97 + t) * 400
            with conn.transaction():
                conn.execute("UPDATE review SET stars = stars %% 5 + 1 WHERE n BETWEEN %s AND %s", (k % 99000 + 1, k % 99000 + 400))
                b = k % 49000
                conn.execute("UPDATE book SET price = price + 1 WHERE isbn BETWEEN %s AND %s", (f"b{b + 1:06d}", f"b{b + 200:06d}"))
                conn.execute(
                    "UPDATE book SET publisher_id = 1 + (publisher_id + 7) %% 2000 WHERE isbn BETWEEN %s AND %s",
                    (f"b{b + 201:06d}", f"b{b + 300:06d}"),
                )
                a = k % 4800
                conn.execute("UPDATE author SET name = name || '!' WHERE id BETWEEN %s AND %s", (a + 1, a + 100))
                conn.execute(
                    "INSERT INTO review SELECT 'b' || lpad((1 + i %% 50000)::text, 6, '0'), 1000000 + i, 3, 'new' "
                    "FROM generate_series(%s::int, %s::int) i", (k + round_no * 10**6, k + round_no * 10**6 + 99),
                )
                conn.execute("DELETE FROM review WHERE n BETWEEN %s AND %s", (k % 99000 + 401, k % 99000 + 500))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=20000)
    parser.add_argument("--warehouse", choices=("duckdb", "postgres", "clickhouse"), default="duckdb")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    admin = os.environ.get("POSTGRES_URL", "postgresql://postgres@127.0.0.1:54329/postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        for (slot,) in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE slot_name = %s", (SLOT,)):
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DATABASE)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    params = psycopg.conninfo.conninfo_to_dict(admin)
    params["dbname"] = DATABASE
    url = psycopg.conninfo.make_conninfo(**params)
    where = use_warehouse(args.warehouse, admin)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SCHEMA)
    config = parse_config({"tables": TABLES, "source": {"slot": SLOT, "publication": SLOT}})
    with connect(url) as conn:
        tables = introspect(conn, config)
        fks = foreign_keys(conn, {(t.schema, t.name) for t in tables})
    (dset,) = resolve_document_sets([DocumentSetConfig.model_validate(DOCUMENTS)], tables, fks)
    settings = DrainSettings(slot=SLOT, publication=SLOT)
    print(f"warehouse: {where}; {args.changes:,} changes per drain")
    with open_warehouse(config) as wh:
        for table in tables:
            run_backfill(url, wh, table, [0], partitions=1, cdc=SlotSettings(SLOT, SLOT))

    def drain_all() -> tuple[float, int, int]:
        seconds = changes = documents = 0
        with open_warehouse(config) as wh:
            while True:
                result = drain_once(url, wh, tables, settings)
                seconds += result.seconds
                changes += result.changes
                documents += getattr(result.tables, "documents", {}).get(dset.name, 0)
                if result.caught_up:
                    return seconds, changes, documents

    drain_all()  # caught up past the backfill
    timings: dict[bool, list[float]] = {False: [], True: []}
    for round_no in range(args.rounds):
        for with_documents in (False, True):
            with open_warehouse(config) as wh:
                if with_documents:
                    started = time.perf_counter()
                    built = wh.materialize_documents(dset)
                    print(f"  full build: {built:,} documents in {time.perf_counter() - started:.2f} s")
                else:
                    wh.execute(f"DELETE FROM {wh.state('documents')}")  # the drains no longer refresh the set
            write_changes(url, args.changes, 2 * round_no + with_documents)
            seconds, changes, documents = drain_all()
            timings[with_documents].append(seconds)
            label = "with documents   " if with_documents else "without documents"
            print(f"  round {round_no + 1} {label}: {changes:,} changes drained in {seconds:.2f} s, {documents:,} documents recomputed")
    without, with_ = min(timings[False]), min(timings[True])
    print(f"drain of {args.changes:,} changes: {without:.2f} s without, {with_:.2f} s with the document set: ratio {with_ / without:.2f} (best of {args.rounds})")


if __name__ == "__main__":
    main()
