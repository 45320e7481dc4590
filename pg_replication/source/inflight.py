"""Wait for the transactions that wrote a table before it was published.

pgoutput decides whether a change is published with the catalog as of that change (the
transaction's historic snapshot). A transaction that wrote the table before ``ALTER PUBLICATION
… ADD TABLE`` committed has those changes decoded as "not published", and nothing stops it from
committing after the backfill's plan position and after its slices' snapshots: its changes would
then be in neither. So, once the table is published, every transaction that has written it so far
must end before the plan position is read; its commit is then below the plan position, and every
slice (read later) sees it.

Which transactions: every change to a table is made under a lock of at least ROW EXCLUSIVE on it
(or on the partition written), held to the end of the transaction (a rolled-back savepoint drops
its locks, and its changes with them). ``ALTER PUBLICATION`` itself takes SHARE UPDATE EXCLUSIVE,
which does not conflict with writers, so they run on across it. The transactions holding such a
lock on the table or one of its leaves after the publication holds it are exactly the ones to wait
for; one that takes the lock later writes after the publication changed and is decoded with it.
Readers (ACCESS SHARE, ROW SHARE) are not waited for. Waiting polls ``pg_locks``: queueing a
conflicting lock instead would stall the application's new writes behind us.
"""

from __future__ import annotations

import time

import psycopg
from psycopg import sql

from pg_replication.errors import PgReplicationError
from pg_replication.source.catalog import Table

WRITERS_DEADLINE_SECONDS = 600.0  # generous: a batch job may hold its transaction for minutes
POLL_SECONDS = 0.1
WAITING_APPLICATION_NAME = "pg_replication: waiting for writers"  # visible in pg_stat_activity


class WritersInFlightError(PgReplicationError):
    """A transaction that wrote the table before it was published did not end in time."""

    retryable = True
    default_hint = (
        "end that transaction (commit it, roll it back, or SELECT pg_terminate_backend(pid)), "
        "then re-run the backfill; nothing was planned or copied"
    )


_WRITERS_SQL = """
SELECT DISTINCT l.virtualtransaction, l.pid
FROM pg_locks l
WHERE l.locktype = 'relation' AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.relation = ANY(%(relations)s)
  -- Row writes hold ROW EXCLUSIVE, TRUNCATE ACCESS EXCLUSIVE; autovacuum, ANALYZE and CREATE
  -- INDEX (CONCURRENTLY) hold other modes and write no rows: never waited for.
  AND l.mode IN ('RowExclusiveLock', 'AccessExclusiveLock')
  AND l.pid IS DISTINCT FROM pg_backend_pid()
"""


def _relations(conn: psycopg.Connection, table: Table) -> list[int]:
    names = [(table.schema, table.name), *table.leaves]
    return [
        int(row[0])
        for schema, name in names
        if (row := conn.execute("SELECT to_regclass(%s)::oid", (sql.Identifier(schema, name).as_string(conn),)).fetchone())
        and row[0] is not None
    ]


def _describe(conn: psycopg.Connection, writers: set[tuple[str, int | None]]) -> str:
    parts = []
    for vxid, pid in sorted(writers, key=lambda w: (w[1] is None, w[1] or 0)):
        if pid is None:  # prepared transactions keep their locks without a backend
            parts.append(f"a prepared transaction (virtual xid {vxid}; see pg_prepared_xacts)")
            continue
        row = conn.execute(
            """SELECT application_name, state, round(extract(epoch FROM now() - xact_start))::bigint
               FROM pg_stat_activity WHERE pid = %s""",
            (pid,),
        ).fetchone()
        app, state, age = row if row else ("?", "?", None)
        parts.append(f"pid {pid} ({state}, transaction open {age} s, application_name {app!r})")
    return "; ".join(parts)


def wait_for_writers(conn: psycopg.Connection, table: Table, deadline_seconds: float | None = None) -> None:
    """Return once every transaction that has written ``table`` (or its leaves) up to now has
    ended. Call after the publication that holds the table committed, before reading the plan
    position. Raises WritersInFlightError naming the blocking backends past the deadline."""
    deadline = WRITERS_DEADLINE_SECONDS if deadline_seconds is None else deadline_seconds
    relations = _relations(conn, table)
    if not relations:
        return
    pending = {(v, p) for v, p in conn.execute(_WRITERS_SQL, {"relations": relations})}
    if not pending:
        return
    previous = conn.execute("SHOW application_name").fetchone()[0]  # type: ignore[index]
    conn.execute("SELECT set_config('application_name', %s, false)", (WAITING_APPLICATION_NAME,))
    try:
        stop = time.monotonic() + deadline
        while True:
            # Only the transactions seen first: a vxid is never reused by its backend (pid).
            still = {(v, p) for v, p in conn.execute(_WRITERS_SQL, {"relations": relations})}
            pending &= still
            if not pending:
                return
            if time.monotonic() > stop:
                raise WritersInFlightError(
                    f"{table.display}: waited {deadline:.0f} s for transactions that wrote the table "
                    f"before it was published; still open: {_describe(conn, pending)}",
                    table=table.display,
                )
            conn.execute("SELECT pg_sleep(%s)", (POLL_SECONDS,))
    finally:
        conn.execute("SELECT set_config('application_name', %s, false)", (previous,))
