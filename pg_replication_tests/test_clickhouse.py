"""ClickHouse (chDB) as the warehouse: what differs from the others.

Proves: values ClickHouse cannot hold (dates and timestamps BC, after 9999 or infinite; NaN in a
Decimal) fail the slice, or the table in CDC, naming table, column, key and value, with nothing of
the slice written and other tables going on; a replayed drain adds versions, never rows (the raw
table holds one version per write, a read under FINAL one row per key); and the operator's path:
`dagster asset materialize` then `dagster job execute` of the drain job in fresh processes, with
`warehouse.kind: clickhouse`; server settings reach Dagster as EnvVar names. The shared backfill, CDC, TOAST, crash and convergence tests run on
ClickHouse too (targets.CLICKHOUSE_MODULES). Leaves out: a ClickHouse server (none runs here; see
README, ClickHouse).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pg_replication.errors import WarehouseError
from pg_replication_tests.operator import dagster_env, drain, materialize, run_cli
from pg_replication_tests.test_exactly_once import drain_in_subprocess
from pg_replication_tests.replication import Harness, bare_table
from pg_replication_tests.targets import ClickHouseTarget

# Postgres type -> (a literal ClickHouse cannot hold, how the message shows it)
UNHELD = {
    "date": ("'infinity'", "infinity"),
    "timestamp": ("'0044-03-15 12:00:00 BC'", "0044-03-15 12:00:00 BC"),
    "timestamptz": ("'10000-01-01 00:00:00+00'", "10000-01-01 00:00:00+00"),
    "numeric(6,2)": ("'NaN'", "NaN"),
}


@pytest.fixture
def target(tmp_path: Path) -> ClickHouseTarget:
    return ClickHouseTarget(tmp_path / "warehouse.chdb")


def _far_and_near(pg, pg_type: str) -> None:
    pg.execute(f"CREATE TABLE far (id int PRIMARY KEY, v {pg_type})")
    pg.execute("INSERT INTO far SELECT i, NULL FROM generate_series(1, 50) i")
    pg.execute("CREATE TABLE near (id int PRIMARY KEY, v int)")


def _names_the_value(message: str, shown: str) -> None:
    assert '"public"."far"' in message or "public.far" in message, message
    assert "column v" in message and "(id)=(4242)" in message and shown in message, message


@pytest.mark.parametrize("pg_type", list(UNHELD))
def test_value_clickhouse_cannot_hold_fails_the_slice_naming_column_key_and_value(pg, pg_url, target, pg_type):
    literal, shown = UNHELD[pg_type]
    _far_and_near(pg, pg_type)
    pg.execute(f"INSERT INTO far VALUES (4242, {literal})")
    pg.execute("INSERT INTO near VALUES (1, 1)")
    h = Harness(pg_url, target, ["far", "near"], partitions=1)
    with pytest.raises(WarehouseError) as err:
        h.backfill("far")
    _names_the_value(str(err.value), shown)
    assert target.rows(bare_table("public", "far"), ["id"]) == []  # nothing of the slice written
    h.backfill("near")  # only that table stops
    assert target.rows(bare_table("public", "near"), ["id", "v"]) == [(1, 1)]


@pytest.mark.parametrize("pg_type", ["date", "numeric(6,2)"])
def test_value_clickhouse_cannot_hold_fails_that_table_in_cdc_naming_column_key_and_value(pg, pg_url, target, pg_type):
    literal, shown = UNHELD[pg_type]
    _far_and_near(pg, pg_type)
    h = Harness(pg_url, target, ["far", "near"])
    h.backfill()
    pg.execute(f"INSERT INTO far VALUES (4242, {literal})")
    pg.execute("INSERT INTO near VALUES (1, 1)")
    (result,) = h.drain_all()
    far = result.tables["public.far"]
    assert far.mode == "failed"
    _names_the_value(far.error, shown)
    assert result.tables["public.near"].mode == "applied"
    h.assert_equal(pg, "near")
    assert 4242 not in [r[0] for r in target.rows(bare_table("public", "far"), ["id"])]


def test_replayed_drain_adds_versions_never_rows(pg, pg_url, target):
    pg.execute("CREATE TABLE t (id int PRIMARY KEY, n int)")
    pg.execute("INSERT INTO t SELECT i, 0 FROM generate_series(1, 100) i")
    h = Harness(pg_url, target, ["t"])
    h.backfill()
    pg.execute("UPDATE t SET n = n + 1 WHERE id <= 10")
    pg.execute("DELETE FROM t WHERE id > 95")
    # Killed after writing the data, before the drained position: the re-run writes it all again.
    assert drain_in_subprocess(h, "mid_apply") == -9
    h.drain_all()
    h.assert_equal(pg, "t")
    with target.open(read_only=True) as wh:
        versions = wh.fetchall('SELECT count() FROM "public"."t" SETTINGS final = 0')[0][0]
    assert versions == 100 + 2 * (10 + 5)  # the slices' rows, then one version per change and write


@pytest.mark.e2e
def test_operator_backfills_and_drains_into_clickhouse(pg, tmp_path, monkeypatch):
    pg.execute("CREATE TABLE orders (id int PRIMARY KEY, amount numeric(40,2), placed timestamptz, tags text[])")
    pg.execute(
        "INSERT INTO orders SELECT i, i * 1.25, '2024-01-01'::timestamptz + i * interval '1 hour', ARRAY['a', NULL] "
        "FROM generate_series(1, 2000) i"
    )
    path = tmp_path / "warehouse.chdb"
    config = tmp_path / "replication.yaml"
    config.write_text(yaml.safe_dump({"tables": ["public.orders"], "defaults": {"partitions": 2},
                                      "warehouse": {"kind": "clickhouse", "path": str(path)}}))
    env = {**dagster_env(tmp_path), "PG_REPLICATION_CONFIG": str(config)}
    out = run_cli(materialize("public/orders", "000...001"), env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    pg.execute("UPDATE orders SET amount = 12345678901234567890123456789012345678.99 WHERE id = 7")
    pg.execute("DELETE FROM orders WHERE id > 1990")
    pg.execute("INSERT INTO orders VALUES (5000, NULL, '0001-01-01 00:00:00+00', NULL)")
    out = run_cli(drain(), env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    target = ClickHouseTarget(path)
    table = bare_table("public", "orders")
    source = pg.execute("SELECT id, amount, placed, tags::text FROM orders ORDER BY id").fetchall()
    with target.open(read_only=True) as wh:
        stored = wh.fetchall('SELECT id, amount, placed, tags FROM "public"."orders" FINAL ORDER BY id')
    assert len(stored) == len(source) == 1991
    for (sid, samount, splaced, stags), (wid, wamount, wplaced, wtags) in zip(source, stored):
        assert (sid, samount, splaced) == (wid, wamount, wplaced)
        assert (stags is None) == (wtags is None)
    assert target.rows(table, ["id"])[-1] == (5000,)


def test_server_settings_reach_dagster_as_env_var_names(monkeypatch):
    import dagster as dg

    from pg_replication.config import parse_config
    from pg_replication.dagster.definitions import build_warehouse_resource
    from pg_replication.dagster.resources_clickhouse import ClickHouseWarehouseResource

    monkeypatch.setenv("CLICKHOUSE_HOST", "ch.internal")
    monkeypatch.setenv("CLICKHOUSE_PORT", "8443")
    monkeypatch.setenv("CLICKHOUSE_PASSWORD", "s3cret")
    config = parse_config({"tables": ["t"], "warehouse": {"kind": "clickhouse"}})
    resource = build_warehouse_resource(config)
    assert isinstance(resource, ClickHouseWarehouseResource) and resource.path is None
    assert "s3cret" not in repr(resource.__dict__)  # names only: the value is read at run time
    assert isinstance(resource.__dict__["password"], dg.EnvVar) and resource.__dict__["password"] == "CLICKHOUSE_PASSWORD"
    monkeypatch.delenv("CLICKHOUSE_HOST")
    embedded = build_warehouse_resource(parse_config({"tables": ["t"], "warehouse": {"kind": "clickhouse", "path": "/data/wh"}}))
    assert embedded.path == "/data/wh"
