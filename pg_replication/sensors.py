"""The CDC sensor: a cheap look at the slot (strategy cdc) and at the trigger change table
(strategy triggers); when either has something to drain, request one drain run."""

import json

import dagster as dg

from pg_replication.config import ReplicationConfig
from pg_replication.resources import PostgresSource
from pg_replication.source.pgoutput import int_to_lsn
from pg_replication.source.catalog import Table
from pg_replication.source.slot import slot_status

IN_PROGRESS = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def _captured_up_to(conn) -> int | None:
    """The newest captured change id, None when nothing waits (or capture is not installed)."""
    if conn.execute("SELECT to_regclass('_pg_replication_capture.changes')").fetchone()[0] is None:
        return None
    return conn.execute("SELECT max(id) FROM _pg_replication_capture.changes").fetchone()[0]


def build_cdc_sensor(config: ReplicationConfig, job: dg.JobDefinition, tables: list[Table]) -> dg.SensorDefinition:
    slot = config.source.slot
    strategies = {t.strategy for t in tables}
    watch_slot, watch_capture = "cdc" in strategies, "triggers" in strategies

    @dg.sensor(
        name=f"{config.source.name}_cdc_sensor",
        job=job,
        minimum_interval_seconds=config.source.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Requests a drain run when the {slot!r} slot has WAL to read, or captured changes wait. Never drains itself.",
    )
    def cdc_sensor(context: dg.SensorEvaluationContext, source: PostgresSource):
        positions, idle = [], []
        with source.connect() as conn:
            status = slot_status(conn, slot) if watch_slot else None
            captured = _captured_up_to(conn) if watch_capture else None
        if watch_slot and status is None:
            idle.append(f"slot {slot!r} does not exist yet: the first backfill creates it")
        elif watch_slot and status.wal_status != "lost" and status.current_lsn <= status.confirmed_lsn:
            idle.append(f"slot {slot!r} is caught up at {int_to_lsn(status.confirmed_lsn)}")
        elif watch_slot:
            positions.append(int_to_lsn(status.confirmed_lsn))
        if watch_capture and captured is None:
            idle.append("no captured changes wait")
        elif watch_capture:
            positions.append(f"change {captured}")
        if not positions:
            return dg.SkipReason("; ".join(idle) or "no table replicates through the slot or triggers")
        running = context.instance.get_runs(dg.RunsFilter(job_name=job.name, statuses=IN_PROGRESS), limit=1)
        if running:
            return dg.SkipReason(f"drain run {running[0].run_id} is still in progress")
        # The run key names the position; the attempt count lets a failed drain be retried.
        position = ",".join(positions)
        previous = json.loads(context.cursor) if context.cursor else {}
        attempt = previous.get("attempt", 0) + 1 if previous.get("position") == position else 0
        context.update_cursor(json.dumps({"position": position, "attempt": attempt}))
        return dg.RunRequest(
            run_key=f"{slot}:{position}:{attempt}",
            tags={"pg_replication/lag_bytes": str(status.lag_bytes if status else 0)},
        )

    return cdc_sensor
