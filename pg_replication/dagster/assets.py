"""One asset per replicated table: key, group, metadata, partitions (the backfill), pool.

``TableAssetTranslator`` turns a catalog ``Table`` into an ``AssetSpec``; subclass it to change
keys or groups without forking the factory.
"""


import re
from collections.abc import Sequence

import dagster as dg

from pg_replication.config import DocumentSetConfig, ReplicationConfig, split_qualified_name
from pg_replication.dagster.freshness import freshness_policy
from pg_replication.dagster.resources import PostgresSource, ResourceKeys, WarehouseResource
from pg_replication.dagster.table_backfill import TableBackfill, run_table_backfill
from pg_replication.errors import ConfigError
from pg_replication.replicate.backfill import SlotSettings
from pg_replication.source.catalog import Table
from pg_replication.warehouse.connect import table_location, type_mapper


def dagster_name(text: str) -> str:
    """A name Dagster accepts (letters, digits, _) for any Postgres identifier."""
    cleaned = re.sub(r"[^A-Za-z0-9_]", "_", text)
    return cleaned or "_"


def partition_keys(count: int) -> list[str]:
    """Zero-padded so that ranges and sorting follow slice order (000...127)."""
    width = max(3, len(str(count - 1)))
    return [str(i).zfill(width) for i in range(count)]


class TableAssetTranslator:
    """Maps a source table to its asset spec. Each part comes from one small method."""

    def __init__(self, config: ReplicationConfig, key_prefix: Sequence[str] = ()) -> None:
        self.config = config
        self.key_prefix = list(key_prefix)  # a component's source name, so two sources never collide
        self.warehouse_kind = config.warehouse_kind()
        self.map_column = type_mapper(self.warehouse_kind)

    def get_asset_key(self, table: Table) -> dg.AssetKey:
        return dg.AssetKey([*self.key_prefix, dagster_name(table.schema), dagster_name(table.name)])

    def get_group_name(self, table: Table) -> str:
        return dagster_name(table.schema)

    def get_description(self, table: Table) -> str:
        text = f"Postgres table {table.display}, replicated to {self.warehouse_kind}."
        return f"{text}\n\n{table.comment}" if table.comment else text

    def get_partitions(self, table: Table) -> int:
        entry = table.entry
        return (entry.partitions if entry and entry.partitions else None) or self.config.defaults.partitions

    def get_metadata(self, table: Table) -> dict[str, object]:
        columns = [
            dg.TableColumn(
                name=c.name,
                type=f"{c.type_sql} -> {self.map_column(c).ddl}",
                constraints=dg.TableColumnConstraints(nullable=not c.not_null),
            )
            for c in table.columns
        ]
        return {
            # Dagster's documented table keys; table_name is the warehouse's database.schema.table,
            # as dbt names the same relation, so lineage joins a replicated table to its models.
            "dagster/table_name": table_location(self.config, table.schema, table.name),
            "dagster/column_schema": dg.TableSchema(
                columns=columns,
                constraints=dg.TableConstraints(other=[f"primary key ({', '.join(table.primary_key)})"]),
            ),
            "pg_replication/source_table": table.display,
            "pg_replication/schema": table.schema,
            "pg_replication/table": table.name,
            "pg_replication/primary_key": ", ".join(table.primary_key),
            "pg_replication/strategy": table.strategy,
            "pg_replication/replica_identity": {"d": "default", "f": "full", "i": "index", "n": "nothing"}.get(
                table.replica_identity, table.replica_identity
            ),
        }

    def get_freshness_policy(self, table: Table) -> dg.FreshnessPolicy:
        return freshness_policy(table, self.config)

    def get_asset_spec(self, table: Table) -> dg.AssetSpec:
        return dg.AssetSpec(
            key=self.get_asset_key(table),
            group_name=self.get_group_name(table),
            description=self.get_description(table),
            metadata=self.get_metadata(table),
            kinds={"postgres", self.warehouse_kind},
            partitions_def=dg.StaticPartitionsDefinition(partition_keys(self.get_partitions(table))),
            freshness_policy=self.get_freshness_policy(table),
        )


def document_asset_key(translator: TableAssetTranslator, document: DocumentSetConfig) -> dg.AssetKey:
    """A document set's asset (documents.py), beside its root table's: ``[prefix..., root schema, set name]``."""
    schema, _ = split_qualified_name(document.root)
    return dg.AssetKey([*translator.key_prefix, dagster_name(schema), dagster_name(document.name)])


def build_table_asset(
    table: Table,
    config: ReplicationConfig,
    translator: TableAssetTranslator,
    stream_tables: Sequence[Table] = (),
    keys: ResourceKeys = ResourceKeys(),
) -> dg.AssetsDefinition:
    """``stream_tables``: the tables of the source's slot (strategy cdc), drained between the
    backfill's slices. The body copies the selected partitions itself (table_backfill.py); the
    IO manager only loads the table for downstream assets."""
    spec = translator.get_asset_spec(table).with_io_manager_key(keys.io_manager)
    entry = table.entry
    per_run = entry.max_partitions_per_run if entry else None
    policy = dg.BackfillPolicy.multi_run(per_run) if per_run else dg.BackfillPolicy.single_run()
    work = TableBackfill(
        table=table,
        partitions=translator.get_partitions(table),
        readers=config.source.readers,
        row_limit=entry.row_limit if entry else None,
        max_snapshot_bytes=config.backfill.max_snapshot_bytes,
        slot=SlotSettings(config.source.slot, config.source.publication),
        stream_tables=tuple(stream_tables),
        asset_key_of=translator.get_asset_key,
        documents={d.name: document_asset_key(translator, d) for d in config.documents},
    )

    @dg.multi_asset(
        specs=[spec],
        name="_".join(spec.key.path),
        pool=config.source.pool,
        backfill_policy=policy,
        required_resource_keys={keys.source, keys.warehouse},
    )
    def table_asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        source: PostgresSource = getattr(context.resources, keys.source)
        warehouse: WarehouseResource = getattr(context.resources, keys.warehouse)
        all_keys = spec.partitions_def.get_partition_keys()  # type: ignore[union-attr]
        slices = tuple(all_keys.index(k) for k in context.partition_keys)
        return run_table_backfill(context, work, slices, source, warehouse)

    return table_asset


def check_unique_keys(assets: list[dg.AssetsDefinition], tables: list[Table]) -> None:
    seen: dict[dg.AssetKey, Table] = {}
    for asset, table in zip(assets, tables):
        key = asset.key
        if key in seen:
            raise ConfigError(
                f"tables {seen[key].display} and {table.display} map to the same asset key {key.to_user_string()}",
                hint="exclude one of them, or subclass TableAssetTranslator to key them apart",
            )
        seen[key] = table
