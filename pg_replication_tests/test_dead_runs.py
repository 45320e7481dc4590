"""A killed drain never blocks CDC: the real `dagster-daemon` (sensor, run queue, run monitoring)
with the shipped dagster.yaml, drain runs killed with SIGKILL inside their step (after the read,
in the middle of the warehouse transaction, after the commit) and in their run worker at a random
moment; each time, a later change in Postgres reaches DuckDB by itself, with nobody freeing a pool
slot or marking a run by hand.

Also kills the code server together with the run worker (a lost node, an OOM kill of the process
group): the daemon starts a new code server within about a minute, and the CDC sensor fails the
drain run whose worker is gone. Leaves out: a killed backfill run, and the death of the daemon.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from pg_replication_tests.operator import dagster_daemon, dagster_env, materialize, run_cli, wait_for

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
JOB = "postgres_cdc_drain"
DEADLINE = 300  # seconds from a kill to the next change applied: generous for a loaded 2-core box
ROWS = 200

pytestmark = pytest.mark.e2e


def _wait(condition, what: str, timeout: float = DEADLINE):
    try:
        return wait_for(condition, what, timeout, poll=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_what_the_daemon_saw()}") from None


def _what_the_daemon_saw() -> str:
    """The drain runs, the source pool and the daemon's last lines: a timeout explains itself."""
    lines = []
    with dg.DagsterInstance.get() as instance:
        for run in _drain_runs(instance)[:8]:
            record = instance.get_run_record_by_id(run.run_id)
            lines.append(f"run {run.run_id} {run.status.value} created {record.create_timestamp:%X} start {record.start_time} end {record.end_time} key {run.tags.get('dagster/run_key')}")
        lines.append(repr(instance.event_log_storage.get_concurrency_info("postgres_source")))
    log = Path.cwd() / "daemon.log"
    if log.exists():
        tail = [line for line in log.read_text(errors="replace").splitlines() if " - dagster" in line][-60:]
        lines += ["daemon.log (last lines):", *tail]
    return "\n".join(lines)


def _warehouse_has(path: Path, n: int) -> bool:
    """Every row shows round ``n`` in DuckDB. A drain holding the file's write lock means 'not yet'."""
    try:
        with duckdb.connect(str(path), read_only=True) as conn:
            return conn.execute("SELECT count(*) FROM shop.orders WHERE n = ?", [n]).fetchone()[0] == ROWS
    except duckdb.Error:
        return False


def _drain_runs(instance: dg.DagsterInstance, statuses=None) -> list[dg.DagsterRun]:
    return list(instance.get_runs(dg.RunsFilter(job_name=JOB, statuses=statuses or [])))


def _run_worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        message = record.dagster_event.message or ""
        if message.startswith("Started process for run (pid: "):
            return int(message.removeprefix("Started process for run (pid: ").rstrip(")."))
    return None


def _changing(pg, n: int, condition):
    """``condition``, with round ``n`` written again every 10 s until it holds: a long-lived run
    already up (or its successor, waiting for the pool) may apply the first write, and the
    sensor requests a new run only for changes still to apply."""
    written = [float("-inf")]

    def check():
        if time.monotonic() - written[0] > 10:
            pg.execute("UPDATE shop.orders SET n = %s", (n,))
            written[0] = time.monotonic()
        return condition()

    return check


@pytest.fixture
def daemon(pg, write_config, duckdb_path, tmp_path, monkeypatch):
    """Backfilled table, then `dagster-daemon run` on the repository's workspace.yaml."""
    pg.execute("CREATE SCHEMA shop")
    pg.execute("CREATE TABLE shop.orders (id int PRIMARY KEY, n int)")
    pg.execute("INSERT INTO shop.orders SELECT i, 0 FROM generate_series(1, %s) i", (ROWS,))
    write_config({"tables": ["shop.orders"], "defaults": {"partitions": 2}, "source": {"sensor_interval_seconds": 2, "run_seconds": 10}})
    failpoints = tmp_path / "failpoints"
    failpoints.mkdir()
    env = {**dagster_env(tmp_path), "PGR_FAILPOINT_DIR": str(failpoints)}
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    monkeypatch.chdir(tmp_path)  # dagster.yaml's storage path is relative to the working directory
    out = run_cli(materialize("shop/orders", "000...001"), env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    with dagster_daemon(env, tmp_path):
        yield failpoints


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _kill_a_run_worker(instance: dg.DagsterInstance, pg, seen: set[str], n: int, with_code_server: bool) -> None:
    """SIGKILL the run worker of a drain run at a random moment while it is STARTED (and the code
    server that started it, as a lost node or an OOM kill of the group would); a run that
    finished first is left alone and the next one is tried."""
    while True:
        pg.execute("UPDATE shop.orders SET n = %s", (n,))
        fresh = lambda: [r for r in _drain_runs(instance, [dg.DagsterRunStatus.STARTED]) if r.run_id not in seen]  # noqa: E731
        run = _wait(_changing(pg, n, fresh), "a drain run to start")[0]
        seen.add(run.run_id)
        started = lambda: instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED  # noqa: E731
        pid = _wait(lambda: _run_worker_pid(instance, run.run_id) or not started(), "the run worker's pid")
        time.sleep(random.uniform(0, 2))
        if pid is not True and started():
            try:
                pids = [pid, _parent(pid)] if with_code_server else [pid]
                for victim in pids:
                    os.kill(victim, signal.SIGKILL)
                return
            except FileNotFoundError:
                pass
            except ProcessLookupError:
                pass


def test_killed_drains_never_block_cdc(daemon, pg, duckdb_path):
    failpoints = daemon
    seen: set[str] = set()
    recovery = {}
    with dg.DagsterInstance.get() as instance:
        # CDC works before any kill.
        pg.execute("UPDATE shop.orders SET n = 1")
        _wait(lambda: _warehouse_has(duckdb_path, 1), "the first change applied by a sensor's drain run")
        seen.update(r.run_id for r in _drain_runs(instance))
        kills = [*random.sample(["after_read", "mid_apply", "after_commit"], 3), "run worker", "code server and run worker"]
        for n, where in enumerate(kills, start=2):
            if "run worker" in where:
                _kill_a_run_worker(instance, pg, seen, n, with_code_server="code server" in where)
            else:
                (failpoints / where).touch()
                pg.execute("UPDATE shop.orders SET n = %s", (n,))
                _wait(lambda: not (failpoints / where).exists(), f"a drain run killed at {where}")
            killed, killed_at = time.monotonic(), datetime.now(timezone.utc)
            # A change made after the kill, applied by a drain run created after it: that run's
            # step needed the pool slot (a step orphaned by its killed run worker may apply a
            # change too, so the data alone proves nothing).
            later = dg.RunsFilter(job_name=JOB, statuses=[dg.DagsterRunStatus.SUCCESS], created_after=killed_at)
            _wait(_changing(pg, -n, lambda: instance.get_runs(later, limit=1)), f"a drain run created after a kill at {where} to succeed")
            _wait(lambda: _warehouse_has(duckdb_path, -n), f"a change made after a kill at {where} in the warehouse")
            recovery[where] = round(time.monotonic() - killed, 1)
            seen.update(r.run_id for r in _drain_runs(instance))
        # Every killed run was marked failed: none is left STARTED.
        _wait(lambda: not _drain_runs(instance, [dg.DagsterRunStatus.STARTED]), "no drain run left STARTED", 120)
    print(f"recovery seconds after each kill: {recovery}")
