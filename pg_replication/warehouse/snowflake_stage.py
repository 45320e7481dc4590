"""Bulk loads into Snowflake: Arrow batches written as typed Parquet files, PUT to a temporary
stage, and loaded by one ``COPY INTO … MATCH_BY_COLUMN_NAME``.

Columns keep their Arrow types on the way (integers, decimals, dates, timestamps, binary), so
Snowflake parses nothing from text that arrived typed. Not ``write_pandas``: it copies every batch
into pandas first, and fakesnow replaces it by a DataFrame insert, so no Parquet was ever read in
the tests; PUT + COPY run the same statements on fakesnow (DuckDB's ``read_parquet``) as on
Snowflake. What fakesnow cannot show about Snowflake's Parquet reader: README, Warehouses.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from pg_replication.errors import WarehouseError

STAGE = "pgr_stage"  # a temporary internal stage: it goes with the session
# Snowflake loads files of 100-250 MB (compressed) best; a file is closed and PUT once this many
# bytes of Arrow data went into it, so the local disk holds one file at a time.
FILE_BYTES = 256 << 20
# USE_LOGICAL_TYPE: read DATE, TIME, TIMESTAMP and DECIMAL by their Parquet logical types;
# BINARY_AS_TEXT = FALSE: a byte array without a logical type is binary, not UTF-8 text.
FILE_FORMAT = "TYPE = PARQUET USE_LOGICAL_TYPE = TRUE BINARY_AS_TEXT = FALSE"


def stage_type(arrow: pa.DataType) -> str:
    """The Snowflake column type that holds an Arrow column's values exactly."""
    if pa.types.is_string(arrow) or pa.types.is_large_string(arrow):
        return "VARCHAR"
    if pa.types.is_decimal(arrow):
        return f"NUMBER({arrow.precision},{arrow.scale})"
    if pa.types.is_timestamp(arrow) and arrow.unit == "us":
        return "TIMESTAMP_NTZ(6)" if arrow.tz is None else "TIMESTAMP_TZ(6)"
    simple = {
        pa.int16(): "NUMBER(5,0)",
        pa.int32(): "NUMBER(10,0)",
        pa.int64(): "NUMBER(19,0)",
        pa.float64(): "FLOAT",
        pa.bool_(): "BOOLEAN",
        pa.binary(): "BINARY",
        pa.date32(): "DATE",
        pa.time64("us"): "TIME(6)",
    }
    if arrow in simple:
        return simple[arrow]
    raise ValueError(f"no Snowflake staging type for Arrow {arrow}: stage such a column as text")


def load_parquet(
    execute: Callable[[str], Sequence[tuple]], relation: str, batches: Iterable[pa.RecordBatch], *, file_bytes: int = FILE_BYTES
) -> int:
    """Append ``batches`` to ``relation`` (a table in the session's schema, where the stage is,
    its column names as Snowflake stores them: matched case-sensitively). ``execute`` runs one
    statement and returns its rows. Returns the rows loaded; a COPY that loads fewer rows than
    were written raises (nothing is skipped silently)."""
    prefix = f"{STAGE}/{uuid.uuid4().hex}/"  # this load's files, apart from any other's
    written = files = 0
    with tempfile.TemporaryDirectory(prefix="pgr-parquet-") as directory:
        writer, path, size = None, "", 0
        try:
            for batch in batches:
                if not batch.num_rows:
                    continue
                if writer is None:
                    path = os.path.join(directory, f"{files}.parquet")
                    writer, size = pq.ParquetWriter(path, batch.schema), 0
                writer.write_batch(batch)
                written += batch.num_rows
                size += batch.nbytes
                if size >= file_bytes:
                    writer.close()
                    writer = None
                    files += _put(execute, path, prefix)
        finally:
            if writer is not None:
                writer.close()
        if writer is not None:
            files += _put(execute, path, prefix)
    if not files:
        return 0
    result = execute(
        f"COPY INTO {relation} FROM @{prefix} FILE_FORMAT = ({FILE_FORMAT}) MATCH_BY_COLUMN_NAME = CASE_SENSITIVE PURGE = TRUE"
    )
    loaded = sum(int(row[3]) for row in result)  # (file, status, rows_parsed, rows_loaded, …)
    if loaded != written:
        raise WarehouseError(f"Snowflake loaded {loaded} of {written} staged rows into {relation}")
    return loaded


def _put(execute: Callable[[str], Sequence[tuple]], path: str, prefix: str) -> int:
    """Upload one file under ``prefix`` in the stage (already compressed: Parquet's own snappy
    pages), then remove it locally."""
    if "'" in path:
        raise ValueError(f"temporary directory with a quote in its path: {path!r}")
    try:
        execute(f"PUT 'file://{path}' @{prefix} AUTO_COMPRESS = FALSE")
    finally:
        os.remove(path)
    return 1
