"""The CDC sensor: a cheap look at the slot; when WAL moved past it, request one drain run."""

import json

import dagster as dg

from pg_replication.config import ReplicationConfig
from pg_replication.resources import PostgresSource
from pg_replication.source.pgoutput import int_to_lsn
from pg_replication.source.slot import slot_status

IN_PROGRESS = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def build_cdc_sensor(config: ReplicationConfig, job: dg.JobDefinition) -> dg.SensorDefinition:
    slot = config.source.slot

    @dg.sensor(
        name=f"{config.source.name}_cdc_sensor",
        job=job,
        minimum_interval_seconds=config.source.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Requests a drain run when the {slot!r} slot has WAL to read. Never drains itself.",
    )
    def cdc_sensor(context: dg.SensorEvaluationContext, source: PostgresSource):
        with source.connect() as conn:
            status = slot_status(conn, slot)
        if status is None:
            return dg.SkipReason(f"slot {slot!r} does not exist yet: the first backfill creates it")
        if status.wal_status != "lost" and status.current_lsn <= status.confirmed_lsn:
            return dg.SkipReason(f"slot {slot!r} is caught up at {int_to_lsn(status.confirmed_lsn)}")
        running = context.instance.get_runs(dg.RunsFilter(job_name=job.name, statuses=IN_PROGRESS), limit=1)
        if running:
            return dg.SkipReason(f"drain run {running[0].run_id} is still in progress")
        # The run key names the slot position; the attempt count lets a failed drain be retried.
        previous = json.loads(context.cursor) if context.cursor else {}
        attempt = previous.get("attempt", 0) + 1 if previous.get("lsn") == status.confirmed_lsn else 0
        context.update_cursor(json.dumps({"lsn": status.confirmed_lsn, "attempt": attempt}))
        return dg.RunRequest(
            run_key=f"{slot}:{int_to_lsn(status.confirmed_lsn)}:{attempt}",
            tags={"pg_replication/lag_bytes": str(status.lag_bytes)},
        )

    return cdc_sensor
