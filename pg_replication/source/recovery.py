"""Re-read rows from the source by primary key, in the form CDC stages them.

A change that leaves a value out (pgoutput's unchanged-TOAST marker) is completed from the row
the warehouse holds. Where the warehouse does not hold that row (it was not copied yet, moved to
pages a slice copied earlier, or a slice re-run removed it), the source's current row is read
instead. That row is a version at or after the change, and every change after it is still to be
applied in order, so the warehouse converges to the source; it never invents a value.

Values are read as their output-function text (what pgoutput sends, in the same session
settings), not through ``::text`` casts, which differ for char(n) and inet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from psycopg import sql
from psycopg.types.string import TextLoader

from pg_replication.errors import SchemaChangeError
from pg_replication.source.catalog import Column, Table, refresh_table
from pg_replication.source.connection import connect
from pg_replication.types import SESSION_OPTIONS, TypeMapping

Staged = str | None
# (segment columns, staged keys) -> {staged key: staged values of those columns}; absent keys are gone.
RowReader = Callable[[Sequence[str], list[tuple[Staged, ...]]], dict[tuple[Staged, ...], list[Staged]]]

CHUNK = 500


def row_reader(conninfo: str, table: Table, mapper: Callable[[Column], TypeMapping]) -> RowReader:
    """A RowReader for ``table`` as the catalog describes it when rows are read."""

    def read(columns: Sequence[str], keys: list[tuple[Staged, ...]]) -> dict[tuple[Staged, ...], list[Staged]]:
        with connect(conninfo) as conn:
            current = refresh_table(conn, table)
        known = {c.name: c for c in current.columns}
        gone = [c for c in columns if c not in known]
        if gone:
            raise SchemaChangeError(
                f"{table.display}: an unchanged value of column(s) {gone} must be read from the source, "
                "which no longer has them",
                table=table.display,
                hint="resync the table (pg-replication resync TABLE)",
            )
        converters = [mapper(known[c]).from_text for c in columns]
        key_types = [known[k].type_sql for k in table.primary_key]
        found: dict[tuple[Staged, ...], list[Staged]] = {}
        with connect(conninfo, options=SESSION_OPTIONS) as conn:
            cur = conn.cursor()
            for (oid,) in conn.execute(
                "SELECT DISTINCT atttypid FROM pg_attribute WHERE attrelid = %s AND attnum > 0", (table.oid,)
            ):
                cur.adapters.register_loader(oid, TextLoader)  # output-function text, as pgoutput sends
            for start in range(0, len(keys), CHUNK):
                chunk = keys[start : start + CHUNK]
                cur.execute(_query(table, columns, key_types, len(chunk)), [v for key in chunk for v in key])
                for i, *values in cur.fetchall():
                    staged = [v if v is None or f is None else f(v) for v, f in zip(values, converters)]
                    found[chunk[int(i)]] = staged  # i is text too: int4 columns load as text here
        return found

    return read


def _query(table: Table, columns: Sequence[str], key_types: list[str], rows: int) -> sql.Composed:
    width = len(table.primary_key)
    values = sql.SQL(", ").join(
        sql.SQL("({})").format(sql.SQL(", ").join([sql.Literal(i)] + [sql.Placeholder()] * width)) for i in range(rows)
    )
    join = sql.SQL(" AND ").join(
        sql.SQL("t.{} = v.{}::{}").format(sql.Identifier(k), sql.Identifier(f"k{j}"), sql.SQL(key_types[j]))
        for j, k in enumerate(table.primary_key)
    )
    return sql.SQL("SELECT v.i, {} FROM (VALUES {}) AS v(i, {}) JOIN {} t ON {}").format(
        sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in columns),
        values,
        sql.SQL(", ").join(sql.Identifier(f"k{j}") for j in range(width)),
        table.ident,
        join,
    )
