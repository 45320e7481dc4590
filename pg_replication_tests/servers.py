"""The Postgres server a test process uses. Replication slots and roles are server-wide, so each
pytest-xdist worker gets a server of its own: worker N uses the base server's port + N. The base
is PGR_TEST_SERVER_URL's server or, unset, scripts/local-postgres's (PGR_PORT, 54329 by default).
Worker 0, and a run without xdist, use the base server itself; another worker uses a server
already listening on its port, or starts one with scripts/local-postgres in a data directory of
its own (``.pg/worker-<port>``) and stops it when its session ends (also one left running by an
interrupted run)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
LOCAL_POSTGRES = ROOT / "scripts" / "local-postgres"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def worker_index() -> int:
    """0 without xdist; N for xdist's worker ``gwN``."""
    return int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))


def _local_postgres(port: int, *args: str, instance: str | None = None) -> str:
    env = {**os.environ, "PGR_PORT": str(port)}
    if instance:
        env["PGR_INSTANCE"] = instance
    out = subprocess.run([str(LOCAL_POSTGRES), *args], env=env, check=True, capture_output=True, text=True, timeout=900)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def _data_directory(url: str) -> str | None:
    """The data directory of the server answering at ``url``; None when none answers."""
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            return conn.execute("SHOW data_directory").fetchone()[0]  # type: ignore[index]
    except psycopg.OperationalError:
        return None


def _with_port(url: str, port: int) -> str:
    params = psycopg.conninfo.conninfo_to_dict(url)
    params["port"] = str(port)
    return psycopg.conninfo.make_conninfo(**params)


@contextmanager
def worker_server() -> Iterator[str]:
    """The URL of this worker's server (its ``postgres`` database), for the whole session."""
    base = os.environ.get("PGR_TEST_SERVER_URL") or _local_postgres(int(os.environ.get("PGR_PORT", "54329")))
    n = worker_index()
    if n == 0:
        yield base
        return
    params = psycopg.conninfo.conninfo_to_dict(base)
    port = int(params.get("port") or 5432) + n
    url = _with_port(base, port)
    instance = f"worker-{port}"
    running = _data_directory(url)
    if running and not running.endswith(f"/{instance}/data"):  # somebody's own server: used, left running
        yield url
        return
    if not running and params.get("host", "127.0.0.1") not in LOCAL_HOSTS:
        raise RuntimeError(
            f"xdist worker {n} needs a Postgres server (wal_level=logical) on port {port} of {params.get('host')}: "
            "start one there, or run the suite without -n"
        )
    url = _local_postgres(port, instance=instance)  # started, or reused after an interrupted run
    try:
        yield url
    finally:
        _local_postgres(port, "stop", instance=instance)
