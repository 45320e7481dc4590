"""Large transactions the server streams while they are still in progress (pgoutput protocol 2).

Between a Stream Start and its Stop come changes of one open transaction; its blocks interleave
with ordinary transactions and end in a Stream Commit (applied then, in commit order) or a Stream
Abort (of the whole transaction, or of one subtransaction: only that subtransaction's changes go).

Each open transaction's changes are folded per table into segments, a new one whenever the
subtransaction or the column set changes, so a rolled-back subtransaction drops whole segments.
Once a transaction holds ``spill_bytes`` of messages in memory, its segments are written to the
warehouse's stream staging (``spill``) and only references (``StagedPart``) stay: memory is
bounded however large the transaction. Staged parts are trusted within one replication session
only: a new session re-sends every open transaction from its first change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pg_replication.replicate.changes import Segment, StagedPart, TableBatch, TableStats, Upsert
from pg_replication.failpoints import failpoint

# spill(xid, subxid, table key, segment) -> the staged part; discard(xid, subxid or None: all)
Spill = Callable[[int, int, str, Segment], StagedPart]
Discard = Callable[[int, int | None], None]


@dataclass
class _Run:
    """Consecutive changes to one table by one subtransaction under one column set."""

    subxid: int
    part: Segment | StagedPart
    stats: TableStats = field(default_factory=TableStats)


@dataclass
class StreamedTransaction:
    xid: int
    runs: dict[str, list[_Run]] = field(default_factory=dict)  # table key: runs in order
    bytes: int = 0  # messages held in memory (not spilled yet)
    staged: bool = False  # some runs were spilled to the warehouse
    # Relation messages of its blocks (oid: the reader's plan) and why a table's changes in it
    # cannot be applied: they count only once it commits (an aborted ALTER never happened).
    relations: dict[int, object] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def segment(self, key: str, subxid: int, columns: tuple[str, ...], key_positions: tuple[int, ...]) -> tuple[Segment, TableStats]:
        runs = self.runs.setdefault(key, [])
        last = runs[-1] if runs else None
        if last is None or last.subxid != subxid or not isinstance(last.part, Segment) or last.part.columns != columns:
            last = _Run(subxid, Segment(columns, key_positions))
            runs.append(last)
        return last.part, last.stats  # type: ignore[return-value]


class StreamedTransactions:
    """The open streamed transactions of one replication session."""

    def __init__(self, spill: Spill, discard: Discard, spill_bytes: int) -> None:
        self._spill, self._discard, self.spill_bytes = spill, discard, spill_bytes
        self.open: dict[int, StreamedTransaction] = {}
        self.current: StreamedTransaction | None = None  # the block being read
        self.parts_staged = 0

    @classmethod
    def staged_in(cls, warehouse, slot: str, spill_bytes: int, *, empty: bool = True) -> StreamedTransactions:
        """Open transactions spilled to ``warehouse``'s stream staging for ``slot``. What an
        earlier drain staged is never trusted (its transactions are re-sent from their start):
        emptied first (``empty``; a later batch of the same session that staged nothing before
        it finds it empty)."""
        if empty:
            warehouse.reset_stream_staging(slot)
        parts = iter(range(1, 1 << 62))

        def spill(xid: int, subxid: int, key: str, segment: Segment) -> StagedPart:
            part = warehouse.stage_stream_part(slot, xid, subxid, next(parts), segment, len(segment.key_positions))
            failpoint("stream_staged")
            return part

        def discard(xid: int, subxid: int | None) -> None:
            warehouse.discard_stream(slot, xid, subxid)

        return cls(spill, discard, spill_bytes)

    @property
    def held_bytes(self) -> int:
        return sum(t.bytes for t in self.open.values())

    def start(self, xid: int, first_segment: bool) -> None:
        if first_segment and xid in self.open:  # cannot happen within a session; start clean
            self.abort(xid, xid)
        self.current = self.open.setdefault(xid, StreamedTransaction(xid))

    def stop(self) -> None:
        self.current = None

    def held(self, nbytes: int) -> None:
        """Count a message of the current block; spill the transaction past ``spill_bytes``."""
        txn = self.current
        assert txn is not None
        txn.bytes += nbytes
        if txn.bytes >= self.spill_bytes:
            self.spill(txn)

    def spill(self, txn: StreamedTransaction) -> None:
        for key, runs in txn.runs.items():
            for run in runs:
                if isinstance(run.part, Segment) and (run.part.rows or run.part.truncated):
                    run.part = self._spill(txn.xid, run.subxid, key, run.part)
                    txn.staged = True
                    self.parts_staged += 1
        for runs in txn.runs.values():  # an empty segment left behind holds nothing: drop it
            runs[:] = [r for r in runs if not (isinstance(r.part, Segment) and not r.part.rows and not r.part.truncated)]
        txn.bytes = 0

    def abort(self, xid: int, subxid: int) -> None:
        txn = self.open.get(xid)
        if txn is None:
            return  # nothing of it was streamed in this session
        if subxid == xid:
            del self.open[xid]
        else:
            for runs in txn.runs.values():
                runs[:] = [r for r in runs if r.subxid != subxid]
        if txn.staged:
            self._discard(xid, None if subxid == xid else subxid)

    def commit(self, xid: int, batches: dict[str, TableBatch], lsn: int, commit_time: int) -> int:
        """Append the transaction's parts, in order, to each table's batch; returns its changes."""
        txn = self.open.pop(xid, None)
        if txn is None:
            return 0
        changes = 0
        for key, runs in txn.runs.items():
            batch = batches.get(key)
            if batch is None:
                batch = batches[key] = TableBatch()
            for run in _merged(runs):
                batch.add(run.part)
                s, total = run.stats, batch.stats
                total.inserted += s.inserted
                total.updated += s.updated
                total.deleted += s.deleted
                total.truncated += s.truncated
                changes += s.changes
            if runs:
                batch.stats.saw(lsn, commit_time)
        return changes


def _merged(runs: list[_Run]) -> list[_Run]:
    """Consecutive in-memory segments with one column set folded into one, now that the
    transaction committed and no subtransaction can be rolled back: one segment to apply
    instead of one per subtransaction (a PL/pgSQL loop with an EXCEPTION block makes one per row)."""
    out: list[_Run] = []
    for run in runs:
        prev = out[-1] if out else None
        if prev is None or not isinstance(prev.part, Segment) or not isinstance(run.part, Segment) or prev.part.columns != run.part.columns:
            out.append(run)
            continue
        _fold_into(prev.part, run.part)
        a, b = prev.stats, run.stats
        a.inserted, a.updated, a.deleted, a.truncated = (
            a.inserted + b.inserted, a.updated + b.updated, a.deleted + b.deleted, a.truncated + b.truncated
        )
    return out


def _fold_into(into: Segment, later: Segment) -> None:
    """Fold ``later`` into ``into`` so that applying ``into`` does what applying both in order
    would (as ``Segment.update`` folds one change): values ``later`` keeps from the warehouse row
    come from ``into``'s version of that row when it has one."""
    if later.truncated:
        into.truncate()
    resolved = []  # looked up first: ``into`` as it was, not as ``later`` rewrites it
    for key, upsert in later.rows.items():
        if upsert is not None and upsert.unknown:
            known = into.rows.get(upsert.fill_key)
            if isinstance(known, Upsert):
                values, unknown = list(upsert.values), set(upsert.unknown)
                for i in list(unknown):
                    if i not in known.unknown:
                        values[i] = known.values[i]
                        unknown.discard(i)
                upsert = Upsert(values, unknown, known.fill_key)
        resolved.append((key, upsert))
    into.rows.update(resolved)
