"""Document sets kept fresh by the writes that are not drains (README, Documents).

- A sync of a query-strategy table (append, updated_at, reload) refreshes, in its own
  transaction, the configured sets whose tree holds the table: append and updated_at map each
  batch's keys to their roots before and after the batch is written, then rebuild those roots'
  documents; a reload rebuilds the sets whole (every row may have changed: mapping them all
  costs about what a build costs).
- A backfill slice that leaves its table streaming, or a retry's replay of a change log, marks
  the sets ``stale`` in its transaction; the caller rebuilds them right after
  (``rebuild_stale_documents``), and a drain that touches a stale set rebuilds it whole, so a
  run killed in between leaves no set stale for good.

Writers of a set's documents take the state rows of every table of its tree, sorted, as a full
build does: a drain and a sync never refresh one set at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from pg_replication.errors import PgReplicationError, WarehouseError, is_transient
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
        sets = [dset for dset, _, _ in self._stored_sets(configured) if key in dset.table_keys()]  # type: ignore[attr-defined]
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

    def mark_documents_stale(self, table: Table, why: str) -> None:
        """Inside the transaction that rewrote ``table`` outside a drain or a sync."""
        key = table_key(table)
        for dset, _, _ in self._stored_sets():  # type: ignore[attr-defined]
            if key in dset.table_keys():
                self.execute(f"UPDATE {self.state('documents')} SET stale = ? WHERE name = ?", [why, dset.name])  # type: ignore[attr-defined]

    def rebuild_stale_documents(
        self, configured: Collection[str] | None = None, log: Callable[[str], None] = lambda _m: None
    ) -> dict[str, int]:
        """Build again, whole and each in its own transaction, the configured sets marked stale;
        returns the documents built per set. A set that cannot be built is held, with why (its
        asset's next materialization says what is wrong), and the others are built."""
        built: dict[str, int] = {}
        for dset, _, stale in self._stored_sets(configured):  # type: ignore[attr-defined]
            if stale is None:
                continue
            try:
                built[dset.name] = self.materialize_documents(dset)  # type: ignore[attr-defined]
            except (*self.errors, PgReplicationError) as exc:  # type: ignore[attr-defined]
                if is_transient(exc):  # still stale: the next drain that touches it, or the next rebuild, builds it
                    log(f"documents {dset.name}: not rebuilt this time ({str(exc).strip().splitlines()[0]}); still stale")
                    continue
                first = str(exc).strip().splitlines()[0]
                reason = (
                    f"documents {dset.name} held: rebuilding them after {stale} failed ({first}); "
                    f"materialize the asset {dset.root.schema}/{dset.name} again once it is fixed"
                )
                self.execute(  # type: ignore[attr-defined]
                    f"UPDATE {self.state('documents')} SET error = ?, updated_at = ? WHERE name = ?",  # type: ignore[attr-defined]
                    [reason, time.time(), dset.name],
                )
                log(reason)
                continue
            log(f"documents {dset.name}: {built[dset.name]:,} built again after {stale}")
        return built
