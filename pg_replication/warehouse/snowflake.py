"""Snowflake as a warehouse: tables mirror the source schema-for-schema, state in ``_PG_REPLICATION``.

Snowflake commits implicitly before and after every DDL statement, so everything that creates
something happens before the engine's ``BEGIN``: the staging tables (temporary, loaded in bulk
from typed Parquet files PUT to a temporary stage and one COPY, see ``snowflake_stage.py``), and,
for the MERGE-less path, the per-table scratch table that resolved changes pass through. The
transaction then holds DML only. Temporary objects live in the state schema: the session is
pinned to it (``USE SCHEMA``), because ``CREATE SCHEMA`` switches the session's schema and
unqualified temporary tables (and the stage) must be found where they were made.

Names: a plain lower-case Postgres name (``orders``) is stored upper-case, the way Snowflake stores
it unquoted, so ``SELECT * FROM public.orders`` works; any other name is kept exactly (always
quoted). See ``snowflake_types.py`` for the values Snowflake refuses.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import duckdb
import pyarrow as pa
import snowflake.connector
from snowflake.connector import SnowflakeConnection

from pg_replication.errors import ConfigError
from pg_replication.source.catalog import Column, Table
from pg_replication.types import TypeMapping
from pg_replication.warehouse import snowflake_stage, snowflake_types, staging
from pg_replication.warehouse.base import SLICE_COLUMN, STATE_SCHEMA, quote
from pg_replication.warehouse.document_sql import SNOWFLAKE_JSON
from pg_replication.warehouse.engine import SqlWarehouse, table_key
from pg_replication.warehouse.snowflake_types import PLAIN_NAME, fold
from pg_replication.warehouse.staging import StagedChanges

__all__ = ["SnowflakeWarehouse", "fold"]

_SCRATCH_OP = "_pgr scratch op"  # the scratch table's op column, beside the target's columns
_SLICE_STAGE = "pgr_slice"
_DELETE_CHUNK = 500


class SnowflakeWarehouse(SqlWarehouse):
    """A Snowflake database as a replication target. One instance wraps one open connection,
    opened with ``paramstyle="qmark"`` (the engine marks parameters with ``?``).

    ``merge``: apply each change segment with one MERGE (the default). ``merge=False`` resolves
    it into a scratch table, then DELETE + INSERT: the same result, for emulators (fakesnow) that
    cannot run MERGE inside a transaction. The session's current schema becomes ``_PG_REPLICATION`` (see the module docstring).

    Example::

        conn = snowflake.connector.connect(..., database="ANALYTICS", paramstyle="qmark")
        wh = SnowflakeWarehouse(conn)
        wh.ensure_table(table)
    """

    name = "snowflake"
    json_functions = SNOWFLAKE_JSON  # a document is a VARIANT
    errors = (snowflake.connector.errors.Error, duckdb.Error)  # fakesnow leaks raw DuckDB errors
    text_type = "VARCHAR"
    slice_eviction = "before"  # the key is declared, and fakesnow enforces it; one relation per slice
    # read back typed (reads.py); NUMBER (any precision) and the rest as their text
    arrow_types = {"boolean": pa.bool_(), "float": pa.float64(), "text": pa.string(), "binary": pa.binary()}

    def __init__(self, conn: SnowflakeConnection, *, read_only: bool = False, merge: bool = True) -> None:
        if getattr(conn, "_paramstyle", None) != "qmark":
            raise ConfigError(
                "SnowflakeWarehouse needs a connection opened with paramstyle='qmark'",
                hint="pass paramstyle='qmark' to snowflake.connector.connect (or SnowflakeResource)",
            )
        self.conn, self.merge = conn, merge
        self.cursor = conn.cursor()
        self._in_transaction = False
        self._stage_made = False
        self._scratch: dict[str, str] = {}  # table key -> its scratch table (merge=False)
        super().__init__(read_only=read_only)

    # -- connection -------------------------------------------------------------------------

    def execute(self, query: str, params: Sequence = ()) -> None:
        self.cursor.execute(query, list(params) or None)

    def fetchall(self, query: str, params: Sequence = ()) -> list[tuple]:
        self.cursor.execute(query, list(params) or None)
        return list(self.cursor.fetchall())

    def stream_rows(self, query: str, batch_rows: int) -> Iterator[Sequence[tuple]]:
        """The connector fetches the result's chunks as they are read; a cursor of its own, since
        the warehouse's cursor may run statements meanwhile."""
        cursor = self.conn.cursor()
        try:
            cursor.execute(query)
            while rows := cursor.fetchmany(batch_rows):
                yield rows
        finally:
            cursor.close()

    def begin(self) -> None:
        self.execute("BEGIN")
        self._in_transaction = True

    def commit(self) -> None:
        self._in_transaction = False
        self.execute("COMMIT")

    def rollback(self) -> None:
        self._in_transaction = False
        try:
            self.execute("ROLLBACK")  # a no-op when nothing is open
        except self.errors:  # a dead connection: the error that brought us here matters more
            pass

    def _ddl(self, query: str) -> None:
        """DDL commits implicitly in Snowflake: inside the engine's transaction it would commit
        half a write. Refuse it there instead."""
        if self._in_transaction:
            raise RuntimeError(f"DDL inside a transaction would commit it: {query[:80]}")
        self.execute(query)

    # -- names ------------------------------------------------------------------------------

    def fold(self, name: str) -> str:
        return fold(name)

    def ident(self, *names: str) -> str:
        return quote(*(fold(n) for n in names))

    def map_column(self, column: Column) -> TypeMapping:
        return snowflake_types.map_column(column)

    def create_schema(self, name: str) -> None:
        self._ddl(f"CREATE SCHEMA IF NOT EXISTS {self.ident(name)}")
        self._ddl(f"USE SCHEMA {self.ident(STATE_SCHEMA)}")  # CREATE SCHEMA switched to the new one

    # -- DDL --------------------------------------------------------------------------------

    def create_table(self, table: Table, columns: list[tuple[str, TypeMapping]]) -> None:
        # Snowflake does not enforce the key; declared, it documents what rows are matched on.
        cols = ", ".join(f"{self.ident(name)} {m.ddl}" for name, m in columns)
        keys = ", ".join(self.ident(k) for k in table.primary_key)
        self.create_schema(self.schema_of(table))
        self._ddl(
            f"CREATE TABLE IF NOT EXISTS {self.table_name(table)} ({cols}, {self.ident(SLICE_COLUMN)} INTEGER, "
            f"PRIMARY KEY ({keys}))"
        )

    def add_column(self, table: Table, name: str, mapping: TypeMapping, value: str | None) -> None:
        """Rows already there get ``value``. Snowflake allows no DROP DEFAULT on a default that
        ALTER TABLE added, and limits default expressions, so the column is filled under a
        temporary name and renamed: the rename is the atomic step, a crash before it is redone."""
        target = self.table_name(table)
        if value is None:
            self._ddl(f"ALTER TABLE {target} ADD COLUMN {self.ident(name)} {mapping.ddl}")
            return
        filling = self.ident(f"_pgr_adding {name}")
        self._ddl(f"ALTER TABLE {target} ADD COLUMN IF NOT EXISTS {filling} {mapping.ddl}")
        # Bound, not a literal: Snowflake reads backslashes in literals as escapes ('\x00ff').
        params = [value] * mapping.load.count("{0}")
        self.execute(f"UPDATE {target} SET {filling} = {staging.typed(mapping, '?')}", params)
        self._ddl(f"ALTER TABLE {target} RENAME COLUMN {filling} TO {self.ident(name)}")

    def reset_table(self, table: Table) -> None:
        scratch = self._scratch.pop(table_key(table), None)
        if scratch is not None:
            self._ddl(f"DROP TABLE IF EXISTS {scratch}")
        super().reset_table(table)

    # -- staging (always before the transaction) --------------------------------------------

    def _stage_name(self, name: str) -> str:
        if not PLAIN_NAME.fullmatch(name):
            raise ValueError(f"staging names are plain lower-case names, not {name!r}")
        return self.ident(name)  # upper-case, as are its columns: COPY matches them to the Parquet file's by name

    def _create_stage(self, name: str, schema: pa.Schema) -> str:
        """A temporary table for ``schema``'s columns (their names folded), each typed to hold
        its Arrow values exactly (``snowflake_stage.stage_type``)."""
        relation = self._stage_name(name)
        cols = ", ".join(f"{self.ident(f.name)} {snowflake_stage.stage_type(f.type)}" for f in schema)
        self._ddl(f"CREATE OR REPLACE TEMPORARY TABLE {relation} ({cols})")
        return relation

    def _load(self, relation: str, batches: Iterable[pa.RecordBatch]) -> None:
        """Append the batches (columns named as Snowflake stores the stage's) in bulk."""
        if not self._stage_made:
            self._ddl(f"CREATE TEMPORARY STAGE IF NOT EXISTS {snowflake_stage.STAGE}")
            self._stage_made = True
        snowflake_stage.load_parquet(self.fetchall, relation, batches)

    def stage(self, name: str, data: pa.Table) -> str:
        data = data.rename_columns([fold(c) for c in data.schema.names])
        relation = self._create_stage(name, data.schema)
        self._load(relation, data.to_batches())
        return relation

    def unstage(self, name: str) -> None:
        self._ddl(f"DROP TABLE IF EXISTS {self._stage_name(name)}")

    def slice_relations(
        self, table: Table, batches: Iterable[pa.RecordBatch], slice_value: int | None = None
    ) -> Iterator[tuple[str, pa.RecordBatch | pa.Schema | None]]:
        """Stages the whole slice now (the engine calls this before BEGIN; Snowflake cannot
        stage inside a transaction) as typed Parquet: natively read columns keep their types
        (and their text companions, see binary_copy), the rest are text. Memory holds one batch
        (and the local disk one Parquet file)."""
        self._prepare_scratch(table)  # the slice that completes the backfill replays the log
        batches = iter(batches)
        first = next(batches, None)
        staged = first.schema if first is not None else pa.schema([pa.field(c.name, pa.string()) for c in table.columns])
        positional = [fold(f"c{i}") for i in range(len(staged))]  # stage columns: plain names
        relation = self._create_stage(_SLICE_STAGE, pa.schema([f.with_name(p) for f, p in zip(staged, positional)]))
        try:
            pending = [first] if first is not None else []
            self._load(relation, (b.rename_columns(positional) for chain in (pending, batches) for b in chain))
        except BaseException:
            self.unstage(_SLICE_STAGE)
            raise
        select = ", ".join(f"{self.ident(p)} AS {self.ident(f.name)}" for p, f in zip(positional, staged))
        return _Staged(self, _SLICE_STAGE, f"(SELECT {select} FROM {relation})", staged)

    def sql_literal(self, mapping: TypeMapping, value: str) -> str:
        # Snowflake reads backslashes in string literals as escapes: double them.
        return staging.typed(mapping, "'" + value.replace("\\", "\\\\").replace("'", "''") + "'")

    def prepare_table(self, plan, status: str, describe_new) -> dict:
        added = super().prepare_table(plan, status, describe_new)
        if status == "streaming":
            self._prepare_scratch(plan.table)
        return added

    def prepare_replay(self, table: Table) -> None:
        self._prepare_scratch(table)

    def _prepare_scratch(self, table: Table) -> None:
        """merge=False: a temporary table shaped like the target plus the op column, (re)made
        before the transaction so it follows columns the table gained."""
        if self.merge or self.physical_columns(self.schema_of(table), table.name) is None:
            return
        key = table_key(table)
        if key not in self._scratch:
            self._scratch[key] = self._stage_name(f"pgr_resolved_{len(self._scratch)}")
        scratch = self._scratch[key]
        self._ddl(
            f"CREATE OR REPLACE TEMPORARY TABLE {scratch} AS SELECT CAST(NULL AS VARCHAR) AS {quote(_SCRATCH_OP)}, w.* "
            f"FROM {self.table_name(table)} w LIMIT 0"
        )

    # -- DML (inside the transaction) -------------------------------------------------------

    def apply_changes(self, table: Table, changes: StagedChanges, mappings: dict[str, TypeMapping]) -> None:
        target = self.table_name(table)
        if changes.truncated:
            self.execute(f"DELETE FROM {target}")
        columns = list(self.stored_columns(table_key(table)))
        resolved = staging.resolved_select(changes, target, columns, mappings, table.primary_key, self.ident)
        names = [self.ident(c) for c in columns]
        slice_column = self.ident(SLICE_COLUMN)
        if self.merge:
            on = " AND ".join(f"t.{self.ident(k)} = r.{self.ident(k)}" for k in table.primary_key)
            sets = ", ".join([f"{self.ident(c)} = r.{self.ident(c)}" for c in columns if c not in table.primary_key])
            sets = f"{sets}, {slice_column} = NULL" if sets else f"{slice_column} = NULL"
            op = f"r.{self.ident(staging.OP)}"
            self.execute(
                f"MERGE INTO {target} t USING ({resolved}) r ON {on} "
                f"WHEN MATCHED AND {op} = 'D' THEN DELETE "
                f"WHEN MATCHED THEN UPDATE SET {sets} "
                f"WHEN NOT MATCHED AND {op} = 'U' THEN INSERT ({', '.join(names)}, {slice_column}) "
                f"VALUES ({', '.join('r.' + n for n in names)}, NULL)"
            )
            return
        scratch = self._scratch.get(table_key(table))
        if scratch is None:
            if self._in_transaction:
                raise RuntimeError(f"{table.display}: no scratch table was prepared before the transaction")
            self._prepare_scratch(table)
            scratch = self._scratch[table_key(table)]
        keys = ", ".join(self.ident(k) for k in table.primary_key)
        # Resolved before anything is deleted: unknown values may come from rows deleted here.
        self.execute(f"DELETE FROM {scratch}")
        self.execute(f"INSERT INTO {scratch} ({quote(_SCRATCH_OP)}, {', '.join(names)}) {resolved}")
        self.execute(f"DELETE FROM {target} WHERE ({keys}) IN (SELECT {keys} FROM {scratch})")
        self.execute(
            f"INSERT INTO {target} ({', '.join(names)}, {slice_column}) SELECT {', '.join(names)}, NULL "
            f"FROM {scratch} WHERE {quote(_SCRATCH_OP)} = 'U'"
        )

    def delete_keys(self, table: Table, keys: list[tuple]) -> None:
        """One DELETE per 500 keys, the keys bound as parameters."""
        columns = [self.ident(k) for k in table.primary_key]
        for start in range(0, len(keys), _DELETE_CHUNK):
            chunk = keys[start : start + _DELETE_CHUNK]
            if len(columns) == 1:
                where = f"{columns[0]} IN ({', '.join('?' for _ in chunk)})"
            else:
                one = "(" + " AND ".join(f"{c} = ?" for c in columns) + ")"
                where = " OR ".join(one for _ in chunk)
            self.execute(f"DELETE FROM {self.table_name(table)} WHERE {where}", [v for key in chunk for v in key])


class _Staged:
    """The staged slice as the engine iterates it: one relation; ``close()`` drops the stage
    (a generator's ``finally`` would not run when it was never started)."""

    def __init__(self, warehouse: SnowflakeWarehouse, name: str, relation: str, schema: pa.Schema) -> None:
        self.warehouse, self.name = warehouse, name
        self.pending: list[tuple[str, pa.Schema]] = [(relation, schema)]

    def __iter__(self) -> Iterator[tuple[str, pa.Schema]]:
        return self

    def __next__(self) -> tuple[str, pa.Schema]:
        if not self.pending:
            raise StopIteration
        return self.pending.pop()

    def close(self) -> None:
        self.warehouse.unstage(self.name)
