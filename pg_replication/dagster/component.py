"""``PgReplicationComponent``: one Postgres source as a Dagster Component, scaffolded with
``dg scaffold defs pg_replication.dagster.component.PgReplicationComponent <name>``.

Its ``defs.yaml`` attributes hold what replication.yaml holds (validated by the same
``ReplicationConfig``, with the same messages) plus what only a project with several sources
needs: the variable holding the source's URL, an asset key prefix and a translator. The source's
catalog is definitions state: ``dg utils refresh-defs-state`` (or the ``refresh_catalog_<source>``
job) reads it into a file, and loading builds the definitions from that file alone, so a source
that is down, or a new table that does not qualify, never removes the code location.

    type: pg_replication.dagster.component.PgReplicationComponent
    attributes:
      source: {name: shop, slot: shop_slot, publication: shop_pub}
      postgres_url_env: SHOP_POSTGRES_URL
      tables: [public.*]
"""

import asyncio
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import dagster as dg
from dagster.components import DefsStateConfig, DefsStateConfigArgs, ResolvedDefsStateConfig

from pg_replication.config import ReplicationConfig, parse_config
from pg_replication.dagster.assets import TableAssetTranslator
from pg_replication.dagster.definitions import build_definitions_from_catalog
from pg_replication.dagster.load_catalog import catalog_from_snapshot, refresh_catalog
from pg_replication.dagster.refresh import build_refresh_job
from pg_replication.dagster.resources import ResourceKeys
from pg_replication.errors import ConfigError

SCAFFOLD_YAML = """\
type: {type_name}

# What replication.yaml holds, as attributes (README, Configuration). Connections never live here.
attributes:
  source:
    name: {name}             # job, sensor, resource and pool names derive from it
    slot: {name}             # one logical replication slot per source
    publication: {name}
    pool: {name}_source
  # The environment variable holding this source's URL (EnvVar: never shown in the UI).
  postgres_url_env: POSTGRES_URL
  # Asset keys are [prefix..., schema, table]; default: [source name]. [] for none.
  # asset_key_prefix: [{name}]
  # A TableAssetTranslator subclass ("package.module.Class") to change keys, groups, metadata.
  # translator: my_project.translators.MyTranslator
  warehouse:
    kind: duckdb
    path: warehouse.duckdb   # DUCKDB_PATH overrides it
  tables:
    - public.*
  # The source's catalog is definitions state: `dg utils refresh-defs-state` (or the job
  # refresh_catalog_{name}) reads it; loading never connects to the source.
  defs_state:
    management_type: LOCAL_FILESYSTEM
    refresh_if_dev: false
"""


class PgReplicationScaffolder(dg.Scaffolder):
    """Writes a commented defs.yaml: the user edits the tables and the source's names."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        name = "".join(ch if ch.isalnum() else "_" for ch in request.target_path.name).lower() or "postgres"
        if not name[0].isalpha():
            name = f"pg_{name}"
        (request.target_path / "defs.yaml").write_text(SCAFFOLD_YAML.format(type_name=request.type_name, name=name))


def _default_state() -> DefsStateConfigArgs:
    # No refresh at load, not even under `dagster dev`: a source that is down must not take the
    # code location with it.
    return DefsStateConfigArgs.model_validate({"management_type": "LOCAL_FILESYSTEM", "refresh_if_dev": False})


@dg.scaffold_with(PgReplicationScaffolder)
@dataclass
class PgReplicationComponent(dg.StateBackedComponent, dg.Resolvable):
    """One Postgres source replicated into a warehouse: one asset per table (partitions are the
    backfill), a CDC sensor and drain job, checks, query-strategy schedules, and the
    ``refresh_catalog_<source>`` job. Subclass and override ``translator_class`` (or set the
    ``translator`` attribute) to change asset keys, groups or metadata."""

    tables: list[Any]
    source: dict[str, Any] = field(default_factory=dict)
    warehouse: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    backfill: dict[str, Any] = field(default_factory=dict)
    notifications: dict[str, Any] | None = None
    documents: list[Any] | None = None
    postgres_url_env: str = "POSTGRES_URL"
    asset_key_prefix: list[str] | None = None
    translator: str | None = None
    defs_state: ResolvedDefsStateConfig = field(default_factory=_default_state)

    translator_class: ClassVar[type[TableAssetTranslator]] = TableAssetTranslator

    @property
    def config(self) -> "ReplicationConfig":
        raw: dict[str, Any] = {"tables": self.tables}
        for key in ("source", "warehouse", "defaults", "backfill", "notifications", "documents"):
            if getattr(self, key):
                raw[key] = getattr(self, key)
        return parse_config(raw, source="defs.yaml")

    @property
    def source_name(self) -> str:
        return self.config.source.name

    @property
    def defs_state_config(self) -> DefsStateConfig:
        return DefsStateConfig.from_args(self.defs_state, default_key=f"PgReplicationComponent[{self.source_name}]")

    def get_translator(self, config: ReplicationConfig) -> TableAssetTranslator:
        prefix = [config.source.name] if self.asset_key_prefix is None else self.asset_key_prefix
        return _translator_class(self.translator, self.translator_class)(config, key_prefix=prefix)

    def write_state_to_path(self, state_path: Path) -> None:
        """Introspect the source into ``state_path`` (the catalog snapshot format). Raises when the
        source cannot be read, so the saved state stays as it was."""
        refresh_catalog(self.config, os.environ.get(self.postgres_url_env, ""), state_path)

    def build_defs_from_state(self, context: dg.ComponentLoadContext, state_path: Path | None) -> dg.Definitions:
        config = self.config
        project_root = context.project_root

        def refresh() -> str:
            asyncio.run(self.refresh_state(project_root))
            return f"refreshed the catalog of source {config.source.name}; reload the code location to see new tables"

        return build_definitions_from_catalog(
            config,
            catalog_from_snapshot(state_path),
            self.get_translator(config),
            keys=ResourceKeys.for_source(config.source.name),
            source_url_env=self.postgres_url_env,
            refresh_job=build_refresh_job(config, refresh),
        )


def load_component(path: Path) -> PgReplicationComponent:
    """The PgReplicationComponent a ``defs.yaml`` (or the folder holding it) declares, resolved
    as Dagster resolves it (its ``type`` may be a subclass): what the operator's CLI acts on."""
    import yaml

    file = path / "defs.yaml" if path.is_dir() else path
    try:
        documents = [d for d in yaml.safe_load_all(file.read_text()) if d]
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{file}: cannot read it ({exc})", hint="name a component's defs.yaml or its folder") from None
    found = []
    for document in documents:
        module_name, _, class_name = str(document.get("type", "")).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError):
            continue
        if isinstance(cls, type) and issubclass(cls, PgReplicationComponent):
            found.append(cls.resolve_from_dict(document.get("attributes") or {}))
    if len(found) != 1:
        raise ConfigError(
            f"{file}: {'declares several' if found else 'declares no'} PgReplicationComponent",
            hint="name the defs.yaml of one source (scaffolded by `dg scaffold defs`)",
        )
    return found[0]


def _translator_class(path: str | None, default: type[TableAssetTranslator]) -> type[TableAssetTranslator]:
    if path is None:
        return default
    module_name, _, class_name = path.replace(":", ".").rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"defs.yaml: translator: cannot import {path!r} ({exc})", hint="write package.module.Class") from None
    if not (isinstance(found, type) and issubclass(found, TableAssetTranslator)):
        raise ConfigError(f"defs.yaml: translator: {path!r} is not a TableAssetTranslator subclass")
    return found


__all__ = ["PgReplicationComponent", "PgReplicationScaffolder", "load_component"]
