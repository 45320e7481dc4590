"""The operator's commands (`dagster`, `dg`, `pg-replication`) in fresh processes forked from a
server that has already imported Dagster and the drivers, not pg_replication.

A `dagster` command spends about 5 of its 6-7 CPU-seconds importing Dagster, its storage and the
drivers before it reads its command line, and the suite runs about a hundred on two cores.
Forked after those imports, each command is still a new process of its own (its own session,
environment, working directory, Python path and arguments) that parses its command line, opens
the instance and imports and loads the code location afresh, as when an operator types it. The
preloaded modules open no connection and start no thread when imported (checked in
test_jobs.py beside the table executor's), so forking after them is safe. What a fork cannot
take afresh is the interpreter's own start-up: its flags and the `PYTHON*` variables other than
PYTHONPATH are the server's (no test sets one).

One server per test process, started at its first command and gone with the process: it takes a
request per connection on a Unix socket and forks a waiter, which forks the command, sends its
pid, waits for it and sends its exit status.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path

BIN = Path(sys.executable).parent

PRELOADED = (
    "dagster",
    "dagster._cli",
    "dagster._core.storage.runs.sqlite",
    "dagster._core.storage.event_log.sqlite",
    "dagster._core.storage.schedules.sqlite",
    "dagster._core.execution.api",
    "alembic.command",
    "dagster_duckdb",
    "duckdb",
    "psycopg",
    "pyarrow",
)


def run(argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """What ``subprocess.run(argv, capture_output=True, text=True, timeout=…)`` returns; ``argv[0]``
    a console script of the venv or the path of a Python script."""
    script = str(BIN / argv[0]) if os.sep not in argv[0] else argv[0]
    with tempfile.TemporaryDirectory(prefix="pgr-cli-") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        request = {
            "argv": [script, *argv[1:]], "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err),
            "sys_path": [os.path.dirname(script), *_fresh_sys_path(env.get("PYTHONPATH"))],
        }
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(_server())
            conn.sendall(json.dumps(request).encode() + b"\n")
            conn.settimeout(timeout)
            replies = conn.makefile("r")
            pid = json.loads(replies.readline())["pid"]
            try:
                status = json.loads(replies.readline())["status"]
            except TimeoutError:
                os.killpg(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(argv, timeout, _read(out), _read(err)) from None
        return subprocess.CompletedProcess(argv, status, _read(out), _read(err))


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@cache
def _fresh_sys_path(pythonpath: str | None) -> list[str]:
    """sys.path of a script started with this PYTHONPATH, after the script's own folder."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    probe = subprocess.run(
        [sys.executable, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"],
        env=env, cwd="/", capture_output=True, text=True, check=True,
    )
    return json.loads(probe.stdout)


# This process's server and its socket, by pid (a test process forked from another starts its
# own); the server exits when its stdin closes, so the Popen is kept as long as the process lives.
_servers: dict[int, tuple[subprocess.Popen, str]] = {}


def _server() -> str:
    """The socket of this process's server, started at its first command."""
    if os.getpid() not in _servers:
        path = tempfile.mkdtemp(prefix="pgr-cli-server-") + "/socket"
        server = subprocess.Popen(
            [sys.executable, "-c", SERVE, __file__, path, *PRELOADED],
            stdin=subprocess.PIPE, cwd="/", start_new_session=True,
        )
        deadline = time.monotonic() + 300
        while not os.path.exists(path):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the CLI fork server did not start (exit status {server.poll()})")
            time.sleep(0.05)
        _servers[os.getpid()] = (server, path)
    return _servers[os.getpid()][1]


# By path, not as a module of the test package, which the commands must not find loaded.
SERVE = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"


def _serve(path: str, modules: list[str]) -> None:
    import importlib
    import select

    for module in modules:
        importlib.import_module(module)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path + ".tmp")
    os.rename(path + ".tmp", path)
    listener.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # waiters are reaped by the kernel
    while True:
        readable, _, _ = select.select([listener, sys.stdin], [], [])
        if sys.stdin in readable:  # the test process is gone
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
            return
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _wait_for_command(conn)
        conn.close()


def _wait_for_command(conn: socket.socket) -> None:
    """In the waiter: fork the command, send its pid, then its exit status."""
    request = json.loads(conn.makefile("r").readline())
    pid = os.fork()
    if pid == 0:
        conn.close()
        _become(request)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    conn.sendall(json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
    os._exit(0)


def _become(request: dict) -> None:
    """In the command's process: its session, files, environment and arguments; then the command."""
    import atexit
    import runpy
    import traceback

    os.setsid()  # its own process group, killed whole on a timeout
    for fd, file, flags in (
        (0, os.devnull, os.O_RDONLY),
        (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
        (2, request["stderr"], os.O_WRONLY | os.O_CREAT),
    ):
        opened = os.open(file, flags, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[:] = request["sys_path"]
    sys.argv = request["argv"]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    status: object = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")  # as `python script` runs it
    except SystemExit as done:
        status = done.code
        if isinstance(status, str):
            print(status, file=sys.stderr)  # as the interpreter does with sys.exit("message")
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        atexit._run_exitfuncs()  # a forked child leaves by os._exit, which skips them
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status if isinstance(status, int) else (0 if status is None else 1))


if __name__ == "__main__":
    _serve(sys.argv[2], sys.argv[3:])
