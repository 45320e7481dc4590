"""The CDC sensor: a cheap look at the slot (strategy cdc) and at the trigger change table
(strategy triggers); when either has something to drain, request one drain run."""

import json
import os
import socket
from collections.abc import Sequence

import dagster as dg

from pg_replication.config import ReplicationConfig
from pg_replication.errors import SourceUnavailableError
from pg_replication.resources import PostgresSource
from pg_replication.source.pgoutput import int_to_lsn
from pg_replication.source.catalog import Table
from pg_replication.source.slot import slot_status

# The machine whose sensor asked for a drain run: Dagster's default run launcher starts the run
# worker in the code server, next to the sensor, so only there can its process be looked at.
HOST_TAG = "pg_replication/host"

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


def _run_worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The pid Dagster records when it starts a run's worker (an engine event with no step)."""
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        event = record.dagster_event
        pid = event.engine_event_data.metadata.get("pid") if event and not event.step_key else None
        if pid is not None:
            return int(pid.value)
    return None


def _process_started_at(pid: int) -> float | None:
    """When process ``pid`` started, None when it is gone or a zombie. Without Linux's /proc,
    a process that exists is taken to be the same one (-inf: started long ago)."""
    if not os.path.isdir("/proc/self"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return float("-inf")
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    with open("/proc/stat") as f:
        boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def dead_run_reason(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str | None:
    """Why a STARTED drain run can never finish, or None while it may still be running.

    Dagster marks a run failed when its worker dies under a live code server, but not when the
    code server died with it (a lost node, an OOM kill of the process group): the run would stay
    STARTED for good, and with it this sensor. A run this machine's sensor requested has its
    worker here; it is dead when that process is gone (or a later process reuses its pid)."""
    if run.status != dg.DagsterRunStatus.STARTED or run.tags.get(HOST_TAG) != socket.gethostname():
        return None
    pid = _run_worker_pid(instance, run.run_id)
    record = instance.get_run_record_by_id(run.run_id)
    if pid is None or record is None or record.start_time is None:
        return None
    started_at = _process_started_at(pid)
    if started_at is None:
        return f"its run worker (pid {pid}) is gone"
    if started_at > record.start_time + 1:  # clock ticks: the worker started before RUN_START
        return f"its run worker (pid {pid}) is gone (the pid now belongs to a later process)"
    return None


def build_cdc_sensor(
    config: ReplicationConfig, job: dg.JobDefinition, tables: list[Table], load_warnings: Sequence[str] = ()
) -> dg.SensorDefinition:
    """``load_warnings``: what the code location left out when it loaded (tables that cannot be
    replicated, a source that was down), shown in the sensor's description: where a Dagster user
    looks when a table is not replicated."""
    slot = config.source.slot
    strategies = {t.strategy for t in tables}
    watch_slot, watch_capture = "cdc" in strategies, "triggers" in strategies
    description = f"Requests a drain run when the {slot!r} slot has WAL to read, or captured changes wait. Never drains itself."
    if load_warnings:
        description += "\n\nWarnings at load:\n" + "\n".join(f"- {w}" for w in load_warnings)

    @dg.sensor(
        name=f"{config.source.name}_cdc_sensor",
        job=job,
        minimum_interval_seconds=config.source.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=description,
    )
    def cdc_sensor(context: dg.SensorEvaluationContext, source: PostgresSource):
        positions, idle = [], []
        if not (watch_slot or watch_capture):
            return dg.SkipReason("; ".join(["no table replicates through the slot or triggers", *load_warnings]))
        try:
            with source.connect() as conn:
                status = slot_status(conn, slot) if watch_slot else None
                captured = _captured_up_to(conn) if watch_capture else None
        except SourceUnavailableError as exc:  # a restart, a failover: the next tick looks again
            return dg.SkipReason(f"{exc.message}; waiting for the source to come back")
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
            return dg.SkipReason("; ".join(idle))
        for run in context.instance.get_runs(dg.RunsFilter(job_name=job.name, statuses=IN_PROGRESS)):
            reason = dead_run_reason(context.instance, run)
            if reason is None:
                return dg.SkipReason(f"drain run {run.run_id} is still in progress")
            # Failed, the run's pool slot is freed by the daemon (run_monitoring's
            # free_slots_after_run_end_seconds in dagster.yaml); the next drain waits for it.
            context.log.warning(f"drain run {run.run_id} marked failed: {reason}")
            context.instance.report_run_failed(run, f"pg_replication's CDC sensor: {reason}")
        # The run key names the position; the attempt count lets a failed drain be retried.
        position = ",".join(positions)
        previous = json.loads(context.cursor) if context.cursor else {}
        attempt = previous.get("attempt", 0) + 1 if previous.get("position") == position else 0
        context.update_cursor(json.dumps({"position": position, "attempt": attempt}))
        return dg.RunRequest(
            run_key=f"{slot}:{position}:{attempt}",
            tags={"pg_replication/lag_bytes": str(status.lag_bytes if status else 0), HOST_TAG: socket.gethostname()},
        )

    return cdc_sensor
