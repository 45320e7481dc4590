"""Dagster resources: the Postgres source. Warehouse resources come from dagster-duckdb."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from pg_replication.source.connection import connect, describe_target


class PostgresSource(dg.ConfigurableResource):
    """The Postgres database tables are replicated from.

    Example::

        PostgresSource(conninfo=dg.EnvVar("POSTGRES_URL"))  # the UI shows the variable, not the URL
    """

    conninfo: str = Field(
        default="",
        description="libpq connection string or URL; empty means the standard PG* variables.",
    )

    def connect(self):
        return connect(self.conninfo)

    def describe(self) -> str:
        return describe_target(self.conninfo)
