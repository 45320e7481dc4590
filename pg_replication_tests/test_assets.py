"""The Dagster layer: asset specs (snapshot), and materializing partitions in process."""

from __future__ import annotations

import dagster as dg
import duckdb
import pytest

from pg_replication.dagster.definitions import build_definitions

FIXTURE_SQL = """
CREATE SCHEMA shop;
CREATE TABLE shop.customers (id bigint PRIMARY KEY, name text NOT NULL, balance numeric(12,2), tags text[]);
COMMENT ON TABLE shop.customers IS 'People.';
CREATE TABLE shop.order_lines (order_id bigint, line_no int, qty smallint, PRIMARY KEY (order_id, line_no));
CREATE TABLE "shop"."odd ""name""; x" (id int PRIMARY KEY);
INSERT INTO shop.customers SELECT i, 'n' || i, i / 3.0, ARRAY['a'] FROM generate_series(1, 5000) i;
"""


@pytest.fixture
def shop(pg, write_config, duckdb_path):
    pg.execute(FIXTURE_SQL)
    write_config({"tables": [{"name": "shop.*"}, ], "defaults": {"partitions": 3}})
    return build_definitions()


def _spec_summary(defs: dg.Definitions) -> list[dict]:
    out = []
    for spec in sorted(defs.resolve_all_asset_specs(), key=lambda s: s.key.to_user_string()):
        metadata = dict(spec.metadata)
        schema = metadata.pop("dagster/column_schema")
        out.append(
            {
                "key": spec.key.to_user_string(),
                "group": spec.group_name,
                "kinds": sorted(spec.kinds),
                "description": spec.description,
                "partitions": spec.partitions_def.get_partition_keys() if spec.partitions_def else None,
                "columns": [(c.name, c.type, c.constraints.nullable) for c in schema.columns],
                "metadata": {k: str(v) for k, v in sorted(metadata.items())},
            }
        )
    return out


def test_asset_specs_snapshot(shop, snapshot):
    assert _spec_summary(shop) == snapshot


def test_assets_carry_pool_and_single_run_backfill_policy(shop):
    for assets_def in [a for a in shop.resolve_asset_graph().assets_defs if a.keys]:
        assert assets_def.op.pool == "postgres_source"
        assert assets_def.backfill_policy == dg.BackfillPolicy.single_run()


def test_multi_run_backfill_policy_from_config(pg, write_config, duckdb_path):
    pg.execute(FIXTURE_SQL)
    write_config({"tables": [{"name": "shop.customers", "max_partitions_per_run": 2}]})
    (assets_def,) = [a for a in build_definitions().resolve_asset_graph().assets_defs if a.keys]
    assert assets_def.backfill_policy == dg.BackfillPolicy.multi_run(2)


def test_materialize_partitions_reports_metadata(shop, pg, duckdb_path):
    job = shop.resolve_implicit_global_asset_job_def()
    key = dg.AssetKey(["shop", "customers"])
    for partition in ["000", "001", "002"]:
        result = job.execute_in_process(asset_selection=[key], partition_key=partition)
        assert result.success
    (event,) = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert {"rows", "bytes", "seconds", "rows_per_second", "plan_lsn", "dagster/row_count"} <= set(metadata)
    assert metadata["dagster/row_count"].value == 5000
    with duckdb.connect(str(duckdb_path), read_only=True) as wh:
        got = sorted(wh.execute('SELECT id, name, balance, tags FROM "shop"."customers"').fetchall())
    want = sorted(pg.execute("SELECT id, name, balance, tags FROM shop.customers").fetchall())
    assert got == want


def test_table_name_is_the_warehouse_relation(shop, duckdb_path):
    """``dagster/table_name`` is database.schema.table as the warehouse names the relation (the
    form dbt uses), so a dbt model reading the replicated table links to its asset."""
    job = shop.resolve_implicit_global_asset_job_def()
    assert job.execute_in_process(asset_selection=[dg.AssetKey(["shop", "customers"])], partition_key="000").success
    spec = next(s for s in shop.resolve_all_asset_specs() if s.key == dg.AssetKey(["shop", "customers"]))
    with duckdb.connect(str(duckdb_path), read_only=True) as wh:
        (relation,) = wh.execute(
            "SELECT table_catalog || '.' || table_schema || '.' || table_name FROM information_schema.tables "
            "WHERE table_schema = 'shop' AND table_name = 'customers'"
        ).fetchone()
    assert spec.metadata["dagster/table_name"] == relation == "warehouse.shop.customers"


def test_a_second_build_reuses_the_table_assets_only_when_nothing_changed(shop, pg, write_config, duckdb_path, tmp_path, monkeypatch):
    """Dagster builds a code location's definitions twice per load: the second build reuses the
    first one's table assets and checks. Anything they depend on (the environment, the catalog,
    the configuration) makes a new build, never a stale one."""
    key = dg.AssetKey(["shop", "customers"])

    def table_asset(defs: dg.Definitions) -> dg.AssetsDefinition:
        return next(a for a in defs.assets if isinstance(a, dg.AssetsDefinition) and key in a.keys)

    first = table_asset(shop)
    assert table_asset(build_definitions()) is first
    monkeypatch.setenv("DUCKDB_PATH", str(tmp_path / "other.duckdb"))  # another warehouse file: another table_name
    moved = table_asset(build_definitions())
    assert moved is not first and moved.specs_by_key[key].metadata["dagster/table_name"] == "other.shop.customers"
    pg.execute("ALTER TABLE shop.customers ADD COLUMN note text")  # the catalog changed
    columns = table_asset(build_definitions()).specs_by_key[key].metadata["dagster/column_schema"].columns
    assert [c.name for c in columns][-1] == "note"
    write_config({"tables": [{"name": "shop.*"}], "defaults": {"partitions": 2}})  # the configuration changed
    assert len(table_asset(build_definitions()).partitions_def.get_partition_keys()) == 2
