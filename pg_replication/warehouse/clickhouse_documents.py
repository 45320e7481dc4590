"""Nested documents on ClickHouse: built with joins, stored as versioned rows, refreshed by each
drain in writes that are safe to repeat (ClickHouse has no transaction to hold them with the changes).

- **The build** (``ClickHouseDocumentSql``) goes bottom-up: each child table's documents are
  grouped by their join columns (a list ordered by the child's primary key, through
  ``arraySort`` over ``groupArray``) and LEFT JOINed to the parent's rows. ClickHouse cannot
  correlate a subquery inside an aggregate, which the other warehouses' nested subqueries need.
  A refresh restricts every level to the rows under the roots it rebuilds (``IN`` subqueries down
  the tree). Each table is read as of its latest version (the session reads with ``final = 1``).
- **The documents table** is a ``ReplacingMergeTree(_pg_version, _pg_deleted)`` ordered by the
  root key, like a replicated table: a rebuilt document is a new version, a document whose root is
  gone a deleted version. Readers query it with ``FINAL``. A drain writes its documents at its
  own versions (``L * 2^16 + n``, after its data), a full build above every version there.
- **A drain's refresh** maps the batch's changed keys to roots before the changes (into the set's
  keys table) and after them, then writes the documents of those roots and only then empties the
  keys table. A drain killed anywhere before its position is written is replayed: roots the killed
  attempt mapped are still in the keys table (the replay finds the tree changed already and maps
  only the new side), its data writes deduplicate, and its documents are built again from the
  same rows. A TRUNCATE of a table of the tree rebuilds the whole set.
"""

from __future__ import annotations

import json
import time

from pg_replication.failpoints import failpoint
from pg_replication.replicate.document_tree import DocumentSet, Edge, Node
from pg_replication.warehouse.documents import DocumentRefresh

# The documents table's version columns, named as the replicated tables' are.
VERSION, DELETED = "_pg_version", "_pg_deleted"


def _literal(text: str) -> str:
    # ClickHouse reads backslashes in string literals as escapes.
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _value(expression: str, column_type: str) -> str:
    """A column's JSON text as Postgres's ``json_build_object`` writes it where ClickHouse can tell:
    a timestamp as ``2024-01-02T03:04:05.5`` (ClickHouse keeps timestamptz as UTC without its
    zone), a float's NaN and infinities as strings; otherwise ClickHouse's ``toJSONString``.
    ``null`` for NULL."""
    if column_type == "bytea":  # Postgres's hex text: the bytes themselves need not be UTF-8
        return f"ifNull(toJSONString(concat('\\\\x', lower(hex({expression})))), 'null')"
    if "DateTime" in column_type:
        text = rf"replaceRegexpOne(replaceOne(toString({expression}), ' ', 'T'), '\\.?0+$', '')"
        return f"ifNull(toJSONString({text}), 'null')"
    if "Float" in column_type:
        e = expression
        return (
            f"ifNull(multiIf(isNaN({e}), '\"NaN\"', isInfinite({e}), if({e} > 0, '\"Infinity\"', '\"-Infinity\"'), "
            f"toJSONString({e})), 'null')"
        )
    return f"ifNull(toJSONString({expression}), 'null')"


class ClickHouseDocumentSql:
    """The statements of one document set on ClickHouse. ``table_of(node)`` is the quoted table."""

    def __init__(self, dset: DocumentSet, ident, table_of, column_types: dict[tuple[str, str], dict[str, str]]) -> None:
        """``column_types``: (source schema, table) -> column -> its ClickHouse type."""
        self.dset, self.ident, self.table_of, self.column_types = dset, ident, table_of, column_types
        self._aliases = 0

    def _alias(self, prefix: str) -> str:
        self._aliases += 1
        return f"{prefix}{self._aliases}"

    def _tuple(self, alias: str, columns) -> str:
        return "(" + ", ".join(f"{alias}.{self.ident(c)}" for c in columns) + ")"

    def _relation(self, node: Node, join_columns: tuple[str, ...], restrict) -> str:
        """``SELECT j0.., k0.., doc`` of the node's rows (``restrict(alias)``: a condition, or
        None for every row): its join columns to the parent, its key, its JSON object."""
        t = self._alias("t")
        types = self.column_types.get((node.schema, node.table), {})
        parts = [(name, _value(f"{t}.{self.ident(column)}", types.get(column, ""))) for column, name in node.columns]
        joins = []
        for edge in node.children:
            c = self._alias("c")
            below = None if restrict is None else self._below(node, edge, restrict)
            inner = self._relation(edge.node, edge.child_columns, below)
            groups = ", ".join(f"j{i}" for i in range(len(edge.child_columns)))
            if edge.kind == "list":
                keys = ", ".join(f"k{i}" for i in range(len(edge.node.key)))
                aggregated = (
                    f"SELECT {groups}, concat('[', arrayStringConcat(arrayMap(x -> x.2, arraySort(x -> x.1, "
                    f"groupArray(tuple(tuple({keys}), doc)))), ','), ']') AS doc FROM ({inner}) GROUP BY {groups}"
                )
                empty = "'[]'"
            else:  # many_to_one joins on the child's primary key: one row at most
                aggregated, empty = f"SELECT {groups}, doc FROM ({inner})", "'null'"
            on = " AND ".join(f"{c}.j{i} = {t}.{self.ident(p)}" for i, p in enumerate(edge.parent_columns))
            joins.append(f"LEFT JOIN ({aggregated}) {c} ON {on}")
            parts.append((edge.name, f"ifNull({c}.doc, {empty})"))
        # {"name":value,...}: each name's JSON text is a constant, each value rendered per row
        pieces = ", ".join(f"{_literal(('{' if i == 0 else ',') + json.dumps(name) + ':')}, {value}" for i, (name, value) in enumerate(parts))
        document = f"concat({pieces}, '}}')" if parts else "'{}'"
        columns = [f"{t}.{self.ident(c)} AS j{i}" for i, c in enumerate(join_columns)]
        columns += [f"{t}.{self.ident(k)} AS k{i}" for i, k in enumerate(node.key)]
        where = "" if restrict is None else f" WHERE {restrict(t)}"
        return f"SELECT {', '.join(columns)}, {document} AS doc FROM {self.table_of(node)} {t} {' '.join(joins)}{where}"

    def _below(self, parent: Node, edge: Edge, restrict):
        """The restriction of ``edge``'s child rows to those under the restricted parent rows."""
        def condition(alias: str) -> str:
            x = self._alias("x")
            return (
                f"{self._tuple(alias, edge.child_columns)} IN (SELECT {', '.join(f'{x}.{self.ident(p)}' for p in edge.parent_columns)} "
                f"FROM {self.table_of(parent)} {x} WHERE {restrict(x)})"
            )

        return condition

    def select(self, roots: str | None = None) -> str:
        """``SELECT <root key>, document``: every document, or those whose root key is in the
        relation ``roots`` (columns named as the root's key)."""
        key = self.dset.root.key
        restrict = None
        if roots is not None:
            restrict = lambda alias: f"{self._tuple(alias, key)} IN (SELECT {', '.join(self.ident(k) for k in key)} FROM {roots})"  # noqa: E731
        names = ", ".join(f"r.k{i} AS {self.ident(k)}" for i, k in enumerate(key))
        return f"SELECT {names}, r.doc AS {self.ident('document')} FROM ({self._relation(self.dset.root, (), restrict)}) r"

    def roots_of(self, path: tuple[Edge, ...], changed: str) -> str:
        """``SELECT <root key>`` of the roots whose documents hold a row of the path's last node
        whose key is in ``changed`` (columns k0, k1, ...), as the warehouse holds the tree now:
        from those rows up to the root, each level an ``IN`` on the one below (the rows found
        by their keys, not a join that reads every table of the path whole)."""
        nodes = [self.dset.root, *(edge.node for edge in path)]
        changed_keys = ", ".join(f"c.{self.ident(f'k{i}')}" for i in range(len(nodes[-1].key)))
        rows = f"SELECT {changed_keys} FROM ({changed}) c"  # the last node's rows, by their key
        columns: tuple[str, ...] = nodes[-1].key
        for depth in range(len(path), 0, -1):  # the rows of nodes[depth] are ``columns`` IN ``rows``
            edge, node = path[depth - 1], nodes[depth]
            x = self._alias("u")
            rows = (
                f"SELECT {', '.join(f'{x}.{self.ident(c)}' for c in edge.child_columns)} FROM {self.table_of(node)} {x} "
                f"WHERE {self._tuple(x, columns)} IN ({rows})"
            )
            columns = edge.parent_columns
        keys = ", ".join(f"r0.{self.ident(k)}" for k in self.dset.root.key)
        return f"SELECT {keys} FROM {self.table_of(self.dset.root)} r0 WHERE {self._tuple('r0', columns)} IN ({rows})"


class ClickHouseDocumentRefresh(DocumentRefresh):
    """A drain's refresh whose roots outlive a killed attempt (module docstring)."""

    def before(self) -> None:
        # No emptying of the keys table first: what a killed attempt mapped is still needed.
        for dset, built, mapped in self.work:
            self._guarded(dset, lambda dset=dset, built=built, mapped=mapped: self._map(dset, built, mapped))

    def finish(self) -> dict[str, int]:
        failpoint("before_documents")  # the crash tests kill a drain here: data written, documents not
        return super().finish()

    def _recompute(self, dset: DocumentSet, built, mapped) -> int:
        wh = self.wh
        keys_table = wh._keys_table(dset)
        if mapped is not None:
            self._map(dset, built, mapped)
        # The drain's next version: above its data writes, the same in a replay of it.
        touched = wh.write_documents(dset, built, wh._next_version(), None if mapped is None else keys_table)
        wh.execute(f"TRUNCATE TABLE {keys_table}")  # only now: a kill before leaves the roots mapped
        if mapped is None:  # built whole: fresh again, only now that its documents are written
            wh.execute(f"UPDATE {wh.state('documents')} SET stale = NULL WHERE name = ?", [dset.name])
        return touched


class ClickHouseDocuments:
    """Mixed into ``ClickHouseWarehouse`` ahead of the engine's ``DocumentStore``."""

    builds_documents = True
    document_extra_columns = (VERSION, DELETED)
    document_refresh_class = ClickHouseDocumentRefresh

    def _document_sql(self, dset: DocumentSet) -> ClickHouseDocumentSql:
        nodes = {(self.schema_prefix + n.schema, n.table): (n.schema, n.table) for n, _ in dset.paths()}  # type: ignore[attr-defined]
        marks = ", ".join("?" for _ in nodes)
        rows = self.fetchall(  # type: ignore[attr-defined]
            f"SELECT database, table, name, type FROM system.columns WHERE (database, table) IN ({marks})", [tuple(k) for k in nodes]
        )
        types: dict[tuple[str, str], dict[str, str]] = {}
        for database, table, name, column_type in rows:
            types.setdefault(nodes[(database, table)], {})[name] = column_type
        for node, _ in dset.paths():  # bytea is a String like text: its load (unhex) tells it apart
            for name, stored in self.stored_columns(node.table_key).items():  # type: ignore[attr-defined]
                if (stored.get("load") or "").startswith("unhex("):
                    types.setdefault((node.schema, node.table), {})[name] = "bytea"
        return ClickHouseDocumentSql(dset, self.ident, self._node_table, types)  # type: ignore[attr-defined]

    def materialize_documents(self, dset: DocumentSet) -> int:
        """Build every document, above every version the set's table holds, then store the set's
        definition: from then on each drain keeps them fresh. Returns the number of documents."""
        wh = self
        built = self._document_sql(dset)
        wh._require_tree(dset)  # type: ignore[attr-defined]
        wh._refuse_foreign_table(dset)  # type: ignore[attr-defined]
        wh.create_schema(wh.document_schema(dset))  # type: ignore[attr-defined]
        if wh._stale_document_tables(dset):  # type: ignore[attr-defined]
            wh.execute(f"DROP TABLE {wh.document_table(dset)}")  # type: ignore[attr-defined]
            wh.execute(f"DROP TABLE IF EXISTS {wh._keys_table(dset)}")  # type: ignore[attr-defined]
        root, ident = wh._node_table(dset.root), wh.ident  # type: ignore[attr-defined]
        keys = ", ".join(ident(k) for k in dset.root.key)
        wh.execute(
            f"CREATE TABLE IF NOT EXISTS {wh.document_table(dset)} "  # type: ignore[attr-defined]
            f"ENGINE = ReplacingMergeTree({ident(VERSION)}, {ident(DELETED)}) ORDER BY ({keys}) "
            f"AS SELECT {keys}, '' AS {ident('document')}, toUInt64(0) AS {ident(VERSION)}, toUInt8(0) AS {ident(DELETED)} "
            f"FROM {root} WHERE 0"
        )
        wh.execute(f"CREATE TABLE IF NOT EXISTS {wh._keys_table(dset)} ENGINE = MergeTree ORDER BY tuple() AS SELECT {keys} FROM {root} WHERE 0")  # type: ignore[attr-defined]
        rows = wh.fetchall(f"SELECT max({ident(VERSION)}) FROM {wh.document_table(dset)} SETTINGS final = 0")  # type: ignore[attr-defined]
        count = self.write_documents(dset, built, int(rows[0][0] or 0) + 1, None)
        # After the documents: a build killed before this line left no set for drains to refresh.
        wh._upsert_state("documents", {"name": dset.name}, {"definition": dset.to_json(), "updated_at": time.time(), "error": None, "stale": None})  # type: ignore[attr-defined]
        return count

    def write_documents(self, dset: DocumentSet, built: ClickHouseDocumentSql, version: int, roots: str | None) -> int:
        """The documents of the roots in ``roots`` (None: of every root) at ``version``; a
        deleted version for each of them whose root is gone. Returns how many roots."""
        wh, ident = self, self.ident  # type: ignore[attr-defined]
        table, root = wh.document_table(dset), wh._node_table(dset.root)  # type: ignore[attr-defined]
        keys = ", ".join(ident(k) for k in dset.root.key)
        names = f"{keys}, {ident('document')}, {ident(VERSION)}, {ident(DELETED)}"
        wh.execute(f"INSERT INTO {table} ({names}) SELECT {keys}, {ident('document')}, {version}, 0 FROM ({built.select(roots)})")  # type: ignore[attr-defined]
        among = f"({keys}) IN (SELECT {keys} FROM {roots})" if roots is not None else "1"
        wh.execute(  # type: ignore[attr-defined]
            f"INSERT INTO {table} ({names}) SELECT {keys}, '', {version}, 1 FROM {table} "
            f"WHERE {among} AND ({keys}) NOT IN (SELECT {keys} FROM {root} WHERE {among})"
        )
        if roots is None:
            return int(wh.fetchall(f"SELECT count() FROM {table}")[0][0])  # type: ignore[attr-defined]
        return int(wh.fetchall(f"SELECT count() FROM (SELECT DISTINCT {keys} FROM {roots})")[0][0])  # type: ignore[attr-defined]
