"""One drain's apply, with per-table isolation: every table's changes (or log rows) and the drained
position in one transaction; a table the warehouse refuses is failed (or resynced) and logged
instead, a transient error is retried with backoff, and the others commit."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace

from pg_replication.replicate.changes import StagedPart, TableOutcome
from pg_replication.replicate.column_changes import staged_table
from pg_replication.errors import (
    PgReplicationError,
    SchemaChangeError,
    TransientWarehouseError,
    is_transient,
)
from pg_replication.failpoints import failpoint, pause
from pg_replication.source.catalog import Table
from pg_replication.source.recovery import RowReader
from pg_replication.warehouse.base import (
    table_key,
)
from pg_replication.warehouse.documents import DocumentRefreshFailed, DrainOutcomes
from pg_replication.warehouse.evolution import DescribeNew
from pg_replication.warehouse.staging import StagedChanges


class DrainApply:
    """Mixed into ``engine.SqlWarehouse``: uses its dialect hooks and the other parts."""

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
        statuses = self.statuses()
        # Tables the decode could not stage as planned (cdc._plan_or_fail): failed once, logged after.
        failed_now: dict[str, str] = {
            key: reason for key, reason in getattr(decoded, "failed", {}).items() if statuses.get(key, ("",))[0] != "failed"
        }
        staged: dict[str, list[StagedChanges]] = {}
        failed_sets: dict[str, str] = {}  # document sets whose refresh failed: held, the drain goes on
        pending: dict[str, dict] = {}  # columns each table's stored state gains in the transaction
        names: list[str] = []
        try:
            for key, batch in decoded.batches.items():
                plan = decoded.plans[key]
                status = statuses.get(key, ("backfilling", None))[0]
                staged[key] = []
                for segment in batch.segments:
                    if isinstance(segment, StagedPart):  # a large streamed transaction's, staged already
                        staged[key].append(
                            StagedChanges(segment.relation, segment.columns, segment.truncated, segment.rows, segment.has_unknowns)
                        )
                        continue
                    name = f"pgr_changes_{len(names)}"
                    names.append(name)
                    relation = self.stage(name, staged_table(segment, len(plan.table.primary_key)))
                    staged[key].append(
                        StagedChanges(relation, segment.columns, segment.truncated, len(segment.rows), segment.has_unknowns)
                    )
                if key in failed_now or status == "failed":  # logged, never applied: no DDL on its table
                    self.ensure_log(plan.table, _all_columns(batch))
                    continue
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
                    outcomes = self._apply_drain_once(
                        decoded, staged, pending, failed_now, failed_sets, target_lsn, slot, failpoint, read_rows
                    )
                    for key, reason in resynced.items():
                        if key in outcomes:
                            outcomes[key] = replace(outcomes[key], mode="resynced", error=reason)
                    return outcomes
                except _TableFailed as failure:
                    failed_now[failure.key] = failure.describe()
                    self.ensure_log(decoded.plans[failure.key].table, decoded.plans[failure.key].columns)
                except DocumentRefreshFailed as failure:  # one set's trouble is its own: again, with the set held
                    failed_sets[failure.name] = failure.reason
                    log(failure.reason)
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

    def _apply_drain_once(self, decoded, staged, pending, failed_now, failed_sets, target_lsn, slot, failpoint, read_rows) -> dict:
        outcomes = {}
        self.begin()
        try:
            expected = getattr(decoded, "drained_before", None)  # the slot drain's start; capture serializes itself
            if expected is not None:
                self._claim_cursor(slot, expected)
            for key in sorted(decoded.batches):  # sorted: a document build takes them in this order too
                self._lock_state(key)
            statuses = self.statuses()  # after the locks: a backfill that just completed is seen
            # maps the changed rows to their roots, before the changes (only the configured sets)
            documents = self.document_refresh(decoded, staged, failed_sets, getattr(decoded, "documents", None))
            for key, batch in decoded.batches.items():
                plan = decoded.plans[key]
                status, error = statuses.get(key, ("backfilling", None))
                if key in failed_now:
                    status, error = "failed", failed_now[key]
                added = pending.get(key) if status != "failed" else None
                if added:
                    self._store_columns(key, {**self.stored_columns(key), **added})
                if status == "streaming" or (status == "backfilling" and self.applies_while_backfilling):
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
            outcomes = DrainOutcomes(outcomes, documents.finish(), documents.problems)
            failpoint("mid_apply")
            pause("mid_apply")  # the race tests hold a drain here, its changes applied and not committed
            self._advance_coverage(getattr(decoded, "covered", ()), getattr(decoded, "drained_before", 0), target_lsn)
            self.set_drained_lsn(slot, target_lsn)
            self.commit()
            return outcomes
        except BaseException:
            with suppress(*self.errors):  # a lost connection cannot roll back: the original error tells
                self.rollback()
            raise


def _all_columns(batch) -> list[str]:
    """Every column a batch's segments carry (a rename mid-batch gives segments different ones)."""
    return list(dict.fromkeys(c for segment in batch.segments for c in segment.columns))


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
