"""DuckDB as a warehouse: tables mirror the source schema-for-schema, state in ``_pg_replication``.

Arrow batches are inserted straight from memory (DuckDB scans Arrow without copying) with one
``INSERT ... SELECT`` per batch whose select list converts staged strings to the typed columns.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

import duckdb
import pyarrow as pa
from psycopg import sql

from pg_replication.errors import SchemaChangeError, WarehouseError
from pg_replication.source.catalog import Table
from pg_replication.source.snapshot import BackfillPlan, column_mappings
from pg_replication.warehouse.base import SLICE_COLUMN, STATE_SCHEMA, Progress, SliceResult, TableState


def q(*names: str) -> str:
    """Quote an identifier (or a dotted path of them) for DuckDB, via psycopg's composition."""
    return sql.Identifier(*names).as_string()


def table_key(table: Table) -> str:
    return f"{table.schema}.{table.name}"


class DuckDBWarehouse:
    """A DuckDB file as a replication target. One instance wraps one open connection.

    Example::

        with duckdb.connect("warehouse.duckdb") as conn:
            wh = DuckDBWarehouse(conn)
            wh.ensure_table(table)
            wh.write_slice(table, 0, read_slice(conninfo, table, plan.slices[0]))
    """

    name = "duckdb"

    def __init__(self, conn: duckdb.DuckDBPyConnection) -> None:
        self.conn = conn
        self._ensure_state_tables()

    def _ensure_state_tables(self) -> None:
        self.conn.execute(f"CREATE SCHEMA IF NOT EXISTS {q(STATE_SCHEMA)}")
        self.conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {q(STATE_SCHEMA, 'tables')} (
                table_key VARCHAR PRIMARY KEY,
                plan JSON,
                columns JSON,
                updated_at TIMESTAMPTZ DEFAULT current_timestamp)"""
        )
        self.conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {q(STATE_SCHEMA, 'slices')} (
                table_key VARCHAR, slice INTEGER, rows BIGINT, bytes BIGINT, seconds DOUBLE,
                copied_at TIMESTAMPTZ DEFAULT current_timestamp, PRIMARY KEY (table_key, slice))"""
        )

    def table_name(self, table: Table) -> str:
        return q(table.schema, table.name)

    # -- schema -----------------------------------------------------------------------------

    def ensure_table(self, table: Table) -> None:
        wanted = {name: m.duckdb for name, m in column_mappings(table)}
        row = self.conn.execute(
            f"SELECT columns FROM {q(STATE_SCHEMA, 'tables')} WHERE table_key = ?", [table_key(table)]
        ).fetchone()
        stored: dict[str, str] | None = json.loads(row[0]) if row and row[0] else None
        exists = self._exists(table)
        if not exists:
            cols = ", ".join(f"{q(name)} {duck}" for name, duck in wanted.items())
            key = ", ".join(q(k) for k in table.primary_key)
            self.conn.execute(f"CREATE SCHEMA IF NOT EXISTS {q(table.schema)}")
            self.conn.execute(
                f"CREATE TABLE {self.table_name(table)} ({cols}, {q(SLICE_COLUMN)} INTEGER, PRIMARY KEY ({key}))"
            )
            stored = {}
        elif stored is None:
            stored = self._live_columns(table)
        for name, duck in wanted.items():
            if name not in stored:
                if exists:
                    self.conn.execute(f"ALTER TABLE {self.table_name(table)} ADD COLUMN {q(name)} {duck}")
            elif stored[name] != duck:
                raise SchemaChangeError(
                    f"{table.display}: column {name!r} changed type from {stored[name]} to {duck} "
                    "in the source; the warehouse table cannot follow in place",
                    table=table.display,
                )
        merged = {**stored, **wanted}
        self.conn.execute(
            f"""INSERT INTO {q(STATE_SCHEMA, 'tables')} (table_key, columns) VALUES (?, ?)
                ON CONFLICT (table_key) DO UPDATE SET columns = excluded.columns, updated_at = now()""",
            [table_key(table), json.dumps(merged)],
        )

    def _exists(self, table: Table) -> bool:
        return bool(
            self.conn.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
                [table.schema, table.name],
            ).fetchone()[0]  # type: ignore[index]
        )

    def _live_columns(self, table: Table) -> dict[str, str]:
        rows = self.conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = ? AND table_name = ?",
            [table.schema, table.name],
        ).fetchall()
        return {name: dtype for name, dtype in rows if name != SLICE_COLUMN}

    # -- state ------------------------------------------------------------------------------

    def load_state(self, table: Table) -> TableState:
        row = self.conn.execute(
            f"SELECT plan FROM {q(STATE_SCHEMA, 'tables')} WHERE table_key = ?", [table_key(table)]
        ).fetchone()
        done = self.conn.execute(
            f"SELECT slice FROM {q(STATE_SCHEMA, 'slices')} WHERE table_key = ?", [table_key(table)]
        ).fetchall()
        plan = BackfillPlan.from_json(row[0]) if row and row[0] else None
        return TableState(table_key(table), plan, frozenset(r[0] for r in done))

    def save_plan(self, table: Table, plan: BackfillPlan) -> BackfillPlan:
        self.conn.execute(
            f"""INSERT INTO {q(STATE_SCHEMA, 'tables')} (table_key, plan) VALUES (?, ?)
                ON CONFLICT (table_key) DO UPDATE SET plan = coalesce(plan, excluded.plan)""",
            [table_key(table), plan.to_json()],
        )
        stored = self.load_state(table).plan
        assert stored is not None
        return stored

    # -- data -------------------------------------------------------------------------------

    def write_slice(
        self, table: Table, index: int, batches: Iterable[pa.RecordBatch], progress: Progress | None = None
    ) -> SliceResult:
        target = self.table_name(table)
        names = [q(name) for name, _ in column_mappings(table)] + [q(SLICE_COLUMN)]
        select = ", ".join(
            [m.load_sql(q(name)) for name, m in column_mappings(table)] + [str(int(index))]
        )
        insert = f"INSERT INTO {target} ({', '.join(names)}) SELECT {select} FROM pgr_batch"
        # A row an update moved here from another slice's pages is still stored under that
        # slice: drop it by key first (cheaper than INSERT OR REPLACE, which probes per row).
        loads = dict(column_mappings(table))
        keys = ", ".join(q(k) for k in table.primary_key)
        staged_keys = ", ".join(loads[k].load_sql(q(k)) for k in table.primary_key)
        evict = f"DELETE FROM {target} WHERE ({keys}) IN (SELECT {staged_keys} FROM pgr_batch)"
        rows = nbytes = 0
        started = time.monotonic()
        conn = self.conn
        conn.execute("BEGIN TRANSACTION")
        try:
            conn.execute(f"DELETE FROM {target} WHERE {q(SLICE_COLUMN)} = ?", [index])
            for batch in batches:
                conn.register("pgr_batch", batch)
                try:
                    conn.execute(evict)
                    conn.execute(insert)
                except duckdb.Error as exc:
                    raise WarehouseError(
                        f"{table.display}: DuckDB refused slice {index} at rows {rows}..{rows + batch.num_rows}: "
                        + str(exc).splitlines()[0],
                        table=table.display,
                        hint="if a value does not fit its warehouse type (e.g. NaN in numeric(p,s)), "
                        "see README, Type mapping; nothing of this slice was committed",
                    ) from None
                rows += batch.num_rows
                nbytes += batch.nbytes
                if progress is not None:
                    progress(rows, nbytes)
            conn.execute(
                f"""INSERT OR REPLACE INTO {q(STATE_SCHEMA, 'slices')} (table_key, slice, rows, bytes, seconds, copied_at)
                    VALUES (?, ?, ?, ?, ?, current_timestamp)""",
                [table_key(table), index, rows, nbytes, time.monotonic() - started],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        finally:
            conn.unregister("pgr_batch")
        return SliceResult(rows, nbytes)

    def row_count(self, table: Table) -> int:
        return int(self.conn.execute(f"SELECT count(*) FROM {self.table_name(table)}").fetchone()[0])  # type: ignore[index]
