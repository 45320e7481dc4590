"""text_values (the CDC path's text-form converters) agree with Postgres, used as the oracle.

Proves, against a real Postgres 15 session with IntervalStyle=iso_8601 and lc_monetary=C (the
settings CDC decoding runs under):
  * interval_from_iso gives exactly the months/days/microseconds the backfill's extract()
    expression gives, for edge intervals (zero, negative and mixed-sign parts, fractions, the
    largest and smallest values), and its result reads back as the same interval;
  * money_to_number gives the money's numeric text, extremes and negatives included;
  * array_to_json(kind) of an array's text form equals to_json(array) (or to_json(array::text[])
    for the types kept as text) for int2/4/8, float4/8 (NaN, ±Infinity, -0, extremes), bool,
    text/varchar/bpchar/name and json/jsonb arrays, and for uuid, date, timestamptz, numeric,
    interval, bytea, inet, range, composite, enum, tsvector, xml, point, money and bit arrays:
    NULL elements, empty, 2-D/3-D, explicit bounds, elements with quotes, backslashes, commas,
    braces, spaces, unicode and the string "NULL";
  * json[]/jsonb[]: CDC's converter stages each element's exact text, as the backfill's select
    does (a JSON null as the text 'null', a NULL element as null), 1-D, 2-D and empty;
  * property: any text[] (optional unicode strings without NUL) Postgres renders parses back to
    the same list (PGR_FUZZ_EXAMPLES overrides the 200 examples).

Arrays of types whose text cast differs from their output function (inet: /32) or whose
delimiter is not ',' (box: ';') are kept as their literal text in the warehouse (types.py), so
parse_array never sees them.

Leaves out: arrays of types whose text form DuckDB cannot load (that is types.py's table), the
pgoutput transport (test_pgoutput.py), and non-default DateStyle/lc_monetary settings.
"""

from __future__ import annotations

import json
import os
import uuid
from decimal import Decimal

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import sql

from pg_replication.source.text_values import array_to_json, interval_from_iso, money_to_number, parse_array

FUZZ_EXAMPLES = int(os.environ.get("PGR_FUZZ_EXAMPLES", "200"))

# Characters str.strip() removes but Postgres' array_out does not quote (it only quotes
# " \t\n\r\v\f"): see test_unquoted_unicode_whitespace_survives.


def _oracle_session(conn: psycopg.Connection) -> None:
    conn.execute("SET IntervalStyle = iso_8601")
    conn.execute("SET lc_monetary = 'C'")


def _same(a, b) -> bool:
    """JSON values equal, without Python's True == 1 leniency (1 and 1.0 are the same JSON number)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


# --------------------------------------------------------------------------- interval

INTERVALS = [
    "0",
    "1 year 2 mons 3 days 04:05:06.789",
    "-1 year -2 mons -3 days -04:05:06.789",
    "-1 day -00:00:01.5",
    "1 mon -1 day",
    "-1 year +1 mon",
    "1 day -1 hour",
    "1 hour -1 minute",
    "-1:30",
    "1 microsecond",
    "-1 microsecond",
    "0.5 seconds",
    "59.999999 seconds",
    "1 day 23:59:59.999999",
    "100 hours",
    "3 weeks",
    "1 year -1 mon 1 day -1 hour 1 minute -1 second",
    "178000000 years",
    "-178000000 years",
    "2147483647 days",
    "-2147483648 days",
    "2147483647 mons",
    "-2147483648 mons",
    "2562047788:00:54.775807",
    "-2562047788:00:54.775807",  # one above the minimum: interval input rejects the minimum itself
    "2147483647 mons 2147483647 days 2562047788:00:54.775807",
]


def test_interval_from_iso_matches_extract(pg):
    _oracle_session(pg)
    rows = pg.execute(
        """SELECT i::text,
                  (extract(year from i) * 12 + extract(month from i))::int8,
                  extract(day from i)::int8,
                  (extract(hour from i) * 3600000000 + extract(minute from i) * 60000000
                   + extract(microseconds from i))::int8
           FROM unnest(%s::text[]::interval[]) i""",
        (INTERVALS,),
    ).fetchall()
    assert len(rows) == len(INTERVALS)
    wrong = []
    for iso, months, days, micros in rows:
        got = interval_from_iso(iso)
        if got != f"{months} months {days} days {micros} microseconds":
            wrong.append((iso, got, months, days, micros))
            continue
        same = pg.execute("SELECT %s::interval::text = %s", (got, iso)).fetchone()[0]
        if not same:
            wrong.append((iso, got, "does not read back"))
    assert wrong == []


@pytest.mark.parametrize("text", ["", "1 day", "@ 1 day", "P1.5D", "1Y", "P1Y2M3DT4H5M6.7.8S", "-00:00:01"])
def test_interval_from_iso_rejects_other_styles(text):
    with pytest.raises(ValueError):
        interval_from_iso(text)


# --------------------------------------------------------------------------- money

MONEY = [
    "0",
    "0.01",
    "-0.01",
    "1",
    "-1",
    "999.99",
    "1000",
    "-1234567.89",
    "1234567.891",  # rounds to cents
    "92233720368547758.07",
    "-92233720368547758.08",
]


def test_money_to_number_matches_numeric(pg):
    _oracle_session(pg)
    rows = pg.execute("SELECT m::text, m::numeric::text FROM unnest(%s::text[]::money[]) m", (MONEY,)).fetchall()
    assert len(rows) == len(MONEY)
    assert any("," in text for text, _ in rows) and any(text.startswith("-$") for text, _ in rows)
    wrong = [(text, money_to_number(text), number) for text, number in rows if money_to_number(text) != number]
    assert wrong == []
    for text, number in rows:
        assert Decimal(money_to_number(text)) == Decimal(number)


# --------------------------------------------------------------------------- arrays

TRICKY_STRINGS = [
    "plain", "", " ", " lead", "trail ", "a b", "a,b", 'a"b', "a\\b", "\\", '"', '\\"', "{", "}", "{a}",
    "{a,b}", "NULL", "null", "NuLl", "NULL ", None, "é中😀", "tab\there", "new\nline", "cr\rret", "'single'",
    "[1:2]={x}", "=",
]
JSON_DOCS = [
    '{"a": 1, "b": [true, null, "x"]}', '"quo\\"te , {} \\\\ back"', "null", "1.5", "-0", "[]", "{}", None,
    '"é中😀"', "12345678901234567890123", '"NULL"', "true", '[[1, 2], {"k": {"n": null}}]',
]

# (element kind, SQL producing the array, parameters)
NATIVE_CASES = [
    ("int", "'{1,-2,NULL,2147483647,-2147483648}'::int4[]", ()),
    ("int", "'{-32768,32767,NULL,0}'::int2[]", ()),
    ("int", "'{-9223372036854775808,9223372036854775807}'::int8[]", ()),
    ("int", "'{}'::int4[]", ()),
    ("int", "ARRAY[NULL]::int4[]", ()),
    ("int", "'{{1,2},{3,NULL}}'::int4[]", ()),
    ("int", "'{{{1},{2}},{{3},{4}}}'::int8[]", ()),
    ("int", "'[0:2]={7,8,9}'::int4[]", ()),
    ("int", "'[-1:0][2:3]={{1,2},{3,4}}'::int2[]", ()),
    ("float", "'{NaN,Infinity,-Infinity,-0,0,1e300,-1e-300,0.1,NULL}'::float8[]", ()),
    ("float", "'{1.7976931348623157e308,5e-324,-2.2250738585072014e-308,123456789.125}'::float8[]", ()),
    ("float", "'{NaN,Infinity,3.4028235e38,1.4e-45,0.1,-0,NULL}'::float4[]", ()),
    ("float", "'{{1.5,2},{NULL,-3}}'::float8[]", ()),
    ("float", "'{}'::float4[]", ()),
    ("bool", "'{t,f,NULL}'::bool[]", ()),
    ("bool", "'{{t},{f}}'::bool[]", ()),
    ("bool", "'{}'::bool[]", ()),
    ("text", "%s::text[]", (TRICKY_STRINGS,)),
    ("text", "%s::varchar[]", (TRICKY_STRINGS,)),
    ("text", "%s::varchar(3)[]", (["abc", "a,b", "  ", None, "é中😀"],)),
    ("text", "'{a,\"b c\",NULL,\"\",\"NULL\"}'::char(3)[]", ()),
    ("text", "%s::name[]", (["pg_class", "with space", '"quoted"', "NULL", None],)),
    ("text", "'{}'::text[]", ()),
    ("text", "ARRAY[['a','b,c'],['\"q\"',NULL],['{}','\\']]::text[]", ()),
    ("text", "'[2:3]={x,\"y z\"}'::text[]", ()),
    ("text", "ARRAY[repeat('é中,\"\\', 2000)]::text[]", ()),
    ("json", "%s::jsonb[]", (JSON_DOCS,)),
    ("json", "%s::json[]", (JSON_DOCS + ['{"a":1,"a":2}', ' [ 1 ,\n 2 ] '],)),
    ("json", "ARRAY[['1','{\"k\": \"v, {}\"}'],['null',NULL]]::jsonb[]", ()),
    ("json", "'{}'::jsonb[]", ()),
]

TEXT_KIND_CASES = [
    "'{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11,NULL}'::uuid[]",
    "'{2024-01-01,infinity,-infinity,4713-01-01 BC,NULL}'::date[]",
    "'{{2024-01-01,NULL},{2024-01-02,2024-01-03}}'::date[]",
    "'{\"2024-01-01 12:00:00.123456+02\",epoch,infinity,NULL}'::timestamptz[]",
    "'{\"2024-01-01 12:00:00\",\"294276-12-31 23:59:59.999999\"}'::timestamp[]",
    "'{12:00:00.5,24:00}'::time[]",
    "'{1.5,NaN,-0.000001,123456789012345678901234567890.000000001,NULL}'::numeric[]",
    "ARRAY['1 year 2 mons'::interval, '-1 day -00:00:01.5', NULL]",
    "ARRAY['\\x00ff'::bytea, ''::bytea, '\\x5c22'::bytea, NULL]",
    "'{192.168.0.1/24,2001:db8::/32,NULL}'::inet[]",
    "'{10.0.0.0/8}'::cidr[]",
    "'{08:00:2b:01:02:03}'::macaddr[]",
    "'{\"[1,5)\",empty,\"(,)\",NULL}'::int4range[]",
    "ARRAY[ROW('x, \"y\" \\ {z}', 1)::pair, ROW(NULL, NULL)::pair, ROW('', -1)::pair, NULL]",
    "ARRAY['happy', 'so so', 'NULL', 'é,\"q\"', NULL]::mood[]",
    "ARRAY['a:1 b:2'::tsvector, 'it''s'::tsvector]",
    "ARRAY['<a x=\"1\">t, {u}</a>'::xml]",
    "'{\"(1,2)\",\"(3.5,-4)\"}'::point[]",
    "'{$1.00,-$2.50,\"$1,234.56\",NULL}'::money[]",
    "'{101,NULL}'::bit(3)[]",
    "'{1,4294967295}'::oid[]",
]


@pytest.fixture
def array_db(pg):
    _oracle_session(pg)
    pg.execute("CREATE TYPE pair AS (a text, b int)")
    pg.execute("CREATE TYPE mood AS ENUM ('happy', 'so so', 'NULL', 'é,\"q\"')")
    return pg


def _compare(conn, kind: str, expr: str, params, as_text: bool):
    json_expr = "to_json(v::text[])" if as_text else "to_json(v)"
    text, expected = conn.execute(f"SELECT v::text, {json_expr}::text FROM (SELECT {expr} AS v) s", params).fetchone()
    got = array_to_json(kind)(text)
    return None if _same(json.loads(got), json.loads(expected)) else (expr, text, got, expected)


def test_native_arrays_match_to_json(array_db):
    wrong = [w for kind, expr, params in NATIVE_CASES if (w := _compare(array_db, kind, expr, params, False))]
    assert wrong == []


def test_text_kept_arrays_match_to_json_of_text_array(array_db):
    wrong = [w for expr in TEXT_KIND_CASES if (w := _compare(array_db, "text", expr, (), True))]
    assert wrong == []


def test_parse_array_shapes():
    assert parse_array("{}") == []
    assert parse_array("{NULL,\"NULL\",null}") == [None, "NULL", "null"]
    assert parse_array('{{a,"b,c"},{"",NULL}}') == [["a", "b,c"], ["", None]]
    assert parse_array('[0:1]={"\\\\","\\""}') == ["\\", '"']


@pytest.mark.parametrize("text", ["{", '{"a', "{a", "{a,", "{{1},", "{}x", "x", "{a}}", '{"a"b}', "[1:2]"])
def test_parse_array_rejects_malformed(text):
    with pytest.raises(ValueError):
        parse_array(text)


@pytest.mark.parametrize("text", ["", '{"a\\'])
def test_parse_array_malformed_raises_value_error(text):
    with pytest.raises(ValueError):
        parse_array(text)


def test_unquoted_unicode_whitespace_survives(array_db):
    values = ["\u00a0a", "a\u3000", "\x1fb\x1c", "x\x85", "\u2028"]
    text = array_db.execute("SELECT %s::text[]::text", (values,)).fetchone()[0]
    assert parse_array(text) == values


# --------------------------------------------------------------------------- property


@pytest.fixture(scope="module")
def shared_pg(server_url):
    """One connection for the hypothesis test, in its own database."""
    name = f"pgr_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = psycopg.conninfo.conninfo_to_dict(server_url)
    params["dbname"] = name
    try:
        with psycopg.connect(psycopg.conninfo.make_conninfo(**params), autocommit=True) as conn:
            _oracle_session(conn)
            yield conn
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


_elements = st.one_of(
    st.none(),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12),
    st.sampled_from(["NULL", "null", "", " ", "{", "}", ",", '"', "\\", "a b", "\t"]),
)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.lists(_elements, max_size=8))
def test_text_arrays_rendered_by_postgres_parse_back(shared_pg, values):
    text = shared_pg.execute("SELECT %s::text[]::text", (values,)).fetchone()[0]
    assert parse_array(text) == values
    assert json.loads(array_to_json("text")(text)) == values


# --------------------------------------------------------------------------- json arrays, both paths

JSON_ARRAYS = [
    ("json[]", "ARRAY['{\"b\":  1.50e3, \"a\":2, \"a\":3}'::json, 'null', NULL, ' [ 1 ,2] ', '\"\\u00fc\"', '\"NULL\"']"),
    ("jsonb[]", "ARRAY['null'::jsonb, NULL, '\"null\"', '{\"k\": {\"n\": 1.5e3, \"u\": \"ü\"}}', '1']"),
    ("jsonb[]", "ARRAY[['{}'::jsonb, '[]'], [NULL, '\"a,b\"'::jsonb]]"),
    ("json[]", "'{}'::json[]"),
]


@pytest.mark.parametrize("pg_type, literal", JSON_ARRAYS)
def test_json_array_elements_stage_the_same_text_in_backfill_and_cdc(pg, pg_type, literal):
    """CDC's converter over the array's text form stages exactly what the backfill's COPY
    select stages: each element's own text, a JSON null as the text 'null', a NULL element as null."""
    from pg_replication.config import parse_config
    from pg_replication.source.catalog import introspect
    from pg_replication.types import map_column

    pg.execute(f"CREATE TABLE j (id int PRIMARY KEY, v {pg_type})")
    pg.execute(f"INSERT INTO j VALUES (1, {literal})")
    (table,) = introspect(pg, parse_config({"tables": ["j"]}))
    mapping = map_column(table.column("v"))
    text, staged, elements = pg.execute(
        sql.SQL("SELECT v::text, ({})::text, v::text[] FROM j").format(mapping.select_sql("v"))
    ).fetchone()
    assert mapping.from_text is not None
    assert json.loads(mapping.from_text(text)) == json.loads(staged) == elements
