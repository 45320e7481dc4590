"""Postgres type -> Snowflake column: the DDL, and the SQL that turns a staged value into it.

The backfill stages typed Parquet: a column with a lossless native reading (``native``: integers,
float8, boolean, text, bytea, date, timestamp(tz), time, numeric(p,s) and money as decimals) is
read typed by the binary reader (source/binary_copy.py) and lands in a staging column of the
target's own type, inserted as it is. Values outside Snowflake's range (the ``native_guard``
fails: ±infinity, BC, years past 9999, 24:00, NaN) travel as text in a companion column and meet
the text path's refusal below. Every other column, and every CDC value, is staged as text (a
VARCHAR column): the value's output-function text, or pgoutput's text for CDC
(``types.SESSION_OPTIONS``: UTC, ISO dates, ISO 8601 intervals, hex bytea), converted by
``load``. The ``select`` and ``from_text`` of ``types.py`` are kept, so both paths stage the same
text. float4 keeps the text path: widened to Snowflake's 64-bit FLOAT, its binary value would
read 0.10000000149011612 where the text (and CDC) gives 0.1.

What Snowflake cannot hold is refused, never altered: the table's write fails with the value in
the message, that table stops (its changes wait in its change log) and the others go on.

- numeric(p,s) 'NaN' or '±Infinity' in NUMBER(p,s): refused by the CAST.
- dates and timestamps BC, with a year past 9999, or '±infinity': refused by a guard in the
  load expression, which hands the CAST a text no timestamp parser accepts ("not representable in
  Snowflake: infinity"). fakesnow, on DuckDB, would store most of these silently (BC becomes AD,
  infinity a number that cannot be fetched), so the guard is what makes the refusal testable.
- time '24:00:00' (Snowflake's TIME stops at 23:59:59.999999999): refused by the same guard.
- text over 16 MB, bytea over 8 MB, JSON over 16 MB: refused by Snowflake.
- json with duplicate object keys: refused by PARSE_JSON (strict by default).
- Known approximations: JSON numbers are held as NUMBER(38) or DOUBLE inside a VARIANT, so a JSON
  number with more than 38 digits is rounded (the column's text form is not kept). Timestamps
  are held at microseconds (Postgres has no more). Two source names that differ only in case
  (``"id"`` and ``"ID"``) fold to one Snowflake name; creating the table then fails loudly.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pyarrow as pa

from pg_replication import types
from pg_replication.source.text_values import array_to_json
from pg_replication.source.catalog import Column, PgType
from pg_replication.types import TypeMapping

_TEXT = TypeMapping(pa.string(), "VARCHAR")

PLAIN_NAME = re.compile(r"[a-z_][a-z0-9_$]*")


def fold(name: str) -> str:
    """The name as Snowflake stores it: plain lower-case names upper-cased, others exactly."""
    return name.upper() if PLAIN_NAME.fullmatch(name) else name


def _cast(ddl: str, value: str = "{0}", **extra) -> TypeMapping:
    return TypeMapping(pa.string(), ddl, load=f"CAST({value} AS {ddl})", **extra)


def _native(base: TypeMapping, arrow: pa.DataType, pg_type: str, guard: str | None = None) -> TypeMapping:
    """``base`` (the text path CDC and the query strategies keep), read typed by the backfill."""
    return replace(base, native=arrow, native_type=pg_type, native_guard=guard)


# Snowflake's date range is years 1-9999 (Postgres prints other years its own way, refused by
# the text path's guard); ±infinity fails BETWEEN too.
_DATE_RANGE = "{0} BETWEEN '0001-01-01' AND '9999-12-31'"
_TIMESTAMP_RANGE = "{0} BETWEEN '0001-01-01 00:00:00%s' AND '9999-12-31 23:59:59.999999%s'"


def _refuse_when(condition: str) -> str:
    # A text no parser accepts, naming the value: Snowflake and DuckDB both fail the CAST with it.
    return f"CASE WHEN {condition} THEN 'not representable in Snowflake: ' || {{0}} ELSE {{0}} END"


# Postgres prints years with 4+ digits ("10000-01-01"), "infinity", and a trailing " BC".
_DATETIME_GUARD = _refuse_when("SUBSTR({0}, 5, 1) <> '-' OR RIGHT({0}, 3) = ' BC'")
# With TimeZone=UTC, Postgres writes the offset as "+00"; Snowflake's AUTO format wants "+00:00".
_TIMESTAMP_TZ = (
    "CASE WHEN SUBSTR({0}, 5, 1) <> '-' OR RIGHT({0}, 3) = ' BC' THEN 'not representable in Snowflake: ' || {0} "
    "ELSE {0} || ':00' END"
)
# Postgres prints 'Infinity'; Snowflake documents 'inf' (and 'NaN', which both accept).
_FLOAT = "CASE {0} WHEN 'Infinity' THEN 'inf' WHEN '-Infinity' THEN '-inf' ELSE {0} END"

TYPE_TABLE: dict[str, TypeMapping] = {
    "int2": _native(_cast("NUMBER(5,0)"), pa.int16(), "pg_catalog.int2"),
    "int4": _native(_cast("NUMBER(10,0)"), pa.int32(), "pg_catalog.int4"),
    "int8": _native(_cast("NUMBER(19,0)"), pa.int64(), "pg_catalog.int8"),
    "oid": _native(_cast("NUMBER(10,0)"), pa.int64(), "pg_catalog.int8"),
    "float4": _cast("FLOAT", _FLOAT),  # text: see the module docstring
    "float8": _native(_cast("FLOAT", _FLOAT), pa.float64(), "pg_catalog.float8"),
    "bool": _native(_cast("BOOLEAN"), pa.bool_(), "pg_catalog.bool"),  # text: 't' / 'f'
    "text": _native(_TEXT, pa.string(), "pg_catalog.text"),
    "varchar": _native(_TEXT, pa.string(), "pg_catalog.varchar"),
    "bpchar": _native(_TEXT, pa.string(), "pg_catalog.bpchar"),  # its binary form keeps the padding
    "name": _native(_TEXT, pa.string(), "pg_catalog.name"),
    "char": _TEXT,
    "citext": _TEXT,
    "bytea": _native(
        TypeMapping(pa.string(), "BINARY", load="TO_BINARY(SUBSTR({0}, 3), 'HEX')"), pa.binary(), "pg_catalog.bytea"  # '\x...' hex
    ),
    "uuid": _TEXT,
    "json": TypeMapping(pa.string(), "VARIANT", load="PARSE_JSON({0})"),
    "jsonb": TypeMapping(pa.string(), "VARIANT", load="PARSE_JSON({0})"),
    "date": _native(_cast("DATE", _DATETIME_GUARD), pa.date32(), "pg_catalog.date", _DATE_RANGE),
    "timestamp": _native(
        _cast("TIMESTAMP_NTZ(6)", _DATETIME_GUARD), pa.timestamp("us"), "pg_catalog.timestamp", _TIMESTAMP_RANGE % ("", "")
    ),
    # Text, not a Parquet UTC instant: Snowflake would store that with its session's offset, CDC's
    # text path with +00:00; one load for both keeps backfilled and streamed rows alike.
    "timestamptz": _cast("TIMESTAMP_TZ(6)", _TIMESTAMP_TZ),
    "time": _native(_cast("TIME(6)", _refuse_when("LEFT({0}, 2) = '24'")), pa.time64("us"), "pg_catalog.time", "{0} < '24:00:00'"),
    "timetz": _TEXT,  # Snowflake has no time with an offset
    "interval": _TEXT,  # ISO 8601 text ('P1Y2M3DT4H5M6S'): IntervalStyle=iso_8601
    # Decimals are read as numeric_out's text and parsed exactly by Arrow (the driver's own
    # numeric decoding is not relied on).
    "money": _native(
        _cast("NUMBER(19,2)", select="{0}::numeric", from_text=types.TYPE_TABLE["money"].from_text),
        pa.decimal128(19, 2),
        "pg_catalog.text",
    ),
    **{name: _TEXT for name in types.TEXT_FORM_TYPES},
}


def numeric_mapping(typmod: int) -> TypeMapping:
    """numeric(p,s) with p <= 38 -> NUMBER(p,s); unconstrained or wider numeric keeps its text."""
    fits = types.decimal_precision(typmod)
    if fits is None:
        return _TEXT
    # NaN (the one non-number numeric(p,s) holds) travels as text, to be refused naming it.
    return _native(_cast(f"NUMBER({fits[0]},{fits[1]})"), pa.decimal128(*fits), "pg_catalog.text", "{0} <> 'NaN'")


def _base_mapping(t: PgType, typmod: int) -> TypeMapping:
    if t.kind in ("enum", "composite"):
        return _TEXT
    if t.schema == "pg_catalog" and t.name == "numeric":
        return numeric_mapping(typmod)
    if t.schema == "pg_catalog" and t.name in TYPE_TABLE:
        return TYPE_TABLE[t.name]
    if t.name == "citext":
        return _TEXT
    return TypeMapping(pa.string(), "VARCHAR", fallback=True)


def map_column(column: Column) -> TypeMapping:
    """The Snowflake mapping for one column: domains resolve to their base type; an array becomes
    an ARRAY when ``types.py`` stages it as JSON (``to_json``), else its Postgres text."""
    t, typmod = column.type.resolved(column.typmod)
    if t.kind == "array" and t.element is not None:
        element, _ = t.element.resolved(typmod)
        if element.schema == "pg_catalog" and element.name in ("json", "jsonb"):
            # JSON elements as themselves (DuckDB keeps their text instead): a VARIANT holds the
            # values, not the text, and a JSON null and a NULL element are both null in an ARRAY.
            return TypeMapping(pa.string(), "ARRAY", load="PARSE_JSON({0})", select="to_json({0})", from_text=array_to_json("json"))
        staged = types.map_column(column)
        if staged.select.startswith("to_json("):
            return TypeMapping(pa.string(), "ARRAY", load="PARSE_JSON({0})", select=staged.select, from_text=staged.from_text)
        return TypeMapping(pa.string(), "VARCHAR", fallback=staged.fallback)
    return _base_mapping(t, typmod)
