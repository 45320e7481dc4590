"""Reading a query as typed Arrow through binary COPY, parsed in C++ by the ADBC Postgres driver.

The driver runs ``COPY (query) TO STDOUT (FORMAT binary)`` and decodes each value's binary form
into its Arrow type, with no per-row Python. Only columns whose binary decoding is exact are read
typed (``TypeMapping.native``, or a numeric/boolean ``TypeMapping.arrow``); every other column is
read as its output function's text, exactly what ``COPY … (FORMAT csv)`` printed before, and the
warehouse converts it as it always did.

Two binary decodings are exact only within a range, so those columns carry a guard
(``TypeMapping.native_guard``, Postgres SQL): the driver wraps ±infinity and timestamps past
294247 AD into wrong Arrow values. Where the guard fails the typed column is NULL and a companion
text column (``text_column(i)``) holds the value's text, which the warehouse loads (or refuses)
the text way.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
import pyarrow as pa
from psycopg import sql

from pg_replication.errors import SourceUnavailableError, redact
from pg_replication.source.connection import APPLICATION_NAME, describe_target
from pg_replication.types import SESSION_OPTIONS, TypeMapping


def text_column(position: int) -> str:
    """The staged name of the text companion of the column at ``position`` (see module doc)."""
    return f"_pgr text {position}"


@dataclass(frozen=True)
class ReadColumn:
    """How one source column is selected and staged by the binary reader."""

    name: str
    mapping: TypeMapping
    position: int

    @property
    def typed(self) -> pa.DataType | None:
        """The Arrow type read from the binary value, None for the text path."""
        if self.mapping.native is not None:
            return self.mapping.native
        if self.mapping.arrow != pa.string():
            return self.mapping.arrow
        return None

    def select(self) -> list[sql.Composable]:
        expr = self.mapping.select_sql(self.name)
        if self.typed is None:
            return [_as_text(self.mapping, expr)]
        native_select = self.mapping.native_select
        if self.mapping.native is not None and self.mapping.native_type is not None:
            read = expr if native_select is None else sql.SQL(native_select).format(sql.Identifier(self.name))  # type: ignore[arg-type]
            expr = sql.SQL("({})::{}").format(read, sql.SQL(self.mapping.native_type))  # type: ignore[arg-type]
        # The text companion prints the value read, or the text path's expression where the native
        # read is another (an array read as a list, printed by to_json).
        text = expr if native_select is None else self.mapping.select_sql(self.name)
        guard = self.mapping.native_guard
        if guard is None:
            return [expr]
        ok = sql.SQL(guard).format(sql.Identifier(self.name))  # type: ignore[arg-type]
        return [
            sql.SQL("CASE WHEN {} THEN {} END").format(ok, expr),
            sql.SQL("CASE WHEN NOT ({}) THEN {} END").format(ok, _as_text(self.mapping, text)),
        ]

    def fields(self) -> list[pa.Field]:
        if self.typed is None:
            return [pa.field(self.name, pa.string())]
        out = [pa.field(self.name, self.typed)]
        if self.mapping.native_guard is not None:
            out.append(pa.field(text_column(self.position), pa.string()))
        return out


def _as_text(mapping: TypeMapping, expr: sql.Composable) -> sql.Composable:
    """The value's text as its output function prints it (as COPY's text formats do). A bare
    column goes through format(): some casts to text differ from the output function (inet adds
    /32, char(n) drops its padding, bool prints 'true')."""
    if mapping.select != "{0}" or mapping.text_cast:
        return sql.SQL("({})::text").format(expr)  # expressions made for the text path (to_json, …)
    # num_nulls, not IS NULL: a composite whose fields are all NULL is IS NULL, yet a value '(,,)'.
    return sql.SQL("CASE WHEN num_nulls({0}) = 0 THEN format('%s', {0}) END").format(expr)


def read_columns(columns: list[tuple[str, TypeMapping]]) -> list[ReadColumn]:
    return [ReadColumn(name, mapping, i) for i, (name, mapping) in enumerate(columns)]


def select_list(columns: list[ReadColumn]) -> sql.Composable:
    return sql.SQL(", ").join(part for c in columns for part in c.select())


def staged_schema(columns: list[ReadColumn]) -> pa.Schema:
    return pa.schema([f for c in columns for f in c.fields()])


def connect_adbc(conninfo: str):
    """An autocommit ADBC connection with the session settings the text path relies on."""
    import adbc_driver_postgresql.dbapi as adbc

    try:
        dsn = psycopg.conninfo.make_conninfo(
            conninfo, options=SESSION_OPTIONS, application_name=APPLICATION_NAME, connect_timeout=10
        )
        return adbc.connect(dsn, autocommit=True)
    except Exception as exc:  # the driver raises its own DB-API errors
        raise SourceUnavailableError(
            f"cannot connect to Postgres at {describe_target(conninfo)}: {redact(str(exc).strip().splitlines()[0])}",
            setting="POSTGRES_URL",
        ) from None


# Idle reader connections, by conninfo: opening one costs 0.1–0.2 s (the driver loads the type
# catalog), which a backfill of many small slices would pay twice per slice.
_IDLE_LIMIT = 4
_idle: dict[str, list] = {}
_idle_lock = threading.Lock()


@atexit.register
def _close_idle() -> None:
    """Closed before the interpreter tears down the driver (its finalizers fail after that)."""
    with _idle_lock:
        conns = [c for idle in _idle.values() for c in idle]
        _idle.clear()
    for conn in conns:
        try:
            conn.close()
        except Exception:
            pass


@contextmanager
def reader_connection(conninfo: str) -> Iterator:
    """A connection for one slice reader, outside any transaction; kept for the next reader when
    it is given back clean (an error or a cancelled read closes it)."""
    key = f"{os.getpid()} {conninfo}"  # a forked process opens its own
    with _idle_lock:
        conn = _idle.get(key, []).pop() if _idle.get(key) else None
    if conn is not None:
        try:
            execute(conn, "ROLLBACK")  # still alive (the server may have restarted meanwhile)
        except Exception:
            conn.close()
            conn = None
    if conn is None:
        conn = connect_adbc(conninfo)
    try:
        yield conn
    except BaseException:
        conn.close()
        raise
    try:
        execute(conn, "ROLLBACK")
    except Exception:
        conn.close()
        return
    with _idle_lock:
        idle = _idle.setdefault(key, [])
        if len(idle) < _IDLE_LIMIT:
            idle.append(conn)
            return
    conn.close()


def execute(conn, statement: sql.Composable | str) -> None:
    """Run a statement with no result on an ADBC connection."""
    text = statement if isinstance(statement, str) else statement.as_string()
    with conn.cursor() as cur:
        cur.execute(text)


def fetch_value(conn, query: sql.Composable | str):
    text = query if isinstance(query, str) else query.as_string()
    with conn.cursor() as cur:
        cur.execute(text)
        row = cur.fetchone()
    return row[0] if row else None


def read_batches(conn, query: sql.Composable, schema: pa.Schema, stop) -> Iterator[pa.RecordBatch]:
    """Stream ``query``'s rows as batches of ``schema`` (the driver's types, cast where they
    differ: e.g. its opaque extension types to their storage). ``stop()`` true ends the stream
    early (the statement is cancelled)."""
    cur = conn.cursor()
    try:
        cur.execute(query.as_string())
        reader = cur.fetch_record_batch()
        for batch in reader:
            if stop():
                cur.adbc_cancel()
                return
            if batch.num_rows:
                yield _conform(batch, schema)
    finally:
        cur.close()


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    if batch.schema.equals(schema, check_metadata=False):
        return batch
    arrays = []
    for array, field in zip(batch.columns, schema):
        if array.type != field.type:
            storage = array.storage if isinstance(array.type, pa.ExtensionType) else array
            if isinstance(field.type, pa.ExtensionType):
                array = pa.ExtensionArray.from_storage(field.type, storage.cast(field.type.storage_type))
            else:
                array = storage.cast(field.type)
        arrays.append(array)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
