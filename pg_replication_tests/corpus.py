"""The type corpus: one column per Postgres type, with edge values, and how to compare each side.

Each column names SQL literals for its values (row i gets value i; later rows get NULL), an
expression that renders the Postgres value canonically, the same for DuckDB, and a Python
normaliser applied to both. Canonical forms are exact (epoch microseconds, interval fields,
parsed JSON), never a lossy cast, so "equal" means the value survived.

Snowflake is read back raw (no warehouse-side SQL: fakesnow and Snowflake differ too much), and
each column's ``snowflake`` converter turns the Python value the connector returns into the
source's canonical form (``snowflake_normalize``, when given, is the source side's canonical form
there: JSON arrays compare element text elsewhere, parsed values on Snowflake). A column Snowflake keeps as text (``snowflake_source``) is compared
with the Postgres output text, exactly. Values Snowflake cannot hold (``snowflake_left_out``,
each with its reason, listed by ``left_out("snowflake")``) become NULL in the Snowflake corpus;
their refusal is tested elsewhere.
"""

from __future__ import annotations

import json
import math
import struct
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Callable

SETUP_SQL = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy ☺');
CREATE DOMAIN positive_int AS int CHECK (VALUE > 0);
CREATE TYPE address AS (street text, zip int, tags text[]);
"""


def _same(v: Any) -> Any:
    return v


def _float(v: Any) -> Any:
    if isinstance(v, list):
        return [_float(x) for x in v]
    if v is None:
        return None
    return "nan" if math.isnan(v) else v


def _float4(v: Any) -> Any:
    return None if v is None else _float(struct.unpack("f", struct.pack("f", v))[0])


def _json(v: Any) -> Any:
    if v is None:
        return None
    return json.loads(v) if isinstance(v, str) else v


def _json_list(v: Any) -> Any:
    return None if v is None else [_json(x) for x in v]


def _epoch_us(v: Any) -> Any:
    if v is None or isinstance(v, (int, str)):
        return v
    return int(v * 1_000_000) if v.is_finite() else str(v)


def _timetz(v: Any) -> Any:
    return None if v is None else (v.replace(tzinfo=None), v.utcoffset())


# Snowflake side: the connector's Python value -> the source's canonical form (after ``normalize``).
_EPOCH_DATE = date(1970, 1, 1)
_EPOCH = datetime(1970, 1, 1)
_US = timedelta(microseconds=1)


def _sf_date(v: Any) -> Any:  # date -> days since 1970 as text, like _DATE_PG
    return None if v is None else str((v - _EPOCH_DATE).days)


def _sf_timestamp(v: Any) -> Any:  # naive (NTZ) or aware (TZ) datetime -> epoch microseconds
    if v is None:
        return None
    return (v - (_EPOCH if v.tzinfo is None else _EPOCH.replace(tzinfo=timezone.utc))) // _US


def _sf_time(v: Any) -> Any:  # time -> microseconds since midnight, like _TIME_PG
    if v is None:
        return None
    return ((v.hour * 60 + v.minute) * 60 + v.second) * 1_000_000 + v.microsecond


def _sf_uuid(v: Any) -> Any:
    return None if v is None else uuid.UUID(v)


def _sf_array(element: Callable[[Any], Any] = _same, then: Callable[[Any], Any] = _same) -> Callable[[Any], Any]:
    """An ARRAY (JSON text) -> a Python list, ``element`` applied to each non-null element."""

    def walk(items: list) -> list:
        return [walk(x) if isinstance(x, list) else (None if x is None else element(x)) for x in items]

    def convert(v: Any) -> Any:
        return None if v is None else then(walk(json.loads(v) if isinstance(v, str) else v))

    return convert


def _json_float(v: Any) -> float:  # to_json writes NaN and ±Infinity as strings
    return float(v) if isinstance(v, str) else v


CLICKHOUSE_LEFT_OUT_COLUMNS = {"c_date", "c_ts", "c_tstz"}


@dataclass
class CorpusColumn:
    name: str
    pg_type: str
    values: list[str]
    pg_canon: str = "{c}"
    duck_canon: str = "{c}"
    normalize: Callable[[Any], Any] = _same
    duck_normalize: Callable[[Any], Any] | None = None
    # Snowflake: the warehouse value -> the canonical form (default: ``normalize``); the source
    # expression to compare with when Snowflake keeps the column as text (default: ``pg_canon``,
    # normalised); and the values it cannot hold, literal -> why (NULL in its corpus instead).
    snowflake: Callable[[Any], Any] | None = None
    snowflake_normalize: Callable[[Any], Any] | None = None  # the source's canonical form on Snowflake (default: ``normalize``)
    snowflake_source: str | None = None
    snowflake_left_out: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.snowflake_left_out) - set(self.values)
        assert not unknown, f"{self.name}: left out values that are not in the corpus: {unknown}"
        assert len(self.snowflake_left_out) < len(self.values), f"{self.name}: keep at least one value"

    def values_for(self, kind: str) -> list[str]:
        """The column's literals on warehouse ``kind``: a value it cannot hold becomes NULL."""
        return ["NULL" if v in self.left_out_on(kind) else v for v in self.values]

    def left_out_on(self, kind: str) -> dict[str, str]:
        """Snowflake's left-out values; on ClickHouse those of the date and timestamp columns
        (the same range: years 1 to 9999, no infinity); it keeps times and arrays as text."""
        if kind == "snowflake" or (kind == "clickhouse" and self.name in CLICKHOUSE_LEFT_OUT_COLUMNS):
            return self.snowflake_left_out
        return {}


_TS_PG = "extract(epoch from {c})"
_TS_DUCK = "CASE WHEN isinf({c}) THEN CASE WHEN {c} > '2000-01-01' THEN 'Infinity' ELSE '-Infinity' END ELSE CAST(epoch_us({c}) AS VARCHAR) END"
_DATE_PG = "CASE WHEN isfinite({c}) THEN ({c} - date '1970-01-01')::text ELSE {c}::text END"
_DATE_DUCK = "CASE WHEN isinf({c}) THEN CASE WHEN {c} > DATE '2000-01-01' THEN 'infinity' ELSE '-infinity' END ELSE CAST(datediff('day', DATE '1970-01-01', {c}) AS VARCHAR) END"
_INTERVAL_PG = "ARRAY[(extract(year from {c}) * 12 + extract(month from {c}))::int8, extract(day from {c})::int8, (extract(hour from {c}) * 3600000000 + extract(minute from {c}) * 60000000 + extract(microseconds from {c}))::int8]"
_INTERVAL_DUCK = "[datepart('year', {c}) * 12 + datepart('month', {c}), datepart('day', {c}), datepart('hour', {c}) * 3600000000 + datepart('minute', {c}) * 60000000 + datepart('microseconds', {c})]"
_TIME_PG = "(extract(epoch from {c}) * 1000000)::int8"
_TIME_DUCK = "datepart('hour', {c}) * 3600000000 + datepart('minute', {c}) * 60000000 + datepart('microseconds', {c})"


def _pg_elements(element: str) -> str:
    """An array's elements in order (flattened), each rendered by ``element`` (over ``{c}``)."""
    return (
        f"CASE WHEN {{c}} IS NOT NULL THEN ARRAY(SELECT {element.format(c='x')} "
        "FROM unnest({c}) WITH ORDINALITY u(x, o) ORDER BY o) END"
    )


def _duck_elements(element: str, dims: int = 1) -> str:
    """The same on a DuckDB LIST (``dims`` levels deep)."""
    flat = "{c}" if dims == 1 else "flatten({c})"
    return f"list_transform({flat}, lambda x: {element.format(c='x')})"


# Exact element text: epoch microseconds / days since 1970, or the infinity's name.
_TS_TEXT_PG = "CASE WHEN isfinite({c}) THEN (extract(epoch from {c}) * 1000000)::int8::text ELSE {c}::text END"
_TS_TEXT_DUCK = "CASE WHEN isinf({c}) THEN CASE WHEN {c} > '2000-01-01' THEN 'infinity' ELSE '-infinity' END ELSE CAST(epoch_us({c}) AS VARCHAR) END"
_OUTPUT_TEXT = "CASE WHEN {c} IS NOT NULL THEN format('%s', {c}) END"  # the type's output function, exactly as COPY writes it


# Why Snowflake cannot hold a value (the load refuses it; see snowflake_types.py).
_SF_NO_INFINITY = "Snowflake dates and timestamps have no infinity"
_SF_NO_BC = "Snowflake dates and timestamps have no BC era"
_SF_YEAR_9999 = "Snowflake dates and timestamps end at year 9999"


_SF_ARRAY_NULLS = "a Snowflake ARRAY holds a NULL element and a JSON null alike"
_SF_JSON_DUPLICATE_KEYS = "Snowflake's PARSE_JSON refuses duplicate object keys"


def _sf_epoch_us(text: str) -> str:
    return str(_sf_timestamp(datetime.fromisoformat(text)))


def _sf_days(text: str) -> str:
    return _sf_date(date.fromisoformat(text))


def _flatten(v: list) -> list:
    return [y for x in v for y in (_flatten(x) if isinstance(x, list) else [x])]


def _json_elements(v: Any) -> Any:
    """JSON element texts -> their parsed values (Snowflake keeps values, not the text)."""
    return None if v is None else [None if x is None else json.loads(x) for x in v]


def _ts_normalize(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, str):
        return v if v in ("Infinity", "-Infinity") else int(v)
    return _epoch_us(v)


CORPUS: list[CorpusColumn] = [
    CorpusColumn("c_int2", "int2", ["-32768", "32767", "0"]),
    CorpusColumn("c_int4", "int4", ["-2147483648", "2147483647", "0"]),
    CorpusColumn("c_int8", "int8", ["-9223372036854775808", "9223372036854775807", "0"]),
    CorpusColumn("c_num_ps", "numeric(12,2)", ["-9999999999.99", "0.01", "0", "1234.50"]),
    CorpusColumn("c_num_38", "numeric(38,10)", ["9999999999999999999999999999.9999999999", "-0.0000000001"]),
    CorpusColumn(
        "c_num", "numeric",
        ["'123456789012345678901234567890.123456789012345678901234567890'", "'NaN'", "'Infinity'", "'-Infinity'", "'-0.000001'", "'1e-300'"],
        pg_canon=_OUTPUT_TEXT,
    ),
    CorpusColumn("c_float4", "float4", ["'NaN'", "'Infinity'", "'-Infinity'", "3.4028235e38", "-1.17549435e-38", "0.1"], normalize=_float4),
    CorpusColumn("c_float8", "float8", ["'NaN'", "'Infinity'", "'-Infinity'", "1.7976931348623157e308", "5e-324", "0.1", "-0.0"], normalize=_float),
    CorpusColumn("c_bool", "bool", ["true", "false"]),
    CorpusColumn("c_text", "text", ["''", "'\"quoted\", with comma\nand newline\r\n'", "'ünïcødé 🐘 ; DROP TABLE x; --'", "'\\N'", "'NULL'", "repeat('toast-me ', 131072)"]),
    CorpusColumn("c_varchar", "varchar(10)", ["'abc'", "''"]),
    CorpusColumn("c_char", "char(5)", ["'ab'", "'abcde'"]),
    CorpusColumn("c_bytea", "bytea", ["'\\x'::bytea", "'\\x00ff2c0a22'::bytea", "decode(repeat('ab', 5000), 'hex')"]),
    CorpusColumn("c_uuid", "uuid", ["'00000000-0000-0000-0000-000000000000'", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"], snowflake=_sf_uuid),
    CorpusColumn("c_json", "json", ["'{\"b\": [1, 2.50, null], \"a\": \"x\"}'", "'[]'", "'\"s\"'", "'null'"], duck_normalize=_json, snowflake=_json),
    CorpusColumn("c_jsonb", "jsonb", ["'{\"k\": {\"n\": 1.5e3, \"u\": \"ü\"}}'", "'[1, \"two\", false]'"], duck_normalize=_json, snowflake=_json),
    CorpusColumn(
        "c_date", "date", ["'2024-02-29'", "'infinity'", "'-infinity'", "'0044-03-15 BC'", "'5874897-12-31'", "'4713-01-01 BC'"],
        pg_canon=_DATE_PG, duck_canon=_DATE_DUCK, snowflake=_sf_date,
        snowflake_left_out={
            "'infinity'": _SF_NO_INFINITY, "'-infinity'": _SF_NO_INFINITY, "'0044-03-15 BC'": _SF_NO_BC,
            "'5874897-12-31'": _SF_YEAR_9999, "'4713-01-01 BC'": _SF_NO_BC,
        },
    ),
    CorpusColumn(
        "c_ts", "timestamp", ["'2024-02-29 23:59:59.999999'", "'infinity'", "'-infinity'", "'0044-03-15 12:00:00 BC'", "'1970-01-01 00:00:00'"],
        pg_canon=_TS_PG, duck_canon=_TS_DUCK, normalize=_ts_normalize, snowflake=_sf_timestamp,
        snowflake_left_out={"'infinity'": _SF_NO_INFINITY, "'-infinity'": _SF_NO_INFINITY, "'0044-03-15 12:00:00 BC'": _SF_NO_BC},
    ),
    CorpusColumn(
        "c_tstz", "timestamptz", ["'2024-02-29 23:59:59.999999+05:30'", "'infinity'", "'-infinity'", "'2000-01-01 00:00:00.000001 UTC'", "'0044-03-15 12:00:00+00 BC'"],
        pg_canon=_TS_PG, duck_canon=_TS_DUCK, normalize=_ts_normalize, snowflake=_sf_timestamp,
        snowflake_left_out={"'infinity'": _SF_NO_INFINITY, "'-infinity'": _SF_NO_INFINITY, "'0044-03-15 12:00:00+00 BC'": _SF_NO_BC},
    ),
    CorpusColumn(
        "c_time", "time", ["'00:00:00'", "'23:59:59.999999'", "'24:00:00'"], pg_canon=_TIME_PG, duck_canon=_TIME_DUCK, snowflake=_sf_time,
        snowflake_left_out={"'24:00:00'": "Snowflake's TIME stops at 23:59:59.999999999 (no 24:00:00)"},
    ),
    CorpusColumn("c_timetz", "timetz", ["'12:34:56.789+05:30'", "'00:00:00-12'"], normalize=_timetz, snowflake_source=_OUTPUT_TEXT),
    CorpusColumn("c_interval", "interval", ["'1 year 2 months 3 days 04:05:06.789'", "'-1 month +30 days'", "'100 hours'", "'-178000000 years'", "'1 mon -1 us'"], pg_canon=_INTERVAL_PG, duck_canon=_INTERVAL_DUCK, snowflake_source=_OUTPUT_TEXT),
    CorpusColumn("c_money", "money", ["'-92233720368547758.08'", "'1234.56'"], pg_canon="{c}::numeric"),
    CorpusColumn("c_inet", "inet", ["'192.168.0.1'", "'10.0.0.0/8'", "'::1'", "'2001:db8::1/64'"], pg_canon=_OUTPUT_TEXT),
    CorpusColumn("c_cidr", "cidr", ["'10.0.0.0/8'"], pg_canon=_OUTPUT_TEXT),
    CorpusColumn("c_macaddr", "macaddr", ["'08:00:2b:01:02:03'"], pg_canon=_OUTPUT_TEXT),
    CorpusColumn("c_bit", "bit(4)", ["B'1010'"], pg_canon=_OUTPUT_TEXT),
    CorpusColumn("c_varbit", "varbit", ["B''", "B'1'"], pg_canon=_OUTPUT_TEXT),
    CorpusColumn("c_range", "int4range", ["'[1,10)'", "'empty'"], pg_canon=_OUTPUT_TEXT),
    CorpusColumn("c_tsrange", "tstzrange", ["'[2020-01-01 00:00+00,)'"], pg_canon=_OUTPUT_TEXT),
    CorpusColumn("c_tsvector", "tsvector", ["to_tsvector('simple', 'a fat cat')"], pg_canon=_OUTPUT_TEXT),
    CorpusColumn("c_xml", "xml", ["'<a b=\"1\">ü</a>'"], pg_canon=_OUTPUT_TEXT),
    CorpusColumn("c_oid", "oid", ["4294967295", "0"]),
    CorpusColumn("c_enum", "mood", ["'happy ☺'", "'sad'"], pg_canon="{c}::text"),
    CorpusColumn("c_domain", "positive_int", ["1", "2147483647"]),
    CorpusColumn("c_composite", "address", ["ROW('Main St, 1', 12345, ARRAY['a', NULL])::address", "ROW(NULL, NULL, NULL)::address"], pg_canon="{c}::text"),
    CorpusColumn("c_point", "point", ["'(1.5,-2)'"], pg_canon=_OUTPUT_TEXT),  # no mapping: text fallback
    CorpusColumn("c_lsn", "pg_lsn", ["'16/B374D848'"], pg_canon=_OUTPUT_TEXT),  # no mapping: text fallback
    # Snowflake ARRAYs hold to_json's form: numbers, booleans and JSON as themselves, other
    # elements as their Postgres text (parsed back here into the values psycopg returns).
    CorpusColumn("a_int4", "int4[]", ["ARRAY[1, NULL, -3]", "'{}'", "ARRAY[NULL]::int4[]", "'[0:1]={7,8}'"], snowflake=_sf_array()),
    CorpusColumn("a_int8_2d", "int8[][]", ["ARRAY[[1, 2], [3, NULL]]", "'{}'"], snowflake=_sf_array()),
    CorpusColumn("a_text", "text[]", ["ARRAY['a', NULL, '', 'ü \"q\" ,', 'NULL']", "'{}'", "'[2:3]={x,y}'"], snowflake=_sf_array()),
    CorpusColumn("a_float8", "float8[]", ["ARRAY['NaN', 'Infinity', '-Infinity', 0.1]::float8[]"], normalize=_float, snowflake=_sf_array(_json_float, _float)),
    CorpusColumn("a_bool", "bool[]", ["ARRAY[true, false, NULL]"], snowflake=_sf_array()),
    CorpusColumn("a_numeric", "numeric(10,2)[]", ["ARRAY[1.50, -99999999.99, NULL]"], snowflake=_sf_array(Decimal)),
    # Dates and timestamps inside arrays: BC, ±infinity and the extremes, compared element by element.
    CorpusColumn(
        "a_date", "date[]",
        ["ARRAY['2024-02-29'::date, NULL]", "ARRAY['0044-03-15 BC'::date, 'infinity', '-infinity', '5874897-12-31', '4713-01-01 BC', NULL]"],
        pg_canon=_pg_elements(_DATE_PG), duck_canon=_duck_elements(_DATE_DUCK), snowflake=_sf_array(_sf_days),
        snowflake_left_out={"ARRAY['0044-03-15 BC'::date, 'infinity', '-infinity', '5874897-12-31', '4713-01-01 BC', NULL]": _SF_NO_BC},
    ),
    CorpusColumn(
        "a_date_2d", "date[][]",
        ["ARRAY[['2024-02-29'::date, NULL]]", "ARRAY[['0044-03-15 BC'::date, NULL], ['infinity'::date, '1970-01-02']]"],
        pg_canon=_pg_elements(_DATE_PG), duck_canon=_duck_elements(_DATE_DUCK, dims=2), snowflake=_sf_array(_sf_days, _flatten),
        snowflake_left_out={"ARRAY[['0044-03-15 BC'::date, NULL], ['infinity'::date, '1970-01-02']]": _SF_NO_BC},
    ),
    CorpusColumn(
        "a_ts", "timestamp[]",
        [
            "ARRAY['2024-02-29 23:59:59.999999'::timestamp, NULL]",
            "ARRAY['0044-03-15 12:00:00 BC'::timestamp, 'infinity', '-infinity', '4713-11-24 00:00:00 BC', '1970-01-01']",
            "'{}'",
        ],
        pg_canon=_pg_elements(_TS_TEXT_PG), duck_canon=_duck_elements(_TS_TEXT_DUCK), snowflake=_sf_array(_sf_epoch_us),
        snowflake_left_out={"ARRAY['0044-03-15 12:00:00 BC'::timestamp, 'infinity', '-infinity', '4713-11-24 00:00:00 BC', '1970-01-01']": _SF_NO_BC},
    ),
    CorpusColumn(
        "a_tstz", "timestamptz[]",
        ["ARRAY['2024-02-29 10:00:00.123456+02'::timestamptz]", "ARRAY['0044-03-15 12:00:00+00 BC'::timestamptz, 'infinity', '-infinity', NULL]"],
        pg_canon=_pg_elements(_TS_TEXT_PG), duck_canon=_duck_elements(_TS_TEXT_DUCK), snowflake=_sf_array(_sf_epoch_us),
        snowflake_left_out={"ARRAY['0044-03-15 12:00:00+00 BC'::timestamptz, 'infinity', '-infinity', NULL]": _SF_NO_BC},
    ),
    CorpusColumn("a_uuid", "uuid[]", ["ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid]"], snowflake=_sf_array(uuid.UUID)),
    # JSON arrays: each element keeps its text (json as written, jsonb as Postgres prints it), and
    # a JSON null stays a JSON value, apart from a NULL element.
    CorpusColumn(
        "a_jsonb", "jsonb[]",
        ["ARRAY['{\"a\": 1}'::jsonb, '[2]'::jsonb, NULL]", "ARRAY['null'::jsonb, NULL, '\"null\"', '{\"k\": {\"n\": 1.5e3, \"u\": \"ü\"}}']"],
        pg_canon="{c}::text[]", duck_canon="CAST({c} AS VARCHAR[])",
        snowflake_normalize=_json_elements, snowflake=_sf_array(),
        snowflake_left_out={"ARRAY['null'::jsonb, NULL, '\"null\"', '{\"k\": {\"n\": 1.5e3, \"u\": \"ü\"}}']": _SF_ARRAY_NULLS},
    ),
    CorpusColumn(
        "a_json", "json[]",
        ["ARRAY['{\"b\": 1}'::json, '[2.50]']", "ARRAY['{\"b\":  1.50e3, \"a\":2, \"a\":3}'::json, 'null', NULL, ' [ 1 ,2] ', '\"ü\\u00fc\"']"],
        pg_canon="{c}::text[]", duck_canon="CAST({c} AS VARCHAR[])",
        snowflake_normalize=_json_elements, snowflake=_sf_array(),
        snowflake_left_out={"ARRAY['{\"b\":  1.50e3, \"a\":2, \"a\":3}'::json, 'null', NULL, ' [ 1 ,2] ', '\"ü\\u00fc\"']": _SF_JSON_DUPLICATE_KEYS},
    ),
    CorpusColumn("a_enum", "mood[]", ["ARRAY['ok', 'happy ☺']::mood[]"], pg_canon="{c}::text[]", snowflake=_sf_array()),
    CorpusColumn("a_bytea", "bytea[]", ["ARRAY['\\x00ff'::bytea]"], pg_canon=_OUTPUT_TEXT),
    CorpusColumn("a_inet", "inet[]", ["ARRAY['10.0.0.1'::inet, NULL, '10.0.0.0/8']"], pg_canon=_OUTPUT_TEXT),
    CorpusColumn("a_interval", "interval[]", ["ARRAY['1 mon 2 days'::interval]"], pg_canon=_OUTPUT_TEXT),
    CorpusColumn("a_domain", "positive_int[]", ["ARRAY[1, 2]::positive_int[]"], pg_canon="{c}::int[]", snowflake=_sf_array()),
]

CORPUS_ROWS = max(len(c.values) for c in CORPUS) + 1  # the last row is NULL everywhere


def left_out(kind: str) -> list[tuple[str, str, str, str]]:
    """The corpus values warehouse ``kind`` cannot hold: (column, Postgres type, literal, reason)."""
    return [(c.name, c.pg_type, v, why) for c in CORPUS for v, why in c.left_out_on(kind).items()]


def left_out_report(kind: str) -> str:
    """``left_out(kind)`` as text, one value a line ('' when nothing is left out)."""
    return "\n".join(f"left out on {kind}: {col} ({pg_type}) {value}: {why}" for col, pg_type, value, why in left_out(kind))


def corpus_table_sql(schema: str, table: str, kind: str = "duckdb") -> str:
    """DDL + INSERTs for the corpus table (values are fixed literals above, not user input).
    For warehouse ``kind``, the values it cannot hold are NULL instead (see ``left_out``): the
    row ids stay, and every column keeps at least one value."""
    ident = f'"{schema}"."{table}"'
    cols = ", ".join(f"{c.name} {c.pg_type}" for c in CORPUS)
    lines = [SETUP_SQL, f"CREATE TABLE {ident} (id int PRIMARY KEY, {cols});"]
    columns = [c.values_for(kind) for c in CORPUS]
    for c, values in zip(CORPUS, columns):
        assert any(v != "NULL" for v in values), f"{c.name} has no value left on {kind}"
    for i in range(CORPUS_ROWS):
        values = ", ".join(v[i] if i < len(v) else "NULL" for v in columns)
        lines.append(f"INSERT INTO {ident} (id, {', '.join(c.name for c in CORPUS)}) VALUES ({i}, {values});")
    return "\n".join(lines)


def _source_canon(c: CorpusColumn, kind: str) -> str:
    return c.snowflake_source if kind == "snowflake" and c.snowflake_source else c.pg_canon


def pg_select(schema: str, table: str, kind: str = "duckdb") -> str:
    """The canonical select on the source, for comparison with warehouse ``kind``."""
    exprs = ", ".join(_source_canon(c, kind).format(c=c.name) for c in CORPUS)
    return f'SELECT id, {exprs} FROM "{schema}"."{table}" ORDER BY id'


def warehouse_select(kind: str, table: str) -> str:
    """The canonical select on the warehouse side; ``table`` is the warehouse's name for it.
    A Postgres replica keeps the types, so it is read like the source. Snowflake is read raw
    (plain names are stored upper-case) and canonicalised in Python (``CorpusColumn.snowflake``)."""
    if kind == "postgres":
        exprs = ", ".join(c.pg_canon.format(c=c.name) for c in CORPUS)
    elif kind == "snowflake":
        names = ", ".join(f'"{c.name.upper()}"' for c in CORPUS)
        return f'SELECT "ID", {names} FROM {table} ORDER BY "ID"'
    else:
        exprs = ", ".join(c.duck_canon.format(c=f'"{c.name}"') for c in CORPUS)
    return f"SELECT id, {exprs} FROM {table} ORDER BY id"


def _canonical(col: CorpusColumn, kind: str, source: Any, warehouse: Any) -> tuple[Any, Any]:
    if kind == "postgres":
        return col.normalize(source), col.normalize(warehouse)
    if kind == "snowflake":
        if col.snowflake_source:  # kept as text: the Postgres output text, exactly
            return source, warehouse
        return (col.snowflake_normalize or col.normalize)(source), (col.snowflake or col.normalize)(warehouse)
    return col.normalize(source), (col.duck_normalize or col.normalize)(warehouse)


def mismatches(pg_rows: list[tuple], duck_rows: list[tuple], kind: str = "duckdb") -> list[str]:
    """Every (row, column) where the two sides differ, described for the assertion message.
    ``pg_rows`` come from ``pg_select(..., kind)``, ``duck_rows`` from ``warehouse_select(kind, ...)``."""
    problems = []
    if [r[0] for r in pg_rows] != [r[0] for r in duck_rows]:
        return [f"row ids differ: {[r[0] for r in pg_rows]} vs {[r[0] for r in duck_rows]}"]
    for pg_row, duck_row in zip(pg_rows, duck_rows):
        for col, pv, dv in zip(CORPUS, pg_row[1:], duck_row[1:]):
            left, right = _canonical(col, kind, pv, dv)
            if left != right:
                problems.append(f"id={pg_row[0]} {col.name} ({col.pg_type}): source {str(left)[:80]!r} != warehouse {str(right)[:80]!r}")
    return problems


__all__ = [
    "CORPUS", "CORPUS_ROWS", "Decimal", "corpus_table_sql", "left_out", "left_out_report", "mismatches", "pg_select", "warehouse_select",
]
