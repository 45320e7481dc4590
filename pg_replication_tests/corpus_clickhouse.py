"""The type corpus compared on ClickHouse: per column, the source value against what ClickHouse
returns, exactly.

A column ClickHouse keeps as text (``String``) must hold exactly the text pg_replication staged:
the source's ``select`` expression of the column's mapping (``to_json`` for arrays), printed in
the replication session's settings (``types.SESSION_OPTIONS``). bytea is compared as hex. Typed
columns are compared as the Python values both drivers return: ints, floats (NaN equal to NaN),
Decimals, booleans, UUIDs, dates, and timestamps as UTC instants. The values ClickHouse cannot
hold (BC, after 9999, ±infinity) are NULL in its corpus (``corpus.left_out("clickhouse")``);
their refusal is tested in test_clickhouse.py.
"""

from __future__ import annotations

import math
import struct
from datetime import datetime, timezone

import psycopg
from psycopg import sql

from pg_replication.source.catalog import Table
from pg_replication.warehouse.clickhouse_types import map_column

_SETTINGS = ("TimeZone", "UTC"), ("DateStyle", "ISO,YMD"), ("IntervalStyle", "iso_8601"), ("extra_float_digits", "1"), ("bytea_output", "hex")


def _same_float(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return (math.isnan(a) and math.isnan(b)) or a == b


def _float32(v):
    return None if v is None else struct.unpack("f", struct.pack("f", v))[0]


def _instant(v):
    if isinstance(v, datetime) and v.tzinfo is None:
        return v.replace(tzinfo=timezone.utc)
    return v.astimezone(timezone.utc) if isinstance(v, datetime) else v


def clickhouse_mismatches(pg: psycopg.Connection, table: Table, warehouse_rows: list[tuple]) -> list[str]:
    """Every (row, column) where the source and ClickHouse differ; ``warehouse_rows`` are the
    table's columns in catalog order, read raw, ordered by id."""
    exprs, kinds = [], []
    for column in table.columns:
        mapping = map_column(column)
        ident = sql.Identifier(column.name)
        if mapping.load.startswith("unhex("):
            exprs.append(sql.SQL("encode({}, 'hex')").format(ident))
            kinds.append("hex")
        elif mapping.ddl == "Nullable(String)":
            # The output function's text (format): ::text would drop char(n)'s padding, add inet's /32;
            # num_nulls, since a composite of NULL fields IS NULL.
            value = mapping.select_sql(column.name)
            exprs.append(sql.SQL("CASE WHEN num_nulls({0}) = 1 THEN NULL ELSE format('%s', {0}) END").format(value))
            kinds.append("text")
        else:
            exprs.append(sql.SQL("({})").format(mapping.select_sql(column.name)) if mapping.select != "{0}" else ident)
            kinds.append(mapping.ddl)
    with pg.transaction():
        for name, value in _SETTINGS:
            pg.execute(sql.SQL("SET LOCAL {} = {}").format(sql.Identifier(name), sql.Literal(value)))
        source = pg.execute(
            sql.SQL("SELECT {} FROM {} ORDER BY id").format(sql.SQL(", ").join(exprs), table.ident)
        ).fetchall()
    if len(source) != len(warehouse_rows):
        return [f"{len(source)} source rows, {len(warehouse_rows)} in ClickHouse"]
    problems = []
    for src, wh in zip(source, warehouse_rows):
        for column, kind, s, w in zip(table.columns, kinds, src, wh):
            if kind == "hex":
                w = None if w is None else (w.encode() if isinstance(w, str) else w).hex()
            if kind == "Nullable(Float32)":
                same = _same_float(_float32(s), _float32(w))
            elif kind.startswith("Nullable(Float"):
                same = _same_float(s, w)
            elif kind.startswith("Nullable(DateTime64"):
                same = _instant(s) == _instant(w)
            else:
                same = s == w
            if not same:
                problems.append(f"id={src[0]} {column.name} ({column.type_sql}): source {str(s)[:80]!r} != clickhouse {str(w)[:80]!r}")
    return problems
