"""The IO manager: adapts a table asset's output (a BackfillRequest) to the configured warehouse.

One class serves every warehouse: the engine's protocol is the seam, and the warehouse resource
decides which dialect a run opens.
"""

from __future__ import annotations

import dagster as dg
import pyarrow as pa

from pg_replication.assets import BackfillRequest
from pg_replication.backfill import SlotSettings, run_backfill
from pg_replication.resources import WarehouseResource


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

    def load_input(self, context: dg.InputContext) -> pa.Table:
        metadata = context.upstream_output.definition_metadata  # type: ignore[union-attr]
        with self.warehouse.open(read_only=True) as warehouse:
            return warehouse.read_table(metadata["pg_replication/schema"], metadata["pg_replication/table"])
