"""A ``documents:`` set of replication.yaml resolved against the catalog: a tree of tables joined
along foreign keys, checked (tables replicated by CDC or a query strategy, columns known, no cycle), and stored as
JSON in the warehouse's state so every drain and sync can keep the documents fresh.

A node's lists are ordered by the child table's primary key: a document is a function of the
rows alone, and two builds of it compare equal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pg_replication.config import QUERY_STRATEGIES, DocumentChild, DocumentSetConfig, split_qualified_name
from pg_replication.errors import ConfigError
from pg_replication.source.catalog import Table
from pg_replication.source.foreign_keys import ForeignKey


# The strategies whose writes refresh documents in their own transaction: the drain's, and each
# sync's (warehouse/document_upkeep.py). Captured changes (triggers) are not proven there yet.
DOCUMENT_STRATEGIES = ("cdc", *QUERY_STRATEGIES)


@dataclass(frozen=True)
class Edge:
    name: str  # the child's key in its parent's document
    kind: str  # "list" (one_to_many) or "object" (many_to_one)
    parent_columns: tuple[str, ...]
    child_columns: tuple[str, ...]  # parent.parent_columns[i] = child.child_columns[i]
    node: Node


@dataclass(frozen=True)
class Node:
    schema: str
    table: str
    key: tuple[str, ...]  # the table's primary key: it orders lists and names changed rows
    columns: tuple[tuple[str, str], ...]  # (column, name in the document)
    children: tuple[Edge, ...] = ()

    @property
    def table_key(self) -> str:
        return f"{self.schema}.{self.table}"


@dataclass(frozen=True)
class DocumentSet:
    name: str
    root: Node

    def paths(self) -> list[tuple[Node, tuple[Edge, ...]]]:
        """Every node with the edges from the root down to it (the root: no edge)."""
        found: list[tuple[Node, tuple[Edge, ...]]] = []

        def walk(node: Node, path: tuple[Edge, ...]) -> None:
            found.append((node, path))
            for edge in node.children:
                walk(edge.node, (*path, edge))

        walk(self.root, ())
        return found

    def table_keys(self) -> set[str]:
        return {node.table_key for node, _ in self.paths()}

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "root": _node_dict(self.root)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DocumentSet:
        raw = json.loads(text)
        return cls(raw["name"], _node_from(raw["root"]))


def _node_dict(node: Node) -> dict:
    return {
        "schema": node.schema, "table": node.table, "key": list(node.key), "columns": [list(c) for c in node.columns],
        "children": [
            {"name": e.name, "kind": e.kind, "parent_columns": list(e.parent_columns), "child_columns": list(e.child_columns),
             "node": _node_dict(e.node)}
            for e in node.children
        ],
    }


def _node_from(raw: dict) -> Node:
    children = tuple(
        Edge(e["name"], e["kind"], tuple(e["parent_columns"]), tuple(e["child_columns"]), _node_from(e["node"]))
        for e in raw["children"]
    )
    return Node(raw["schema"], raw["table"], tuple(raw["key"]), tuple((c, n) for c, n in raw["columns"]), children)


def resolve_document_sets(
    configs: list[DocumentSetConfig], tables: list[Table], fks: list[ForeignKey] | None
) -> list[DocumentSet]:
    """The configured sets as trees. ``fks`` None (definitions load, no connection): joins not
    written in replication.yaml are left empty, everything else is checked."""
    return [_Resolver(config, tables, fks).resolve() for config in configs]


class _Resolver:
    def __init__(self, config: DocumentSetConfig, tables: list[Table], fks: list[ForeignKey] | None) -> None:
        self.config, self.fks = config, fks
        self.tables = {(t.schema, t.name): t for t in tables}
        self.where = f"documents: {config.name}"

    def fail(self, message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(f"{self.where}: {message}", hint=hint, setting=f"documents.{self.config.name}")

    def resolve(self) -> DocumentSet:
        root = self.table(self.config.root)
        # Regardless of case: DuckDB resolves quoted names so, and "Tags" would be the table tags.
        same = (root.schema.lower(), self.config.name.lower())
        clash = next((t for t in self.tables.values() if (t.schema.lower(), t.name.lower()) == same), None)
        if clash is not None:
            raise self.fail(
                f"its table {root.schema}.{self.config.name} would be the replicated table {clash.schema}.{clash.name} "
                "(names compare regardless of case, as DuckDB does); the documents' table needs a name of its own",
                hint="rename the document set",
            )
        return DocumentSet(self.config.name, self.node(root, self.config.columns, self.config.children, ()))

    def table(self, name: str) -> Table:
        schema, table_name = split_qualified_name(name)
        table = self.tables.get((schema, table_name))
        if table is None:
            raise self.fail(
                f"{schema}.{table_name} is not a replicated table",
                hint="add it to tables: (documents are built from the warehouse's copy of each table of the tree)",
            )
        if table.strategy not in DOCUMENT_STRATEGIES:
            raise self.fail(
                f"{table.schema}.{table.name} has strategy {table.strategy}: only tables drained from the slot "
                "(strategy cdc) or synced by a query (append, updated_at, reload) keep documents fresh, in the "
                "transaction of their changes",
                hint=f"set strategy: cdc for {table.schema}.{table.name}, or leave it out of the document",
            )
        return table

    def columns(self, table: Table, selected: list[str] | dict[str, str] | None) -> tuple[tuple[str, str], ...]:
        have = [c.name for c in table.columns]
        if selected is None:
            return tuple((c, c) for c in have)
        pairs = list(selected.items()) if isinstance(selected, dict) else [(c, c) for c in selected]
        unknown = [c for c, _ in pairs if c not in have]
        if unknown:
            raise self.fail(
                f"{table.schema}.{table.name} has no column {', '.join(unknown)} (excluded columns never reach the warehouse)",
                hint=f"choose among {', '.join(have)}",
            )
        return tuple(pairs)

    def node(self, table: Table, selected, children: list[DocumentChild], path: tuple[str, ...]) -> Node:
        here = f"{table.schema}.{table.name}"
        if here in path:
            raise self.fail(
                f"{' -> '.join((*path, here))} is a cycle: a document is a tree, a table cannot be its own descendant",
                hint="end the branch before it comes back to the table",
            )
        columns = self.columns(table, selected)
        edges = tuple(self.edge(table, child, (*path, here)) for child in children)
        names = [n for _, n in columns] + [e.name for e in edges]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise self.fail(f"{here}: the document names {', '.join(twice)} twice", hint="rename with columns: {column: name} or as:")
        return Node(table.schema, table.name, table.primary_key, columns, edges)

    def edge(self, parent: Table, child: DocumentChild, path: tuple[str, ...]) -> Edge:
        table = self.table(child.table)
        kind = "list" if child.relationship == "one_to_many" else "object"
        if child.foreign_key is not None:
            parent_cols, child_cols = tuple(child.foreign_key.parent), tuple(child.foreign_key.child)
            self.columns(parent, list(parent_cols))
            self.columns(table, list(child_cols))
        elif self.fks is None:
            parent_cols = child_cols = ()
        else:
            parent_cols, child_cols = self.found_join(parent, table, child.relationship)
        if kind == "object" and child_cols and set(child_cols) != set(table.primary_key):
            raise self.fail(
                f"{table.schema}.{table.name} is many_to_one under {parent.schema}.{parent.name} but joins on "
                f"{', '.join(child_cols)}, not its primary key ({', '.join(table.primary_key)}): the object would not be one row",
                hint="join on the child's primary key, or make it one_to_many",
            )
        return Edge(child.name or table.name, kind, parent_cols, child_cols, self.node(table, child.columns, child.children, path))

    def found_join(self, parent: Table, child: Table, relationship: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The join from the source's foreign keys: one_to_many, the child references the
        parent; many_to_one, the parent references the child."""
        p, c = (parent.schema, parent.name), (child.schema, child.name)
        assert self.fks is not None
        if relationship == "one_to_many":
            found = [(fk.referenced_columns, fk.columns) for fk in self.fks if fk.referencing == c and fk.referenced == p]
            direction = f"{c[0]}.{c[1]} referencing {p[0]}.{p[1]}"
        else:
            found = [(fk.columns, fk.referenced_columns) for fk in self.fks if fk.referencing == p and fk.referenced == c]
            direction = f"{p[0]}.{p[1]} referencing {c[0]}.{c[1]}"
        if len(found) != 1:
            raise self.fail(
                f"{'no' if not found else 'more than one'} foreign key {direction} in the source ({relationship})",
                hint="write the join as foreign_key: {parent: [columns], child: [columns]}",
            )
        return found[0]


__all__ = ["DocumentSet", "Edge", "Node", "resolve_document_sets"]
