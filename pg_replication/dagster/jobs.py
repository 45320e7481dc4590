"""The CDC drain job (one op that drains micro-batches, replicate/drain_loop.py, and reports each
table a batch touched) and the retry job (replays a failed table's change log)."""

import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import replace

import dagster as dg
from pydantic import Field

from pg_replication.dagster.assets import TableAssetTranslator
from pg_replication.dagster.documents import document_asset_key
from pg_replication.dagster.kept_current import KeptCurrent
from pg_replication.dagster.metadata import table_metadata
from pg_replication.replicate.capture import CaptureSettings
from pg_replication.replicate.cdc import DrainResult, DrainSettings
from pg_replication.config import ReplicationConfig
from pg_replication.replicate.drain_loop import LoopSettings, drain_run
from pg_replication.errors import is_transient
from pg_replication.replicate.operations import retry_table
from pg_replication.dagster.resources import DuckDBWarehouseResource, ResourceKeys
from pg_replication.source.catalog import Table
from pg_replication.source.pgoutput import int_to_lsn


class DrainConfig(dg.Config):
    max_changes: int = 200_000
    max_bytes: int = 256 << 20
    run_seconds: int = Field(
        0,
        ge=0,
        description="How long the run stays up applying micro-batches as changes come. The CDC sensor "
        "sets source.run_seconds from replication.yaml; 0 (a run launched by hand): one batch.",
    )
    batch_seconds: float = Field(1.0, gt=0, description="Longest read of one micro-batch in a long-lived run.")
    min_batch_seconds: float = Field(
        0.25,
        ge=0,
        description="Shortest read of a micro-batch while the one before is applied: it ends at a commit once that "
        "one committed (which is reported then). Higher: fewer, larger micro-batches (materializations).",
    )


def _report(
    context: dg.OpExecutionContext, translator: TableAssetTranslator, result: DrainResult, drained: str, description: str,
    documents: dict[str, dg.AssetKey] | None = None,
):
    """Log the drain, then one materialization per applied table (the micro-batch); a table that
    failed in an earlier drain (held) or was reset by ``on_schema_change: resync`` says so. Each
    document set the drain refreshed (``documents``: set name -> asset key) gets one too, with
    the number of documents recomputed."""
    if result.changes or result.tables:  # a long-lived run's idle batches stay out of the log
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
    for name, problem in getattr(result.tables, "document_problems", {}).items():
        context.log.warning(problem)
    for name, count in getattr(result.tables, "documents", {}).items():
        if documents and name in documents:
            yield dg.AssetMaterialization(
                asset_key=documents[name], description=f"{description}: documents refreshed",
                metadata={"documents_recomputed": dg.MetadataValue.int(count)},
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


def _pool_waited_on(context: dg.OpExecutionContext, pool: str):
    """Whether a step of another run waits for ``pool`` (a backfill, the retry job): a long-lived
    drain then ends after its batch and lets it in; the sensor starts the next drain. Looked up at
    most every few seconds."""
    checked = {"at": time.monotonic()}

    def waited_on() -> bool:
        if time.monotonic() - checked["at"] < 5:
            return False
        checked["at"] = time.monotonic()
        try:
            info = context.instance.event_log_storage.get_concurrency_info(pool)
        except Exception:  # an instance without pools (in-process runs): nobody can wait
            return False
        return bool(info.pending_run_ids - {context.run_id})

    return waited_on


def build_cdc_job(
    config: ReplicationConfig, tables: list[Table], translator: TableAssetTranslator, keys: ResourceKeys = ResourceKeys()
) -> dg.JobDefinition:
    """Drains the slot (tables with strategy cdc) and the trigger change table (strategy triggers)."""
    name = f"{config.source.name}_cdc_drain"
    configured = frozenset(d.name for d in config.documents)  # drains refresh only these sets
    settings = DrainSettings(slot=config.source.slot, publication=config.source.publication, documents=configured)
    slot_tables = [t for t in tables if t.strategy == "cdc"]
    captured_tables = [t for t in tables if t.strategy == "triggers"]
    pool = config.source.pool
    documents = {d.name: document_asset_key(translator, d) for d in config.documents}
    report_every = config.source.freshness_seconds / 2  # kept_current.py: half the freshness window

    @dg.op(name=f"{config.source.name}_drain_slot", pool=config.source.pool, out={}, required_resource_keys=keys.both)
    def drain(context: dg.OpExecutionContext, config: DrainConfig):
        source, warehouse = keys.source_of(context), keys.warehouse_of(context)
        run_seconds = config.run_seconds
        read = replace(settings, max_changes=config.max_changes, max_bytes=config.max_bytes)
        if run_seconds > 0:  # micro-batches: a short read each, applied as the next is read
            read = replace(read, max_seconds=config.batch_seconds, min_seconds=config.min_batch_seconds)
        run = drain_run(
            source.conninfo, warehouse.open, slot_tables, captured_tables, read, LoopSettings(run_seconds=run_seconds), context.log.info,
            # A long-lived run holds a DuckDB file only while each of its calls runs (one writer
            # process per file: readers get in between); other warehouses, a connection per session.
            per_call=run_seconds > 0 and isinstance(warehouse, DuckDBWarehouseResource),
            capture=CaptureSettings(max_changes=config.max_changes),
            hand_over=_pool_waited_on(context, pool),
        )
        kept = KeptCurrent(context.instance, translator, tables, report_every)

        def statuses():
            # Not read_only: a one-batch run holds the DuckDB file for its session, and DuckDB
            # refuses a second connection of another mode to it from the same process.
            with warehouse.open() as wh:
                return wh.statuses()

        with _transient_as_retryable(), closing(run):
            for done in run:
                failed = {}
                if done.slot is not None:
                    result = done.slot
                    lsn = int_to_lsn(result.drained_lsn)
                    drained = f"{result.changes:,} changes in {result.transactions:,} transactions up to {lsn}"
                    yield from _report(context, translator, result, drained, f"CDC micro-batch up to {lsn}", documents)
                    yield from kept.events(result, slot_tables, lsn, statuses)
                    failed.update(result.failed)
                if done.captured is not None:
                    result = done.captured
                    drained = f"{result.changes:,} captured changes up to change {result.drained_lsn}"
                    yield from _report(context, translator, result, drained, f"captured changes up to change {result.drained_lsn}")
                    yield from kept.events(result, captured_tables, f"change {result.drained_lsn}", statuses)
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

    # In process: the step runs in the run worker, which has loaded the code already. A step
    # process of its own would load it again after the pool slot is claimed (seconds on a
    # loaded machine), and every handover between long-lived runs would wait for that.
    @dg.job(name=name, description=description, tags={"pg_replication/kind": "cdc"}, executor_def=dg.in_process_executor)
    def cdc_job():
        drain()

    return cdc_job


class RetryTableConfig(dg.Config):
    table: str = Field(description="The failed table to retry: schema.table (or its name alone when unambiguous).")


def build_retry_job(config: ReplicationConfig, tables: list[Table], keys: ResourceKeys = ResourceKeys()) -> dg.JobDefinition:
    """Replays a failed table's change log into it (after its cause was fixed) and sets it streaming."""
    name = f"{config.source.name}_retry_table"
    documents = frozenset(d.name for d in config.documents)  # rebuilt after the replay when they hold the table

    @dg.op(name=f"{config.source.name}_replay_change_log", pool=config.source.pool, out={}, required_resource_keys=keys.both)
    def retry(context: dg.OpExecutionContext, config: RetryTableConfig):
        source, warehouse = keys.source_of(context), keys.warehouse_of(context)
        table = find_table(tables, config.table)
        with warehouse.open() as wh:
            replayed = retry_table(source.conninfo, wh, table, documents, context.log.info)
        context.log.info(f"{table.display}: {replayed:,} logged change(s) replayed; streaming again")

    # In process, like the drain: one step gains nothing from a process of its own (bench/executor.py).
    @dg.job(
        name=name, description="Replay a failed table's change log (config: table) and stream it again.",
        tags={"pg_replication/kind": "retry"}, executor_def=dg.in_process_executor,
    )
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
