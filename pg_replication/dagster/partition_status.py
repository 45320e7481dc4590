"""What `pg-replication resync` tells Dagster: the table's backfill partitions are no longer
materialized, so the UI stops showing them green over an empty warehouse table.

The instance's public API offers two ways: ``wipe_asset_partitions``, which no open-source event
log storage implements (SQLite, Postgres and MySQL raise NotImplementedError), and ``wipe_assets``,
which every one does. So the asset's history is wiped whole: its CDC materializations (the lag
plot) restart with the backfill, as the warehouse table does.
"""

from __future__ import annotations

import os

import dagster as dg

from pg_replication.config import ReplicationConfig
from pg_replication.dagster.assets import TableAssetTranslator
from pg_replication.source.catalog import Table


def clear_partition_status(config: ReplicationConfig, table: Table, translator: TableAssetTranslator | None = None) -> str:
    """Wipe ``table``'s asset (its key from ``translator``: a component's carries its prefix) in
    the instance of DAGSTER_HOME; returns what was done, for the operator."""
    key = (translator or TableAssetTranslator(config)).get_asset_key(table).to_user_string()
    if not os.environ.get("DAGSTER_HOME"):
        return f"DAGSTER_HOME is not set: Dagster's partition status of {key} is unchanged (wipe the asset in the UI)"
    with dg.DagsterInstance.get() as instance:
        instance.wipe_assets([dg.AssetKey.from_user_string(key)])
    return f"Dagster's partitions of {key} cleared (its event history wiped): they show missing until the backfill runs again"
