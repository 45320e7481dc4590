"""Backfill slices and the query strategies' syncs: rows copied from the source replace what a
slice held before, in one transaction with the state that records it; the slice that completes a
backfill replays the change log and starts the table streaming."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pg_replication.errors import BackfillRestartedError, WarehouseError
from pg_replication.source.binary_copy import text_column
from pg_replication.source.catalog import Table
from pg_replication.source.recovery import RowReader
from pg_replication.source.snapshot import FRESH_COLUMN, BackfillPlan, PlanStaleError
from pg_replication.warehouse.documents import DocumentRefreshFailed
from pg_replication.warehouse.base import (
    SLICE_COLUMN,
    KeyCheck,
    Progress,
    SliceResult,
    Written,
    table_key,
)


class SliceWriter:
    """Mixed into ``engine.SqlWarehouse``: uses its dialect hooks and the other parts."""

    # How a slice replaces rows with its keys already stored (see _load_rows): "after" all its
    # batches are in, in one statement; "before" each batch (a table whose declared key the
    # warehouse enforces at once: fakesnow); "upsert" by INSERT … ON CONFLICT (key).
    slice_eviction = "after"
    # With "after": read slices with FRESH_COLUMN, so a first copy evicts only the rows written
    # after the plan, and none (no work at all) when it read none (see _load_rows).
    evicts_fresh_rows = False
    sole_writer = False  # see Warehouse.sole_writer

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
        relations = self.slice_relations(table, batches, slice_value=index)
        try:
            with self.transaction():
                # Slices of one table copy in parallel only where the warehouse enforces the key
                # as rows arrive ("upsert": the Postgres replica): a key two slices both hold (a
                # row an update moved between their pages) then waits for the other's commit and
                # is set once. Elsewhere a slice takes the table's state row first, so it sees
                # every earlier slice's rows when it decides what to evict.
                parallel = self.slice_eviction == "upsert"
                if not parallel:
                    self._lock_state(table_key(table))
                slice_column = self.ident(SLICE_COLUMN)
                # A slice copied before holds rows to replace; a first copy (the common case) has
                # none, and into an empty table nothing to evict either. One look instead of the
                # marking and settling scans, which find nothing then.
                held = bool(self.fetchall(f"SELECT 1 FROM {target} WHERE {slice_column} = ? LIMIT 1", [index]))
                if held:
                    self.execute(f"UPDATE {target} SET {slice_column} = ? WHERE {slice_column} = ?", [previous, index])
                evict = "slice" if parallel or held or self.fetchall(f"SELECT 1 FROM {target} LIMIT 1") else None
                rows, nbytes = self._load_rows(
                    table, target, relations, index, f"slice {index}", progress, evict, fresh_only=not held
                )
                if parallel:
                    self._lock_state(table_key(table))  # the slice that completes the backfill sees every other
                stored = self.load_state(table).plan
                if plan is not None and stored is None:  # a drain restarted the backfill meanwhile
                    raise BackfillRestartedError(
                        f"{table.display}: slice {index} was read under a plan a drain has since dropped (the backfill restarted)",
                        table=table.display,
                    )
                if plan is not None and stored != plan:
                    raise PlanStaleError(
                        f"{table.display}: slice {index} was read under a plan another run has replaced",
                        table=table.display,
                        lsn=plan.lsn,
                    )
                if held:
                    self._settle_leftovers(table, previous, still_in_source)
                self._upsert_state(
                    "slices",
                    {"table_key": table_key(table), "slice": index},
                    {"rows": rows, "bytes": nbytes, "seconds": time.monotonic() - started, "copied_at": time.time()},
                )
                self._start_streaming_when_complete(table, read_rows)
                if self.load_state(table).status == "streaming":  # a complete copy: its documents are built again
                    self.mark_documents_stale(table, f"a backfill slice of {table.display}")  # type: ignore[attr-defined]
        finally:
            relations.close()  # type: ignore[attr-defined]
        return SliceResult(rows, nbytes)

    def upsert_rows(
        self, table: Table, batches: Iterable[pa.RecordBatch], watermark: str | None, documents: Collection[str] | None = None
    ) -> SliceResult:
        """Insert the rows, replacing any with the same key, and store the table's new
        watermark, in one transaction (the append and updated_at strategies), with the
        ``documents`` sets (None: every one) whose tree holds the table (document_upkeep.py)."""
        relations = self.slice_relations(table, batches)
        key = table_key(table)
        try:
            with self.transaction():
                refresh = self.sync_document_refresh(table, documents, whole=False)  # type: ignore[attr-defined]
                track = (lambda keys: refresh.track(key, keys)) if refresh.work else None
                rows, nbytes = self._load_rows(table, self.table_name(table), relations, None, "a sync", track=track)
                self._set_watermark(table, watermark)
                recomputed = refresh.finish()
        except DocumentRefreshFailed as failure:
            raise self.sync_failed(table, failure) from failure.exc  # type: ignore[attr-defined]
        finally:
            relations.close()  # type: ignore[attr-defined]
        return SliceResult(rows, nbytes, recomputed, refresh.problems)

    def replace_rows(
        self, table: Table, batches: Iterable[pa.RecordBatch], watermark: str | None, documents: Collection[str] | None = None
    ) -> SliceResult:
        """A full refresh: the new copy is loaded beside the table, then swapped in by one
        transaction, so a reader sees the old rows or the new ones, never a half-loaded table;
        the ``documents`` sets whose tree holds it are built again whole in that transaction."""
        target, copy = self.table_name(table), self.state(f"reload.{table.schema}.{table.name}")
        self.execute(f"DROP TABLE IF EXISTS {copy}")
        self.execute(f"CREATE TABLE {copy} AS SELECT * FROM {target} WHERE 1 = 0")
        try:
            relations = self.slice_relations(table, batches)
            try:
                rows, nbytes = self._load_rows(table, copy, relations, None, "a reload", evict=None)
            finally:
                relations.close()  # type: ignore[attr-defined]
            try:
                with self.transaction():
                    refresh = self.sync_document_refresh(table, documents, whole=True)  # type: ignore[attr-defined]
                    self.execute(f"DELETE FROM {target}")
                    self.execute(f"INSERT INTO {target} SELECT * FROM {copy}")
                    self._set_watermark(table, watermark)
                    recomputed = refresh.finish()
            except DocumentRefreshFailed as failure:
                raise self.sync_failed(table, failure) from failure.exc  # type: ignore[attr-defined]
        finally:
            self.execute(f"DROP TABLE IF EXISTS {copy}")
        return SliceResult(rows, nbytes, recomputed, refresh.problems)

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
        evict: str | None = "batch",
        track: Callable[[str], None] | None = None,
        fresh_only: bool = False,
    ) -> tuple[int, int]:
        """Insert staged source rows into ``target``. Rows with the same keys may be there already
        (a row an update moved here from another slice's pages is still stored under that slice;
        a re-run slice's previous copy): ``evict="batch"`` deletes them before each batch,
        ``"slice"`` as the dialect's ``slice_eviction`` says (``slice_value`` tells the new rows
        apart), None for a target that holds none. ``track``: called with ``SELECT k0, k1, ...``
        of each batch's keys before the batch is written and after (a sync's document refresh).
        ``fresh_only``: a slice's first copy; where its batches carry FRESH_COLUMN, "after"
        evicts only the keys of rows written after the plan (see BackfillPlan.fresh_before)."""
        mappings = dict(self.column_mappings(table))
        keys = ", ".join(self.ident(k) for k in table.primary_key)
        tag = "NULL" if slice_value is None else str(int(slice_value))
        mode = self.slice_eviction_for(table) if evict == "slice" else None
        if mode == "before":
            evict = "batch"
        upsert = mode == "upsert"
        after = evict == "slice" and not upsert
        fresh = _FreshKeys(self) if fresh_only and after else None
        rows = nbytes = 0
        for relation, batch in relations:
            if isinstance(batch, Written):  # the dialect wrote them into the target itself
                rows, nbytes = rows + batch.rows, nbytes + batch.bytes
                if progress is not None:
                    progress(rows, nbytes)
                continue
            # A batch; or the schema of one relation holding the whole slice (counted below).
            staged = batch if isinstance(batch, pa.Schema) else batch.schema if batch is not None else None
            select = self._staged_loads(mappings, staged)
            names = ", ".join([self.ident(n) for n in mappings] + [self.ident(SLICE_COLUMN)])
            insert = f"INSERT INTO {target} ({names}) SELECT {', '.join(list(select.values()) + [tag])} FROM {relation}"
            if upsert:
                sets = ", ".join(f"{self.ident(n)} = EXCLUDED.{self.ident(n)}" for n in [*mappings, SLICE_COLUMN])
                insert += f" ON CONFLICT ({keys}) DO UPDATE SET {sets}"
            batch_keys = ", ".join(f"{select[k]} AS {self.ident(f'k{i}')}" for i, k in enumerate(table.primary_key))
            try:
                if track is not None:  # the roots these rows reach before the batch
                    track(f"SELECT {batch_keys} FROM {relation}")
                if evict == "batch":
                    staged_keys = ", ".join(select[k] for k in table.primary_key)
                    self.execute(f"DELETE FROM {target} WHERE ({keys}) IN (SELECT {staged_keys} FROM {relation})")
                self.execute(insert)
                if track is not None:  # and after it
                    track(f"SELECT {batch_keys} FROM {relation}")
                if fresh is not None:
                    fresh.add(batch, relation, batch_keys)
            except self.errors as exc:
                where = f"rows {rows}..{rows + batch.num_rows}" if isinstance(batch, pa.RecordBatch) else "its rows"
                raise self._refused(table, what, where, exc) from None
            if isinstance(batch, pa.RecordBatch):
                rows += batch.num_rows
                nbytes += batch.nbytes
            else:
                rows += int(self.fetchall(f"SELECT count(*) FROM {relation}")[0][0])
            if progress is not None:
                progress(rows, nbytes)
        slice_column = self.ident(SLICE_COLUMN)
        candidates = f"SELECT {keys} FROM {target} WHERE {slice_column} = {tag}"  # every key the slice holds
        if fresh is not None and fresh.marked:
            candidates = fresh.keys(len(table.primary_key))
        if after and candidates is not None:
            try:
                self.execute(
                    f"DELETE FROM {target} WHERE ({slice_column} IS NULL OR {slice_column} <> {tag}) AND ({keys}) IN ({candidates})"
                )
                if fresh is not None:
                    fresh.drop()
            except self.errors as exc:
                raise self._refused(table, what, "the eviction of rows it replaces", exc) from None
        return rows, nbytes

    def slice_eviction_for(self, table: Table) -> str:
        return self.slice_eviction

    def _staged_loads(self, mappings: dict, staged: pa.Schema | None) -> dict[str, str]:
        """Per column, the load expression over the staged relation: text as it always was;
        natively read columns as they are (with their text companion, see binary_copy)."""
        out = {}
        for position, (name, mapping) in enumerate(mappings.items()):
            column = self.ident(name)
            if staged is None or staged.get_field_index(name) < 0:
                out[name] = mapping.load_sql(column)
                continue
            companion = text_column(position)
            text = self.ident(companion) if staged.get_field_index(companion) >= 0 else None
            out[name] = mapping.staged_load_sql(column, staged.field(name).type, text)
        return out

    def _refused(self, table: Table, what: str, where: str, exc: BaseException) -> WarehouseError:
        return WarehouseError(
            f"{table.display}: the {self.name} warehouse refused {what} at {where}: " + str(exc).strip().splitlines()[0],
            table=table.display,
            hint="if a value does not fit its warehouse type (e.g. NaN in numeric(p,s)), "
            "see README, Type mapping; nothing of this write was committed",
        )

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
        if state.plan is None or len(state.slices_done) < len(state.plan.slices) or state.status != "backfilling":
            return
        self.replay_log(table, read_rows)
        self.set_status(table_key(table), "streaming")


class _FreshKeys:
    """The keys of a slice's rows written after its plan (FRESH_COLUMN), gathered while its
    batches load: on a first copy, the only rows other slices may also hold (BackfillPlan)."""

    def __init__(self, warehouse: Any) -> None:  # the SqlWarehouse loading the slice
        self.warehouse = warehouse
        self.marked = False  # the batches carry the mark
        self.table: str | None = None  # created at the first fresh row

    def add(self, batch: pa.RecordBatch | pa.Schema | None, relation: str, batch_keys: str) -> None:
        self.marked = isinstance(batch, pa.RecordBatch) and FRESH_COLUMN in batch.schema.names
        if not self.marked or not pc.any(batch.column(FRESH_COLUMN)).as_py():
            return
        wh = self.warehouse
        fresh = f"SELECT {batch_keys} FROM {relation} WHERE {wh.ident(FRESH_COLUMN)}"
        if self.table is None:
            self.table = wh.ident("pgr_fresh_keys")
            wh.execute(f"CREATE TEMP TABLE {self.table} AS {fresh}")
        else:
            wh.execute(f"INSERT INTO {self.table} {fresh}")

    def keys(self, width: int) -> str | None:
        """A SELECT of the fresh keys (k0, k1, ...), None when no row was fresh."""
        if self.table is None:
            return None
        return f"SELECT {', '.join(self.warehouse.ident(f'k{i}') for i in range(width))} FROM {self.table}"

    def drop(self) -> None:
        if self.table is not None:
            self.warehouse.execute(f"DROP TABLE {self.table}")
            self.table = None
