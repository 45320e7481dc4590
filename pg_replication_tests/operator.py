"""What an operator runs, in fresh processes: the `dagster` and `pg-replication` CLIs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pg_replication_tests import cli_server
from pg_replication_tests.cli_server import BIN

ROOT = Path(__file__).resolve().parent.parent


def dagster_env(tmp_path: Path) -> dict[str, str]:
    """The environment with a DAGSTER_HOME holding the shipped dagster.yaml."""
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    return {**os.environ, "DAGSTER_HOME": str(home)}


def run_cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """One command of the venv (``dagster``, ``dg``, ``pg-replication``) in a fresh process, forked
    from a server that has imported Dagster (cli_server.py); generous deadline for a loaded box."""
    return cli_server.run(args, env, cwd, timeout=600)


def materialize(select: str, partitions: str) -> list[str]:
    return ["dagster", "asset", "materialize", "-m", "pg_replication.dagster.definitions", "--select", select, "--partition-range", partitions]


def drain(job: str = "postgres_cdc_drain") -> list[str]:
    return ["dagster", "job", "execute", "-m", "pg_replication.dagster.definitions", "-j", job]


def wait_for(condition, what: str, timeout: float, poll: float = 0.5):
    """``condition()``'s first truthy value, polled until ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


@contextmanager
def dagster_daemon(env: dict, cwd: Path) -> Iterator[subprocess.Popen]:
    """`dagster-daemon run` on the repository's workspace.yaml, its output in cwd/daemon.log;
    stopped at the end with the code server and the runs it launched (its process group)."""
    with open(cwd / "daemon.log", "w") as log:
        process = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-w", str(ROOT / "workspace.yaml")],
            env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            yield process
        finally:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            try:  # the code server and runs it started may outlive the daemon
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
