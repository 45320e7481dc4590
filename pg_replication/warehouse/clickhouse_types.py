"""Postgres type -> ClickHouse column: the DDL, and the SQL that turns a staged value into it.

Every column is staged as text (``Nullable(String)``): the Postgres text the backfill's COPY query
writes, or pgoutput's text for CDC (``types.SESSION_OPTIONS``: UTC, ISO dates, ISO 8601
intervals, hex bytea). ``select`` and ``from_text`` are those of ``types.py``, so both paths stage
the same text; ClickHouse parses it in the INSERT.

Every column is ``Nullable`` except the key (ClickHouse's sorting key; Postgres keys are NOT NULL).
What ClickHouse cannot hold is refused, never altered (``refuse``: checked before each write, which
then fails naming table, column, key and value; nothing of it is written):

- dates and timestamps BC, after 9999, or ±infinity (Date32 and DateTime64(6) hold 0001-01-01 to
  9999-12-31 here; a CAST of year 0000 would silently give the current year, so the guard runs
  before any CAST);
- numeric(p,s) 'NaN' or '±Infinity' in Decimal(p,s).

Kept as exact text (``String``): time, timetz, interval (ISO 8601), json/jsonb (ClickHouse's JSON
type re-orders keys and re-prints numbers), unconstrained numeric, arrays (as their JSON text: an
``Array`` can never be ``Nullable`` in ClickHouse, so a NULL array could not be told from an empty
one; ``JSONExtract(col, 'Array(Nullable(Int32))')`` reads one), and every type without a lossless
ClickHouse equivalent (inet, ranges, composites, enums, ...).
"""

from __future__ import annotations

import pyarrow as pa

from pg_replication import types
from pg_replication.source.catalog import Column, PgType
from pg_replication.types import TypeMapping

DECIMAL_MAX_PRECISION = 76  # Decimal256


def _nullable(ddl: str) -> str:
    return f"Nullable({ddl})"


def _cast(ddl: str, value: str = "{0}", **extra) -> TypeMapping:
    nullable = _nullable(ddl)
    return TypeMapping(pa.string(), nullable, load=f"CAST({value} AS {nullable})", **extra)


_TEXT = TypeMapping(pa.string(), _nullable("String"))

# Postgres prints 4-digit years as "2024-…", others as "10000-…", "0044-… BC" or "infinity".
_OUT_OF_RANGE = "NOT match({0}, '^[0-9]{4}-') OR startsWith({0}, '0000-') OR endsWith({0}, ' BC')"
_NOT_A_NUMBER = "{0} IN ('NaN', 'Infinity', '-Infinity')"

TYPE_TABLE: dict[str, TypeMapping] = {
    "int2": _cast("Int16"),
    "int4": _cast("Int32"),
    "int8": _cast("Int64"),
    "oid": _cast("UInt32"),
    "float4": _cast("Float32"),  # ClickHouse reads Postgres's 'Infinity', '-Infinity' and 'NaN'
    "float8": _cast("Float64"),
    "bool": _cast("Bool", "{0} = 't'"),
    "text": _TEXT,
    "varchar": _TEXT,
    "bpchar": _TEXT,
    "name": _TEXT,
    "char": _TEXT,
    "citext": _TEXT,
    "bytea": TypeMapping(pa.string(), _nullable("String"), load="unhex(substring({0}, 3))"),  # '\x…' hex -> the bytes
    "uuid": _cast("UUID"),
    "json": _TEXT,
    "jsonb": _TEXT,
    "date": _cast("Date32", refuse=_OUT_OF_RANGE),
    "timestamp": _cast("DateTime64(6, 'UTC')", refuse=_OUT_OF_RANGE),
    "timestamptz": _cast("DateTime64(6, 'UTC')", refuse=_OUT_OF_RANGE),  # '…+00': TimeZone=UTC
    "time": _TEXT,
    "timetz": _TEXT,
    "interval": _TEXT,  # ISO 8601 text ('P1Y2M3DT4H5M6S'): IntervalStyle=iso_8601
    "money": _cast("Decimal(19, 2)", select="{0}::numeric", from_text=types.TYPE_TABLE["money"].from_text),
    **{name: _TEXT for name in types.TEXT_FORM_TYPES},
}


def numeric_mapping(typmod: int) -> TypeMapping:
    """numeric(p,s) with p <= 76 -> Decimal(p,s); unconstrained numeric keeps its exact text."""
    declared = types.numeric_typmod(typmod)
    if declared is None or declared[0] > DECIMAL_MAX_PRECISION or declared[1] > declared[0]:
        return _TEXT
    return _cast(f"Decimal({declared[0]}, {declared[1]})", refuse=_NOT_A_NUMBER)


def _base_mapping(t: PgType, typmod: int) -> TypeMapping:
    if t.kind in ("enum", "composite"):
        return _TEXT
    if t.schema == "pg_catalog" and t.name == "numeric":
        return numeric_mapping(typmod)
    if t.schema == "pg_catalog" and t.name in TYPE_TABLE:
        return TYPE_TABLE[t.name]
    if t.name == "citext":
        return _TEXT
    return TypeMapping(pa.string(), _nullable("String"), fallback=True)


def map_column(column: Column) -> TypeMapping:
    """The ClickHouse mapping for one column: domains resolve to their base type; an array keeps
    the JSON text ``types.py`` stages it as (``to_json``), or its Postgres text."""
    t, typmod = column.type.resolved(column.typmod)
    if t.kind == "array" and t.element is not None:
        staged = types.map_column(column)
        return TypeMapping(pa.string(), _nullable("String"), select=staged.select, from_text=staged.from_text, fallback=staged.fallback)
    return _base_mapping(t, typmod)


def refusal(ddl: str) -> str | None:
    """The ``refuse`` guard of a stored column's type, from its DDL: values replayed from the
    change log (staged text, mapped from the stored columns) are guarded as a drain's are."""
    if ddl.startswith(("Nullable(Date32", "Nullable(DateTime64", "Date32", "DateTime64")):
        return _OUT_OF_RANGE
    if ddl.startswith(("Nullable(Decimal(", "Decimal(")):  # money's text is never NaN: guarded all the same
        return _NOT_A_NUMBER
    return None


def key_ddl(ddl: str) -> str:
    """A key column's type: not Nullable (ClickHouse's sorting key; Postgres keys are NOT NULL)."""
    return ddl[len("Nullable(") : -1] if ddl.startswith("Nullable(") else ddl
