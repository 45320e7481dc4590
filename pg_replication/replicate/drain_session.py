"""Many batches through one replication session, each applied while the next one is read.

``cdc.drain_once`` opens a session per batch: the server then decodes again from the slot's
restart point (a batch or more behind), and the read waits while the warehouse applies. Here one
session reads batch after batch; batch N is applied in a worker thread while the main thread
reads batch N+1 (the stream reader waits on the server in C, and the warehouse drivers run their
statements, with the GIL released).

The read of batch N+1 ends at a commit once batch N has committed (after ``min_seconds`` at
least; ``max_seconds`` and the other bounds of ``DrainSettings`` hold as ever): N is reported
when that read ends, so the read lasts about as long as the apply beside it.

Exactly once, as in ``drain_once``: each batch is one warehouse transaction holding its changes
and its end position; batch N+1 is applied only after batch N committed (its compare-and-set
expects N's position); the slot is told a position (standby feedback, sent from the thread that
reads the stream: libpq's connection is not shared between threads) only once the warehouse has
committed it. A batch read while an apply fails is dropped unapplied, and the session ends.

The session lasts as long as batches keep coming: it ends after a batch that found the slot
caught up with nothing to apply (the caller then waits on a probe, source/slot_probe.py), once
``max_seconds`` have passed, or after a batch that held a large streamed transaction still open
or staged its parts (the stream staging is emptied after such a batch and the next session
re-sends what is open). A read that fails while a batch is applied ends the session too, once
that batch is committed and yielded: the slot hears of its position by SQL once the broken
session let go of it (``confirm_released``), or from the next session (``open_session``).

While a batch is applied, the next read writes to the warehouse only through a lock (the
staging of large streamed transactions), so the warehouse is used by one thread at a time: a
warehouse that opens a connection per call (drain_loop.WarehousePerCall) holds a DuckDB file
only while one of those calls runs. Each call is complete on its own: the position and identity
checks, each staged part of a streamed transaction, the apply of a batch (one transaction). The
apply thread's log lines are passed on from the reading thread, as each batch is yielded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from pg_replication.replicate.cdc import (
    DrainResult,
    DrainSettings,
    apply_batch,
    confirm_released,
    log_failed,
    open_session,
    read_batch,
)
from pg_replication.errors import PgReplicationError
from pg_replication.failpoints import failpoint
from pg_replication.source.catalog import Table
from pg_replication.source.connection import connect
from pg_replication.source.slot import flushed_lsn
from pg_replication.source.stream import SlotStream
from pg_replication.types import SESSION_OPTIONS


class _Locked:
    """The warehouse, each call made under ``lock`` (map_column is pure: not locked)."""

    def __init__(self, warehouse, lock: threading.Lock) -> None:
        self._warehouse, self._lock = warehouse, lock
        self.map_column = warehouse.map_column

    def __getattr__(self, name: str):
        method = getattr(self._warehouse, name)

        def call(*args, **kwargs):
            with self._lock:
                return method(*args, **kwargs)

        return call


def drain_session(
    conninfo: str,
    warehouse,
    tables: list[Table],
    settings: DrainSettings,
    log: Callable[[str], None] = lambda m: None,
    *,
    max_seconds: float = 60.0,
) -> Iterator[DrainResult]:
    """Drain batch after batch (each bounded by ``settings``) through one replication session,
    yielding each batch's result once the warehouse committed it; see the module docstring."""
    lock = threading.Lock()
    locked = _Locked(warehouse, lock)
    deadline = time.monotonic() + max_seconds
    committed = 0  # the last position the warehouse committed in this session
    with connect(conninfo, options=SESSION_OPTIONS) as conn, ThreadPoolExecutor(1, thread_name_prefix="pgr-apply") as applier:
        session = open_session(conn, warehouse, tables, settings, log)
        committed = session.confirmed
        pending: tuple[Future, DrainResult, float, list[str]] | None = None

        def finish(work: tuple[Future, DrainResult, float, list[str]]) -> DrainResult:
            nonlocal committed
            future, result, started, logged = work
            try:
                result.tables = future.result()
            finally:
                for line in logged:  # from this thread: a caller's logger need not be thread-safe
                    log(line)
            failpoint("after_commit")
            committed = result.drained_lsn
            result.seconds = time.monotonic() - started
            log_failed(result, log)
            return result

        def finish_pending() -> DrainResult:
            """The batch being applied, once committed; no longer pending even when it failed (the
            ``finally`` below must not wait for it, nor pass its log lines on, a second time)."""
            nonlocal pending
            work, pending = pending, None
            return finish(work)

        def enough(work: tuple[Future, DrainResult, float, list[str]] | None, started: float) -> Callable[[], bool] | None:
            """When the read of the next batch may end (at a commit): once the batch applied
            meanwhile has committed, and not before ``min_seconds``. That batch is reported only
            when this read ends: reading on would hold its report back for nothing."""
            if work is None:
                return None
            future, least = work[0], started + settings.min_seconds
            return lambda: future.done() and time.monotonic() >= least

        def confirm(stream: SlotStream, lsn: int) -> None:
            """Standby feedback, only once the warehouse has committed ``lsn``."""
            if lsn > session.confirmed:
                try:
                    stream.confirm(lsn)
                except PgReplicationError:
                    pass  # the stream broke during the apply: confirmed by SQL once it is let go (below)

        def apply(decoded, target: int, logged: list[str]):
            with lock:
                return apply_batch(conninfo, conn, warehouse, settings, decoded, target, logged.append)

        try:
            with SlotStream(conninfo, settings.slot, settings.publication, session.start, streaming=session.streaming) as stream:
                first = True
                while True:
                    started = time.monotonic()
                    try:
                        if not first:  # "caught up" means up to where the server was as this batch began
                            session.caught_up_at = flushed_lsn(conn)
                        # Only the first batch empties the stream staging: a batch that staged parts ends the session.
                        streams, first = session.streamed(locked, empty=first), False
                        decoded, result = read_batch(conn, locked, session, stream, streams, enough(pending, started))
                    except Exception:
                        if pending is not None:  # committed all the same: reported before the read's error
                            done = finish_pending()
                            yield done
                        raise
                    failpoint("after_read")
                    if pending is not None:
                        done = finish_pending()
                        confirm(stream, done.drained_lsn)
                        yield done
                    # The next batch starts where this one ends, once it has committed.
                    session.drained = session.start = result.drained_lsn
                    logged: list[str] = []
                    pending = (applier.submit(apply, decoded, result.drained_lsn, logged), result, started, logged)
                    last = (result.caught_up and result.changes == 0) or time.monotonic() >= deadline
                    if streams is not None and (streams.open or streams.parts_staged):
                        last = True  # the stream staging is emptied after the apply: see the module docstring
                    if last:
                        done = finish_pending()
                        confirm(stream, done.drained_lsn)
                        if streams is not None and streams.parts_staged:
                            warehouse.reset_stream_staging(settings.slot)  # applied, or to be re-sent to the next session
                        yield done
                        return
        finally:
            if pending is not None:  # the caller stopped (or the read broke) while a batch was applied
                try:
                    finish(pending)
                except BaseException:
                    pass  # not committed: nothing to confirm; the read's error (if any) tells
            confirm_released(conn, settings.slot, committed)


__all__ = ["drain_session"]
