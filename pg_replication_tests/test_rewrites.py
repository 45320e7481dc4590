"""CTID plans survive table rewrites (DESIGN 3.8, issue 10 point 6).

A backfill plan names page ranges. VACUUM FULL, CLUSTER, a rewriting ALTER TABLE or pg_repack
move every row to new pages (a new relfilenode): slices planned before would skip rows that
moved into already-copied pages. Here slice 0 is copied, the table is rewritten so rows move
between slices, the other slices are copied and CDC drains: the warehouse must equal the source,
no row missing and none twice.

pg_repack is not installed on the test server; it swaps in a new relfilenode like the others.
"""

from __future__ import annotations

import pytest

from pg_replication_tests.replication import Harness

REWRITES = {
    # Rows after the deleted ones move forward into slice 0's pages.
    "vacuum_full": ["VACUUM FULL t"],
    # Rows are reordered by an unrelated column: every slice's pages change hands.
    "cluster": ["CREATE INDEX t_k ON t (k)", "CLUSTER t USING t_k"],
    # A rewriting ALTER that keeps the column's type (the USING expression forces the rewrite).
    "alter_rewrite": ["ALTER TABLE t ALTER COLUMN v TYPE text USING v || ''"],
}


@pytest.mark.parametrize("rewrite", list(REWRITES))
def test_rewrite_between_slices_misses_nothing(pg, pg_url, target, rewrite):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text, k int)")
    pg.execute("INSERT INTO t SELECT i, repeat('x', 200), (i * 7919) % 6000 FROM generate_series(1, 6000) i")
    h = Harness(pg_url, target, ["t"], partitions=3)
    h.backfill(slices=[0])
    pg.execute("DELETE FROM t WHERE id <= 2000 AND id % 4 <> 0")  # room in slice 0's pages
    for statement in REWRITES[rewrite]:
        pg.execute(statement)
    pg.execute("UPDATE t SET v = 'after' WHERE id % 97 = 0")
    h.backfill(slices=[1, 2])
    h.drain_all()
    h.assert_equal(pg, "t")


def test_rerun_of_a_copied_slice_after_a_rewrite(pg, pg_url, duckdb_path):
    """Slices 0 and 1 copied, a rewrite, then slice 0 re-run and slice 2 copied: the re-plan
    gives the re-run its share of the new pages, so nothing waits on the copied slice 1."""
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text, k int)")
    pg.execute("INSERT INTO t SELECT i, repeat('x', 200), (i * 7919) % 6000 FROM generate_series(1, 6000) i")
    h = Harness(pg_url, duckdb_path, ["t"], partitions=3)
    h.backfill(slices=[0, 1])
    pg.execute("DELETE FROM t WHERE id % 3 = 0")
    pg.execute("CREATE INDEX t_k ON t (k)")
    pg.execute("CLUSTER t USING t_k")
    h.backfill(slices=[0])
    h.backfill(slices=[2])
    h.drain_all()
    h.assert_equal(pg, "t")
    with h.target.open(read_only=True) as wh:
        state = wh.load_state(h.table("t"))
    assert state.status == "streaming" and state.slices_done == {0, 1, 2}
    assert state.plan is not None and state.plan.slices[1] == ()
