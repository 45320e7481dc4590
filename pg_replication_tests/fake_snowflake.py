"""fakesnow (an emulation of Snowflake on DuckDB) for the tests, with one gap of fakesnow 0.12.1
closed: ``COPY INTO <temporary table> … MATCH_BY_COLUMN_NAME`` looks the table's columns up in
the database's own catalog, where DuckDB does not keep temporary tables, and fails. Snowflake
loads a temporary table by column name like any other (the dialect's slice and change stages are
temporary tables, see warehouse/snowflake_stage.py). Only that lookup is widened; the load itself
is fakesnow's (DuckDB's ``read_parquet`` of the staged files, ``INSERT … BY NAME``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import duckdb
import fakesnow
import fakesnow.copy_into


def _describe_table_or_temporary(table, duck_conn, current_database, current_schema):
    try:
        return _describe_table(table, duck_conn, current_database, current_schema)
    except duckdb.CatalogException:
        name = '"' + table.name.replace('"', '""') + '"'
        return [(row[0], row[1]) for row in duck_conn.execute(f"DESCRIBE temp.main.{name}").fetchall()]


_describe_table = fakesnow.copy_into._describe_table


@contextmanager
def fake_snowflake() -> Iterator[None]:
    """``fakesnow.patch()`` for the duration (see the module docstring for the one addition)."""
    fakesnow.copy_into._describe_table = _describe_table_or_temporary
    try:
        with fakesnow.patch():
            yield
    finally:
        fakesnow.copy_into._describe_table = _describe_table
