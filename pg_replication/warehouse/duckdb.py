"""DuckDB as a warehouse: tables mirror the source schema-for-schema, state in ``_pg_replication``.

Arrow batches are inserted straight from memory (DuckDB scans Arrow without copying), so a
slice streams batch by batch inside its transaction. Staged changes are applied by rebuilding
the touched rows (DELETE + INSERT), not UPDATE: DuckDB skips an UPDATE whose new value compares
equal to the old one (-0.0 vs 0.0, '1 mon' vs '30 days'), which would lose the change.

A value a DuckDB type cannot hold (a timestamp after 294247 AD: ``TypeMapping.refuse``) is looked
for in each staged batch before it is loaded, so the refusal names the column, the row's key and
the value; that write fails and nothing of it is committed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import duckdb
import pyarrow as pa

from pg_replication.errors import WarehouseError
from pg_replication.source.binary_copy import text_column
from pg_replication.source.catalog import Table
from pg_replication.types import TypeMapping
from pg_replication.warehouse import staging
from pg_replication.warehouse.base import SLICE_COLUMN, STATE_SCHEMA
from pg_replication.warehouse.base import quote as q
from pg_replication.warehouse.document_sql import DUCKDB_JSON
from pg_replication.warehouse.engine import SqlWarehouse, table_key
from pg_replication.warehouse.reads import BATCH_ROWS
from pg_replication.warehouse.staging import StagedChanges

__all__ = ["DuckDBWarehouse", "q", "table_key"]


class DuckDBWarehouse(SqlWarehouse):
    """A DuckDB file as a replication target. One instance wraps one open connection.

    Example::

        with duckdb.connect("warehouse.duckdb") as conn:
            wh = DuckDBWarehouse(conn)
            wh.ensure_table(table)
            wh.write_slice(table, 0, read_slice(conninfo, table, plan.slices[0]))
    """

    name = "duckdb"
    errors = (duckdb.Error,)
    json_functions = DUCKDB_JSON
    text_type = "VARCHAR"
    evicts_fresh_rows = True
    sole_writer = True  # the file's one read-write connection

    def __init__(self, conn: duckdb.DuckDBPyConnection, *, read_only: bool = False) -> None:
        self.conn = conn
        self._batch: pa.RecordBatch | None = None  # see stage_batch
        super().__init__(read_only=read_only)

    def _ensure_state_tables(self) -> None:
        super()._ensure_state_tables()
        # An earlier version kept times as TIMESTAMPTZ; the engine writes epoch seconds.
        for table, column in (("tables", "updated_at"), ("cursor", "updated_at"), ("slices", "copied_at")):
            kind = self.fetchall(
                "SELECT data_type FROM information_schema.columns WHERE table_schema = ? AND table_name = ? AND column_name = ?",
                [STATE_SCHEMA, table, column],
            )
            if kind and kind[0][0].startswith("TIMESTAMP"):
                self.execute(f"ALTER TABLE {q(STATE_SCHEMA, table)} ALTER COLUMN {q(column)} TYPE DOUBLE USING epoch({q(column)})")

    def execute(self, query: str, params: Sequence = ()) -> None:
        self._run(query, params)

    def fetchall(self, query: str, params: Sequence = ()) -> list[tuple]:
        # Always fetch everything: DuckDB 2 refuses the next statement while a result is open.
        return self._run(query, params).fetchall()

    def _run(self, query: str, params: Sequence) -> duckdb.DuckDBPyConnection:
        pgr_batch = self._batch  # noqa: F841 -- the relation of that name in ``query`` (see stage_batch)
        return self.conn.execute(query, list(params) or None)

    def begin(self) -> None:
        self.conn.execute("BEGIN TRANSACTION")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        try:
            self.conn.execute("ROLLBACK")
        except duckdb.TransactionException:  # the failed statement was the COMMIT: nothing is open
            pass

    def stage(self, name: str, data: pa.Table) -> str:
        self.conn.register(name, data)
        return q(name)

    def unstage(self, name: str) -> None:
        self.conn.unregister(name)

    def stage_batch(self, batch: pa.RecordBatch) -> str:
        """One slice batch as relation ``pgr_batch``, found by DuckDB's replacement scan in the
        frame of ``_run`` (under ``execute`` and ``fetchall``). Not registered: a registered view
        is a catalog entry, and the transaction keeps each replaced one, with its batch, until it
        ends (a slice's every batch, hundreds of MiB)."""
        self._batch = batch
        return q("pgr_batch")

    def slice_relations(
        self, table: Table, batches: Iterable[pa.RecordBatch], slice_value: int | None = None
    ) -> Iterator[tuple[str, pa.RecordBatch | None]]:
        mappings = dict(self.column_mappings(table))
        keys = [q(k) for k in table.primary_key]
        try:
            for batch in batches:
                relation = self.stage_batch(batch)
                self._refuse_unheld(table, relation, self._guarded(mappings, batch.schema), keys, mappings)
                yield relation, batch
        finally:
            self._batch = None

    @staticmethod
    def _guarded(mappings: dict[str, TypeMapping], staged: pa.Schema) -> dict[str, str]:
        """Columns whose values DuckDB may refuse -> the staged text holding them: the column, or
        the text companion of a natively read one (only values read as text can be refused)."""
        guarded = {}
        for position, (name, mapping) in enumerate(mappings.items()):
            if mapping.refuse is None:
                continue
            companion = text_column(position)
            if staged.get_field_index(companion) >= 0:
                guarded[name] = q(companion)
            elif staged.get_field_index(name) >= 0 and staged.field(name).type == pa.string():
                guarded[name] = q(name)
        return guarded

    def _refuse_unheld(
        self, table: Table, relation: str, columns: dict[str, str], keys: list[str], mappings: dict[str, TypeMapping], where: str = "TRUE"
    ) -> None:
        """Fail naming column, key and value when a staged value of ``columns`` (name -> staged
        expression) is one its DuckDB type cannot hold (``TypeMapping.refuse``)."""
        shown_keys = ", ".join(f"CAST({k} AS VARCHAR)" for k in keys)
        for name, staged in columns.items():
            mapping = mappings[name]
            assert mapping.refuse is not None
            found = self.fetchall(
                f"SELECT {shown_keys}, CAST({staged} AS VARCHAR) FROM {relation} s "
                f"WHERE ({where}) AND {mapping.refuse.replace('{0}', staged)} LIMIT 1"
            )
            if not found:
                continue
            *key, value = found[0]
            if len(value) > 300:
                value = value[:300] + "…"
            source_type = next((c.type_sql for c in table.columns if c.name == name), mapping.ddl)
            raise WarehouseError(
                f"{table.display}: column {name} ({source_type}) of the row with key "
                f"({', '.join(table.primary_key)})=({', '.join(str(k) for k in key)}) holds {value}, "
                f"which DuckDB's {mapping.ddl} cannot hold",
                table=table.display,
                hint="DuckDB timestamps end at 294247-01-10 04:00:54.775806 AD (Postgres: 294276 AD); correct the "
                "value in the source or leave the column out (exclude_columns), then re-run; nothing of this write "
                "was committed (README, Type mapping)",
            )

    def read_batches(self, schema: str, name: str, batch_rows: int = BATCH_ROWS) -> pa.RecordBatchReader:
        """DuckDB's own Arrow stream: a relation's reader produces batches as they are read
        (a DB-API result's reader would copy every row first), typed as DuckDB stores them."""
        columns = ", ".join(q(c) for c in self.stored_columns(f"{schema}.{name}"))
        return self.conn.sql(f"SELECT {columns} FROM {q(schema, name)}").to_arrow_reader(batch_rows)

    def slice_eviction_for(self, table: Table) -> str:
        """Once after the slice's batches. Before each batch in a table an earlier version gave a
        primary key (at the end of its backfill), whose index refuses a duplicate at once. The key
        is no longer declared: its index grows with the table (387 MiB resident at 50M rows, 1.2
        GiB to build), and the engine keeps one row per key itself."""
        return "before" if self._has_primary_key(table) else "after"

    def _has_primary_key(self, table: Table) -> bool:
        return bool(
            self.fetchall(
                "SELECT count(*) FROM duckdb_constraints() WHERE schema_name = ? AND table_name = ? "
                "AND constraint_type = 'PRIMARY KEY'",
                [table.schema, table.name],
            )[0][0]
        )

    def delete_keys(self, table: Table, keys: list[tuple]) -> None:
        if not keys:
            return
        width = len(table.primary_key)
        self.stage("pgr_gone", pa.table({f"k{i}": [k[i] for k in keys] for i in range(width)}))
        try:
            columns = ", ".join(q(k) for k in table.primary_key)
            staged = ", ".join(q(f"k{i}") for i in range(width))
            self.execute(f"DELETE FROM {self.table_name(table)} WHERE ({columns}) IN (SELECT {staged} FROM pgr_gone)")
        finally:
            self.unstage("pgr_gone")

    def apply_changes(self, table: Table, changes: StagedChanges, mappings: dict[str, TypeMapping]) -> None:
        target = self.table_name(table)
        if changes.truncated:
            self.execute(f"DELETE FROM {target}")
        self._refuse_unheld_changes(table, changes, mappings)
        columns = list(self.stored_columns(table_key(table)))
        resolved = staging.resolved_select(changes, target, columns, mappings, table.primary_key, q)
        keys = ", ".join(q(k) for k in table.primary_key)
        names = ", ".join(q(c) for c in columns)
        if not changes.unknowns and set(columns) <= set(changes.columns):
            # Every value is in the staged rows (nothing read from the table): resolved as they
            # are deleted and inserted, without writing them to a temporary table first.
            self.execute(f"DELETE FROM {target} WHERE ({keys}) IN (SELECT {keys} FROM ({resolved}))")
            self.execute(
                f"INSERT INTO {target} ({names}, {q(SLICE_COLUMN)}) SELECT {names}, NULL FROM ({resolved}) "
                f"WHERE {q(staging.OP)} = 'U'"
            )
            return
        # Resolved before anything is deleted: unknown values may come from rows deleted here.
        self.execute(f"CREATE OR REPLACE TEMP TABLE pgr_resolved AS {resolved}")
        self.execute(f"DELETE FROM {target} WHERE ({keys}) IN (SELECT {keys} FROM pgr_resolved)")
        self.execute(
            f"INSERT INTO {target} ({names}, {q(SLICE_COLUMN)}) SELECT {names}, NULL FROM pgr_resolved "
            f"WHERE {q(staging.OP)} = 'U'"
        )
        self.execute("DROP TABLE pgr_resolved")
