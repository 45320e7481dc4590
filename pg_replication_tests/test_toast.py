"""Unchanged TOAST values (pgoutput's 'u') are exact in every order of slices, re-runs and drains.

A change that leaves an out-of-line value untouched does not carry it: the warehouse fills it from
the row it holds. These tests put that row out of reach (not copied yet, moved into a slice copied
earlier, deleted by a slice re-run) and check the value is recovered from the source instead of
written as NULL. Every warehouse runs them.
"""

from __future__ import annotations

import pytest

from pg_replication_tests.replication import Harness


@pytest.fixture
def docs(pg, pg_url, target):
    pg.execute("CREATE TABLE docs (id int PRIMARY KEY, blob text, n int, pad text)")
    pg.execute("ALTER TABLE docs ALTER COLUMN blob SET STORAGE EXTERNAL")  # out of line, never compressed
    pg.execute("ALTER TABLE docs ALTER COLUMN pad SET STORAGE PLAIN")  # in line: ~8 rows fill a page
    pg.execute("INSERT INTO docs SELECT i, repeat(md5(i::text), 100), 0, repeat('p', 900) FROM generate_series(1, 200) i")
    return Harness(pg_url, target, ["docs"], partitions=2)


def _blob_is_out_of_line(pg) -> None:
    stored = pg.execute("SELECT pg_column_size(blob) FROM docs WHERE id = 1").fetchone()[0]
    assert stored >= 3000  # EXTERNAL: the value lives in the TOAST table, uncompressed



def test_key_change_before_its_slice_is_copied(docs, pg):
    _blob_is_out_of_line(pg)
    docs.backfill(slices=[1])
    pg.execute("UPDATE docs SET id = 1000 WHERE id = 2")  # id 2 lives in slice 0's pages
    docs.drain_all()
    docs.backfill(slices=[0])
    docs.drain_all()
    docs.assert_equal(pg, "docs")



def test_page_moving_update_into_a_copied_slice(docs, pg):
    docs.backfill(slices=[1])
    before = pg.execute("SELECT ctid FROM docs WHERE id = 4").fetchone()[0]
    pg.execute("UPDATE docs SET n = n + 1 WHERE id = 4")  # the page is full: the new version moves
    pg.execute("UPDATE docs SET n = n + 1, id = 2004 WHERE id = 5")
    after = pg.execute("SELECT ctid FROM docs WHERE id = 4").fetchone()[0]
    assert str(before).split(",")[0] != str(after).split(",")[0]
    docs.drain_all()
    docs.backfill(slices=[0])
    docs.drain_all()
    docs.assert_equal(pg, "docs")



def test_slice_rerun_while_streaming_then_key_change(docs, pg):
    docs.backfill()
    assert docs.drain_all()
    pg.execute("UPDATE docs SET id = 5000 WHERE id = 3")  # not drained yet
    docs.backfill(slices=[0])  # the re-run no longer finds id 3 in the source: it deletes it
    docs.drain_all()  # the key change must not fill blob from the deleted row
    docs.assert_equal(pg, "docs")


def test_row_gone_from_the_source_by_the_time_it_is_recovered(docs, pg):
    docs.backfill(slices=[1])
    pg.execute("UPDATE docs SET id = 1000 WHERE id = 2")
    pg.execute("DELETE FROM docs WHERE id = 1000")
    docs.backfill(slices=[0])
    docs.drain_all()
    docs.assert_equal(pg, "docs")
