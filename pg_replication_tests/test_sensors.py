"""The CDC sensor, one test per case, with build_sensor_context against a real slot."""

import dagster as dg
import pytest

from pg_replication.dagster.definitions import build_definitions
from pg_replication_tests.operator import wait_for


@pytest.fixture
def defs(pg, write_config, duckdb_path):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    write_config({"tables": ["t"], "source": {"slot": "pgr_sensor_slot", "publication": "pgr_sensor_pub"}})
    return build_definitions()


def _evaluate(defs, instance, cursor=None):
    sensor = defs.get_sensor_def("postgres_cdc_sensor")
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"source": defs.resources["source"]})
    return sensor.evaluate_tick(context)


def test_sensor_defaults(defs):
    sensor = defs.get_sensor_def("postgres_cdc_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.minimum_interval_seconds == 10
    assert sensor.job_name == "postgres_cdc_drain"


def test_skips_until_the_slot_exists(defs):
    with dg.instance_for_test() as instance:
        result = _evaluate(defs, instance)
    assert not result.run_requests and "does not exist yet" in result.skip_message


def test_requests_a_run_when_wal_moved_and_retries_with_a_new_key(defs, pg):
    pg.execute("SELECT pg_create_logical_replication_slot('pgr_sensor_slot', 'pgoutput')")
    pg.execute("INSERT INTO t VALUES (1, 1)")
    with dg.instance_for_test() as instance:
        first = _evaluate(defs, instance)
        (request,) = first.run_requests
        assert request.run_key.startswith("pgr_sensor_slot:") and request.run_key.endswith(":0")
        again = _evaluate(defs, instance, cursor=first.cursor)
        (retry,) = again.run_requests
        assert retry.run_key.endswith(":1")  # same slot position: a new attempt, not a duplicate


def test_skips_while_a_drain_is_in_progress(defs, pg):
    pg.execute("SELECT pg_create_logical_replication_slot('pgr_sensor_slot', 'pgoutput')")
    pg.execute("INSERT INTO t VALUES (1, 1)")
    with dg.instance_for_test() as instance:
        job = defs.resolve_job_def("postgres_cdc_drain")
        instance.create_run_for_job(job, status=dg.DagsterRunStatus.STARTED)
        result = _evaluate(defs, instance)
    assert not result.run_requests and "in progress" in result.skip_message


def test_skips_when_caught_up(defs, pg):
    pg.execute("SELECT pg_create_logical_replication_slot('pgr_sensor_slot', 'pgoutput')")
    with dg.instance_for_test() as instance:
        for _ in range(20):  # other databases on the server also write WAL: retry until a quiet moment
            pg.execute("SELECT pg_replication_slot_advance('pgr_sensor_slot', pg_current_wal_lsn())")
            result = _evaluate(defs, instance)
            if not result.run_requests:
                break
    assert not result.run_requests and "caught up" in result.skip_message


def _elsewhere_wal(pg, rows: int) -> None:
    """WAL that carries nothing to apply: writes to a table the publication does not hold."""
    pg.execute("CREATE TABLE IF NOT EXISTS elsewhere (id int, pad text)")
    pg.execute("INSERT INTO elsewhere SELECT i, repeat('x', 200) FROM generate_series(1, %s) i", (rows,))


def test_no_run_for_wal_with_nothing_to_apply_and_one_for_a_change(defs, pg):
    pg.execute("CREATE PUBLICATION pgr_sensor_pub FOR TABLE t")
    pg.execute("SELECT pg_create_logical_replication_slot('pgr_sensor_slot', 'pgoutput')")
    _elsewhere_wal(pg, 1000)
    with dg.instance_for_test() as instance:
        idle = _evaluate(defs, instance)
        assert not idle.run_requests and "nothing to apply" in idle.skip_message
        pg.execute("INSERT INTO t VALUES (1, 1)")
        (request,) = _evaluate(defs, instance, cursor=idle.cursor).run_requests
    assert request.run_config["ops"]["postgres_drain_slot"]["config"]["run_seconds"] == 300  # long-lived


def test_an_idle_slot_still_advances_with_one_short_run(pg, write_config, duckdb_path):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    write_config({"tables": ["t"], "source": {"slot": "pgr_sensor_slot", "publication": "pgr_sensor_pub", "idle_slot_advance_mb": 1}})
    defs = build_definitions()
    pg.execute("CREATE PUBLICATION pgr_sensor_pub FOR TABLE t")
    pg.execute("SELECT pg_create_logical_replication_slot('pgr_sensor_slot', 'pgoutput')")
    with dg.instance_for_test() as instance:
        _elsewhere_wal(pg, 100)  # below the bound: no run
        assert not _evaluate(defs, instance).run_requests
        _elsewhere_wal(pg, 20_000)  # about 5 MB
        held_back = pg.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0]
        (request,) = _evaluate(defs, instance).run_requests
        assert request.run_config["ops"]["postgres_drain_slot"]["config"]["run_seconds"] == 0  # one batch
        job = defs.resolve_job_def("postgres_cdc_drain")
        assert job.execute_in_process(run_config=request.run_config, instance=instance).success
    (advanced,) = pg.execute(
        "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = 'pgr_sensor_slot'", (held_back,)
    ).fetchone()
    assert advanced


def test_an_idle_source_gets_one_short_run_per_half_window_to_report_its_tables_kept_current(pg, write_config, duckdb_path):
    """Nothing changes: no drain would run and the table would show stale. Once its last
    materialization is half a freshness window old, the sensor requests one batch, whose drain
    reports the table kept current; then it skips again for another half window."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
    pg.execute("INSERT INTO t SELECT i, i FROM generate_series(1, 10) i")
    write_config({"tables": ["t"], "defaults": {"partitions": 1}, "source": {"slot": "pgr_sensor_slot", "publication": "pgr_sensor_pub", "freshness_seconds": 60}})
    defs = build_definitions()
    key = dg.AssetKey(["public", "t"])
    with dg.instance_for_test() as instance:
        backfill = defs.resolve_implicit_global_asset_job_def()
        assert backfill.execute_in_process(asset_selection=[key], partition_key="000", instance=instance).success
        assert not _evaluate(defs, instance).run_requests  # materialized just now: fresh for a while

        def requested():
            return _evaluate(defs, instance).run_requests

        (request,) = wait_for(requested, "the sensor to ask for a run that reports t kept current", timeout=300, poll=2)
        assert ":kept-current:" in request.run_key
        assert request.run_config["ops"]["postgres_drain_slot"]["config"]["run_seconds"] == 0  # one batch
        drain = defs.resolve_job_def("postgres_cdc_drain")
        assert drain.execute_in_process(run_config=request.run_config, instance=instance, tags=request.tags).success
        latest = instance.get_latest_materialization_event(key).asset_materialization
        assert latest.metadata["mode"] == dg.MetadataValue.text("caught_up")
        assert not _evaluate(defs, instance).run_requests  # a drain just ran: nothing due
