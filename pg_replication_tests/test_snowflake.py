"""The Snowflake dialect on fakesnow (an emulation on DuckDB) against a real Postgres.

Proves: the type table; name folding (plain names upper-case, odd ones exact); backfill + CDC
round trips (inserts, updates, key changes, deletes, truncate, unchanged TOAST, added columns with
a missing value); the MERGE path gives the same tables as the DELETE + INSERT path the shared
suite runs; a value Snowflake cannot hold fails its table only, with the value in the message.
Leaves out: case sensitivity (DuckDB ignores the case of quoted names, so only construction
keeps it right) and real Snowflake's SQL dialect (no account here).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime, time, timezone
from decimal import Decimal

import pyarrow as pa
import pytest
import snowflake.connector
from psycopg import sql

from pg_replication import types
from pg_replication.replicate.backfill import SlotSettings, run_backfill
from pg_replication.replicate.cdc import DrainResult, DrainSettings, drain_once
from pg_replication.config import parse_config
from pg_replication.errors import ConfigError, WarehouseError
from pg_replication.source.catalog import Column, PgType, Table, introspect
from pg_replication.source.connection import connect
from pg_replication.warehouse import snowflake_stage, snowflake_types, staging
from pg_replication.warehouse.snowflake import SnowflakeWarehouse, fold
from pg_replication_tests.fake_snowflake import fake_snowflake

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # DuckDB: "Arrow output ... extra copy"


@pytest.fixture
def fake() -> Iterator[None]:
    with fake_snowflake():
        yield


def _connect(database: str = "PGR"):
    return snowflake.connector.connect(database=database, schema="PUBLIC", paramstyle="qmark")


class _Recording(SnowflakeWarehouse):
    """Keeps the statements it ran, to show which path applied the changes."""

    def execute(self, query, params=()):
        self.statements.append(query)
        super().execute(query, params)

    def fetchall(self, query, params=()):
        self.statements.append(query)
        return super().fetchall(query, params)

    def __init__(self, conn, **kw):
        self.statements: list[str] = []
        super().__init__(conn, **kw)


class _MergeOutsideTransactions(_Recording):
    """fakesnow runs MERGE through a temporary table, which DuckDB refuses inside a transaction:
    this one runs every statement on its own, so the MERGE path can run at all."""

    def begin(self):
        pass

    def commit(self):
        pass

    def rollback(self):
        pass


class Replica:
    """Backfill and drain source tables into one fakesnow database, opening a fresh warehouse
    per step as a Dagster run does."""

    def __init__(self, pg_url: str, tables: list, *, database: str = "PGR", merge: bool = False, slot: str = "pgr_sf") -> None:
        self.pg_url, self.database, self.merge = pg_url, database, merge
        self.settings = DrainSettings(slot=slot, publication="pgr_sf_pub")
        self.config = parse_config({"tables": tables, "defaults": {"partitions": 2}})
        self.reload()
        self.statements: list[str] = []

    @contextmanager
    def open(self, read_only: bool = False) -> Iterator[SnowflakeWarehouse]:
        conn = _connect(self.database)
        try:
            cls = _MergeOutsideTransactions if self.merge else _Recording
            wh = cls(conn, read_only=read_only, merge=self.merge)
            yield wh
            self.statements += wh.statements
        finally:
            conn.close()

    def reload(self) -> None:
        """Read the tables' columns again (after ALTER TABLE in the source)."""
        with connect(self.pg_url) as conn:
            self.tables = introspect(conn, self.config)

    def table(self, name: str) -> Table:
        return next(t for t in self.tables if t.name == name)

    def backfill(self, slices=(0, 1)) -> None:
        with self.open() as wh:
            for table in self.tables:
                run_backfill(self.pg_url, wh, table, slices, partitions=2, cdc=SlotSettings(self.settings.slot, self.settings.publication))

    def drain_all(self) -> list[DrainResult]:
        results = []
        for _ in range(20):
            with self.open() as wh:
                results.append(drain_once(self.pg_url, wh, self.tables, self.settings))
            if results[-1].caught_up:
                return results
        raise AssertionError("CDC did not catch up")

    def rows(self, name: str) -> list[tuple]:
        table = self.table(name)
        with self.open(read_only=True) as wh:
            select = ", ".join(wh.ident(c.name) for c in table.columns)
            order = ", ".join(wh.ident(k) for k in table.primary_key)
            rows = wh.fetchall(f"SELECT {select} FROM {wh.table_name(table)} ORDER BY {order}")
        return [tuple(_json(v) if c.type.name in ("jsonb", "_int4") else v for c, v in zip(table.columns, r)) for r in rows]

    def source_rows(self, pg, name: str) -> list[tuple]:
        table = self.table(name)
        query = sql.SQL("SELECT {} FROM {} ORDER BY {}").format(
            sql.SQL(", ").join(sql.Identifier(c.name) for c in table.columns),
            table.ident,
            sql.SQL(", ").join(sql.Identifier(k) for k in table.primary_key),
        )
        return pg.execute(query).fetchall()

    def assert_equal(self, pg, name: str) -> None:
        source, warehouse = self.source_rows(pg, name), self.rows(name)
        assert len(source) == len(warehouse), f"{name}: {len(source)} source rows, {len(warehouse)} warehouse rows"
        for s, w in zip(source, warehouse):
            assert s == w, f"{name}: source {s!r:.300} != warehouse {w!r:.300}"


def _json(v):
    return json.loads(v) if isinstance(v, str) else v  # fakesnow returns VARIANT and ARRAY as JSON text


# -- types (no database) ----------------------------------------------------------------------

def _column(type_name: str, typmod: int = -1, kind: str = "base", element: PgType | None = None) -> Column:
    pg_type = PgType(1, "pg_catalog", type_name, kind, element=element)
    return Column("c", 1, pg_type, typmod, 1 if element else 0, False, type_name)


def _numeric_typmod(precision: int, scale: int) -> int:
    return ((precision << 16) | scale) + 4


def _array(element: str, oid: int) -> Column:
    return _column(f"_{element}", kind="array", element=PgType(oid, "pg_catalog", element, "base"))


@pytest.mark.parametrize(
    ("column", "ddl"),
    [
        pytest.param(*case, id=f"{case[0].type_sql}/{case[0].typmod}")
        for case in [
            (_column("int2"), "NUMBER(5,0)"),
            (_column("int4"), "NUMBER(10,0)"),
            (_column("int8"), "NUMBER(19,0)"),
            (_column("oid"), "NUMBER(10,0)"),
            (_column("numeric", _numeric_typmod(12, 2)), "NUMBER(12,2)"),
            (_column("numeric", _numeric_typmod(38, 38)), "NUMBER(38,38)"),
            (_column("numeric", _numeric_typmod(39, 2)), "VARCHAR"),
            (_column("numeric"), "VARCHAR"),
            (_column("float4"), "FLOAT"),
            (_column("float8"), "FLOAT"),
            (_column("bool"), "BOOLEAN"),
            (_column("text"), "VARCHAR"),
            (_column("uuid"), "VARCHAR"),
            (_column("interval"), "VARCHAR"),
            (_column("timetz"), "VARCHAR"),
            (_column("bytea"), "BINARY"),
            (_column("json"), "VARIANT"),
            (_column("jsonb"), "VARIANT"),
            (_column("date"), "DATE"),
            (_column("timestamp"), "TIMESTAMP_NTZ(6)"),
            (_column("timestamptz"), "TIMESTAMP_TZ(6)"),
            (_column("time"), "TIME(6)"),
            (_column("money"), "NUMBER(19,2)"),
            (_array("int4", 23), "ARRAY"),
            (_array("text", 25), "ARRAY"),
            (_array("numeric", 1700), "ARRAY"),
            (_array("bytea", 17), "VARCHAR"),
            (_array("interval", 1186), "VARCHAR"),
            (_column("mood", kind="enum"), "VARCHAR"),
            (_column("address", kind="composite"), "VARCHAR"),
        ]
    ],
)
def test_type_mapping(column, ddl):
    mapping = snowflake_types.map_column(column)
    assert mapping.ddl == ddl
    assert mapping.arrow == pa.string()  # everything is staged as text
    if ddl == "ARRAY":  # the JSON types.py stages arrays as, for both paths
        staged = types.map_column(column)
        assert mapping.select == staged.select and mapping.select.startswith("to_json(")
        assert mapping.from_text is not None and mapping.from_text("{1,NULL}") == staged.from_text("{1,NULL}")


@pytest.mark.parametrize(
    ("column", "native"),
    [
        (_column("int4"), pa.int32()),
        (_column("oid"), pa.int64()),
        (_column("numeric", _numeric_typmod(12, 2)), pa.decimal128(12, 2)),
        (_column("numeric"), None),  # no precision: its exact text
        (_column("float8"), pa.float64()),
        (_column("float4"), None),  # text: 0.1, not its float64 widening 0.10000000149011612
        (_column("bytea"), pa.binary()),
        (_column("timestamptz"), None),  # text: +00:00 as CDC writes it, not the session's offset
        (_column("time"), pa.time64("us")),
        (_column("uuid"), None),
        (_column("jsonb"), None),
        (_array("int4", 23), None),
    ],
    ids=lambda v: getattr(v, "type_sql", None) or str(v),
)
def test_backfill_reads_natively_what_snowflake_holds_exactly(column, native):
    assert snowflake_types.map_column(column).native == native


def test_type_table_covers_every_type_and_keeps_the_staged_forms():
    assert set(types.TYPE_TABLE) == set(snowflake_types.TYPE_TABLE)
    money = snowflake_types.TYPE_TABLE["money"]
    assert (money.select, money.from_text) == (types.TYPE_TABLE["money"].select, types.TYPE_TABLE["money"].from_text)
    interval = snowflake_types.TYPE_TABLE["interval"]  # ISO 8601 text, as Postgres prints it
    assert (interval.select, interval.from_text) == ("{0}", None)
    domain = PgType(2, "public", "positive_int", "domain", base=PgType(23, "pg_catalog", "int4", "base"))
    assert snowflake_types.map_column(Column("d", 1, domain, -1, 0, False, "positive_int")).ddl == "NUMBER(10,0)"
    unknown = snowflake_types.map_column(Column("p", 1, PgType(600, "pg_catalog", "point", "base"), -1, 0, False, "point"))
    assert unknown.ddl == "VARCHAR" and unknown.fallback


def test_fold_and_ident(fake):
    assert fold("orders") == "ORDERS"
    assert fold("_pg_slice") == "_PG_SLICE"
    assert fold("a$1") == "A$1"
    for kept in ("Orders", "ORDERS", "a b", 'q"uote', "semi;colon", "ünï", "1abc", "log.public.orders", ""):
        assert fold(kept) == kept
    with _connect() as conn:
        wh = SnowflakeWarehouse(conn, read_only=True)
        assert wh.ident("public", "orders") == '"PUBLIC"."ORDERS"'
        assert wh.ident("Sales Ü", 'x"y;z') == '"Sales Ü"."x""y;z"'
        assert wh.state("log.public.orders") == '"_PG_REPLICATION"."log.public.orders"'


# -- loads on fakesnow (no Postgres) ----------------------------------------------------------


def _load(wh: SnowflakeWarehouse, mapping, text: str):
    return wh.fetchall(f'SELECT {staging.typed(mapping, "v.s")} FROM (SELECT ? AS s) v', [text])[0][0]


@pytest.mark.parametrize(
    ("type_name", "text", "expected"),
    [
        ("float8", "Infinity", float("inf")),
        ("float8", "-Infinity", float("-inf")),
        ("float8", "1.5e+20", 1.5e20),
        ("bool", "t", True),
        ("bool", "f", False),
        ("bytea", "\\xdeadbeef", b"\xde\xad\xbe\xef"),
        ("bytea", "\\x", b""),
        ("date", "2024-02-29", date(2024, 2, 29)),
        ("timestamp", "2024-02-29 23:59:59.999999", datetime(2024, 2, 29, 23, 59, 59, 999999)),
        ("timestamptz", "2024-02-29 23:59:59.999999+00", datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=timezone.utc)),
        ("time", "23:59:59.999999", time(23, 59, 59, 999999)),
        ("int8", "-9223372036854775808", -9223372036854775808),
        ("money", "-92233720368547758.08", Decimal("-92233720368547758.08")),
    ],
)
def test_loads(fake, type_name, text, expected):
    with _connect() as conn:
        assert _load(SnowflakeWarehouse(conn), snowflake_types.TYPE_TABLE[type_name], text) == expected


@pytest.mark.parametrize(
    ("type_name", "text"),
    [
        ("date", "infinity"),
        ("date", "-infinity"),
        ("date", "0044-03-15 BC"),
        ("date", "10000-01-01"),
        ("timestamp", "0044-03-15 12:00:00 BC"),
        ("timestamptz", "infinity"),
        ("time", "24:00:00"),
    ],
)
def test_values_snowflake_cannot_hold_are_refused(fake, type_name, text):
    with _connect() as conn, pytest.raises(SnowflakeWarehouse.errors, match="not representable in Snowflake"):
        _load(SnowflakeWarehouse(conn), snowflake_types.TYPE_TABLE[type_name], text)


def test_nan_in_number_is_refused(fake):
    with _connect() as conn, pytest.raises(SnowflakeWarehouse.errors, match="NaN"):
        _load(SnowflakeWarehouse(conn), snowflake_types.numeric_mapping(_numeric_typmod(6, 2)), "NaN")


# -- the dialect on fakesnow (no Postgres) ----------------------------------------------------


def _bare(name: str, key: tuple[str, ...], columns: tuple[str, ...]) -> Table:
    cols = tuple(Column(c, i + 1, PgType(23, "pg_catalog", "int4", "base"), -1, 0, True, "integer") for i, c in enumerate(columns))
    return Table("public", name, 0, "r", "d", cols, key, True, (), 0, 0)


def test_connection_must_use_qmark(fake):
    conn = snowflake.connector.connect(database="PGR", schema="PUBLIC", paramstyle="pyformat")
    with pytest.raises(ConfigError, match="qmark"):
        SnowflakeWarehouse(conn)


@pytest.mark.parametrize("key", [("a",), ("a", "b")])
def test_delete_keys_in_chunks(fake, key):
    table = _bare("k", key, ("a", "b", "v"))
    with _connect() as conn:
        wh = _Recording(conn)
        wh.ensure_table(table)
        n = 1200
        batch = pa.record_batch({c: pa.array([str(i) for i in range(n)]) for c in ("a", "b", "v")})
        wh.write_slice(table, 0, [batch])
        wh.statements.clear()
        keys = [(i,) * len(key) for i in range(0, n, 1)][:1100]
        with wh.transaction():
            wh.delete_keys(table, keys)
        assert wh.row_count(table) == 100
        assert sum(s.startswith("DELETE") for s in wh.statements) == 3  # 500 + 500 + 100


def test_ddl_inside_the_transaction_is_refused(fake):
    with _connect() as conn:
        wh = SnowflakeWarehouse(conn)
        with pytest.raises(RuntimeError, match="DDL inside a transaction"), wh.transaction():
            wh.stage("pgr_changes_0", pa.table({"_seq": pa.array([0], pa.int64()), "_op": ["T"]}))


def test_a_load_spread_over_several_parquet_files_loads_every_row_once(fake):
    """Files roll over at ``file_bytes`` of Arrow data; one COPY loads this load's files only."""
    batches = [
        pa.record_batch({"ID": pa.array(range(i * 1000, (i + 1) * 1000), pa.int64()), "V": pa.array([f"v{i}"] * 1000)})
        for i in range(5)
    ]
    with _connect() as conn:
        wh = SnowflakeWarehouse(conn)
        relation = wh.stage("pgr_changes_0", pa.Table.from_batches(batches[:1]))  # a stage with one load in it
        statements: list[str] = []

        def execute(query: str) -> list[tuple]:
            statements.append(query)
            return wh.fetchall(query)

        assert snowflake_stage.load_parquet(execute, relation, batches[1:], file_bytes=batches[0].nbytes * 2) == 4000
        rows = wh.fetchall(f"SELECT ID, V FROM {relation} ORDER BY ID")
    assert rows == [(i, f"v{i // 1000}") for i in range(5000)]
    assert [s.split()[0] for s in statements] == ["PUT", "PUT", "COPY"]


# -- with Postgres ----------------------------------------------------------------------------

ORDERS = """
CREATE TABLE orders (
    id int PRIMARY KEY, status text, amount numeric(10,2), score float8, paid bool, placed date,
    at timestamptz, raw bytea, doc jsonb, tags int4[], note text
);
ALTER TABLE orders ALTER COLUMN note SET STORAGE EXTERNAL;  -- TOASTed uncompressed: 'u' in pgoutput
INSERT INTO orders
SELECT i, 'new', i * 1.5, CASE i % 3 WHEN 0 THEN 'Infinity' ELSE i / 4.0 END, i % 2 = 0,
       date '2024-01-01' + i, timestamptz '2024-01-01 00:00:00.123456+05:30' + i * interval '1 hour',
       decode(md5(i::text), 'hex'), jsonb_build_object('i', i, 'ü', ARRAY[i, NULL]), ARRAY[i, NULL, -i],
       CASE WHEN i % 10 = 0 THEN repeat('toast ', 2000) END
FROM generate_series(1, 200) i;
"""


def _change_orders(pg) -> None:
    pg.execute("INSERT INTO orders (id, status, amount, doc) VALUES (1001, 'new', 1, '{\"a\": [1, \"x\"]}'), (1002, '', NULL, 'null')")
    pg.execute("UPDATE orders SET status = 'paid', score = '-Infinity' WHERE id % 10 = 0")  # unchanged TOAST note
    pg.execute("UPDATE orders SET id = id + 5000, amount = amount + 1 WHERE id IN (20, 21)")  # key change, TOAST kept
    pg.execute("DELETE FROM orders WHERE id % 7 = 0")
    pg.execute("UPDATE orders SET note = 'short' WHERE id = 30")


def test_backfill_and_cdc_round_trip(pg, pg_url, fake):
    pg.execute(ORDERS)
    replica = Replica(pg_url, ["orders"])
    replica.backfill()
    replica.assert_equal(pg, "orders")
    _change_orders(pg)
    (result,) = replica.drain_all()
    assert result.tables["public.orders"].mode == "applied"
    assert pg.execute("SELECT count(*) FROM orders WHERE note LIKE 'toast%'").fetchone()[0] > 5
    replica.assert_equal(pg, "orders")

    # Columns added with a value for the rows already there (Postgres's missing value).
    pg.execute("ALTER TABLE orders ADD COLUMN region text DEFAULT 'eu', ADD COLUMN level int DEFAULT 7")
    pg.execute("UPDATE orders SET region = 'us' WHERE id = 1")
    replica.drain_all()
    replica.reload()
    replica.assert_equal(pg, "orders")

    pg.execute("TRUNCATE orders")
    pg.execute("INSERT INTO orders (id, status) VALUES (1, 'after')")
    replica.drain_all()
    replica.assert_equal(pg, "orders")
    assert not any(s.startswith("MERGE") for s in replica.statements)


def test_backfill_loads_typed_parquet(pg, pg_url, fake):
    """The slice is staged as typed Parquet: columns with a native reading land in staging
    columns of the target's type and are inserted as they are; the rest are text."""
    pg.execute(ORDERS)
    replica = Replica(pg_url, ["orders"])
    replica.backfill()
    replica.assert_equal(pg, "orders")
    (stage,) = {s for s in replica.statements if s.startswith('CREATE OR REPLACE TEMPORARY TABLE "PGR_SLICE"')}
    for column, ddl in {
        "C0": "NUMBER(10,0)",  # id int
        "C1": "VARCHAR",  # status text
        "C2": "NUMBER(10,2)",  # amount numeric(10,2); C3 its text companion (NaN)
        "C4": "FLOAT",  # score float8
        "C5": "BOOLEAN",
        "C6": "DATE",
        "C8": "VARCHAR",  # at timestamptz: its text ending +00:00, as CDC stages it
        "C9": "BINARY",
        "C10": "VARCHAR",  # doc jsonb: its text, PARSE_JSON in the INSERT
    }.items():
        assert f'"{column}" {ddl}' in stage, (column, stage)
    copies = [s for s in replica.statements if s.startswith('COPY INTO "PGR_SLICE"')]
    assert len(copies) == 2 and all("TYPE = PARQUET" in c and "MATCH_BY_COLUMN_NAME = CASE_SENSITIVE" in c for c in copies)
    (insert, *_) = [s for s in replica.statements if s.startswith('INSERT INTO "PUBLIC"."ORDERS"')]
    assert 'SELECT "ID", "STATUS", COALESCE("AMOUNT", CAST(' in insert and '"SCORE", "PAID", COALESCE("PLACED"' in insert
    assert 'PARSE_JSON("DOC")' in insert


EDGES = """
CREATE TABLE edges (id int PRIMARY KEY, d date, ts timestamp, tz timestamptz, t time, n numeric(38,10), o oid, b bytea);  -- money: in the corpus
INSERT INTO edges VALUES
  (1, '0001-01-01', '0001-01-01 00:00:00', '0001-01-01 00:00:00+00', '00:00:00',
   '-9999999999999999999999999999.9999999999', 0, '\\x'),
  (2, '9999-12-31', '9999-12-31 23:59:59.999999', '9999-12-31 23:59:59.999999+00', '23:59:59.999999',
   '0.0000000001', 4294967295, '\\x00ff'),
  (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
"""


def test_typed_backfill_keeps_the_edges_of_snowflake_ranges(pg, pg_url, fake):
    pg.execute(EDGES)
    replica = Replica(pg_url, ["edges"], slot="pgr_sf_edges")
    replica.backfill()
    replica.assert_equal(pg, "edges")


@pytest.mark.parametrize(
    ("pg_type", "literal", "message"),
    [
        ("date", "'infinity'", "not representable in Snowflake: infinity"),
        ("date", "'0044-03-15 BC'", "not representable in Snowflake: 0044-03-15 BC"),
        ("date", "'10000-01-01'", "not representable in Snowflake: 10000-01-01"),
        ("timestamp", "'0044-03-15 12:00:00 BC'", "not representable in Snowflake: 0044-03-15 12:00:00 BC"),
        ("timestamptz", "'-infinity'", "not representable in Snowflake: -infinity"),
        ("time", "'24:00:00'", "not representable in Snowflake: 24:00:00"),
        ("numeric(6,2)", "'NaN'", "NaN"),
    ],
)
def test_typed_backfill_refuses_what_snowflake_cannot_hold(pg, pg_url, fake, pg_type, literal, message):
    """Values outside Snowflake's ranges leave the typed path as text and are refused naming
    the value; nothing of the slice is committed."""
    pg.execute(f"CREATE TABLE far (id int PRIMARY KEY, v {pg_type})")
    pg.execute("INSERT INTO far SELECT i, NULL FROM generate_series(1, 20) i")
    pg.execute(f"INSERT INTO far VALUES (21, {literal})")
    replica = Replica(pg_url, ["far"], slot="pgr_sf_far")
    with pytest.raises(WarehouseError, match=message):
        replica.backfill(slices=[0, 1])
    assert replica.rows("far") == []


ODD = """
CREATE SCHEMA "Sales Ü";
CREATE TABLE "Sales Ü"."Order ""Lines""; x" ("Id" int PRIMARY KEY, qty int, "a b" text, "ü;" text, "MixedCase" text);
INSERT INTO "Sales Ü"."Order ""Lines""; x" SELECT i, i, 'v' || i, 'ü' || i, 'M' || i FROM generate_series(1, 50) i;
"""


def test_odd_identifiers_round_trip(pg, pg_url, fake):
    pg.execute(ODD)
    replica = Replica(pg_url, ['"Sales Ü"."Order ""Lines""; x"'])
    replica.backfill()
    pg.execute("""UPDATE "Sales Ü"."Order ""Lines""; x" SET "a b" = 'changed', qty = -1 WHERE "Id" <= 5""")
    pg.execute("""DELETE FROM "Sales Ü"."Order ""Lines""; x" WHERE "Id" > 45""")
    replica.drain_all()
    replica.assert_equal(pg, 'Order "Lines"; x')
    with replica.open(read_only=True) as wh:
        assert wh.physical_columns("Sales Ü", 'Order "Lines"; x') == ["Id", "QTY", "a b", "ü;", "MixedCase", "_PG_SLICE"]
        assert wh.table_name(replica.tables[0]) == '"Sales Ü"."Order ""Lines""; x"'
        tables = wh.fetchall("SELECT table_schema, table_name FROM information_schema.tables WHERE table_schema IN (?, ?)", ["Sales Ü", "_PG_REPLICATION"])
    assert ("Sales Ü", 'Order "Lines"; x') in tables
    assert ("_PG_REPLICATION", "TABLES") in tables  # plain names: queried unquoted in Snowflake


def test_merge_path_gives_the_same_tables(pg, pg_url, fake):
    """The same history into two databases: MERGE (run outside transactions, see
    _MergeOutsideTransactions) and the DELETE + INSERT path. Covers the change-log replay too:
    changes made while the backfill is half done reach the table through apply_changes."""
    pg.execute(ORDERS)
    merge = Replica(pg_url, ["orders"], database="PGR_MERGE", merge=True, slot="pgr_sf_merge")
    dml = Replica(pg_url, ["orders"], database="PGR_DML", merge=False, slot="pgr_sf_dml")
    replicas = (merge, dml)
    for r in replicas:
        r.backfill(slices=[0])
    _change_orders(pg)
    for r in replicas:
        (result,) = r.drain_all()
        assert result.tables["public.orders"].mode == "logged"
        r.backfill(slices=[1])  # completes the backfill: replays the log
        r.assert_equal(pg, "orders")
    pg.execute("UPDATE orders SET status = 'again', amount = NULL WHERE id % 10 = 0")  # TOAST kept again
    pg.execute("DELETE FROM orders WHERE id < 5")
    pg.execute("INSERT INTO orders (id, status) VALUES (1, 'back')")
    for r in replicas:
        r.drain_all()
        r.assert_equal(pg, "orders")
    pg.execute("TRUNCATE orders")
    pg.execute("INSERT INTO orders (id, status) VALUES (7, 'after')")
    for r in replicas:
        r.drain_all()
        r.assert_equal(pg, "orders")
    assert merge.rows("orders") == dml.rows("orders")
    assert sum(s.startswith("MERGE INTO") for s in merge.statements) >= 3  # replay, update round, truncate round
    assert not any("PGR_RESOLVED" in s for s in merge.statements)  # no scratch table on the MERGE path
    assert not any(s.startswith("MERGE") for s in dml.statements)


def test_a_value_snowflake_refuses_fails_only_its_table(pg, pg_url, fake):
    pg.execute("CREATE TABLE good (id int PRIMARY KEY, v text)")
    pg.execute("CREATE TABLE bad (id int PRIMARY KEY, amount numeric(6,2), day date)")
    pg.execute("INSERT INTO good VALUES (1, 'a')")
    pg.execute("INSERT INTO bad VALUES (1, 1.5, '2024-01-01')")
    replica = Replica(pg_url, ["good", "bad"])
    replica.backfill()
    pg.execute("INSERT INTO good VALUES (2, 'b')")
    pg.execute("INSERT INTO bad VALUES (2, 'NaN', '2024-01-02')")
    (result,) = replica.drain_all()
    assert result.tables["public.good"].mode == "applied"
    assert result.tables["public.bad"].mode == "failed"
    assert "NaN" in result.tables["public.bad"].error
    replica.assert_equal(pg, "good")
    with replica.open(read_only=True) as wh:
        status, error = wh.statuses()["public.bad"]
    assert status == "failed" and "NaN" in error

    # The backfill of a value Snowflake cannot hold: refused, with the value, nothing committed.
    pg.execute("CREATE TABLE dates (id int PRIMARY KEY, day date)")
    pg.execute("INSERT INTO dates SELECT i, date '2024-01-01' + i FROM generate_series(1, 10) i")
    pg.execute("INSERT INTO dates VALUES (11, 'infinity')")
    dates = Replica(pg_url, ["dates"], slot="pgr_sf_dates")
    with pytest.raises(WarehouseError, match="not representable in Snowflake: infinity"):
        dates.backfill()
    assert dates.rows("dates") == []
