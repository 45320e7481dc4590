"""The IO manager only loads inputs: a downstream asset reads a replicated table as a stream of
Arrow batches, whatever the table's size, with the same values the source holds.

Memory is measured in a fresh process (peak RSS, VmHWM reset once the code is imported, while the
IO manager's input is read to its end), on a table a few hundred times larger than a batch. Left out: the Snowflake read's
memory (fakesnow keeps every result in memory; the real connector fetches result chunks).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import duckdb
import pytest

from pg_replication.source.catalog import introspect
from pg_replication.warehouse.duckdb import DuckDBWarehouse

ROWS = 600_000
PAD = 1000  # bytes of text per row: ~580 MiB as Arrow, ~75 MiB in DuckDB's compressed file

READ_TO_THE_END = textwrap.dedent(
    """
    import json, sys
    import dagster as dg
    import pyarrow as pa
    from dagster_duckdb import DuckDBResource
    from pg_replication.dagster.io_managers import WarehouseIOManager
    from pg_replication.dagster.resources import DuckDBWarehouseResource

    def status_mib(field):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024

    manager = WarehouseIOManager(warehouse=DuckDBWarehouseResource(duckdb=DuckDBResource(database=sys.argv[1])))
    upstream = dg.build_output_context(definition_metadata={"pg_replication/schema": "shop", "pg_replication/table": "big"})
    with open("/proc/self/clear_refs", "w") as clear:  # the peak (VmHWM) restarts from here, not from the imports
        clear.write("5")
    before = status_mib("VmRSS")
    loaded = manager.load_input(dg.build_input_context(upstream_output=upstream))
    batches = loaded.to_batches() if isinstance(loaded, pa.Table) else loaded
    rows = nbytes = largest = 0
    for batch in batches:
        rows += batch.num_rows
        nbytes += batch.nbytes
        largest = max(largest, batch.num_rows)
    print(json.dumps({"rows": rows, "arrow_mib": nbytes / 2**20, "growth_mib": status_mib("VmHWM") - before, "largest_batch": largest}))
    """
)


@pytest.fixture
def big_table(pg, write_config, duckdb_path):
    """A replicated table written straight into DuckDB (the read path is what is measured)."""
    pg.execute("CREATE SCHEMA shop; CREATE TABLE shop.big (id bigint PRIMARY KEY, pad text)")
    config = write_config({"tables": [{"name": "shop.big"}]})
    (table,) = introspect(pg, config)
    with duckdb.connect(str(duckdb_path)) as conn:
        wh = DuckDBWarehouse(conn)
        wh.ensure_table(table)
        conn.execute(f"INSERT INTO {wh.table_name(table)} (id, pad) SELECT i, repeat('x', {PAD}) || i FROM range({ROWS}) r(i)")
    return duckdb_path


def test_load_input_streams_a_large_table_in_bounded_memory(big_table):
    done = subprocess.run(
        [sys.executable, "-c", READ_TO_THE_END, str(big_table)], capture_output=True, text=True, timeout=600, check=True
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["rows"] == ROWS
    # A whole-table read needs at least the table's Arrow size; a stream needs a few batches
    # plus DuckDB's buffers (~150 MiB here, whatever the table's size).
    assert found["growth_mib"] < found["arrow_mib"] / 2, found
    assert found["largest_batch"] < ROWS / 8  # many batches, each a small part of the table


DOWNSTREAM = textwrap.dedent(
    """
    import dagster as dg
    import pyarrow as pa
    import pyarrow.compute as pc

    from pg_replication.dagster.definitions import build_definitions


    @dg.asset(ins={"orders": dg.AssetIn(key=["shop", "orders"])})
    def order_totals(orders: pa.RecordBatchReader) -> dg.MaterializeResult:
        rows = batches = 0
        total = 0
        for batch in orders:
            batches += 1
            rows += batch.num_rows
            total += pc.sum(batch.column("qty")).as_py() or 0
        return dg.MaterializeResult(metadata={"rows": rows, "total_qty": total, "batches": batches})


    defs = dg.Definitions.merge(build_definitions(), dg.Definitions(assets=[order_totals]))
    """
)


@pytest.mark.e2e
def test_a_downstream_asset_reads_a_replicated_table_through_the_cli(pg, write_config, duckdb_path, tmp_path, monkeypatch):
    """`dagster asset materialize` of the table, then of an asset that consumes it, each in a fresh
    process: the consumer sees every source row, in batches."""
    import dagster as dg

    from pg_replication_tests.operator import dagster_env, materialize, run_cli

    pg.execute("CREATE SCHEMA shop; CREATE TABLE shop.orders (id bigint PRIMARY KEY, qty int)")
    pg.execute("INSERT INTO shop.orders SELECT i, i % 13 FROM generate_series(1, 20000) i")
    write_config({"tables": ["shop.orders"], "defaults": {"partitions": 2}})
    (tmp_path / "downstream_defs.py").write_text(DOWNSTREAM)
    env = {**dagster_env(tmp_path), "PYTHONPATH": str(tmp_path)}
    done = run_cli(materialize("shop/orders", "000...001"), env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_cli(["dagster", "asset", "materialize", "-m", "downstream_defs", "--select", "order_totals"], env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    monkeypatch.chdir(tmp_path)  # the shipped dagster.yaml's storage is relative to the working directory
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("order_totals"))
    metadata = {k: v.value for k, v in event.asset_materialization.metadata.items()}  # type: ignore[union-attr]
    rows, total = pg.execute("SELECT count(*), sum(qty) FROM shop.orders").fetchone()
    assert (metadata["rows"], metadata["total_qty"]) == (rows, total)
