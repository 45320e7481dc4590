"""Postgres as a warehouse: a reporting replica in another database, or in prefixed schemas.

Types are kept 1:1 (``numeric(12,2)`` stays ``numeric(12,2)``, arrays stay arrays); enums become
``text`` and domains their base type, because the replica cannot assume the source's type
definitions. Values travel as Postgres's own text output and are parsed by the same input
functions on the other side, so nothing is approximated. A slice's first copy arrives by one
binary COPY into the table itself; a slice whose keys are there already (a re-run, rows moved
between slices) by COPY into a staging table and an upsert; change batches are applied with one
MERGE per segment. Tables carry their primary key from the start: the replica is meant to be
queried, and MERGE and the eviction of moved rows look rows up by key.

A segment is applied with index lookups only (``_plans_by_key``): its cost follows the number of
changes, never the size of the table. Left to itself, the planner (no statistics on a fresh
staging table) hashes the whole replica table for every segment and spills the hash to disk.
"""

from __future__ import annotations

import io
import select
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
from psycopg import sql

from pg_replication.errors import ConfigError
from pg_replication.source.catalog import Column, PgType, Table
from pg_replication.source.merged_copy import HEADER, TRAILER, MergedTuples
from pg_replication.source.recovery import RowReader
from pg_replication.source.snapshot import SliceReader
from pg_replication.types import SESSION_OPTIONS, TypeMapping, numeric_typmod
from pg_replication.warehouse import staging
from pg_replication.warehouse.base import SLICE_COLUMN, Written
from pg_replication.warehouse.document_sql import POSTGRES_JSON
from pg_replication.warehouse.engine import SqlWarehouse
from pg_replication.warehouse.staging import StagedChanges

_NATIVE_ARROW = {"int2": pa.int16(), "int4": pa.int32(), "int8": pa.int64(), "float4": pa.float32(), "float8": pa.float64(), "bool": pa.bool_()}
_PRECISION_TYPES = {"time", "timetz", "timestamp", "timestamptz"}
_LENGTH_TYPES = {"varchar", "bpchar"}
_BIT_TYPES = {"bit", "varbit"}
# Planner settings while a segment is applied: nested loops over the key index, no JIT (compiling
# the plan costs more than these statements run).
_BY_KEY = {"enable_hashjoin": "off", "enable_mergejoin": "off", "jit": "off"}


def _type_sql(t: PgType, typmod: int) -> str | None:
    """DDL for a pg_catalog type with its modifier, or None for a type the replica may lack."""
    if t.schema != "pg_catalog" or t.kind not in ("base", "range", "multirange"):
        return None
    name = sql.Identifier("pg_catalog", t.name).as_string()
    declared = numeric_typmod(typmod) if t.name == "numeric" else None
    if declared is not None:
        return f"{name}({declared[0]},{declared[1]})"
    if t.name in _LENGTH_TYPES and typmod >= 4:
        return f"{name}({typmod - 4})"
    if t.name in _PRECISION_TYPES | _BIT_TYPES and typmod >= 0:
        return f"{name}({typmod})"
    return name


def map_column(column: Column) -> TypeMapping:
    """Postgres -> Postgres: the same type (domains resolved, enums and unknown types as text)."""
    t, typmod = column.type.resolved(column.typmod)
    dims = ""
    if t.kind == "array" and t.element is not None:
        t, typmod = t.element.resolved(typmod)
        dims = "[]"
    ddl = _type_sql(t, typmod)
    fallback = ddl is None and t.kind not in ("enum", "composite")
    ddl = (ddl or "text") + dims
    arrow = _NATIVE_ARROW.get(t.name, pa.string()) if not dims and t.schema == "pg_catalog" else pa.string()
    return TypeMapping(arrow, ddl, load=f"CAST({{0}} AS {ddl})", fallback=fallback)


def _replica_select(name: str, mapping: TypeMapping) -> sql.Composable:
    """A source column as the replica column's type (a no-op where they are the same type; an
    enum, a composite or an unknown type as its text), for the binary copy."""
    return sql.SQL("{}::{}").format(sql.Identifier(name), sql.SQL(mapping.ddl))  # type: ignore[arg-type]


class _RefusedMidway(Exception):
    """The replica answered during a COPY into it: with an error (libpq reads it only at the end)."""


def _answered(conn: psycopg.Connection) -> bool:
    """Whether the server has sent something during a COPY FROM STDIN: an error, in practice (any
    other message would only send the slice the slower way). The copy stops there instead of
    streaming the rest of the slice for nothing."""
    poller = select.poll()  # not select(): a process with many files has descriptors past its 1024
    poller.register(conn.pgconn.socket, select.POLLIN)
    return bool(poller.poll(0))


def _qmarks_to_pyformat(query: str) -> str:
    """The engine marks parameters with ``?``; psycopg wants ``%s`` (and ``%%`` for ``%``).
    Quoted identifiers and string literals are left as they are."""
    out, quote = [], None
    for ch in query:
        if quote:
            quote = None if ch == quote else quote  # a doubled quote closes and reopens: same result
            out.append("%%" if ch == "%" else ch)
        elif ch in "\"'":
            quote = ch
            out.append(ch)
        else:
            out.append("%s" if ch == "?" else "%%" if ch == "%" else ch)
    return "".join(out)


class PostgresWarehouse(SqlWarehouse):
    """A Postgres database as a replication target.

    Example::

        with psycopg.connect(url, autocommit=True) as conn:
            wh = PostgresWarehouse(conn, schema_prefix="replica_")
    """

    name = "postgres"
    errors = (psycopg.Error,)
    json_functions = POSTGRES_JSON
    document_join_indexes = True
    counts_rows_cheaply = False  # count(*) scans the table
    slice_eviction = "upsert"  # the key is declared from the start
    text_type = "text"
    # read back typed (reads.py); every other type as its text (infinite dates, unconstrained numeric)
    arrow_types = {
        "boolean": pa.bool_(), "smallint": pa.int16(), "integer": pa.int32(), "bigint": pa.int64(), "real": pa.float32(),
        "double precision": pa.float64(), "text": pa.string(), "character varying": pa.string(), "bytea": pa.binary(),
    }

    def __init__(self, conn: psycopg.Connection, *, schema_prefix: str = "", read_only: bool = False) -> None:
        if not conn.autocommit:
            raise ConfigError("PostgresWarehouse needs an autocommit connection (it runs its own transactions)")
        self.conn, self.schema_prefix = conn, schema_prefix
        for setting in SESSION_OPTIONS.split("-c ")[1:]:  # parse values the way the source prints them
            name, value = setting.strip().split("=", 1)
            conn.execute(sql.SQL("SELECT set_config({}, {}, false)").format(sql.Literal(name), sql.Literal(value)))
        super().__init__(read_only=read_only)

    def execute(self, query: str, params: Sequence = ()) -> None:
        self.conn.execute(_qmarks_to_pyformat(query) if params else query, list(params) or None)

    def fetchall(self, query: str, params: Sequence = ()) -> list[tuple]:
        return self.conn.execute(_qmarks_to_pyformat(query) if params else query, list(params) or None).fetchall()

    def stream_rows(self, query: str, batch_rows: int) -> Iterator[Sequence[tuple]]:
        """A server-side cursor: the server keeps the result, the client holds one batch."""
        with self.conn.transaction(), self.conn.cursor(name="pgr_read") as cursor:
            cursor.execute(query)
            while rows := cursor.fetchmany(batch_rows):
                yield rows

    def begin(self) -> None:
        self.conn.execute("BEGIN")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        self.conn.execute("ROLLBACK")  # outside a transaction Postgres only warns

    def map_column(self, column: Column) -> TypeMapping:
        return map_column(column)

    def create_table(self, table: Table, columns: list[tuple[str, TypeMapping]]) -> None:
        cols = ", ".join(f"{self.ident(name)} {m.ddl}" for name, m in columns)
        keys = ", ".join(self.ident(k) for k in table.primary_key)
        self.execute(f"CREATE SCHEMA IF NOT EXISTS {self.ident(self.schema_of(table))}")
        self.execute(
            f"CREATE TABLE IF NOT EXISTS {self.table_name(table)} ({cols}, {self.ident(SLICE_COLUMN)} integer, "
            f"PRIMARY KEY ({keys}))"
        )

    def stage(self, name: str, data: pa.Table) -> str:
        types = {pa.int64(): "bigint", pa.int32(): "integer", pa.int16(): "smallint", pa.float64(): "float8", pa.float32(): "float4", pa.bool_(): "boolean"}
        cols = ", ".join(f"{self.ident(f.name)} {types.get(f.type, 'text')}" for f in data.schema)
        self.execute(f"DROP TABLE IF EXISTS pg_temp.{self.ident(name)}")
        self.execute(f"CREATE TEMP TABLE {self.ident(name)} ({cols})")
        self._copy_in(name, data)
        return f"pg_temp.{self.ident(name)}"

    def _copy_in(self, name: str, data: pa.Table | pa.RecordBatch) -> None:
        # CSV, as pyarrow writes it, is what COPY reads: NULL is empty, '' is "", NaN is nan.
        buffer = io.BytesIO()
        pacsv.write_csv(data, buffer, pacsv.WriteOptions(include_header=False))
        query = sql.SQL("COPY pg_temp.{} FROM STDIN (FORMAT csv)").format(sql.Identifier(name))
        with self.conn.cursor().copy(query) as copy:
            copy.write(buffer.getbuffer())

    def unstage(self, name: str) -> None:
        self.execute(f"DROP TABLE IF EXISTS pg_temp.{self.ident(name)}")

    def slice_relations(
        self, table: Table, batches: Iterable[pa.RecordBatch], slice_value: int | None = None
    ) -> Iterator[tuple[str | None, pa.RecordBatch | Written | None]]:
        if isinstance(batches, SliceReader) and self._binary_compatible(batches.coordinator, table):
            if slice_value is not None:
                written = self._copy_into_table(table, batches, slice_value)
                if written is not None:
                    yield None, written
                    return
            yield from self._binary_slice_relations(table, batches)
            return
        relation = None
        try:
            for batch in batches:
                if relation is None:  # inside the slice's transaction: Postgres DDL is transactional
                    relation = self.stage("pgr_slice", pa.Table.from_batches([batch]))
                else:
                    self.execute(f"TRUNCATE {relation}")
                    self._copy_in("pgr_slice", batch)
                yield relation, batch
        finally:
            if relation is not None and not self.conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
                self.unstage("pgr_slice")

    def _binary_compatible(self, source: psycopg.Connection, table: Table) -> bool:
        """Whether every column can travel in Postgres's binary format: the source selects each
        value as the replica column's own type (``_replica_select``), so each type (and an
        array's element type) needs binary send and receive functions."""
        ddls = [m.ddl for _, m in self.column_mappings(table)]
        row = source.execute(
            "SELECT count(t.oid) = cardinality(%(d)s::text[]) AND coalesce(bool_and(t.typsend::oid <> 0 "
            "AND t.typreceive::oid <> 0 AND coalesce(e.typsend::oid <> 0 AND e.typreceive::oid <> 0, true)), false) "
            "FROM unnest(%(d)s::text[]) AS d(name) JOIN pg_type t ON t.oid = to_regtype(d.name) "
            "LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typlen = -1",
            {"d": ddls},
        ).fetchone()
        return bool(row and row[0])

    def _copy_into_table(self, table: Table, reader: SliceReader, slice_value: int) -> Written | None:
        """The slice written straight into the replica table by one binary COPY (inside the
        slice's transaction), its rows read by the reader's sessions of the snapshot at once.
        None, with nothing written, where a key was already there (a row an update moved from
        another slice's pages; a re-run slice's first rows) or another run's slice deadlocked
        with it: those slices take the staging table and the upsert."""
        names = [*(name for name, _ in self.column_mappings(table)), SLICE_COLUMN]
        copy_in = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(
            sql.SQL(self.table_name(table)), sql.SQL(", ").join(map(sql.Identifier, names))
        )
        slice_number = sql.SQL("{}::integer").format(sql.Literal(slice_value))
        tuples = MergedTuples(reader, _replica_select, slice_number, sessions=len(reader.threads))
        nbytes = 0
        self.execute("SAVEPOINT pgr_direct_copy")
        try:
            with self.conn.cursor() as cursor:
                with cursor.copy(copy_in) as copy:
                    copy.write(HEADER)
                    for block in tuples:
                        if _answered(self.conn):
                            raise _RefusedMidway()
                        copy.write(block)
                        nbytes += len(block)
                    copy.write(TRAILER)
        except (psycopg.errors.UniqueViolation, psycopg.errors.DeadlockDetected, _RefusedMidway):
            # Another cause of a refusal meets the staging path again, which reports it.
            self.execute("ROLLBACK TO SAVEPOINT pgr_direct_copy")
            return None
        finally:
            tuples.close()
        self.execute("RELEASE SAVEPOINT pgr_direct_copy")
        return Written(tuples.rows, nbytes)

    def _binary_slice_relations(self, table: Table, reader: SliceReader) -> Iterator[tuple[str, None]]:
        """The slice moved binary to binary: each piece's ``COPY … TO STDOUT (FORMAT binary)``
        from the source is written as it arrives into ``COPY … FROM STDIN (FORMAT binary)`` of a
        staging table typed like the replica table (inside the slice's transaction)."""
        mappings = self.column_mappings(table)
        cols = ", ".join(f"{self.ident(name)} {m.ddl}" for name, m in mappings)
        self.execute("DROP TABLE IF EXISTS pg_temp.pgr_slice")
        self.execute(f"CREATE TEMP TABLE pgr_slice ({cols})")
        copy_in = sql.SQL("COPY pg_temp.pgr_slice FROM STDIN (FORMAT binary)")
        try:
            for chunks in reader.binary_copies(_replica_select):
                self.execute("TRUNCATE pg_temp.pgr_slice")
                with self.conn.cursor().copy(copy_in) as copy:
                    for chunk in chunks:
                        copy.write(chunk)
                yield "pg_temp.pgr_slice", None
        finally:
            if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.INERROR:
                self.unstage("pgr_slice")

    def apply_segment(
        self, table: Table, changes: StagedChanges, mappings: dict[str, TypeMapping], read_rows: RowReader | None
    ) -> None:
        with self._plans_by_key():
            super().apply_segment(table, changes, mappings, read_rows)

    @contextmanager
    def _plans_by_key(self) -> Iterator[None]:
        """Inside the caller's transaction: join staged rows to the table through its key index
        (see the module docstring); the previous settings come back afterwards."""
        names = [sql.Literal(name) for name in _BY_KEY]
        previous = self.conn.execute(
            sql.SQL("SELECT {}").format(sql.SQL(", ").join(sql.SQL("current_setting({})").format(n) for n in names))
        ).fetchone()
        self._set_local(_BY_KEY)
        yield  # after an error the caller rolls back, and with it these settings
        self._set_local(dict(zip(_BY_KEY, previous)))

    def _set_local(self, settings: dict[str, str]) -> None:
        calls = [sql.SQL("set_config({}, {}, true)").format(sql.Literal(k), sql.Literal(v)) for k, v in settings.items()]
        self.conn.execute(sql.SQL("SELECT {}").format(sql.SQL(", ").join(calls)))

    def apply_changes(self, table: Table, changes: StagedChanges, mappings: dict[str, TypeMapping]) -> None:
        target = self.table_name(table)
        if changes.truncated:
            self.execute(f"DELETE FROM {target}")
        columns = list(self.stored_columns(f"{table.schema}.{table.name}"))
        resolved = staging.resolved_select(changes, target, columns, mappings, table.primary_key, self.ident)
        on = " AND ".join(f"w.{self.ident(k)} = r.{self.ident(k)}" for k in table.primary_key)
        sets = ", ".join(f"{self.ident(c)} = r.{self.ident(c)}" for c in columns if c not in table.primary_key)
        names = ", ".join(self.ident(c) for c in columns)
        values = ", ".join(f"r.{self.ident(c)}" for c in columns)
        slice_column = self.ident(SLICE_COLUMN)
        self.execute(
            f"""MERGE INTO {target} w USING ({resolved}) r ON {on}
                WHEN MATCHED AND r.{self.ident(staging.OP)} = 'D' THEN DELETE
                WHEN MATCHED THEN UPDATE SET {sets + ', ' if sets else ''}{slice_column} = NULL
                WHEN NOT MATCHED AND r.{self.ident(staging.OP)} = 'U' THEN INSERT ({names}, {slice_column}) VALUES ({values}, NULL)"""
        )
