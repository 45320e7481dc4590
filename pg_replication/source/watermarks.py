"""How far a query strategy has read, in the source's own terms, and the predicate for what is
new. Values are Postgres's text output (ISO dates, UTC) and go back through casts to the
column's own type, so Postgres does every comparison: key order, collations, time zones.

A watermark is stored as JSON: ``{"mark": <value or list of key values>, "reloaded": "YYYY-MM-DD"}``;
an append table's also holds ``candidate`` (a larger key) and ``running`` (the transactions that
were running when it was read): see ``advance_append``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace

import psycopg
from psycopg import sql

from pg_replication.errors import SourceNotReadyError
from pg_replication.source.catalog import Table

_NUMERIC = {"int2", "int4", "int8", "numeric", "float4", "float8"}


@dataclass(frozen=True)
class Watermark:
    mark: str | list[str] | None = None
    reloaded: str | None = None  # the last reload_on day a full reload ran
    candidate: list[str] | None = None  # append: the next mark, once ``running`` have all ended
    running: list[str] | None = None  # append: virtual transaction ids running when it was read

    @classmethod
    def from_json(cls, text: str | None) -> Watermark:
        return cls(**json.loads(text)) if text else cls()

    def to_json(self) -> str:
        data = {"mark": self.mark, "reloaded": self.reloaded}
        if self.candidate is not None:
            data |= {"candidate": self.candidate, "running": self.running}
        return json.dumps(data)


def _cast(table: Table, column: str) -> sql.Composable:
    return sql.SQL(table.column(column).type_sql)  # format_type() output: catalog text, not user input


def initial_mark(conn: psycopg.Connection, table: Table) -> str | list[str] | None:
    """The strategy's mark over the whole table now (None for strategies without one). For
    append, it returns only once every transaction that could still commit a key at or below
    the mark has ended (``settled_key_mark``)."""
    if table.strategy == "append":
        return settled_key_mark(conn, table)
    if table.strategy == "updated_at":
        return cursor_mark(conn, table, sql.SQL("true"), [], None)
    return None


def cursor_mark(conn: psycopg.Connection, table: Table, where: sql.Composable, params: list, floor: str | None) -> str | None:
    """The largest cursor value among the rows matching ``where``, never below ``floor``."""
    assert table.entry is not None and table.entry.cursor is not None
    cursor, cast = sql.Identifier(table.entry.cursor), _cast(table, table.entry.cursor)
    query = sql.SQL("SELECT greatest(max({}), {}::{})::text FROM {} WHERE {}").format(cursor, sql.Placeholder(), cast, table.ident, where)
    return conn.execute(query, [floor, *params]).fetchone()[0]  # type: ignore[index]


def after_key(table: Table, mark: list[str] | None) -> tuple[sql.Composable, list]:
    """Rows whose key is greater than ``mark`` (row comparison: composite keys order as tuples)."""
    if mark is None:
        return sql.SQL("true"), []
    keys = sql.SQL(", ").join(sql.Identifier(k) for k in table.primary_key)
    values = sql.SQL(", ").join(sql.SQL("{}::{}").format(sql.Placeholder(), _cast(table, k)) for k in table.primary_key)
    return sql.SQL("({}) > ({})").format(keys, values), list(mark)


def since_cursor(table: Table, mark: str | None, lookback: str) -> tuple[sql.Composable, list]:
    """Rows whose cursor is at or after ``mark`` minus the look-back window."""
    assert table.entry is not None and table.entry.cursor is not None
    if mark is None:
        return sql.SQL("true"), []
    column = table.column(table.entry.cursor)
    resolved, _ = column.type.resolved(column.typmod)
    window = sql.SQL("numeric" if resolved.name in _NUMERIC else "interval")
    return (
        sql.SQL("{} >= {}::{} - {}::{}").format(
            sql.Identifier(column.name), sql.Placeholder(), _cast(table, column.name), sql.Placeholder(), window
        ),
        [mark, lookback],
    )


# Append and transactions that commit out of key order
# ----------------------------------------------------
#
# A key is allocated (nextval, an identity column) when the row is written, but the row becomes
# visible at commit. A transaction holding key N can commit after N+1 was committed and copied;
# "copy keys above the largest copied" then skips N forever. A look-back over recent keys only
# narrows that window, and a filter on the rows' ``xmin`` against the previous snapshot misses a
# key taken by nextval() before its transaction had a transaction id (nextval assigns none).
#
# What is exact: every transaction, from its first statement, holds a lock on its virtual
# transaction id (pg_locks, locktype 'virtualxid'), whether or not it has a transaction id, in
# any isolation level, idle or not; CREATE INDEX CONCURRENTLY waits for old transactions the
# same way. So with each mark we record the transactions running right after its snapshot, and
# a mark becomes the floor of what we read ("every key at or below it is final and copied")
# only once all of them have ended. Proof, for a key k <= M, M the largest key visible in
# snapshot S_c, committed by transaction T:
#   k < M and keys are allocated in increasing order, so k was allocated before M, and M was
#   committed before S_c: T began before S_c. Either T ended before S_c (its row is in S_c), or
#   it was running at S_c, so it is in the set read after S_c or it ended before that read.
#   When none of that set is running at a check made before the next sync's snapshot S, T has
#   ended before S: its row is visible in S, which reads every key above the old floor.
# The cost: a sync re-reads the keys between the floor and the newest mark (upserted, so
# harmless): about two sync intervals of inserts, more while a long transaction stays open.
#
# What it assumes, and ``append_exactness`` reports when it cannot hold: the key is one column
# filled by a sequence or identity (allocated in increasing order, no per-session cache, no
# CYCLE), allocated by the transaction that inserts it; a key the application chooses, or takes
# from the sequence in an earlier transaction (ORM "pooled" allocators), has no such guarantee.
# A prepared (two-phase) transaction gives up its virtual transaction id at PREPARE: while one
# exists in the database, no mark is promoted.

SETTLE_TIMEOUT = 900.0  # seconds the backfill's plan waits for older transactions to end

_RUNNING = sql.SQL(
    """SELECT coalesce(array_agg(l.virtualxid ORDER BY l.virtualxid), '{}')
         || coalesce((SELECT array_agg('prepared:' || p.transaction::text ORDER BY p.transaction::text)
                        FROM pg_prepared_xacts p WHERE p.database = current_database()), '{}')
       FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
      WHERE l.locktype = 'virtualxid' AND l.mode = 'ExclusiveLock' AND l.granted
        AND l.pid <> pg_backend_pid() AND a.datname = current_database()
        AND a.backend_type <> 'autovacuum worker'"""
)


def running_transactions(conn: psycopg.Connection) -> set[str]:
    """The transactions of this database running now, other than ours (autovacuum cannot insert
    rows): their virtual transaction ids, and any prepared transactions."""
    return set(conn.execute(_RUNNING).fetchone()[0])  # type: ignore[index]


def _mark_and_running(conn: psycopg.Connection, table: Table) -> tuple[list[str] | None, list[str]]:
    """The largest key and the transactions running, read after that key's snapshot (one
    statement: its snapshot is taken before pg_locks is read)."""
    keys = [sql.Identifier(k) for k in table.primary_key]
    largest = sql.SQL("(SELECT ARRAY[{}] FROM {} ORDER BY {} LIMIT 1)").format(
        sql.SQL(", ").join(sql.SQL("{}::text").format(k) for k in keys),
        table.ident,
        sql.SQL(", ").join(sql.SQL("{} DESC").format(k) for k in keys),
    )
    row = conn.execute(sql.SQL("SELECT {}, ({})").format(largest, _RUNNING)).fetchone()
    assert row is not None
    return row[0], list(row[1])


def settled_key_mark(conn: psycopg.Connection, table: Table, timeout: float = SETTLE_TIMEOUT) -> list[str] | None:
    """The largest key now, returned once every transaction running at its snapshot has ended:
    no key at or below it can commit later, so the backfill's slices (read after this) hold
    them all. ``conn`` must be in autocommit: waiting inside a transaction could wait on a
    transaction that waits on us."""
    assert conn.autocommit, "settled_key_mark polls between transactions"
    mark, running = _mark_and_running(conn, table)
    waiting, deadline, pause = set(running), time.monotonic() + timeout, 0.05
    while waiting := _blocking(waiting, running_transactions(conn)):
        if time.monotonic() > deadline:
            raise SourceNotReadyError(
                f"{table.display}: strategy append waited {timeout:.0f} s for transactions older than its "
                f"backfill plan to end: {_describe(conn, waiting)}",
                hint="commit or end those transactions (a key they hold could commit below the copied keys), then retry",
                table=table.display,
            )
        time.sleep(pause)
        pause = min(pause * 2, 1.0)
    return mark


def _blocking(recorded: set[str], now: set[str]) -> set[str]:
    """Which of the transactions running now keep a mark from settling: those recorded with it,
    and any prepared transaction (a transaction recorded by its virtual id keeps no virtual id
    once prepared, and may yet commit)."""
    return {t for t in now if t in recorded or t.startswith("prepared:")}


def _describe(conn: psycopg.Connection, vxids: set[str]) -> str:
    rows = conn.execute(
        "SELECT a.pid, a.state, a.xact_start::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'virtualxid' AND l.mode = 'ExclusiveLock' AND l.virtualxid = ANY(%s) ORDER BY a.xact_start",
        (sorted(vxids),),
    ).fetchall()
    shown = [f"pid {pid} ({state}, since {start})" for pid, state, start in rows[:5]]
    prepared = sorted(v for v in vxids if v.startswith("prepared:"))
    return ", ".join(shown + [f"prepared transaction {p.split(':', 1)[1]}" for p in prepared]) or "(they ended)"


def advance_append(
    conn: psycopg.Connection, table: Table, mark: Watermark, still_running: set[str]
) -> tuple[sql.Composable, list, Watermark]:
    """One append sync, in ``conn``'s REPEATABLE READ snapshot (already taken).
    ``still_running``: ``running_transactions`` read before that snapshot.

    Returns the predicate of the rows to read (keys above the floor ``mark.mark``) and the new
    watermark: the candidate becomes the floor when none of the transactions recorded with it
    is still running; a new candidate (the largest key now, and who runs now) is recorded when
    there is none left. An unpromoted candidate is kept, not replaced: on a busy source some
    transaction is always running, and only the oldest candidate's transactions all end.
    """
    floor, candidate, running = mark.mark, mark.candidate, mark.running
    if candidate is not None and not _blocking(set(running or ()), still_running):
        floor, candidate = candidate, None  # every key <= candidate is final in this snapshot
    if candidate is None:
        candidate, now_running = _mark_and_running(conn, table)
        running = now_running if candidate is not None else None
    where, params = after_key(table, mark.mark)  # type: ignore[arg-type]  # the old floor: keys up to the candidate may be new
    return where, params, replace(mark, mark=floor, candidate=candidate, running=running)


def append_exactness(conn: psycopg.Connection, table: Table) -> str | None:
    """None when append provably keeps every committed row of ``table``; otherwise why not."""
    if len(table.primary_key) != 1:
        return (
            f"the key ({', '.join(table.primary_key)}) has several columns: keys are not allocated in "
            "increasing order, so a row committed with a key below the largest copied is skipped"
        )
    key = table.primary_key[0]
    row = conn.execute(
        """SELECT s.seqrelid::regclass::text, s.seqcache, s.seqcycle
             FROM pg_sequence s WHERE s.seqrelid = pg_get_serial_sequence(%s, %s)::regclass""",
        (table.ident.as_string(conn), key),
    ).fetchone()
    if row is None:
        return (
            f"key {key!r} is not filled by a sequence or an identity column: keys chosen by the "
            "application can commit below the largest copied, and are then skipped"
        )
    sequence, cache, cycle = row
    if cache > 1:
        return f"sequence {sequence} caches {cache} values per session: keys are not taken in increasing order across sessions"
    if cycle:
        return f"sequence {sequence} cycles: after it wraps, new keys are below the largest copied"
    return None
