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

from pg_replication.errors import PgReplicationError, SchemaChangeError, WarehouseError
from pg_replication.source.catalog import VOLATILE_DEFAULT, Table
from pg_replication.source.snapshot import BackfillPlan, column_mappings
from pg_replication.types import TypeMapping
from pg_replication.warehouse.base import SLICE_COLUMN, STATE_SCHEMA, KeyCheck, Progress, SliceResult, TableState
from pg_replication.warehouse.base import quote as q
from pg_replication.warehouse.duckdb_changes import append_log, apply_segment, log_table, one, replay_log


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

    def __init__(self, conn: duckdb.DuckDBPyConnection, *, read_only: bool = False) -> None:
        """``read_only``: only read state (a read-only connection cannot create the state tables)."""
        self.conn = conn
        if not read_only:
            self._ensure_state_tables()

    def _ensure_state_tables(self) -> None:
        self.conn.execute(f"CREATE SCHEMA IF NOT EXISTS {q(STATE_SCHEMA)}")
        self.conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {q(STATE_SCHEMA, 'tables')} (
                table_key VARCHAR PRIMARY KEY,
                plan JSON,
                columns JSON,
                status VARCHAR DEFAULT 'backfilling',
                error VARCHAR,
                applied_lsn UBIGINT,
                updated_at TIMESTAMPTZ DEFAULT current_timestamp)"""
        )
        for column, ddl in (("status", "VARCHAR DEFAULT 'backfilling'"), ("error", "VARCHAR"), ("applied_lsn", "UBIGINT")):
            # state written by an earlier version: add what it lacks
            self.conn.execute(f"ALTER TABLE {q(STATE_SCHEMA, 'tables')} ADD COLUMN IF NOT EXISTS {q(column)} {ddl}")
        self.conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {q(STATE_SCHEMA, 'cursor')} (
                slot VARCHAR PRIMARY KEY, drained_lsn UBIGINT, updated_at TIMESTAMPTZ)"""
        )
        self.conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {q(STATE_SCHEMA, 'slices')} (
                table_key VARCHAR, slice INTEGER, rows BIGINT, bytes BIGINT, seconds DOUBLE,
                copied_at TIMESTAMPTZ DEFAULT current_timestamp, PRIMARY KEY (table_key, slice))"""
        )

    def table_name(self, table: Table) -> str:
        return q(table.schema, table.name)

    # -- schema -----------------------------------------------------------------------------

    def ensure_table(self, table: Table, missing: dict[str, str | None] | None = None) -> None:
        """Create the table (primary key declared) or add the columns the source gained."""
        if not self._exists(table):
            # The primary key is declared when the backfill completes: bulk loading into a
            # table without its index, then building it once, is several times cheaper.
            cols = ", ".join(f"{q(name)} {m.duckdb}" for name, m in column_mappings(table))
            self.conn.execute(f"CREATE SCHEMA IF NOT EXISTS {q(table.schema)}")
            self.conn.execute(f"CREATE TABLE {self.table_name(table)} ({cols}, {q(SLICE_COLUMN)} INTEGER)")
            self._store_columns(
                table_key(table), {n: {"duckdb": m.duckdb, "load": m.load} for n, m in column_mappings(table)}
            )
        self.evolve(table, dict(column_mappings(table)), missing or {})

    def evolve(self, table: Table, mappings: dict[str, TypeMapping], missing: dict[str, str | None]) -> None:
        """Follow the source's columns: add new ones (existing rows get the value Postgres gives
        them, its 'missing value'), refuse a changed type. Dropped source columns are kept."""
        key = table_key(table)
        stored = self.stored_columns(key)
        added = {}
        for name, mapping in mappings.items():
            if name not in stored:
                value = missing.get(name)
                if value == VOLATILE_DEFAULT:
                    raise SchemaChangeError(
                        f"{table.display}: column {name!r} was added with a volatile default; existing rows "
                        "got values that no change event carries",
                        table=table.display,
                    )
                default = None if value is None else mapping.load_sql("'" + value.replace("'", "''") + "'")
                clause = f" DEFAULT CAST({default} AS {mapping.duckdb})" if default is not None else ""
                self.conn.execute(f"ALTER TABLE {self.table_name(table)} ADD COLUMN {q(name)} {mapping.duckdb}{clause}")
                if default is not None:  # the value is for rows that existed, not for later inserts
                    self.conn.execute(f"ALTER TABLE {self.table_name(table)} ALTER COLUMN {q(name)} DROP DEFAULT")
                added[name] = {"duckdb": mapping.duckdb, "load": mapping.load}
            elif stored[name]["duckdb"] != mapping.duckdb:
                raise SchemaChangeError(
                    f"{table.display}: column {name!r} changed type from {stored[name]['duckdb']} to "
                    f"{mapping.duckdb} in the source; the warehouse table cannot follow in place",
                    table=table.display,
                )
        if added:
            self._store_columns(key, {**stored, **added})

    def stored_mappings(self, table: Table) -> dict[str, TypeMapping]:
        """The warehouse's columns as mappings of staged text (what the change log holds)."""
        return {
            name: TypeMapping(pa.string(), c["duckdb"], load=c["load"])
            for name, c in self.stored_columns(table_key(table)).items()
        }

    def _store_columns(self, key: str, columns: dict) -> None:
        self.conn.execute(
            f"""INSERT INTO {q(STATE_SCHEMA, 'tables')} (table_key, columns) VALUES (?, ?)
                ON CONFLICT (table_key) DO UPDATE SET columns = excluded.columns, updated_at = now()""",
            [key, json.dumps(columns)],
        )

    def _exists(self, table: Table) -> bool:
        return bool(
            one(
                self.conn,
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
                [table.schema, table.name],
            )[0]  # type: ignore[index]
        )

    # -- state ------------------------------------------------------------------------------

    def load_state(self, table: Table) -> TableState:
        row = one(
            self.conn,
            f"SELECT plan, coalesce(status, 'backfilling') FROM {q(STATE_SCHEMA, 'tables')} WHERE table_key = ?",
            [table_key(table)],
        )
        done = self.conn.execute(
            f"SELECT slice FROM {q(STATE_SCHEMA, 'slices')} WHERE table_key = ?", [table_key(table)]
        ).fetchall()
        plan = BackfillPlan.from_json(row[0]) if row and row[0] else None
        return TableState(table_key(table), plan, frozenset(r[0] for r in done), row[1] if row else "backfilling")

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
        self,
        table: Table,
        index: int,
        batches: Iterable[pa.RecordBatch],
        progress: Progress | None = None,
        still_in_source: KeyCheck | None = None,
    ) -> SliceResult:
        target = self.table_name(table)
        mappings = dict(column_mappings(table))
        names = [q(name) for name in mappings] + [q(SLICE_COLUMN)]
        select = ", ".join([m.load_sql(q(name)) for name, m in mappings.items()] + [str(int(index))])
        insert = f"INSERT INTO {target} ({', '.join(names)}) SELECT {select} FROM pgr_batch"
        # A row an update moved here from another slice's pages is still stored under that
        # slice: drop it by key first (cheaper than INSERT OR REPLACE, which probes per row).
        keys = ", ".join(q(k) for k in table.primary_key)
        staged_keys = ", ".join(mappings[k].load_sql(q(k)) for k in table.primary_key)
        evict = f"DELETE FROM {target} WHERE ({keys}) IN (SELECT {staged_keys} FROM pgr_batch)"
        previous = -1 - index  # rows this slice wrote before, until the new copy replaces them
        rows = nbytes = 0
        started = time.monotonic()
        conn = self.conn
        conn.execute("BEGIN TRANSACTION")
        try:
            conn.execute(f"UPDATE {target} SET {q(SLICE_COLUMN)} = ? WHERE {q(SLICE_COLUMN)} = ?", [previous, index])
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
            self._settle_leftovers(table, previous, still_in_source)
            conn.execute(
                f"""INSERT OR REPLACE INTO {q(STATE_SCHEMA, 'slices')} (table_key, slice, rows, bytes, seconds, copied_at)
                    VALUES (?, ?, ?, ?, ?, current_timestamp)""",
                [table_key(table), index, rows, nbytes, time.monotonic() - started],
            )
            self._start_streaming_when_complete(table)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        finally:
            conn.unregister("pgr_batch")
        self._ensure_primary_key(table)
        return SliceResult(rows, nbytes)

    def _settle_leftovers(self, table: Table, marker: int, still_in_source: KeyCheck | None) -> None:
        """Rows the slice held before but not now: deleted in the source, or moved by an update to
        another slice's pages. Only the source can tell: deleted rows go, moved rows stay."""
        target = self.table_name(table)
        keys = ", ".join(q(k) for k in table.primary_key)
        leftovers = self.conn.execute(f"SELECT {keys} FROM {target} WHERE {q(SLICE_COLUMN)} = ?", [marker]).fetchall()
        if not leftovers:
            return
        alive = still_in_source(leftovers) if still_in_source is not None else set()
        gone = [k for k in leftovers if tuple(k) not in alive]
        if gone:
            self.conn.register("pgr_gone", pa.table({f"k{i}": [g[i] for g in gone] for i in range(len(table.primary_key))}))
            staged = ", ".join(q(f"k{i}") for i in range(len(table.primary_key)))
            self.conn.execute(f"DELETE FROM {target} WHERE ({keys}) IN (SELECT {staged} FROM pgr_gone)")
            self.conn.unregister("pgr_gone")
        self.conn.execute(f"UPDATE {target} SET {q(SLICE_COLUMN)} = NULL WHERE {q(SLICE_COLUMN)} = ?", [marker])

    def _start_streaming_when_complete(self, table: Table) -> None:
        state = self.load_state(table)
        if state.plan is None or len(state.slices_done) < state.plan.partitions or state.status != "backfilling":
            return
        replay_log(
            self.conn, table.schema, table.name, self.table_name(table), self.stored_mappings(table), table.primary_key
        )
        self.set_status(table_key(table), "streaming")

    def _ensure_primary_key(self, table: Table) -> None:
        """Declare the primary key once the backfill is complete. (In its own transaction: DuckDB
        fails a commit that built an index over keys the same transaction deleted and inserted.)"""
        if self.load_state(table).status != "streaming":
            return
        has_key = one(
            self.conn,
            "SELECT count(*) FROM duckdb_constraints() WHERE schema_name = ? AND table_name = ? "
            "AND constraint_type = 'PRIMARY KEY'",
            [table.schema, table.name],
        )[0]  # type: ignore[index]
        if not has_key:
            keys = ", ".join(q(k) for k in table.primary_key)
            self.conn.execute(f"ALTER TABLE {self.table_name(table)} ADD PRIMARY KEY ({keys})")

    # -- CDC --------------------------------------------------------------------------------

    def set_status(self, key: str, status: str, error: str | None = None) -> None:
        self.conn.execute(
            f"""INSERT INTO {q(STATE_SCHEMA, 'tables')} (table_key, status, error) VALUES (?, ?, ?)
                ON CONFLICT (table_key) DO UPDATE SET status = excluded.status, error = excluded.error,
                updated_at = now()""",
            [key, status, error],
        )

    def drained_lsn(self, slot: str) -> int | None:
        row = one(self.conn, f"SELECT drained_lsn FROM {q(STATE_SCHEMA, 'cursor')} WHERE slot = ?", [slot])
        return int(row[0]) if row and row[0] is not None else None

    def seconds_since_drain(self, slot: str) -> float | None:
        row = one(self.conn, f"SELECT epoch(now() - updated_at) FROM {q(STATE_SCHEMA, 'cursor')} WHERE slot = ?", [slot])
        return float(row[0]) if row and row[0] is not None else None

    def set_drained_lsn(self, slot: str, lsn: int) -> None:
        self.conn.execute(
            f"""INSERT INTO {q(STATE_SCHEMA, 'cursor')} (slot, drained_lsn, updated_at) VALUES (?, ?, now())
                ON CONFLICT (slot) DO UPDATE SET drained_lsn = excluded.drained_lsn, updated_at = now()""",
            [slot, lsn],
        )

    def set_applied_lsn(self, key: str, lsn: int) -> None:
        self.conn.execute(
            f"UPDATE {q(STATE_SCHEMA, 'tables')} SET applied_lsn = ?, updated_at = now() WHERE table_key = ?", [lsn, key]
        )

    def statuses(self) -> dict[str, tuple[str, str | None]]:
        return {
            k: (s or "backfilling", e)
            for k, s, e in self.conn.execute(f"SELECT table_key, status, error FROM {q(STATE_SCHEMA, 'tables')}").fetchall()
        }

    def apply_drain(self, decoded, target_lsn: int, slot: str, missing_values: dict) -> dict:
        """Apply (streaming tables) or log (the rest) every table's changes, and record the
        drained LSN, in one transaction. A table whose apply fails is marked failed and logged
        instead, and the transaction is retried without it."""
        from pg_replication.cdc import TableOutcome, failpoint

        statuses = self.statuses()
        failed_now: dict[str, str] = {}
        while True:
            outcomes = {}
            self.conn.execute("BEGIN TRANSACTION")
            try:
                for key, batch in decoded.batches.items():
                    plan = decoded.plans[key]
                    status, error = statuses.get(key, ("backfilling", None))
                    if key in failed_now:
                        status, error = "failed", failed_now[key]
                    if status == "streaming":
                        try:
                            self._apply_table(plan, batch, missing_values.get(key, {}))
                        except (duckdb.Error, PgReplicationError) as exc:
                            raise _TableFailed(key, batch.stats.first_lsn, exc) from None
                        self.set_applied_lsn(key, batch.stats.last_lsn)
                        outcomes[key] = TableOutcome(plan.table, batch.stats, "applied", self.row_count(plan.table))
                        continue
                    if status != "failed" and self._exists(plan.table):
                        try:  # keep the warehouse's columns (and their stored load) in step
                            self._evolve_to(plan, missing_values.get(key, {}))
                        except (duckdb.Error, PgReplicationError) as exc:
                            raise _TableFailed(key, batch.stats.first_lsn, exc) from None
                    for segment in batch.segments:
                        append_log(self.conn, plan.table.schema, plan.table.name, segment, plan.table.primary_key)
                    if key in failed_now:
                        self.set_status(key, "failed", error)
                    mode = "failed" if status == "failed" else "logged"
                    outcomes[key] = TableOutcome(plan.table, batch.stats, mode, None, error)
                failpoint("mid_apply")
                self.set_drained_lsn(slot, target_lsn)
                self.conn.execute("COMMIT")
                return outcomes
            except _TableFailed as failure:
                _rollback(self.conn)
                failed_now[failure.key] = failure.describe()
            except BaseException:
                _rollback(self.conn)
                raise

    def _evolve_to(self, plan, missing: dict[str, str | None]) -> None:
        """Follow the columns of the relation the changes arrived under."""
        self.evolve(plan.table, {n: plan.mappings[n] for n in plan.columns}, missing)

    def _apply_table(self, plan, batch, missing: dict[str, str | None]) -> None:
        self._evolve_to(plan, missing)
        for segment in batch.segments:
            apply_segment(self.conn, self.table_name(plan.table), segment, plan.mappings, plan.table.primary_key)

    def stored_columns(self, key: str) -> dict[str, dict[str, str]]:
        row = one(self.conn, f"SELECT columns FROM {q(STATE_SCHEMA, 'tables')} WHERE table_key = ?", [key])
        return json.loads(row[0]) if row and row[0] else {}

    def report(self) -> list[dict]:
        """Per table: status, error, applied LSN, backfill slices done, plan size, last update."""
        rows = self.conn.execute(
            f"""SELECT t.table_key, coalesce(t.status, 'backfilling'), t.error, t.applied_lsn,
                       json_array_length(t.plan -> '$.slices'), count(s.slice), t.updated_at
                FROM {q(STATE_SCHEMA, 'tables')} t LEFT JOIN {q(STATE_SCHEMA, 'slices')} s USING (table_key)
                GROUP BY ALL ORDER BY 1"""
        ).fetchall()
        keys = ("table", "status", "error", "applied_lsn", "partitions", "slices_done", "updated_at")
        return [dict(zip(keys, r)) for r in rows]

    def reset_table(self, table: Table) -> None:
        key = table_key(table)
        self.conn.execute("BEGIN TRANSACTION")
        try:
            self.conn.execute(f"DROP TABLE IF EXISTS {self.table_name(table)}")
            self.conn.execute(f"DROP TABLE IF EXISTS {log_table(table.schema, table.name)}")
            self.conn.execute(f"DELETE FROM {q(STATE_SCHEMA, 'slices')} WHERE table_key = ?", [key])
            self.conn.execute(f"DELETE FROM {q(STATE_SCHEMA, 'tables')} WHERE table_key = ?", [key])
            self.conn.execute("COMMIT")
        except BaseException:
            _rollback(self.conn)
            raise

    def reset_cursor(self, slot: str) -> None:
        self.conn.execute(f"DELETE FROM {q(STATE_SCHEMA, 'cursor')} WHERE slot = ?", [slot])

    def row_count(self, table: Table) -> int:
        return int(one(self.conn, f"SELECT count(*) FROM {self.table_name(table)}")[0])  # type: ignore[index]


class _TableFailed(Exception):
    def __init__(self, key: str, first_lsn: int | None, exc: BaseException) -> None:
        self.key, self.first_lsn, self.exc = key, first_lsn, exc

    def describe(self) -> str:
        from pg_replication.source.pgoutput import int_to_lsn

        where = f" at LSN {int_to_lsn(self.first_lsn)}" if self.first_lsn is not None else ""
        first = str(self.exc).splitlines()[0]
        return f"{self.key}{where}: {first}"


def _rollback(conn: duckdb.DuckDBPyConnection) -> None:
    """Roll back unless the failed statement was the COMMIT itself (then nothing is open)."""
    try:
        conn.execute("ROLLBACK")
    except duckdb.TransactionException:
        pass
