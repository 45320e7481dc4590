"""A CDC drain between a backfill's slices, so a long backfill does not stop CDC for the others.

A backfill run holds the source pool for its whole step, and on DuckDB the warehouse file with it
(one writer process per file): the CDC drain run waits for both. So between two of its slices,
when it holds neither a snapshot nor a warehouse transaction, the backfill drains one bounded
batch of the slot itself, through the warehouse it already has open. CDC then pauses for one
slice's copy at most (``backfill.max_snapshot_bytes`` of heap), never for the whole backfill.

The drain covers every table of the slot (a drain of fewer tables would move the slot past the
others' changes). Where a drain run holds the slot at the same time (a pool admitting several
steps, a warehouse taking parallel writers), the slot is busy: this drain gives way and the run
drains as usual.

Most of the time between two slices the slot holds nothing (no WAL written since the last
drain confirmed it): one query says so, and the drain, whose quiet wait and replication session
cost about a third of a second, is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pg_replication.replicate.cdc import DrainResult, DrainSettings, drain_once
from pg_replication.replicate.drain_loop import retryable
from pg_replication.source.pgoutput import int_to_lsn
from pg_replication.source.catalog import Table
from pg_replication.source.connection import connect


def drain_between_slices(
    conninfo: str,
    warehouse,
    tables: Sequence[Table],
    settings: DrainSettings,
    report: Callable[[DrainResult], None],
    log: Callable[[str], None],
    warn: Callable[[str], None],
) -> DrainBetweenSlices:
    """The ``between_slices`` hook of ``run_backfill``: drain one batch, hand its result to
    ``report``. A failure of the drain never fails the backfill: the drain run meets it too."""
    return DrainBetweenSlices(conninfo, warehouse, list(tables), settings, report, log, warn)


@dataclass
class DrainBetweenSlices:
    conninfo: str
    warehouse: Any
    tables: list[Table]
    settings: DrainSettings
    report: Callable[[DrainResult], None]
    log: Callable[[str], None]
    warn: Callable[[str], None]

    def idle(self) -> bool:
        """Whether a call would do nothing (run_backfill then keeps the next slice's reader,
        which it closes before a drain: no drain runs while the backfill holds a snapshot)."""
        if not self.tables:
            return True
        try:
            return nothing_to_drain(self.conninfo, self.settings.slot, self.warehouse.drained_lsn(self.settings.slot))
        except Exception:  # the drain meets it, and says so
            return False

    def __call__(self) -> None:
        if self.idle():
            return
        try:
            result = drain_once(self.conninfo, self.warehouse, self.tables, self.settings, self.log)
        except Exception as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if retryable(exc):  # e.g. a drain run holds the slot: it applies the changes
                self.log(f"no drain between slices this time: {first_line}")
            else:
                self.warn(f"the drain between backfill slices failed, the backfill goes on (the CDC drain run will report it): {first_line}")
            return
        self.report(result)


def nothing_to_drain(conninfo: str, slot: str, drained: int | None) -> bool:
    """True when a drain could find nothing: the warehouse has applied exactly what the slot
    confirmed, nobody holds the slot, and no WAL record was written past it (the insert position,
    not the flushed one: a commit not yet flushed still counts). Anything else, drain."""
    if drained is None:
        return False
    with connect(conninfo) as conn:
        row = conn.execute(
            "SELECT NOT active AND confirmed_flush_lsn = %s::pg_lsn AND confirmed_flush_lsn >= pg_current_wal_insert_lsn() "
            "FROM pg_replication_slots WHERE slot_name = %s AND database = current_database()",
            (int_to_lsn(drained), slot),
        ).fetchone()
    return bool(row and row[0])
