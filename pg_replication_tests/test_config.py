"""replication.yaml: every kind of bad file fails at load with a message naming the file and key."""

from __future__ import annotations

import pytest

from pg_replication.config import load_config, parse_config, split_qualified_name
from pg_replication.errors import ConfigError


def test_minimal_file_gets_defaults(tmp_path):
    path = tmp_path / "replication.yaml"
    path.write_text("tables: [public.orders, 'sales.*']\n")
    config = load_config(path)
    assert [t.name for t in config.tables] == ["public.orders", "sales.*"]
    assert config.defaults.partitions == 4
    assert config.source.slot == "pg_replication"


def test_not_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "replication.yaml"
    path.write_text("tables:\n  - name: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "not valid YAML" in str(err.value) and "line" in str(err.value)


def test_unknown_key_is_named():
    with pytest.raises(ConfigError) as err:
        parse_config({"tables": [{"name": "public.t", "partitons": 3}]})
    assert "tables.0.partitons: unknown key" in str(err.value)


def test_bad_value_is_named():
    with pytest.raises(ConfigError) as err:
        parse_config({"tables": ["public.t"], "defaults": {"partitions": 0}})
    assert "defaults.partitions" in str(err.value)


def test_empty_tables_and_wrong_top_level():
    with pytest.raises(ConfigError, match="tables"):
        parse_config({"tables": []})
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config(["public.t"])


def test_missing_file_says_how_to_point_at_one(tmp_path, monkeypatch):
    monkeypatch.setenv("PG_REPLICATION_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError) as err:
        load_config()
    assert "nope.yaml" in str(err.value) and "PG_REPLICATION_CONFIG" in str(err.value)


def test_env_expansion_and_missing_variable(monkeypatch):
    monkeypatch.setenv("WH", "/data/w.duckdb")
    config = parse_config({"tables": ["t"], "warehouse": {"path": "${WH}"}})
    assert config.warehouse.path == "/data/w.duckdb"
    assert parse_config({"tables": ["t"], "warehouse": {"path": "${NOPE_X:-d.duckdb}"}}).warehouse.path == "d.duckdb"
    with pytest.raises(ConfigError, match="NOPE_X is not set"):
        parse_config({"tables": ["t"], "warehouse": {"path": "${NOPE_X}"}})


def test_duckdb_path_env_overrides(monkeypatch):
    config = parse_config({"tables": ["t"], "warehouse": {"path": "a.duckdb"}})
    monkeypatch.setenv("DUCKDB_PATH", "b.duckdb")
    assert config.duckdb_path() == "b.duckdb"


def test_exclude_needs_a_pattern():
    with pytest.raises(ConfigError, match="only applies to a pattern"):
        parse_config({"tables": [{"name": "public.t", "exclude": ["public.x"]}]})


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("orders", ("public", "orders")),
        ("sales.orders", ("sales", "orders")),
        ('"we.ird"."ta""ble; x"', ("we.ird", 'ta"ble; x')),
        ('"Ünï cödé".t', ("Ünï cödé", "t")),
    ],
)
def test_split_qualified_name(name, parts):
    assert split_qualified_name(name) == parts


@pytest.mark.parametrize("name", ["a.b.c", '"open.t', "a.", ""])
def test_split_qualified_name_rejects(name):
    with pytest.raises(ValueError):
        split_qualified_name(name)


def test_on_schema_change_per_table_with_a_default():
    config = parse_config({"defaults": {"on_schema_change": "resync"}, "tables": ["a", {"name": "b", "on_schema_change": "fail"}]})
    assert [t.on_schema_change for t in config.tables] == ["resync", "fail"]
    assert parse_config({"tables": ["a"]}).tables[0].on_schema_change == "fail"
    with pytest.raises(ConfigError, match=r"tables\.0\.on_schema_change: Input should be 'resync' or 'fail'"):
        parse_config({"tables": [{"name": "a", "on_schema_change": "drop"}]})
    with pytest.raises(ConfigError, match=r"defaults\.on_schema_change"):
        parse_config({"defaults": {"on_schema_change": "ignore"}, "tables": ["a"]})
