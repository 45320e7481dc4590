"""A backfill does not stop CDC (issue 12, part 4): while a large table backfills through
`dagster asset materialize`, holding the source pool and the DuckDB file, a change to another,
already streaming table reaches the warehouse through a drain before the backfill ends.

The backfill is made long deterministically: a small ``backfill.max_snapshot_bytes`` cuts its one
partition into several slices, and the change waits in the slot before the run starts. No drain
run is started: only the backfill run can have applied it. The proof that it did so between two
slices, not after the last: the slot's drained position was committed after the first slice and
before the last one (their commit times in the warehouse's state).
When the slot holds nothing past what the warehouse applied, the drain between slices is skipped
(one query), and a change written since is never skipped.
Leaves out: the daemon (the drain run it queues waits for the pool, as before).
"""

from __future__ import annotations

import time

import dagster as dg
import duckdb

from pg_replication.replicate.backfill_drain import drain_between_slices
from pg_replication.replicate.cdc import DrainResult
from pg_replication.dagster.definitions import build_definitions
from pg_replication_tests.operator import dagster_env, materialize, run_cli
from pg_replication_tests.replication import Harness


def test_other_tables_stream_while_a_large_table_backfills(pg, write_config, duckdb_path, tmp_path, monkeypatch):
    pg.execute("CREATE TABLE small (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO small VALUES (1, 'before')")
    pg.execute("CREATE TABLE big (id int PRIMARY KEY, pad text)")
    pg.execute("INSERT INTO big SELECT i, repeat('b', 200) FROM generate_series(1, 4000) i")  # ~110 pages
    # 32 pages a slice: the one partition of big is 4 slices.
    write_config({"tables": ["small", "big"], "defaults": {"partitions": 1}, "backfill": {"max_snapshot_bytes": "256 KiB"}})
    job = build_definitions().resolve_implicit_global_asset_job_def()
    assert job.execute_in_process(asset_selection=[dg.AssetKey(["public", "small"])], partition_key="000").success

    pg.execute("INSERT INTO small VALUES (2, 'written before the backfill, applied during it')")
    env = dagster_env(tmp_path)
    out = run_cli(materialize("public/big", "000...000"), env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]

    with duckdb.connect(str(duckdb_path), read_only=True) as wh:
        small = wh.execute('SELECT id, v FROM "public"."small" ORDER BY id').fetchall()
        big = wh.execute('SELECT count(*) FROM "public"."big"').fetchone()[0]
        drained = wh.execute('SELECT updated_at FROM "_pg_replication"."cursor"').fetchall()
        copied = [r[0] for r in wh.execute(
            "SELECT copied_at FROM \"_pg_replication\".\"slices\" WHERE table_key = 'public.big' ORDER BY copied_at"
        ).fetchall()]
    assert small == pg.execute("SELECT id, v FROM small ORDER BY id").fetchall()
    assert big == 4000 and len(copied) >= 3
    assert drained and copied[0] < drained[0][0] < copied[-1], (copied, drained)
    # The asset of the streaming table shows the change, as a drain run would have reported it.
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    monkeypatch.chdir(tmp_path)  # dagster.yaml's storage path is relative to where the CLI ran
    with dg.DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(["public", "small"]))
    assert event is not None and "between backfill slices" in (event.asset_materialization.description or "")
    assert event.asset_materialization.metadata["inserted"].value == 1


def test_the_drain_between_slices_is_skipped_only_when_the_slot_holds_nothing(pg, pg_url, duckdb_path):
    """The drain's replication session and quiet wait cost about a third of a second per slice:
    when no WAL was written past what the warehouse applied, one query tells, and no drain runs.
    A change written since is never skipped."""
    pg.execute("CREATE TABLE small (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO small VALUES (1, 'a')")
    h = Harness(pg_url, duckdb_path, ["small"], partitions=1)
    h.backfill()
    h.drain()
    drains: list[DrainResult] = []
    warnings: list[str] = []
    with h.target.open() as wh:
        between = drain_between_slices(pg_url, wh, h.tables, h.settings, drains.append, lambda _m: None, warnings.append)
        # Nothing is written to the source now; a background WAL record (a checkpoint's) may
        # still come: then that call drains it, and a later one finds nothing.
        deadline = time.monotonic() + 120
        while True:
            before = len(drains)
            between()
            if len(drains) == before:
                break
            assert time.monotonic() < deadline, f"every drain between slices ran: {drains}"
        pg.execute("INSERT INTO small VALUES (2, 'b')")
        between()
    assert not warnings
    assert drains and drains[-1].changes == 1
    assert sorted(h.target.rows(h.table("small"), ["id", "v"])) == [(1, "a"), (2, "b")]
