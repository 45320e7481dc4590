"""Backfill slices: plan them over CTID page ranges, then stream one as Arrow record batches.

A plan fixes, once per table, which pages each partition covers: the page count of every leaf
relation is read when the plan is made, each leaf's last segment is open-ended so rows written
later to new pages still belong to a slice, and no two slices share a page. Slices never use
OFFSET and never scan the whole table: Postgres 14+ answers ``ctid`` ranges with a TID range scan.

Pages mean something only in the file they were counted in. A rewrite (VACUUM FULL, CLUSTER,
pg_repack, a rewriting ALTER TABLE, TRUNCATE) gives the relation a new file, its relfilenode,
and moves rows to other pages. The plan keeps each leaf's relfilenode, and every slice checks them
inside its own snapshot, under an ACCESS SHARE lock that keeps rewrites out until the slice's
reader closes: a changed file raises PlanStaleError and the caller re-plans (backfill.py).

Slices are short: each holds at most ``max_pages`` heap pages (replication.yaml
``backfill.max_snapshot_bytes``), so one snapshot, and the source's xmin horizon it pins, lives
only as long as that much heap takes to copy. A Dagster partition owns one slice or several
consecutive ones; each slice is copied and committed on its own (its own snapshot, its own
transaction in the warehouse), exactly as a partition was before.

Reading a slice runs ``readers`` binary COPY streams (``binary_copy``: typed Arrow, parsed in
C++) in parallel threads, all inside one exported snapshot, so a slice is a consistent picture
even though its pages are read by several sessions. A Postgres replica may take the slice's raw
binary COPY output instead (``SliceReader.binary_copies``).
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
import pyarrow as pa
from psycopg import sql

from pg_replication.errors import PgReplicationError
from pg_replication.source import binary_copy
from pg_replication.source.catalog import Column, Table
from pg_replication.source.connection import connect
from pg_replication.types import SESSION_OPTIONS, TypeMapping, map_column

@dataclass(frozen=True)
class Segment:
    """Pages [start, end) of one relation; ``end`` None means 'to the end of the relation'."""

    schema: str
    relation: str
    start: int
    end: int | None

    def split(self, pieces: int, current_pages: int) -> list[Segment]:
        stop = self.end if self.end is not None else max(current_pages, self.start)
        if pieces <= 1 or stop - self.start < 2 * pieces:
            return [self]
        step = math.ceil((stop - self.start) / pieces)
        bounds = list(range(self.start, stop, step)) + [stop]
        parts = [Segment(self.schema, self.relation, a, b) for a, b in zip(bounds, bounds[1:])]
        last = parts[-1]
        parts[-1] = Segment(last.schema, last.relation, last.start, self.end)
        return parts


# The staged column a slice read with ``fresh_before`` carries: true for a row version written by
# a transaction that had not ended when the plan was made (see BackfillPlan).
FRESH_COLUMN = "_pgr fresh"


class PlanStaleError(PgReplicationError):
    """The relation's file changed since the plan was made (a rewrite): its pages moved."""

    retryable = True
    default_hint = "the backfill re-plans the slices not yet copied and retries"


@dataclass(frozen=True)
class BackfillPlan:
    """Where each backfill slice reads from, which Dagster partition owns it, and the LSN from
    which changes must be replayed.

    ``slices`` are the snapshot slices, in page order; ``owners[i]`` is the partition of slice i
    (non-decreasing, every partition owns at least one); empty for plans stored by an earlier
    version, where slice i is partition i. ``filenodes`` holds (schema, relation, relfilenode) of
    every leaf the pages were counted in; empty for plans stored by an earlier version (not checked).

    ``fresh_before`` is a transaction ID (32 bits, as ``xmin`` shows it) before which every
    transaction had ended when the plan was made. A row version whose ``xmin`` precedes it has
    been its key's live version since before the plan, so no slice can have copied another
    version of that key: only rows written later need evicting from other slices. None for plans
    of an earlier version and after a re-plan (a rewrite moves rows and keeps their xmin)."""

    lsn: str
    slices: tuple[tuple[Segment, ...], ...]
    filenodes: tuple[tuple[str, str, int], ...] = ()
    owners: tuple[int, ...] = ()
    fresh_before: int | None = None

    @property
    def partitions(self) -> int:
        return self.owners[-1] + 1 if self.owners else len(self.slices)

    def slices_of(self, partition: int) -> list[int]:
        """The slices partition ``partition`` copies, in page order."""
        if not self.owners:
            return [partition]
        return [i for i, owner in enumerate(self.owners) if owner == partition]

    def to_json(self) -> str:
        data = {
            "lsn": self.lsn,
            "slices": [[[s.schema, s.relation, s.start, s.end] for s in sl] for sl in self.slices],
            "filenodes": [list(f) for f in self.filenodes],
        }
        if self.owners:
            data["owners"] = list(self.owners)
        if self.fresh_before is not None:
            data["fresh_before"] = self.fresh_before
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> BackfillPlan:
        data = json.loads(text)
        return cls(
            data["lsn"],
            tuple(tuple(Segment(*seg) for seg in sl) for sl in data["slices"]),
            tuple((s, r, int(f)) for s, r, f in data.get("filenodes", ())),
            tuple(int(o) for o in data.get("owners", ())),
            data.get("fresh_before"),
        )

    def stale_because(self, conn: psycopg.Connection, leaves: Sequence[tuple[str, str]]) -> str | None:
        """Why the plan's pages no longer describe the table (None when they still do): a leaf's
        file changed, or leaves were attached or detached. Plans without filenodes pass."""
        if not self.filenodes:
            return None
        if {(s, r) for s, r, _ in self.filenodes} != set(leaves):
            return "its partitions changed since the backfill was planned"
        for schema, relation, filenode in self.filenodes:
            now = relation_filenode(conn, schema, relation)
            if now != filenode:
                return (
                    f"{sql.Identifier(schema, relation).as_string(conn)} was rewritten since the backfill was "
                    f"planned (VACUUM FULL, CLUSTER, pg_repack, a rewriting ALTER TABLE or TRUNCATE: file "
                    f"{filenode} is now {now})"
                )
        return None


def relation_pages(conn: psycopg.Connection, schema: str, relation: str) -> int:
    row = conn.execute(
        "SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::int",
        (sql.Identifier(schema, relation).as_string(conn),),
    ).fetchone()
    return int(row[0]) if row else 0


def relation_filenode(conn: psycopg.Connection, schema: str, relation: str) -> int | None:
    """The relation's current relfilenode (None when it no longer exists)."""
    row = conn.execute(
        "SELECT pg_relation_filenode(to_regclass(%s))", (sql.Identifier(schema, relation).as_string(conn),)
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def block_size(conn: psycopg.Connection) -> int:
    return int(conn.execute("SELECT current_setting('block_size')::int").fetchone()[0])  # type: ignore[index]


def _layout(conn: psycopg.Connection, table: Table) -> tuple[tuple[tuple[str, str, int], ...], list[tuple[str, str, int]]]:
    """Each leaf's file and page count. Files before pages: a rewrite in between leaves the plan
    with the old file, and stale."""
    filenodes = tuple((schema, rel, relation_filenode(conn, schema, rel) or 0) for schema, rel in table.leaves)
    pages = [(schema, rel, relation_pages(conn, schema, rel)) for schema, rel in table.leaves]
    return filenodes, pages


def fresh_horizon(conn: psycopg.Connection, table: Table) -> int | None:
    """A plan's ``fresh_before``: the oldest transaction still running, read before anything else
    of the plan. None when a leaf is not a heap table (whose ``xmin`` is known to mean this)."""
    leaves = [sql.Identifier(s, r).as_string(conn) for s, r in table.leaves]
    row = conn.execute(
        "SELECT bool_and(a.amname = 'heap') FROM pg_class c JOIN pg_am a ON a.oid = c.relam "
        "WHERE c.oid = ANY(%s::regclass[])",
        (leaves,),
    ).fetchone()
    if not leaves or not row or not row[0]:
        return None
    return int(conn.execute("SELECT txid_snapshot_xmin(txid_current_snapshot()) % 4294967296").fetchone()[0])  # type: ignore[index]


def fresh_mark(fresh_before: int) -> sql.Composable:
    """FRESH_COLUMN's expression: a version written at or after ``fresh_before``. age() compares
    modulo 2^32 as Postgres does; a version older than 2^31 transactions counts as fresh (one
    eviction too many, never one missed), frozen and bootstrap ones as old."""
    return sql.SQL("age(xmin) <= age({}::xid)").format(sql.Literal(str(fresh_before)))


def make_plan(
    conn: psycopg.Connection, table: Table, partitions: int, lsn: str, max_bytes: int | None = None,
    fresh_before: int | None = None,
) -> BackfillPlan:
    """Cut the table's pages (over all its leaf partitions) into ``partitions`` contiguous
    partitions, and each of those into slices of at most ``max_bytes`` of heap (one slice per
    partition when None). ``fresh_before``: see BackfillPlan (fresh_horizon)."""
    filenodes, pages = _layout(conn, table)
    max_pages = max(1, max_bytes // block_size(conn)) if max_bytes else None
    slices: list[tuple[Segment, ...]] = []
    owners: list[int] = []
    for partition, segments in enumerate(_cut(pages, partitions)):
        pieces = _short_slices(segments, pages, max_pages)
        slices += pieces
        owners += [partition] * len(pieces)
    return BackfillPlan(lsn, tuple(slices), filenodes, tuple(owners), fresh_before)


def replan(conn: psycopg.Connection, table: Table, stale: BackfillPlan, only: Sequence[int]) -> BackfillPlan:
    """The plan after a rewrite: the pages now on disk are cut among slices ``only`` (those not
    copied yet); the other slices get none, and every slice keeps its partition."""
    filenodes, pages = _layout(conn, table)
    owners = sorted(set(only))
    slices: list[tuple[Segment, ...]] = [() for _ in stale.slices]
    for owner, segments in zip(owners, _cut(pages, len(owners))):
        slices[owner] = segments
    return BackfillPlan(stale.lsn, tuple(slices), filenodes, stale.owners)


def _short_slices(
    segments: tuple[Segment, ...], pages: list[tuple[str, str, int]], max_pages: int | None
) -> list[tuple[Segment, ...]]:
    """One partition's segments as consecutive slices of at most ``max_pages`` pages each (the
    open end of a leaf stays on the last piece of it). A partition without pages keeps one slice."""
    if max_pages is None:
        return [segments]
    counted = {(schema, rel): count for schema, rel, count in pages}
    slices: list[list[Segment]] = [[]]
    room = max_pages
    for seg in segments:
        stop = seg.end if seg.end is not None else counted[(seg.schema, seg.relation)]
        start = seg.start
        while True:
            if room == 0 and stop > start:
                slices.append([])
                room = max_pages
            take = min(room, stop - start)
            end = start + take
            slices[-1].append(Segment(seg.schema, seg.relation, start, seg.end if end >= stop else end))
            room -= take
            start = end
            if start >= stop:
                break
    return [tuple(s) for s in slices]


def _cut(pages: list[tuple[str, str, int]], partitions: int) -> list[tuple[Segment, ...]]:
    total = sum(p for *_, p in pages)
    bounds = [round(k * total / partitions) for k in range(partitions + 1)]
    slices: list[list[Segment]] = [[] for _ in range(partitions)]
    offset = 0
    for schema, rel, count in pages:
        owning = [k for k in range(partitions) if bounds[k] < offset + count and bounds[k + 1] > offset]
        if not owning:  # an empty leaf: give it to the slice its position falls in
            k = min(partitions - 1, max(i for i in range(partitions) if bounds[i] <= offset))
            slices[k].append(Segment(schema, rel, 0, None))
        for k in owning:
            lo, hi = max(bounds[k], offset) - offset, min(bounds[k + 1], offset + count) - offset
            slices[k].append(Segment(schema, rel, lo, None if hi == count else hi))
        offset += count
    return [tuple(s) for s in slices]


Mapper = Callable[[Column], TypeMapping]  # the warehouse's type mapping (Warehouse.map_column)


def column_mappings(table: Table, mapper: Mapper = map_column) -> list[tuple[str, TypeMapping]]:
    return [(c.name, mapper(c)) for c in table.columns]


def binary_query(
    columns: list[binary_copy.ReadColumn], segment: Segment, limit: int | None, fresh_before: int | None = None
) -> sql.Composed:
    """The SELECT the binary reader copies: one segment's pages (see binary_copy), with
    FRESH_COLUMN last when ``fresh_before`` is given."""
    select = binary_copy.select_list(columns)
    if fresh_before is not None:
        select = sql.SQL("{}, {}").format(select, fresh_mark(fresh_before))
    return piece_query(select, segment, limit)


def piece_query(select_list: sql.Composable, segment: Segment, limit: int | None) -> sql.Composed:
    where = [sql.SQL("ctid >= {}::tid").format(sql.Literal(f"({segment.start},0)"))]
    if segment.end is not None:
        where.append(sql.SQL("ctid < {}::tid").format(sql.Literal(f"({segment.end},0)")))
    query = sql.SQL("SELECT {} FROM ONLY {} WHERE {}").format(
        select_list, sql.Identifier(segment.schema, segment.relation), sql.SQL(" AND ").join(where)
    )
    if limit is not None:
        query = sql.SQL("{} LIMIT {}").format(query, sql.Literal(limit))
    return query


class _Stopped(Exception):
    """The consumer stopped the readers early."""


@dataclass
class _Done:
    error: BaseException | None = None


class SliceReader:
    """Reads one slice as record batches of ``self.schema`` (binary COPY into typed Arrow, see
    binary_copy), in ``readers`` threads.

    The readers start at construction and share one exported snapshot. Memory stays bounded: at
    most ``readers`` batches wait for the consumer, besides the one each reader is parsing.
    ``close()`` (also on early exit) stops the readers and closes their connections.
    """

    def __init__(
        self,
        conninfo: str,
        table: Table,
        segments: tuple[Segment, ...],
        *,
        readers: int = 2,
        row_limit: int | None = None,
        mapper: Mapper = map_column,
        plan: BackfillPlan | None = None,
        mark_fresh: bool = False,
    ) -> None:
        """``plan``: the plan ``segments`` come from; its files are checked in this snapshot
        (PlanStaleError when a leaf was rewritten) and kept from rewrites until ``close()``.
        ``mark_fresh``: the batches carry FRESH_COLUMN when the plan knows its ``fresh_before``."""
        self.conninfo, self.table, self.mapper = conninfo, table, mapper
        self.columns = binary_copy.read_columns(column_mappings(table, mapper))
        self.schema = binary_copy.staged_schema(self.columns)
        self.fresh_before = plan.fresh_before if mark_fresh and plan is not None else None
        if self.fresh_before is not None:
            self.schema = self.schema.append(pa.field(FRESH_COLUMN, pa.bool_()))
        self.check_lock = threading.Lock()
        self.locked_leaves: list[tuple[str, str]] = []
        self.coordinator = connect(conninfo, autocommit=False, options=SESSION_OPTIONS)
        self.opened_at = time.monotonic()  # the snapshot lives from here until close()
        try:
            self.coordinator.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            self.snapshot = self.coordinator.execute("SELECT pg_export_snapshot()").fetchone()[0]  # type: ignore[index]
            self.plan = plan
            if plan is not None:
                self._check_files(self.coordinator, plan)
                self.locked_leaves = [
                    (s, r) for s, r, _ in plan.filenodes if relation_filenode(self.coordinator, s, r) is not None
                ]
            pieces = [
                p for seg in segments for p in seg.split(readers, relation_pages(self.coordinator, seg.schema, seg.relation))
            ]
        except BaseException:
            self.coordinator.close()
            raise
        self.pieces = tuple(pieces)
        self.work: queue.SimpleQueue[Segment] = queue.SimpleQueue()
        for piece in pieces:
            self.work.put(piece)
        self.per_piece_limit = math.ceil(row_limit / len(pieces)) if row_limit and pieces else None
        self.out: queue.Queue[pa.RecordBatch | _Done] = queue.Queue(maxsize=readers)
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._read, name=f"pgr-reader-{i}", daemon=True)
            for i in range(min(readers, max(1, len(pieces))))
        ]
        self.started = False  # the readers start when the batches are first asked for (or start())
        self.raw = False  # read as binary COPY output instead (claim_raw)
        self._on_drained: Callable[[], None] | None = None  # see when_drained
        self._readers_done = 0
        self._failed = self._drained = False

    def binary_copies(self, select: Callable[[str, TypeMapping], sql.Composable]) -> Iterator[Iterator[bytes]]:
        """The slice as raw ``COPY … (FORMAT binary)`` output, one chunk iterator per piece (a
        complete binary COPY file each), read in one session of the snapshot, instead of the
        batches: for a target that takes Postgres's binary format itself. ``select(name,
        mapping)`` is each column's expression (its type decides the binary form)."""
        self.claim_raw()
        with self.session() as conn:
            for piece in self.pieces:
                with conn.cursor().copy(self.binary_copy_of(piece, select)) as copy:
                    yield iter(copy)

    def claim_raw(self) -> None:
        """Before the slice is read raw (binary COPY output, as many times as needed): the batch
        readers then never start, and after them no raw read can."""
        if self.started and not self.raw:
            raise RuntimeError("the slice is already being read as batches")
        self.started = self.raw = True

    def binary_copy_of(
        self, piece: Segment, select: Callable[[str, TypeMapping], sql.Composable], *extra: sql.Composable
    ) -> sql.Composed:
        """``COPY (…) TO STDOUT (FORMAT binary)`` of one piece: each column as ``select(name,
        mapping)`` (its type decides the binary form), then the ``extra`` expressions."""
        exprs = [select(c.name, c.mapping) for c in self.columns] + list(extra)
        query = piece_query(sql.SQL(", ").join(exprs), piece, self.per_piece_limit)
        return sql.SQL("COPY ({}) TO STDOUT (FORMAT binary)").format(query)

    @contextmanager
    def session(self) -> Iterator[psycopg.Connection]:
        """A new source session in the slice's snapshot, holding the plan's locks (and its files
        checked once they are held), until the block ends."""
        with connect(self.conninfo, autocommit=False, options=SESSION_OPTIONS) as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(self.snapshot)))
            if self.plan is not None and self.locked_leaves:
                conn.execute(self._lock_leaves())
                self._check_files(conn, self.plan)
            yield conn

    def _lock_leaves(self) -> sql.Composed:
        """What each reading session runs before it reads: no rewrite until it is done."""
        return sql.SQL("LOCK TABLE ONLY {} IN ACCESS SHARE MODE").format(
            sql.SQL(", ").join(sql.Identifier(s, r) for s, r in self.locked_leaves)
        )

    def _check_files(self, conn: psycopg.Connection, plan: BackfillPlan) -> None:
        """A rewrite committed before the check shows as a new file (the catalog is read fresh,
        whatever the snapshot). Each reader checks again once its own session holds an ACCESS
        SHARE lock, after which none can happen until it is done (a rewrite needs ACCESS
        EXCLUSIVE). The coordinator takes no lock: it waits for the readers, and a DDL queued
        behind its lock would queue their locks behind it (a deadlock)."""
        reason = plan.stale_because(conn, self.table.leaves)
        if reason is not None:
            raise PlanStaleError(f"{self.table.display}: {reason}", table=self.table.display, lsn=plan.lsn)

    def _put(self, item: pa.RecordBatch | _Done) -> None:
        put_unless_stopped(self.out, item, self.stop)

    def _read(self) -> None:
        done = _Done()
        try:
            with binary_copy.reader_connection(self.conninfo) as conn:
                binary_copy.execute(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                binary_copy.execute(conn, sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(self.snapshot)))
                if self.plan is not None and self.locked_leaves:
                    binary_copy.execute(conn, self._lock_leaves())
                    with self.check_lock:  # the coordinator's connection: after this reader's lock
                        self._check_files(self.coordinator, self.plan)
                while not self.stop.is_set():
                    try:
                        piece = self.work.get_nowait()
                    except queue.Empty:
                        break
                    query = binary_query(self.columns, piece, self.per_piece_limit, self.fresh_before)
                    for batch in binary_copy.read_batches(conn, query, self.schema, self.stop.is_set):
                        self._put(batch)
                if self.stop.is_set():  # a cancelled read: the connection is not reused
                    raise _Stopped()
        except _Stopped:
            pass
        except BaseException as exc:  # forwarded to the consumer, which re-raises it
            done.error = exc
        action = None
        with self.check_lock:
            self._readers_done += 1
            self._failed = self._failed or done.error is not None
            if self._readers_done == len(self.threads) and not self._failed and not self.stop.is_set():
                self._drained, action = True, self._on_drained
        if action is not None:
            _quietly(action)
        self._put(done)

    def when_drained(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the source has sent the whole slice (by the last reader to finish,
        or now if that was before), not after an error or a stop. What it raises is dropped."""
        with self.check_lock:
            if not self._drained:
                self._on_drained = action
                return
        _quietly(action)

    def start(self) -> None:
        """Start the readers (before the batches are asked for: they fill the queue meanwhile)."""
        if not self.started:
            self.started = True
            for t in self.threads:
                t.start()

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        if self.raw:
            raise RuntimeError("the slice is being read as binary COPY output, not as batches")
        self.start()
        finished = 0
        while finished < len(self.threads):
            item = self.out.get()
            if isinstance(item, _Done):
                finished += 1
                if item.error is not None:
                    raise item.error
                continue
            yield item

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            if t.is_alive():
                t.join(timeout=30)
        self.coordinator.rollback()
        self.coordinator.close()


def put_unless_stopped(out: queue.Queue, item: object, stop: threading.Event) -> None:
    """Put ``item`` once ``out`` has room, or drop it once ``stop`` is set (its consumer is gone)."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.2)
            return
        except queue.Full:
            continue


def _quietly(action: Callable[[], None]) -> None:
    try:
        action()
    except Exception:  # the next slice opens its own reader, and meets the cause there
        pass


def read_slice(
    conninfo: str,
    table: Table,
    segments: tuple[Segment, ...],
    *,
    readers: int = 2,
    row_limit: int | None = None,
    mapper: Mapper = map_column,
) -> Iterator[pa.RecordBatch]:
    """Stream one slice's rows (see SliceReader); closing the iterator stops the readers."""
    reader = SliceReader(conninfo, table, segments, readers=readers, row_limit=row_limit, mapper=mapper)
    try:
        yield from reader
    finally:
        reader.close()


def keys_in_source(conninfo: str, table: Table) -> Callable[[list[tuple]], set[tuple]]:
    """A KeyCheck: which of the given primary keys the source table has now."""
    types = {c.name: c.type_sql for c in table.columns}

    def check(keys: list[tuple]) -> set[tuple]:
        alive: set[tuple] = set()
        width = len(table.primary_key)
        with connect(conninfo) as conn:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                rows = sql.SQL(", ").join(
                    sql.SQL("({})").format(sql.SQL(", ").join([sql.Literal(i)] + [sql.Placeholder()] * width))
                    for i in range(len(chunk))
                )
                cond = sql.SQL(" AND ").join(
                    sql.SQL("t.{} = v.{}::{}").format(sql.Identifier(k), sql.Identifier(f"k{j}"), sql.SQL(types[k]))
                    for j, k in enumerate(table.primary_key)
                )
                query = sql.SQL("SELECT v.i FROM (VALUES {}) AS v(i, {}) WHERE EXISTS (SELECT 1 FROM {} t WHERE {})").format(
                    rows, sql.SQL(", ").join(sql.Identifier(f"k{j}") for j in range(width)), table.ident, cond
                )
                params = [None if v is None else str(v) for k in chunk for v in k]
                for (i,) in conn.execute(query, params):
                    alive.add(tuple(chunk[i]))
        return alive

    return check
