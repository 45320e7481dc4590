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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pg_replication.replicate.cdc import DrainResult, DrainSettings, drain_once
from pg_replication.replicate.drain_loop import retryable
from pg_replication.source.catalog import Table


def drain_between_slices(
    conninfo: str,
    warehouse,
    tables: Sequence[Table],
    settings: DrainSettings,
    report: Callable[[DrainResult], None],
    log: Callable[[str], None],
    warn: Callable[[str], None],
) -> Callable[[], None]:
    """The ``between_slices`` hook of ``run_backfill``: drain one batch, hand its result to
    ``report``. A failure of the drain never fails the backfill: the drain run meets it too."""
    tables = list(tables)

    def between() -> None:
        if not tables:
            return
        try:
            result = drain_once(conninfo, warehouse, tables, settings, log)
        except Exception as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if retryable(exc):  # e.g. a drain run holds the slot: it applies the changes
                log(f"no drain between slices this time: {first_line}")
            else:
                warn(f"the drain between backfill slices failed, the backfill goes on (the CDC drain run will report it): {first_line}")
            return
        report(result)

    return between
