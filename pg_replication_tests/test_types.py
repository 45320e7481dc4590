"""Every built-in type survives the backfill and CDC exactly, on every warehouse
(Postgres -> COPY or pgoutput -> Arrow -> DuckDB / Postgres / Snowflake).

Proves: one column of each type with edge values (NULL, empty, extremes, NaN/±Infinity, BC dates,
unicode, a 1 MB TOASTed value) reads back from the warehouse equal to the source. Leaves out: values
the warehouse type cannot hold (documented in the README's type table and tested for a clear error).
"""

from __future__ import annotations

import pytest

from pg_replication.replicate.backfill import run_backfill
from pg_replication.config import parse_config
from pg_replication.errors import WarehouseError
from pg_replication.source.catalog import introspect
from pg_replication.source.connection import connect
from pg_replication.types import TYPE_TABLE, map_column
from pg_replication_tests.replication import bare_table
from pg_replication_tests.targets import KINDS
from pg_replication_tests.corpus import CORPUS, CORPUS_ROWS, corpus_table_sql, left_out_report, mismatches, pg_select, warehouse_select


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
    if target.kind == "clickhouse":
        return _compare_clickhouse(pg, target)
    pg.execute("SET IntervalStyle = iso_8601")  # the style pg_replication reads text in
    pg_rows = pg.execute(pg_select("public", "corpus", target.kind)).fetchall()
    assert len(pg_rows) == CORPUS_ROWS
    report = left_out_report(target.kind)
    if report:
        print(report)
    problems = mismatches(pg_rows, _warehouse_corpus(target), target.kind)
    assert not problems, "\n".join(problems + ([report] if report else []))


def _compare_clickhouse(pg, target) -> None:
    from pg_replication_tests.corpus_clickhouse import clickhouse_mismatches

    with connect(pg.info.dsn) as conn:
        (table,) = introspect(conn, parse_config({"tables": ["public.corpus"]}))
    names = [c.name for c in table.columns]
    report = left_out_report("clickhouse")
    problems = clickhouse_mismatches(pg, table, target.rows(table, names))
    assert not problems, "\n".join(problems + [report])


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


# Issue 10, point 9: one value per defect, the same value through the backfill (id 1) and CDC
# (id 2), compared with the corpus column's canonical forms (epoch µs, days, JSON element text).
_ONE_VALUE = {
    "a_ts": "ARRAY['0044-03-15 12:00:00 BC'::timestamp, NULL]",  # arrived as AD, silently
    "a_tstz": "ARRAY['0044-03-15 12:00:00+00 BC'::timestamptz]",  # refused
    "a_date": "ARRAY['0044-03-15 BC'::date]",  # refused
    "a_date_2d": "ARRAY[['0044-03-15 BC'::date], ['infinity'::date]]",  # refused
    "a_jsonb": "ARRAY['null'::jsonb, NULL]",  # the JSON null became SQL NULL
    "a_json": "ARRAY['{\"b\":  1.50e3}'::json, 'null']",  # elements re-serialized
}


@pytest.mark.parametrize("target", ["duckdb"], indirect=True)
@pytest.mark.parametrize("column", list(_ONE_VALUE))
def test_array_value_exact_on_duckdb_through_backfill_and_cdc(pg, pg_url, target, column):
    from pg_replication_tests.replication import Harness

    col = next(c for c in CORPUS if c.name == column)
    literal = _ONE_VALUE[column]
    pg.execute(f"CREATE TABLE one (id int PRIMARY KEY, v {col.pg_type})")
    pg.execute(f"INSERT INTO one VALUES (1, {literal})")
    h = Harness(pg_url, target, ["one"])
    h.backfill()
    pg.execute(f"INSERT INTO one VALUES (2, {literal})")
    h.drain_all()
    source = pg.execute(f"SELECT id, {col.pg_canon.format(c='v')} FROM one ORDER BY id").fetchall()
    with target.open(read_only=True) as wh:
        stored = wh.fetchall(f"SELECT id, {col.duck_canon.format(c='v')} FROM {wh.table_name(h.table('one'))} ORDER BY id")
    assert stored == source


# Past DuckDB's TIMESTAMP range: it ends at 294247-01-10 04:00:54.775806, Postgres at 294276 AD.
# (literal, the value as the message must show it)
_PAST_DUCKDB = {
    "timestamp": ("'294270-01-01'", "294270-01-01 00:00:00"),
    "timestamptz": ("'294270-01-01 00:00:00+00'", "294270-01-01 00:00:00+00"),
    "timestamp[]": ("ARRAY['2024-01-01', '294270-01-01']::timestamp[]", "294270-01-01 00:00:00"),
}


def _far_and_near(pg, pg_type: str) -> None:
    pg.execute(f"CREATE TABLE far (id int PRIMARY KEY, v {pg_type})")
    pg.execute("CREATE TABLE near (id int PRIMARY KEY, v int)")
    pg.execute("INSERT INTO far SELECT i, NULL FROM generate_series(1, 50) i")


def _names_the_value(message: str, shown: str) -> None:
    assert "far" in message and "column v" in message and "(id)=(4242)" in message and shown in message, message


@pytest.mark.parametrize("target", ["duckdb"], indirect=True)
@pytest.mark.parametrize("pg_type", list(_PAST_DUCKDB))
def test_value_duckdb_cannot_hold_fails_the_slice_naming_column_key_and_value(pg, pg_url, target, pg_type):
    literal, shown = _PAST_DUCKDB[pg_type]
    _far_and_near(pg, pg_type)
    pg.execute(f"INSERT INTO far VALUES (4242, {literal})")
    pg.execute("INSERT INTO near VALUES (1, 1)")
    with pytest.raises(WarehouseError) as err:
        _backfill(pg_url, ["far"], target, partitions=1)
    _names_the_value(str(err.value), shown)
    assert '"public"."far"' in str(err.value)
    assert target.rows(bare_table("public", "far"), ["id"]) == []  # nothing of the slice committed
    _backfill(pg_url, ["near"], target, partitions=1)  # only that table stops
    assert target.rows(bare_table("public", "near"), ["id", "v"]) == [(1, 1)]


@pytest.mark.parametrize("target", ["duckdb"], indirect=True)
@pytest.mark.parametrize("pg_type", list(_PAST_DUCKDB))
def test_value_duckdb_cannot_hold_fails_that_table_in_cdc_naming_column_key_and_value(pg, pg_url, target, pg_type):
    from pg_replication_tests.replication import Harness

    literal, shown = _PAST_DUCKDB[pg_type]
    _far_and_near(pg, pg_type)
    h = Harness(pg_url, target, ["far", "near"])
    h.backfill()
    pg.execute(f"INSERT INTO far VALUES (4242, {literal})")
    pg.execute("UPDATE far SET v = NULL WHERE id = 1")
    pg.execute("INSERT INTO near VALUES (1, 1)")
    (result,) = h.drain_all()
    far = result.tables["public.far"]
    assert far.mode == "failed"
    _names_the_value(far.error, shown)
    assert result.tables["public.near"].mode == "applied"
    h.assert_equal(pg, "near")
    with target.open(read_only=True) as wh:
        assert wh.statuses()["public.far"][0] == "failed"
