"""The job that re-reads the source's catalog into the saved snapshot (definitions state), so that
code locations load without touching the source. Run it by hand, or schedule it; a reload of the
code location (or the next run process) then sees new tables."""

from collections.abc import Callable

import dagster as dg

from pg_replication.config import ReplicationConfig
from pg_replication.dagster.load_catalog import refresh_catalog, snapshot_path
from pg_replication.errors import ConfigError
from pg_replication.source.connection import source_conninfo


def refresh_job_name(config: ReplicationConfig) -> str:
    return f"refresh_catalog_{config.source.name}"


def build_refresh_job(config: ReplicationConfig, refresh: Callable[[], str]) -> dg.JobDefinition:
    """``refresh`` reads the catalog, saves it, and says what it saved; it raises (the saved
    catalog stays as it was) when the source cannot be read."""

    @dg.op(name=f"{refresh_job_name(config)}_op", out={})
    def refresh_op(context: dg.OpExecutionContext):
        context.log.info(refresh())

    @dg.job(
        name=refresh_job_name(config),
        description=f"Re-read source {config.source.name}'s catalog into the saved snapshot the definitions load from; "
        "reload the code location afterwards to see new tables.",
        tags={"pg_replication/kind": "refresh_catalog"},
        executor_def=dg.in_process_executor,
    )
    def refresh_catalog_job():
        refresh_op()

    return refresh_catalog_job


def build_refresh_catalog_job(config: ReplicationConfig) -> dg.JobDefinition:
    """replication.yaml's path: the snapshot in DAGSTER_HOME (load_catalog.snapshot_path)."""

    def refresh() -> str:
        path = snapshot_path(config)
        if path is None:
            raise ConfigError("DAGSTER_HOME is not set: there is nowhere to save the catalog", setting="DAGSTER_HOME")
        replicated, left_out = refresh_catalog(config, source_conninfo(), path)
        return f"saved {replicated} table(s) ({left_out} left out) to {path}"

    return build_refresh_job(config, refresh)


__all__ = ["build_refresh_catalog_job", "build_refresh_job", "refresh_job_name"]
