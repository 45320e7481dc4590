"""Fold a stream of row changes into each table's net effect, keyed by primary key.

Applying a batch set-based (one DELETE + one INSERT per table) needs, for every key the batch
touched, its final state: deleted, or a full row. Unchanged-TOAST columns (pgoutput's 'u') are
filled from earlier changes in the batch when possible; the rest are marked unknown and the
warehouse fills them from the row it holds (``fill_key`` says which row, when the key changed).
A change of the relation's column set starts a new segment, applied in order after the last.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pg_replication.source.catalog import Table

Staged = str | None


@dataclass
class Upsert:
    values: list[Staged]
    unknown: set[int]  # column positions whose value the warehouse row must provide
    fill_key: tuple[Staged, ...]  # the warehouse row to take unknown values from


@dataclass
class Segment:
    """Changes to one table under one column set."""

    columns: tuple[str, ...]
    key_positions: tuple[int, ...]
    truncated: bool = False
    rows: dict[tuple[Staged, ...], Upsert | None] = field(default_factory=dict)  # None: deleted

    def key(self, values: list[Staged] | tuple[Staged, ...]) -> tuple[Staged, ...]:
        return tuple(values[i] for i in self.key_positions)

    def insert(self, values: list[Staged]) -> None:
        key = self.key(values)
        self.rows[key] = Upsert(values, set(), key)

    def update(self, values: list[Staged], unknown: set[int], old_key: tuple[Staged, ...] | None) -> None:
        key = self.key(values)
        source_key = old_key if old_key is not None and old_key != key else key
        before = self.rows.get(source_key)
        fill_key = source_key
        if unknown and isinstance(before, Upsert):
            for i in list(unknown):
                if i not in before.unknown:
                    values[i] = before.values[i]
                    unknown.discard(i)
            fill_key = before.fill_key
        if source_key != key:
            self.rows[source_key] = None  # the old key is gone
        self.rows[key] = Upsert(values, unknown, fill_key)

    def delete(self, key: tuple[Staged, ...]) -> None:
        self.rows[key] = None

    def truncate(self) -> None:
        self.rows.clear()
        self.truncated = True

    @property
    def has_unknowns(self) -> bool:
        return any(u is not None and u.unknown for u in self.rows.values())


@dataclass(frozen=True)
class StagedPart:
    """A folded segment written to the warehouse's stream staging (a large streamed transaction,
    ``streamed.py``), read back by ``relation`` when its transaction commits."""

    relation: str
    columns: tuple[str, ...]
    truncated: bool
    rows: int
    has_unknowns: bool


@dataclass
class TableStats:
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    truncated: int = 0
    first_lsn: int | None = None
    last_lsn: int | None = None
    last_commit_time: int | None = None  # µs since the Unix epoch

    def saw(self, lsn: int, commit_time: int) -> None:
        if self.first_lsn is None:
            self.first_lsn = lsn
        self.last_lsn = lsn
        self.last_commit_time = commit_time

    @property
    def changes(self) -> int:
        return self.inserted + self.updated + self.deleted + self.truncated


@dataclass
class TableBatch:
    """All segments of one table in one drain, in order, plus what the batch did, for metadata.
    A segment of a large streamed transaction may be staged in the warehouse already."""

    segments: list[Segment | StagedPart] = field(default_factory=list)
    stats: TableStats = field(default_factory=TableStats)

    def segment(self, columns: tuple[str, ...], key_positions: tuple[int, ...]) -> Segment:
        last = self.segments[-1] if self.segments else None
        if not isinstance(last, Segment) or last.columns != columns:
            last = Segment(columns, key_positions)
            self.segments.append(last)
        return last

    def add(self, part: Segment | StagedPart) -> None:
        """Append a part folded elsewhere (a streamed transaction's), applied after the others."""
        self.segments.append(part)


@dataclass
class TableOutcome:
    """What one drain did to one table."""

    table: Table
    stats: TableStats
    mode: str  # applied, logged (backfilling), failed (this drain), held (failed before), resynced
    rows_now: int | None = None
    error: str | None = None
