"""Reading a replicated table back as Arrow batches (warehouse/reads.py), on every warehouse:
bounded batches, one schema for all of them, the source's values. Memory is measured in
test_io_managers.py."""

from __future__ import annotations

from decimal import Decimal

import pyarrow as pa

from pg_replication_tests.replication import Harness

ROWS = 2500


def test_read_batches_streams_the_source_values(pg, pg_url, target):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, name text, amount numeric(10,2), flag boolean, tags text[])")
    pg.execute(
        "INSERT INTO t SELECT i, CASE WHEN i %% 7 = 0 THEN NULL ELSE 'n ' || i END, i / 4.0, i %% 3 = 0, "
        "CASE WHEN i %% 5 = 0 THEN NULL ELSE ARRAY['a', 'b' || i] END FROM generate_series(1, %s) i",
        (ROWS,),
    )
    h = Harness(pg_url, target, ["t"], partitions=2)
    h.backfill()
    with target.open(read_only=True) as wh:
        reader = wh.read_batches("public", "t", batch_rows=1000)
        assert isinstance(reader, pa.RecordBatchReader)
        batches = list(reader)
    assert len(batches) >= 3 and max(b.num_rows for b in batches) <= 1000
    assert all(b.schema == reader.schema for b in batches)
    assert [n.lower() for n in reader.schema.names] == ["id", "name", "amount", "flag", "tags"]  # no bookkeeping column
    got = sorted(
        (int(r["id"]), r["name"], None if r["amount"] is None else Decimal(str(r["amount"])), r["flag"], r["tags"] is None)
        for b in batches
        for r in (dict(zip([n.lower() for n in b.schema.names], row.values())) for row in b.to_pylist())
    )
    want = sorted((i, n, a, f, tags is None) for i, n, a, f, tags in pg.execute("SELECT id, name, amount, flag, tags FROM t"))
    assert got == want
