"""Excluded columns never leave the source: the publication's column list leaves them out (also
when ``exclude_columns`` is added to a published table), a publication we do not own that
publishes one is refused at load, and the decoder drops them whatever the slot sends, so they
reach no warehouse table, state, change log or drain report."""

from __future__ import annotations

import subprocess
from pathlib import Path

import duckdb
import psycopg
import pytest

from pg_replication.config import parse_config
from pg_replication.errors import TableNotReplicableError
from pg_replication.source.catalog import introspect
from pg_replication.source.connection import connect
from pg_replication_tests.replication import Harness

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "source-role.sql"


def _leaks(duckdb_path: Path, marker: str) -> list[str]:
    """Every warehouse table (data, state, change logs) that holds ``marker`` anywhere."""
    found = []
    with duckdb.connect(str(duckdb_path), read_only=True) as conn:
        tables = conn.execute("SELECT table_schema, table_name FROM information_schema.tables").fetchall()
        for schema, name in tables:
            rows = conn.execute(f'SELECT * FROM "{schema}"."{name}"').fetchall()
            if marker in repr(rows):
                found.append(f"{schema}.{name}")
    return found


def _attnames(pg, table: str) -> list[str]:
    return pg.execute("SELECT attnames FROM pg_publication_tables WHERE tablename = %s", (table,)).fetchone()[0]


@pytest.fixture
def people(pg):
    pg.execute("CREATE TABLE people (id int PRIMARY KEY, name text, ssn text)")
    pg.execute("INSERT INTO people SELECT i, 'n' || i, 'old-' || i FROM generate_series(1, 50) i")


def test_exclude_added_to_a_published_table_narrows_the_column_list(people, pg, pg_url, duckdb_path):
    h = Harness(pg_url, duckdb_path, ["people"])
    h.backfill()
    h.drain_all()
    assert "ssn" in _attnames(pg, "people")
    h.reload([{"name": "people", "exclude_columns": ["ssn"]}])
    h.drain_all()  # every drain brings the publication in line with replication.yaml
    assert _attnames(pg, "people") == ["id", "name"]
    # The column's earlier values must leave the warehouse too: the table is backfilled again.
    with h.target.open() as wh:
        status, reason = wh.statuses()["public.people"]
    assert status == "backfilling" and "backfill restarted" in reason
    h.backfill()
    assert "ssn" not in h.target.columns(h.table("people"))
    pg.execute("UPDATE people SET name = 'x', ssn = 'leak-1' WHERE id < 10")
    pg.execute("INSERT INTO people VALUES (500, 'new', 'leak-2')")
    results = h.drain_all()
    h.assert_equal(pg, "people", ["id", "name"])
    assert _leaks(duckdb_path, "leak-") == []
    assert "leak-" not in repr(results)


def test_decoder_drops_excluded_columns_whatever_the_slot_sends(people, pg, pg_url, duckdb_path):
    h = Harness(pg_url, duckdb_path, [{"name": "people", "exclude_columns": ["ssn"]}])
    h.backfill()
    assert _attnames(pg, "people") == ["id", "name"]
    # Someone publishes the whole table; the changes below are decoded with that column list.
    pg.execute(psycopg.sql.SQL("ALTER PUBLICATION {} SET TABLE people").format(psycopg.sql.Identifier(h.settings.publication)))
    pg.execute("UPDATE people SET name = 'x', ssn = 'leak-1' WHERE id < 10")
    pg.execute("INSERT INTO people VALUES (500, 'new', 'leak-2')")
    pg.execute("DELETE FROM people WHERE id = 20")
    results = h.drain_all()
    # The publication entry was replaced: the table cannot prove its stream has no gap and is
    # backfilled again; the changes decoded meanwhile went through the decoder into its log.
    h.backfill()
    results += h.drain_all()
    h.assert_equal(pg, "people", ["id", "name"])
    assert "ssn" not in h.target.columns(h.table("people"))
    assert _leaks(duckdb_path, "leak-") == []
    assert "leak-" not in repr(results)


def test_publication_not_ours_publishing_an_excluded_column_is_refused_at_load(pg, pg_url):
    pg.execute("CREATE SCHEMA app")
    pg.execute("CREATE TABLE app.people (id int PRIMARY KEY, name text, ssn text)")
    try:
        subprocess.run(
            ["psql", pg_url, "-q", "-v", "ON_ERROR_STOP=1", "-v", "password='pw'", "-v", "schema=app",
             "-v", "publication=pgr_test_pub", "-f", str(SCRIPT)],
            check=True, capture_output=True, text=True,
        )
        params = psycopg.conninfo.conninfo_to_dict(pg_url)
        role_url = psycopg.conninfo.make_conninfo(**{**params, "user": "replicator", "password": "pw"})
        config = {"source": {"publication": "pgr_test_pub"}, "tables": [{"name": "app.people", "exclude_columns": ["ssn"]}]}
        with connect(role_url) as conn, pytest.raises(TableNotReplicableError) as err:
            introspect(conn, parse_config(config))
        text = str(err.value)
        assert '"app"."people"' in text and "ssn" in text and "pgr_test_pub" in text
        assert 'ALTER PUBLICATION "pgr_test_pub"' in text  # what its owner can run
        with connect(role_url) as conn:  # without the exclusion it loads
            introspect(conn, parse_config({**config, "tables": ["app.people"]}))
    finally:
        pg.execute("DROP PUBLICATION IF EXISTS pgr_test_pub")
        pg.execute("DROP OWNED BY replicator")
        pg.execute("DROP ROLE IF EXISTS replicator")


def test_backfill_narrows_a_column_list_that_sends_an_excluded_column(people, pg, pg_url, duckdb_path):
    pg.execute("CREATE PUBLICATION pgr_test_pub FOR TABLE people")  # ours (same owner), every column
    h = Harness(pg_url, duckdb_path, [{"name": "people", "exclude_columns": ["ssn"]}])
    h.backfill()  # publishes before it plans: with the column list
    assert _attnames(pg, "people") == ["id", "name"]
    pg.execute("UPDATE people SET ssn = 'leak-1' WHERE id < 10")
    h.drain_all()
    assert _leaks(duckdb_path, "leak-") == []


def test_column_added_after_the_column_list_is_replicated(people, pg, pg_url, duckdb_path):
    h = Harness(pg_url, duckdb_path, [{"name": "people", "exclude_columns": ["ssn"]}])
    h.backfill()
    pg.execute("ALTER TABLE people ADD COLUMN email text")
    pg.execute("UPDATE people SET email = 'e' || id WHERE id <= 10")
    h.reload()
    h.drain_all()  # the list is re-set with email; changes sent without it are gone: backfill again
    assert _attnames(pg, "people") == ["id", "name", "email"]
    h.backfill()
    pg.execute("UPDATE people SET email = 'later' WHERE id = 20")
    h.drain_all()
    h.assert_equal(pg, "people", ["id", "name", "email"])
    assert _leaks(duckdb_path, "old-") == []
