"""The CDC drain job: one op that drains a bounded batch and reports each table it touched."""

import time

import dagster as dg

from pg_replication.assets import TableAssetTranslator
from pg_replication.capture import CaptureSettings, drain_captured
from pg_replication.cdc import DrainResult, DrainSettings, TableOutcome, drain_once
from pg_replication.config import ReplicationConfig
from pg_replication.resources import PostgresSource, WarehouseResource
from pg_replication.source.catalog import Table
from pg_replication.source.pgoutput import int_to_lsn


class DrainConfig(dg.Config):
    max_changes: int = 200_000
    max_bytes: int = 256 << 20


def table_metadata(outcome: TableOutcome, now: float) -> dict[str, dg.MetadataValue]:
    stats = outcome.stats
    metadata: dict[str, dg.MetadataValue] = {
        "inserted": dg.MetadataValue.int(stats.inserted),
        "updated": dg.MetadataValue.int(stats.updated),
        "deleted": dg.MetadataValue.int(stats.deleted),
        "truncated": dg.MetadataValue.int(stats.truncated),
        "mode": dg.MetadataValue.text(outcome.mode),
    }
    if stats.first_lsn is not None:  # captured changes (strategy triggers) have no LSN
        metadata["first_lsn"] = dg.MetadataValue.text(int_to_lsn(stats.first_lsn))
        metadata["last_lsn"] = dg.MetadataValue.text(int_to_lsn(stats.last_lsn or stats.first_lsn))
    if stats.last_commit_time is not None:
        commit = stats.last_commit_time / 1e6
        metadata["last_commit_time"] = dg.MetadataValue.timestamp(commit)
        metadata["lag_seconds"] = dg.MetadataValue.float(round(max(0.0, now - commit), 3))
    if outcome.rows_now is not None:
        metadata["dagster/row_count"] = dg.MetadataValue.int(outcome.rows_now)
    return metadata


def _report(context: dg.OpExecutionContext, translator: TableAssetTranslator, result: DrainResult, drained: str, description: str):
    """Log the drain, then one materialization per applied table (the micro-batch)."""
    context.log.info(f"drained {drained} in {result.seconds:.2f} s (caught up: {result.caught_up})")
    now = time.time()
    for outcome in result.tables.values():
        if outcome.mode == "applied":
            yield dg.AssetMaterialization(
                asset_key=translator.get_asset_key(outcome.table),
                description=description,
                metadata=table_metadata(outcome, now),
            )


def build_cdc_job(config: ReplicationConfig, tables: list[Table], translator: TableAssetTranslator) -> dg.JobDefinition:
    """Drains the slot (tables with strategy cdc) and the trigger change table (strategy triggers)."""
    name = f"{config.source.name}_cdc_drain"
    settings = DrainSettings(slot=config.source.slot, publication=config.source.publication)
    slot_tables = [t for t in tables if t.strategy == "cdc"]
    captured_tables = [t for t in tables if t.strategy == "triggers"]

    @dg.op(name=f"{config.source.name}_drain_slot", pool=config.source.pool, out={})
    def drain(context: dg.OpExecutionContext, config: DrainConfig, source: PostgresSource, warehouse: WarehouseResource):
        failed = {}
        with warehouse.open() as wh:
            if slot_tables:
                run_settings = DrainSettings(settings.slot, settings.publication, config.max_changes, config.max_bytes)
                result: DrainResult = drain_once(source.conninfo, wh, slot_tables, run_settings, context.log.info)
                lsn = int_to_lsn(result.drained_lsn)
                drained = f"{result.changes:,} changes in {result.transactions:,} transactions up to {lsn}"
                yield from _report(context, translator, result, drained, f"CDC micro-batch up to {lsn}")
                failed.update(result.failed)
            if captured_tables:
                result = drain_captured(source.conninfo, wh, captured_tables, CaptureSettings(max_changes=config.max_changes), context.log.info)
                drained = f"{result.changes:,} captured changes up to change {result.drained_lsn}"
                yield from _report(context, translator, result, drained, f"captured changes up to change {result.drained_lsn}")
                failed.update(result.failed)
        if failed:
            problems = "; ".join(o.error or key for key, o in failed.items())
            raise dg.Failure(
                description=f"{len(failed)} table(s) could not be applied, their changes wait in their "
                f"change logs (other tables were applied): {problems}",
                metadata={"failed_tables": dg.MetadataValue.text(", ".join(failed))},
                allow_retries=False,
            )

    sources = ([f"the {settings.slot!r} replication slot"] if slot_tables else []) + (["the captured changes"] if captured_tables else [])
    description = f"Drain {' and '.join(sources) or 'nothing (no table uses strategy cdc or triggers)'} into the warehouse."

    @dg.job(name=name, description=description, tags={"pg_replication/kind": "cdc"})
    def cdc_job():
        drain()

    return cdc_job
