"""One table of truth: Postgres type -> how it is read (COPY expression, Arrow staging type) ->
what it becomes in the warehouse (DuckDB DDL and the expression that converts the staged value).

Values travel as PostgreSQL's own text output (COPY ... FORMAT csv) into Arrow. Numbers and
booleans are parsed by pyarrow's CSV reader; everything else is staged as a string and converted
by DuckDB in the INSERT (vectorized, and exact: DuckDB parses the same ISO formats Postgres
prints). Types without a native warehouse equivalent keep their exact text form. The README's
type table is generated from ``TYPE_TABLE`` below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import pyarrow as pa
from psycopg import sql

from pg_replication.source.catalog import Column, PgType
from pg_replication.source.text_values import array_to_json, interval_from_iso, money_to_number

# Session settings the COPY stream and logical decoding rely on for their text formats.
# (Decoding runs output functions in our session, so pgoutput's text obeys them too.)
SESSION_OPTIONS = (
    "-c TimeZone=UTC -c DateStyle=ISO,YMD -c IntervalStyle=iso_8601 "
    "-c extra_float_digits=1 -c bytea_output=hex -c lc_monetary=C"
)

DECIMAL_MAX_PRECISION = 38


@dataclass(frozen=True)
class TypeMapping:
    """How one column is read from Postgres and written to the warehouse."""

    arrow: pa.DataType  # type of the staged column in the Arrow batches
    ddl: str  # the warehouse column type (DDL)
    load: str = "{0}"  # warehouse SQL over the staged column ({0} is the column)
    select: str = "{0}"  # Postgres expression for the COPY query ({0} is the column)
    fallback: bool = False  # True when the type is not known: its text form is kept
    from_text: Callable[[str], str] | None = None  # output-function text -> staged form (CDC)
    # Warehouse SQL over the staged column, true for a value the warehouse type cannot hold: the
    # dialect checks it before loading, to refuse the write naming column, key and value.
    refuse: str | None = None
    # The backfill's binary reader (source/binary_copy.py): the Arrow type a value's binary form
    # is decoded into exactly, None to read the value's text; the Postgres type selected for it
    # (a domain becomes its base type); and a Postgres predicate outside which the binary decoding
    # is wrong, those values travel as text (see binary_copy).
    native: pa.DataType | None = None
    native_type: str | None = None
    native_guard: str | None = None
    # The expression read natively when it is not ``select`` (whose text the companion keeps).
    native_select: str | None = None
    # True when the type's cast to text is its output function (no cast of its own in pg_cast),
    # so the reader selects ``::text``, which costs the source less than format().
    text_cast: bool = False

    def select_sql(self, column: str) -> sql.Composable:
        return sql.SQL(self.select).format(sql.Identifier(column))  # type: ignore[arg-type]

    def load_sql(self, quoted_column: str) -> str:
        return self.load.replace("{0}", quoted_column)

    def staged_load_sql(self, quoted_column: str, staged: pa.DataType, quoted_text: str | None = None) -> str:
        """The load expression over a staged column of type ``staged``: a natively read value
        is inserted as it is; its text companion ``quoted_text`` (binary_copy) where it is NULL."""
        if self.native is None or staged != self.native:
            return self.load_sql(quoted_column)
        if quoted_text is None:
            return quoted_column
        return f"COALESCE({quoted_column}, {self.load_sql(quoted_text)})"


_TEXT = TypeMapping(pa.string(), "VARCHAR")


def _native(base: TypeMapping, arrow: pa.DataType, pg_type: str, guard: str | None = None) -> TypeMapping:
    """``base`` (the text path CDC and the query strategies keep), read natively by the backfill."""
    return replace(base, native=arrow, native_type=pg_type, native_guard=guard)


# Binary timestamps past DuckDB's (and Arrow's microsecond) range, and ±infinity, are decoded
# wrongly by the driver: those few travel as text (and are refused or kept as infinity there).
_TIMESTAMP_GUARD = "isfinite({0}) AND {0} <= '294247-01-10 04:00:54.775806%s'"


def _cast(duck: str) -> TypeMapping:
    return TypeMapping(pa.string(), duck, load=f"CAST({{0}} AS {duck})")


# Dates and timestamps before year 1: Postgres prints "0044-03-15 BC"; DuckDB reads "0044-03-15 (BC)".
_BC = "CASE WHEN ends_with({0}, ' BC') THEN regexp_replace(left({0}, -3), '^(\\d+-\\d+-\\d+)', '\\1 (BC)') ELSE {0} END"


# DuckDB timestamps end at 294247-01-10 04:00:54.775806 AD (Postgres: 294276 AD). Postgres prints
# such a year with 6 digits: only those values pay for the TRY of the load expression.
_PAST_TIMESTAMP_RANGE = "strpos({0}, '-') > 6 AND TRY(%s) IS NULL"


def _datetime(duck: str) -> TypeMapping:
    load = f"CAST({_BC} AS {duck})"
    refuse = None if duck == "DATE" else _PAST_TIMESTAMP_RANGE % load
    return TypeMapping(pa.string(), duck, load=load, refuse=refuse)


def _each_element(lists: str, dims: int, element: str, depth: int = 0) -> str:
    """DuckDB SQL applying ``element`` (over ``{0}``) to every element of a ``dims``-deep LIST."""
    var = f"e{depth}"
    inner = element.replace("{0}", var) if dims <= 1 else _each_element(var, dims - 1, element, depth + 1)
    return f"list_transform({lists}, lambda {var}: {inner})"


# Interval as its three exact fields; DuckDB's INTERVAL has the same months/days/µs model.
_INTERVAL_SELECT = (
    "((extract(year from {0}) * 12 + extract(month from {0}))::int8 || ' months '"
    " || extract(day from {0})::int8 || ' days '"
    " || (extract(hour from {0}) * 3600000000 + extract(minute from {0}) * 60000000"
    " + extract(microseconds from {0}))::int8 || ' microseconds')"
)

# Kept as their exact text form in DuckDB and Snowflake (no lossless native type; a Postgres replica keeps them).
TEXT_FORM_TYPES = ("inet", "cidr", "macaddr", "macaddr8", "bit", "varbit", "tsvector", "tsquery", "xml")

# Base types by name (pg_catalog). Anything not here falls back to text.
TYPE_TABLE: dict[str, TypeMapping] = {
    "int2": TypeMapping(pa.int16(), "SMALLINT"),
    "int4": TypeMapping(pa.int32(), "INTEGER"),
    "int8": TypeMapping(pa.int64(), "BIGINT"),
    "oid": TypeMapping(pa.int64(), "UINTEGER", load="CAST({0} AS UINTEGER)", select="{0}::int8"),
    "float4": TypeMapping(pa.float32(), "FLOAT"),
    "float8": TypeMapping(pa.float64(), "DOUBLE"),
    "bool": TypeMapping(pa.bool_(), "BOOLEAN"),
    "text": _native(_TEXT, pa.string(), "pg_catalog.text"),
    "varchar": _native(_TEXT, pa.string(), "pg_catalog.varchar"),
    "bpchar": _native(_TEXT, pa.string(), "pg_catalog.bpchar"),  # its binary form keeps the padding
    "name": _native(_TEXT, pa.string(), "pg_catalog.name"),
    "char": _TEXT,
    "citext": _TEXT,
    "bytea": _native(TypeMapping(pa.string(), "BLOB", load="unhex(substr({0}, 3))"), pa.binary(), "pg_catalog.bytea"),
    "uuid": _native(_cast("UUID"), pa.uuid(), "pg_catalog.uuid"),
    "json": _native(_cast("JSON"), pa.json_(), "pg_catalog.json"),
    "jsonb": _native(_cast("JSON"), pa.json_(), "pg_catalog.jsonb"),
    "date": _native(_datetime("DATE"), pa.date32(), "pg_catalog.date", "isfinite({0})"),
    "timestamp": _native(_datetime("TIMESTAMP"), pa.timestamp("us"), "pg_catalog.timestamp", _TIMESTAMP_GUARD % ""),
    "timestamptz": _native(
        _datetime("TIMESTAMPTZ"), pa.timestamp("us", tz="UTC"), "pg_catalog.timestamptz", _TIMESTAMP_GUARD % "+00"
    ),
    "time": _native(_cast("TIME"), pa.time64("us"), "pg_catalog.time", "{0} < '24:00:00'"),
    "timetz": _cast("TIMETZ"),
    "interval": TypeMapping(
        pa.string(), "INTERVAL", load="CAST({0} AS INTERVAL)", select=_INTERVAL_SELECT, from_text=interval_from_iso
    ),
    "money": TypeMapping(
        pa.string(), "DECIMAL(19,2)", load="CAST({0} AS DECIMAL(19,2))", select="{0}::numeric", from_text=money_to_number
    ),
    **{name: _TEXT for name in TEXT_FORM_TYPES},
}

# Element types whose JSON form (to_json) DuckDB casts exactly into a typed LIST.
_JSON_NATIVE_ELEMENTS = {"int2", "int4", "int8", "float4", "float8", "bool", "text", "varchar", "bpchar", "name", "char", "citext"}
# Element types whose Postgres text form DuckDB parses exactly (cast from VARCHAR elements).
_TEXT_CAST_ELEMENTS = {"uuid", "time", "timetz", "numeric", "oid"}
# Element types staged as their text (to_json(x::text[])) and converted element by element with
# the base type's load expression: BC dates and timestamps, and JSON elements that keep their
# exact text (a JSON null stays a JSON value, apart from a NULL element).
_EACH_ELEMENT = {"date", "timestamp", "timestamptz", "json", "jsonb"}


def numeric_typmod(typmod: int) -> tuple[int, int] | None:
    """(precision, scale) of a numeric's type modifier; None when no precision is declared."""
    if typmod < 4:
        return None
    return ((typmod - 4) >> 16) & 0xFFFF, (typmod - 4) & 0xFFFF


def decimal_precision(typmod: int) -> tuple[int, int] | None:
    """(precision, scale) a warehouse decimal can hold exactly (p <= 38), else None."""
    declared = numeric_typmod(typmod)
    if declared is None or declared[0] > DECIMAL_MAX_PRECISION or declared[1] > declared[0]:
        return None
    return declared


def numeric_mapping(typmod: int) -> TypeMapping:
    """numeric(p,s) with p <= 38 -> DECIMAL(p,s); unconstrained or wider numeric keeps its text."""
    fits = decimal_precision(typmod)
    return replace(_TEXT if fits is None else _cast(f"DECIMAL({fits[0]},{fits[1]})"), text_cast=True)


def _base_mapping(t: PgType, typmod: int) -> TypeMapping:
    if t.kind == "enum":
        return _TEXT
    if t.kind == "composite":  # its text form: "(a,b)"; JSON would need every field's type
        return _TEXT
    if t.name == "numeric" and t.schema == "pg_catalog":
        return numeric_mapping(typmod)
    if t.schema == "pg_catalog" and t.name in TYPE_TABLE:
        return TYPE_TABLE[t.name]
    if t.name == "citext":
        return _TEXT
    return TypeMapping(pa.string(), "VARCHAR", fallback=True)


# Array elements whose binary form the driver decodes exactly into an Arrow list.
_BINARY_LIST_ELEMENTS = {
    "int2": pa.int16(), "int4": pa.int32(), "int8": pa.int64(), "bool": pa.bool_(), "text": pa.string(),
    "varchar": pa.string(),
}
_LIST_GUARD = "cardinality({0}) = 0 OR (array_ndims({0}) = 1 AND array_lower({0}, 1) = 1)"

_ELEMENT_JSON_KIND = {"int2": "int", "int4": "int", "int8": "int", "float4": "float", "float8": "float", "bool": "bool"}


def _array_mapping(element: PgType, typmod: int, ndims: int) -> TypeMapping:
    elem, elem_mod = element.resolved(typmod)
    dims = "[]" * max(ndims, 1)
    native = elem.kind != "enum" and elem.schema == "pg_catalog" and elem.name in _JSON_NATIVE_ELEMENTS
    if native:  # to_json writes numbers, booleans and JSON as themselves
        target = TYPE_TABLE[elem.name].ddl
        mapping = TypeMapping(
            pa.string(),
            f"{target}{dims}",
            load=f"CAST(CAST({{0}} AS JSON) AS {target}{dims})",
            select="to_json({0})",
            from_text=array_to_json(_ELEMENT_JSON_KIND.get(elem.name, "text")),
        )
        if elem.name in _BINARY_LIST_ELEMENTS and ndims <= 1:
            # The backfill reads a one-dimensional array starting at 1 as an Arrow list, which
            # costs the source and DuckDB less than to_json and a JSON cast; the driver refuses
            # other lower bounds and flattens more dimensions, so those keep the to_json text.
            element_type = _BINARY_LIST_ELEMENTS[elem.name]
            return replace(
                mapping, native=pa.list_(element_type), native_type=f"pg_catalog.{elem.name}[]", native_guard=_LIST_GUARD,
                native_select="{0}",
            )
        return mapping
    as_strings = array_to_json("text")
    if elem.kind == "enum":
        return TypeMapping(
            pa.string(), f"VARCHAR{dims}", load=f"CAST(CAST({{0}} AS JSON) AS VARCHAR{dims})",
            select="to_json({0}::text[])", from_text=as_strings,
        )
    if elem.kind != "enum" and elem.schema == "pg_catalog" and elem.name in _EACH_ELEMENT:
        base = TYPE_TABLE[elem.name]
        strings = f"CAST(CAST({{0}} AS JSON) AS VARCHAR{dims})"
        load = _each_element(strings, max(ndims, 1), base.load)
        # An element with a 6-digit year, as to_json quotes it: "294270-01-01 00:00:00".
        refuse = None if base.refuse is None else "regexp_matches({0}, '\"\\d{6,}-') AND TRY(" + load + ") IS NULL"
        return TypeMapping(
            pa.string(), f"{base.ddl}{dims}", load=load, select="to_json({0}::text[])", from_text=as_strings, refuse=refuse,
        )
    if elem.schema == "pg_catalog" and elem.name in _TEXT_CAST_ELEMENTS:
        target = _base_mapping(elem, elem_mod).ddl
        return TypeMapping(
            pa.string(),
            f"{target}{dims}",
            load=f"CAST(CAST(CAST({{0}} AS JSON) AS VARCHAR{dims}) AS {target}{dims})",
            select="to_json({0}::text[])",
            from_text=as_strings,
        )
    # Everything else (bytea, interval, inet, ranges, composites, unknown): the array's own text
    # form. (A typed list would need each element's output function; casts to text differ, e.g.
    # inet::text adds /32.)
    return TypeMapping(pa.string(), "VARCHAR", fallback=_base_mapping(elem, elem_mod).fallback)


def map_column(column: Column) -> TypeMapping:
    """The mapping for one column: domains resolve to their base type, arrays map elementwise."""
    t, typmod = column.type.resolved(column.typmod)
    if t.kind == "array" and t.element is not None:
        return _array_mapping(t.element, typmod, column.ndims)
    return _base_mapping(t, typmod)
