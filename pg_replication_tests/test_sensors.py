"""The CDC sensor, one test per case, with build_sensor_context against a real slot."""

import dagster as dg
import pytest

from pg_replication.definitions import build_definitions


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
