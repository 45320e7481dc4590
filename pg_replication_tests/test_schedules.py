"""Strategies through Dagster: query strategies sync from schedules set in replication.yaml;
trigger capture drains through the CDC sensor and job; every table is the same kind of asset."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest

from pg_replication.dagster.definitions import build_definitions
from pg_replication.source.connection import connect
from pg_replication.source.catalog import introspect
from pg_replication.source.triggers import install


@pytest.fixture
def mixed(pg, pg_url, write_config, duckdb_path):
    for name in ("logs", "items", "dims", "orders"):
        pg.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v text, updated timestamptz NOT NULL DEFAULT now())")
        pg.execute(f"INSERT INTO {name} (id, v) SELECT i, 'a' FROM generate_series(1, 100) i")
    config = write_config(
        {
            "tables": [
                {"name": "logs", "strategy": "append"},
                {"name": "items", "strategy": "updated_at", "cursor": "updated", "schedule": "*/5 * * * *"},
                {"name": "dims", "strategy": "reload", "reload_on": "1-31"},
                {"name": "orders", "strategy": "triggers"},
            ],
            "defaults": {"partitions": 1},
        }
    )
    with connect(pg_url) as conn:
        install(conn, [t for t in introspect(conn, config) if t.name == "orders"])
    defs = build_definitions()
    job = defs.resolve_implicit_global_asset_job_def()
    for name in ("logs", "items", "dims", "orders"):
        assert job.execute_in_process(asset_selection=[dg.AssetKey(["public", name])], partition_key="000").success
    return defs


def _rows(duckdb_path, name):
    import duckdb

    with duckdb.connect(str(duckdb_path), read_only=True) as wh:
        return wh.execute(f'SELECT id, v FROM "public"."{name}" ORDER BY id').fetchall()


def test_query_strategies_run_from_their_schedules(mixed, pg, duckdb_path):
    schedules = {s.name: s for s in mixed.schedules}
    assert {s.cron_schedule for s in schedules.values()} == {"*/15 * * * *", "*/5 * * * *"}
    assert all(s.default_status == dg.DefaultScheduleStatus.RUNNING for s in schedules.values())
    pg.execute("INSERT INTO logs (id, v) VALUES (101, 'new')")
    pg.execute("UPDATE items SET v = 'changed', updated = now() + interval '1 minute' WHERE id <= 3")
    pg.execute("DELETE FROM dims WHERE id > 90")
    materialized = {}
    for schedule in schedules.values():
        result = mixed.resolve_job_def(schedule.job_name).execute_in_process()
        assert result.success
        for event in result.get_asset_materialization_events():
            materialized[event.asset_key.path[-1]] = {k: v.value for k, v in event.materialization.metadata.items()}
    assert materialized["logs"]["mode"] == "appended" and materialized["logs"]["rows"] == 1
    # logs.id is set by the application, not a sequence: append says it may skip late commits
    assert materialized["logs"]["keeps_late_commits"] is False and "not filled by a sequence" in materialized["logs"]["late_commits"]
    assert materialized["items"]["mode"] == "upserted"
    assert materialized["dims"]["mode"] == "reloaded" and materialized["dims"]["dagster/row_count"] == 90
    for name in ("logs", "items", "dims"):
        assert _rows(duckdb_path, name) == pg.execute(f"SELECT id, v FROM {name} ORDER BY id").fetchall()


def test_captured_changes_drain_through_the_cdc_sensor_and_job(mixed, pg, duckdb_path):
    sensor = mixed.resolve_sensor_def("postgres_cdc_sensor")
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources={"source": mixed.resources["source"]})
        assert isinstance(sensor(context), dg.SkipReason)  # nothing captured yet
        pg.execute("UPDATE orders SET v = 'paid' WHERE id = 7")
        pg.execute("DELETE FROM orders WHERE id = 8")
        request = sensor(dg.build_sensor_context(instance=instance, resources={"source": mixed.resources["source"]}))
        assert isinstance(request, dg.RunRequest) and "change" in request.run_key
        result = mixed.resolve_job_def("postgres_cdc_drain").execute_in_process(instance=instance)
    assert result.success
    (event,) = result.get_asset_materialization_events()
    assert event.asset_key == dg.AssetKey(["public", "orders"])
    assert _rows(duckdb_path, "orders") == pg.execute("SELECT id, v FROM orders ORDER BY id").fetchall()


def test_on_cron_on_a_table_asset_would_recopy_every_slice(pg, write_config, duckdb_path):
    """Why the query strategies keep their schedules: a table asset's partitions are its backfill
    slices, so `AutomationCondition.on_cron` on it requests every slice at each tick (a full
    re-copy), where the schedule's run syncs only what changed."""
    pg.execute("CREATE TABLE items (id int PRIMARY KEY, v text, updated timestamptz NOT NULL DEFAULT now())")
    write_config({"tables": [{"name": "items", "strategy": "updated_at", "cursor": "updated", "schedule": "*/5 * * * *", "partitions": 4}]})
    (items,) = [a for a in build_definitions().resolve_asset_graph().assets_defs if dg.AssetKey(["public", "items"]) in a.keys]
    on_cron = items.map_asset_specs(lambda spec: spec.replace_attributes(automation_condition=dg.AutomationCondition.on_cron("*/5 * * * *")))
    start = datetime(2026, 1, 5, 9, 1, tzinfo=timezone.utc)
    with dg.instance_for_test() as instance:
        first = dg.evaluate_automation_conditions([on_cron], instance, evaluation_time=start)
        tick = dg.evaluate_automation_conditions([on_cron], instance, evaluation_time=start + timedelta(minutes=5), cursor=first.cursor)
    assert tick.total_requested == len(items.partitions_def.get_partition_keys()) == 4  # every slice: a backfill, not a sync
