"""A real Postgres for every test: one server per session (scripts/local-postgres, wal_level=logical;
one per xdist worker, see servers.py), one fresh database per test, dropped afterwards with any
replication slots it created."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg import sql

from pg_replication.config import ReplicationConfig, parse_config
from pg_replication_tests.servers import worker_server
from pg_replication_tests.targets import CLICKHOUSE_MODULES, KINDS, Target, make_target


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, the tests that run the CLI (marked e2e, the slowest) are handed out first: a
    long test started last would leave the other workers idle at the end."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("e2e") is None)


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    with worker_server() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            level = conn.execute("SHOW wal_level").fetchone()[0]  # type: ignore[index]
            assert level == "logical", f"the test server needs wal_level=logical, has {level}"
        yield url


def _with_dbname(url: str, dbname: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(url)
    params["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**params)


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new database on the test server, dropped afterwards with the slots made in it."""
    name = f"pgr_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_dbname(server_url, name)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            for (slot,) in admin.execute("SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)):
                admin.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def pg_url(server_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh database; POSTGRES_URL points at it for the test's duration."""
    with fresh_database(server_url) as url:
        monkeypatch.setenv("POSTGRES_URL", url)
        yield url


@pytest.fixture
def pg(pg_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def duckdb_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "warehouse.duckdb"
    monkeypatch.setenv("DUCKDB_PATH", str(path))
    return path


@pytest.fixture(params=KINDS)
def target(request: pytest.FixtureRequest, tmp_path: Path, server_url: str) -> Iterator[Target]:
    """Every warehouse in turn: the test runs once per kind (see targets.py)."""
    if request.param == "clickhouse" and request.module.__name__.rsplit(".", 1)[-1] not in CLICKHOUSE_MODULES:
        pytest.skip("ClickHouse is not covered by this module yet (README, ClickHouse)")
    with make_target(request.param, tmp_path, server_url) as target:
        yield target


@pytest.fixture
def write_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write a replication.yaml for the test and point PG_REPLICATION_CONFIG at it."""

    def write(raw: dict) -> ReplicationConfig:
        path = tmp_path / "replication.yaml"
        path.write_text(yaml.safe_dump(raw, allow_unicode=True))
        monkeypatch.setenv("PG_REPLICATION_CONFIG", str(path))
        return parse_config(raw)

    return write
