"""Rows chosen by a predicate, read the way the backfill reads slices (COPY text -> Arrow), on a
connection the caller holds in one snapshot: the query strategies read their watermark and
their rows in the same REPEATABLE READ transaction."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
from psycopg import sql

from pg_replication.source.catalog import Table
from pg_replication.source.snapshot import Mapper, _CopyStream, _csv_options, column_mappings, staging_schema


def read_where(
    conn: psycopg.Connection, table: Table, where: sql.Composable, params: Sequence, mapper: Mapper
) -> Iterator[pa.RecordBatch]:
    """Stream the rows of ``table`` (its root: partitions included) that match ``where``."""
    columns = sql.SQL(", ").join(m.select_sql(name) for name, m in column_mappings(table, mapper))
    query = sql.SQL("COPY (SELECT {} FROM {} WHERE {}) TO STDOUT (FORMAT csv)").format(columns, table.ident, where)
    with conn.cursor().copy(query, params) as copy:
        stream = _CopyStream(copy)
        if stream.at_eof():
            return
        finished = False
        try:
            yield from pacsv.open_csv(stream, *_csv_options(staging_schema(table, mapper)))
            finished = True
        finally:
            if not finished:  # stopped early: end the COPY instead of reading it to the end
                conn.cancel_safe()
