"""Rows chosen by a predicate, read as COPY text -> Arrow (pyarrow's CSV reader), on a
connection the caller holds in one snapshot: the query strategies read their watermark and
their rows in the same REPEATABLE READ transaction."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence

import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
from psycopg import sql

from pg_replication.source.catalog import Table
from pg_replication.source.snapshot import Mapper, column_mappings
from pg_replication.types import map_column

CSV_BLOCK_BYTES = 16 << 20  # ~125k rows of a 130-byte row: about DuckDB's row-group size


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


def staging_schema(table: Table, mapper: Mapper = map_column) -> pa.Schema:
    # Staged columns carry the source names, so warehouse errors name the real column.
    return pa.schema([pa.field(name, m.arrow) for name, m in column_mappings(table, mapper)])


class _CopyStream(io.RawIOBase):
    """A file object over a COPY OUT stream, so pyarrow's CSV reader can pull from it."""

    def __init__(self, copy: psycopg.Copy) -> None:
        self._copy = copy
        self._buf = bytearray()
        self._eof = False
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def at_eof(self) -> bool:
        """True when the stream has no data at all (pyarrow refuses an empty CSV)."""
        if not self._buf and not self._eof:
            chunk = self._copy.read()
            if chunk:
                self._buf += chunk
            else:
                self._eof = True
        return self._eof and not self._buf

    def read(self, size: int = -1) -> bytes:
        buf = self._buf
        while (size < 0 or len(buf) < size) and not self._eof:
            chunk = self._copy.read()
            if not chunk:
                self._eof = True
                break
            buf += chunk
        if size < 0 or size >= len(buf):
            out = bytes(buf)
            buf.clear()
        else:
            out = bytes(buf[:size])
            del buf[:size]
        self.bytes_read += len(out)
        return out

    def readinto(self, b) -> int:  # pragma: no cover - pyarrow calls read()
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _csv_options(schema: pa.Schema) -> tuple[pacsv.ReadOptions, pacsv.ParseOptions, pacsv.ConvertOptions]:
    return (
        pacsv.ReadOptions(column_names=schema.names, block_size=CSV_BLOCK_BYTES, use_threads=True),
        pacsv.ParseOptions(newlines_in_values=True, double_quote=True),
        pacsv.ConvertOptions(
            column_types={f.name: f.type for f in schema},
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            true_values=["t"],
            false_values=["f"],
        ),
    )
