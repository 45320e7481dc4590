"""ClickHouse as a warehouse: exactly once without transactions, by versioned, idempotent writes.

ClickHouse has no multi-statement transaction, so the engine's ``begin``/``commit`` do nothing here
and every write is made safe to repeat instead:

- A replicated table is a ``ReplacingMergeTree(_pg_version, _pg_deleted)`` ordered by the primary
  key. A change is never an UPDATE or DELETE: it is a new version of the row (a delete is a
  version with ``_pg_deleted = 1``), and a read sees each key's highest version only. Readers
  query with ``FINAL`` (``SELECT … FROM public.orders FINAL``; our own sessions set ``final = 1``).
- Versions are commit positions: a drain that ends at LSN L writes its segments at
  ``L * 2^16 + n`` (n counts its writes in order); a backfill slice writes at ``plan LSN * 2^16``,
  below every change after the plan position. A drain or slice killed anywhere and re-run writes
  the same rows at the same versions (a replay deduplicates); a shorter re-read batch writes
  older versions, which lose to what the longer one wrote.
- The drained position is written after the data (``drain.py`` already orders it so), and a
  slice is recorded as done after its rows: a crash in between re-does idempotent work.
- Changes of a table still backfilling are applied at once, not logged: their versions are above
  the slices'. A TRUNCATE writes a deleted version of every row and is remembered
  (``_pg_replication.truncations``): a slice below it writes nothing, since every row alive after
  the TRUNCATE arrives as a change above it. A failed table still logs its changes (the engine's
  change log, folded per key by INSERT and DELETE) and replays them, guarded like a drain, when
  retried.
- State tables are MergeTree tables with lightweight UPDATE/DELETE. Writers are not locked against
  each other (ClickHouse has no row locks): the Dagster pools serialize drains and slices, as for
  DuckDB, and chDB itself admits one process at a time.

Values ClickHouse cannot hold are refused before a write, naming table, column, key and value
(``clickhouse_types.py``). Nested documents are built and kept fresh the same way
(``clickhouse_documents.py``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import pyarrow as pa

from pg_replication.config import QUERY_STRATEGIES
from pg_replication.errors import BackfillRestartedError, SchemaChangeError, WarehouseError
from pg_replication.source.catalog import Column, Table
from pg_replication.source.pgoutput import lsn_to_int
from pg_replication.source.recovery import RowReader
from pg_replication.source.snapshot import BackfillPlan, PlanStaleError
from pg_replication.types import TypeMapping
from pg_replication.warehouse import clickhouse_types, staging
from pg_replication.warehouse.base import SLICE_COLUMN, STATE_SCHEMA, KeyCheck, Progress, SliceResult
from pg_replication.warehouse.change_log import COLUMNS, SEGMENT
from pg_replication.warehouse.clickhouse_client import ChdbClient, ServerClient, bind
from pg_replication.warehouse.clickhouse_documents import ClickHouseDocuments
from pg_replication.warehouse.engine import SqlWarehouse, table_key
from pg_replication.warehouse.staging import StagedChanges

__all__ = ["ClickHouseWarehouse"]

VERSION, DELETED = "_pg_version", "_pg_deleted"
VERSION_SHIFT = 16  # writes one drain may make (per table, in order) before its versions reach the next LSN's
_STATE_TYPES = {"text": "String", "BIGINT": "Int64", "DOUBLE PRECISION": "Float64", "INTEGER": "Int32"}


class ClickHouseWarehouse(ClickHouseDocuments, SqlWarehouse):
    """A ClickHouse database as a replication target: chDB in-process or a server.

    Example::

        client = ChdbClient("warehouse.chdb")
        wh = ClickHouseWarehouse(client)
        wh.ensure_table(table)
        rows = client.rows('SELECT * FROM "public"."orders" FINAL')
    """

    name = "clickhouse"
    text_type = "Nullable(String)"
    counts_rows_cheaply = False  # count() under FINAL reads every key
    applies_while_backfilling = True  # changes are versioned above the slices (module docstring)

    # read_batches: ClickHouse types (information_schema's data_type, lower-cased) read exactly
    arrow_types = {
        f"nullable({name})": arrow
        for name, arrow in {
            "bool": pa.bool_(), "int16": pa.int16(), "int32": pa.int32(), "int64": pa.int64(), "uint32": pa.uint32(),
            "float32": pa.float32(), "float64": pa.float64(), "string": pa.string(),
        }.items()
    }  # fmt: skip

    def __init__(self, client: ChdbClient | ServerClient, *, read_only: bool = False) -> None:
        self.client = client
        self.errors = client.errors
        self._version = 0  # the last version written; the next write takes the one after
        self._stage_suffix = uuid.uuid4().hex[:12]  # staging tables of concurrent processes apart
        super().__init__(read_only=read_only)

    # -- connection -------------------------------------------------------------------------

    def execute(self, query: str, params: Sequence = ()) -> None:
        if query.startswith("DELETE FROM ") and " WHERE " not in query:
            query += " WHERE 1"  # ClickHouse's DELETE always takes a condition (the engine empties logs)
        self.client.command(bind(query, params))

    def fetchall(self, query: str, params: Sequence = ()) -> list[tuple]:
        return self.client.rows(bind(query, params))

    def stream_rows(self, query: str, batch_rows: int) -> Iterator[Sequence[tuple]]:
        """ClickHouse's result blocks, cut to ``batch_rows``; reads see each key's latest version (final = 1)."""
        for rows in self.client.stream_rows(query):
            for start in range(0, len(rows), batch_rows):
                yield rows[start : start + batch_rows]

    def begin(self) -> None:
        """No transactions in ClickHouse: every write is idempotent instead (module docstring)."""

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass

    def create_schema(self, name: str) -> None:
        self.execute(f"CREATE DATABASE IF NOT EXISTS {self.ident(name)}")

    def _ensure_state_tables(self) -> None:
        self.create_schema(STATE_SCHEMA)
        for name, (columns, key) in self.STATE_TABLES.items():
            cols = ", ".join(
                f"{self.ident(c)} {_STATE_TYPES[t] if c in key else 'Nullable(' + _STATE_TYPES[t] + ')'}" for c, t in columns
            )
            keys = ", ".join(self.ident(k) for k in key)
            # Lightweight UPDATE needs the block number and offset columns.
            self.execute(
                f"CREATE TABLE IF NOT EXISTS {self.state(name)} ({cols}) ENGINE = MergeTree ORDER BY ({keys}) "
                "SETTINGS enable_block_number_column = 1, enable_block_offset_column = 1"
            )
        self.execute(
            f"CREATE TABLE IF NOT EXISTS {self.state('truncations')} (table_key String, {VERSION} UInt64) "
            "ENGINE = MergeTree ORDER BY table_key"
        )

    def map_column(self, column: Column) -> TypeMapping:
        return clickhouse_types.map_column(column)

    def sql_literal(self, mapping: TypeMapping, value: str) -> str:
        # ClickHouse reads backslashes in string literals as escapes: double them.
        return staging.typed(mapping, "'" + value.replace("\\", "\\\\").replace("'", "''") + "'")

    # -- staging ----------------------------------------------------------------------------

    def stage(self, name: str, data: pa.Table) -> str:
        relation = self.state(f"{name}_{self._stage_suffix}")
        types = {pa.string(): "Nullable(String)", pa.int64(): "Nullable(Int64)"}
        cols = ", ".join(f"{self.ident(f.name)} {types[f.type]}" for f in data.schema)
        self.execute(f"DROP TABLE IF EXISTS {relation}")
        self.execute(f"CREATE TABLE {relation} ({cols}) ENGINE = Memory")
        if data.num_rows:
            self.client.insert_arrow(relation, data)
        return relation

    def unstage(self, name: str) -> None:
        self.execute(f"DROP TABLE IF EXISTS {self.state(f'{name}_{self._stage_suffix}')}")

    # -- tables -----------------------------------------------------------------------------

    def create_table(self, table: Table, columns: list[tuple[str, TypeMapping]]) -> None:
        cols = ", ".join(
            f"{self.ident(name)} {clickhouse_types.key_ddl(m.ddl) if name in table.primary_key else m.ddl}" for name, m in columns
        )
        keys = ", ".join(self.ident(k) for k in table.primary_key)
        self.create_schema(self.schema_of(table))
        self.execute(
            f"CREATE TABLE IF NOT EXISTS {self.table_name(table)} ({cols}, {self.ident(SLICE_COLUMN)} Nullable(Int32), "
            f"{self.ident(VERSION)} UInt64, {self.ident(DELETED)} UInt8) "
            f"ENGINE = ReplacingMergeTree({self.ident(VERSION)}, {self.ident(DELETED)}) ORDER BY ({keys})"
        )

    def add_column(self, table: Table, name: str, mapping: TypeMapping, value: str | None) -> None:
        """Rows already there read ``value`` through the column's DEFAULT. It stays: every write
        names every column, so it never applies to a later row (and removing it would make the
        old rows read NULL until a merge materialized them)."""
        target, column = self.table_name(table), self.ident(name)
        default = "" if value is None else f" DEFAULT {self.sql_literal(mapping, value)}"
        self.execute(f"ALTER TABLE {target} ADD COLUMN IF NOT EXISTS {column} {mapping.ddl}{default}")

    def alter_column_type(self, table: Table, name: str, ddl: str) -> None:
        # A widening (evolution.widens): old parts read converted until the mutation rewrites them.
        if name in table.primary_key:  # ClickHouse refuses to alter a sorting key column
            raise SchemaChangeError(
                f"{table.display}: key column {name!r} changed type to {ddl} in the source; "
                "ClickHouse cannot alter a column of the table's sorting key in place",
                table=table.display,
                hint="resync the table (pg-replication resync TABLE, or on_schema_change: resync); its changes wait in its change log",
            )
        self.execute(f"ALTER TABLE {self.table_name(table)} MODIFY COLUMN {self.ident(name)} {ddl}")

    def stored_mappings(self, table: Table) -> dict[str, TypeMapping]:
        # A replayed change log is guarded like a drain: a CAST would turn what the type cannot
        # hold (NaN in a Decimal) into NULL instead of failing.
        mappings = super().stored_mappings(table)
        return {n: replace(m, refuse=clickhouse_types.refusal(m.ddl)) for n, m in mappings.items()}

    def row_count(self, table: Table) -> int:
        return int(self.fetchall(f"SELECT count() FROM {self.table_name(table)} FINAL")[0][0])

    def read_table(self, schema: str, name: str) -> pa.Table:
        columns = ", ".join(self.ident(c) for c in self.stored_columns(f"{schema}.{name}"))
        return self.client.query_arrow(f"SELECT {columns} FROM {self.ident(schema, name)} FINAL")

    def reset_table(self, table: Table) -> None:
        super().reset_table(table)
        self.execute(f"DELETE FROM {self.state('truncations')} WHERE table_key = ?", [table_key(table)])

    # -- versions ---------------------------------------------------------------------------

    def _next_version(self) -> int:
        self._version += 1
        return self._version

    def _max_version(self, table: Table) -> int:
        rows = self.fetchall(f"SELECT max({self.ident(VERSION)}) FROM {self.table_name(table)} SETTINGS final = 0")
        return int(rows[0][0] or 0)

    def _truncated_at(self, table: Table) -> int:
        rows = self.fetchall(f"SELECT max({self.ident(VERSION)}) FROM {self.state('truncations')} WHERE table_key = ?", [table_key(table)])  # 0 when none
        return int(rows[0][0] or 0)

    # -- backfill ---------------------------------------------------------------------------

    def write_slice(
        self,
        table: Table,
        index: int,
        batches: Iterable[pa.RecordBatch],
        progress: Progress | None = None,
        still_in_source: KeyCheck | None = None,
        read_rows: RowReader | None = None,
        plan: BackfillPlan | None = None,
    ) -> SliceResult:
        """Insert the slice's rows at the plan's version (below every change after it), then
        record the slice. A re-run writes its rows again at the same version, and the newer copy
        wins; rows deleted since are deleted versions above it already (drained changes)."""
        started = time.monotonic()
        stored = self.load_state(table).plan
        if plan is not None and stored is None:  # a drain restarted the backfill meanwhile
            raise BackfillRestartedError(
                f"{table.display}: slice {index} was read under a plan a drain has since dropped (the backfill restarted)",
                table=table.display,
            )
        if plan is not None and stored != plan:
            raise PlanStaleError(
                f"{table.display}: slice {index} was read under a plan another run has replaced", table=table.display, lsn=plan.lsn
            )
        # Before any row, with no transaction: a kill after the slice is recorded still leaves the
        # sets holding the table to be built again (the backfill's end, or the next drain, does it).
        self.mark_documents_stale(table, f"a backfill slice of {table.display}")  # type: ignore[attr-defined]
        base = lsn_to_int((stored or plan).lsn) << VERSION_SHIFT  # type: ignore[union-attr]
        version = self._copy_version(table, index, base)
        if table.strategy in QUERY_STRATEGIES:  # no changes to stay below: above what syncs wrote, read earlier
            version = max(version, self._max_version(table) + 1)
        superseded = self._truncated_at(table) > version  # every row alive now arrived as a change
        mappings = dict(self.column_mappings(table))
        rows = nbytes = 0
        for batch in batches:
            if not superseded and batch.num_rows:
                self._insert_staged(table, mappings, batch, f"slice {index}", rows, f"{int(index)}, {version}, 0")
            rows += batch.num_rows
            nbytes += batch.nbytes
            if progress is not None:
                progress(rows, nbytes)
        if version > base:
            self._settle_earlier_copy(table, index, version, still_in_source)
        self._upsert_state(
            "slices",
            {"table_key": table_key(table), "slice": index},
            {"rows": rows, "bytes": nbytes, "seconds": time.monotonic() - started, "copied_at": time.time()},
        )
        self._start_streaming_when_complete(table, read_rows)
        return SliceResult(rows, nbytes)

    def _copy_version(self, table: Table, index: int, base: int) -> int:
        """The plan's version for a slice's first copy; for each re-run one more (still below
        every change after the plan), so its rows tell the earlier copy's apart."""
        slice_, v = self.ident(SLICE_COLUMN), self.ident(VERSION)
        rows = self.fetchall(
            f"SELECT count(), max({v}) FROM {self.table_name(table)} WHERE {slice_} = ? AND {v} >= ? AND {v} < ? SETTINGS final = 0",
            [index, base, base + (1 << VERSION_SHIFT) - 1],
        )
        return base if not rows[0][0] else int(rows[0][1]) + 1

    def _settle_earlier_copy(self, table: Table, index: int, version: int, still_in_source: KeyCheck | None) -> None:
        """Rows an earlier copy of the slice wrote and this one did not: deleted in the source (a
        deleted version goes in) or moved by an update to another slice's pages (they stay)."""
        keys = [self.ident(k) for k in table.primary_key]
        slice_, v = self.ident(SLICE_COLUMN), self.ident(VERSION)
        leftovers = [
            tuple(r)
            for r in self.fetchall(f"SELECT {', '.join(keys)} FROM {self.table_name(table)} WHERE {slice_} = ? AND {v} < ?", [index, version])
        ]
        alive = still_in_source(leftovers) if still_in_source is not None and leftovers else set()
        gone = [k for k in leftovers if k not in alive]
        for start in range(0, len(gone), 500):
            chunk = gone[start : start + 500]
            one = "(" + " AND ".join(f"{k} = ?" for k in keys) + ")"
            columns = ", ".join(self.ident(c) for c in self.stored_columns(table_key(table)))
            self.execute(
                f"INSERT INTO {self.table_name(table)} ({columns}, {slice_}, {v}, {self.ident(DELETED)}) "
                f"SELECT {columns}, {slice_}, {version}, 1 FROM {self.table_name(table)} WHERE {' OR '.join(one for _ in chunk)}",
                [x for key in chunk for x in key],
            )

    def _insert_staged(
        self, table: Table, mappings: dict[str, TypeMapping], batch: pa.RecordBatch, what: str, first: int, tail: str, into: str | None = None
    ) -> None:
        names = list(mappings)
        data = pa.Table.from_arrays([batch.column(n).cast(pa.string()) for n in names], names=[f"c{i}" for i in range(len(names))])
        relation = self.stage("pgr_slice", data)
        try:
            staged = {n: self.ident(f"c{i}") for i, n in enumerate(names)}
            keys = [staged[k] for k in table.primary_key]
            self._refuse_unheld(table, relation, {n: staged[n] for n in names if mappings[n].refuse}, keys, mappings)
            select = ", ".join(staging.typed(mappings[n], staged[n]) for n in names)
            columns = ", ".join(self.ident(c) for c in [*names, SLICE_COLUMN, VERSION, DELETED])
            try:
                self.execute(f"INSERT INTO {into or self.table_name(table)} ({columns}) SELECT {select}, {tail} FROM {relation}")
            except self.errors as exc:
                raise self._refused(table, what, f"rows {first}..{first + batch.num_rows}", exc) from None
        finally:
            self.unstage("pgr_slice")

    # -- query strategies (append, updated_at, reload) ----------------------------------------

    def upsert_rows(
        self, table: Table, batches: Iterable[pa.RecordBatch], watermark: str | None, documents: Collection[str] | None = None
    ) -> SliceResult:
        """The sync's rows as new versions above every version the table holds, then its
        watermark. Syncs of a table are serialized (strategies.py's advisory lock) and each reads
        a newer snapshot than the last, so a later sync's rows win; a sync killed before its
        watermark is re-read by the next one, whose versions are higher again. The ``documents``
        sets holding the table: see ``_documents_around``."""
        with self._documents_around(table, documents) as rebuilt:
            version = self._max_version(table) + 1
            rows, nbytes = self._insert_rows(table, batches, version, "a sync")
            self._set_watermark(table, watermark)
        return SliceResult(rows, nbytes, documents=rebuilt)

    def replace_rows(
        self, table: Table, batches: Iterable[pa.RecordBatch], watermark: str | None, documents: Collection[str] | None = None
    ) -> SliceResult:
        """A reload as a swap: the new copy is loaded into a table of the same structure, then
        ``EXCHANGE TABLES`` (atomic in an Atomic database, chDB's and a server's default) puts it
        in place, so a reader sees the old rows or the new ones; then the watermark. A reload
        killed before it is done again by the next sync."""
        with self._documents_around(table, documents) as rebuilt:
            rows, nbytes = self._reload(table, batches, watermark)
        return SliceResult(rows, nbytes, documents=rebuilt)

    @contextmanager
    def _documents_around(self, table: Table, documents: Collection[str] | None) -> Iterator[dict[str, int]]:
        """No transaction to refresh a sync's document sets in: they are marked stale before its
        rows (a kill from then on leaves them to the next writer) and built again, whole, after
        its watermark; yields the documents built per set, filled on the way out."""
        self.mark_documents_stale(table, f"a sync of {table.display}")  # type: ignore[attr-defined]
        rebuilt: dict[str, int] = {}
        yield rebuilt
        rebuilt.update(self.rebuild_stale_documents(documents))  # type: ignore[attr-defined]

    def _reload(self, table: Table, batches: Iterable[pa.RecordBatch], watermark: str | None) -> tuple[int, int]:
        target, copy = self.table_name(table), self.state(f"reload.{table.schema}.{table.name}")
        self.execute(f"DROP TABLE IF EXISTS {copy}")
        self.execute(f"CREATE TABLE {copy} AS {target}")
        try:
            rows, nbytes = self._insert_rows(table, batches, self._max_version(table) + 1, "a reload", into=copy)
            self.execute(f"EXCHANGE TABLES {target} AND {copy}")
        finally:
            self.execute(f"DROP TABLE IF EXISTS {copy}")
        self._set_watermark(table, watermark)
        return rows, nbytes

    def _insert_rows(self, table: Table, batches: Iterable[pa.RecordBatch], version: int, what: str, into: str | None = None) -> tuple[int, int]:
        mappings = dict(self.column_mappings(table))
        rows = nbytes = 0
        for batch in batches:
            if batch.num_rows:
                self._insert_staged(table, mappings, batch, what, rows, f"NULL, {version}, 0", into)
            rows += batch.num_rows
            nbytes += batch.nbytes
        return rows, nbytes

    # -- CDC --------------------------------------------------------------------------------

    def _apply_drain_once(self, decoded, staged, pending, failed_now, failed_sets, target_lsn, slot, failpoint, read_rows) -> dict:
        # Every attempt of one drain writes the same versions: a replay deduplicates. A drain of
        # trigger-captured changes ranks by its snapshot's WAL position (its cursor is a change id).
        self._version = (getattr(decoded, "snapshot_lsn", 0) or target_lsn) << VERSION_SHIFT
        return super()._apply_drain_once(decoded, staged, pending, failed_now, failed_sets, target_lsn, slot, failpoint, read_rows)

    def prepare_table(self, plan, status: str, describe_new) -> dict:
        """A table still backfilling takes its changes at once (above the slices' versions):
        create it if no slice has yet."""
        if status == "backfilling" and self.physical_columns(self.schema_of(plan.table), plan.table.name) is None:
            self.ensure_table(plan.table, describe_new)
        return super().prepare_table(plan, status, describe_new)

    def replay_log(self, table: Table, read_rows: RowReader | None = None) -> int:
        # A failed table's logged changes, replayed above every version it holds.
        if self.physical_columns(self.schema_of(table), table.name) is not None:
            self._version = max(self._version, self._max_version(table))
        return super().replay_log(table, read_rows)

    def _fold_log(self, table: Table, columns, into: int, new: int) -> None:
        """The engine's fold (``change_log._fold_log``) without UPDATE … FROM, which ClickHouse
        lacks: ``new``'s rows are rewritten by an INSERT … SELECT over the same join (at a
        scratch segment), the rows they replace deleted, and the result moved to ``into``."""
        log = self.state(self.log_name(table))
        op, unknown, segment, seq = (self.ident(n) for n in (staging.OP, staging.UNKNOWN, SEGMENT, staging.SEQ))
        fills = self._fill_columns(table)
        # l matched: n keeps some warehouse values and names a row into upserts (as the engine's WHERE)
        merge = f"(n.{op} = 'U' AND n.{unknown} LIKE '%1%' AND l.{seq} IS NOT NULL)"
        values, flags = [], []
        for col, keeps, knows in self._fold_terms(columns):
            values.append(f"if({merge} AND {keeps} AND {knows}, l.{col}, n.{col})")
            flags.append(f"if({keeps} AND NOT {knows}, '1', '0')")
        flag = f"if({merge}, {' || '.join(flags) or chr(39) * 2}, n.{unknown})"
        filled = [f"if({merge}, l.{f}, n.{f})" for f in fills]
        scratch = -2  # below every real segment and RECOVERED_SEGMENT
        names = [seq, segment, self.ident(COLUMNS), op, unknown, *fills, *(self.ident(c) for c in columns)]
        self.execute(
            f"INSERT INTO {log} ({', '.join(names)}) SELECT n.{seq}, {scratch}, n.{self.ident(COLUMNS)}, n.{op}, {flag}, "
            f"{', '.join([*filled, *values])} FROM {log} AS n "
            f"LEFT JOIN (SELECT * FROM {log} WHERE {segment} = {int(into)} AND {op} = 'U') AS l ON {self._fold_join(table)} "
            f"WHERE n.{segment} = {int(new)}"
        )
        self._drop_replaced(table, log, into, new)
        self.execute(f"DELETE FROM {log} WHERE {segment} = {int(new)}")
        every = ", ".join(n for n in names if n != segment)
        self.execute(f"INSERT INTO {log} ({every}, {segment}) SELECT {every}, {int(into)} FROM {log} WHERE {segment} = {scratch}")
        self.execute(f"DELETE FROM {log} WHERE {segment} = {scratch}")

    def apply_changes(self, table: Table, changes: StagedChanges, mappings: dict[str, TypeMapping]) -> None:
        target = self.table_name(table)
        columns = list(self.stored_columns(table_key(table)))
        if not columns:  # reset by this drain (on_schema_change: resync): its new backfill copies these changes
            return
        names = ", ".join(self.ident(c) for c in [*columns, SLICE_COLUMN, VERSION, DELETED])
        if changes.truncated:
            version = self._next_version()
            self.execute(f"INSERT INTO {self.state('truncations')} VALUES (?, ?)", [table_key(table), version])
            self.execute(
                f"INSERT INTO {target} ({names}) SELECT {', '.join(self.ident(c) for c in columns)}, NULL, {version}, 1 FROM {target}"
            )
        self._refuse_unheld_changes(table, changes, mappings)
        resolved = staging.resolved_select(changes, target, columns, mappings, table.primary_key, self.ident)
        version = self._next_version()
        op = self.ident(staging.OP)
        self.execute(
            f"INSERT INTO {target} ({names}) SELECT {', '.join(self.ident(c) for c in columns)}, NULL, {version}, "
            f"if({op} = 'D', 1, 0) FROM ({resolved})"
        )

    # -- refusals ---------------------------------------------------------------------------

    def _refuse_unheld(
        self, table: Table, relation: str, columns: dict[str, str], keys: list[str], mappings: dict[str, TypeMapping], where: str = "1"
    ) -> None:
        """Fail naming column, key and value when a staged value of ``columns`` (name -> staged
        expression) is one its ClickHouse type cannot hold (``TypeMapping.refuse``)."""
        for name, staged in columns.items():
            mapping = mappings[name]
            assert mapping.refuse is not None
            found = self.fetchall(
                f"SELECT {', '.join(keys)}, {staged} FROM {relation} s WHERE ({where}) AND {staged} IS NOT NULL "
                f"AND ({mapping.refuse.replace('{0}', staged)}) LIMIT 1"
            )
            if not found:
                continue
            *key, value = found[0]
            value = str(value)
            if len(value) > 300:
                value = value[:300] + "…"
            source_type = next((c.type_sql for c in table.columns if c.name == name), mapping.ddl)
            raise WarehouseError(
                f"{table.display}: column {name} ({source_type}) of the row with key "
                f"({', '.join(table.primary_key)})=({', '.join(str(k) for k in key)}) holds {value}, "
                f"which ClickHouse's {mapping.ddl} cannot hold",
                table=table.display,
                hint="ClickHouse's Date32 and DateTime64 hold 0001-01-01 to 9999-12-31 (no BC, no infinity) and its "
                "Decimal no NaN or infinity; correct the value in the source or leave the column out "
                "(exclude_columns), then re-run (README, ClickHouse)",
            )

