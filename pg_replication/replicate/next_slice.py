"""The next slice's reader, opened while the warehouse still writes the slice before it.

A slice's readers are done with the source before the warehouse is done with their rows: the
last batches wait in the queue, then the eviction, the commit and the state rows follow. Opening
the next slice's reader then (its snapshot exported, its COPY streams started) lets the source
work through that tail instead of idling, and the next slice starts with batches ready (in the
2M-row run each slice had waited 0.5–1.3 s for its first; README, Benchmarks).

Only for a slice whose copy is a first one (a re-run must reopen its slice before its snapshot,
see ``Warehouse.reopen_for_rerun``), into a warehouse whose open connection is the only writer
(``sole_writer``): no other run can copy that slice or complete the backfill meanwhile. The
snapshot is exported after the previous slice's, as without the early open; it lives from then
until its slice commits (``SliceReader.opened_at``: the longest snapshot counts that time).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from pg_replication.source.catalog import Table
from pg_replication.source.snapshot import BackfillPlan, SliceReader

OpenReader = Callable[[Table, BackfillPlan, int], SliceReader]


class NextSlice:
    """Holds at most one reader opened early; ``close()`` (always, at the end of a backfill)
    closes one that was not taken."""

    def __init__(self, open_reader: OpenReader) -> None:
        self.open_reader = open_reader
        self._lock = threading.Lock()
        self._ready: tuple[Table, BackfillPlan, int, SliceReader] | None = None

    def opener(self, table: Table, plan: BackfillPlan, index: int) -> Callable[[], None]:
        """What the previous slice's last reader runs when the source has sent it everything."""

        def open_early() -> None:
            reader = self.open_reader(table, plan, index)
            reader.start()
            with self._lock:
                replaced, self._ready = self._ready, (table, plan, index, reader)
            if replaced is not None:
                replaced[3].close()

        return open_early

    def take(self, table: Table, plan: BackfillPlan, index: int) -> SliceReader | None:
        """The reader opened early for this slice, as the table and plan are now; None (and the
        early one closed) when it was opened for another, or before the table or plan changed."""
        ready = self._pop()
        if ready is None:
            return None
        if ready[:3] == (table, plan, index):
            return ready[3]
        ready[3].close()
        return None

    def close(self) -> None:
        ready = self._pop()
        if ready is not None:
            ready[3].close()

    def _pop(self) -> tuple[Table, BackfillPlan, int, SliceReader] | None:
        with self._lock:
            ready, self._ready = self._ready, None
        return ready
