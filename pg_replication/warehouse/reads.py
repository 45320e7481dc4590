"""Reading a replicated table back, for downstream consumers: a stream of Arrow batches, never
the whole table in memory.

The columns are the source's (the warehouse's bookkeeping columns stay out). A dialect with a
native Arrow stream (DuckDB) overrides ``read_batches``; the others fetch rows through a cursor
(``stream_rows``), a bounded number at a time, and build each batch with one schema fixed before
the first row: columns whose warehouse type has an exact Arrow type (``arrow_types``) keep it,
every other column is read as its text form (exact, like the engine's fallback for unknown types).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pyarrow as pa

BATCH_ROWS = 8_192  # DuckDB reads a few batches ahead: at 1 KiB a row, 65,536-row batches held 400 MiB


class TableReader:
    """Mixed into ``engine.SqlWarehouse``: uses its dialect hooks (``ident``, ``fold``,
    ``fetchall``, ``stored_columns``)."""

    # information_schema.columns.data_type -> the Arrow type its values load into exactly
    arrow_types: dict[str, pa.DataType] = {}

    def read_batches(self, schema: str, name: str, batch_rows: int = BATCH_ROWS) -> pa.RecordBatchReader:
        """Source table ``schema.name`` as it is replicated, in batches of at most ``batch_rows``
        rows; the reader fetches as it is consumed (the connection must stay open until then)."""
        columns = list(self.stored_columns(f"{schema}.{name}"))  # type: ignore[attr-defined]
        relation = self.ident(self.schema_prefix + schema, name)  # type: ignore[attr-defined]
        declared = self._declared_types(self.schema_prefix + schema, name)  # type: ignore[attr-defined]
        fields, select = [], []
        for column in columns:
            native = self.arrow_types.get(declared.get(self.fold(column), ""))  # type: ignore[attr-defined]
            fields.append(pa.field(column, native or pa.string()))
            quoted = self.ident(column)  # type: ignore[attr-defined]
            select.append(quoted if native else f"CAST({quoted} AS {self.text_type})")  # type: ignore[attr-defined]
        arrow_schema = pa.schema(fields)
        query = f"SELECT {', '.join(select)} FROM {relation}"

        def batches() -> Iterator[pa.RecordBatch]:
            for rows in self.stream_rows(query, batch_rows):
                arrays = [pa.array([row[i] for row in rows], type=f.type) for i, f in enumerate(fields)]
                yield pa.RecordBatch.from_arrays(arrays, schema=arrow_schema)

        return pa.RecordBatchReader.from_batches(arrow_schema, batches())

    def stream_rows(self, query: str, batch_rows: int) -> Iterator[Sequence[tuple]]:
        """``query``'s rows, at most ``batch_rows`` at a time, fetched as they are asked for."""
        raise NotImplementedError

    def _declared_types(self, schema: str, name: str) -> dict[str, str]:
        rows = self.fetchall(  # type: ignore[attr-defined]
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = ? AND table_name = ?",
            [self.fold(schema), self.fold(name)],  # type: ignore[attr-defined]
        )
        return {column: str(data_type).lower() for column, data_type in rows}
