"""Backfill slices: plan them over CTID page ranges, then stream one as Arrow record batches.

A plan fixes, once per table, which pages each partition covers: the page count of every leaf
relation is read when the plan is made, each leaf's last segment is open-ended so rows written
later to new pages still belong to a slice, and no two slices share a page. Slices never use
OFFSET and never scan the whole table: Postgres 14+ answers ``ctid`` ranges with a TID range scan.

Reading a slice runs ``readers`` COPY streams in parallel threads, all inside one exported
snapshot, so a slice is a consistent picture even though its pages are read by several sessions.
"""

from __future__ import annotations

import io
import json
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
from psycopg import sql

from pg_replication.source.catalog import Column, Table
from pg_replication.source.connection import connect
from pg_replication.types import SESSION_OPTIONS, TypeMapping, map_column

CSV_BLOCK_BYTES = 16 << 20  # ~125k rows of a 130-byte row: about DuckDB's row-group size


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


@dataclass(frozen=True)
class BackfillPlan:
    """Where each backfill partition reads from, and the LSN from which changes must be replayed."""

    lsn: str
    slices: tuple[tuple[Segment, ...], ...]

    @property
    def partitions(self) -> int:
        return len(self.slices)

    def to_json(self) -> str:
        return json.dumps(
            {"lsn": self.lsn, "slices": [[[s.schema, s.relation, s.start, s.end] for s in sl] for sl in self.slices]}
        )

    @classmethod
    def from_json(cls, text: str) -> BackfillPlan:
        data = json.loads(text)
        return cls(data["lsn"], tuple(tuple(Segment(*seg) for seg in sl) for sl in data["slices"]))


def relation_pages(conn: psycopg.Connection, schema: str, relation: str) -> int:
    row = conn.execute(
        "SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::int",
        (sql.Identifier(schema, relation).as_string(conn),),
    ).fetchone()
    return int(row[0]) if row else 0


def make_plan(conn: psycopg.Connection, table: Table, partitions: int, lsn: str) -> BackfillPlan:
    """Cut the table's pages (over all its leaf partitions) into ``partitions`` contiguous slices."""
    pages = [(schema, rel, relation_pages(conn, schema, rel)) for schema, rel in table.leaves]
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
    return BackfillPlan(lsn, tuple(tuple(s) for s in slices))


Mapper = Callable[[Column], TypeMapping]  # the warehouse's type mapping (Warehouse.map_column)


def column_mappings(table: Table, mapper: Mapper = map_column) -> list[tuple[str, TypeMapping]]:
    return [(c.name, mapper(c)) for c in table.columns]


def copy_query(table: Table, segment: Segment, limit: int | None, mapper: Mapper = map_column) -> sql.Composed:
    columns = sql.SQL(", ").join(m.select_sql(name) for name, m in column_mappings(table, mapper))
    where = [sql.SQL("ctid >= {}::tid").format(sql.Literal(f"({segment.start},0)"))]
    if segment.end is not None:
        where.append(sql.SQL("ctid < {}::tid").format(sql.Literal(f"({segment.end},0)")))
    query = sql.SQL("SELECT {} FROM ONLY {} WHERE {}").format(
        columns, sql.Identifier(segment.schema, segment.relation), sql.SQL(" AND ").join(where)
    )
    if limit is not None:
        query = sql.SQL("{} LIMIT {}").format(query, sql.Literal(limit))
    return sql.SQL("COPY ({}) TO STDOUT (FORMAT csv)").format(query)


def staging_schema(table: Table, mapper: Mapper = map_column) -> pa.Schema:
    # Staged columns carry the source names, so warehouse errors name the real column.
    return pa.schema([pa.field(name, m.arrow) for name, m in column_mappings(table, mapper)])


class _CopyStream(io.RawIOBase):
    """A file object over a COPY OUT stream, so pyarrow's CSV reader can pull from it."""

    def __init__(self, copy: psycopg.Copy) -> None:
        self._copy = copy
        self._buf = bytearray()
        self._eof = False
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def at_eof(self) -> bool:
        """True when the stream has no data at all (pyarrow refuses an empty CSV)."""
        if not self._buf and not self._eof:
            chunk = self._copy.read()
            if chunk:
                self._buf += chunk
            else:
                self._eof = True
        return self._eof and not self._buf

    def read(self, size: int = -1) -> bytes:
        buf = self._buf
        while (size < 0 or len(buf) < size) and not self._eof:
            chunk = self._copy.read()
            if not chunk:
                self._eof = True
                break
            buf += chunk
        if size < 0 or size >= len(buf):
            out = bytes(buf)
            buf.clear()
        else:
            out = bytes(buf[:size])
            del buf[:size]
        self.bytes_read += len(out)
        return out

    def readinto(self, b) -> int:  # pragma: no cover - pyarrow calls read()
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _csv_options(schema: pa.Schema) -> tuple[pacsv.ReadOptions, pacsv.ParseOptions, pacsv.ConvertOptions]:
    return (
        pacsv.ReadOptions(column_names=schema.names, block_size=CSV_BLOCK_BYTES, use_threads=True),
        pacsv.ParseOptions(newlines_in_values=True, double_quote=True),
        pacsv.ConvertOptions(
            column_types={f.name: f.type for f in schema},
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            true_values=["t"],
            false_values=["f"],
        ),
    )


@dataclass
class _Done:
    error: BaseException | None = None


class SliceReader:
    """Reads one slice as record batches with ``staging_schema(table)``, in ``readers`` threads.

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
    ) -> None:
        self.conninfo, self.table, self.mapper = conninfo, table, mapper
        self.schema = staging_schema(table, mapper)
        self.coordinator = connect(conninfo, autocommit=False, options=SESSION_OPTIONS)
        try:
            self.coordinator.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            self.snapshot = self.coordinator.execute("SELECT pg_export_snapshot()").fetchone()[0]  # type: ignore[index]
            pieces = [
                p for seg in segments for p in seg.split(readers, relation_pages(self.coordinator, seg.schema, seg.relation))
            ]
        except BaseException:
            self.coordinator.close()
            raise
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
        for t in self.threads:
            t.start()

    def _put(self, item: pa.RecordBatch | _Done) -> None:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _read(self) -> None:
        done = _Done()
        try:
            with connect(self.conninfo, autocommit=False, options=SESSION_OPTIONS) as conn:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(self.snapshot)))
                while not self.stop.is_set():
                    try:
                        piece = self.work.get_nowait()
                    except queue.Empty:
                        break
                    with conn.cursor().copy(copy_query(self.table, piece, self.per_piece_limit, self.mapper)) as copy:
                        stream = _CopyStream(copy)
                        if stream.at_eof():
                            continue
                        for batch in pacsv.open_csv(stream, *_csv_options(self.schema)):
                            if self.stop.is_set():
                                break
                            self._put(batch)
                        if self.stop.is_set():
                            conn.cancel_safe()
        except BaseException as exc:  # forwarded to the consumer, which re-raises it
            done.error = exc
        self._put(done)

    def __iter__(self) -> Iterator[pa.RecordBatch]:
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
            t.join(timeout=30)
        self.coordinator.rollback()
        self.coordinator.close()


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
