"""The warehouse protocol: what every target must do, and what it guarantees.

Contract:
- ``ensure_table`` creates the warehouse table from the source's catalog (primary key declared)
  or evolves it, decided from the warehouse's stored columns (evolution.py): new source columns
  are added with Postgres's value for existing rows; renames and widening type changes are
  followed; any other type change or an unknowable value raises SchemaChangeError naming the
  column; a dropped source column is kept (nullable) so no data is lost.
- ``write_slice`` replaces exactly the rows one backfill slice wrote before and records the
  slice as done, in one transaction: a failure leaves the table and the state as they were.
  Re-running a slice any number of times gives the same result.
- Replication state (plan, slices, schema, applied LSN) lives in the warehouse itself, in the
  ``_pg_replication`` schema, and is only ever written in the same transaction as the data it
  describes. Stored progress never moves backward.
- ``read_batches`` streams a table back for downstream consumers, a bounded number of rows at
  a time.
- Writers of one table's state wait for each other (a lock on its state row); the Dagster layer
  also limits writers with pools (DuckDB takes one writing process).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa
from psycopg import sql

from pg_replication.source.catalog import Table
from pg_replication.source.recovery import RowReader
from pg_replication.source.snapshot import BackfillPlan
from pg_replication.warehouse.evolution import DescribeNew


def quote(*names: str) -> str:
    """Quote an identifier (or a dotted path of them) for the warehouse, via psycopg's composition."""
    return sql.Identifier(*names).as_string()


def table_key(table: Table) -> str:
    """The table's name in state, logs and drain results: ``schema.table``."""
    return f"{table.schema}.{table.name}"


STATE_SCHEMA = "_pg_replication"
SLICE_COLUMN = "_pg_slice"


@dataclass(frozen=True)
class SliceResult:
    rows: int
    bytes: int
    documents: dict[str, int] = field(default_factory=dict)  # a sync: documents recomputed per set
    document_problems: dict[str, str] = field(default_factory=dict)  # a sync: why it left a set as it was


@dataclass(frozen=True)
class Written:
    """In place of a staged relation (slice_relations): rows the dialect wrote into the target
    table itself, tagged with the slice's number."""

    rows: int
    bytes: int


@dataclass(frozen=True)
class TableState:
    table_key: str
    plan: BackfillPlan | None
    slices_done: frozenset[int]
    status: str = "backfilling"  # backfilling, streaming, failed, paused


Progress = Callable[[int, int], None]  # (rows so far, bytes so far)
KeyCheck = Callable[[list[tuple]], set[tuple]]  # which of these primary keys the source still has


class Warehouse(Protocol):
    name: str
    evicts_fresh_rows: bool  # slices are read with source.snapshot.FRESH_COLUMN (see SliceWriter)
    # While it is open, no other run writes to it (a DuckDB file has one write connection): a
    # backfill may open its next slice early (replicate/next_slice.py).
    sole_writer: bool

    def ensure_table(self, table: Table, describe_new: DescribeNew = ...) -> None:
        """Create the table, or follow the source's columns; ``describe_new(names)`` reads, for
        columns the warehouse lacks, their attribute number and Postgres's missing value."""
        ...

    def stored_columns(self, key: str) -> dict[str, dict[str, str]]:
        """The warehouse columns of table ``schema.name``: {name: {"duckdb": type, "load": expr}}."""
        ...

    def load_state(self, table: Table) -> TableState: ...

    def save_plan(self, table: Table, plan: BackfillPlan) -> BackfillPlan:
        """Store the plan unless one exists; return the stored one (first writer wins)."""
        ...

    def replace_plan(self, table: Table, stale: BackfillPlan, plan: BackfillPlan, rerun: int) -> BackfillPlan:
        """Replace ``stale`` by ``plan`` unless another run replaced it first; return the stored
        plan. Slice ``rerun`` counts as not copied until copied again."""
        ...

    def write_slice(
        self,
        table: Table,
        index: int,
        batches: Iterable[pa.RecordBatch],
        progress: Progress | None = None,
        still_in_source: KeyCheck | None = None,
        read_rows: RowReader | None = None,
        plan: BackfillPlan | None = None,
    ) -> SliceResult:
        """Replace the slice's rows; rows it held before that the source no longer has are
        deleted, rows an update moved elsewhere stay. When this completes the backfill, the
        table's change log is replayed and the table starts streaming, in the same transaction;
        a logged change that keeps a value of a row the warehouse does not hold is completed
        from the source (``read_rows``), never written as NULL."""
        ...

    def row_count(self, table: Table) -> int: ...

    def read_batches(self, schema: str, name: str, batch_rows: int = ...) -> pa.RecordBatchReader:
        """The replicated table ``schema.name`` (its source columns) as Arrow batches of at most
        ``batch_rows`` rows, fetched as the reader is consumed: memory holds a batch or so,
        never the table (reads.py). The connection must stay open while the reader is read."""
        ...

    def table_name(self, table: Table) -> str: ...

    # -- CDC --------------------------------------------------------------------------------

    def drained_lsn(self, slot: str) -> int | None:
        """The end of the last change batch committed for this slot (None before the first)."""
        ...

    def apply_drain(
        self,
        decoded,
        target_lsn: int,
        slot: str,
        describe_new: Callable[[Table], DescribeNew],
        read_rows: Callable[[Table], RowReader] | None = None,
    ) -> dict:
        """In one transaction: apply each streaming table's folded changes (or append them to the
        change log of a table still backfilling or failed), then record ``target_lsn`` as drained.
        A table the warehouse refuses is marked failed and logged instead; the others commit.
        Unchanged-TOAST values whose warehouse row is missing are read from the source
        (``read_rows(table)``). Returns the outcome per table (``cdc.TableOutcome``)."""
        ...

    def restart_if_gap(self, table: Table, now, drained: int) -> str | None:
        """Reset a planned table whose relation identity, publication entry or drain coverage
        shows a gap in its stream (source/relation_identity.py) to backfilling; return the reason."""
        ...

    def statuses(self) -> dict[str, tuple[str, str | None]]:
        """{table key: (status, error)}: backfilling, streaming or failed."""
        ...

    def reset_table(self, table: Table) -> None:
        """Forget the table: data, plan, slices, change log (a resync)."""
        ...

    def reset_cursor(self, slot: str) -> None:
        """Forget the drained position (after the slot was dropped)."""
        ...
