"""The suite's commands are forked from a server that has imported Dagster (cli_server.py): each
must still be what an operator gets from a fresh `python script`: the same arguments, Python path,
environment, working directory, `__main__`, exit status and output, with no module of ours loaded
before the command imports it; a command past its deadline is killed with all it started.
The server's modules are checked for fork safety beside the table executor's, in test_jobs.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pg_replication_tests import cli_server
from pg_replication_tests.operator import wait_for

PROBE = """
import json, os, sys, threading
print(json.dumps({
    "argv": sys.argv,
    "path": sys.path,
    "cwd": os.getcwd(),
    "env": dict(os.environ),
    "main": [__name__, sys.modules["__main__"].__file__],
    "ours_loaded": sorted(m for m in sys.modules if m.startswith("pg_replication")),
    "threads": threading.active_count(),
    "session_leader": os.getsid(0) == os.getpid(),
}))
print("to stderr", file=sys.stderr)
sys.exit(3)
"""


def test_a_forked_command_is_what_a_fresh_interpreter_runs(tmp_path: Path):
    script = tmp_path / "bin" / "probe"
    script.parent.mkdir()
    script.write_text(PROBE)
    work = tmp_path / "work"
    work.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "HOME"}, "PGR_PROBE": "é ü", "PYTHONPATH": str(tmp_path)}
    fresh = subprocess.run([sys.executable, str(script), "a b", "--c"], env=env, cwd=work, capture_output=True, text=True, timeout=300)
    forked = cli_server.run([str(script), "a b", "--c"], env, work, timeout=300)
    assert (forked.returncode, forked.stderr) == (fresh.returncode, fresh.stderr) == (3, "to stderr\n")
    seen, expected = json.loads(forked.stdout), json.loads(fresh.stdout)
    assert seen.pop("session_leader") and not expected.pop("session_leader")
    assert seen == expected
    assert seen["ours_loaded"] == [] and seen["threads"] == 1 and seen["env"]["PGR_PROBE"] == "é ü"


def test_a_dagster_command_answers_as_the_installed_one(tmp_path: Path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    for argv in (["dagster", "--version"], ["dagster", "asset", "list", "-m", "no_such_module"]):
        fresh = subprocess.run([str(cli_server.BIN / argv[0]), *argv[1:]], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        forked = cli_server.run(argv, env, tmp_path, timeout=300)
        assert (forked.returncode, forked.stdout) == (fresh.returncode, fresh.stdout), forked.stderr[-2000:]
        assert forked.stderr.splitlines()[-1:] == fresh.stderr.splitlines()[-1:]


def test_a_command_past_its_deadline_is_killed_with_what_it_started(tmp_path: Path):
    pids = tmp_path / "pids"
    script = tmp_path / "sleeper"
    script.write_text(
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(600)\n"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        cli_server.run([str(script)], dict(os.environ), tmp_path, timeout=20)
    for pid in map(int, pids.read_text().split()):
        wait_for(lambda: _gone(pid), f"process {pid} to end", timeout=120)


def _gone(pid: int) -> bool:
    """No such process, or a zombie left to its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True

