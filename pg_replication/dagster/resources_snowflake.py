"""The Snowflake warehouse resource, on snowflake-connector-python directly.

Not on dagster-snowflake's SnowflakeResource: installing that package registers it with Dagster's
component loader (entry point ``dagster_dg_cli.registry_modules``), and every code location that
loads a defs folder then imports it, with snowflake-core and Snowpark, whether it uses Snowflake
or not (6 s of a 1,000-table ``dagster definitions validate``; bench/definitions_load.py). Kept
apart from ``resources.py`` so that only a code location that chose Snowflake imports the
connector.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from pg_replication.dagster.resources import WarehouseResource
from pg_replication.warehouse.connect import SNOWFLAKE_ENV, snowflake_settings
from pg_replication.warehouse.engine import SqlWarehouse


class SnowflakeWarehouseResource(WarehouseResource):
    """Snowflake. Example::

        SnowflakeWarehouseResource(account=dg.EnvVar("SNOWFLAKE_ACCOUNT"), user=dg.EnvVar("SNOWFLAKE_USER"),
                                   password=dg.EnvVar("SNOWFLAKE_PASSWORD"), database="ANALYTICS")
    """

    account: str = Field(description="Snowflake account identifier (SNOWFLAKE_ACCOUNT).")
    user: str = Field(description="User to connect as (SNOWFLAKE_USER).")
    database: str = Field(description="Database the replicated tables go to (SNOWFLAKE_DATABASE).")
    password: str | None = Field(None, description="Password (SNOWFLAKE_PASSWORD); pass it as an EnvVar.")
    warehouse: str | None = Field(None, description="Virtual warehouse that runs the loads (SNOWFLAKE_WAREHOUSE).")
    role: str | None = Field(None, description="Role to use (SNOWFLAKE_ROLE).")
    schema_: str | None = Field(None, alias="schema", description="Default schema of the session (SNOWFLAKE_SCHEMA).")
    authenticator: str | None = Field(None, description="Authenticator, e.g. externalbrowser (SNOWFLAKE_AUTHENTICATOR).")
    merge: bool = True  # MERGE per table; False: DELETE + INSERT (fakesnow cannot MERGE in a transaction)

    def _connect_args(self) -> dict[str, str]:
        names = {"schema_": "schema"}
        fields = ("account", "user", "database", "password", "warehouse", "role", "schema_", "authenticator")
        return {names.get(f, f): getattr(self, f) for f in fields if getattr(self, f) is not None}

    @contextmanager
    def open(self, *, read_only: bool = False) -> Iterator[SqlWarehouse]:
        import snowflake.connector  # seconds to import: only when a drain or check opens Snowflake

        from pg_replication.warehouse.snowflake import SnowflakeWarehouse

        conn = snowflake.connector.connect(**self._connect_args(), paramstyle="qmark", application="pg_replication")
        try:
            yield SnowflakeWarehouse(conn, read_only=read_only, merge=self.merge)
            conn.commit()  # what is still open (the warehouse commits its own transactions)
        finally:
            conn.close()


def snowflake_from_env(merge: bool = True) -> SnowflakeWarehouseResource:
    """Every SNOWFLAKE_* variable that is set, passed as an EnvVar: the UI shows names, not values."""
    settings = snowflake_settings()  # fails early, naming a missing variable
    fields = {arg: dg.EnvVar(SNOWFLAKE_ENV[arg]) for arg in settings}
    return SnowflakeWarehouseResource(**fields, merge=merge)
