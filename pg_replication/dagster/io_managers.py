"""The IO manager: adapts a table asset's output (a BackfillRequest) to the configured warehouse.

One class serves every warehouse: the engine's protocol is the seam, and the warehouse resource
decides which dialect a run opens.
"""

from __future__ import annotations

import time

import dagster as dg
import pyarrow as pa

from pg_replication.dagster.assets import BackfillRequest
from pg_replication.replicate.backfill import SlotSettings, run_backfill
from pg_replication.replicate.backfill_drain import drain_between_slices
from pg_replication.replicate.cdc import DrainResult, DrainSettings
from pg_replication.dagster.jobs import table_metadata
from pg_replication.dagster.resources import WarehouseResource
from pg_replication.source.pgoutput import int_to_lsn


class WarehouseIOManager(dg.ConfigurableIOManager):
    """Writes backfill slices into the warehouse; downstream assets read the table as Arrow.

    Example::

        WarehouseIOManager(warehouse=DuckDBWarehouseResource(duckdb=DuckDBResource(database="w.duckdb")))
    """

    warehouse: WarehouseResource
    slot: str = "pg_replication"
    publication: str = "pg_replication"

    def handle_output(self, context: dg.OutputContext, obj: BackfillRequest) -> None:
        with self.warehouse.open() as warehouse:
            between = drain_between_slices(
                obj.conninfo, warehouse, obj.stream_tables, DrainSettings(self.slot, self.publication),
                lambda drained: self._report_drain(context, obj, drained), context.log.info, context.log.warning,
            )
            result = run_backfill(
                obj.conninfo,
                warehouse,
                obj.table,
                obj.slices,
                partitions=obj.partitions,
                readers=obj.readers,
                row_limit=obj.row_limit,
                cdc=SlotSettings(self.slot, self.publication),
                log=context.log.info,
                max_snapshot_bytes=obj.max_snapshot_bytes,
                between_slices=between,
            )
            rows_now = warehouse.row_count(obj.table)
        context.add_output_metadata(
            {
                "rows": dg.MetadataValue.int(result.rows),
                "bytes": dg.MetadataValue.int(result.bytes),
                "seconds": dg.MetadataValue.float(round(result.seconds, 3)),
                "rows_per_second": dg.MetadataValue.float(round(result.rows_per_second, 1)),
                "slices": dg.MetadataValue.text(", ".join(str(s) for s in result.slices)),
                "snapshots": dg.MetadataValue.int(result.snapshots),
                "longest_snapshot_seconds": dg.MetadataValue.float(round(result.longest_snapshot_seconds, 3)),
                "plan_lsn": dg.MetadataValue.text(result.plan_lsn),
                "dagster/row_count": dg.MetadataValue.int(rows_now),
            }
        )

    def _report_drain(self, context: dg.OutputContext, obj: BackfillRequest, result: DrainResult) -> None:
        """A drain between slices reports as the drain job does: one materialization per table
        it applied (their assets' lag plots go on while a backfill runs)."""
        lsn = int_to_lsn(result.drained_lsn)
        if result.changes:
            context.log.info(f"drained {result.changes:,} changes up to {lsn} between backfill slices")
        now = time.time()
        for key, outcome in result.tables.items():
            if outcome.mode == "applied" and obj.asset_key_of is not None:
                context.log_event(
                    dg.AssetMaterialization(
                        asset_key=obj.asset_key_of(outcome.table),
                        description=f"CDC micro-batch up to {lsn}, drained between backfill slices",
                        metadata=table_metadata(outcome, now),
                    )
                )
            elif outcome.mode in ("held", "failed"):
                context.log.warning(f"{key}: {outcome.error} (see `pg-replication status`)")

    def load_input(self, context: dg.InputContext) -> pa.Table:
        metadata = context.upstream_output.definition_metadata  # type: ignore[union-attr]
        with self.warehouse.open(read_only=True) as warehouse:
            return warehouse.read_table(metadata["pg_replication/schema"], metadata["pg_replication/table"])
