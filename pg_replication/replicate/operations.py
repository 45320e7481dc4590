"""Operator actions that are not Dagster runs: resync a table, drop the slot.

No Dagster here: the ``pg-replication`` CLI calls these.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from pg_replication.source.catalog import Table
from pg_replication.source.connection import connect
from pg_replication.source.slot import slot_status


def resync_table(warehouse, table: Table) -> None:
    """Forget the table in the warehouse: its data, plan, slices and change log. The next
    backfill plans it anew from the slot's current position, and CDC applies again after it."""
    warehouse.reset_table(table)


def drop_slot(conninfo: str, warehouse, slot: str) -> bool:
    """Drop the replication slot (it stops retaining WAL) and forget the drained position.

    Changes not yet drained are gone with it: resync every table afterwards.
    Returns False when there was no slot.
    """
    with connect(conninfo) as conn:
        existed = slot_status(conn, slot) is not None
        if existed:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    warehouse.reset_cursor(slot)
    return existed


def retry_table(
    conninfo: str, warehouse, table: Table, documents: Collection[str] | None = None, log: Callable[[str], None] = lambda _m: None
) -> int:
    """Replay a failed table's change log into it, and set it streaming, in one warehouse
    transaction; returns the changes replayed. The warehouse table first follows the source's
    columns as they are now. If the cause is not fixed, this fails the same way and the table
    stays failed with its log intact. No re-backfill. Then the ``documents`` sets (replication.yaml's;
    None: every set built) whose tree holds the table are built again."""
    from pg_replication.source.catalog import describe_new_columns, refresh_table
    from pg_replication.source.recovery import row_reader

    with connect(conninfo) as conn:
        table = refresh_table(conn, table)
        replayed = warehouse.retry_table(
            table, lambda names: describe_new_columns(conn, table, names), row_reader(conninfo, table, warehouse.map_column)
        )
    warehouse.rebuild_stale_documents(documents, log)
    return replayed
