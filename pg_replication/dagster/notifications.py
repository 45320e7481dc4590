"""Webhook notifications: a run-status sensor posts a JSON message about each finished sync.

The message names the tables, the status, the rows and LSN range the run applied, and the error.
The webhook URL may hold a token: it is never logged or put in metadata (write it in
replication.yaml as ``${SYNC_WEBHOOK_URL}``).
"""

import json
import urllib.request

import dagster as dg

from pg_replication.config import ReplicationConfig

ROW_KEYS = ("inserted", "updated", "deleted", "rows")


def run_summary(instance: dg.DagsterInstance, run: dg.DagsterRun, status: str) -> dict:
    """What a run of ours did, from its event log: tables, rows, LSN range, error."""
    tables: dict[str, int] = {}
    lsns: list[str] = []
    error = None
    for record in instance.all_logs(run.run_id):
        event = record.dagster_event
        if event is None:
            continue
        if event.is_step_materialization:
            materialization = event.step_materialization_data.materialization
            metadata = {k: v.value for k, v in materialization.metadata.items()}
            key = materialization.asset_key.to_user_string()
            tables[key] = tables.get(key, 0) + sum(int(metadata.get(k, 0) or 0) for k in ROW_KEYS)
            lsns += [metadata[k] for k in ("first_lsn", "last_lsn", "plan_lsn") if k in metadata]
        elif event.is_step_failure and event.step_failure_data.error is not None:
            error = event.step_failure_data.error.message.strip().splitlines()[0]
    lsn_order = sorted(lsns, key=lambda text: int(text.split("/")[0], 16) << 32 | int(text.split("/")[1], 16))
    return {
        "source": "pg_replication",
        "job": run.job_name,
        "run_id": run.run_id,
        "status": status,
        "tables": sorted(tables),
        "rows": sum(tables.values()),
        "lsn_range": [lsn_order[0], lsn_order[-1]] if lsn_order else None,
        "error": error,
    }


def post_json(url: str, payload: dict, timeout: float = 10.0) -> int:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - the operator's own URL
        return response.status


def build_notification_sensors(config: ReplicationConfig, jobs: list[dg.JobDefinition]) -> list[dg.SensorDefinition]:
    settings = config.notifications
    if settings is None:
        return []
    url = settings.webhook_url

    def notify(context: dg.RunStatusSensorContext, status: str) -> None:
        if context.dagster_run.job_name not in watched and not context.dagster_run.job_name.startswith("__ASSET_JOB"):
            return
        payload = run_summary(context.instance, context.dagster_run, status)
        try:
            code = post_json(url, payload)
            context.log.info(f"webhook notified ({code}) of {status} run {context.dagster_run.run_id}")
        except OSError as exc:  # the URL is not shown: it may hold a token
            context.log.warning(f"webhook notification failed: {type(exc).__name__}")

    watched = {job.name for job in jobs}

    @dg.run_failure_sensor(name=f"{config.source.name}_sync_failure_webhook", default_status=dg.DefaultSensorStatus.RUNNING, monitor_all_code_locations=False)
    def on_failure(context: dg.RunFailureSensorContext):
        notify(context, "failure")

    sensors = [on_failure]
    if settings.on_success:

        @dg.run_status_sensor(
            run_status=dg.DagsterRunStatus.SUCCESS,
            name=f"{config.source.name}_sync_success_webhook",
            default_status=dg.DefaultSensorStatus.RUNNING,
        )
        def on_success(context: dg.RunStatusSensorContext):
            notify(context, "success")

        sensors.append(on_success)
    return sensors
