"""Backfill one table's partitions into a warehouse: plan once, then copy slice by slice.

A partition is one or several short slices (see source/snapshot.py), each copied under its own
snapshot and committed on its own; between two of them the caller's ``between_slices`` runs (the
IO manager drains the slot there, so a long backfill holding the warehouse does not stop CDC).

No Dagster here: the IO managers call ``run_backfill`` and report what it returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from pg_replication.errors import PlanMismatchError
from pg_replication.failpoints import failpoint
from pg_replication.replicate.next_slice import NextSlice
from pg_replication.source.catalog import Table, describe_new_columns, refresh_table
from pg_replication.source.connection import connect
from pg_replication.source.recovery import row_reader
from pg_replication.source.replica_identity import check_declared_key
from pg_replication.source.relation_identity import relation_identity
from pg_replication.source.inflight import wait_for_writers
from pg_replication.source.pgoutput import lsn_to_int
from pg_replication.source.slot import add_to_publication, ensure_slot
from pg_replication.source.snapshot import (
    BackfillPlan, PlanStaleError, SliceReader, fresh_horizon, keys_in_source, make_plan, replan,
)
from pg_replication.source.triggers import require_capture
from pg_replication.source.watermarks import Watermark, initial_mark
from pg_replication.types import SESSION_OPTIONS
from pg_replication.warehouse.base import SliceResult, Warehouse

PROGRESS_EVERY_SECONDS = 5.0
REPLAN_ATTEMPTS = 5  # rewrites racing each slice this often are not plausible: fail loudly then


@dataclass(frozen=True)
class BackfillResult:
    rows: int
    bytes: int
    seconds: float
    slices: tuple[int, ...]  # the partitions copied
    plan_lsn: str
    snapshots: int = 0  # the slices copied, each under its own snapshot
    longest_snapshot_seconds: float = 0.0
    documents: dict[str, int] = field(default_factory=dict)  # document sets built again after the slices

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class SlotSettings:
    slot: str
    publication: str


def ensure_plan(
    conninfo: str,
    warehouse: Warehouse,
    table: Table,
    partitions: int,
    cdc: SlotSettings | None = None,
    max_snapshot_bytes: int | None = None,
) -> BackfillPlan:
    """The stored plan, or a new one. With CDC, the slot exists and the table is published
    before the plan's LSN is read, and that before any page is counted: every change the
    slices might miss is after the plan LSN, in the slot. Transactions that wrote the table
    before it was published end before the LSN is read (see source/inflight.py): their changes
    may be decoded as unpublished, so the slices must see them."""
    plan = warehouse.load_state(table).plan
    if plan is None:
        strategy = table.strategy
        identity = None
        with connect(conninfo, options=SESSION_OPTIONS) as conn:
            # First: every row version older than this is seen by the key check below.
            fresh_before = fresh_horizon(conn, table)
            check_declared_key(conn, table)  # reads the table: once, here, not at load
            if cdc is not None and strategy == "cdc":
                # Publication first: decoding reads the catalog as of each change, and a slot
                # older than its publication fails on the changes from before it existed.
                add_to_publication(conn, cdc.publication, table)
                ensure_slot(conn, cdc.slot)
                # Always, not only when we just added it: a drain may have published it.
                wait_for_writers(conn, table)
            if strategy == "triggers":
                require_capture(conn, table)  # changes from here on are captured
            lsn = str(conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0])  # type: ignore[index]
            if cdc is not None and strategy == "cdc":  # the relation whose changes follow the plan
                now = relation_identity(conn, cdc.publication, table)
                identity = {"relation_oid": now.oid, "publication_member": now.member, "covered_lsn": lsn_to_int(lsn)}
            # Read before the pages are counted: every row the slices might miss is past it.
            mark = Watermark(initial_mark(conn, table)).to_json()
            plan = warehouse.save_plan(table, make_plan(conn, table, partitions, lsn, max_snapshot_bytes, fresh_before), mark, identity)
    if plan.partitions != partitions:
        raise PlanMismatchError(
            f"{table.display}: the stored backfill plan has {plan.partitions} partitions "
            f"but replication.yaml now asks for {partitions}",
            table=table.display,
            lsn=plan.lsn,
        )
    return plan


def current_table(conninfo: str, warehouse: Warehouse, table: Table) -> Table:
    """Re-read the table from the catalog and make the warehouse table match it."""
    with connect(conninfo) as conn:
        table = refresh_table(conn, table)
        warehouse.ensure_table(table, lambda names: describe_new_columns(conn, table, names))
    return table


def run_backfill(
    conninfo: str,
    warehouse: Warehouse,
    table: Table,
    slices: Sequence[int],
    *,
    partitions: int,
    readers: int = 2,
    row_limit: int | None = None,
    cdc: SlotSettings | None = None,
    log: Callable[[str], None] = lambda _msg: None,
    max_snapshot_bytes: int | None = None,
    between_slices: Callable[[], None] | None = None,
    documents: Collection[str] | None = None,
) -> BackfillResult:
    """Copy partitions ``slices`` (each one or several snapshot slices, planned once with
    ``max_snapshot_bytes`` of heap at most per slice). ``between_slices`` runs after every slice
    but the last, with no warehouse transaction open and no snapshot but the next slice's
    (opened early into a ``sole_writer`` warehouse: next_slice.py); if it has an ``idle()`` that
    says it would do nothing, it is skipped. Then the
    ``documents`` sets (None: every set built) that a slice left stale are built again."""
    if cdc is not None and table.strategy == "cdc":
        with connect(conninfo) as conn:
            now = relation_identity(conn, cdc.publication, table)
        reason = warehouse.restart_if_gap(table, now, warehouse.drained_lsn(cdc.slot) or 0)
        if reason is not None:  # a plan for another relation, or a stream with a gap
            log(f"{table.display}: backfill restarted: {reason}")
    table = current_table(conninfo, warehouse, table)
    plan = ensure_plan(conninfo, warehouse, table, partitions, cdc, max_snapshot_bytes)
    per_slice_limit = -(-row_limit // len(plan.slices)) if row_limit else None
    started = time.monotonic()
    total_rows = total_bytes = 0
    # Slices keep their partition across re-plans (replan), so this list stays valid.
    work = [(partition, index) for partition in slices for index in plan.slices_of(partition)]
    longest = 0.0
    next_slice = NextSlice(
        lambda table, plan, index: SliceReader(
            conninfo, table, plan.slices[index], readers=readers, row_limit=per_slice_limit,
            mapper=warehouse.map_column, plan=plan, mark_fresh=warehouse.evicts_fresh_rows,
        )
    )
    try:
        for done, (partition, index) in enumerate(work):
            if done and between_slices is not None:
                idle = getattr(between_slices, "idle", None)
                if idle is None or not idle():
                    between_slices()
            following = work[done + 1][1] if done + 1 < len(work) and warehouse.sole_writer else None
            table, plan, result, seconds = _backfill_slice(
                conninfo, warehouse, table, plan, partition, index, per_slice_limit, log,
                name_slices=len(work) != len(slices), next_slice=next_slice, following=following,
            )
            total_rows += result.rows
            total_bytes += result.bytes
            longest = max(longest, seconds)
    finally:
        next_slice.close()
    rebuilt = warehouse.rebuild_stale_documents(documents, log)
    return BackfillResult(total_rows, total_bytes, time.monotonic() - started, tuple(slices), plan.lsn, len(work), longest, rebuilt)


def _backfill_slice(
    conninfo: str,
    warehouse: Warehouse,
    table: Table,
    plan: BackfillPlan,
    partition: int,
    index: int,
    per_slice_limit: int | None,
    log: Callable[[str], None],
    name_slices: bool,
    next_slice: NextSlice,
    following: int | None,
) -> tuple[Table, BackfillPlan, SliceResult, float]:
    """Copy one slice; returns the table and plan as they are after it, its result and the
    seconds its snapshot lived. ``following``: the slice after it, opened early (NextSlice)
    when its copy is a first one."""
    slice_started = last_report = time.monotonic()
    name = f"slice {index} (partition {partition})" if name_slices else f"slice {index}"

    def progress(rows: int, nbytes: int, index: int = index) -> None:
        nonlocal last_report
        now = time.monotonic()
        if now - last_report >= PROGRESS_EVERY_SECONDS:
            last_report = now
            rate = rows / max(now - slice_started, 1e-9)
            log(f"{table.display} {name}: {rows:,} rows, {nbytes / 2**20:,.0f} MiB, {rate:,.0f} rows/s")

    table = current_table(conninfo, warehouse, table)  # columns may change between slices
    if table.strategy in ("cdc", "triggers"):
        warehouse.reopen_for_rerun(table, index)
    still_in_source = keys_in_source(conninfo, table)
    read_rows = row_reader(conninfo, table, warehouse.map_column)
    if following is not None:
        state = warehouse.load_state(table)
        if following in state.slices_done or state.status == "streaming":
            following = None  # a re-run: its snapshot waits for reopen_for_rerun

    def write(reader: SliceReader, plan: BackfillPlan) -> SliceResult:
        if following is not None:
            reader.when_drained(next_slice.opener(table, plan, following))
        return warehouse.write_slice(table, index, reader, progress, still_in_source, read_rows, plan)

    result, plan, snapshot_seconds = _copy_slice(conninfo, warehouse, table, plan, index, log, write, next_slice)
    failpoint("after_slice")
    seconds = time.monotonic() - slice_started
    log(f"{table.display} {name} done: {result.rows:,} rows in {seconds:.1f} s")
    return table, plan, result, snapshot_seconds


def _copy_slice(
    conninfo: str,
    warehouse: Warehouse,
    table: Table,
    plan: BackfillPlan,
    index: int,
    log: Callable[[str], None],
    write: Callable[[SliceReader, BackfillPlan], SliceResult],
    next_slice: NextSlice,
) -> tuple[SliceResult, BackfillPlan, float]:
    """Copy slice ``index`` under ``plan``: its readers check the files the plan was cut from.
    After a rewrite (found at open or by a reader under its lock), or when another run re-planned
    meanwhile, re-plan and copy again. Returns the result, the plan, and how long the snapshot
    copied from lived (opened early by the slice before, it lived longer than this call)."""
    for attempt in range(REPLAN_ATTEMPTS):
        reader = None
        try:
            reader = next_slice.take(table, plan, index)
            if reader is None:
                reader = next_slice.open_reader(table, plan, index)
            result = write(reader, plan)
            return result, plan, time.monotonic() - reader.opened_at
        except PlanStaleError as stale:
            if attempt == REPLAN_ATTEMPTS - 1:
                raise
            log(f"{stale.message}; re-planning the slices not copied yet")
            plan = _replan(conninfo, warehouse, table, plan, index)
        finally:
            if reader is not None:
                reader.close()
    raise AssertionError("unreachable")


def _replan(conninfo: str, warehouse: Warehouse, table: Table, stale: BackfillPlan, index: int) -> BackfillPlan:
    """After a rewrite the rows sit on other pages, those of copied slices included. Every row
    the rewrite kept is copied again by the slices not copied yet (and the one this run copies
    now), which share the new file's pages; copied slices get none (their rows are in the
    warehouse, and re-copied ones replace them by key). The plan LSN stays: changes after it are
    in the slot whatever the pages."""
    done = warehouse.load_state(table).slices_done
    only = sorted({k for k in range(len(stale.slices)) if k not in done} | {index})
    with connect(conninfo, options=SESSION_OPTIONS) as conn:
        plan = replan(conn, table, stale, only)
    return warehouse.replace_plan(table, stale, plan, rerun=index)
