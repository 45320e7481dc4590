"""The Snowflake warehouse resource, on dagster-snowflake's SnowflakeResource.

Kept apart from ``resources.py`` because importing dagster_snowflake costs seconds: only a code
location that chose Snowflake pays for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from dagster_snowflake import SnowflakeResource

from pg_replication.dagster.resources import WarehouseResource
from pg_replication.warehouse.connect import SNOWFLAKE_ENV, snowflake_settings
from pg_replication.warehouse.engine import SqlWarehouse


class SnowflakeWarehouseResource(WarehouseResource):
    """Snowflake. Example::

        SnowflakeWarehouseResource(snowflake=SnowflakeResource(account=dg.EnvVar("SNOWFLAKE_ACCOUNT"), ...))
    """

    snowflake: SnowflakeResource
    merge: bool = True  # MERGE per table; False: DELETE + INSERT (fakesnow cannot MERGE in a transaction)

    @contextmanager
    def open(self, *, read_only: bool = False) -> Iterator[SqlWarehouse]:
        from pg_replication.warehouse.snowflake import SnowflakeWarehouse

        with self.snowflake.get_connection() as conn:
            yield SnowflakeWarehouse(conn, read_only=read_only, merge=self.merge)


def snowflake_from_env(merge: bool = True) -> SnowflakeWarehouseResource:
    """Every SNOWFLAKE_* variable that is set, passed as an EnvVar: the UI shows names, not values."""
    settings = snowflake_settings()  # fails early, naming a missing variable
    fields = {arg: dg.EnvVar(SNOWFLAKE_ENV[arg]) for arg in settings}
    return SnowflakeWarehouseResource(snowflake=SnowflakeResource(**fields, paramstyle="qmark"), merge=merge)
