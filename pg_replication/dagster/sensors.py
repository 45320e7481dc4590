"""The CDC sensor: a cheap look at the slot (strategy cdc) and at the trigger change table
(strategy triggers); when either has something to drain, request one drain run."""

import json
import os
import socket
import time
from collections.abc import Sequence

import dagster as dg

from pg_replication.config import ReplicationConfig
from pg_replication.errors import SourceUnavailableError
from pg_replication.dagster.assets import TableAssetTranslator
from pg_replication.dagster.kept_current import report_due
from pg_replication.dagster.resources import PostgresSource, ResourceKeys
from pg_replication.source.pgoutput import int_to_lsn
from pg_replication.source.catalog import Table
from pg_replication.source.slot import SlotBusyError, flushed_lsn, slot_status
from pg_replication.source.slot_probe import longest_probe, probe_slot

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


def _slot_has_changes(context: dg.SensorEvaluationContext, source: PostgresSource, publication: str, status, flushed: int, seconds: float) -> bool | None:
    """Whether the slot holds a change to apply below the flushed WAL (None: busy, another session
    reads it). When the probe cannot tell (too slow, an error), a drain run finds out."""
    try:
        probe = probe_slot(source.conninfo, status.name, publication, status.confirmed_lsn, until_lsn=flushed, timeout=seconds)
    except SlotBusyError:
        return None
    except Exception as exc:  # e.g. the publication does not exist yet: the drain creates it
        context.log.warning(f"could not look into slot {status.name!r} ({str(exc).splitlines()[0]}): requesting a drain")
        return True
    return probe.has_changes or not probe.decided


def build_cdc_sensor(
    config: ReplicationConfig,
    job: dg.JobDefinition,
    tables: list[Table],
    load_warnings: Sequence[str] = (),
    keys: ResourceKeys = ResourceKeys(),
    translator: TableAssetTranslator | None = None,
) -> dg.SensorDefinition:
    """``load_warnings``: what the code location left out when it loaded (tables that cannot be
    replicated, a source that was down), shown in the sensor's description: where a Dagster user
    looks when a table is not replicated. ``translator`` names the table assets a one-batch drain
    reports kept current when nothing changes (kept_current.py)."""
    slot = config.source.slot
    publication = config.source.publication
    advance_bytes = config.source.idle_slot_advance_mb << 20
    op_name = f"{config.source.name}_drain_slot"
    # A successor is requested this long before a busy run's end: a sensor interval plus the time
    # a run takes to start (definitions load) on a loaded machine.
    handover_seconds = config.source.sensor_interval_seconds + 30

    def drain_for(seconds: int) -> dict:
        return {"ops": {f"{config.source.name}_drain_slot": {"config": {"run_seconds": seconds}}}}

    strategies = {t.strategy for t in tables}
    streamed_keys = [(translator or TableAssetTranslator(config)).get_asset_key(t) for t in tables if t.strategy in ("cdc", "triggers")]
    report_every = config.source.freshness_seconds / 2
    watch_slot, watch_capture = "cdc" in strategies, "triggers" in strategies
    description = f"Requests a drain run when the {slot!r} slot has changes to apply, or captured changes wait. Never drains itself."
    if load_warnings:
        description += "\n\nWarnings at load:\n" + "\n".join(f"- {w}" for w in load_warnings)

    @dg.sensor(
        name=f"{config.source.name}_cdc_sensor",
        job=job,
        minimum_interval_seconds=config.source.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=description,
        required_resource_keys={keys.source},
    )
    def cdc_sensor(context: dg.SensorEvaluationContext, **_resources):  # a direct call passes them by key too
        source = keys.source_of(context)
        positions, idle = [], []
        if not (watch_slot or watch_capture):
            return dg.SkipReason("; ".join(["no table replicates through the slot or triggers", *load_warnings]))
        try:
            with source.connect() as conn:
                status = slot_status(conn, slot) if watch_slot else None
                captured = _captured_up_to(conn) if watch_capture else None
                flushed = flushed_lsn(conn) if status is not None else 0
                probe_seconds = min(10.0, longest_probe(conn))
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
            return nothing_to_apply(context, "; ".join(idle), ready=status is not None or not watch_slot)
        live = []
        for run in context.instance.get_runs(dg.RunsFilter(job_name=job.name, statuses=IN_PROGRESS)):
            reason = dead_run_reason(context.instance, run)
            if reason is None:
                live.append(run)
                continue
            # Failed, the run's pool slot is freed by the daemon (run_monitoring's
            # free_slots_after_run_end_seconds in dagster.yaml); the next drain waits for it.
            context.log.warning(f"drain run {run.run_id} marked failed: {reason}")
            context.instance.report_run_failed(run, f"pg_replication's CDC sensor: {reason}")
        if live:
            if len(live) > 1 or not _busy_and_ending(context.instance, live[0], op_name, handover_seconds):
                return dg.SkipReason(f"drain run {live[0].run_id} is still in progress")
            # Its successor starts now and waits for the pool: the stream is handed over within
            # seconds of the running one's end (which ends early once the successor waits).
            context.log.info(f"drain run {live[0].run_id} ends within {handover_seconds} s while changes come: starting its successor")
            return _request(context, positions, status, drain_for(config.source.run_seconds))
        # WAL moves for reasons that carry nothing to apply (other databases, checkpoints,
        # unpublished tables): no run for those, only a one-batch run that advances the slot
        # once it holds back idle_slot_advance_mb.
        run_config = drain_for(config.source.run_seconds)
        if watch_slot and captured is None and status.wal_status != "lost":
            found = _slot_has_changes(context, source, publication, status, flushed, probe_seconds)
            if found is None:
                return dg.SkipReason(f"slot {slot!r} is in use by another session")
            if not found and status.lag_bytes < advance_bytes:
                return nothing_to_apply(
                    context,
                    f"slot {slot!r} has nothing to apply up to {int_to_lsn(flushed)} "
                    f"({status.lag_bytes:,} bytes of WAL from other databases or unpublished tables)",
                )
            if not found:
                run_config = drain_for(0)  # one batch: it only advances the slot
        return _request(context, positions, status, run_config)

    def nothing_to_apply(context: dg.SensorEvaluationContext, why: str, ready: bool = True) -> dg.RunRequest | dg.SkipReason:
        """A skip; or, when the tables' freshness needs it, one batch only to report them kept current."""
        if not ready or not report_due(context.instance, job.name, streamed_keys, report_every):
            return dg.SkipReason(why)
        return dg.RunRequest(
            run_key=f"{slot}:kept-current:{int(time.time() // report_every)}",
            run_config=drain_for(0),
            tags={"pg_replication/lag_bytes": "0", HOST_TAG: socket.gethostname()},
        )

    def _request(context: dg.SensorEvaluationContext, positions: list[str], status, run_config: dict) -> dg.RunRequest:
        # The run key names the position; the attempt count lets a failed drain be retried.
        position = ",".join(positions)
        previous = json.loads(context.cursor) if context.cursor else {}
        attempt = previous.get("attempt", 0) + 1 if previous.get("position") == position else 0
        context.update_cursor(json.dumps({"position": position, "attempt": attempt}))
        return dg.RunRequest(
            run_key=f"{slot}:{position}:{attempt}",
            run_config=run_config,
            tags={"pg_replication/lag_bytes": str(status.lag_bytes if status else 0), HOST_TAG: socket.gethostname()},
        )

    return cdc_sensor


def _busy_and_ending(instance: dg.DagsterInstance, run: dg.DagsterRun, op_name: str, within: float) -> bool:
    """Whether a long-lived drain run ends within ``within`` seconds and applied changes during
    the last ``within`` seconds (an idle one just ends: the next change starts a run)."""
    run_seconds = run.run_config.get("ops", {}).get(op_name, {}).get("config", {}).get("run_seconds", 0)
    record = instance.get_run_record_by_id(run.run_id)
    if not run_seconds or run.status != dg.DagsterRunStatus.STARTED or record is None or record.start_time is None:
        return False
    now = time.time()
    within = min(within, run_seconds / 2)  # short runs: at half-life, not one successor after another
    if record.start_time + run_seconds - now > within:
        return False
    # A drain's caught_up materializations (kept_current.py) say it had nothing to apply: skipped
    # (among the last hundred; a batch that reports more tables than that reads as idle).
    records = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION, ascending=False, limit=100).records
    applied = [r for r in records if r.asset_materialization and r.asset_materialization.metadata.get("mode") != dg.MetadataValue.text("caught_up")]
    return bool(applied) and now - applied[0].event_log_entry.timestamp < within
