"""Document sets kept fresh by the writes that are not drains (README, Documents).

- A sync of a query-strategy table (append, updated_at, reload) refreshes, in its own
  transaction, the configured sets whose tree holds the table: append and updated_at map each
  batch's keys to their roots before and after the batch is written, then rebuild those roots'
  documents; a reload rebuilds the sets whole (every row may have changed: mapping them all
  costs about what a build costs).

Writers of a set's documents take the state rows of every table of its tree, sorted, as a full
build does: a drain and a sync never refresh one set at once.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from pg_replication.errors import WarehouseError
from pg_replication.source.catalog import Table
from pg_replication.warehouse.base import table_key
from pg_replication.warehouse.documents import DocumentRefresh, DocumentRefreshFailed


class DocumentUpkeep:
    """Mixed into ``engine.SqlWarehouse``, after ``DocumentStore``."""

    def sync_document_refresh(self, table: Table, configured: Collection[str] | None, whole: bool) -> DocumentRefresh:
        """Inside a sync's transaction, before its rows are written: locks the state rows of the
        trees holding ``table`` and maps nothing yet (``track`` maps each batch). ``whole``: a
        reload, the sets are built again whole."""
        key = table_key(table)
        sets = [dset for dset, _ in self._stored_sets(configured) if key in dset.table_keys()]  # type: ignore[attr-defined]
        for locked in sorted({key}.union(*(dset.table_keys() for dset in sets))) if sets else ():
            self._lock_state(locked)  # type: ignore[attr-defined]
        refresh = DocumentRefresh(self, {key}, lambda node: None if whole else [], {}, configured, by="sync")
        refresh.before()
        return refresh

    def sync_failed(self, table: Table, failure: DocumentRefreshFailed) -> WarehouseError:
        """After a sync rolled back for one set's refresh: the set is held (later syncs and drains
        leave it alone), and the sync's error says so; nothing of the sync was committed."""
        self.execute(  # type: ignore[attr-defined]
            f"UPDATE {self.state('documents')} SET error = ?, updated_at = ? WHERE name = ?",  # type: ignore[attr-defined]
            [failure.reason, time.time(), failure.name],
        )
        return WarehouseError(
            f"{table.display}: the sync rolled back, nothing of it was committed: {failure.reason}",
            table=table.display,
            hint="sync again: the next sync leaves these documents alone until the asset is materialized again",
        )
