"""One code location, any warehouse: replication.yaml or PG_REPLICATION_WAREHOUSE picks it, the
environment holds its connection, and assets, the drain job and checks run the same on each."""

from __future__ import annotations

import dagster as dg
import pytest

from pg_replication.config import parse_config
from pg_replication.dagster.definitions import build_definitions
from pg_replication.errors import ConfigError
from pg_replication.warehouse.connect import postgres_warehouse_url, snowflake_settings
from pg_replication_tests.replication import bare_table


@pytest.fixture
def deployment(target, monkeypatch):
    """The environment a deployment of ``target`` sets (and nothing in replication.yaml)."""
    monkeypatch.setenv("PG_REPLICATION_WAREHOUSE", target.kind)
    if target.kind == "duckdb":
        monkeypatch.setenv("DUCKDB_PATH", str(target.path))
    elif target.kind == "postgres":
        monkeypatch.setenv("WAREHOUSE_POSTGRES_URL", target.url)
    elif target.kind == "clickhouse":
        monkeypatch.setenv("CHDB_PATH", str(target.path))
    else:  # fakesnow accepts any account; the connection is made through SnowflakeResource
        # (and MERGE is off: fakesnow cannot run it in a transaction; test_snowflake.py covers it)
        for name, value in {"ACCOUNT": "acme", "USER": "loader", "PASSWORD": "pw-never-shown", "DATABASE": "PGR", "SCHEMA": "PUBLIC"}.items():
            monkeypatch.setenv(f"SNOWFLAKE_{name}", value)
    return target


def test_assets_drain_and_checks_run_on_the_chosen_warehouse(pg, write_config, deployment):
    pg.execute("CREATE TABLE orders (id int PRIMARY KEY, note text, amount numeric(10,2))")
    pg.execute("INSERT INTO orders SELECT i, 'n' || i, i / 4.0 FROM generate_series(1, 500) i")
    write_config({"tables": ["orders"], "defaults": {"partitions": 2}, "warehouse": {"merge": deployment.kind != "snowflake"}})
    defs = build_definitions()
    key = dg.AssetKey(["public", "orders"])
    spec = defs.resolve_assets_def(key).specs_by_key[key]
    assert deployment.kind in spec.kinds
    job = defs.resolve_implicit_global_asset_job_def()
    for partition in ("000", "001"):
        assert job.execute_in_process(asset_selection=[key], partition_key=partition).success
    pg.execute("UPDATE orders SET note = 'changed' WHERE id <= 20")
    pg.execute("DELETE FROM orders WHERE id > 490")
    result = defs.resolve_job_def("postgres_cdc_drain").execute_in_process()
    assert result.success
    orders = bare_table("public", "orders")
    assert deployment.rows(orders, ["id", "note", "amount"]) == pg.execute("SELECT id, note, amount FROM orders ORDER BY id").fetchall()
    parity = [k for k in defs.resolve_asset_graph().asset_check_keys if k.name == "row_count_parity"]
    with_job = dg.Definitions.merge(defs, dg.Definitions(jobs=[dg.define_asset_job("parity", selection=dg.AssetSelection.checks(*parity))]))
    (check,) = with_job.resolve_job_def("parity").execute_in_process().get_asset_check_evaluations()
    assert check.passed and check.metadata["warehouse_rows"].value == 490


def test_an_unknown_warehouse_kind_is_named(monkeypatch):
    monkeypatch.setenv("PG_REPLICATION_WAREHOUSE", "bigquery")
    with pytest.raises(ConfigError, match="PG_REPLICATION_WAREHOUSE='bigquery'.*duckdb, postgres, snowflake"):
        parse_config({"tables": ["t"]}).warehouse_kind()


def test_a_postgres_warehouse_needs_its_url_and_never_overwrites_the_source(pg_url, monkeypatch):
    config = parse_config({"tables": ["t"], "warehouse": {"kind": "postgres"}})
    monkeypatch.delenv("WAREHOUSE_POSTGRES_URL", raising=False)
    with pytest.raises(ConfigError, match="WAREHOUSE_POSTGRES_URL"):
        postgres_warehouse_url(config)
    monkeypatch.setenv("WAREHOUSE_POSTGRES_URL", pg_url)  # the source database itself
    with pytest.raises(ConfigError, match="schema_prefix"):
        postgres_warehouse_url(config)
    prefixed = parse_config({"tables": ["t"], "warehouse": {"kind": "postgres", "schema_prefix": "replica_"}})
    assert postgres_warehouse_url(prefixed) == pg_url


def test_snowflake_names_the_missing_variables(monkeypatch):
    for name in ("ACCOUNT", "USER", "DATABASE"):
        monkeypatch.delenv(f"SNOWFLAKE_{name}", raising=False)
    monkeypatch.setenv("SNOWFLAKE_ACCOUNT", "acme")
    with pytest.raises(ConfigError, match="SNOWFLAKE_USER, SNOWFLAKE_DATABASE"):
        snowflake_settings()


def test_duckdb_state_written_by_the_previous_version_is_upgraded_in_place(pg, pg_url, duckdb_path):
    import duckdb

    from pg_replication_tests.replication import Harness

    pg.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    pg.execute("INSERT INTO t SELECT i, 'a' FROM generate_series(1, 100) i")
    h = Harness(pg_url, duckdb_path, ["t"])
    h.backfill()
    h.drain_all()
    with duckdb.connect(str(duckdb_path)) as conn:  # the state as 0.1 wrote it
        conn.execute('ALTER TABLE "_pg_replication"."tables" DROP COLUMN watermark')
        conn.execute("UPDATE \"_pg_replication\".\"tables\" SET columns = replace(columns, '\"type\"', '\"duckdb\"')")
        for table, column in (("tables", "updated_at"), ("cursor", "updated_at"), ("slices", "copied_at")):
            conn.execute(f'ALTER TABLE "_pg_replication"."{table}" ALTER COLUMN {column} TYPE TIMESTAMPTZ USING to_timestamp({column})')
    pg.execute("UPDATE t SET v = 'b' WHERE id < 10")
    pg.execute("ALTER TABLE t ADD COLUMN n int DEFAULT 7")
    pg.execute("INSERT INTO t VALUES (500, 'c', 1)")
    h.drain_all()
    h.reload()
    h.assert_equal(pg, "t")
