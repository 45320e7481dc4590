"""The replication slot and publication: create, sync, inspect, advance.

Drains read the slot through the streaming replication protocol (source/stream.py). ``peek``
(the SQL function, which builds its whole result on the server before the first row) is kept
for inspection only; no drain uses it. Only one session can read a slot at a time; a busy slot
raises SlotBusyError.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
from psycopg import errors, sql

from pg_replication.errors import PgReplicationError, SourceNotReadyError, SourceUnavailableError, TableNotReplicableError
from pg_replication.source.catalog import Table
from pg_replication.source.replica_identity import (
    check_replica_identity,
    column_list_stale,
    identity_problems,
    leaked_columns,
    published_columns,
    unpublished_columns,
)
from pg_replication.source.pgoutput import lsn_to_int


class SlotError(PgReplicationError):
    """The slot is missing, lost or busy."""


class SlotMissingError(SlotError):
    default_hint = (
        "the slot was dropped: changes since the last drain are gone. Resync the tables "
        "(pg-replication resync TABLE, or materialize all partitions again)"
    )


class SlotLostError(SlotError):
    default_hint = (
        "Postgres removed WAL the slot still needed (max_slot_wal_keep_size). Drop the slot "
        "(pg-replication drop-slot) and resync the tables"
    )


class SlotBusyError(SlotError):
    retryable = True
    default_hint = "another drain is reading the slot; this run will be retried by the sensor"


@dataclass(frozen=True)
class SlotStatus:
    name: str
    active: bool
    confirmed_lsn: int
    restart_lsn: int | None
    wal_status: str | None
    current_lsn: int

    @property
    def lag_bytes(self) -> int:
        return max(0, self.current_lsn - self.confirmed_lsn)

    @property
    def retained_bytes(self) -> int:
        return max(0, self.current_lsn - (self.restart_lsn or self.current_lsn))


def check_source_ready(conn: psycopg.Connection) -> None:
    level = conn.execute("SHOW wal_level").fetchone()[0]  # type: ignore[index]
    if level != "logical":
        raise SourceNotReadyError(
            f"Postgres has wal_level={level}; CDC needs wal_level=logical",
            hint="ALTER SYSTEM SET wal_level = logical; then restart Postgres",
            setting="wal_level",
        )


def slot_status(conn: psycopg.Connection, slot: str) -> SlotStatus | None:
    row = conn.execute(
        """SELECT active, confirmed_flush_lsn::text, restart_lsn::text, wal_status, pg_current_wal_lsn()::text
           FROM pg_replication_slots WHERE slot_name = %s AND database = current_database()""",
        (slot,),
    ).fetchone()
    if row is None:
        return None
    active, confirmed, restart, wal_status, current = row
    return SlotStatus(
        slot,
        active,
        lsn_to_int(confirmed) if confirmed else 0,
        lsn_to_int(restart) if restart else None,
        wal_status,
        lsn_to_int(current),
    )


def ensure_slot(conn: psycopg.Connection, slot: str) -> SlotStatus:
    """The slot, created (pgoutput) if missing. Must run outside a transaction."""
    check_source_ready(conn)
    status = slot_status(conn, slot)
    if status is None:
        try:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        except errors.DuplicateObject:
            elsewhere = conn.execute(
                "SELECT database FROM pg_replication_slots WHERE slot_name = %s AND database <> current_database()",
                (slot,),
            ).fetchone()
            if elsewhere:  # slot names are server-wide
                raise SourceNotReadyError(
                    f"replication slot {slot!r} already exists in database {elsewhere[0]!r}",
                    hint="give this source its own slot name (source.slot in replication.yaml)",
                    setting="source.slot",
                ) from None
            # otherwise another run of ours created it a moment ago
        except errors.InsufficientPrivilege as exc:
            raise SourceNotReadyError(
                f"cannot create replication slot {slot!r}: {exc.diag.message_primary}",
                hint="grant the REPLICATION attribute to the role (see README, Operations)",
            ) from None
        status = slot_status(conn, slot)
    assert status is not None
    return status


def require_slot(conn: psycopg.Connection, slot: str) -> SlotStatus:
    status = slot_status(conn, slot)
    if status is None:
        raise SlotMissingError(f"replication slot {slot!r} does not exist in this database")
    if status.wal_status == "lost":
        raise SlotLostError(f"replication slot {slot!r} is lost (wal_status 'lost')")
    return status


def _table_item(table: Table) -> sql.Composable:
    if table.entry and table.entry.exclude_columns:  # a column list keeps excluded data at home
        return sql.SQL("{} ({})").format(table.ident, sql.SQL(", ").join(sql.Identifier(c.name) for c in table.columns))
    return table.ident


def sync_publication(conn: psycopg.Connection, publication: str, tables: list[Table]) -> bool:
    """Make the publication hold exactly ``tables``, each with its column list. Returns True when
    it changed anything. A table whose replica identity is refused (see source/replica_identity.py) is
    never added; its own backfill reports why (``add_to_publication``)."""
    exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)).fetchone()
    published_cols = published_columns(conn, publication) if exists else {}
    refused = identity_problems(conn, [t for t in tables if (t.schema, t.name) not in published_cols])
    tables = [t for t in tables if (t.schema, t.name) not in refused]
    items = sql.SQL(", ").join(_table_item(t) for t in tables)
    if not exists:
        if not tables:
            return False
        _publication_ddl(
            conn,
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)").format(
                sql.Identifier(publication), items
            ),
        )
        return True
    published = set(published_cols)
    # exclude_columns added later, or columns added to the table since its list was set. The
    # re-listed entry is a new one: the table is backfilled again (source/relation_identity.py), which
    # its values missed until now require.
    stale = any(column_list_stale(t, published_cols) for t in tables)
    if published == {(t.schema, t.name) for t in tables} and not stale:
        return False
    if not _owns_publication(conn, publication):
        _require_published(published, publication, tables)
        return False
    if not tables:  # never dropped: a slot cannot decode across its publication's absence
        return False
    _publication_ddl(conn, sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(sql.Identifier(publication), items))
    return True


DDL_LOCK_TIMEOUT = "5s"


def _publication_ddl(conn: psycopg.Connection, *statements: sql.Composable) -> None:
    """Publication DDL in one transaction that waits for its table locks at most
    DDL_LOCK_TIMEOUT: queued behind a long transaction's lock, it would queue the DDL and
    maintenance that come after it too. The next run tries again."""
    try:
        with conn.transaction():
            conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(DDL_LOCK_TIMEOUT)))
            for statement in statements:
                conn.execute(statement)
    except errors.LockNotAvailable:
        raise SourceUnavailableError(
            f"changing the publication waited more than {DDL_LOCK_TIMEOUT} for a table lock",
            hint="a long transaction or DDL holds a lock on a replicated table; the next run tries again",
        ) from None


def _owns_publication(conn: psycopg.Connection, publication: str) -> bool:
    row = conn.execute(
        "SELECT pg_has_role(pubowner, 'USAGE') FROM pg_publication WHERE pubname = %s", (publication,)
    ).fetchone()
    return bool(row and row[0])


def _require_published(published: set[tuple[str, str]], publication: str, tables: list[Table]) -> None:
    """A publication someone else manages (scripts/source-role.sql) must hold our tables."""
    missing = [t.display for t in tables if (t.schema, t.name) not in published]
    if missing:
        raise SourceNotReadyError(
            f"publication {publication!r} (not ours to change) does not publish {', '.join(missing)}",
            hint=f"ALTER PUBLICATION {publication} ADD TABLE ... as its owner (see scripts/source-role.sql)",
        )


def add_to_publication(conn: psycopg.Connection, publication: str, table: Table) -> None:
    """Publish one more table (the backfill calls this before it plans). Refuses a table whose
    replica identity would break the source's writes or not carry the key (it may have changed
    since load), and narrows the column list of a published table to leave excluded columns out."""
    check_replica_identity(conn, [table])
    published_cols = published_columns(conn, publication)
    published = set(published_cols)
    exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)).fetchone()
    if (table.schema, table.name) in published:
        if not column_list_stale(table, published_cols):
            return
        if not _owns_publication(conn, publication):
            leaked = leaked_columns(table, published_cols)
            raise TableNotReplicableError(
                f"{table.display}: publication {publication!r} (not ours to change) publishes "
                + (
                    f"{', '.join(leaked)}, which exclude_columns keeps in the source"
                    if leaked
                    else f"no values of {', '.join(unpublished_columns(table, published_cols))} (its column list predates them)"
                ),
                hint="as the publication's owner, give the table a column list of exactly the columns "
                "replication.yaml keeps",
                table=table.display,
            )
        _publication_ddl(  # one transaction, one change for decoding: never published without the list
            conn,
            sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(sql.Identifier(publication), table.ident),
            sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(sql.Identifier(publication), _table_item(table)),
        )
        return
    if exists and not _owns_publication(conn, publication):
        _require_published(published, publication, [table])
    verb = "ALTER PUBLICATION {} ADD TABLE {}" if exists else (
        "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)"
    )
    _publication_ddl(conn, sql.SQL(verb).format(sql.Identifier(publication), _table_item(table)))


def peek(
    conn: psycopg.Connection, slot: str, publication: str, *, max_changes: int, fetch: int = 5000
) -> Iterator[list[bytes]]:
    """Yield the slot's pending pgoutput messages in chunks, up to ``max_changes`` (whole
    transactions). The caller stops whenever it likes; nothing is consumed until the slot is
    advanced."""
    query = """SELECT data FROM pg_logical_slot_peek_binary_changes(
                   %s, NULL, %s, 'proto_version', '1', 'publication_names', %s, 'messages', 'true')"""
    try:
        with conn.transaction(), conn.cursor(name="pgr_peek", binary=True) as cur:
            cur.execute(query, (slot, max_changes, sql.Identifier(publication).as_string(conn)))
            while rows := cur.fetchmany(fetch):
                yield [row[0] for row in rows]
    except errors.ObjectInUse:
        raise SlotBusyError(f"replication slot {slot!r} is in use by another session") from None
    except errors.UndefinedObject as exc:
        if "publication" in str(exc):
            raise SourceNotReadyError(
                f"publication {publication!r} does not exist", hint="run a backfill or a drain to create it"
            ) from None
        raise SlotMissingError(f"replication slot {slot!r} does not exist") from None


def advance(conn: psycopg.Connection, slot: str, lsn: int) -> None:
    from pg_replication.source.pgoutput import int_to_lsn

    conn.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", (slot, int_to_lsn(lsn)))


def flushed_lsn(conn: psycopg.Connection) -> int:
    """Where WAL is flushed to: logical decoding sees every commit below it (and nothing above)."""
    return lsn_to_int(conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0])  # type: ignore[index]
