"""Webhook notifications, posted to a local HTTP server by the run-status sensors."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import dagster as dg
import pytest

from pg_replication.dagster.definitions import build_definitions


@pytest.fixture
def webhook():
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook?token=s3cret", received
    server.shutdown()


@pytest.fixture
def defs(pg, write_config, duckdb_path, webhook):
    url, _ = webhook
    pg.execute("CREATE TABLE a (id int PRIMARY KEY, v numeric(6,2))")
    write_config({"tables": ["a"], "defaults": {"partitions": 1}, "notifications": {"webhook_url": url, "on_success": True}})
    defs = build_definitions()
    assert defs.resolve_implicit_global_asset_job_def().execute_in_process(partition_key="000").success
    return defs


def _fire(defs, sensor_name, instance, result):
    run = instance.get_run_by_id(result.run_id)
    event = next(e for e in result.all_events if e.event_type_value in ("PIPELINE_SUCCESS", "PIPELINE_FAILURE"))
    sensor = defs.get_sensor_def(sensor_name)
    context = dg.build_run_status_sensor_context(sensor_name=sensor_name, dagster_event=event, dagster_instance=instance, dagster_run=run)
    sensor(context) if sensor_name.endswith("success_webhook") else sensor(context.for_run_failure())


def test_success_and_failure_messages(defs, pg, webhook, capsys):
    _, received = webhook
    drain = defs.resolve_job_def("postgres_cdc_drain")
    with dg.instance_for_test() as instance:
        pg.execute("INSERT INTO a VALUES (1, 1), (2, 2)")
        ok = drain.execute_in_process(instance=instance)
        _fire(defs, "postgres_sync_success_webhook", instance, ok)
        pg.execute("INSERT INTO a VALUES (3, 'NaN')")
        failed = drain.execute_in_process(instance=instance, raise_on_error=False)
        _fire(defs, "postgres_sync_failure_webhook", instance, failed)
    success, failure = received
    assert success["status"] == "success" and success["tables"] == ["public/a"] and success["rows"] == 2
    assert success["lsn_range"][0] <= success["lsn_range"][1]
    assert failure["status"] == "failure" and "public.a" in failure["error"] and "NaN" in failure["error"]
    assert "s3cret" not in capsys.readouterr().err


def test_bad_webhook_url_is_a_config_error(write_config):
    from pg_replication.errors import ConfigError

    with pytest.raises(ConfigError, match="notifications.webhook_url"):
        write_config({"tables": ["a"], "notifications": {"webhook_url": "ftp://x"}})
