"""Draining trigger-captured changes (strategy ``triggers``) through the CDC apply path.

One drain, in one REPEATABLE READ snapshot of the source: read a bounded batch of change rows
in id order, read the current rows of every key they name (a key that is gone was deleted), fold
them into the same per-table segments pgoutput changes become, and hand them to the warehouse's
``apply_drain`` (apply, or log while the backfill runs; failures isolated per table). Only after
the warehouse committed are those change rows deleted. A crash in between re-reads them, and
re-applying a row's current state is harmless.

Order: rows are read as the snapshot shows them, so per key the last committed state wins; two
writes to one key are serialized by Postgres's row lock, so ids never reorder them.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from pg_replication.replicate.cdc import DrainResult
from pg_replication.replicate.changes import TableBatch, TableOutcome, TableStats
from pg_replication.errors import PgReplicationError
from pg_replication.failpoints import failpoint
from pg_replication.source.catalog import Table, describe_new_columns, refresh_table
from pg_replication.source.connection import connect
from pg_replication.source.snapshot import Mapper
from pg_replication.source.triggers import CHANGES
from pg_replication.types import SESSION_OPTIONS, TypeMapping


@dataclass(frozen=True)
class CaptureSettings:
    position: str = "triggers/changes"  # the warehouse's cursor row (no slot can have this name)
    max_changes: int = 100_000


@dataclass
class _Plan:
    table: Table
    columns: tuple[str, ...]
    mappings: dict[str, TypeMapping]


@dataclass
class _Captured:
    batches: dict[str, TableBatch]
    plans: dict[str, _Plan]
    # The source's WAL position once this drain's snapshot is taken: where a warehouse versions
    # writes by position (ClickHouse), the drain's writes rank by it against slices and other
    # drains (the drained position here is a change id, not an LSN).
    snapshot_lsn: int = 0


def _staged(table: Table, mapper: Mapper, names: list[str]) -> sql.Composable:
    """The staged text of ``names``: the backfill's select expression, as text."""
    by_name = {c.name: c for c in table.columns}
    return sql.SQL(", ").join(sql.SQL("({})::text").format(mapper(by_name[n]).select_sql(n)) for n in names)


def _keys_relation(table: Table) -> sql.Composable:
    """The captured keys (a JSON array of key arrays) as rows typed like the key columns."""
    typed = sql.SQL(", ").join(
        sql.SQL("(x->>{})::{} AS {}").format(sql.Literal(i), sql.SQL(table.column(k).type_sql), sql.Identifier(k))
        for i, k in enumerate(table.primary_key)
    )
    return sql.SQL("(SELECT {} FROM jsonb_array_elements(%s::jsonb) x) AS captured").format(typed)


def _read_table(conn: psycopg.Connection, table: Table, keys: list, mapper: Mapper, batch: TableBatch, truncated: bool) -> None:
    columns = tuple(c.name for c in table.columns)
    segment = batch.segment(columns, tuple(columns.index(k) for k in table.primary_key))
    if truncated:
        segment.truncate()
    if not keys:
        return
    key_names = sql.SQL(", ").join(sql.Identifier(k) for k in table.primary_key)
    touched = conn.execute(
        sql.SQL("SELECT {} FROM {}").format(_staged(table, mapper, list(table.primary_key)), _keys_relation(table)),
        [json.dumps(keys)],
    ).fetchall()
    found = conn.execute(
        sql.SQL("SELECT {} FROM {} WHERE ({}) IN (SELECT {} FROM {})").format(
            _staged(table, mapper, list(columns)), table.ident, key_names, key_names, _keys_relation(table)
        ),
        [json.dumps(keys)],
    ).fetchall()
    for values in found:
        segment.insert(list(values))
    present = {segment.key(list(v)) for v in found}
    for key in touched:
        if tuple(key) not in present:
            segment.delete(tuple(key))


def _fold(conn: psycopg.Connection, table: Table, changes: list, warehouse) -> TableBatch:
    """One table's captured changes as a batch of its current rows."""
    batch = TableBatch()
    keys: dict[str, list] = {}
    truncated = False
    for _, _, _, op, change_key, at in changes:
        if op == "T":
            truncated, keys = True, {}  # rows touched before it are re-read as they are now
            batch.stats.truncated += 1
        else:
            keys[json.dumps(change_key)] = change_key
            batch.stats.inserted += op == "I"
            batch.stats.updated += op == "U"
            batch.stats.deleted += op == "D"
        batch.stats.last_commit_time = at
    _read_table(conn, table, list(keys.values()), warehouse.map_column, batch, truncated)
    return batch


def drain_captured(
    conninfo: str, warehouse, tables: list[Table], settings: CaptureSettings, log: Callable[[str], None] = lambda m: None
) -> DrainResult:
    """Drain one bounded batch of captured changes into ``warehouse``."""
    started = time.monotonic()
    by_name = {(t.schema, t.name): t for t in tables}
    with connect(conninfo, autocommit=False, options=SESSION_OPTIONS) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        locked, snapshot_lsn = conn.execute(  # type: ignore[misc]
            "SELECT pg_try_advisory_xact_lock(hashtext('pg_replication capture drain')), pg_current_wal_lsn() - '0/0'"
        ).fetchone()
        if not locked:
            # An older snapshot committing after a newer one would overwrite newer rows.
            log("another drain of the captured changes is running; this one does nothing")
            return DrainResult(warehouse.drained_lsn(settings.position) or 0)
        rows = conn.execute(
            sql.SQL("SELECT id, schema_name, table_name, op, key, (extract(epoch FROM at) * 1e6)::int8 FROM {} ORDER BY id LIMIT %s").format(CHANGES),
            [settings.max_changes + 1],
        ).fetchall()
        exhausted = len(rows) <= settings.max_changes
        rows = rows[: settings.max_changes]
        grouped: dict[tuple[str, str], list] = defaultdict(list)
        for row in rows:
            grouped[(row[1], row[2])].append(row)
        captured = _Captured({}, {}, snapshot_lsn=int(snapshot_lsn))
        unread: dict[str, TableOutcome] = {}  # tables whose rows could not be read: changes kept
        kept: set[int] = set()
        for name, changes in grouped.items():
            if name not in by_name:
                log(f"{sql.Identifier(*name).as_string()}: {len(changes)} captured changes for a table no longer configured, dropped")
                continue
            table, key = by_name[name], f"{name[0]}.{name[1]}"
            try:
                with conn.transaction():  # a savepoint: one table's failure leaves the others readable
                    table = refresh_table(conn, table)  # follow added columns
                    captured.batches[key] = _fold(conn, table, changes, warehouse)
                    captured.plans[key] = _Plan(table, tuple(c.name for c in table.columns), {c.name: warehouse.map_column(c) for c in table.columns})
            except (psycopg.Error, PgReplicationError) as exc:
                captured.batches.pop(key, None)
                unread[key] = TableOutcome(table, TableStats(), "failed", None, f"{key}: {str(exc).strip().splitlines()[0]}")
                kept.update(r[0] for r in changes)
        last_id = rows[-1][0] if rows else (warehouse.drained_lsn(settings.position) or 0)
        result = DrainResult(last_id, len(rows), 0, 0, exhausted)
        describe_new = lambda table: lambda names: describe_new_columns(conn, table, names)  # noqa: E731
        result.tables = warehouse.apply_drain(captured, last_id, settings.position, describe_new) if captured.batches else {}
        result.tables.update(unread)
        failpoint("after_commit")
        applied = [r[0] for r in rows if r[0] not in kept]
        conn.execute(sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(CHANGES), [applied])
        conn.commit()
    result.seconds = time.monotonic() - started
    for key, outcome in result.failed.items():
        where = "in the change table" if key in unread else "in its change log"
        log(f"{key}: captured changes not applied ({outcome.error}); they wait {where}")
    return result
