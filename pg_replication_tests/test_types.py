"""Every built-in type survives the backfill and CDC exactly, on every warehouse
(Postgres -> COPY or pgoutput -> Arrow -> DuckDB / Postgres / Snowflake).

Proves: one column of each type with edge values (NULL, empty, extremes, NaN/±Infinity, BC dates,
unicode, a 1 MB TOASTed value) reads back from the warehouse equal to the source. Leaves out: values
the warehouse type cannot hold (documented in the README's type table and tested for a clear error).
"""

from __future__ import annotations

import pytest

from pg_replication.backfill import run_backfill
from pg_replication.config import parse_config
from pg_replication.errors import WarehouseError
from pg_replication.source.catalog import introspect
from pg_replication.source.connection import connect
from pg_replication.types import TYPE_TABLE, map_column
from pg_replication_tests.replication import bare_table
from pg_replication_tests.targets import KINDS
from pg_replication_tests.corpus import CORPUS_ROWS, corpus_table_sql, left_out_report, mismatches, pg_select, warehouse_select


def _backfill(pg_url, tables, target, partitions=3):
    config = parse_config({"tables": tables, "defaults": {"partitions": partitions}})
    with connect(pg_url) as conn:
        described = introspect(conn, config)
    with target.open() as wh:
        for table in described:
            run_backfill(pg_url, wh, table, range(partitions), partitions=partitions, readers=2)
    return described


def _warehouse_corpus(target) -> list[tuple]:
    with target.open(read_only=True) as wh:
        return wh.fetchall(warehouse_select(target.kind, wh.table_name(_corpus_table())))


def _corpus_table():
    return bare_table("public", "corpus")


def _compare(pg, target) -> None:
    """The source against the warehouse, canonically; the values left out on this warehouse are
    printed and named in the failure message."""
    pg.execute("SET IntervalStyle = iso_8601")  # the style pg_replication reads text in
    pg_rows = pg.execute(pg_select("public", "corpus", target.kind)).fetchall()
    assert len(pg_rows) == CORPUS_ROWS
    report = left_out_report(target.kind)
    if report:
        print(report)
    problems = mismatches(pg_rows, _warehouse_corpus(target), target.kind)
    assert not problems, "\n".join(problems + ([report] if report else []))


def test_type_corpus_round_trips_exactly(pg, pg_url, target):
    pg.execute(corpus_table_sql("public", "corpus", target.kind))
    _backfill(pg_url, ["public.corpus"], target)
    _compare(pg, target)


def test_unknown_types_fall_back_to_text(pg, pg_url):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, p point, l pg_lsn, r int4range)")
    with connect(pg_url) as conn:
        (table,) = introspect(conn, parse_config({"tables": ["t"]}))
    mapping = {c.name: map_column(c) for c in table.columns}
    assert mapping["p"].fallback and mapping["p"].ddl == "VARCHAR"
    assert mapping["l"].fallback
    assert mapping["id"].ddl == "INTEGER" and not mapping["id"].fallback


@pytest.mark.parametrize("target", [k for k in KINDS if k != "postgres"], indirect=True)  # a replica holds NaN
def test_nan_in_constrained_numeric_fails_loudly_and_commits_nothing(pg, pg_url, target):
    pg.execute("CREATE TABLE n (id int PRIMARY KEY, v numeric(6,2))")
    pg.execute("INSERT INTO n SELECT i, i FROM generate_series(1, 100) i")
    pg.execute("INSERT INTO n VALUES (101, 'NaN')")
    with pytest.raises(WarehouseError) as err:
        _backfill(pg_url, ["n"], target, partitions=1)
    assert '"public"."n"' in str(err.value) and "NaN" in str(err.value)
    assert target.rows(bare_table("public", "n"), ["id"]) == []


def test_type_table_covers_the_readme(tmp_path):
    # Every mapped type has a DuckDB type and an Arrow staging type.
    for name, mapping in TYPE_TABLE.items():
        assert mapping.ddl and mapping.arrow is not None, name


def test_type_corpus_round_trips_through_cdc(pg, pg_url, target):
    """The same corpus, inserted after the backfill and then updated: every value arrives through
    pgoutput's text form and the same warehouse conversion."""
    from pg_replication_tests.replication import Harness

    pg.execute(corpus_table_sql("public", "corpus", target.kind))
    pg.execute("CREATE TABLE staged AS SELECT * FROM corpus")
    pg.execute("TRUNCATE corpus")
    h = Harness(pg_url, target, ["corpus"])
    h.backfill()
    pg.execute("INSERT INTO corpus SELECT * FROM staged")
    pg.execute("UPDATE corpus SET c_int4 = c_int4 WHERE id % 2 = 0")  # unchanged TOAST on the 1 MB text
    h.drain_all()
    _compare(pg, target)
