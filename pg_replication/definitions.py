"""The only place that wires: replication.yaml + the source catalog -> Dagster Definitions."""

from __future__ import annotations

import os

import dagster as dg

from pg_replication.assets import (
    WAREHOUSE_IO_MANAGER_KEY,
    TableAssetTranslator,
    build_table_asset,
    check_unique_keys,
)
from dagster_duckdb import DuckDBResource

from pg_replication.checks import build_table_checks
from pg_replication.config import ReplicationConfig, load_config
from pg_replication.jobs import build_cdc_job
from pg_replication.notifications import build_notification_sensors
from pg_replication.sensors import build_cdc_sensor
from pg_replication.resources import PostgresSource
from pg_replication.source.catalog import introspect
from pg_replication.source.connection import connect, source_conninfo


def build_source_resource() -> PostgresSource:
    # EnvVar keeps the URL (and any password in it) out of the UI and of run configs.
    if os.environ.get("POSTGRES_URL"):
        return PostgresSource(conninfo=dg.EnvVar("POSTGRES_URL"))
    return PostgresSource()


def build_warehouse_io_manager(config: ReplicationConfig, duckdb: DuckDBResource) -> dg.ConfigurableIOManager:
    from pg_replication.io_managers import DuckDBWarehouseIOManager

    return DuckDBWarehouseIOManager(
        duckdb=duckdb, slot=config.source.slot, publication=config.source.publication
    )


def build_definitions(
    config: ReplicationConfig | None = None,
    translator_class: type[TableAssetTranslator] = TableAssetTranslator,
) -> dg.Definitions:
    config = config or load_config()
    with connect(source_conninfo()) as conn:
        tables = introspect(conn, config)
    translator = translator_class(config)
    assets = [build_table_asset(t, config, translator) for t in tables]
    check_unique_keys(assets, tables)
    cdc_job = build_cdc_job(config, tables, translator)
    duckdb = DuckDBResource(
        database=config.duckdb_path(), connection_config={"memory_limit": config.warehouse.memory_limit}
    )
    return dg.Definitions(
        assets=assets,
        asset_checks=build_table_checks(tables, config, translator),
        jobs=[cdc_job],
        sensors=[build_cdc_sensor(config, cdc_job), *build_notification_sensors(config, [cdc_job])],
        resources={
            "source": build_source_resource(),
            "duckdb": duckdb,
            WAREHOUSE_IO_MANAGER_KEY: build_warehouse_io_manager(config, duckdb),
        },
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions()
