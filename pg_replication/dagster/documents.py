"""One asset per document set of replication.yaml (README, Documents): downstream of its tables'
assets; materializing it builds every document in the warehouse (``<root schema>.<name>``) and
stores the set's tree, after which each drain keeps the documents fresh and reports how many it
recomputed as a materialization of this asset (jobs.py)."""

import dagster as dg

from pg_replication.config import DocumentSetConfig, ReplicationConfig, split_qualified_name
from pg_replication.dagster.assets import TableAssetTranslator, dagster_name, document_asset_key
from pg_replication.dagster.resources import PostgresSource, ResourceKeys, WarehouseResource
from pg_replication.errors import ConfigError
from pg_replication.replicate.document_tree import resolve_document_sets
from pg_replication.source.catalog import Table
from pg_replication.source.foreign_keys import foreign_keys
from pg_replication.warehouse.connect import table_location


def _tree_tables(document: DocumentSetConfig) -> list[tuple[str, str]]:
    found = [split_qualified_name(document.root)]
    todo = list(document.children)
    while todo:
        child = todo.pop(0)
        found.append(split_qualified_name(child.table))
        todo.extend(child.children)
    return list(dict.fromkeys(found))


def build_document_assets(
    config: ReplicationConfig,
    tables: list[Table],
    translator: TableAssetTranslator,
    keys: ResourceKeys,
    unavailable: set[str] = frozenset(),  # type: ignore[assignment]
    outage: bool = False,
) -> list[dg.AssetsDefinition]:
    """A mistake in ``documents:`` fails the load, naming the key. When the source is down at
    load (``outage``) or a table of the tree cannot be replicated now (``unavailable``), the
    asset is still defined (the code location stays) and its materialization says what is wrong."""
    by_name = {(t.schema, t.name): t for t in tables}
    assets = []
    for document in config.documents:
        tree = _tree_tables(document)
        problem = None
        try:
            resolve_document_sets([document], tables, None)  # all but the joins taken from foreign keys
        except ConfigError as exc:
            if not outage and not any(f"{s}.{t}" in unavailable for s, t in tree):
                raise
            problem = exc.message
        assets.append(_document_asset(config, document, [by_name[t] for t in tree if t in by_name], translator, keys, problem))
    return assets


def _document_asset(
    config: ReplicationConfig,
    document: DocumentSetConfig,
    tree: list[Table],
    translator: TableAssetTranslator,
    keys: ResourceKeys,
    problem: str | None,
) -> dg.AssetsDefinition:
    schema, root = split_qualified_name(document.root)
    key = document_asset_key(translator, document)
    description = (
        f"Nested documents of {schema}.{root} with {', '.join(f'{s}.{t}' for s, t in _tree_tables(document)[1:]) or 'no children'}, "
        f"one JSON document per {schema}.{root} row, kept fresh by the CDC drain."
    )
    spec = dg.AssetSpec(
        key=key,
        deps=[translator.get_asset_key(t) for t in tree],
        group_name=translator.get_group_name(tree[0]) if tree else dagster_name(schema),
        description=f"{problem}\n\n{description}" if problem else description,
        kinds={translator.warehouse_kind, "json"},
        metadata={
            "dagster/table_name": table_location(config, schema, document.name),
            "pg_replication/document_root": f"{schema}.{root}",
        },
    )

    # ClickHouse has no locks to make a build wait for a drain in flight (the other warehouses do):
    # on a server, the source pool (limit 1) keeps them apart, as it does the drains and slices.
    pool = config.source.pool if translator.warehouse_kind == "clickhouse" else None

    @dg.multi_asset(specs=[spec], name="_".join(key.path), required_resource_keys={keys.source, keys.warehouse}, pool=pool)
    def documents(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        source: PostgresSource = getattr(context.resources, keys.source)
        warehouse: WarehouseResource = getattr(context.resources, keys.warehouse)
        if problem:
            raise ConfigError(problem)
        with source.connect() as conn:  # the joins replication.yaml leaves to the source's foreign keys
            fks = foreign_keys(conn, set(_tree_tables(document)))
        (dset,) = resolve_document_sets([document], tree, fks)
        with warehouse.open() as wh:
            count = wh.materialize_documents(dset)
        context.log.info(f"built {count:,} documents of {document.name}; each CDC drain keeps them fresh from now on")
        return dg.MaterializeResult(metadata={"documents": count, "dagster/row_count": count})

    return documents
