"""The ClickHouse warehouse as a Dagster resource: chDB in-process (``path``) or a server
(``url``, or host/port/user/password/database), secrets through ``dg.EnvVar``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from pg_replication.dagster.resources import WarehouseResource
from pg_replication.warehouse.connect import CLICKHOUSE_ENV
from pg_replication.warehouse.engine import SqlWarehouse


class ClickHouseWarehouseResource(WarehouseResource):
    """ClickHouse. Example::

        ClickHouseWarehouseResource(path="warehouse.chdb")               # embedded (chDB)
        ClickHouseWarehouseResource(url=dg.EnvVar("CLICKHOUSE_URL"))    # a server
    """

    path: str | None = Field(None, description="chDB: the directory of the embedded ClickHouse's data.")
    url: str | None = Field(None, description="A server: clickhouse-connect DSN (http://user:password@host:8123/db).")
    host: str | None = Field(None, description="A server: host name (when no url is given).")
    port: int | None = Field(None, description="A server: HTTP(S) port.")
    user: str | None = Field(None, description="A server: user name.")
    password: str | None = Field(None, description="A server: password (give it as an EnvVar).")
    database: str | None = Field(None, description="A server: default database.")

    @contextmanager
    def open(self, *, read_only: bool = False) -> Iterator[SqlWarehouse]:
        from pg_replication.warehouse.clickhouse import ClickHouseWarehouse
        from pg_replication.warehouse.clickhouse_client import open_client

        client = open_client(
            path=self.path, url=self.url, host=self.host, port=self.port, username=self.user,
            password=self.password, database=self.database,
        )
        try:
            yield ClickHouseWarehouse(client, read_only=read_only)
        finally:
            client.close()


def clickhouse_from_env(path: str) -> ClickHouseWarehouseResource:
    """A server when CLICKHOUSE_URL or CLICKHOUSE_HOST is set (each set variable as an EnvVar,
    so the UI shows names, never values); else chDB at ``path``."""
    if not (os.environ.get(CLICKHOUSE_ENV["url"]) or os.environ.get(CLICKHOUSE_ENV["host"])):
        return ClickHouseWarehouseResource(path=path)
    fields = {
        name: (dg.EnvVar.int(var) if name == "port" else dg.EnvVar(var))
        for name, var in CLICKHOUSE_ENV.items()
        if os.environ.get(var)
    }
    return ClickHouseWarehouseResource(**fields)
