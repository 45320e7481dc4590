"""Trigger-based change capture, for sources without logical replication.

``install`` creates, in the source, schema ``_pg_replication_capture`` (its own: a Postgres
warehouse in the same database keeps its state in ``_pg_replication``) with one change table and
one trigger function, and on each table row triggers (insert, update, delete) and a statement
trigger (truncate). A trigger records which key changed, not the row: the drain reads the
current rows of the keys it sees, in the same snapshot as the change rows, so every value is
read exactly as the backfill reads it (no JSON round trip) and a key touched many times is read
once. The function is SECURITY DEFINER: writers need no privilege on the change table.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from pg_replication.errors import SourceNotReadyError
from pg_replication.source.catalog import Table

SCHEMA = "_pg_replication_capture"
CHANGES = sql.Identifier(SCHEMA, "changes")
ROW_TRIGGER, TRUNCATE_TRIGGER = "pg_replication_capture", "pg_replication_capture_truncate"

_SETUP = """
CREATE SCHEMA IF NOT EXISTS _pg_replication_capture;
CREATE TABLE IF NOT EXISTS _pg_replication_capture.changes (
    id bigserial PRIMARY KEY,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    op "char" NOT NULL,           -- I, U, D, T
    key jsonb,                    -- the primary key values, in key order (NULL for T)
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE OR REPLACE FUNCTION _pg_replication_capture.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
    -- TG_ARGV: schema, table (the root of a partitioned table), then the key columns
    keys text[] := TG_ARGV[2:];
    new_key jsonb;
    old_key jsonb;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO _pg_replication_capture.changes (schema_name, table_name, op) VALUES (TG_ARGV[0], TG_ARGV[1], 'T');
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        SELECT jsonb_agg(to_jsonb(OLD) -> k ORDER BY n) INTO old_key FROM unnest(keys) WITH ORDINALITY AS u(k, n);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        SELECT jsonb_agg(to_jsonb(NEW) -> k ORDER BY n) INTO new_key FROM unnest(keys) WITH ORDINALITY AS u(k, n);
    END IF;
    IF TG_OP = 'UPDATE' AND old_key IS DISTINCT FROM new_key THEN  -- a key change: the old key is gone
        INSERT INTO _pg_replication_capture.changes (schema_name, table_name, op, key) VALUES (TG_ARGV[0], TG_ARGV[1], 'D', old_key);
    END IF;
    INSERT INTO _pg_replication_capture.changes (schema_name, table_name, op, key)
    VALUES (TG_ARGV[0], TG_ARGV[1], left(TG_OP, 1), coalesce(new_key, old_key));
    RETURN NULL;
END $$;
"""


def install(conn: psycopg.Connection, tables: list[Table], grant_to: str | None = None) -> None:
    """Create the change table, the function and each table's triggers (idempotent), and let
    ``grant_to`` (the role pg_replication connects as) read and delete captured changes."""
    with conn.transaction():
        conn.execute(_SETUP)
        for table in tables:
            args = sql.SQL(", ").join(sql.Literal(a) for a in (table.schema, table.name, *table.primary_key))
            conn.execute(
                sql.SQL(
                    "CREATE OR REPLACE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} "
                    "FOR EACH ROW EXECUTE FUNCTION _pg_replication_capture.capture({})"
                ).format(sql.Identifier(ROW_TRIGGER), table.ident, args)
            )
            if table.relkind != "p":  # Postgres fires no TRUNCATE trigger on a partitioned table
                conn.execute(
                    sql.SQL(
                        "CREATE OR REPLACE TRIGGER {} AFTER TRUNCATE ON {} "
                        "FOR EACH STATEMENT EXECUTE FUNCTION _pg_replication_capture.capture({})"
                    ).format(sql.Identifier(TRUNCATE_TRIGGER), table.ident, args)
                )
        if grant_to:
            role = sql.Identifier(grant_to)
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA _pg_replication_capture TO {}").format(role))
            conn.execute(sql.SQL("GRANT SELECT, DELETE ON _pg_replication_capture.changes TO {}").format(role))


def uninstall(conn: psycopg.Connection) -> list[str]:
    """Drop every capture trigger and the schema; returns the tables that had triggers."""
    with conn.transaction():
        rows = conn.execute(
            """SELECT DISTINCT n.nspname, c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
               JOIN pg_namespace n ON n.oid = c.relnamespace
               WHERE t.tgname IN (%s, %s) AND NOT t.tgisinternal AND c.relispartition IS NOT TRUE""",
            (ROW_TRIGGER, TRUNCATE_TRIGGER),
        ).fetchall()
        for schema, name in rows:
            for trigger in (ROW_TRIGGER, TRUNCATE_TRIGGER):
                conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(trigger), sql.Identifier(schema, name)))
        conn.execute("DROP SCHEMA IF EXISTS _pg_replication_capture CASCADE")
    return [sql.Identifier(s, n).as_string() for s, n in rows]


def require_capture(conn: psycopg.Connection, table: Table) -> None:
    """Fail unless the table's changes are being captured (before its backfill is planned)."""
    found = conn.execute(
        "SELECT 1 FROM pg_trigger WHERE tgrelid = %s AND tgname = %s AND NOT tgisinternal", (table.oid, ROW_TRIGGER)
    ).fetchone()
    if not found:
        raise SourceNotReadyError(
            f"{table.display} uses strategy triggers, but its changes are not captured",
            hint="run `pg-replication install-triggers` (as the table owner) once, and again after adding tables",
            table=table.display,
        )
