"""The warehouse engine: replication state, backfill slices and change batches in portable SQL.

A dialect (``duckdb.py``, ``postgres.py``, ``snowflake.py``) supplies the connection, its type
mapping, how a batch is staged and how staged changes are applied. Everything else lives here
once: the state tables, slice bookkeeping, the change log, schema evolution and the per-table
failure isolation of a drain.

Every write ends in one transaction that holds the data and the state describing it. What a
warehouse cannot do inside a transaction happens before it, idempotently: schema changes, change
logs and staged change batches always (Snowflake commits implicitly on DDL); a slice's batches
are staged inside the transaction where that is allowed (DuckDB, Postgres) and before it
otherwise. A reload loads its copy outside any transaction and swaps it in with one. Writers of
one table's state wait for each other on its state row (``_lock_state``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import replace
from datetime import datetime, timezone

import pyarrow as pa

from pg_replication.errors import (
    ConcurrentDrainError,
    PgReplicationError,
    SchemaChangeError,
    TransientWarehouseError,
    WarehouseError,
    is_transient,
)
from pg_replication.source.catalog import Column, Table
from pg_replication.source.relation_identity import RelationIdentity, identity_problem
from pg_replication.source.recovery import RowReader
from pg_replication.source.snapshot import BackfillPlan, PlanStaleError
from pg_replication.types import TypeMapping, map_column
from pg_replication.warehouse import staging
from pg_replication.warehouse.evolution import DescribeNew, SchemaEvolution
from pg_replication.warehouse.base import SLICE_COLUMN, STATE_SCHEMA, KeyCheck, Progress, SliceResult, TableState, quote
from pg_replication.warehouse.staging import StagedChanges

SEGMENT, COLUMNS = "_segment", "_columns"  # change-log columns beside the staged ones
RECOVERED_SEGMENT = -1  # change-log rows re-read from the source, applied and removed in one transaction


def table_key(table: Table) -> str:
    return f"{table.schema}.{table.name}"


class SqlWarehouse(SchemaEvolution):
    """The engine; a dialect subclass fills in the hooks marked below."""

    name = "sql"
    errors: tuple[type[BaseException], ...] = ()  # the driver's errors: a refused write
    text_type = "TEXT"
    schema_prefix = ""  # warehouse schema = prefix + source schema
    counts_rows_cheaply = True  # count(*) reads metadata, not rows: report it with every micro-batch
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

    def slice_relations(self, table: Table, batches: Iterable[pa.RecordBatch]) -> Iterator[tuple[str, pa.RecordBatch | None]]:
        """The slice's rows as relations of source-named columns, and the batch each holds
        (None when one relation holds all of them). Called before the slice's transaction
        begins; iterated inside it. A generator stages lazily, inside the transaction: a dialect
        that cannot stage there (Snowflake) must stage everything when called."""
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

    def declare_primary_key(self, table: Table) -> None:
        """Called after each slice commit once the backfill is complete (the default declares
        the key in ``create_table``'s place: nothing to do)."""

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

    STATE_TABLES = {  # name: (columns, primary key)
        "tables": (
            (("table_key", "text"), ("plan", "text"), ("columns", "text"), ("status", "text"), ("error", "text"),
             ("applied_lsn", "BIGINT"), ("watermark", "text"), ("updated_at", "DOUBLE PRECISION"),
             # relation identity (source/relation_identity.py): pg_class oid, publication entry, drains covered
             ("relation_oid", "BIGINT"), ("publication_member", "text"), ("covered_lsn", "BIGINT")),
            ("table_key",),
        ),
        "cursor": ((("slot", "text"), ("drained_lsn", "BIGINT"), ("updated_at", "DOUBLE PRECISION")), ("slot",)),
        "slices": (
            (("table_key", "text"), ("slice", "INTEGER"), ("rows", "BIGINT"), ("bytes", "BIGINT"),
             ("seconds", "DOUBLE PRECISION"), ("copied_at", "DOUBLE PRECISION")),
            ("table_key", "slice"),
        ),
    }

    def create_schema(self, name: str) -> None:
        self.execute(f"CREATE SCHEMA IF NOT EXISTS {self.ident(name)}")

    def _ensure_state_tables(self) -> None:
        self.create_schema(STATE_SCHEMA)
        for name, (columns, key) in self.STATE_TABLES.items():
            typed = [(c, self.text_type if t == "text" else t) for c, t in columns]
            cols = ", ".join(f"{self.ident(c)} {t}" for c, t in typed)  # quoted: ROWS is reserved in Snowflake
            keys = ", ".join(self.ident(k) for k in key)
            self.execute(f"CREATE TABLE IF NOT EXISTS {self.state(name)} ({cols}, PRIMARY KEY ({keys}))")
            have = {c.lower() for c in self.physical_columns(STATE_SCHEMA, name) or ()}
            for column, ddl in typed:  # state written by an earlier version: add what it lacks
                if column not in have:
                    self.execute(f"ALTER TABLE {self.state(name)} ADD COLUMN {self.ident(column)} {ddl}")

    def _upsert_state(self, table: str, key: dict, values: dict) -> None:
        """Update the row named by ``key`` or insert it (portable: no ON CONFLICT / MERGE)."""
        where = " AND ".join(f"{self.ident(k)} = ?" for k in key)
        sets = ", ".join(f"{self.ident(c)} = ?" for c in values)
        self.execute(f"UPDATE {self.state(table)} SET {sets} WHERE {where}", [*values.values(), *key.values()])
        names = ", ".join(self.ident(c) for c in (*key, *values))
        marks = ", ".join("?" for _ in (*key, *values))
        self.execute(
            f"INSERT INTO {self.state(table)} ({names}) SELECT {marks} WHERE NOT EXISTS "
            f"(SELECT 1 FROM {self.state(table)} WHERE {where})",
            [*key.values(), *values.values(), *key.values()],
        )

    def _lock_state(self, key: str) -> None:
        """Inside a transaction: writers of one table's state (slices, drains) wait for each other
        here, and read what the one before them committed."""
        self.execute(f"UPDATE {self.state('tables')} SET updated_at = ? WHERE table_key = ?", [time.time(), key])

    def _table_row(self, key: str) -> tuple | None:
        rows = self.fetchall(f"SELECT plan, status, error, columns FROM {self.state('tables')} WHERE table_key = ?", [key])
        return rows[0] if rows else None

    def load_state(self, table: Table) -> TableState:
        row = self._table_row(table_key(table))
        done = self.fetchall(f"SELECT slice FROM {self.state('slices')} WHERE table_key = ?", [table_key(table)])
        plan = BackfillPlan.from_json(row[0]) if row and row[0] else None
        status = (row[1] if row else None) or "backfilling"
        return TableState(table_key(table), plan, frozenset(int(r[0]) for r in done), status)

    def save_plan(
        self, table: Table, plan: BackfillPlan, watermark: str | None = None, identity: dict | None = None
    ) -> BackfillPlan:
        """Store the plan (and a query strategy's starting watermark, and a CDC table's relation
        identity: relation_oid, publication_member, covered_lsn) unless one exists."""
        key = table_key(table)
        row = self._table_row(key)
        if row and row[0]:
            return BackfillPlan.from_json(row[0])
        values = {"plan": plan.to_json(), "watermark": watermark, "updated_at": time.time(), **(identity or {})}
        with self.transaction():
            # Compare-and-set: of two runs planning at once, the first plan stored wins and both use it.
            sets = ", ".join(f"{self.ident(c)} = ?" for c in values)
            self.execute(
                f"UPDATE {self.state('tables')} SET {sets} WHERE table_key = ? AND plan IS NULL", [*values.values(), key]
            )
            if self._table_row(key) is None:
                self._upsert_state("tables", {"table_key": key}, values)
            stored = self._table_row(key)
        return BackfillPlan.from_json(stored[0]) if stored and stored[0] else plan

    def replace_plan(self, table: Table, stale: BackfillPlan, plan: BackfillPlan, rerun: int) -> BackfillPlan:
        """Swap ``plan`` (a re-plan after a rewrite) in for ``stale`` unless another run already
        replaced it; returns the plan now stored. Slice ``rerun``, which the new plan gives pages
        even if it was copied before, counts as not copied until it is copied again."""
        key = table_key(table)
        with self.transaction():
            self._lock_state(key)
            row = self._table_row(key)
            stored = BackfillPlan.from_json(row[0]) if row and row[0] else None
            if stored is not None and stored != stale:
                return stored
            self._upsert_state("tables", {"table_key": key}, {"plan": plan.to_json(), "updated_at": time.time()})
            self.execute(f"DELETE FROM {self.state('slices')} WHERE table_key = ? AND slice = ?", [key, rerun])
        return plan

    def restart_if_gap(self, table: Table, now: RelationIdentity, drained: int) -> str | None:
        """Send a planned table whose stream has a gap (see source/relation_identity.py) back to
        backfilling: its data, plan, slices and change log are dropped, and its status says why.
        Returns the reason, or None (state from before identities were stored adopts ``now``)."""
        key = table_key(table)
        rows = self.fetchall(
            f"SELECT plan, relation_oid, publication_member, covered_lsn FROM {self.state('tables')} WHERE table_key = ?",
            [key],
        )
        if not rows or not rows[0][0]:
            return None
        _, oid, member, covered = rows[0]
        stored = (None if oid is None else int(oid), member, None if covered is None else int(covered))
        reason = identity_problem(table.display, stored, now, drained)
        if reason is None:
            adopt = {"relation_oid": now.oid} if oid is None else {}
            adopt.update({"publication_member": now.member} if member is None and now.member else {})
            adopt.update({"covered_lsn": drained} if covered is None else {})
            if adopt:
                self._upsert_state("tables", {"table_key": key}, adopt)
            return None
        self.reset_table(table)
        self.set_status(key, "backfilling", f"backfill restarted: {reason}")
        return reason

    def _advance_coverage(self, keys: Sequence[str], drained: int, target: int) -> None:
        """Inside the drain's transaction: the tables this drain included are covered up to
        ``target``, provided no earlier drain skipped them (covered from ``drained`` on)."""
        if keys:
            marks = ", ".join("?" for _ in keys)
            self.execute(
                f"UPDATE {self.state('tables')} SET covered_lsn = ? WHERE table_key IN ({marks}) AND covered_lsn >= ?",
                [target, *keys, drained],
            )

    def stored_columns(self, key: str) -> dict[str, dict[str, str]]:
        """{name: {"type": warehouse type, "load": expression}} of the table's warehouse columns."""
        row = self._table_row(key)
        columns = json.loads(row[3]) if row and row[3] else {}
        for column in columns.values():  # written by an earlier version, which said "duckdb"
            column.setdefault("type", column.get("duckdb"))
        return columns

    def stored_mappings(self, table: Table) -> dict[str, TypeMapping]:
        """The warehouse's columns as mappings of staged text (what the change log holds)."""
        return {
            name: TypeMapping(pa.string(), c["type"], load=c["load"])
            for name, c in self.stored_columns(table_key(table)).items()
        }

    def _store_columns(self, key: str, columns: dict) -> None:
        self._upsert_state("tables", {"table_key": key}, {"columns": json.dumps(columns), "updated_at": time.time()})

    def set_status(self, key: str, status: str, error: str | None = None) -> None:
        self._upsert_state("tables", {"table_key": key}, {"status": status, "error": error, "updated_at": time.time()})

    def statuses(self) -> dict[str, tuple[str, str | None]]:
        rows = self.fetchall(f"SELECT table_key, status, error FROM {self.state('tables')}")
        return {k: (s or "backfilling", e) for k, s, e in rows}

    def drained_lsn(self, slot: str) -> int | None:
        rows = self.fetchall(f"SELECT drained_lsn FROM {self.state('cursor')} WHERE slot = ?", [slot])
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    def seconds_since_drain(self, slot: str) -> float | None:
        rows = self.fetchall(f"SELECT updated_at FROM {self.state('cursor')} WHERE slot = ?", [slot])
        return time.time() - float(rows[0][0]) if rows and rows[0][0] is not None else None

    def seconds_since_write(self, table: Table) -> float | None:
        """Since the table's state was last written (its last sync, for the query strategies)."""
        rows = self.fetchall(f"SELECT updated_at FROM {self.state('tables')} WHERE table_key = ?", [table_key(table)])
        return time.time() - float(rows[0][0]) if rows and rows[0][0] is not None else None

    def set_drained_lsn(self, slot: str, lsn: int) -> None:
        self._upsert_state("cursor", {"slot": slot}, {"drained_lsn": lsn, "updated_at": time.time()})

    def _claim_cursor(self, slot: str, expected: int) -> None:
        """Inside the drain's transaction, before anything is applied: the drained position is
        still the one this drain started from (compare-and-set; the row lock makes a concurrent
        drain wait here and then see ours). Otherwise another drain committed first, and applying
        this batch would move the position backwards and replay older changes over newer ones."""
        self.execute(f"UPDATE {self.state('cursor')} SET updated_at = ? WHERE slot = ?", [time.time(), slot])
        stored = self.drained_lsn(slot) or 0
        if stored != expected:
            from pg_replication.source.pgoutput import int_to_lsn

            raise ConcurrentDrainError(
                f"slot {slot!r}: another drain committed up to {int_to_lsn(stored)} while this one read from "
                f"{int_to_lsn(expected)}",
                lsn=int_to_lsn(stored),
            )

    def reopen_for_rerun(self, table: Table, index: int) -> None:
        """Before a slice's snapshot is taken: the slice counts as not copied until this copy
        commits, and a streaming table's drains log its changes from now on. So no change applied
        after the snapshot can be overwritten by it, and no other slice can complete the backfill
        (and start applying) while it runs; the copy that completes it replays the log and
        streams again. A re-run that dies leaves the table backfilling, its slice missing."""
        key = table_key(table)
        with self.transaction():
            self._lock_state(key)  # waits for a drain applying to it: its changes precede the snapshot
            self.execute(f"DELETE FROM {self.state('slices')} WHERE table_key = ? AND slice = ?", [key, index])
            if self.statuses().get(key, ("backfilling", None))[0] == "streaming":
                self.set_status(key, "backfilling")

    def report(self) -> list[dict]:
        """Per table: status, error, applied LSN, backfill slices done, plan size, last update."""
        done: dict[str, int] = {}
        for key, _ in self.fetchall(f"SELECT table_key, slice FROM {self.state('slices')}"):
            done[key] = done.get(key, 0) + 1
        report = []
        for key, status, error, lsn, plan, updated in sorted(
            self.fetchall(f"SELECT table_key, status, error, applied_lsn, plan, updated_at FROM {self.state('tables')}")
        ):
            report.append(
                {
                    "table": key,
                    "status": status or "backfilling",
                    "error": error,
                    "applied_lsn": lsn,
                    "partitions": BackfillPlan.from_json(plan).partitions if plan else None,
                    "slices_done": done.get(key, 0),
                    "updated_at": datetime.fromtimestamp(float(updated), timezone.utc) if updated else None,
                }
            )
        return report

    def reset_table(self, table: Table) -> None:
        self.execute(f"DROP TABLE IF EXISTS {self.table_name(table)}")
        self.execute(f"DROP TABLE IF EXISTS {self.state(self.log_name(table))}")
        self.execute(f"DROP TABLE IF EXISTS {self.state(f'reload.{table.schema}.{table.name}')}")
        with self.transaction():
            self.execute(f"DELETE FROM {self.state('slices')} WHERE table_key = ?", [table_key(table)])
            self.execute(f"DELETE FROM {self.state('tables')} WHERE table_key = ?", [table_key(table)])

    def retry_table(self, table: Table, describe_new: DescribeNew, read_rows: RowReader | None) -> int:
        """A failed table, its cause fixed: follow the source's columns (DDL, as a drain's
        prepare), then replay its change log and set it streaming in one transaction. Returns the
        changes replayed. Fails (the table stays failed, its log kept) if the cause is not fixed."""
        key = table_key(table)
        status, error = self.statuses().get(key, (None, None))
        if status != "failed":
            raise PgReplicationError(
                f"{table.display} is not failed (status: {status or 'not started'}): nothing to retry",
                table=table.display,
                hint="see `pg-replication status`; retry replays the change log of a failed table",
            )
        try:
            added = self.add_columns(table, dict(self.column_mappings(table)), describe_new)
            self.prepare_replay(table)
            with self.transaction():
                self._lock_state(key)
                if added:
                    self._store_columns(key, {**self.stored_columns(key), **added})
                replayed = self.replay_log(table, read_rows)
                self.set_status(key, "streaming")
        except (*self.errors, PgReplicationError) as exc:
            if isinstance(exc, PgReplicationError) and not isinstance(exc, WarehouseError):
                raise
            raise WarehouseError(
                f"{table.display}: retry failed, the table stays failed with its change log kept: "
                + str(exc).strip().splitlines()[0],
                table=table.display,
                hint=f"the cause is not fixed yet (it failed with: {error}); fix it and retry, or resync the table",
            ) from exc
        return replayed

    def reset_cursor(self, slot: str) -> None:
        self.execute(f"DELETE FROM {self.state('cursor')} WHERE slot = ?", [slot])

    def has_state(self) -> bool:
        return self.physical_columns(STATE_SCHEMA, "tables") is not None

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

    def read_table(self, schema: str, name: str) -> pa.Table:
        """The replicated table (its source columns) as Arrow, for downstream assets."""
        columns = list(self.stored_columns(f"{schema}.{name}"))
        rows = self.fetchall(f"SELECT {', '.join(self.ident(c) for c in columns)} FROM {self.ident(self.schema_prefix + schema, name)}")
        return pa.table({c: [r[i] for r in rows] for i, c in enumerate(columns)})

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

    def write_slice(
        self,
        table: Table,
        index: int,
        batches: Iterable[pa.RecordBatch],
        progress: Progress | None = None,
        still_in_source: KeyCheck | None = None,
        read_rows: RowReader | None = None,
        plan: BackfillPlan | None = None,
    ) -> SliceResult:
        """Replace the slice's rows; rows it held before that the source no longer has are
        deleted, rows an update moved elsewhere stay. When this completes the backfill, the
        table's change log is replayed and the table starts streaming, in the same transaction.
        ``plan``: the plan the slice was read under; PlanStaleError when another run re-planned
        meanwhile (its pages may now belong to this slice)."""
        target = self.table_name(table)
        previous = -1 - index  # rows this slice wrote before, until the new copy replaces them
        started = time.monotonic()
        relations = self.slice_relations(table, batches)
        try:
            with self.transaction():
                self._lock_state(table_key(table))  # the slice that completes the backfill sees every other
                stored = self.load_state(table).plan
                if plan is not None and stored is not None and stored != plan:
                    raise PlanStaleError(
                        f"{table.display}: slice {index} was read under a plan another run has replaced",
                        table=table.display,
                        lsn=plan.lsn,
                    )
                self.execute(f"UPDATE {target} SET {self.ident(SLICE_COLUMN)} = ? WHERE {self.ident(SLICE_COLUMN)} = ?", [previous, index])
                rows, nbytes = self._load_rows(table, target, relations, index, f"slice {index}", progress)
                self._settle_leftovers(table, previous, still_in_source)
                self._upsert_state(
                    "slices",
                    {"table_key": table_key(table), "slice": index},
                    {"rows": rows, "bytes": nbytes, "seconds": time.monotonic() - started, "copied_at": time.time()},
                )
                self._start_streaming_when_complete(table, read_rows)
        finally:
            relations.close()  # type: ignore[attr-defined]
        if self.load_state(table).status == "streaming":
            self.declare_primary_key(table)
        return SliceResult(rows, nbytes)

    def upsert_rows(self, table: Table, batches: Iterable[pa.RecordBatch], watermark: str | None) -> SliceResult:
        """Insert the rows, replacing any with the same key, and store the table's new
        watermark, in one transaction (the append and updated_at strategies)."""
        relations = self.slice_relations(table, batches)
        try:
            with self.transaction():
                rows, nbytes = self._load_rows(table, self.table_name(table), relations, None, "a sync")
                self._set_watermark(table, watermark)
        finally:
            relations.close()  # type: ignore[attr-defined]
        return SliceResult(rows, nbytes)

    def replace_rows(self, table: Table, batches: Iterable[pa.RecordBatch], watermark: str | None) -> SliceResult:
        """A full refresh: the new copy is loaded beside the table, then swapped in by one
        transaction, so a reader sees the old rows or the new ones, never a half-loaded table."""
        target, copy = self.table_name(table), self.state(f"reload.{table.schema}.{table.name}")
        self.execute(f"DROP TABLE IF EXISTS {copy}")
        self.execute(f"CREATE TABLE {copy} AS SELECT * FROM {target} WHERE 1 = 0")
        try:
            relations = self.slice_relations(table, batches)
            try:
                rows, nbytes = self._load_rows(table, copy, relations, None, "a reload", evict=False)
            finally:
                relations.close()  # type: ignore[attr-defined]
            with self.transaction():
                self.execute(f"DELETE FROM {target}")
                self.execute(f"INSERT INTO {target} SELECT * FROM {copy}")
                self._set_watermark(table, watermark)
        finally:
            self.execute(f"DROP TABLE IF EXISTS {copy}")
        return SliceResult(rows, nbytes)

    def _set_watermark(self, table: Table, watermark: str | None) -> None:
        self._upsert_state("tables", {"table_key": table_key(table)}, {"watermark": watermark, "updated_at": time.time()})

    def watermark(self, table: Table) -> str | None:
        """How far a query strategy has read (its own JSON), None before the first time."""
        rows = self.fetchall(f"SELECT watermark FROM {self.state('tables')} WHERE table_key = ?", [table_key(table)])
        return rows[0][0] if rows else None

    def _load_rows(
        self,
        table: Table,
        target: str,
        relations,
        slice_value: int | None,
        what: str,
        progress: Progress | None = None,
        evict: bool = True,
    ) -> tuple[int, int]:
        """Insert staged source rows into ``target``, first deleting rows with the same keys (a
        row an update moved here from another slice's pages is still stored under that slice);
        ``evict=False`` for a target that starts empty."""
        mappings = dict(self.column_mappings(table))
        names = ", ".join([self.ident(n) for n in mappings] + [self.ident(SLICE_COLUMN)])
        keys = ", ".join(self.ident(k) for k in table.primary_key)
        tag = "NULL" if slice_value is None else str(int(slice_value))
        select = ", ".join([m.load_sql(self.ident(n)) for n, m in mappings.items()] + [tag])
        staged_keys = ", ".join(mappings[k].load_sql(self.ident(k)) for k in table.primary_key)
        rows = nbytes = 0
        for relation, batch in relations:
            try:
                if evict:
                    self.execute(f"DELETE FROM {target} WHERE ({keys}) IN (SELECT {staged_keys} FROM {relation})")
                self.execute(f"INSERT INTO {target} ({names}) SELECT {select} FROM {relation}")
            except self.errors as exc:
                where = f"rows {rows}..{rows + batch.num_rows}" if batch is not None else "its rows"
                raise WarehouseError(
                    f"{table.display}: the {self.name} warehouse refused {what} at {where}: "
                    + str(exc).strip().splitlines()[0],
                    table=table.display,
                    hint="if a value does not fit its warehouse type (e.g. NaN in numeric(p,s)), "
                    "see README, Type mapping; nothing of this write was committed",
                ) from None
            if batch is not None:
                rows += batch.num_rows
                nbytes += batch.nbytes
            else:
                rows += int(self.fetchall(f"SELECT count(*) FROM {relation}")[0][0])
            if progress is not None:
                progress(rows, nbytes)
        return rows, nbytes

    def _settle_leftovers(self, table: Table, marker: int, still_in_source: KeyCheck | None) -> None:
        """Rows the slice held before but not now: deleted in the source, or moved by an update to
        another slice's pages. Only the source can tell: deleted rows go, moved rows stay."""
        target = self.table_name(table)
        keys = [self.ident(k) for k in table.primary_key]
        slice_column = self.ident(SLICE_COLUMN)
        leftovers = self.fetchall(f"SELECT {', '.join(keys)} FROM {target} WHERE {slice_column} = ?", [marker])
        if leftovers:
            alive = still_in_source(leftovers) if still_in_source is not None else set()
            self.delete_keys(table, [tuple(k) for k in leftovers if tuple(k) not in alive])
        self.execute(f"UPDATE {target} SET {slice_column} = NULL WHERE {slice_column} = ?", [marker])

    def delete_keys(self, table: Table, keys: list[tuple]) -> None:
        """Delete rows by primary key values as the warehouse returned them (few: rows deleted
        in the source while the backfill ran)."""
        where = " AND ".join(f"{self.ident(k)} = ?" for k in table.primary_key)
        for key in keys:
            self.execute(f"DELETE FROM {self.table_name(table)} WHERE {where}", list(key))

    def _start_streaming_when_complete(self, table: Table, read_rows: RowReader | None) -> None:
        state = self.load_state(table)
        if state.plan is None or len(state.slices_done) < state.plan.partitions or state.status != "backfilling":
            return
        self.replay_log(table, read_rows)
        self.set_status(table_key(table), "streaming")

    # -- the change log ---------------------------------------------------------------------

    def ensure_log(self, table: Table, columns: Sequence[str]) -> list[str]:
        """DDL: the table's change log, able to hold ``columns``; returns its data columns."""
        name = self.log_name(table)
        have = self.physical_columns(STATE_SCHEMA, name)
        if have is None:
            fills = "".join(f", {self.ident(staging.fill_column(i))} {self.text_type}" for i in range(len(table.primary_key)))
            t = self.text_type
            self.execute(
                f"""CREATE TABLE IF NOT EXISTS {self.state(name)} ({self.ident(staging.SEQ)} BIGINT, {self.ident(SEGMENT)} BIGINT,
                    {self.ident(COLUMNS)} {t}, {self.ident(staging.OP)} {t}, {self.ident(staging.UNKNOWN)} {t}{fills})"""
            )
            have = self.physical_columns(STATE_SCHEMA, name) or []
        folded = set(have)
        for column in columns:
            if self.fold(column) not in folded:
                self.execute(f"ALTER TABLE {self.state(name)} ADD COLUMN {self.ident(column)} {self.text_type}")
        return list(columns)

    def append_log(self, table: Table, changes: StagedChanges) -> None:
        """Append a staged segment to the table's change log, folded per key so the log stays
        bounded (one row per key and column set, not one per change):

        - a segment that starts with a TRUNCATE replaces the whole log: nothing before it matters;
        - a segment with the column set of the log's last segment is merged into it (``_fold_log``);
        - otherwise it becomes a new segment, replayed after the others.
        """
        log = self.state(self.log_name(table))
        seq_column, segment_column = self.ident(staging.SEQ), self.ident(SEGMENT)
        if changes.truncated:
            self.execute(f"DELETE FROM {log}")
        row = self.fetchall(f"SELECT coalesce(max({seq_column}), 0), coalesce(max({segment_column}), 0) FROM {log}")[0]
        seq, last = int(row[0]) + 1, int(row[1])
        columns_json = json.dumps(changes.columns)
        same = last > 0 and self.fetchall(
            f"SELECT count(*) FROM {log} WHERE {segment_column} = ? AND {self.ident(COLUMNS)} = ?", [last, columns_json]
        )[0][0]
        fills = [self.ident(staging.fill_column(i)) for i in range(len(table.primary_key))]
        names = [seq_column, segment_column, self.ident(COLUMNS), self.ident(staging.OP), self.ident(staging.UNKNOWN), *fills]
        names += [self.ident(c) for c in changes.columns]
        values = [f"{self.ident(staging.SEQ)} + {seq}", str(last + 1), "?", self.ident(staging.OP), self.ident(staging.UNKNOWN), *fills]
        values += [self.ident(staging.value_column(i)) for i in range(len(changes.columns))]
        self.execute(
            f"INSERT INTO {log} ({', '.join(names)}) SELECT {', '.join(values)} FROM {changes.relation}",
            [columns_json],
        )
        if same:
            self._fold_log(table, changes.columns, last, last + 1)

    def _fold_log(self, table: Table, columns: Sequence[str], into: int, new: int) -> None:
        """Merge logged segment ``new`` into ``into`` (same columns): replaying the merged segment
        leaves the table as replaying both in order would.

        1. A row of ``new`` that keeps warehouse values (unchanged TOAST) and names a row ``into``
           upserts takes the values that row knows, and the rest from where that row takes them
           (its fill key): by then the warehouse holds ``into``'s version, not the one it starts from.
        2. The rows of ``into`` whose key ``new`` writes or deletes go: ``new``'s row is the last word.
        3. ``new``'s rows join ``into``.
        """
        log = self.state(self.log_name(table))
        op, unknown, segment = self.ident(staging.OP), self.ident(staging.UNKNOWN), self.ident(SEGMENT)
        width = len(table.primary_key)
        sets = []
        flags = []
        for i, name in enumerate(columns):
            col = self.ident(name)
            keeps = f"substr(n.{unknown}, {i + 1}, 1) = '1'"
            knows = f"(l.{unknown} IS NULL OR substr(l.{unknown}, {i + 1}, 1) <> '1')"
            sets.append(f"{col} = CASE WHEN {keeps} AND {knows} THEN l.{col} ELSE n.{col} END")
            flags.append(f"CASE WHEN {keeps} AND NOT {knows} THEN '1' ELSE '0' END")
        sets.append(f"{unknown} = {' || '.join(flags)}")
        sets += [f"{self.ident(staging.fill_column(j))} = l.{self.ident(staging.fill_column(j))}" for j in range(width)]
        join = " AND ".join(
            f"l.{self.ident(k)} = n.{self.ident(staging.fill_column(j))}" for j, k in enumerate(table.primary_key)
        )
        self.execute(
            f"UPDATE {log} AS n SET {', '.join(sets)} FROM {log} AS l "
            f"WHERE n.{segment} = {int(new)} AND n.{op} = 'U' AND n.{unknown} LIKE '%1%' "
            f"AND l.{segment} = {int(into)} AND l.{op} = 'U' AND {join}"
        )
        keys = ", ".join(self.ident(k) for k in table.primary_key)
        self.execute(
            f"DELETE FROM {log} WHERE {segment} = {int(into)} AND {op} <> 'T' AND ({keys}) IN "
            f"(SELECT {keys} FROM {log} WHERE {segment} = {int(new)} AND {op} <> 'T')"
        )
        self.execute(f"UPDATE {log} SET {segment} = {int(into)} WHERE {segment} = {int(new)}")

    def replay_log(self, table: Table, read_rows: RowReader | None = None) -> int:
        """Apply every logged segment in order, then empty the log. Returns the rows replayed."""
        name = self.log_name(table)
        if self.physical_columns(STATE_SCHEMA, name) is None:
            return 0
        log = self.state(name)
        mappings = self.stored_mappings(table)
        defaults = self.defaults(table, tuple(c.name for c in table.columns))
        replayed = 0
        segment_column, columns_column = self.ident(SEGMENT), self.ident(COLUMNS)
        for segment, columns_json, rows, truncates in self.fetchall(
            f"""SELECT {segment_column}, {columns_column}, count(*), sum(CASE WHEN {self.ident(staging.OP)} = 'T' THEN 1 ELSE 0 END)
                FROM {log} GROUP BY {segment_column}, {columns_column} ORDER BY 1"""
        ):
            logged = json.loads(columns_json)
            pairs = [(c, now) for c, now in zip(logged, self.current_names(table, logged)) if now in mappings]
            relation = self._log_segment(table, int(segment), [c for c, _ in pairs])
            changes = StagedChanges(relation, tuple(now for _, now in pairs), bool(truncates), int(rows), defaults=defaults)
            self.apply_segment(table, changes, mappings, read_rows)
            replayed += int(rows)
        self.execute(f"DELETE FROM {log}")
        return replayed

    def _log_segment(self, table: Table, segment: int, columns: Sequence[str]) -> str:
        """One logged segment as a staged relation (see staging.py); ``columns`` are the log's
        column names (a renamed column's are its old name)."""
        fills = [self.ident(staging.fill_column(i)) for i in range(len(table.primary_key))]
        values = [f"{self.ident(c)} AS {self.ident(staging.value_column(i))}" for i, c in enumerate(columns)]
        return (
            f"(SELECT {self.ident(staging.OP)}, {self.ident(staging.UNKNOWN)}, {', '.join(fills)}, "
            f"{', '.join(values)} FROM {self.state(self.log_name(table))} WHERE {self.ident(SEGMENT)} = {int(segment)})"
        )

    def apply_segment(
        self, table: Table, changes: StagedChanges, mappings: dict[str, TypeMapping], read_rows: RowReader | None
    ) -> None:
        """Apply one staged segment inside the caller's transaction. Upserts that keep a value the
        warehouse does not hold (its row is missing) are completed from the source's current row
        (``read_rows``): a version at or after the change, so later changes converge on it."""
        target = self.table_name(table)
        orphans: list[tuple] = []
        if changes.unknowns:
            orphans = [tuple(r) for r in self.fetchall(staging.orphaned_fills(changes, target, mappings, table.primary_key, self.ident))]
        self.apply_changes(table, changes, mappings)
        if not orphans:
            return
        if read_rows is None:
            raise WarehouseError(
                f"{table.display}: {len(orphans)} change(s) keep a value of a row the warehouse does not hold, "
                "and no source is at hand to read it",
                table=table.display,
                hint="resync the table (pg-replication resync TABLE)",
            )
        self._apply_recovered(table, changes.columns, orphans, read_rows(changes.columns, orphans), mappings)

    def _apply_recovered(self, table: Table, columns: tuple[str, ...], keys: list[tuple], found: dict, mappings) -> None:
        """Rewrite ``keys`` with the rows the source has now (deleting the ones it no longer has),
        staged through the change log so every dialect applies them inside the transaction."""
        log = self.state(self.log_name(table))
        position = {name: i for i, name in enumerate(columns)}
        width = len(table.primary_key)
        rows = []
        for seq, key in enumerate(keys):
            values = found.get(key)
            if values is None:  # deleted since: a later change in the slot says so as well
                values = [None] * len(columns)
                for k, v in zip(table.primary_key, key):
                    values[position[k]] = v
                rows.append([seq, RECOVERED_SEGMENT, json.dumps(columns), "D", None, *([None] * width), *values])
            else:
                rows.append([seq, RECOVERED_SEGMENT, json.dumps(columns), "U", None, *key, *values])
        names = [staging.SEQ, SEGMENT, COLUMNS, staging.OP, staging.UNKNOWN]
        names += [staging.fill_column(i) for i in range(width)] + list(columns)
        marks = "(" + ", ".join("?" for _ in names) + ")"
        for start in range(0, len(rows), 200):
            chunk = rows[start : start + 200]
            self.execute(
                f"INSERT INTO {log} ({', '.join(self.ident(n) for n in names)}) VALUES {', '.join(marks for _ in chunk)}",
                [v for row in chunk for v in row],
            )
        relation = self._log_segment(table, RECOVERED_SEGMENT, columns)
        self.apply_changes(table, StagedChanges(relation, columns, False, len(rows), unknowns=False), mappings)
        self.execute(f"DELETE FROM {log} WHERE {self.ident(SEGMENT)} = ?", [RECOVERED_SEGMENT])

    # -- CDC --------------------------------------------------------------------------------

    def apply_drain(
        self,
        decoded,
        target_lsn: int,
        slot: str,
        describe_new: Callable[[Table], DescribeNew],
        read_rows: Callable[[Table], RowReader] | None = None,
        log: Callable[[str], None] = lambda message: None,
    ) -> dict:
        """Apply (streaming tables) or log (the rest) every table's changes, and record the
        drained LSN, in one transaction. A table whose apply fails for good is marked failed and
        logged instead, and the transaction is retried without it. A transient error (see
        errors.is_transient) rolls the whole transaction back and retries it after a wait; when
        it persists, TransientWarehouseError: nothing applied, no table marked failed."""
        resynced: dict[str, str] = {}  # tables reset by on_schema_change: resync (DDL: done once)
        for attempt, delay in enumerate((*self.transient_delays, None)):
            try:
                return self._apply_drain_attempt(decoded, target_lsn, slot, describe_new, read_rows, resynced, log)
            except Exception as exc:
                if not isinstance(exc, _TableTransient) and not is_transient(exc):
                    raise
                failure = exc if isinstance(exc, _TableTransient) else _TableTransient(None, None, exc)
                if delay is None:
                    raise TransientWarehouseError(
                        f"{failure.describe()} (a passing error: tried {attempt + 1} times over "
                        f"{sum(self.transient_delays):g} s); nothing was applied and no table was marked failed",
                        table=failure.key,
                        lsn=failure.lsn_text(),
                    ) from failure.exc
                log(f"{failure.describe()}: transient, retrying the drain in {delay:g} s")
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _apply_drain_attempt(self, decoded, target_lsn, slot, describe_new, read_rows, resynced, log) -> dict:
        from pg_replication.cdc import failpoint

        statuses = self.statuses()
        failed_now: dict[str, str] = {}
        staged: dict[str, list[StagedChanges]] = {}
        pending: dict[str, dict] = {}  # columns each table's stored state gains in the transaction
        names: list[str] = []
        try:
            for key, batch in decoded.batches.items():
                plan = decoded.plans[key]
                status = statuses.get(key, ("backfilling", None))[0]
                staged[key] = []
                for n, segment in enumerate(batch.segments):
                    name = f"pgr_changes_{len(names)}"
                    names.append(name)
                    relation = self.stage(name, staging.segment_table(segment, len(plan.table.primary_key)))
                    staged[key].append(
                        StagedChanges(relation, segment.columns, segment.truncated, len(segment.rows), segment.has_unknowns)
                    )
                try:
                    pending[key] = self.prepare_table(plan, status, describe_new(plan.table))
                except (*self.errors, PgReplicationError) as exc:
                    if is_transient(exc):
                        raise _TableTransient(key, batch.stats.first_lsn, exc) from exc
                    if isinstance(exc, SchemaChangeError) and _on_schema_change(plan.table) == "resync":
                        resynced[key] = self._resync(plan.table, _describe_failure(key, batch.stats.first_lsn, exc))
                        log(f"{key}: {resynced[key]}")
                    else:
                        failed_now[key] = _describe_failure(key, batch.stats.first_lsn, exc)
                    self.ensure_log(plan.table, plan.columns)
            while True:
                try:
                    outcomes = self._apply_drain_once(decoded, staged, pending, failed_now, target_lsn, slot, failpoint, read_rows)
                    for key, reason in resynced.items():
                        if key in outcomes:
                            outcomes[key] = replace(outcomes[key], mode="resynced", error=reason)
                    return outcomes
                except _TableFailed as failure:
                    failed_now[failure.key] = failure.describe()
                    self.ensure_log(decoded.plans[failure.key].table, decoded.plans[failure.key].columns)
        finally:
            for name in names:
                self.unstage(name)

    def _resync(self, table: Table, reason: str) -> str:
        """on_schema_change: resync. Reset the table (its backfill runs again) instead of failing it."""
        self.reset_table(table)
        message = f"resynced after a schema change it cannot follow ({reason}); materialize all its partitions to backfill it again"
        self.set_status(table_key(table), "backfilling", message)
        return message

    def prepare_table(self, plan, status: str, describe_new: DescribeNew) -> dict:
        """DDL before the transaction: the warehouse table follows the relation's columns, the
        change log can hold them. Returns the columns the stored state gains."""
        added = {}
        if status != "failed" and self.physical_columns(self.schema_of(plan.table), plan.table.name) is not None:
            added = self.add_columns(plan.table, {n: plan.mappings[n] for n in plan.columns}, describe_new)
        self.ensure_log(plan.table, plan.columns)  # streaming tables too: values re-read from the source pass through it
        return added

    def _apply_drain_once(self, decoded, staged, pending, failed_now, target_lsn, slot, failpoint, read_rows) -> dict:
        from pg_replication.cdc import TableOutcome

        outcomes = {}
        self.begin()
        try:
            expected = getattr(decoded, "drained_before", None)  # the slot drain's start; capture serializes itself
            if expected is not None:
                self._claim_cursor(slot, expected)
            for key in decoded.batches:
                self._lock_state(key)
            statuses = self.statuses()  # after the locks: a backfill that just completed is seen
            for key, batch in decoded.batches.items():
                plan = decoded.plans[key]
                status, error = statuses.get(key, ("backfilling", None))
                if key in failed_now:
                    status, error = "failed", failed_now[key]
                added = pending.get(key) if status != "failed" else None
                if added:
                    self._store_columns(key, {**self.stored_columns(key), **added})
                if status == "streaming":
                    try:
                        reader = read_rows(plan.table) if read_rows is not None else None
                        defaults = self.defaults(plan.table, plan.columns)
                        for changes in staged[key]:
                            columns = self.current_names(plan.table, changes.columns)
                            mappings = {**plan.mappings, **{n: plan.mappings[o] for o, n in zip(changes.columns, columns)}}
                            changes = replace(changes, columns=columns, defaults=defaults)
                            self.apply_segment(plan.table, changes, mappings, reader)
                    except (*self.errors, PgReplicationError) as exc:
                        if is_transient(exc):
                            raise _TableTransient(key, batch.stats.first_lsn, exc) from exc
                        raise _TableFailed(key, batch.stats.first_lsn, exc) from None
                    applied = {"applied_lsn": batch.stats.last_lsn} if batch.stats.last_lsn is not None else {}
                    self._upsert_state("tables", {"table_key": key}, {**applied, "updated_at": time.time()})
                    rows_now = self.row_count(plan.table) if self.counts_rows_cheaply else None
                    outcomes[key] = TableOutcome(plan.table, batch.stats, "applied", rows_now)
                    continue
                for changes in staged[key]:
                    self.append_log(plan.table, changes)
                if key in failed_now:
                    self.set_status(key, "failed", error)  # once: later drains find it failed and hold its changes
                mode = "failed" if key in failed_now else "held" if status == "failed" else "logged"
                outcomes[key] = TableOutcome(plan.table, batch.stats, mode, None, error)
            failpoint("mid_apply")
            self._advance_coverage(getattr(decoded, "covered", ()), getattr(decoded, "drained_before", 0), target_lsn)
            self.set_drained_lsn(slot, target_lsn)
            self.commit()
            return outcomes
        except BaseException:
            with suppress(*self.errors):  # a lost connection cannot roll back: the original error tells
                self.rollback()
            raise


def _on_schema_change(table: Table) -> str:
    return getattr(table.entry, "on_schema_change", None) or "fail"


class _TableTransient(Exception):
    """A transient error while one table (or, with key None, the drain) was applied."""

    def __init__(self, key: str | None, first_lsn: int | None, exc: BaseException) -> None:
        super().__init__(key, first_lsn, exc)
        self.key, self.first_lsn, self.exc = key, first_lsn, exc

    def describe(self) -> str:
        return _describe_failure(self.key or "the drain", self.first_lsn, self.exc)

    def lsn_text(self) -> str | None:
        from pg_replication.source.pgoutput import int_to_lsn

        return int_to_lsn(self.first_lsn) if self.first_lsn is not None else None


class _TableFailed(Exception):
    def __init__(self, key: str, first_lsn: int | None, exc: BaseException) -> None:
        self.key, self.first_lsn, self.exc = key, first_lsn, exc

    def describe(self) -> str:
        return _describe_failure(self.key, self.first_lsn, self.exc)


def _describe_failure(key: str, first_lsn: int | None, exc: BaseException) -> str:
    from pg_replication.source.pgoutput import int_to_lsn

    where = f" at LSN {int_to_lsn(first_lsn)}" if first_lsn is not None else ""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{key}{where}: {first}"
