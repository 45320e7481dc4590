"""The only place that wires: replication.yaml + the source catalog -> Dagster Definitions."""

from __future__ import annotations

import os

import dagster as dg

from pg_replication.dagster.assets import (
    TableAssetTranslator,
    build_table_asset,
    check_unique_keys,
)
from dagster_duckdb import DuckDBResource

from pg_replication.dagster.automation import build_automation_sensor
from pg_replication.dagster.checks import build_table_checks
from pg_replication.dagster.documents import build_document_assets
from pg_replication.dagster.executor import table_executor
from pg_replication.config import ReplicationConfig, load_config
from pg_replication.dagster.jobs import build_cdc_job, build_retry_job
from pg_replication.dagster.notifications import build_notification_sensors
from pg_replication.dagster.schedules import build_sync_schedules
from pg_replication.dagster.sensors import build_cdc_sensor
from pg_replication.dagster.io_managers import WarehouseIOManager
from pg_replication.dagster.resources import (
    DuckDBWarehouseResource,
    PostgresSource,
    PostgresWarehouseResource,
    ResourceKeys,
    WarehouseResource,
)
from pg_replication.dagster.load_cache import build_key, cached_build, freeze_once, gc_paused
from pg_replication.dagster.load_catalog import LoadedCatalog, load_catalog
from pg_replication.dagster.refresh import build_refresh_catalog_job
from pg_replication.source.catalog import Table, Unavailable
from pg_replication.warehouse.connect import POSTGRES_WAREHOUSE_ENV, postgres_warehouse_url, table_location


def build_source_resource(url_env: str = "POSTGRES_URL") -> PostgresSource:
    # EnvVar keeps the URL (and any password in it) out of the UI and of run configs.
    if os.environ.get(url_env):
        return PostgresSource(conninfo=dg.EnvVar(url_env))
    return PostgresSource()


def build_warehouse_resource(config: ReplicationConfig) -> WarehouseResource:
    """The warehouse replication.yaml (or PG_REPLICATION_WAREHOUSE) chose; connections come
    from the environment as EnvVars, so the UI shows variable names, never values."""
    kind = config.warehouse_kind()
    if kind == "postgres":
        postgres_warehouse_url(config)  # fails at load, naming what is wrong
        return PostgresWarehouseResource(conninfo=dg.EnvVar(POSTGRES_WAREHOUSE_ENV), schema_prefix=config.warehouse.schema_prefix)
    if kind == "snowflake":
        from pg_replication.dagster.resources_snowflake import snowflake_from_env

        return snowflake_from_env(merge=config.warehouse.merge)
    if kind == "clickhouse":
        from pg_replication.dagster.resources_clickhouse import clickhouse_from_env

        return clickhouse_from_env(config.clickhouse_path())
    duckdb = DuckDBResource(database=config.duckdb_path(), connection_config={"memory_limit": config.warehouse.memory_limit})
    return DuckDBWarehouseResource(duckdb=duckdb)


def build_definitions(
    config: ReplicationConfig | None = None,
    translator_class: type[TableAssetTranslator] = TableAssetTranslator,
) -> dg.Definitions:
    """The simple path: replication.yaml, the source's catalog read at load (the last snapshot
    when the source is down), the plain resource keys, and the table assets' executor (a
    component leaves the executor to its project: Dagster refuses two in one project)."""
    config = config or load_config()
    catalog = load_catalog(config)  # never fails for one table, nor for a source that is down
    return build_definitions_from_catalog(
        config, catalog, translator_class(config), refresh_job=build_refresh_catalog_job(config), executor=table_executor
    )


def build_definitions_from_catalog(
    config: ReplicationConfig,
    catalog: LoadedCatalog,
    translator: TableAssetTranslator,
    keys: ResourceKeys = ResourceKeys(),
    source_url_env: str = "POSTGRES_URL",
    refresh_job: dg.JobDefinition | None = None,
    executor: dg.ExecutorDefinition | None = None,
) -> dg.Definitions:
    """Everything one source defines, from a catalog already read: no I/O against the source."""
    tables = catalog.tables
    key = build_key(
        config.model_dump_json(), tables, catalog.left_out, catalog.unavailable,
        type(translator), vars(translator), keys, table_location(config, "schema", "table"),
    )
    with gc_paused():
        table_assets, checks = cached_build(key, lambda: _table_definitions(config, catalog, translator, keys))
    freeze_once()
    assets = [*table_assets]
    assets += build_document_assets(config, tables, translator, keys, set(catalog.unavailable), catalog.outage is not None)
    cdc_job = build_cdc_job(config, tables, translator, keys)
    schedules = build_sync_schedules(config, tables, translator, keys)
    sync_jobs = [s.job for s in schedules]
    warehouse = build_warehouse_resource(config)
    retry_job = build_retry_job(config, [t for t in tables if t.strategy in ("cdc", "triggers")], keys)
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[cdc_job, *sync_jobs, retry_job, *([refresh_job] if refresh_job else [])],
        schedules=schedules,
        executor=executor,
        sensors=[
            build_cdc_sensor(config, cdc_job, tables, catalog.warnings(), keys, translator),
            *build_notification_sensors(config, [cdc_job, *sync_jobs]),
            build_automation_sensor(config, [translator.get_asset_key(t) for t in tables]),
        ],
        resources={
            keys.source: build_source_resource(source_url_env),
            keys.warehouse: warehouse,
            keys.io_manager: WarehouseIOManager(warehouse=warehouse),
        },
    )


def _table_definitions(
    config: ReplicationConfig, catalog: LoadedCatalog, translator: TableAssetTranslator, keys: ResourceKeys
) -> tuple[list[dg.AssetsDefinition], list[dg.AssetChecksDefinition]]:
    """One asset per table (those left out keep theirs) and the tables' checks: the part of a
    build that grows with the tables."""
    tables = catalog.tables
    streamed = [t for t in tables if t.strategy == "cdc"]  # the slot's tables, as the drain job has them
    assets = [build_table_asset(t, config, translator, streamed, keys) for t in tables]
    check_unique_keys(assets, tables)
    assets += [_left_out_asset(t, config, translator, catalog.unavailable[f"{t.schema}.{t.name}"], keys) for t in catalog.left_out]
    return assets, build_table_checks(tables, config, translator, keys)


def _left_out_asset(
    table: Table, config: ReplicationConfig, translator: TableAssetTranslator, why: Unavailable, keys: ResourceKeys
) -> dg.AssetsDefinition:
    """A table replicated before but gone from the source, or no longer replicable, keeps its
    asset (its warehouse data and history stay visible), marked with the reason; no drain or
    check includes it until it is back."""
    asset = build_table_asset(table, config, translator, keys=keys)
    return asset.map_asset_specs(
        lambda spec: spec.replace_attributes(
            description=f"{why.status.upper()}: {why.reason}\n\n{spec.description or ''}",
            metadata={**spec.metadata, "pg_replication/unavailable": f"{why.status}: {why.reason}"},
        )
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions()
