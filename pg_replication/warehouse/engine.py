"""The warehouse engine: replication state, backfill slices and change batches in portable SQL.

A dialect (``duckdb.py``, ``postgres.py``, ``snowflake.py``) supplies the connection, its type
mapping, how a batch is staged and how staged changes are applied. Everything else lives once,
one concern a module, mixed into ``SqlWarehouse`` here: the state store (``state.py``), schema
evolution (``evolution.py``), backfill slices and syncs (``slices.py``), the change log and the
apply of one segment (``change_log.py``), a drain's apply with per-table isolation
(``drain.py``), the staging of large streamed transactions (``stream_staging.py``), reading a
table back as a stream of Arrow batches (``reads.py``), and nested documents (``documents.py``,
kept fresh by syncs, backfills and retries too: ``document_upkeep.py``).

Every write ends in one transaction that holds the data and the state describing it. What a
warehouse cannot do inside a transaction happens before it, idempotently: schema changes, change
logs and staged change batches always (Snowflake commits implicitly on DDL); a slice's batches
are staged inside the transaction where that is allowed (DuckDB, Postgres) and before it
otherwise. A reload loads its copy outside any transaction and swaps it in with one. Writers of
one table's state wait for each other on its state row (``_lock_state``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import pyarrow as pa

from pg_replication.source.catalog import Column, Table
from pg_replication.types import TypeMapping, map_column
from pg_replication.warehouse.base import (
    SLICE_COLUMN,
    STATE_SCHEMA,
    Written,
    quote,
    table_key,
)
from pg_replication.warehouse.change_log import ChangeLog
from pg_replication.warehouse.document_upkeep import DocumentUpkeep
from pg_replication.warehouse.documents import DocumentStore
from pg_replication.warehouse.drain import DrainApply
from pg_replication.warehouse.evolution import DescribeNew, SchemaEvolution
from pg_replication.warehouse.reads import TableReader
from pg_replication.warehouse.slices import SliceWriter
from pg_replication.warehouse import staging
from pg_replication.warehouse.staging import StagedChanges
from pg_replication.warehouse.state import StateStore
from pg_replication.warehouse.stream_staging import StreamStaging


class SqlWarehouse(
    StateStore, SliceWriter, ChangeLog, DrainApply, SchemaEvolution, StreamStaging, TableReader, DocumentStore, DocumentUpkeep
):
    """The engine; a dialect subclass fills in the hooks marked below."""

    name = "sql"
    errors: tuple[type[BaseException], ...] = ()  # the driver's errors: a refused write
    text_type = "TEXT"
    schema_prefix = ""  # warehouse schema = prefix + source schema
    counts_rows_cheaply = True  # count(*) reads metadata, not rows: report it with every micro-batch
    # Changes of a table still backfilling are applied at once instead of logged (ClickHouse: its
    # writes are versioned above the slices'); elsewhere they wait in the change log.
    applies_while_backfilling = False
    # Waits between attempts of a drain that met a transient error (errors.is_transient); after the
    # last one the drain fails as retryable, having applied nothing.
    transient_delays: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)

    def __init__(self, *, read_only: bool = False) -> None:
        """``read_only``: only read state (checks and ``status`` create nothing)."""
        if not read_only:
            self._ensure_state_tables()

    # -- dialect hooks ----------------------------------------------------------------------

    def execute(self, query: str, params: Sequence = ()) -> None:
        """Run one statement; ``?`` marks parameters."""
        raise NotImplementedError

    def fetchall(self, query: str, params: Sequence = ()) -> list[tuple]:
        raise NotImplementedError

    def begin(self) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def rollback(self) -> None:
        raise NotImplementedError

    def stage(self, name: str, data: pa.Table) -> str:
        """Make ``data`` readable by SQL on this connection; returns the relation. Called
        outside any transaction."""
        raise NotImplementedError

    def unstage(self, name: str) -> None:
        raise NotImplementedError

    def slice_relations(
        self, table: Table, batches: Iterable[pa.RecordBatch], slice_value: int | None = None
    ) -> Iterator[tuple[str | None, pa.RecordBatch | pa.Schema | Written | None]]:
        """The slice's rows as relations of source-named columns, and the batch each holds; when
        one relation holds all of them, its columns' schema (staged like the batches: natively
        read columns typed, see binary_copy) or None (each column the warehouse column's type or
        its text). Called before the slice's transaction
        begins; iterated inside it. A generator stages lazily, inside the transaction: a dialect
        that cannot stage there (Snowflake) must stage everything when called. ``slice_value``:
        the slice's number, where the dialect may write the rows into the target table itself: it
        then yields ``(None, Written)``, only where none of their keys was in the table yet."""
        raise NotImplementedError

    def apply_changes(self, table: Table, changes: StagedChanges, mappings: dict[str, TypeMapping]) -> None:
        """Apply one staged segment to the table inside the caller's transaction."""
        raise NotImplementedError

    def map_column(self, column: Column) -> TypeMapping:
        return map_column(column)

    def ident(self, *names: str) -> str:
        return quote(*names)

    def physical_columns(self, schema: str, name: str) -> list[str] | None:
        """The table's column names in order, or None when it does not exist."""
        rows = self.fetchall(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = ? AND table_name = ? "
            "ORDER BY ordinal_position",
            [self.fold(schema), self.fold(name)],
        )
        return [r[0] for r in rows] or None

    def fold(self, name: str) -> str:
        """The name as the warehouse's catalog stores it (Snowflake upper-cases plain names)."""
        return name

    def create_table(self, table: Table, columns: list[tuple[str, TypeMapping]]) -> None:
        cols = ", ".join(f"{self.ident(name)} {m.ddl}" for name, m in columns)
        self.create_schema(self.schema_of(table))
        self.execute(f"CREATE TABLE IF NOT EXISTS {self.table_name(table)} ({cols}, {self.ident(SLICE_COLUMN)} INTEGER)")

    def prepare_replay(self, table: Table) -> None:
        """DDL before a transaction that replays the table's change log (``retry_table``); most
        dialects need none."""

    def schema_of(self, table: Table) -> str:
        return self.schema_prefix + table.schema

    # -- names ------------------------------------------------------------------------------

    def table_name(self, table: Table) -> str:
        return self.ident(self.schema_of(table), table.name)

    def state(self, name: str) -> str:
        return self.ident(STATE_SCHEMA, name)

    def log_name(self, table: Table) -> str:
        return f"log.{table.schema}.{table.name}"

    def column_mappings(self, table: Table) -> list[tuple[str, TypeMapping]]:
        return [(c.name, self.map_column(c)) for c in table.columns]

    # -- state ------------------------------------------------------------------------------

    def exists(self, table: Table) -> bool:
        return self.physical_columns(self.schema_of(table), table.name) is not None

    def list_tables(self) -> list[tuple[str, str, int]]:
        """(schema, name, rows) of every table outside the state schema."""
        tables = self.fetchall(
            "SELECT table_schema, table_name FROM information_schema.tables WHERE table_schema <> ? "
            "AND table_type = 'BASE TABLE' AND lower(table_schema) NOT IN ('information_schema', 'pg_catalog') ORDER BY 1, 2",
            [self.fold(STATE_SCHEMA)],
        )
        return [(s, n, int(self.fetchall(f"SELECT count(*) FROM {self.ident(s, n)}")[0][0])) for s, n in tables]

    def row_count(self, table: Table) -> int:
        return int(self.fetchall(f"SELECT count(*) FROM {self.table_name(table)}")[0][0])

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.begin()
        try:
            yield
            self.commit()
        except BaseException:
            self.rollback()
            raise

    # -- schema -----------------------------------------------------------------------------

    def ensure_table(self, table: Table, describe_new: DescribeNew = lambda names: {}) -> None:
        """Create the table, or follow the source's columns (see evolution.py)."""
        mappings = self.column_mappings(table)
        if self.physical_columns(self.schema_of(table), table.name) is None:
            self.create_table(table, mappings)
        added = self.add_columns(table, dict(mappings), describe_new)
        stored = self.stored_columns(table_key(table))
        if added or not stored:
            self._store_columns(table_key(table), {**stored, **added})

    # -- backfill ---------------------------------------------------------------------------

    # -- the change log ---------------------------------------------------------------------

    # -- CDC --------------------------------------------------------------------------------

    def _refuse_unheld_changes(self, table: Table, changes: StagedChanges, mappings: dict[str, TypeMapping]) -> None:
        """Before a batch is applied: its upserted values that the warehouse's type refuses
        (``TypeMapping.refuse``) fail the table, naming column, key and value, through the
        dialect's ``_refuse_unheld`` (DuckDB, ClickHouse)."""
        position = {name: i for i, name in enumerate(changes.columns)}
        guarded = {n: f"s.{self.ident(staging.value_column(i))}" for n, i in position.items() if n in mappings and mappings[n].refuse}
        if not guarded:
            return
        keys = [
            f"s.{self.ident(staging.value_column(position[k]))}" if k in position else f"s.{self.ident(staging.fill_column(j))}"
            for j, k in enumerate(table.primary_key)
        ]
        self._refuse_unheld(table, changes.relation, guarded, keys, mappings, where=f"s.{self.ident(staging.OP)} = 'U'")  # type: ignore[attr-defined]
