"""The source's foreign keys between given tables: how a document's children join their parent
when replication.yaml names no ``foreign_key``."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg


@dataclass(frozen=True)
class ForeignKey:
    referencing: tuple[str, str]  # (schema, table) holding the key
    columns: tuple[str, ...]  # its columns, in the constraint's order
    referenced: tuple[str, str]
    referenced_columns: tuple[str, ...]
    name: str


def foreign_keys(conn: psycopg.Connection, tables: set[tuple[str, str]]) -> list[ForeignKey]:
    """Every foreign key whose two ends are among ``tables`` (schema, name)."""
    rows = conn.execute(
        """
        SELECT cn.nspname, cl.relname, fn.nspname, fl.relname, c.conname,
               array(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(n, i)
                     JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.i),
               array(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(n, i)
                     JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.i)
        FROM pg_constraint c
        JOIN pg_class cl ON cl.oid = c.conrelid JOIN pg_namespace cn ON cn.oid = cl.relnamespace
        JOIN pg_class fl ON fl.oid = c.confrelid JOIN pg_namespace fn ON fn.oid = fl.relnamespace
        WHERE c.contype = 'f'
        ORDER BY c.conname
        """
    ).fetchall()
    return [
        ForeignKey((s, t), tuple(cols), (fs, ft), tuple(fcols), name)
        for s, t, fs, ft, name, cols, fcols in rows
        if (s, t) in tables and (fs, ft) in tables
    ]
