"""The CDC drain job through Dagster: micro-batch materializations with their metadata."""

import os
import subprocess
import sys

import dagster as dg
import pytest

from pg_replication.config import load_config
from pg_replication.dagster.assets import TableAssetTranslator
from pg_replication.dagster.definitions import build_definitions, build_definitions_from_catalog
from pg_replication.dagster.executor import PRELOADED, _fork_steps_from_a_server, table_executor
from pg_replication.dagster.load_catalog import load_catalog
from pg_replication_tests import cli_server


@pytest.fixture
def shop(pg, write_config, duckdb_path):
    pg.execute("CREATE TABLE a (id int PRIMARY KEY, v numeric(6,2))")
    pg.execute("CREATE TABLE b (id int PRIMARY KEY, v int)")
    pg.execute("INSERT INTO a SELECT i, i FROM generate_series(1, 100) i")
    write_config({"tables": ["a", "b"], "defaults": {"partitions": 2}})
    defs = build_definitions()
    job = defs.resolve_implicit_global_asset_job_def()
    for key in (dg.AssetKey(["public", "a"]), dg.AssetKey(["public", "b"])):
        for partition in ("000", "001"):
            assert job.execute_in_process(asset_selection=[key], partition_key=partition).success
    return defs


def _drain(defs, instance=None):
    return defs.resolve_job_def("postgres_cdc_drain").execute_in_process(instance=instance, raise_on_error=False)


def test_drain_materializes_touched_tables_with_metadata(shop, pg):
    pg.execute("INSERT INTO a VALUES (101, 1)")
    pg.execute("UPDATE a SET v = v + 1 WHERE id <= 10")
    pg.execute("DELETE FROM a WHERE id = 50")
    with dg.instance_for_test() as instance:
        result = _drain(shop, instance)
        assert result.success
        events = result.asset_materializations_for_node("postgres_drain_slot")
        (event,) = [e for e in events if e.metadata["mode"].value == "applied"]  # b: kept current (test below)
        assert event.asset_key == dg.AssetKey(["public", "a"])
        md = {k: v.value for k, v in event.metadata.items()}
        assert (md["inserted"], md["updated"], md["deleted"], md["truncated"]) == (1, 10, 1, 0)
        assert md["dagster/row_count"] == 100
        assert md["lag_seconds"] >= 0 and md["first_lsn"] <= md["last_lsn"]
        # It is recorded on the asset (so lag plots), without touching partition status.
        latest = instance.get_latest_materialization_event(dg.AssetKey(["public", "a"]))
        assert latest.asset_materialization.metadata["lag_seconds"].value == md["lag_seconds"]


def test_one_failing_table_fails_the_run_loudly_while_others_apply(shop, pg, duckdb_path):
    import duckdb

    pg.execute("INSERT INTO a VALUES (500, 'NaN')")
    pg.execute("INSERT INTO b VALUES (1, 1)")
    result = _drain(shop)
    assert not result.success
    failure = result.failure_data_for_node("postgres_drain_slot").error
    assert "public.a" in failure.message and "LSN" in failure.message and "NaN" in failure.message
    with duckdb.connect(str(duckdb_path), read_only=True) as wh:
        assert wh.execute('SELECT id, v FROM "public"."b"').fetchall() == [(1, 1)]


def test_asset_checks_parity_and_freshness(shop, pg):
    pg.execute("INSERT INTO b VALUES (7, 7)")
    checks = [k for k in shop.resolve_asset_graph().asset_check_keys if k.asset_key == dg.AssetKey(["public", "b"])]
    assert {c.name for c in checks} == {"row_count_parity", "cdc_freshness", "slot_health"}
    with_job = dg.Definitions.merge(
        shop, dg.Definitions(jobs=[dg.define_asset_job("checks_only", selection=dg.AssetSelection.checks(*checks))])
    )
    job = with_job.resolve_job_def("checks_only")
    for _ in range(20):  # parity is exact once the drain has passed the WAL position the check reads
        assert _drain(shop).success
        result = job.execute_in_process(raise_on_error=False)
        evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
        if evaluations["row_count_parity"].metadata["exact"].value:
            break
    assert evaluations["row_count_parity"].passed and evaluations["row_count_parity"].metadata["exact"].value
    assert evaluations["cdc_freshness"].passed
    assert evaluations["slot_health"].passed and evaluations["slot_health"].metadata["wal_status"].value == "reserved"
    pg.execute("INSERT INTO b VALUES (8, 8)")  # not drained yet: parity fails, as a warning
    result = job.execute_in_process(raise_on_error=False)
    parity = next(e for e in result.get_asset_check_evaluations() if e.check_name == "row_count_parity")
    assert not parity.passed and parity.severity == dg.AssetCheckSeverity.WARN
    assert "2 in the warehouse" not in parity.description and "1 in the" in parity.description


def test_slot_health_fails_without_the_slot(shop, pg):
    pg.execute("SELECT pg_drop_replication_slot('pg_replication')")
    checks = [k for k in shop.resolve_asset_graph().asset_check_keys if k.name == "slot_health"]
    with_job = dg.Definitions.merge(
        shop, dg.Definitions(jobs=[dg.define_asset_job("health", selection=dg.AssetSelection.checks(*checks))])
    )
    result = with_job.resolve_job_def("health").execute_in_process(raise_on_error=False)
    (first, *_) = result.get_asset_check_evaluations()
    assert not first.passed and "does not exist" in first.description


def test_one_step_jobs_run_in_process(pg, write_config, duckdb_path):
    """The drain, sync and retry jobs run their step in the run worker (bench/executor.py measures
    what a process per step costs)."""
    pg.execute("CREATE TABLE a (id int PRIMARY KEY)")
    pg.execute("CREATE TABLE r (id int PRIMARY KEY)")
    write_config({"tables": ["a", {"name": "r", "strategy": "reload"}]})
    defs = build_definitions()
    names = [j.name for j in defs.jobs]
    one_step = [n for n in names if n.startswith("postgres_sync_")] + ["postgres_cdc_drain", "postgres_retry_table"]
    assert len(one_step) == 3
    for name in one_step:
        assert defs.resolve_job_def(name).executor_def.name == dg.in_process_executor.name


def test_table_runs_fork_their_steps_from_a_server_unless_the_run_says_otherwise(pg, write_config, duckdb_path):
    """A table's backfill and its checks are steps of their own; they fork from a server that has
    imported Dagster and the engine (bench/executor.py measures the spawn it saves), and a run
    that names a start method, or asks to run in process, gets what it asked for. A component
    sets no executor, so a project that sets its own still loads."""
    pg.execute("CREATE TABLE a (id int PRIMARY KEY)")
    write_config({"tables": ["a"]})
    job = build_definitions().resolve_implicit_global_asset_job_def()
    assert job.executor_def is table_executor
    # A component's definitions set none: its project's own executor is the one Dagster takes.
    config = load_config()
    tables = build_definitions_from_catalog(config, load_catalog(config), TableAssetTranslator(config))
    project = dg.Definitions.merge(tables, dg.Definitions(executor=dg.in_process_executor))
    assert project.resolve_implicit_global_asset_job_def().executor_def is dg.in_process_executor
    forked = _fork_steps_from_a_server({"multiprocess": {"max_concurrent": 2}})["multiprocess"]
    assert forked["max_concurrent"] == 2 and set(forked["start_method"]) == {"forkserver"}
    assert "pg_replication.dagster.assets" in forked["start_method"]["forkserver"]["preload_modules"]
    spawned = {"multiprocess": {"start_method": {"spawn": {}}}}
    assert _fork_steps_from_a_server(spawned) == spawned
    assert _fork_steps_from_a_server({"in_process": {}}) == {"in_process": {}}


FORK_SAFETY = """
import importlib, os, sys, threading
for name in sys.argv[1:]:
    importlib.import_module(name)
links = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")]
print(threading.active_count(), sum(link.startswith("socket:") for link in links))
"""


@pytest.mark.parametrize("preloaded", [PRELOADED, cli_server.PRELOADED], ids=["table_executor", "tests_cli_server"])
def test_the_preloaded_modules_start_no_thread_and_open_no_socket(pg_url, preloaded):
    """What makes forking the steps (and the suite's commands, cli_server.py) safe: importing the
    preloaded modules in a fresh interpreter leaves one thread and no socket (a connection or a
    thread would be shared by every forked process)."""
    out = subprocess.run([sys.executable, "-c", FORK_SAFETY, *preloaded], env=os.environ, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["1", "0"], out.stdout


def test_a_caught_up_drain_materializes_quiet_streaming_tables_once_per_half_window(pg, write_config, duckdb_path):
    """Dagster's FreshnessPolicy counts materializations only: a table nobody writes to gets one
    from the drain that kept it current (caught up), at most once per half freshness window; a
    table still backfilling gets none."""
    pg.execute("CREATE TABLE busy (id int PRIMARY KEY, v int)")
    pg.execute("CREATE TABLE quiet (id int PRIMARY KEY, v int)")
    pg.execute("CREATE TABLE half (id int PRIMARY KEY, v int)")
    pg.execute("INSERT INTO quiet SELECT i, i FROM generate_series(1, 10) i")
    write_config({"tables": ["busy", "quiet", "half"], "defaults": {"partitions": 2}, "source": {"freshness_seconds": 600}})
    defs = build_definitions()
    job = defs.resolve_implicit_global_asset_job_def()
    for name, partitions in (("busy", ("000", "001")), ("quiet", ("000", "001")), ("half", ("000",))):
        for partition in partitions:
            assert job.execute_in_process(asset_selection=[dg.AssetKey(["public", name])], partition_key=partition).success
    with dg.instance_for_test() as instance:  # no materialization of any table in it yet
        pg.execute("INSERT INTO busy VALUES (1, 1)")
        first = _drain(defs, instance)
        assert first.success
        events = {e.asset_key.path[-1]: e for e in first.asset_materializations_for_node("postgres_drain_slot")}
        assert set(events) == {"busy", "quiet"}  # half is still backfilling: not current
        assert events["quiet"].metadata["mode"].value == "caught_up"
        assert instance.get_latest_materialization_event(dg.AssetKey(["public", "quiet"])) is not None
        pg.execute("INSERT INTO busy VALUES (2, 2)")
        second = _drain(defs, instance)  # within the half window: quiet's report still stands
        assert [e.asset_key.path[-1] for e in second.asset_materializations_for_node("postgres_drain_slot")] == ["busy"]
