"""Documents kept fresh by every writer of a tree's tables, not only the drains (README,
Documents): a sync of a query-strategy table refreshes them in its own transaction; a backfill
slice and a retry rebuild them right after; the drains between backfill slices report them; only
the sets replication.yaml configures are refreshed. Each compared with a build from scratch and
with Postgres's own document (test_documents.py's helpers and tree).
Leaves out: strategy triggers in a tree (refused at load)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from pg_replication.dagster.definitions import build_definitions
from pg_replication.replicate.operations import retry_table
from pg_replication.replicate.strategies import sync_table
from pg_replication_tests.replication import Harness
from pg_replication_tests.targets import make_target
from pg_replication_tests.test_documents import (
    PUBLISHER_DOCS,
    SCHEMA,
    TABLES,
    assert_documents_fresh,
    build_documents,
    rebuilt_documents,
    resolve,
    stored_documents,
    tree,  # noqa: F401 (a fixture: the tree backfilled into each warehouse)
    while_writing,
)

# author synced by its cursor column: a trigger sets it on every update (cascades included).
AUTHOR_UPDATED_AT = """
ALTER TABLE author ADD COLUMN updated timestamptz NOT NULL DEFAULT '2026-01-01';
ALTER TABLE author ALTER COLUMN updated SET DEFAULT clock_timestamp();
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.updated := clock_timestamp(); RETURN NEW; END $$;
CREATE TRIGGER author_touch BEFORE UPDATE ON author FOR EACH ROW EXECUTE FUNCTION touch();
"""
AUTHOR = {"name": "author", "strategy": "updated_at", "cursor": "updated", "lookback": "1 minute"}


@pytest.fixture(params=["duckdb", "postgres", "snowflake", "clickhouse"])
def mixed_tree(request, pg, pg_url, tmp_path: Path, server_url: str):
    """publisher, book and review by CDC, author (a many_to_one grandchild) by updated_at."""
    pg.execute(SCHEMA)
    pg.execute(AUTHOR_UPDATED_AT)
    with make_target(request.param, tmp_path, server_url) as target:
        h = Harness(pg_url, target, ["publisher", AUTHOR, "book", "review"], partitions=1)
        h.backfill()
        yield h


def _sync(h: Harness, name: str, **kw):
    with h.target.open() as wh:
        return sync_table(h.pg_url, wh, h.table(name), **kw)


def test_a_tree_with_an_updated_at_table_stays_fresh_under_drains_and_syncs(mixed_tree, pg, pg_url):
    """The writer changes every table (author's deletes reach the documents through book's SET
    NULL: updated_at sees no deletes, and its orphaned rows are in no document)."""
    h = mixed_tree
    dset = resolve(h, pg)
    build_documents(h, dset)
    def drain_and_sync() -> int:  # interleaved with the writer's transactions
        h.drain_all(max_changes=60)
        return _sync(h, "author").documents.get("publisher_docs", 0)

    synced = while_writing(pg_url, 300, 7, drain_and_sync)
    h.drain_all()
    synced += _sync(h, "author").documents.get("publisher_docs", 0)
    for name in ("publisher", "book", "review"):
        h.assert_equal(pg, name)
    assert_documents_fresh(h, pg, dset)
    assert synced > 0


@pytest.mark.parametrize("mixed_tree", ["duckdb"], indirect=True)
def test_a_sync_recomputes_the_documents_its_rows_reach_and_a_reload_all(mixed_tree, pg):
    h = mixed_tree
    dset = resolve(h, pg)
    build_documents(h, dset)
    pg.execute("UPDATE author SET name = 'renamed' WHERE id = 2")  # author 2 wrote books of publishers 2 and 12
    _sync(h, "author")  # the first sync reads every row of the backfill's last cursor value again
    pg.execute("UPDATE author SET name = 'renamed twice' WHERE id = 2")
    result = _sync(h, "author")
    # the look-back window reads again the rows of the last minute: author 2 alone here
    assert result.mode == "upserted" and result.documents == {"publisher_docs": 2}
    assert_documents_fresh(h, pg, dset)
    pg.execute("UPDATE book SET author_id = 3 WHERE isbn = 'b00001'")  # moved to author 3 by a drain
    h.drain_all()
    pg.execute("UPDATE author SET name = 'renamed again' WHERE id = 3")
    _sync(h, "author")
    assert_documents_fresh(h, pg, dset)
    h.reload(["publisher", {"name": "author", "strategy": "reload"}, "book", "review"])
    pg.execute("UPDATE author SET name = 'reloaded' WHERE id = 4")
    result = _sync(h, "author")
    assert result.mode == "reloaded" and result.documents == {"publisher_docs": 20}  # a reload builds the set whole
    assert_documents_fresh(h, pg, dset)


def test_the_sync_job_reports_the_documents_it_refreshed(pg, pg_url, write_config, duckdb_path):
    pg.execute(SCHEMA)
    pg.execute(AUTHOR_UPDATED_AT)
    tables = ["publisher", AUTHOR, "book", "review"]
    write_config({
        "source": {"slot": "pgr_test", "publication": "pgr_test_pub"}, "tables": tables, "defaults": {"partitions": 1},
        "documents": [PUBLISHER_DOCS],
    })
    h = Harness(pg_url, duckdb_path, tables, partitions=1)
    h.backfill()
    dset = resolve(h, pg)
    build_documents(h, dset)
    pg.execute("UPDATE author SET name = 'renamed' WHERE id = 2")
    (job,) = [j for j in build_definitions().resolve_all_job_defs() if "_sync_" in j.name]
    result = job.execute_in_process()
    assert result.success
    events = {e.asset_key: e for e in result.asset_materializations_for_node(f"{job.name}_tables")}
    assert events[dg.AssetKey(["public", "publisher_docs"])].metadata["documents_recomputed"].value > 0
    assert_documents_fresh(h, pg, dset)


@pytest.fixture
def configured_tree(pg, pg_url, write_config, duckdb_path):
    """The tree backfilled into the DuckDB file replication.yaml names, its set built; returns
    (harness, set, write): ``write(documents)`` rewrites replication.yaml with those sets."""
    pg.execute(SCHEMA)
    pg.execute("CREATE TABLE extra (id int PRIMARY KEY, pad text)")
    pg.execute("INSERT INTO extra SELECT i, repeat('x', 200) FROM generate_series(1, 4000) i")  # several slices

    def write(documents: list) -> None:
        write_config({
            "source": {"slot": "pgr_test", "publication": "pgr_test_pub"}, "tables": [*TABLES, "extra"],
            "defaults": {"partitions": 1}, "backfill": {"max_snapshot_bytes": "256 KiB"}, "documents": documents,
        })

    write([PUBLISHER_DOCS])
    h = Harness(pg_url, duckdb_path, TABLES, partitions=1)
    h.backfill()
    dset = resolve(h, pg)
    build_documents(h, dset)
    return h, dset, write


def test_a_set_taken_out_of_replication_yaml_is_no_longer_refreshed(configured_tree, pg):
    h, dset, write = configured_tree
    before = stored_documents(h, dset)
    write([])  # the set is gone from the file; its table stays in the warehouse
    pg.execute("UPDATE author SET name = 'renamed' WHERE id = 2")
    result = build_definitions().resolve_job_def("postgres_cdc_drain").execute_in_process(raise_on_error=False)
    assert result.success
    h.assert_equal(pg, "author")
    assert stored_documents(h, dset) == before  # as they were: no drain refreshes a set not configured


def test_a_drain_between_backfill_slices_reports_the_documents_it_refreshed(configured_tree, pg):
    h, dset, _ = configured_tree
    pg.execute("UPDATE author SET name = 'renamed' WHERE id = 2")  # publishers 2 and 12: drained between extra's slices
    job = build_definitions().resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        assert job.execute_in_process(asset_selection=[dg.AssetKey(["public", "extra"])], partition_key="000", instance=instance).success
        event = instance.get_latest_materialization_event(dg.AssetKey(["public", "publisher_docs"]))
    assert event is not None and "between backfill slices" in (event.asset_materialization.description or "")
    assert event.asset_materialization.metadata["documents_recomputed"].value == 2
    assert_documents_fresh(h, pg, dset)


@pytest.mark.e2e
def test_a_partition_materialized_again_rebuilds_the_documents(configured_tree, pg, tmp_path):
    """What an operator runs, in a fresh process: a table's partition copied again (no drain in
    between) rewrites rows of the tree; its documents follow."""
    from pg_replication_tests.operator import dagster_env, materialize, run_cli

    h, dset, _ = configured_tree
    pg.execute("UPDATE book SET title = 'copied again', publisher_id = 3 WHERE isbn = 'b00001'")  # from publisher 2 to 3
    out = run_cli(materialize("public/book", "000...000"), dagster_env(tmp_path), tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    h.assert_equal(pg, "book")
    assert stored_documents(h, dset) == rebuilt_documents(h, dset)
    assert stored_documents(h, dset)[3]["books"][0]["title"] == "copied again"


def test_a_retry_rebuilds_the_documents_of_its_table(configured_tree, pg):
    """book fails (DuckDB's DECIMAL refuses NaN), its changes wait in its change log; the cause
    fixed, a retry replays them outside any drain: the documents follow."""
    h, dset, _ = configured_tree
    pg.execute("UPDATE book SET price = 'NaN' WHERE isbn = 'b00001'")
    (result,) = h.drain_all()
    assert result.tables["public.book"].mode == "failed"
    pg.execute("UPDATE book SET price = 7.5, title = 'retried' WHERE isbn = 'b00001'")
    pg.execute("UPDATE review SET stars = 1 WHERE book_isbn = 'b00001'")  # applied by a drain while book is held
    h.drain_all()
    with h.target.open() as wh:
        retry_table(h.pg_url, wh, h.table("book"))
    h.assert_equal(pg, "book")
    assert_documents_fresh(h, pg, dset)


def test_a_drain_rebuilds_a_set_left_stale_by_a_run_killed_before_its_rebuild(configured_tree, pg):
    """A slice or a replay commits with the set marked stale; the rebuild right after never ran
    (the run was killed): the next drain that touches the set builds it whole."""
    h, dset, _ = configured_tree
    with h.target.open() as wh, wh.transaction():  # a rewrite of book outside the drains, as a slice commits it
        wh.execute(f"UPDATE {wh.table_name(h.table('book'))} SET title = 'rewritten' WHERE isbn = 'b00001'")
        wh.mark_documents_stale(h.table("book"), "a backfill slice of public.book")
    pg.execute("UPDATE book SET title = 'rewritten' WHERE isbn = 'b00001'")  # the source agrees
    pg.execute("UPDATE author SET name = 'renamed' WHERE id = 20")
    (result,) = h.drain_all()
    assert result.tables.documents == {"publisher_docs": 20}
    assert_documents_fresh(h, pg, dset)
    pg.execute("UPDATE author SET name = 'renamed again' WHERE id = 20")
    (result,) = h.drain_all()
    assert result.tables.documents["publisher_docs"] < 20  # no longer stale: incremental again


def test_a_slice_copied_again_rebuilds_the_documents_on_every_warehouse(tree, pg):  # noqa: F811 (the imported fixture)
    """The engine's path under the CLI test above, on every warehouse: book's slices copied again
    (no drain in between) move a book to another publisher; both documents follow."""
    h = tree
    dset = resolve(h, pg)
    build_documents(h, dset)
    pg.execute("UPDATE book SET title = 'copied again', publisher_id = 3 WHERE isbn = 'b00001'")
    h.backfill("book")
    h.assert_equal(pg, "book")
    documents = stored_documents(h, dset)
    assert documents == rebuilt_documents(h, dset)
    assert "copied again" in [book["title"] for book in documents[3]["books"]]
    # Built again, the set is fresh: the next drain recomputes only what it touches.
    pg.execute("UPDATE review SET stars = 5 WHERE book_isbn = 'b00002'")
    (result,) = h.drain_all()
    assert result.tables.documents == {"publisher_docs": 1}
    assert_documents_fresh(h, pg, dset)
