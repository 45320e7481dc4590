"""The asset checks and freshness: row-count parity stays honest while drains commit beside it;
every table asset carries its FreshnessPolicy; the checks run by themselves under the daemon."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import dagster as dg
import duckdb
import pytest

from pg_replication.config import parse_config
from pg_replication.dagster.definitions import build_definitions
from pg_replication.errors import ConfigError
from pg_replication_tests.operator import ROOT, dagster_env, dagster_daemon, materialize, run_cli, wait_for


@pytest.fixture
def streamed(pg, write_config, duckdb_path):
    """One cdc table, backfilled and drained."""
    pg.execute("CREATE TABLE b (id int PRIMARY KEY, v int)")
    pg.execute("INSERT INTO b SELECT i, i FROM generate_series(1, 50) i")
    write_config({"tables": ["b"], "defaults": {"partitions": 1}})
    defs = build_definitions()
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.execute_in_process(asset_selection=[dg.AssetKey(["public", "b"])], partition_key="000").success
    assert _drain(defs).success
    return defs


def _drain(defs):
    return defs.resolve_job_def("postgres_cdc_drain").execute_in_process(raise_on_error=False)


def _check_job(defs, name: str) -> dg.JobDefinition:
    keys = [k for k in defs.resolve_asset_graph().asset_check_keys if k.name == name]
    merged = dg.Definitions.merge(defs, dg.Definitions(jobs=[dg.define_asset_job("only_checks", selection=dg.AssetSelection.checks(*keys))]))
    return merged.resolve_job_def("only_checks")


def _warehouse_ids(duckdb_path) -> list[int]:
    with duckdb.connect(str(duckdb_path), read_only=True) as wh:
        return [i for (i,) in wh.execute('SELECT id FROM "public"."b" ORDER BY id').fetchall()]


def test_parity_is_no_error_when_a_drain_commits_between_its_reads(streamed, pg, duckdb_path, tmp_path, monkeypatch):
    gates = tmp_path / "failpoints"
    gates.mkdir()
    monkeypatch.setenv("PGR_FAILPOINT_DIR", str(gates))
    (gates / "parity_between_reads.pause").touch()
    job = _check_job(streamed, "row_count_parity")
    results = []
    check = threading.Thread(target=lambda: results.append(job.execute_in_process(raise_on_error=False)))
    check.start()
    try:
        wait_for((gates / "parity_between_reads.paused").exists, "the check to stop between its reads", timeout=300)
        pg.execute("INSERT INTO b VALUES (51, 51)")
        assert _drain(streamed).success  # commits while the check waits between its reads
        assert _warehouse_ids(duckdb_path) == list(range(1, 52))
    finally:
        (gates / "parity_between_reads.pause").unlink()
        check.join(timeout=600)
    (parity,) = results[0].get_asset_check_evaluations()
    assert parity.passed or parity.severity == dg.AssetCheckSeverity.WARN, parity.description
    # what the check reports, it read at one position: both sides hold the new row
    assert parity.metadata["source_rows"].value == parity.metadata["warehouse_rows"].value == 51


def test_every_table_asset_carries_its_freshness_policy(pg, write_config, duckdb_path):
    for name in ("s", "logs", "dims"):
        pg.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
    write_config(
        {
            "tables": [
                "s",
                {"name": "logs", "strategy": "append", "schedule": "0 9 * * 1-5"},
                {"name": "dims", "strategy": "reload", "reload_on": ["mon", "thu"]},
            ],
            "source": {"freshness_seconds": 120},
        }
    )
    defs = build_definitions()
    policies = {spec.key.path[-1]: spec.freshness_policy for spec in defs.resolve_all_asset_specs()}
    # streamed: a change applied within freshness_seconds
    assert policies["s"] == dg.FreshnessPolicy.time_window(fail_window=timedelta(seconds=120))
    # scheduled: materialized since the tick before the last (Dagster's window: the shortest gap)
    assert policies["logs"] == dg.FreshnessPolicy.cron(deadline_cron="0 9 * * 1-5", lower_bound_delta=timedelta(days=1), timezone="UTC")
    # reloaded on Mondays and Thursdays only, by the default */15 schedule: Thursday to Monday and one sync
    assert policies["dims"] == dg.FreshnessPolicy.time_window(fail_window=timedelta(days=4, minutes=15))
    checks = {(k.asset_key.path[-1], k.name) for k in defs.resolve_asset_graph().asset_check_keys}
    # what FreshnessPolicy cannot say stays a check: a quiet streamed table's drain still runs
    assert checks == {("s", "row_count_parity"), ("s", "cdc_freshness"), ("s", "slot_health"), ("logs", "row_count_parity"), ("dims", "row_count_parity")}


@pytest.mark.e2e
def test_checks_run_by_themselves_under_the_daemon(pg, write_config, duckdb_path, tmp_path, monkeypatch):
    """The real `dagster-daemon`: nobody launches a check, yet each table's checks run on their
    cron (every minute here) and report the warehouse equal to the source."""
    pg.execute("CREATE TABLE b (id int PRIMARY KEY, v int)")
    pg.execute("INSERT INTO b SELECT i, i FROM generate_series(1, 50) i")
    write_config({"tables": ["b"], "defaults": {"partitions": 1}, "source": {"checks_schedule": "* * * * *", "sensor_interval_seconds": 2}})
    env = dagster_env(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    monkeypatch.chdir(tmp_path)  # dagster.yaml's storage path is relative to the working directory
    out = run_cli(materialize("public/b", "000...000"), env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    parity = dg.AssetCheckKey(dg.AssetKey(["public", "b"]), "row_count_parity")
    with dagster_daemon(env, tmp_path), dg.DagsterInstance.get() as instance:
        ours = {r.run_id for r in instance.get_runs()}  # the backfill ran the checks too: not by themselves

        def evaluated():
            record = instance.event_log_storage.get_latest_asset_check_execution_by_key([parity]).get(parity)
            done = record is not None and record.event is not None and record.event.asset_check_evaluation
            return record if done and record.run_id not in ours else None

        record = wait_for(evaluated, "the daemon to run row_count_parity by itself", timeout=600, poll=2)
        run = instance.get_run_by_id(record.run_id)
    evaluation = record.event.asset_check_evaluation
    assert evaluation.passed and evaluation.metadata["source_rows"].value == evaluation.metadata["warehouse_rows"].value == 50
    assert any(tag.startswith("dagster/") and "automation" in tag for tag in run.tags), run.tags  # launched by the automation sensor


QUIET = dg.AssetKey(["public", "quiet"])


def _freshness(instance: dg.DagsterInstance, key: dg.AssetKey) -> str | None:
    """The daemon's last verdict on ``key``'s FreshnessPolicy: PASS, WARN, FAIL, UNKNOWN."""
    record = instance.get_freshness_state_records([key]).get(key)
    return record.freshness_state.value if record else None


@pytest.mark.e2e
def test_a_quiet_table_stays_fresh_while_drains_run_and_goes_stale_when_they_stop(pg, write_config, duckdb_path, tmp_path, monkeypatch):
    """The real `dagster-daemon` evaluates the FreshnessPolicy (freshness_seconds 60) and its CDC
    sensor launches the drains while one table changes twice a second and the other never does:
    the quiet table stays fresh for longer than its window, from the drains' caught-up reports
    (at most one per half window); once the sensor is stopped, drains stop and it goes stale."""
    window = 60  # Dagster takes no fail_window under a minute
    pg.execute("CREATE TABLE busy (id int PRIMARY KEY, v int)")
    pg.execute("CREATE TABLE quiet (id int PRIMARY KEY, v int)")
    pg.execute("INSERT INTO busy VALUES (1, 0)")
    pg.execute("INSERT INTO quiet SELECT i, i FROM generate_series(1, 10) i")
    write_config({
        "tables": ["busy", "quiet"], "defaults": {"partitions": 1},
        "source": {"freshness_seconds": window, "sensor_interval_seconds": 2, "run_seconds": 30, "checks_schedule": "0 0 1 1 *"},
    })
    env = {**dagster_env(tmp_path), "FRESHNESS_DAEMON_INTERVAL_SECONDS": "2"}  # Dagster's default: every 30 s
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    monkeypatch.chdir(tmp_path)  # dagster.yaml's storage path is relative to the working directory
    out = run_cli(materialize("public/busy,public/quiet", "000...000"), env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    stop = threading.Event()

    def write_busy():
        while not stop.wait(0.5):
            pg.execute("UPDATE busy SET v = v + 1")

    writer = threading.Thread(target=write_busy, daemon=True)
    try:
        with dagster_daemon(env, tmp_path), dg.DagsterInstance.get() as instance:
            writer.start()
            # Drains run: busy's changes arrive (launch times vary with the machine's load).
            wait_for(lambda: any("lag_seconds" in r.asset_materialization.metadata for r in instance.fetch_materializations(
                dg.AssetKey(["public", "busy"]), limit=5).records), "a drain run to apply busy's changes", timeout=600, poll=1)
            wait_for(lambda: _freshness(instance, QUIET) == "PASS", "the daemon to find quiet fresh", timeout=120, poll=1)
            watched_from = time.monotonic()
            while time.monotonic() - watched_from < window + 15:  # longer than the window: reports keep it fresh
                assert _freshness(instance, QUIET) == "PASS", f"quiet went {_freshness(instance, QUIET)} while drains ran"
                time.sleep(1)
            reports = [r for r in instance.fetch_materializations(QUIET, limit=100).records
                       if r.asset_materialization.metadata.get("mode") == dg.MetadataValue.text("caught_up")]
            assert reports, "no drain reported quiet as kept current"
            times = sorted(r.timestamp for r in reports)
            assert all(b - a >= window / 2 - 1 for a, b in zip(times, times[1:])), times  # never more than one per half window
            stop.set()
            writer.join()
            # Drains stop: the operator stops the sensor (an idle source would otherwise still get
            # a short drain per half window that keeps it fresh: test_sensors.py).
            out = run_cli(["dagster", "sensor", "stop", "-w", str(ROOT / "workspace.yaml"), "postgres_cdc_sensor"], env, tmp_path)
            assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
            # Runs requested before the stop still start (a loaded machine takes minutes to start
            # a run worker) and may report it once more: a generous deadline.
            wait_for(lambda: _freshness(instance, QUIET) == "FAIL", "quiet to go stale once drains stopped", timeout=window + 900, poll=1)
    finally:
        stop.set()
        if writer.is_alive():
            writer.join()


def test_a_check_that_cannot_run_fails_alone(streamed, pg):
    pg.execute("DROP TABLE b")  # parity cannot count it; the slot is still healthy
    keys = list(streamed.resolve_asset_graph().asset_check_keys)
    merged = dg.Definitions.merge(streamed, dg.Definitions(jobs=[dg.define_asset_job("all_checks", selection=dg.AssetSelection.checks(*keys))]))
    result = merged.resolve_job_def("all_checks").execute_in_process(raise_on_error=False)
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not evaluations["row_count_parity"].passed
    assert "could not run" in evaluations["row_count_parity"].description and '"b"' in evaluations["row_count_parity"].description
    assert evaluations["slot_health"].passed and evaluations["cdc_freshness"].passed


def test_a_bad_checks_schedule_is_named():
    with pytest.raises(ConfigError) as err:
        parse_config({"tables": ["t"], "source": {"checks_schedule": "every minute"}})
    assert "checks_schedule" in str(err.value) and "cron" in str(err.value)


def test_a_freshness_window_under_a_minute_is_named():
    with pytest.raises(ConfigError) as err:  # Dagster would refuse the FreshnessPolicy at load, unnamed
        parse_config({"tables": ["t"], "source": {"freshness_seconds": 30}})
    assert "freshness_seconds" in str(err.value)


def test_check_groups_stay_one_definition_each_through_a_components_metadata(pg, write_config, duckdb_path):
    """Every defs.yaml component gets its definitions' metadata updated by Dagster's component tree.
    The checks of 120 tables (groups of 50) must stay three definitions, not one copy of a group
    per check key (what made 1,000 tables take seconds to load), and keep that metadata."""
    pg.execute("DO $$ BEGIN FOR i IN 1..120 LOOP EXECUTE format('CREATE TABLE g%s (id int PRIMARY KEY)', i); END LOOP; END $$")
    write_config({"tables": ["g*"]})
    defs = build_definitions().with_definition_metadata_update(lambda metadata: {**metadata, "origin": "defs.yaml"})
    repo = defs.get_repository_def()
    by_key = repo.asset_checks_defs_by_key
    assert len(by_key) == 120 * 3  # row_count_parity, cdc_freshness, slot_health
    assert len({id(group) for group in by_key.values()}) == 3
    assert all(spec.metadata.get("origin") == "defs.yaml" for group in by_key.values() for spec in group.check_specs)
