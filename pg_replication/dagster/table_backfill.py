"""A table asset's work: copy the selected partitions through the engine's backfill, drain the
slot between its slices, and report both the Dagster way.

The backfill's own result is the asset's ``MaterializeResult``. The drains between slices apply
other tables' changes: each applied table gets an ``AssetMaterialization`` logged with
``context.log_event`` as the drain commits. Those tables are not in this asset's specs (a multi_asset
would otherwise have to materialize them on every backfill), and their events must reach the
instance while the backfill goes on (their lag plots move during a long backfill), not when the
body returns: the drain runs inside the engine's loop, through a callback, where nothing can be
yielded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import dagster as dg

from pg_replication.dagster.metadata import backfill_metadata, table_metadata
from pg_replication.dagster.resources import PostgresSource, WarehouseResource
from pg_replication.replicate.backfill import SlotSettings, run_backfill
from pg_replication.replicate.backfill_drain import drain_between_slices
from pg_replication.replicate.cdc import DrainResult, DrainSettings
from pg_replication.source.catalog import Table
from pg_replication.source.pgoutput import int_to_lsn


@dataclass(frozen=True)
class TableBackfill:
    """What one table asset copies, fixed when the definitions load."""

    table: Table
    partitions: int
    readers: int
    row_limit: int | None
    max_snapshot_bytes: int | None  # heap bytes per snapshot slice (replication.yaml backfill:)
    slot: SlotSettings
    # The slot's tables, drained between slices (backfill_drain.py), and their asset keys.
    stream_tables: tuple[Table, ...]
    asset_key_of: Callable[[Table], dg.AssetKey]
    # The configured document sets and their assets: the drains between slices refresh only
    # these and report them, and the backfill rebuilds those it leaves stale.
    documents: Mapping[str, dg.AssetKey] = field(default_factory=dict)


def run_table_backfill(
    context: dg.AssetExecutionContext,
    work: TableBackfill,
    slices: Sequence[int],
    source: PostgresSource,
    warehouse: WarehouseResource,
) -> dg.MaterializeResult:
    """Copy partitions ``slices`` of ``work.table``; the result carries the backfill's figures."""
    with warehouse.open() as wh:
        between = drain_between_slices(
            source.conninfo, wh, work.stream_tables,
            DrainSettings(work.slot.slot, work.slot.publication, documents=frozenset(work.documents)),
            lambda drained: _report_drain(context, work, drained), context.log.info, context.log.warning,
        )
        result = run_backfill(
            source.conninfo,
            wh,
            work.table,
            slices,
            partitions=work.partitions,
            readers=work.readers,
            row_limit=work.row_limit,
            cdc=work.slot,
            log=context.log.info,
            max_snapshot_bytes=work.max_snapshot_bytes,
            between_slices=between,
            documents=frozenset(work.documents),
        )
        rows_now = wh.row_count(work.table)
    for name, count in result.documents.items():  # sets the backfill left stale, built again
        _report_documents(context, work.documents[name], count, f"built again after the backfill of {work.table.display}")
    # No asset_key: the asset's one spec is implied, whatever key a translator or map_asset_specs gave it.
    return dg.MaterializeResult(metadata=backfill_metadata(result, rows_now))


def _report_drain(context: dg.AssetExecutionContext, work: TableBackfill, result: DrainResult) -> None:
    """A drain between slices reports as the drain job does: one materialization per table it
    applied, without a partition (partition status is the backfill's)."""
    lsn = int_to_lsn(result.drained_lsn)
    if result.changes:
        context.log.info(f"drained {result.changes:,} changes up to {lsn} between backfill slices")
    now = time.time()
    for key, outcome in result.tables.items():
        if outcome.mode == "applied":
            context.log_event(
                dg.AssetMaterialization(
                    asset_key=work.asset_key_of(outcome.table),
                    description=f"CDC micro-batch up to {lsn}, drained between backfill slices",
                    metadata=table_metadata(outcome, now),
                )
            )
        elif outcome.mode in ("held", "failed"):
            context.log.warning(f"{key}: {outcome.error} (see `pg-replication status`)")
    for problem in getattr(result.tables, "document_problems", {}).values():
        context.log.warning(problem)
    for name, count in getattr(result.tables, "documents", {}).items():
        if name in work.documents:
            _report_documents(context, work.documents[name], count, f"CDC micro-batch up to {lsn}, drained between backfill slices")


def _report_documents(context: dg.AssetExecutionContext, key: dg.AssetKey, count: int, description: str) -> None:
    """A document set refreshed by this run, reported as the drain job reports it."""
    context.log_event(
        dg.AssetMaterialization(
            asset_key=key, description=f"{description}: documents refreshed",
            metadata={"documents_recomputed": dg.MetadataValue.int(count)},
        )
    )
