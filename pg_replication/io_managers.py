"""IO managers: adapt a table asset's output (a BackfillRequest) to a Warehouse, and report."""

from __future__ import annotations

import dagster as dg
import pyarrow as pa
from dagster_duckdb import DuckDBResource

from pg_replication.assets import BackfillRequest
from pg_replication.backfill import SlotSettings, run_backfill
from pg_replication.warehouse.base import SLICE_COLUMN
from pg_replication.warehouse.duckdb import DuckDBWarehouse, q


class DuckDBWarehouseIOManager(dg.ConfigurableIOManager):
    """Writes backfill slices into a DuckDB file through dagster-duckdb's resource.

    Example::

        DuckDBWarehouseIOManager(duckdb=DuckDBResource(database="warehouse.duckdb"))
    """

    duckdb: DuckDBResource
    slot: str = "pg_replication"
    publication: str = "pg_replication"

    def handle_output(self, context: dg.OutputContext, obj: BackfillRequest) -> None:
        with self.duckdb.get_connection() as conn:
            warehouse = DuckDBWarehouse(conn)
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
            )
            rows_now = warehouse.row_count(obj.table)
        context.add_output_metadata(
            {
                "rows": dg.MetadataValue.int(result.rows),
                "bytes": dg.MetadataValue.int(result.bytes),
                "seconds": dg.MetadataValue.float(round(result.seconds, 3)),
                "rows_per_second": dg.MetadataValue.float(round(result.rows_per_second, 1)),
                "slices": dg.MetadataValue.text(", ".join(str(s) for s in result.slices)),
                "plan_lsn": dg.MetadataValue.text(result.plan_lsn),
                "dagster/row_count": dg.MetadataValue.int(rows_now),
            }
        )

    def load_input(self, context: dg.InputContext) -> pa.Table:
        metadata = context.upstream_output.definition_metadata  # type: ignore[union-attr]
        schema, table = metadata["pg_replication/schema"], metadata["pg_replication/table"]
        with self.duckdb.get_connection() as conn:
            return conn.execute(f"SELECT * EXCLUDE ({q(SLICE_COLUMN)}) FROM {q(schema, table)}").to_arrow_table()
