"""The query strategies (append, updated_at, reload) in Dagster: one sync job and one schedule
per cron expression of replication.yaml, each materializing the tables it synced."""

import hashlib

import dagster as dg
import psycopg

from pg_replication.dagster.assets import TableAssetTranslator, document_asset_key
from pg_replication.config import QUERY_STRATEGIES, ReplicationConfig
from pg_replication.errors import PgReplicationError
from pg_replication.dagster.resources import ResourceKeys
from pg_replication.source.catalog import Table
from pg_replication.replicate.strategies import SyncResult, sync_table


def sync_metadata(result: SyncResult) -> dict[str, dg.MetadataValue]:
    metadata = {
        "mode": dg.MetadataValue.text(result.mode),
        "rows": dg.MetadataValue.int(result.rows),
        "bytes": dg.MetadataValue.int(result.bytes),
        "seconds": dg.MetadataValue.float(round(result.seconds, 3)),
        "strategy": dg.MetadataValue.text(result.table.strategy),
    }
    if result.watermark is not None and result.watermark.mark is not None:
        metadata["watermark"] = dg.MetadataValue.text(str(result.watermark.mark))
    if result.table.strategy == "append":
        metadata["keeps_late_commits"] = dg.MetadataValue.bool(result.warning is None)
        if result.warning:
            metadata["late_commits"] = dg.MetadataValue.text(result.warning)
    return metadata


def _sync_job(
    name: str, cron: str, tables: list[Table], config: ReplicationConfig, translator: TableAssetTranslator, keys: ResourceKeys
) -> dg.JobDefinition:
    documents = {d.name: document_asset_key(translator, d) for d in config.documents}  # refreshed by the syncs

    @dg.op(name=f"{name}_tables", pool=config.source.pool, out={}, required_resource_keys=keys.both)
    def sync(context: dg.OpExecutionContext):
        source, warehouse = keys.source_of(context), keys.warehouse_of(context)
        failed = []
        with warehouse.open() as wh:
            for table in tables:
                try:
                    result = sync_table(
                        source.conninfo, wh, table, readers=config.source.readers, log=context.log.info, documents=frozenset(documents)
                    )
                except (PgReplicationError, psycopg.Error, *wh.errors) as exc:  # one table's trouble stops only that table
                    failed.append(f"{table.display}: {str(exc).strip().splitlines()[0]}")
                    continue
                if result.warning:
                    context.log.warning(f"{table.display}: strategy append may skip rows that commit late: {result.warning}")
                if result.mode == "skipped":
                    context.log.info(f"{table.display}: skipped ({result.reason})")
                    continue
                yield dg.AssetMaterialization(
                    asset_key=translator.get_asset_key(table),
                    description=f"{result.mode} by its {table.strategy} sync",
                    metadata={
                        **sync_metadata(result),
                        **({"dagster/row_count": dg.MetadataValue.int(wh.row_count(table))} if wh.counts_rows_cheaply else {}),
                    },
                )
                for name, count in result.documents.items():  # refreshed in the sync's transaction
                    yield dg.AssetMaterialization(
                        asset_key=documents[name], description=f"{result.mode} by the {table.strategy} sync of {table.display}: documents refreshed",
                        metadata={"documents_recomputed": dg.MetadataValue.int(count)},
                    )
        if failed:
            raise dg.Failure(description=f"{len(failed)} table(s) did not sync (the others did): {'; '.join(failed)}", allow_retries=False)

    names = ", ".join(t.display for t in tables)

    # In process: one step, which would only wait for a process of its own to load the code
    # again (bench/executor.py).
    @dg.job(name=name, description=f"Sync {names} ({cron}).", tags={"pg_replication/kind": "sync"}, executor_def=dg.in_process_executor)
    def sync_job():
        sync()

    return sync_job


def build_sync_schedules(
    config: ReplicationConfig, tables: list[Table], translator: TableAssetTranslator, keys: ResourceKeys = ResourceKeys()
) -> list[dg.ScheduleDefinition]:
    by_cron: dict[str, list[Table]] = {}
    for table in tables:
        if table.entry is not None and table.entry.strategy in QUERY_STRATEGIES:
            by_cron.setdefault(table.entry.schedule or config.defaults.schedule, []).append(table)
    schedules = []
    for cron, group in sorted(by_cron.items()):
        # named after the cron, so adding another schedule renames nothing (nor its UI state)
        name = f"{config.source.name}_sync_{hashlib.sha1(cron.encode()).hexdigest()[:8]}"
        job = _sync_job(name, cron, group, config, translator, keys)
        schedules.append(
            dg.ScheduleDefinition(
                name=f"{name}_schedule",
                job=job,
                cron_schedule=cron,
                execution_timezone="UTC",
                default_status=dg.DefaultScheduleStatus.RUNNING,
                description=f"Syncs {', '.join(t.display for t in group)} ({cron}, UTC).",
            )
        )
    return schedules
