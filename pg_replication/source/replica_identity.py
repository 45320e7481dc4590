"""Checks that keep the source's own writes working and excluded columns at home.

A published table needs a replica identity: without one, Postgres refuses every UPDATE and
DELETE on it ("cannot update table ... because it does not have a replica identity and
publishes updates"), and old rows (deletes, key changes) carry only the identity's columns, so it
must include every configured key column. A publication column list must cover the identity, or
Postgres refuses the writes too ("Column list used by the publication does not cover the replica
identity"). Each refusal names the table (the leaf partition, whose identity is what counts) and
the statements that fix it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from pg_replication.errors import TableNotReplicableError

if TYPE_CHECKING:
    from pg_replication.source.catalog import Table

# Per configured table (by name, as the publication sees it now), each relation that holds its
# rows: its replica identity, the identity's columns ('d': the primary key, 'i': the identity
# index; NULL when there is none), its primary key and its NOT NULL columns.
_IDENTITY_SQL = """
SELECT r.ord, n.nspname, c.relname, c.relreplident,
       (SELECT array_agg(a.attname::text ORDER BY a.attnum)
          FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
         WHERE i.indrelid = c.oid
           AND CASE c.relreplident WHEN 'd' THEN i.indisprimary WHEN 'i' THEN i.indisreplident ELSE false END),
       (SELECT array_agg(a.attname::text ORDER BY a.attnum)
          FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
         WHERE i.indrelid = c.oid AND i.indisprimary),
       (SELECT array_agg(a.attname::text) FROM pg_attribute a
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attnotnull)
FROM unnest(%s::text[]) WITH ORDINALITY AS r(name, ord)
CROSS JOIN LATERAL (  -- joined by oid: `oid = x OR oid IN (...)` scanned pg_class once per table
  SELECT to_regclass(r.name) AS relid UNION SELECT relid FROM pg_partition_tree(to_regclass(r.name)) WHERE isleaf
) AS leaf
JOIN pg_class c ON c.oid = leaf.relid AND c.relkind = 'r'
JOIN pg_namespace n ON n.oid = c.relnamespace
ORDER BY r.ord, n.nspname, c.relname
"""

_IDENTITY_NAMES = {"d": "DEFAULT", "f": "FULL", "i": "USING INDEX", "n": "NOTHING"}


def identity_problems(conn: psycopg.Connection, tables: list[Table]) -> dict[tuple[str, str], TableNotReplicableError]:
    """For each table (strategy cdc) that must not be published as it is: why, and the fix."""
    tables = [t for t in tables if t.strategy == "cdc"]
    if not tables:
        return {}
    problems: dict[tuple[str, str], TableNotReplicableError] = {}
    rows = conn.execute(_IDENTITY_SQL, ([t.display for t in tables],)).fetchall()
    for ord_, schema, name, replident, ident, pkey, not_null in rows:
        table = tables[ord_ - 1]
        if (table.schema, table.name) in problems:
            continue
        problem = _problem(table, schema, name, replident, ident, pkey or [], set(not_null or []))
        if problem is not None:
            problems[(table.schema, table.name)] = problem
    return problems


def check_replica_identity(conn: psycopg.Connection, tables: list[Table]) -> None:
    """Raise the first table's problem (see ``identity_problems``)."""
    for problem in identity_problems(conn, tables).values():
        raise problem


def _problem(table: Table, schema: str, name: str, replident: str, ident: list[str] | None,
             pkey: list[str], not_null: set[str]) -> TableNotReplicableError | None:
    key = list(table.primary_key)
    excluded = set(table.entry.exclude_columns) if table.entry else set()
    rel = sql.Identifier(schema, name).as_string()
    where = rel if (schema, name) == (table.schema, table.name) else f"{rel} (a partition of {table.display})"
    kind = _IDENTITY_NAMES.get(replident, replident)
    if replident == "f":
        if not excluded:
            return None  # old rows carry every column, so every key
        message = (
            f"{where} has REPLICA IDENTITY FULL, so the publication's column list (without "
            f"exclude_columns {', '.join(sorted(excluded))}) would not cover it: Postgres would then "
            "refuse every UPDATE and DELETE on the table"
        )
    elif replident == "n" or ident is None:
        why = "NOTHING" if replident == "n" else f"{kind} without {'a primary key' if replident == 'd' else 'its index'}"
        message = (
            f"{where} has replica identity {why}: once published, every UPDATE and DELETE on it "
            "would fail in the source, and deletes would not carry the key"
        )
    elif not set(key) <= set(ident):
        message = (
            f"{where}: replica identity {kind} ({', '.join(ident)}) does not carry key column(s) "
            f"{', '.join(k for k in key if k not in ident)}: deletes and key changes would arrive without the key"
        )
    elif excluded & set(ident):
        message = (
            f"{where}: the publication's column list (without exclude_columns "
            f"{', '.join(sorted(excluded & set(ident)))}) would not cover replica identity {kind} "
            f"({', '.join(ident)}): Postgres would then refuse every UPDATE and DELETE on the table"
        )
    else:
        return None
    return TableNotReplicableError(
        message, hint=_fix(schema, name, replident, key, excluded, pkey, not_null), table=table.display
    )


def _fix(schema: str, name: str, replident: str, key: list[str], excluded: set[str],
         pkey: list[str], not_null: set[str]) -> str:
    """The statements (run as the table's owner) after which the table can be published."""
    rel = sql.Identifier(schema, name)
    alter = sql.SQL("ALTER TABLE {} REPLICA IDENTITY ").format(rel)
    if pkey and set(key) <= set(pkey) and not excluded & set(pkey) and replident != "d":
        return f"run: {(alter + sql.SQL('DEFAULT')).as_string()}  (old rows then carry the primary key)"
    index = sql.Identifier(f"{name[:55]}_pgr_key")
    statements = [
        sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL").format(rel, sql.Identifier(k))
        for k in key if k not in not_null
    ]
    statements.append(sql.SQL("CREATE UNIQUE INDEX {} ON {} ({})").format(
        index, rel, sql.SQL(", ").join(sql.Identifier(k) for k in key)
    ))
    statements.append(alter + sql.SQL("USING INDEX {}").format(index))
    by_index = "; ".join(s.as_string() for s in statements) + ";"
    if excluded:  # FULL would need every column in the column list
        return f"run: {by_index}  (a unique index on the key, so old rows carry the key)"
    return (
        f"run: {(alter + sql.SQL('FULL')).as_string()};  or, so that old rows carry only the key: {by_index}"
    )


def published_columns(conn: psycopg.Connection, publication: str) -> dict[tuple[str, str], list[str]]:
    """The columns the publication sends, per table (``pg_publication_tables.attnames``)."""
    return {
        (schema, name): list(attnames or [])
        for schema, name, attnames in conn.execute(
            "SELECT schemaname, tablename, attnames FROM pg_publication_tables WHERE pubname = %s", (publication,)
        )
    }


def leaked_columns(table: Table, published: dict[tuple[str, str], list[str]]) -> list[str]:
    """Excluded columns of ``table`` that the publication sends."""
    excluded = table.entry.exclude_columns if table.entry else []
    sent = published.get((table.schema, table.name), [])
    return [c for c in excluded if c in sent]


def unpublished_columns(table: Table, published: dict[tuple[str, str], list[str]]) -> list[str]:
    """Columns of ``table`` its column list leaves out: added to the source after the list was
    set (Postgres never extends an explicit list), so their values are not sent."""
    if not (table.entry and table.entry.exclude_columns) or (table.schema, table.name) not in published:
        return []
    sent = set(published[(table.schema, table.name)])
    return [c.name for c in table.columns if c.name not in sent]


def column_list_stale(table: Table, published: dict[tuple[str, str], list[str]]) -> bool:
    return bool(leaked_columns(table, published) or unpublished_columns(table, published))


def check_publication_columns(conn: psycopg.Connection, publication: str, tables: list[Table]) -> None:
    """Refuse a publication we do not own that publishes an excluded column.

    An error at load, not a warning: the values would leave the source in every change the slot
    sends (the decoder drops them, but they would cross the network and sit in the drain's
    memory), we cannot change a publication we do not own, and a warning in a code location's
    load log is read by nobody. Only its owner can fix it (or the exclusion is removed), so we
    fail closed. A publication we own is fixed by the next backfill or drain instead
    (``slot.sync_publication``); the decoder drops excluded columns whatever the slot sends.
    """
    owned = conn.execute(
        "SELECT pg_has_role(pubowner, 'USAGE') FROM pg_publication WHERE pubname = %s", (publication,)
    ).fetchone()
    if owned is None or owned[0]:
        return
    published = published_columns(conn, publication)
    for table in tables:
        leaked = leaked_columns(table, published)
        if leaked:
            kept = [c for c in published[(table.schema, table.name)] if c not in leaked]
            fix = sql.SQL("ALTER PUBLICATION {} SET TABLE {} ({}), ...").format(
                sql.Identifier(publication), table.ident, sql.SQL(", ").join(sql.Identifier(c) for c in kept)
            )
            raise TableNotReplicableError(
                f"{table.display}: publication {sql.Identifier(publication).as_string()} (not ours to change) "
                f"publishes {', '.join(leaked)}, which exclude_columns keeps in the source",
                hint=f"as the publication's owner, list the table with the columns to send: {fix.as_string()} "
                "(a FOR TABLES IN SCHEMA publication cannot have column lists: list its tables), "
                "or remove the column from exclude_columns",
                table=table.display,
            )


def check_declared_key(conn: psycopg.Connection, table: Table) -> None:
    """A ``primary_key:`` from replication.yaml must be unique and never NULL in the source.

    It reads the whole table, so it runs once, when the backfill plans (load stays cheap), and
    not at all when a unique index over NOT NULL key columns already guarantees it.
    """
    if not (table.entry and table.entry.primary_key):
        return
    key = list(table.primary_key)
    enforced = conn.execute(
        """SELECT EXISTS (
             SELECT 1 FROM pg_index i
             WHERE i.indrelid = to_regclass(%s) AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
               AND NOT EXISTS (
                 SELECT 1 FROM unnest(i.indkey::int2[]) AS k(attnum)
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE NOT (a.attname = ANY(%s) AND a.attnotnull)))""",
        (table.display, key),
    ).fetchone()
    if enforced and enforced[0]:
        return
    cols = [sql.Identifier(k) for k in key]
    query = sql.SQL("SELECT {}, count(*) FROM {} GROUP BY {} HAVING count(*) > 1 OR bool_or({}) LIMIT 1").format(
        sql.SQL(", ").join(sql.SQL("{}::text").format(c) for c in cols),
        table.ident,
        sql.SQL(", ").join(cols),
        sql.SQL(" OR ").join(sql.SQL("{} IS NULL").format(c) for c in cols),
    )
    row = conn.execute(query).fetchone()
    if row is None:
        return
    *values, count = row
    shown = ", ".join(f"{k}={'NULL' if v is None else v}" for k, v in zip(key, values))
    why = f"{count} row(s) have a NULL key column ({shown})" if None in values else f"{shown} is held by {count} rows"
    raise TableNotReplicableError(
        f"{table.display}: primary_key ({', '.join(key)}) is not unique in the source: {why}",
        hint="declare columns that identify one row (a unique index over them lets Postgres keep it "
        "so), or fix the rows; changes to rows sharing a key would be merged into one",
        table=table.display,
    )
