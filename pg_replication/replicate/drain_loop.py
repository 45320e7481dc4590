"""A long-lived drain: micro-batches, one after another, until a time budget is spent.

Each batch is one ``drain_once`` (one warehouse transaction holding its data and its position,
the slot confirmed after it). Between batches nothing is held: the warehouse is opened for each of
its calls only (``WarehousePerCall``: a DuckDB file stays readable by other processes while the
run is up) and an idle slot is watched by a probe session that consumes nothing
(source/slot_probe.py). A transient error (errors.is_transient, a source briefly away, a busy
slot) is retried with backoff until the budget ends; only then does it fail the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

from pg_replication.replicate.cdc import DrainResult
from pg_replication.errors import PgReplicationError, WarehouseError, is_transient


@dataclass(frozen=True)
class LoopSettings:
    run_seconds: float  # 0: one batch, as a run per sensor tick did
    idle_wait: float = 10.0  # longest wait on an idle slot before a batch that only advances it
    backoff: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


@dataclass(frozen=True)
class Batch:
    """What one turn of the loop did: its drain of the slot and of the captured changes."""

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
    batch: Callable[[], Batch],
    wait_for_changes: Callable[[float], bool],
    settings: LoopSettings,
    log: Callable[[str], None],
    *,
    hand_over: Callable[[], bool] = lambda: False,
) -> Iterator[Batch]:
    """Run ``batch`` until ``settings.run_seconds`` have passed (at least once), yielding each.

    After a batch that found nothing, ``wait_for_changes(seconds)`` waits on the source (True:
    changes wait; False: still nothing, a batch then only advances the position). ``hand_over()``
    True ends the run early: another run waits for what this one holds (its pool slot)."""
    deadline = time.monotonic() + settings.run_seconds
    failures = 0
    while True:
        try:
            done = batch()
        except Exception as exc:
            if not retryable(exc) or time.monotonic() >= deadline:
                raise
            delay = settings.backoff[min(failures, len(settings.backoff) - 1)]
            failures += 1
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log(f"transient error, batch retried in {delay:.1f} s (attempt {failures + 1}): {first_line}")
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            continue
        failures = 0
        yield done
        left = deadline - time.monotonic()
        if left <= 0 or hand_over():
            return
        if done.applied_nothing:
            wait_for_changes(min(settings.idle_wait, left))


class WarehousePerCall:
    """A warehouse that holds its connection only while one of its methods runs: each call opens
    it, calls, and closes it. A drain's calls (its position, identity checks, the apply of a
    batch) are each complete on their own; between them, during the read from the slot and while
    the run waits, another process can open the file (DuckDB allows one writer, or readers)."""

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
