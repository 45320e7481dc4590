"""PgReplicationComponent: defs.yaml attributes validated as replication.yaml is; definitions built
from the saved catalog alone (a source that is down loads, a new table appears after a refresh
and not before, a table that does not qualify never fails the load); two sources side by side
with their own prefixes and resource keys. The CLI test runs `dg scaffold defs`, `dg utils
refresh-defs-state`, `dg check defs`, `dagster definitions validate` and `dagster asset
materialize` in a project of its own, as a user would; the rest loads the component in-process
through Dagster's own component sandbox."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import dagster as dg
import duckdb
import psycopg
import pytest
import yaml
from dagster.components.testing import create_defs_folder_sandbox

from pg_replication.dagster.assets import TableAssetTranslator
from pg_replication.dagster.component import PgReplicationComponent
from pg_replication.errors import ConfigError, SourceUnavailableError
from pg_replication_tests.conftest import fresh_database
from pg_replication_tests.operator import BIN, dagster_env, run_cli

TYPE = "pg_replication.dagster.component.PgReplicationComponent"
DOWN_URL = "postgresql://postgres@127.0.0.1:1/postgres?connect_timeout=2"  # nothing listens on port 1


class GroupBySourceTranslator(TableAssetTranslator):
    """A translator a user might write: one group per source."""

    def get_group_name(self, table):
        return f"{self.config.source.name}_tables"


@pytest.fixture
def second_db(server_url: str):
    """Another database on the test server: a second source."""
    with fresh_database(server_url) as url:
        yield url


def _items(url: str, rows: int, offset: int = 0) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, label text, price numeric(12,2))")
        conn.execute(
            "INSERT INTO items SELECT i, 'item ' || i, (i + %s) * 1.25 FROM generate_series(1, %s) i", (offset, rows)
        )


def _attributes(name: str, url_env: str, warehouse: Path, **extra) -> dict:
    return {
        "source": {"name": name, "slot": f"{name}_slot", "publication": f"{name}_pub", "pool": f"{name}_source"},
        "postgres_url_env": url_env,
        "warehouse": {"path": str(warehouse)},
        "defaults": {"partitions": 2},
        "tables": ["public.*"],
        **extra,
    }


def _refresh(sandbox, defs_path: Path) -> None:
    with sandbox.build_component_tree() as tree:
        component = tree.load_component(defs_path)
        asyncio.run(component.refresh_state(sandbox.project_root))


@pytest.fixture(autouse=True)
def _no_duckdb_override(monkeypatch):
    monkeypatch.delenv("DUCKDB_PATH", raising=False)  # each component names its own file


def test_definitions_load_from_the_saved_catalog_with_the_source_down(pg_url, tmp_path, monkeypatch):
    _items(pg_url, 10)
    monkeypatch.setenv("SHOP_URL", pg_url)
    with create_defs_folder_sandbox() as sandbox:
        defs_path = sandbox.scaffold_component(
            PgReplicationComponent, "shop", defs_yaml_contents={"type": TYPE, "attributes": _attributes("shop", "SHOP_URL", tmp_path / "w.duckdb")}
        )
        with sandbox.build_all_defs() as defs:  # nothing saved yet: no table, but the location loads
            assert not list(defs.resolve_asset_graph().get_all_asset_keys())
            assert "refresh_catalog" in defs.resolve_sensor_def("shop_cdc_sensor").description
        _refresh(sandbox, defs_path)

        monkeypatch.setenv("SHOP_URL", DOWN_URL)  # loading must not need the source
        with sandbox.build_all_defs() as defs:
            assert [k.path for k in defs.resolve_asset_graph().get_all_asset_keys()] == [["shop", "public", "items"]]
            assert defs.resolve_sensor_def("shop_cdc_sensor").required_resource_keys == {"shop_source"}
            assert {"shop_cdc_drain", "shop_retry_table", "refresh_catalog_shop"} <= {j.name for j in defs.resolve_all_job_defs()}

        with pytest.raises(SourceUnavailableError):  # a refresh while it is down fails loudly...
            _refresh(sandbox, defs_path)
        with sandbox.build_all_defs() as defs:  # ...and keeps the catalog saved before
            assert [k.path for k in defs.resolve_asset_graph().get_all_asset_keys()] == [["shop", "public", "items"]]


def test_a_new_table_appears_after_a_refresh_and_one_that_does_not_qualify_never_fails_it(pg, pg_url, tmp_path, monkeypatch):
    _items(pg_url, 10)
    monkeypatch.setenv("SHOP_URL", pg_url)
    with create_defs_folder_sandbox() as sandbox:
        defs_path = sandbox.scaffold_component(
            PgReplicationComponent, "shop", defs_yaml_contents={"type": TYPE, "attributes": _attributes("shop", "SHOP_URL", tmp_path / "w.duckdb")}
        )
        _refresh(sandbox, defs_path)
        pg.execute("CREATE TABLE orders (id int PRIMARY KEY, total numeric)")
        pg.execute("CREATE TABLE no_key (v text)")  # matches public.* but has no primary key
        with sandbox.build_all_defs() as defs:
            assert [k.path for k in defs.resolve_asset_graph().get_all_asset_keys()] == [["shop", "public", "items"]]
            # the refresh job a user runs (or schedules)
            assert defs.resolve_job_def("refresh_catalog_shop").execute_in_process().success
        with sandbox.build_all_defs() as defs:
            keys = sorted(k.path for k in defs.resolve_asset_graph().get_all_asset_keys())
            assert keys == [["shop", "public", "items"], ["shop", "public", "orders"]]
            assert "public.no_key" in defs.resolve_sensor_def("shop_cdc_sensor").description


def test_two_sources_load_side_by_side_with_their_own_keys(pg_url, second_db, tmp_path, monkeypatch):
    _items(pg_url, 5)
    _items(second_db, 5)
    monkeypatch.setenv("SHOP_URL", pg_url)
    monkeypatch.setenv("CRM_URL", second_db)
    translator = f"{__name__}.GroupBySourceTranslator"
    with create_defs_folder_sandbox() as sandbox:
        shop = sandbox.scaffold_component(
            PgReplicationComponent, "shop", defs_yaml_contents={"type": TYPE, "attributes": _attributes("shop", "SHOP_URL", tmp_path / "s.duckdb")}
        )
        crm = sandbox.scaffold_component(
            PgReplicationComponent,
            "crm",
            defs_yaml_contents={"type": TYPE, "attributes": _attributes("crm", "CRM_URL", tmp_path / "c.duckdb", translator=translator)},
        )
        _refresh(sandbox, shop)
        _refresh(sandbox, crm)
        with sandbox.build_all_defs() as defs:
            graph = defs.resolve_asset_graph()
            assert sorted(k.path for k in graph.get_all_asset_keys()) == [["crm", "public", "items"], ["shop", "public", "items"]]
            assert graph.get(dg_key("crm", "public", "items")).group_name == "crm_tables"  # the translator hook
            assert graph.get(dg_key("shop", "public", "items")).group_name == "public"
            assert {"shop_source", "shop_warehouse", "crm_source", "crm_warehouse"} <= set(defs.resources or {})
            for job in defs.resolve_all_job_defs():  # every job resolves its resources: no key collides
                assert job.resource_defs


def test_resync_of_a_component_source_clears_its_prefixed_partitions(pg_url, tmp_path, monkeypatch):
    """`pg-replication --defs <component> resync`, in a fresh process: the component's warehouse
    table is reset and its asset (key with the source prefix) shows no partition materialized."""
    _items(pg_url, 200)
    env = dagster_env(tmp_path)
    env.pop("POSTGRES_URL", None)  # the component names its own variable
    env["SHOP_URL"] = pg_url
    monkeypatch.setenv("SHOP_URL", pg_url)
    monkeypatch.chdir(tmp_path)  # the shipped dagster.yaml's storage is relative to the working directory
    key = dg_key("shop", "public", "items")
    warehouse = tmp_path / "w.duckdb"
    with create_defs_folder_sandbox() as sandbox:
        defs_path = sandbox.scaffold_component(
            PgReplicationComponent, "shop", defs_yaml_contents={"type": TYPE, "attributes": _attributes("shop", "SHOP_URL", warehouse)}
        )
        _refresh(sandbox, defs_path)
        with sandbox.build_all_defs() as defs, dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            job = defs.resolve_implicit_global_asset_job_def()
            for partition in ("000", "001"):
                assert job.execute_in_process(asset_selection=[key], partition_key=partition, instance=instance).success
            assert instance.get_materialized_partitions(key) == {"000", "001"}

        done = run_cli(["pg-replication", "--defs", str(defs_path), "resync", "public.items", "--yes"], env, tmp_path)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        assert "shop/public/items" in done.stdout  # names the asset it cleared
        with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            assert instance.get_materialized_partitions(key) == set()
        with duckdb.connect(str(warehouse), read_only=True) as wh:
            assert not wh.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'items'").fetchone()[0]


def test_attributes_fail_with_replication_yaml_messages(tmp_path):
    attributes = _attributes("shop", "SHOP_URL", tmp_path / "w.duckdb", tables=[{"name": "public.items", "partitons": 3}])
    with create_defs_folder_sandbox() as sandbox:
        sandbox.scaffold_component(PgReplicationComponent, "shop", defs_yaml_contents={"type": TYPE, "attributes": attributes})
        with pytest.raises(Exception) as raised:
            with sandbox.build_all_defs():
                pass
    causes, error = [], raised.value
    while error is not None:  # Dagster wraps the component's own error
        causes.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, ConfigError) and str(e).startswith("defs.yaml: tables.0.partitons: unknown key") for e in causes), causes


def dg_key(*path: str):
    return dg.AssetKey(list(path))


PYPROJECT = """\
[project]
name = "two_sources"
version = "0.1.0"
requires-python = ">=3.11"
dependencies = ["pg_replication"]

[tool.dg]
directory_type = "project"

[tool.dg.project]
root_module = "two_sources"
code_location_name = "two_sources"
registry_modules = ["pg_replication.dagster.component"]
"""

DEFINITIONS = """\
from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(project_root=Path(__file__).parent.parent)
"""


def _dg(args: list[str], env: dict, cwd: Path) -> str:
    out = run_cli(["dg", *args], env, cwd)
    assert out.returncode == 0, f"dg {' '.join(args)}:\n{(out.stdout + out.stderr)[-3000:]}"
    return out.stdout + out.stderr


@pytest.mark.e2e
def test_dg_scaffold_check_validate_backfill_and_drain_two_sources(pg_url, second_db, tmp_path, monkeypatch):
    """What a user does: scaffold two sources with dg, refresh their catalogs, check, validate,
    then backfill both through `dagster asset materialize`; each warehouse equals its source. Then
    changes in one source, applied by its drain job (`dagster job execute`): its warehouse equals
    it again, and the CDC materialization lands on the asset key with the source's prefix."""
    _items(pg_url, 3000)
    _items(second_db, 2000, offset=7)
    project = tmp_path / "two_sources"
    (project / "two_sources" / "defs").mkdir(parents=True)
    (project / "pyproject.toml").write_text(PYPROJECT)
    (project / "two_sources" / "__init__.py").write_text("")
    (project / "two_sources" / "defs" / "__init__.py").write_text("")
    (project / "two_sources" / "definitions.py").write_text(DEFINITIONS)
    env = {
        **dagster_env(tmp_path),
        "SHOP_URL": pg_url,
        "CRM_URL": second_db,
        "PYTHONPATH": str(project),  # the project is not installed: no network, no uv sync
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }
    env.pop("DUCKDB_PATH", None)
    env.pop("POSTGRES_URL", None)

    _dg(["scaffold", "defs", TYPE, "shop"], env, project)
    defs_dir = project / "two_sources" / "defs"
    scaffolded = yaml.safe_load((defs_dir / "shop" / "defs.yaml").read_text())
    assert scaffolded["type"] == TYPE and scaffolded["attributes"]["source"]["name"] == "shop"
    for name in ("shop", "crm"):  # the second source: the scaffolded file with its own names
        attributes = {
            **scaffolded["attributes"],
            "source": {"name": name, "slot": name, "publication": name, "pool": f"{name}_source"},
            "postgres_url_env": f"{name.upper()}_URL",
            "defaults": {"partitions": 2},
            "warehouse": {"path": str(tmp_path / f"{name}.duckdb")},
        }
        (defs_dir / name).mkdir(exist_ok=True)
        (defs_dir / name / "defs.yaml").write_text(yaml.safe_dump({"type": TYPE, "attributes": attributes}))

    _dg(["utils", "refresh-defs-state"], env, project)
    _dg(["check", "defs"], env, project)
    out = run_cli(["dagster", "definitions", "validate", "-m", "two_sources.definitions"], env, project)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]

    out = run_cli(
        ["dagster", "asset", "materialize", "-m", "two_sources.definitions", "--select", "shop/public/items,crm/public/items", "--partition-range", "000...001"],
        env,
        project,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    for name, url in (("shop", pg_url), ("crm", second_db)):
        with duckdb.connect(str(tmp_path / f"{name}.duckdb"), read_only=True) as wh:
            got = sorted(wh.execute('SELECT id, label, price FROM "public"."items"').fetchall())
        with psycopg.connect(url) as conn:
            want = sorted(conn.execute("SELECT id, label, price FROM items").fetchall())
        assert got == want and len(got) in (3000, 2000)

    # Then CDC: shop's drain job applies what changed since, onto the prefixed asset.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO items VALUES (5001, 'new', 9.99)")
        conn.execute("UPDATE items SET price = price + 1 WHERE id <= 100")
        conn.execute("DELETE FROM items WHERE id BETWEEN 200 AND 209")
    out = run_cli(["dagster", "job", "execute", "-m", "two_sources.definitions", "-j", "shop_cdc_drain"], env, project)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    with duckdb.connect(str(tmp_path / "shop.duckdb"), read_only=True) as wh:
        got = sorted(wh.execute('SELECT id, label, price FROM "public"."items"').fetchall())
    with psycopg.connect(pg_url) as conn:
        want = sorted(conn.execute("SELECT id, label, price FROM items").fetchall())
    assert got == want and len(got) == 2991
    monkeypatch.chdir(project)  # the shipped dagster.yaml's storage is relative to where the CLI ran
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        event = instance.get_latest_materialization_event(dg_key("shop", "public", "items")).asset_materialization
    counts = {k: event.metadata[k].value for k in ("inserted", "updated", "deleted")}
    assert counts == {"inserted": 1, "updated": 100, "deleted": 10}


def test_replication_yaml_loads_the_saved_catalog_when_asked(pg, pg_url, write_config, tmp_path, monkeypatch):
    """The simple path reads the source at every load by default; with PG_REPLICATION_CATALOG=saved
    it loads the last saved catalog without connecting, and the refresh job updates it."""
    from pg_replication.dagster.definitions import build_definitions

    _items(pg_url, 5)
    write_config({"tables": ["public.*"]})
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    build_definitions()  # live: reads the source and saves the catalog
    pg.execute("CREATE TABLE orders (id int PRIMARY KEY)")

    monkeypatch.setenv("PG_REPLICATION_CATALOG", "saved")
    monkeypatch.setenv("POSTGRES_URL", DOWN_URL)
    defs = build_definitions()
    assert [k.path for k in defs.resolve_asset_graph().get_all_asset_keys()] == [["public", "items"]]
    assert "unavailable" not in defs.resolve_sensor_def("postgres_cdc_sensor").description  # no connection tried

    monkeypatch.setenv("POSTGRES_URL", pg_url)
    assert defs.resolve_job_def("refresh_catalog_postgres").execute_in_process().success
    keys = sorted(k.path for k in build_definitions().resolve_asset_graph().get_all_asset_keys())
    assert keys == [["public", "items"], ["public", "orders"]]


def test_the_component_is_registered_for_dg():
    """`dg list components` / `dg scaffold defs` find it through this entry point."""
    from importlib.metadata import entry_points

    modules = {e.value for e in entry_points(group="dagster_dg_cli.registry_modules")}
    assert "pg_replication.dagster.component" in modules
