"""Replication without a slot: the query strategies (append, updated_at, reload).

Each sync reads the table's watermark from the warehouse, then, in one REPEATABLE READ snapshot
of the source, the new mark and the rows past the old one, and writes rows and mark in one
warehouse transaction. What each strategy sees (README, Strategies):

- append: rows whose primary key is greater than the largest key known to be final: a key is
  final once every transaction running when it was read has ended, so a transaction that commits
  a key below one already copied is still read (``watermarks.advance_append`` has the proof and
  its assumptions; ``append_exactness`` names a table where they cannot hold). No updates, no
  deletes.
- updated_at: rows whose cursor column is at or after the watermark minus ``lookback``, upserted
  by key. The look-back window is needed because a transaction's cursor value is set when the row
  is written, but the row is visible only at commit: a long transaction can commit a cursor value
  older than rows another transaction committed (and a sync read) earlier. No deletes.
- reload: a full copy swapped in atomically, on every sync or on the ``reload_on`` days (also a
  periodic safety net for append/updated_at, which catches deletes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import date, datetime, timezone

from psycopg import sql

from pg_replication.replicate.backfill import current_table
from pg_replication.source.catalog import Table
from pg_replication.source.connection import connect
from pg_replication.source.query_reader import read_where
from pg_replication.source.snapshot import make_plan, read_slice
from pg_replication.source.watermarks import (
    Watermark,
    advance_append,
    append_exactness,
    cursor_mark,
    initial_mark,
    running_transactions,
    since_cursor,
)
from pg_replication.types import SESSION_OPTIONS
from pg_replication.warehouse.base import Warehouse


@dataclass
class SyncResult:
    table: Table
    mode: str  # appended, upserted, reloaded, skipped
    rows: int = 0
    bytes: int = 0
    seconds: float = 0.0
    watermark: Watermark | None = None
    reason: str | None = None
    warning: str | None = None  # append: why it cannot promise to keep every committed row
    documents: dict[str, int] = field(default_factory=dict)  # documents recomputed per set, in the sync's transaction
    document_problems: dict[str, str] = field(default_factory=dict)  # set name: why the sync left it as it was


def reload_due(table: Table, today: date, mark: Watermark) -> bool:
    entry = table.entry
    assert entry is not None
    days = entry.reload_days()
    if days is None:
        return entry.strategy == "reload"
    weekdays, month_days = days
    listed = today.weekday() in weekdays or today.day in month_days
    return listed and mark.reloaded != today.isoformat()


def sync_table(
    conninfo: str,
    warehouse: Warehouse,
    table: Table,
    *,
    today: date | None = None,
    readers: int = 2,
    log: Callable[[str], None] = lambda _m: None,
    documents: Collection[str] | None = None,
) -> SyncResult:
    """One sync of a table with a query strategy; a reload reads with ``readers`` COPY streams.
    The ``documents`` sets (replication.yaml's; None: every set built) whose tree holds the table
    are refreshed by the warehouse's write: in the sync's transaction, or (ClickHouse) built again
    after it."""
    started = time.monotonic()
    entry = table.entry
    assert entry is not None
    status = warehouse.load_state(table).status
    if status != "streaming":
        why = "its backfill is not complete: materialize every partition first" if status == "backfilling" else f"status {status}"
        return SyncResult(table, "skipped", reason=why)
    table = current_table(conninfo, warehouse, table)  # follow new columns
    mark = Watermark.from_json(warehouse.watermark(table))
    today = today or datetime.now(timezone.utc).date()
    reload = reload_due(table, today, mark)
    if entry.strategy == "reload" and not reload:
        return SyncResult(table, "skipped", watermark=mark, reason=f"{today:%a %d}: not a reload_on day, or reloaded already")
    warning = None
    with connect(conninfo, autocommit=False, options=SESSION_OPTIONS) as conn:
        if entry.strategy == "append":  # before this sync's snapshot (advance_append)
            still_running, warning = running_transactions(conn), append_exactness(conn, table)
            conn.commit()
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        lock = sql.SQL("SELECT pg_try_advisory_xact_lock(hashtext({}))").format(sql.Literal(f"pg_replication sync {table.display}"))
        if not conn.execute(lock).fetchone()[0]:  # type: ignore[index]
            return SyncResult(table, "skipped", watermark=mark, reason="another sync of this table is running")
        if reload:
            day = today.isoformat() if entry.reload_on is not None else mark.reloaded
            if entry.strategy == "append":  # its floor and candidate stay true: keep them
                new = Watermark(mark.mark, day, mark.candidate, mark.running)
            else:  # read before the readers' snapshot: rows in between are read again next time
                new = Watermark(initial_mark(conn, table), day)
            whole = make_plan(conn, table, 1, "0/0").slices[0]  # CTID ranges, split among the readers
            rows = read_slice(conninfo, table, whole, readers=readers, mapper=warehouse.map_column)
            try:
                written, mode = warehouse.replace_rows(table, rows, new.to_json(), documents=documents), "reloaded"
            finally:
                rows.close()
        elif entry.strategy == "append":
            where, params, new = advance_append(conn, table, mark, still_running)
            rows = read_where(conn, table, where, params, warehouse.map_column)
            written, mode = warehouse.upsert_rows(table, rows, new.to_json(), documents=documents), "appended"
        else:
            where, params = since_cursor(table, mark.mark, entry.lookback)  # type: ignore[arg-type]
            new = Watermark(cursor_mark(conn, table, where, params, mark.mark), mark.reloaded)  # type: ignore[arg-type]
            rows = read_where(conn, table, where, params, warehouse.map_column)
            written, mode = warehouse.upsert_rows(table, rows, new.to_json(), documents=documents), "upserted"
    result = SyncResult(
        table, mode, written.rows, written.bytes, time.monotonic() - started, new, warning=warning,
        documents=written.documents, document_problems=written.document_problems,
    )
    log(f"{table.display}: {mode} {result.rows:,} rows in {result.seconds:.2f} s (watermark {new.mark})")
    for name, count in result.documents.items():
        log(f"documents {name}: {count:,} recomputed by the sync")
    for problem in result.document_problems.values():
        log(problem)
    return result
