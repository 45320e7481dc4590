"""Nested documents in the warehouse: a full build (the document asset), and the refresh inside a
drain's transaction that recomputes only the documents its changes touched.

A set's definition (replicate/document_tree.py) is stored in the state table ``documents`` when
the set is materialized, so every drain, whichever job or session runs it, keeps the set fresh
from then on. A drain refreshes a set in its own transaction:

1. before the changes are applied, it maps every changed row (the batch's old and new keys of
   each table of the tree) to the roots whose documents hold it, as the warehouse holds the tree:
   a deleted or moved child still reaches its old root, though pgoutput's old image has only its key;
2. the changes are applied;
3. it maps them again (new rows, new parents), then deletes the documents of the union of those
   roots and builds again those whose root row exists.

A TRUNCATE of any table of the tree rebuilds the whole set. A full build waits for the drains
applying to any table of the tree on the tables' state rows (its first build included, when no
drain knows the set yet), and drains wait for it there.
"""

from __future__ import annotations

import hashlib
import time

from pg_replication.errors import PgReplicationError
from pg_replication.replicate.document_tree import DocumentSet, Node
from pg_replication.warehouse import staging
from pg_replication.warehouse.base import STATE_SCHEMA
from pg_replication.warehouse.document_sql import DocumentSql, JsonFunctions


class DrainOutcomes(dict):
    """A drain's outcome per table (``TableOutcome``), ``documents``: set name -> documents the
    drain recomputed, and ``document_problems``: set name -> why it left them as they were."""

    def __init__(self, outcomes=(), documents: dict[str, int] | None = None, document_problems: dict[str, str] | None = None) -> None:
        super().__init__(outcomes)
        self.documents = documents or {}
        self.document_problems = document_problems or {}


class DocumentStore:
    """Mixed into ``engine.SqlWarehouse``: uses its dialect hooks and the other parts."""

    json_functions: JsonFunctions | None = None  # None: this warehouse cannot build documents
    # Index the join columns of the tree's tables (a Postgres replica: without them each child
    # probe scans its table; DuckDB decorrelates the probes into hash joins).
    document_join_indexes = False

    # -- names ------------------------------------------------------------------------------

    def _node_table(self, node: Node) -> str:
        return self.ident(self.schema_prefix + node.schema, node.table)  # type: ignore[attr-defined]

    def document_schema(self, dset: DocumentSet) -> str:
        return self.schema_prefix + dset.root.schema  # type: ignore[attr-defined]

    def document_table(self, dset: DocumentSet) -> str:
        """``<root's warehouse schema>.<set name>``: one row per root key, with ``document``."""
        return self.ident(self.document_schema(dset), dset.name)  # type: ignore[attr-defined]

    def _keys_table(self, dset: DocumentSet) -> str:
        return self.state(f"document_keys.{dset.name}")  # type: ignore[attr-defined]

    def _document_sql(self, dset: DocumentSet) -> DocumentSql:
        if self.json_functions is None:
            raise PgReplicationError(
                f"documents {dset.name}: the {self.name} warehouse cannot build nested documents yet",  # type: ignore[attr-defined]
                hint="build documents on duckdb, postgres or snowflake (README, Documents)",
            )
        return DocumentSql(dset, self.json_functions, self.ident, self._node_table)  # type: ignore[attr-defined]

    # -- a full build -----------------------------------------------------------------------

    def materialize_documents(self, dset: DocumentSet) -> int:
        """Store the set's definition and build every document again, in one transaction; from
        then on each drain keeps them fresh. Returns the number of documents."""
        built = self._document_sql(dset)
        missing = [n.table_key for n, _ in dset.paths() if self.physical_columns(self.schema_prefix + n.schema, n.table) is None]  # type: ignore[attr-defined]
        if missing:
            raise PgReplicationError(
                f"documents {dset.name}: {', '.join(sorted(set(missing)))} not in the warehouse yet",
                hint="materialize (backfill) the tables of the tree first, then the documents",
            )
        self.create_schema(self.document_schema(dset))  # type: ignore[attr-defined]
        root = self._node_table(dset.root)
        keys = ", ".join(self.ident(k) for k in dset.root.key)  # type: ignore[attr-defined]
        # Outside the transaction, idempotent (Snowflake commits on DDL): typed like the root's key.
        # A set whose root (key) changed since its last build gets its tables anew.
        shape = [self.fold(c) for c in (*dset.root.key, "document")]  # type: ignore[attr-defined]
        have = self.physical_columns(self.document_schema(dset), dset.name)  # type: ignore[attr-defined]
        if have is not None and have != shape:
            self.execute(f"DROP TABLE {self.document_table(dset)}")  # type: ignore[attr-defined]
            self.execute(f"DROP TABLE IF EXISTS {self._keys_table(dset)}")  # type: ignore[attr-defined]
        self.execute(f"CREATE TABLE IF NOT EXISTS {self.document_table(dset)} AS {built.select('WHERE 1 = 0')}")  # type: ignore[attr-defined]
        self.execute(f"CREATE TABLE IF NOT EXISTS {self._keys_table(dset)} AS SELECT {keys} FROM {root} WHERE 1 = 0")  # type: ignore[attr-defined]
        if self.document_join_indexes:
            self._index_joins(dset)
        with self.transaction():  # type: ignore[attr-defined]
            # A drain locks the state rows of the tables it applies (sorted, as here) before it
            # reads which sets to refresh: a drain in flight, which may not know this set yet,
            # commits before the build reads the tables; a later one waits and then refreshes it.
            for key in sorted(dset.table_keys()):
                self._lock_state(key)  # type: ignore[attr-defined]
            self._upsert_state("documents", {"name": dset.name}, {"definition": dset.to_json(), "updated_at": time.time()})  # type: ignore[attr-defined]
            self.execute(f"DELETE FROM {self.document_table(dset)}")  # type: ignore[attr-defined]
            self.execute(f"INSERT INTO {self.document_table(dset)} {built.select()}")  # type: ignore[attr-defined]
            return int(self.fetchall(f"SELECT count(*) FROM {self.document_table(dset)}")[0][0])  # type: ignore[attr-defined]

    def _index_joins(self, dset: DocumentSet) -> None:
        """An index on each child's join columns, and on each parent's for a many_to_one child."""
        wanted = []
        for node, _ in dset.paths():
            for edge in node.children:
                wanted += [(edge.node, edge.child_columns), (node, edge.parent_columns)]
        for node, columns in dict.fromkeys(wanted):
            if columns and tuple(columns) != tuple(node.key[: len(columns)]):  # else the primary key's index serves it
                self._index(node.table_key, self._node_table(node), columns)
        # the documents' own root key: a drain deletes and inserts the documents of its roots
        self._index(f"{dset.root.schema}.{dset.name}", self.document_table(dset), dset.root.key)

    def _index(self, what: str, table: str, columns: tuple[str, ...]) -> None:
        digest = hashlib.sha256(f"{what}({','.join(columns)})".encode()).hexdigest()[:12]
        cols = ", ".join(self.ident(c) for c in columns)  # type: ignore[attr-defined]
        self.execute(f"CREATE INDEX IF NOT EXISTS {self.ident(f'pgr_doc_{digest}')} ON {table} ({cols})")  # type: ignore[attr-defined]

    def document_sets(self) -> list[DocumentSet]:
        """The sets materialized in this warehouse (each drain keeps them fresh)."""
        if self.json_functions is None:
            return []
        rows = self.fetchall(f"SELECT definition FROM {self.state('documents')} ORDER BY name")  # type: ignore[attr-defined]
        return [DocumentSet.from_json(r[0]) for r in rows]

    # -- a drain's refresh ------------------------------------------------------------------

    def document_refresh(self, decoded, staged: dict) -> DocumentRefresh:
        """Inside a drain's transaction, before its changes are applied (see the module docstring)."""
        refresh = DocumentRefresh(self, decoded, staged)
        refresh.before()
        return refresh


class DocumentRefresh:
    """One drain's refresh of the document sets its changes touch."""

    def __init__(self, wh, decoded, staged: dict) -> None:
        self.wh = wh
        self.work: list[tuple[DocumentSet, DocumentSql, list[tuple[tuple, str]] | None]] = []
        self.problems: dict[str, str] = {}  # set name: why the drain left its documents as they were
        changed = set(decoded.batches)
        sets = [d for d in wh.document_sets() if d.table_keys() & changed]
        if not sets:
            return
        present = _present_columns(wh, sets)
        for dset in sets:
            missing = [
                f"{schema}.{table}" + (f" ({', '.join(sorted(columns - present[(schema, table)]))})" if (schema, table) in present else "")
                for (schema, table), columns in _needed_columns(wh, dset).items()
                if not columns <= present.get((schema, table), set())
            ]
            if missing:  # a table of the tree resynced, a column renamed or dropped: the set waits, the drain goes on
                self.problems[dset.name] = (
                    f"documents {dset.name} not refreshed: the warehouse lacks {', '.join(missing)}; "
                    "fix documents: if a column changed, then materialize the document asset again"
                )
                continue
            built = wh._document_sql(dset)
            mapped: list[tuple[tuple, str]] | None = []
            for node, path in dset.paths():
                for changes in staged.get(node.table_key, ()) if node.table_key in changed else ():
                    relation = _changed_keys(wh, node, changes, decoded.plans[node.table_key].mappings)
                    if relation is None:  # a TRUNCATE, or a key column gone from the staged rows
                        mapped = None
                        break
                    mapped.append((path, relation))
                if mapped is None:
                    break
            self.work.append((dset, built, mapped))

    def _map(self) -> None:
        for dset, built, mapped in self.work:
            for path, relation in mapped or ():
                keys = ", ".join(self.wh.ident(k) for k in dset.root.key)
                self.wh.execute(f"INSERT INTO {self.wh._keys_table(dset)} ({keys}) {built.roots_of(path, relation)}")

    def before(self) -> None:
        for dset, _, _ in self.work:  # writers of the set wait for each other here
            self.wh.execute(f"UPDATE {self.wh.state('documents')} SET updated_at = ? WHERE name = ?", [time.time(), dset.name])
            self.wh.execute(f"DELETE FROM {self.wh._keys_table(dset)}")
        self._map()

    def finish(self) -> dict[str, int]:
        """After the changes: recompute, and return documents recomputed per set."""
        self._map()
        wh, touched = self.wh, {}
        for dset, built, mapped in self.work:
            table, keys_table = wh.document_table(dset), wh._keys_table(dset)
            if mapped is None:
                wh.execute(f"DELETE FROM {table}")
                wh.execute(f"INSERT INTO {table} {built.select()}")
                touched[dset.name] = int(wh.fetchall(f"SELECT count(*) FROM {table}")[0][0])
                continue
            name = dset.name
            match = " AND ".join(f"{wh.ident(name)}.{wh.ident(k)} = k.{wh.ident(k)}" for k in dset.root.key)
            wh.execute(f"DELETE FROM {table} USING {keys_table} k WHERE {match}")
            root_match = " AND ".join(f"k.{wh.ident(k)} = r0.{wh.ident(k)}" for k in dset.root.key)
            wh.execute(f"INSERT INTO {table} {built.select(f'WHERE EXISTS (SELECT 1 FROM {keys_table} k WHERE {root_match})')}")
            cols = ", ".join(wh.ident(k) for k in dset.root.key)
            touched[name] = int(wh.fetchall(f"SELECT count(*) FROM (SELECT DISTINCT {cols} FROM {keys_table}) t")[0][0])
            wh.execute(f"DELETE FROM {keys_table}")
        return touched


def _changed_keys(wh, node: Node, changes, mappings: dict) -> str | None:
    """``SELECT k0, k1, ...`` (typed as the warehouse's key columns) of the rows a staged segment
    changed: an upsert's key (a key change stages the old key as a delete), a delete's key.
    None when the segment truncates the table or lacks a key column."""
    if changes.truncated:
        return None
    position = {name: i for i, name in enumerate(changes.columns)}
    if any(k not in position or k not in mappings for k in node.key):
        return None
    keys = ", ".join(
        f"{staging.typed(mappings[k], 's.' + wh.ident(staging.value_column(position[k])))} AS {wh.ident(f'k{i}')}"
        for i, k in enumerate(node.key)
    )
    return f"SELECT {keys} FROM {changes.relation} s WHERE s.{wh.ident(staging.OP)} <> 'T'"


def _needed_columns(wh, dset: DocumentSet) -> dict[tuple[str, str], set[str]]:
    """(schema, table) -> columns a refresh of the set reads or writes, as the warehouse names them."""
    needed: dict[tuple[str, str], set[str]] = {}

    def need(schema: str, table: str, columns) -> None:
        needed.setdefault((wh.fold(schema), wh.fold(table)), set()).update(wh.fold(c) for c in columns)

    for node, _ in dset.paths():
        need(wh.schema_prefix + node.schema, node.table, [c for c, _ in node.columns] + list(node.key))
        for edge in node.children:
            need(wh.schema_prefix + node.schema, node.table, edge.parent_columns)
            need(wh.schema_prefix + edge.node.schema, edge.node.table, edge.child_columns)
    need(wh.document_schema(dset), dset.name, [*dset.root.key, "document"])
    need(STATE_SCHEMA, f"document_keys.{dset.name}", dset.root.key)
    return needed


def _present_columns(wh, sets: list[DocumentSet]) -> dict[tuple[str, str], set[str]]:
    """The warehouse's columns of the schemas the sets use (one catalog query per drain that touches a set)."""
    schemas = sorted({s for d in sets for s, _ in _needed_columns(wh, d)})
    marks = ", ".join("?" for _ in schemas)
    rows = wh.fetchall(
        f"SELECT table_schema, table_name, column_name FROM information_schema.columns WHERE table_schema IN ({marks})", schemas
    )
    present: dict[tuple[str, str], set[str]] = {}
    for schema, table, column in rows:
        present.setdefault((schema, table), set()).add(column)
    return present
