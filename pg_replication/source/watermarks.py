"""How far a query strategy has read, in the source's own terms, and the predicate for what is
new. Values are Postgres's text output (ISO dates, UTC) and go back through casts to the
column's own type, so Postgres does every comparison: key order, collations, time zones.

A watermark is stored as JSON: ``{"mark": <value or list of key values>, "reloaded": "YYYY-MM-DD"}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import psycopg
from psycopg import sql

from pg_replication.source.catalog import Table

_NUMERIC = {"int2", "int4", "int8", "numeric", "float4", "float8"}


@dataclass(frozen=True)
class Watermark:
    mark: str | list[str] | None = None
    reloaded: str | None = None  # the last reload_on day a full reload ran

    @classmethod
    def from_json(cls, text: str | None) -> Watermark:
        return cls(**json.loads(text)) if text else cls()

    def to_json(self) -> str:
        return json.dumps({"mark": self.mark, "reloaded": self.reloaded})


def _cast(table: Table, column: str) -> sql.Composable:
    return sql.SQL(table.column(column).type_sql)  # format_type() output: catalog text, not user input


def initial_mark(conn: psycopg.Connection, table: Table) -> str | list[str] | None:
    """The strategy's mark over the whole table now (None for strategies without one)."""
    if table.strategy == "append":
        return key_mark(conn, table, sql.SQL("true"), [])
    if table.strategy == "updated_at":
        return cursor_mark(conn, table, sql.SQL("true"), [], None)
    return None


def key_mark(conn: psycopg.Connection, table: Table, where: sql.Composable, params: list) -> list[str] | None:
    """The largest primary key (in Postgres's order) among the rows matching ``where``."""
    keys = [sql.Identifier(k) for k in table.primary_key]
    query = sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY {} LIMIT 1").format(
        # aliased: an output column named like the key would make ORDER BY sort the text
        sql.SQL(", ").join(sql.SQL("{}::text AS {}").format(k, sql.Identifier(f"_k{i}")) for i, k in enumerate(keys)),
        table.ident,
        where,
        sql.SQL(", ").join(sql.SQL("{} DESC").format(k) for k in keys),
    )
    row = conn.execute(query, params).fetchone()
    return list(row) if row else None


def cursor_mark(conn: psycopg.Connection, table: Table, where: sql.Composable, params: list, floor: str | None) -> str | None:
    """The largest cursor value among the rows matching ``where``, never below ``floor``."""
    assert table.entry is not None and table.entry.cursor is not None
    cursor, cast = sql.Identifier(table.entry.cursor), _cast(table, table.entry.cursor)
    query = sql.SQL("SELECT greatest(max({}), {}::{})::text FROM {} WHERE {}").format(cursor, sql.Placeholder(), cast, table.ident, where)
    return conn.execute(query, [floor, *params]).fetchone()[0]  # type: ignore[index]


def after_key(table: Table, mark: list[str] | None) -> tuple[sql.Composable, list]:
    """Rows whose key is greater than ``mark`` (row comparison: composite keys order as tuples)."""
    if mark is None:
        return sql.SQL("true"), []
    keys = sql.SQL(", ").join(sql.Identifier(k) for k in table.primary_key)
    values = sql.SQL(", ").join(sql.SQL("{}::{}").format(sql.Placeholder(), _cast(table, k)) for k in table.primary_key)
    return sql.SQL("({}) > ({})").format(keys, values), list(mark)


def since_cursor(table: Table, mark: str | None, lookback: str) -> tuple[sql.Composable, list]:
    """Rows whose cursor is at or after ``mark`` minus the look-back window."""
    assert table.entry is not None and table.entry.cursor is not None
    if mark is None:
        return sql.SQL("true"), []
    column = table.column(table.entry.cursor)
    resolved, _ = column.type.resolved(column.typmod)
    window = sql.SQL("numeric" if resolved.name in _NUMERIC else "interval")
    return (
        sql.SQL("{} >= {}::{} - {}::{}").format(
            sql.Identifier(column.name), sql.Placeholder(), _cast(table, column.name), sql.Placeholder(), window
        ),
        [mark, lookback],
    )
