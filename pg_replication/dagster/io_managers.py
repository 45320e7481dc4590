"""The IO manager: loads a replicated table for downstream assets, as a stream of Arrow batches.

It writes nothing: a table asset's body does its backfill itself (table_backfill.py) and returns
a ``MaterializeResult``. One class serves every warehouse: the engine's protocol
(``read_batches``) is the seam, and the warehouse resource decides which dialect a run opens.
"""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg
import pyarrow as pa
from pydantic import Field

from pg_replication.dagster.resources import WarehouseResource
from pg_replication.warehouse.reads import BATCH_ROWS


class WarehouseIOManager(dg.ConfigurableIOManager):
    """Hands a downstream asset its replicated input as a ``pyarrow.RecordBatchReader``: memory
    holds a batch or so, never the table. Example::

        @dg.asset(ins={"orders": dg.AssetIn(key=["shop", "orders"])})
        def order_totals(orders: pa.RecordBatchReader) -> None:
            for batch in orders:
                ...

        WarehouseIOManager(warehouse=DuckDBWarehouseResource(duckdb=DuckDBResource(database="w.duckdb")))
    """

    warehouse: WarehouseResource
    batch_rows: int = Field(BATCH_ROWS, gt=0, description="Rows per Arrow batch handed to downstream assets.")

    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        if obj is not None:  # a table asset returns a MaterializeResult: there is nothing to store
            raise dg.Failure(
                f"{context.asset_key.to_user_string()}: WarehouseIOManager only loads replicated tables",
                metadata={"hint": dg.MetadataValue.text("give assets that return values an IO manager of their own")},
            )

    def load_input(self, context: dg.InputContext) -> pa.RecordBatchReader:
        metadata = context.upstream_output.definition_metadata  # type: ignore[union-attr]
        return self.stream(str(metadata["pg_replication/schema"]), str(metadata["pg_replication/table"]))

    def stream(self, schema: str, table: str) -> pa.RecordBatchReader:
        """The table's batches, read from a connection of their own that closes when the stream
        ends (the schema comes from a short one first): a reader never read holds nothing open,
        which matters on DuckDB, whose file a reader keeps from writers of other processes."""
        with self.warehouse.open(read_only=True) as wh:
            schema_of_rows = wh.read_batches(schema, table, self.batch_rows).schema

        def batches() -> Iterator[pa.RecordBatch]:
            with self.warehouse.open(read_only=True) as wh:
                yield from wh.read_batches(schema, table, self.batch_rows)

        return pa.RecordBatchReader.from_batches(schema_of_rows, batches())
