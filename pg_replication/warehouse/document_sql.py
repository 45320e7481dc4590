"""SQL that builds nested documents from the warehouse's copies of a tree's tables, and that maps
changed rows of any table of the tree to the roots whose documents hold them.

A document is one JSON object per root row: the node's selected columns, then each child under
its name: a list (one_to_many, ordered by the child's primary key; ``[]`` when empty) or an
object (many_to_one; ``null`` when the row is missing). Each child is a correlated subquery on
its parent's row, so a document costs one probe per child table along the tree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pg_replication.replicate.document_tree import DocumentSet, Edge, Node


@dataclass(frozen=True)
class JsonFunctions:
    """A warehouse's JSON building blocks."""

    build_object: str  # f(k1, v1, k2, v2, ...)
    aggregate: str  # a JSON array of {value} ordered by {order}, over a query's rows
    empty_array: str  # the literal of []
    stored: str  # the document as stored: a format string around the built value ({})


# DuckDB's json_group_array is a macro that takes no ORDER BY: a list, ordered, as JSON.
DUCKDB_JSON = JsonFunctions("json_object", "to_json(list({value} ORDER BY {order}))", "CAST('[]' AS JSON)", "{}")
SNOWFLAKE_JSON = JsonFunctions(
    "OBJECT_CONSTRUCT_KEEP_NULL", "ARRAY_AGG({value}) WITHIN GROUP (ORDER BY {order})", "ARRAY_CONSTRUCT()", "{}"
)
POSTGRES_JSON = JsonFunctions("json_build_object", "json_agg({value} ORDER BY {order})", "CAST('[]' AS json)", "CAST({} AS jsonb)")


def string_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class DocumentSql:
    """The statements of one document set on one warehouse. ``table_of(node)`` is the quoted
    warehouse table of a node's source table."""

    def __init__(self, dset: DocumentSet, fns: JsonFunctions, ident: Callable[..., str], table_of: Callable[[Node], str]) -> None:
        self.dset, self.fns, self.ident, self.table_of = dset, fns, ident, table_of
        self._aliases = 0

    def _alias(self) -> str:
        self._aliases += 1
        return f"d{self._aliases}"

    def _join(self, edge: Edge, parent: str, child: str) -> str:
        return " AND ".join(
            f"{child}.{self.ident(c)} = {parent}.{self.ident(p)}" for p, c in zip(edge.parent_columns, edge.child_columns)
        )

    def document(self, node: Node, alias: str) -> str:
        """The JSON object of ``node``'s row ``alias``, its children nested."""
        parts = [f"{string_literal(name)}, {alias}.{self.ident(column)}" for column, name in node.columns]
        for edge in node.children:
            child = self._alias()
            inner = self.document(edge.node, child)
            source = f"FROM {self.table_of(edge.node)} {child} WHERE {self._join(edge, alias, child)}"
            if edge.kind == "list":
                order = ", ".join(f"{child}.{self.ident(k)}" for k in edge.node.key)
                aggregated = self.fns.aggregate.format(value=inner, order=order)
                value = f"COALESCE((SELECT {aggregated} {source}), {self.fns.empty_array})"
            else:
                value = f"(SELECT {inner} {source})"
            parts.append(f"{string_literal(edge.name)}, {value}")
        return f"{self.fns.build_object}({', '.join(parts)})"

    def select(self, where: str = "") -> str:
        """``SELECT <root key>, document FROM root r0 [where]``: ``r0`` is the root row."""
        keys = ", ".join(f"r0.{self.ident(k)}" for k in self.dset.root.key)
        built = self.fns.stored.format(self.document(self.dset.root, "r0"))
        return f"SELECT {keys}, {built} AS {self.ident('document')} FROM {self.table_of(self.dset.root)} r0 {where}"

    def roots_of(self, path: tuple[Edge, ...], changed: str) -> str:
        """``SELECT <root key>`` of the roots whose documents hold a row of the path's last node
        whose key is in ``changed`` (a relation with columns k0, k1, ... of that node's key),
        as the warehouse holds the tree now."""
        node, alias, joins = self.dset.root, "r0", []
        for i, edge in enumerate(path, start=1):
            child = f"r{i}"
            joins.append(f"JOIN {self.table_of(edge.node)} {child} ON {self._join(edge, alias, child)}")
            node, alias = edge.node, child
        match = " AND ".join(f"c.{self.ident(f'k{i}')} = {alias}.{self.ident(k)}" for i, k in enumerate(node.key))
        keys = ", ".join(f"r0.{self.ident(k)}" for k in self.dset.root.key)
        return (
            f"SELECT {keys} FROM {self.table_of(self.dset.root)} r0 {' '.join(joins)} "
            f"WHERE EXISTS (SELECT 1 FROM ({changed}) c WHERE {match})"
        )
