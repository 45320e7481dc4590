"""The CDC drain job (one op that drains a bounded batch and reports each table it touched) and
the retry job (replays a failed table's change log)."""

import time
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from pg_replication.assets import TableAssetTranslator
from pg_replication.capture import CaptureSettings, drain_captured
from pg_replication.cdc import DrainResult, DrainSettings, TableOutcome, drain_once
from pg_replication.config import ReplicationConfig
from pg_replication.errors import is_transient
from pg_replication.operations import retry_table
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
    """Log the drain, then one materialization per applied table (the micro-batch); a table that
    failed in an earlier drain (held) or was reset by ``on_schema_change: resync`` says so."""
    context.log.info(f"drained {drained} in {result.seconds:.2f} s (caught up: {result.caught_up})")
    now = time.time()
    for key, outcome in result.tables.items():
        if outcome.mode == "applied":
            yield dg.AssetMaterialization(
                asset_key=translator.get_asset_key(outcome.table),
                description=description,
                metadata=table_metadata(outcome, now),
            )
        elif outcome.mode == "held":
            context.log.warning(
                f"{key} is failed ({outcome.error}); its {outcome.stats.changes:,} change(s) wait in its change log. "
                f"Fix the cause, then `pg-replication retry {key}` (or the retry job)"
            )
        elif outcome.mode == "resynced":
            context.log.warning(f"{key}: {outcome.error}")
            yield dg.AssetObservation(
                asset_key=translator.get_asset_key(outcome.table),
                description="on_schema_change: resync",
                metadata={"resynced": dg.MetadataValue.text(outcome.error or ""), "mode": dg.MetadataValue.text("resynced")},
            )


@contextmanager
def _transient_as_retryable() -> Iterator[None]:
    """A transient error that outlived the drain's own retries fails the run as retryable (run
    retries may take it; the sensor's next run does anyway): no table was marked failed."""
    try:
        yield
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise dg.Failure(
            description="transient warehouse error, nothing applied, no table marked failed; the next drain retries: "
            + str(exc).strip().splitlines()[0],
            metadata={"retryable": dg.MetadataValue.bool(True)},
            allow_retries=True,
        ) from exc


def build_cdc_job(config: ReplicationConfig, tables: list[Table], translator: TableAssetTranslator) -> dg.JobDefinition:
    """Drains the slot (tables with strategy cdc) and the trigger change table (strategy triggers)."""
    name = f"{config.source.name}_cdc_drain"
    settings = DrainSettings(slot=config.source.slot, publication=config.source.publication)
    slot_tables = [t for t in tables if t.strategy == "cdc"]
    captured_tables = [t for t in tables if t.strategy == "triggers"]

    @dg.op(name=f"{config.source.name}_drain_slot", pool=config.source.pool, out={})
    def drain(context: dg.OpExecutionContext, config: DrainConfig, source: PostgresSource, warehouse: WarehouseResource):
        failed = {}
        with _transient_as_retryable(), warehouse.open() as wh:
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
        if failed:  # newly failed only: a table failed before is held, and does not fail the run again
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


class RetryTableConfig(dg.Config):
    table: str = Field(description="The failed table to retry: schema.table (or its name alone when unambiguous).")


def build_retry_job(config: ReplicationConfig, tables: list[Table]) -> dg.JobDefinition:
    """Replays a failed table's change log into it (after its cause was fixed) and sets it streaming."""
    name = f"{config.source.name}_retry_table"

    @dg.op(name=f"{config.source.name}_replay_change_log", pool=config.source.pool, out={})
    def retry(context: dg.OpExecutionContext, config: RetryTableConfig, source: PostgresSource, warehouse: WarehouseResource):
        table = find_table(tables, config.table)
        with warehouse.open() as wh:
            replayed = retry_table(source.conninfo, wh, table)
        context.log.info(f"{table.display}: {replayed:,} logged change(s) replayed; streaming again")

    @dg.job(name=name, description="Replay a failed table's change log (config: table) and stream it again.", tags={"pg_replication/kind": "retry"})
    def retry_job():
        retry()

    return retry_job


def find_table(tables: list[Table], name: str) -> Table:
    """A configured table by schema.table, quoted display name, or bare name when unambiguous."""
    from pg_replication.errors import PgReplicationError

    found = [t for t in tables if name in (f"{t.schema}.{t.name}", t.display)] or [t for t in tables if t.name == name]
    if len(found) != 1:
        raise PgReplicationError(
            f"{name!r} is {'ambiguous' if found else 'not a configured table'}",
            hint="name it as schema.table (see `pg-replication status`)",
        )
    return found[0]
