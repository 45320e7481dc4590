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

A TRUNCATE of any table of the tree rebuilds the whole set. A set whose refresh fails (or whose
tables lack a column it uses) is held, not the drain: the drain is retried without it, its
documents stay as they were and every drain reports why until the set is built again. A full build waits for the drains
applying to any table of the tree on the tables' state rows (its first build included, when no
drain knows the set yet), and drains wait for it there.

Only the sets replication.yaml configures are refreshed (``configured``; None: every stored
set). A sync of a query-strategy table refreshes them the same way in its own transaction
(document_upkeep.py); a write outside both (a backfill slice, a retry's replay) marks them
``stale`` in its transaction and rebuilds them right after; a drain that touches a stale set
rebuilds it whole.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Collection

from pg_replication.errors import PgReplicationError, is_transient
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


class DocumentRefreshFailed(Exception):
    """A set's refresh failed inside a drain's transaction: the drain rolls back and runs again
    with the set held (``DocumentRefresh(held=...)``)."""

    def __init__(self, dset: DocumentSet, exc: BaseException, by: str = "drain") -> None:
        super().__init__(dset.name, exc)
        self.name, self.exc = dset.name, exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # a drain is retried without the set at once; a sync fails once, and the next one goes without it
        then = "the drain applied its tables and left" if by == "drain" else "later syncs and drains leave"
        self.reason = (
            f"documents {dset.name} held: a {by}'s refresh of them failed ({first}); {then} these documents as they "
            f"were; materialize the asset {dset.root.schema}/{dset.name} again to rebuild them"
        )


class DocumentStore:
    """Mixed into ``engine.SqlWarehouse``: uses its dialect hooks and the other parts."""

    json_functions: JsonFunctions | None = None  # None: this warehouse cannot build documents
    # Index the join columns of the tree's tables (a Postgres replica: without them each child
    # probe scans its table; DuckDB decorrelates the probes into hash joins).
    document_join_indexes = False
    # Columns of the documents table after the root key and ``document`` (ClickHouse: its versions).
    document_extra_columns: tuple[str, ...] = ()
    # A warehouse's own kind of drain refresh (ClickHouse's outlives a killed drain); None: DocumentRefresh.
    document_refresh_class: type[DocumentRefresh] | None = None

    @property
    def builds_documents(self) -> bool:
        return self.json_functions is not None

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
                hint="build documents on duckdb, postgres, snowflake or clickhouse (README, Documents)",
            )
        return DocumentSql(dset, self.json_functions, self.ident, self._node_table)  # type: ignore[attr-defined]

    # -- a full build -----------------------------------------------------------------------

    def materialize_documents(self, dset: DocumentSet) -> int:
        """Store the set's definition and build every document again, in one transaction; from
        then on each drain keeps them fresh. Returns the number of documents."""
        built = self._document_sql(dset)
        self._require_tree(dset)
        self._refuse_foreign_table(dset)
        self.create_schema(self.document_schema(dset))  # type: ignore[attr-defined]
        root = self._node_table(dset.root)
        keys = ", ".join(self.ident(k) for k in dset.root.key)  # type: ignore[attr-defined]
        # Outside the transaction, idempotent (Snowflake commits on DDL): typed like the root's key.
        # A set whose root (key) changed since its last build gets its tables anew.
        if self._stale_document_tables(dset):
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
            # built again: no longer held, nor stale
            values = {"definition": dset.to_json(), "updated_at": time.time(), "error": None, "stale": None}
            self._upsert_state("documents", {"name": dset.name}, values)  # type: ignore[attr-defined]
            self.execute(f"DELETE FROM {self.document_table(dset)}")  # type: ignore[attr-defined]
            self.execute(f"INSERT INTO {self.document_table(dset)} {built.select()}")  # type: ignore[attr-defined]
            return int(self.fetchall(f"SELECT count(*) FROM {self.document_table(dset)}")[0][0])  # type: ignore[attr-defined]

    def _require_tree(self, dset: DocumentSet) -> None:
        missing = [n.table_key for n, _ in dset.paths() if self.physical_columns(self.schema_prefix + n.schema, n.table) is None]  # type: ignore[attr-defined]
        if missing:
            raise PgReplicationError(
                f"documents {dset.name}: {', '.join(sorted(set(missing)))} not in the warehouse yet",
                hint="materialize (backfill) the tables of the tree first, then the documents",
            )

    def _refuse_foreign_table(self, dset: DocumentSet) -> None:
        """A build deletes the rows of its table and may drop it: never over a table that is not
        this set's (a replicated one, one of the user's, one whose name differs only in case:
        DuckDB resolves quoted names regardless of case)."""
        schema, name = self.fold(self.document_schema(dset)), self.fold(dset.name)  # type: ignore[attr-defined]
        found = self.fetchall(  # type: ignore[attr-defined]
            "SELECT table_schema, table_name FROM information_schema.tables WHERE lower(table_schema) = lower(?) "
            "AND lower(table_name) = lower(?)",
            [schema, name],
        )
        replicated = self.fetchall(  # type: ignore[attr-defined]
            f"SELECT table_key FROM {self.state('tables')} WHERE lower(table_key) = lower(?)", [f"{dset.root.schema}.{dset.name}"]  # type: ignore[attr-defined]
        )
        built_before = self.fetchall(f"SELECT 1 FROM {self.state('documents')} WHERE name = ?", [dset.name])  # type: ignore[attr-defined]
        shape = [self.fold(c) for c in (*dset.root.key, "document", *self.document_extra_columns)]  # type: ignore[attr-defined]
        for have_schema, have_name in found:
            ours = (
                (have_schema, have_name) == (schema, name) and not replicated
                and (built_before or self.physical_columns(have_schema, have_name) == shape)  # type: ignore[attr-defined]
            )
            if not ours:
                raise PgReplicationError(
                    f"documents {dset.name}: the warehouse already has the table {have_schema}.{have_name}"
                    f"{', a replicated table' if replicated else ''}, which is not this set's documents table "
                    "(names compare regardless of case in DuckDB); building the set would rewrite it",
                    hint="rename the document set in documents:, or drop that table if nothing needs it",
                )

    def _stale_document_tables(self, dset: DocumentSet) -> bool:
        """Whether the set's tables exist with other columns, or key types other than the root's
        now (a root key retyped int -> bigint, then re-backfilled or widened in place)."""
        root = self._column_types(self.schema_prefix + dset.root.schema, dset.root.table)  # type: ignore[attr-defined]
        keys = [(self.fold(k), root.get(self.fold(k))) for k in dset.root.key]  # type: ignore[attr-defined]
        documents = self._column_types(self.document_schema(dset), dset.name)
        if documents and (list(documents) != [k for k, _ in keys] + [self.fold(c) for c in ("document", *self.document_extra_columns)] or any(documents[k] != t for k, t in keys)):  # type: ignore[attr-defined]
            return True
        held = self._column_types(STATE_SCHEMA, f"document_keys.{dset.name}")
        return bool(held) and held != dict(keys)

    def _column_types(self, schema: str, name: str) -> dict[str, str]:
        """Column name -> the catalog's data type, in order; empty when the table does not exist."""
        rows = self.fetchall(  # type: ignore[attr-defined]
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = ? AND table_name = ? "
            "ORDER BY ordinal_position",
            [self.fold(schema), self.fold(name)],  # type: ignore[attr-defined]
        )
        return {c: t for c, t in rows}

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
        return [dset for dset, _, _ in self._stored_sets()]

    def _stored_sets(self, configured: Collection[str] | None = None) -> list[tuple[DocumentSet, str | None, str | None]]:
        """Each materialized set that is ``configured`` (None: every one), why drains hold it
        (None: they keep it fresh) and why it needs a rebuild in full (None: it does not)."""
        if not self.builds_documents:
            return []
        rows = self.fetchall(f"SELECT definition, error, stale FROM {self.state('documents')} ORDER BY name")  # type: ignore[attr-defined]
        found = [(DocumentSet.from_json(r[0]), r[1], r[2]) for r in rows]
        return [f for f in found if configured is None or f[0].name in configured]

    def _hold(self, dset: DocumentSet, reason: str) -> None:
        self.execute(f"UPDATE {self.state('documents')} SET error = ?, updated_at = ? WHERE name = ?", [reason, time.time(), dset.name])  # type: ignore[attr-defined]

    # -- a drain's refresh ------------------------------------------------------------------

    def document_refresh(
        self, decoded, staged: dict, failed: dict[str, str] | None = None, configured: Collection[str] | None = None
    ) -> DocumentRefresh:
        """Inside a drain's transaction, before its changes are applied (see the module docstring).
        ``failed``: set name -> why its refresh failed in an earlier try of this drain (held now).
        Raises DocumentRefreshFailed for a set whose refresh fails (not transiently)."""

        def relations(node: Node) -> list[str] | None:
            found = [_changed_keys(self, node, changes, decoded.plans[node.table_key].mappings) for changes in staged.get(node.table_key, ())]
            return None if None in found else found  # type: ignore[return-value]

        refresh = (self.document_refresh_class or DocumentRefresh)(self, set(decoded.batches), relations, failed or {}, configured)
        refresh.before()
        return refresh


class DocumentRefresh:
    """One write's refresh of the document sets it touches: a drain's, or a sync's (whose rows
    are mapped batch by batch as they are written: ``track``).

    ``relations(node)``: ``SELECT k0, k1, ...`` of the node's table's changed keys, or None
    when the whole set is to be built again (a TRUNCATE, a reload)."""

    def __init__(
        self, wh, changed: set[str], relations: Callable[[Node], list[str] | None], failed: dict[str, str],
        configured: Collection[str] | None = None, by: str = "drain",
    ) -> None:
        self.wh, self.by = wh, by
        self.work: list[tuple[DocumentSet, DocumentSql, list[tuple[tuple, str]] | None]] = []
        self.problems: dict[str, str] = {}  # set name: why the drain left its documents as they were
        sets, stale_sets = [], set()
        for dset, held, stale in wh._stored_sets(configured):
            if not dset.table_keys() & changed:
                continue
            if stale:  # a write outside drains left it stale: built again whole
                stale_sets.add(dset.name)
            if dset.name in failed:  # this drain's refresh of it failed: held from now on
                wh._hold(dset, failed[dset.name])
                held = failed[dset.name]
            if held:  # its documents missed a refresh: a later one would not mend them
                self.problems[dset.name] = held
            else:
                sets.append(dset)
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
                    f"fix documents: if a column changed, then materialize the asset {dset.root.schema}/{dset.name} again"
                )
                wh._hold(dset, self.problems[dset.name])
                continue
            built = wh._document_sql(dset)
            mapped: list[tuple[tuple, str]] | None = None if dset.name in stale_sets else []
            for node, path in dset.paths() if mapped is not None else ():
                found = relations(node) if node.table_key in changed else []
                if found is None:  # a TRUNCATE, a reload, or a key column gone from the staged rows
                    mapped = None
                    break
                mapped += [(path, relation) for relation in found]
            self.work.append((dset, built, mapped))

    def _guarded(self, dset: DocumentSet, work) -> None:
        """Run one set's part: an error that is not transient becomes the set's, not the drain's."""
        try:
            work()
        except (*self.wh.errors, PgReplicationError) as exc:
            if is_transient(exc):
                raise
            raise DocumentRefreshFailed(dset, exc, self.by) from exc

    def _map(self, dset: DocumentSet, built: DocumentSql, mapped) -> None:
        for path, relation in mapped or ():
            keys = ", ".join(self.wh.ident(k) for k in dset.root.key)
            self.wh.execute(f"INSERT INTO {self.wh._keys_table(dset)} ({keys}) {built.roots_of(path, relation)}")

    def before(self) -> None:
        for dset, built, mapped in self.work:
            def start(dset=dset, built=built, mapped=mapped) -> None:
                # a build in full (mapped None) leaves the set fresh: no longer stale
                stale = ", stale = NULL" if mapped is None else ""
                self.wh.execute(f"UPDATE {self.wh.state('documents')} SET updated_at = ?{stale} WHERE name = ?", [time.time(), dset.name])
                self.wh.execute(f"DELETE FROM {self.wh._keys_table(dset)}")
                self._map(dset, built, mapped)

            self._guarded(dset, start)

    def track(self, table_key: str, keys: str) -> None:
        """Map rows of ``table_key`` (``keys``: ``SELECT k0, k1, ...`` of their primary key) to
        their roots as the warehouse holds them now: a sync calls it before and after each batch."""
        for dset, built, mapped in self.work:
            if mapped is None:
                continue
            paths = [(path, keys) for node, path in dset.paths() if node.table_key == table_key]
            self._guarded(dset, lambda dset=dset, built=built, paths=paths: self._map(dset, built, paths))

    def finish(self) -> dict[str, int]:
        """After the changes: recompute, and return documents recomputed per set."""
        touched: dict[str, int] = {}
        for dset, built, mapped in self.work:
            self._guarded(dset, lambda dset=dset, built=built, mapped=mapped: touched.update({dset.name: self._recompute(dset, built, mapped)}))
        return touched

    def _recompute(self, dset: DocumentSet, built: DocumentSql, mapped) -> int:
        wh = self.wh
        table, keys_table = wh.document_table(dset), wh._keys_table(dset)
        if mapped is None:
            wh.execute(f"DELETE FROM {table}")
            wh.execute(f"INSERT INTO {table} {built.select()}")
            return int(wh.fetchall(f"SELECT count(*) FROM {table}")[0][0])
        self._map(dset, built, mapped)
        match = " AND ".join(f"{wh.ident(dset.name)}.{wh.ident(k)} = k.{wh.ident(k)}" for k in dset.root.key)
        wh.execute(f"DELETE FROM {table} USING {keys_table} k WHERE {match}")
        root_match = " AND ".join(f"k.{wh.ident(k)} = r0.{wh.ident(k)}" for k in dset.root.key)
        wh.execute(f"INSERT INTO {table} {built.select(f'WHERE EXISTS (SELECT 1 FROM {keys_table} k WHERE {root_match})')}")
        cols = ", ".join(wh.ident(k) for k in dset.root.key)
        touched = int(wh.fetchall(f"SELECT count(*) FROM (SELECT DISTINCT {cols} FROM {keys_table}) t")[0][0])
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
