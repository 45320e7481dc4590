"""A long-lived drain: micro-batches, one after another, until a time budget is spent.

The slot is read through replication sessions (drain_session.py): one lasts as long as batches
keep coming, each batch one warehouse transaction holding its data and its position, the slot
confirmed after it. Once a session finds nothing left, the slot is watched by a probe session
that consumes nothing (source/slot_probe.py) and a new session starts when it sees a change.
Captured changes (strategy triggers) are drained after each batch of the slot. Nothing is held
between batches: the warehouse can be opened for each of its calls only (``WarehousePerCall``:
a DuckDB file stays readable by other processes while the run is up). A transient error
(errors.is_transient, a source briefly away, a busy slot) ends the session and is retried with
backoff in a new one until the budget ends; only then does it fail the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, closing, nullcontext
from dataclasses import dataclass

from pg_replication.replicate.capture import CaptureSettings, drain_captured
from pg_replication.replicate.cdc import DrainResult, DrainSettings
from pg_replication.replicate.drain_session import drain_session
from pg_replication.errors import PgReplicationError, WarehouseError, is_transient
from pg_replication.source.catalog import Table
from pg_replication.source.connection import connect
from pg_replication.source.slot_probe import longest_probe, probe_slot


@dataclass(frozen=True)
class LoopSettings:
    run_seconds: float  # 0: one batch, as a run per sensor tick did
    idle_wait: float = 10.0  # longest wait on an idle slot before a batch that only advances it
    backoff: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


@dataclass(frozen=True)
class Batch:
    """One micro-batch: a batch of the slot and the captured changes drained after it."""

    slot: DrainResult | None = None
    captured: DrainResult | None = None

    @property
    def applied_nothing(self) -> bool:
        return all(r.changes == 0 and r.caught_up for r in (self.slot, self.captured) if r is not None)


def retryable(exc: BaseException) -> bool:
    """Worth another try in a moment without anyone fixing anything."""
    if is_transient(exc):
        return True
    # A source briefly away, a busy slot, a concurrent drain; a warehouse refusal that is not
    # transient needs a fix (its table is failed, not retried).
    return isinstance(exc, PgReplicationError) and exc.retryable and not isinstance(exc, WarehouseError)


def drain_batches(
    sessions: Callable[[float], Iterator[Batch]],
    wait_for_changes: Callable[[float], bool],
    settings: LoopSettings,
    log: Callable[[str], None],
    *,
    hand_over: Callable[[], bool] = lambda: False,
) -> Iterator[Batch]:
    """Yield the batches of ``sessions(seconds_left)``, one session after another, until
    ``settings.run_seconds`` have passed (at least one batch).

    A session that ends with a batch that found nothing is followed by ``wait_for_changes
    (seconds)`` on the source (True: changes wait; False: still nothing, the next session's batch
    then only advances the position); an error worth retrying, by a new session after a backoff.
    ``hand_over()`` True ends the run after the batch just yielded: another run waits for what
    this one holds (its pool slot)."""
    deadline = time.monotonic() + settings.run_seconds
    failures = 0
    while True:
        last = None
        try:
            with closing(sessions(max(0.0, deadline - time.monotonic()))) as batches:
                for last in batches:
                    failures = 0
                    yield last
                    if time.monotonic() >= deadline or hand_over():
                        return
        except Exception as exc:
            if not retryable(exc) or time.monotonic() >= deadline:
                raise
            delay = settings.backoff[min(failures, len(settings.backoff) - 1)]
            failures += 1
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log(f"transient error, batch retried in {delay:.1f} s (attempt {failures + 1}): {first_line}")
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            return
        if last is None or last.applied_nothing:
            wait_for_changes(min(settings.idle_wait, left))


def drain_run(
    conninfo: str,
    open_warehouse: Callable[[], AbstractContextManager],
    slot_tables: list[Table],
    captured_tables: list[Table],
    read: DrainSettings,
    loop: LoopSettings,
    log: Callable[[str], None],
    *,
    per_call: bool = False,
    capture: CaptureSettings = CaptureSettings(),
    hand_over: Callable[[], bool] = lambda: False,
) -> Iterator[Batch]:
    """The drain job's work: the slot's tables through replication sessions, the captured tables
    after each batch, until ``loop.run_seconds`` have passed (``drain_batches``). ``per_call``:
    the warehouse is opened for each of its calls (``WarehousePerCall``); otherwise once per
    session (a broken connection is not kept past its error)."""
    per_call_warehouse = WarehousePerCall(open_warehouse) if per_call else None
    position = {"lsn": 0}  # where the last batch of the slot ended: the probe reads from there

    def sessions(seconds: float) -> Iterator[Batch]:
        with (nullcontext(per_call_warehouse) if per_call_warehouse is not None else open_warehouse()) as wh:
            if not slot_tables:
                yield Batch(captured=drain_captured(conninfo, wh, captured_tables, capture, log))
                return
            with closing(drain_session(conninfo, wh, slot_tables, read, log, max_seconds=seconds)) as results:
                for result in results:
                    position["lsn"] = result.drained_lsn
                    captured, error = None, None
                    try:
                        captured = drain_captured(conninfo, wh, captured_tables, capture, log) if captured_tables else None
                    except Exception as exc:  # the slot's batch is committed: reported before the error
                        error = exc
                    yield Batch(result, captured)
                    if error is not None:
                        raise error

    probe_seconds: list[float] = []

    def wait_for_changes(seconds: float) -> bool:
        if not slot_tables or captured_tables:  # captured changes are polled
            time.sleep(min(seconds, 1.0))
            return False
        try:
            if not probe_seconds:
                with connect(conninfo) as conn:
                    probe_seconds.append(longest_probe(conn))
            found = probe_slot(conninfo, read.slot, read.publication, position["lsn"], until_lsn=None, timeout=min(seconds, probe_seconds[0]))
        except Exception as exc:  # the next session meets (and retries) whatever this was
            log(f"waiting on the slot: {exc}")
            return True
        return found.has_changes

    return drain_batches(sessions, wait_for_changes, loop, log, hand_over=hand_over)


class WarehousePerCall:
    """A warehouse that holds its connection only while one of its methods runs: each call opens
    it, calls, and closes it. A drain's calls (its position, identity checks, each staged part of
    a large streamed transaction, the apply of a batch) are each complete on their own; between
    them, during the read from the slot and while the run waits, another process can open the
    file (DuckDB allows one writer, or readers)."""

    def __init__(self, open_warehouse: Callable[[], AbstractContextManager]) -> None:
        self._open = open_warehouse
        self._mapper: Callable | None = None

    def map_column(self, column):
        """Type mappings depend on the warehouse kind only; learnt once from an open warehouse."""
        if self._mapper is None:
            with self._open() as wh:
                self._mapper = wh.map_column
        return self._mapper(column)

    def __getattr__(self, name: str):
        def call(*args, **kwargs):
            with self._open() as wh:
                if self._mapper is None:
                    self._mapper = wh.map_column
                return getattr(wh, name)(*args, **kwargs)

        call.__name__ = name
        return call
