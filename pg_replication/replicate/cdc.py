"""One CDC drain: stream a bounded batch from the slot, fold it per table, apply or log it in one
warehouse transaction together with the drained LSN, then confirm it to the slot.

Exactly once: the drained LSN (end of the last transaction handled, or the server's decode
position once the stream went quiet between transactions) is committed with the data;
transactions at or below it are skipped when read again, and the slot is only ever confirmed to
what the warehouse has committed (standby feedback after the commit, source/stream.py).
A table whose changes the warehouse rejects is marked failed; its changes go to its change log
and every other table keeps streaming.

On Postgres 14+ a transaction too large for the server's memory arrives in parts while still in
progress; ``streamed.py`` keeps them (staged in the warehouse past a bound) until its commit.
The drained position may then pass the start of a transaction still open on the source: the
server decides what to send by commit position, so it sends that transaction whole again.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import psycopg

from pg_replication.replicate.changes import Segment, StagedPart, TableBatch, TableOutcome, TableStats
from pg_replication.replicate.column_changes import ColumnSegment
from pg_replication.errors import PgReplicationError, SchemaChangeError
from pg_replication.failpoints import failpoint
from pg_replication.source import pgoutput as po
from pg_replication.source._rowdecode import RowColumns
from pg_replication.source.catalog import Column, PgType, Table, describe_new_columns, load_types
from pg_replication.source.connection import connect
from pg_replication.source.recovery import row_reader
from pg_replication.source.relation_identity import relation_identity
from pg_replication.source.slot import advance, flushed_lsn, require_slot, slot_status, sync_publication
from pg_replication.source.snapshot import Mapper
from pg_replication.source.stream import SlotStream
from pg_replication.replicate.streamed import StreamedTransactions
from pg_replication.types import SESSION_OPTIONS, TypeMapping


class StateBehindSlotError(PgReplicationError):
    default_hint = (
        "the slot moved past what this warehouse has applied (another consumer, or a restored "
        "warehouse): changes in between are gone from the slot. Resync the tables"
    )


@dataclass(frozen=True)
class DrainSettings:
    slot: str
    publication: str
    max_changes: int = 200_000
    max_bytes: int = 256 << 20
    max_seconds: float = 30.0  # wall-clock budget of a read: it ends at the next commit after
    # Caught up and no message for this long: the slot is exhausted. No wait is needed: the server
    # has decoded past the position read as the batch began, and it sends transactions in commit
    # order, so every one that committed before that position has come (200 ms until this release).
    idle_ms: int = 0
    # A large transaction streamed in parts is written to the warehouse's stream staging once it
    # holds this much pgoutput in memory (or a quarter of max_bytes, if less): Python holds a
    # folded change in about ten times its pgoutput size.
    spill_bytes: int = 8 << 20
    stream_idle_ms: int = 5000  # a streamed transaction is open and nothing came for this long: stop
    # drain_session: a batch read while the one before is applied ends at a commit once that one
    # has committed and the read lasted this long (the one before is reported when this read ends).
    min_seconds: float = 0.25
    # The document sets replication.yaml configures: drains refresh only these (None: every set
    # built in the warehouse). A set taken out of the file keeps its table, no longer refreshed.
    documents: frozenset[str] | None = None


@dataclass
class DrainResult:
    drained_lsn: int
    changes: int = 0
    transactions: int = 0
    bytes: int = 0
    caught_up: bool = True
    seconds: float = 0.0
    tables: dict[str, TableOutcome] = field(default_factory=dict)
    restarted: dict[str, str] = field(default_factory=dict)  # table key: why its backfill restarted
    held_bytes: int = 0  # the most pgoutput bytes held in memory at once
    staged_parts: int = 0  # segments of large streamed transactions staged in the warehouse

    @property
    def failed(self) -> dict[str, TableOutcome]:
        return {k: t for k, t in self.tables.items() if t.mode == "failed"}


@dataclass
class _RelationPlan:
    table: Table
    key: str
    columns: tuple[str, ...]
    key_positions: tuple[int, ...]
    converters: tuple[tuple[int, Callable[[str], str]], ...]
    key_converters: tuple[Callable[[str], str] | None, ...]  # per key column, for old tuples
    mappings: dict[str, TypeMapping]
    keep: tuple[int, ...] | None = None  # positions of the tuple to keep (None: all)
    source_width: int = 0  # columns in the relation's tuples
    failure: str | None = None  # why its changes cannot be applied: the table fails, they are logged


def _plan_relation(
    rel: po.Relation, table: Table, types: dict[int, PgType], mapper: Mapper, key: tuple[str, ...] | None = None
) -> _RelationPlan:
    """How to stage the changes of ``rel``, keyed by ``key`` (default: the table's key)."""
    key = table.primary_key if key is None else key
    known = {c.name: c for c in table.columns}
    # Excluded columns are dropped here, whatever the publication sends (one we do not own, or
    # changes decoded before our column list was narrowed): never a "new column" to add.
    excluded = set(table.entry.exclude_columns) if table.entry else set()
    keep = tuple(i for i, rc in enumerate(rel.columns) if rc.name not in excluded)
    columns = tuple(rel.columns[i].name for i in keep)
    mappings: dict[str, TypeMapping] = {}
    for i, rc in ((i, rel.columns[i]) for i in keep):
        col = known.get(rc.name)
        if col is None or col.type.oid != rc.type_oid or col.typmod != rc.typmod:
            pg_type = types.get(rc.type_oid) or PgType(rc.type_oid, "", f"oid {rc.type_oid}", "base")
            col = Column(rc.name, i + 1, pg_type, rc.typmod, col.ndims if col else 1, False, pg_type.name)
        mappings[rc.name] = mapper(col)
    missing = [k for k in key if k not in columns]
    if missing or not key:
        raise SchemaChangeError(
            f"{table.display}: key column(s) {', '.join(missing or table.primary_key)} are no longer published "
            f"(the relation now has {', '.join(columns)}: a key column was renamed or dropped)",
            hint="restore the key column, or resync the table (`pg-replication resync`); its changes wait in its change log",
            table=table.display,
        )
    converters = tuple((i, mappings[n].from_text) for i, n in enumerate(columns) if mappings[n].from_text)
    return _RelationPlan(
        table, f"{table.schema}.{table.name}", columns, tuple(columns.index(k) for k in key),
        converters, tuple(mappings[k].from_text for k in key), mappings,  # type: ignore[arg-type]
        keep=None if len(keep) == len(rel.columns) else keep, source_width=len(rel.columns),
    )


def _plan_or_fail(rel: po.Relation, table: Table, types: dict[int, PgType], mapper: Mapper) -> _RelationPlan:
    """The relation's plan; when the table's changes can no longer be staged as planned (its key
    column renamed or dropped), a plan with a ``failure``: the table fails
    alone once one of its changes is read, and its changes are still staged, keyed by the
    columns the relation itself marks as its replica identity, for its change log (kept in
    order for `retry`, or dropped by `resync`)."""
    try:
        return _plan_relation(rel, table, types, mapper)
    except SchemaChangeError as exc:
        # Excluded columns never key anything (they are dropped before staging).
        excluded = set(table.entry.exclude_columns) if table.entry else set()
        kept = [c for c in rel.columns if c.name not in excluded]
        identity = tuple(c.name for c in kept if c.is_key) or tuple(c.name for c in kept)
        plan = _plan_relation(rel, table, types, mapper, key=identity)
        plan.failure = exc.message
        return plan



def _stage(values: tuple[po.Value, ...], plan: _RelationPlan) -> tuple[list[str | None], set[int]]:
    if plan.keep is not None:
        values = tuple(values[i] for i in plan.keep)
    staged: list = list(values)
    unknown: set[int] = set()
    if po.UNCHANGED in values:
        for i, v in enumerate(staged):
            if v is po.UNCHANGED:
                unknown.add(i)
                staged[i] = None
    for i, convert in plan.converters:
        v = staged[i]
        if v is not None:
            staged[i] = convert(v)
    return staged, unknown


_ROW_CHANGES = frozenset(b"IUD")
_RELATION_OID = struct.Struct(">I")


def _segment(tb: TableBatch, plan: _RelationPlan, fast: dict[int, RowColumns]) -> Segment | ColumnSegment:
    """The table's segment for the relation's current columns: a new one decoded into columns
    when the columns changed, or the relation's plan (a type change: a ColumnSegment converts at
    the end); then every route may point at a segment no longer last: dropped."""
    segment = tb.segments[-1] if tb.segments else None
    if segment is None or type(segment) is StagedPart or segment.columns != plan.columns or (type(segment) is ColumnSegment and segment.origin is not plan):
        fast.clear()
        keep = plan.keep if plan.keep is not None else tuple(range(plan.source_width))
        segment = ColumnSegment(plan.columns, plan.key_positions, keep, plan.source_width, plan.converters, origin=plan)
        tb.segments.append(segment)
    return segment


def _add_change(tb: TableBatch, plan: _RelationPlan, oid: int, data: bytes, fast: dict[int, RowColumns]) -> None:
    """Add one Insert, Update or Delete message to the table's batch. The compiled decoder takes
    it when it can (and ``fast`` routes the relation's next changes there: the stream's reader
    hands them over in C); otherwise (unchanged TOAST, malformed input) the segment goes on
    folded in Python and the message is decoded by source/pgoutput.py."""
    segment = _segment(tb, plan, fast)
    if type(segment) is ColumnSegment:
        if segment.add(data) > 0:
            fast[oid] = segment.decoded
            return
        fast.clear()
        segment.count_into(tb.stats)
        segment = tb.segments[-1] = segment.to_segment()
    _fold_change(po.decode(data), plan, segment, tb.stats)  # type: ignore[arg-type]


def _old_key(values: tuple[po.Value, ...], plan: _RelationPlan) -> tuple[str | None, ...]:
    """The primary key of an old tuple ('K' or 'O'), staged like new values."""
    if plan.keep is not None:
        values = tuple(values[i] for i in plan.keep)
    return tuple(
        convert(v) if convert is not None and isinstance(v, str) else v  # type: ignore[misc]
        for convert, v in zip(plan.key_converters, (values[i] for i in plan.key_positions))
    )


@dataclass
class _Decoded:
    batches: dict[str, TableBatch]
    plans: dict[str, _RelationPlan]
    last_end_lsn: int | None
    changes: int
    transactions: int
    bytes: int
    exhausted: bool
    quiet_lsn: int = 0  # the stream went quiet between transactions: nothing pending below this
    failed: dict[str, str] = field(default_factory=dict)  # tables whose changes could not be staged as planned: why
    covered: tuple[str, ...] = ()  # the tables this drain includes (their streams continue)
    drained_before: int = 0  # the drained position this drain started from
    held_bytes: int = 0  # the most pgoutput bytes held in memory at once
    staged_parts: int = 0  # segments of large streamed transactions written to the warehouse
    documents: frozenset[str] | None = None  # the document sets to refresh (DrainSettings.documents)


def _relation_table(
    rel: po.Relation, tables: dict[tuple[str, str], Table], by_oid: dict[int, Table] | None
) -> Table | None:
    """The configured table a Relation message stands for, recognised by its oid: a change made
    while the table had another name is still its change, and a relation that has the name now
    but is not the one planned (dropped and re-created since) is not."""
    if by_oid is None:
        return tables.get((rel.schema, rel.name))
    table = by_oid.get(rel.oid)
    if table is None:
        named = tables.get((rel.schema, rel.name))
        if named is not None and named not in by_oid.values():  # no relation has its name now
            table = named
    return table


def _read_budget(conn: psycopg.Connection, max_seconds: float) -> float:
    """The read's time budget, below half of wal_sender_timeout: past that the server asks for a
    reply, and psycopg2 answers with a flush position of its own, which the slot would take as
    confirmed before the warehouse committed."""
    timeout_ms = int(conn.execute("SELECT setting FROM pg_settings WHERE name = 'wal_sender_timeout'").fetchone()[0])  # type: ignore[index]
    if timeout_ms <= 0:
        return max_seconds
    return min(max_seconds, max(1.0, timeout_ms / 2000 - 5))


def _fold_change(msg: po.Insert | po.Update | po.Delete, plan: _RelationPlan, segment: Segment, stats: TableStats) -> None:
    kind = type(msg)
    if kind is po.Insert:
        segment.insert(_stage(msg.new, plan)[0])
        stats.inserted += 1
    elif kind is po.Update:
        values, unknown = _stage(msg.new, plan)
        old = msg.old  # type: ignore[union-attr]
        segment.update(values, unknown, None if old is None else _old_key(old, plan))
        stats.updated += 1
    else:
        segment.delete(_old_key(msg.old, plan))  # type: ignore[union-attr]
        stats.deleted += 1


def _read_batch(
    conn: psycopg.Connection,
    tables: dict[tuple[str, str], Table],
    settings: DrainSettings,
    skip_below: int,
    mapper: Mapper,
    by_oid: dict[int, Table] | None,
    stream: SlotStream,
    caught_up_at: int,
    start: int = 0,
    streams: StreamedTransactions | None = None,
    relations: dict[int, _RelationPlan | None] | None = None,
    plans: dict[str, _RelationPlan] | None = None,
    enough: Callable[[], bool] | None = None,
) -> _Decoded:
    """Fold the stream's messages until a commit past a bound (changes, bytes held in memory,
    seconds, or ``enough()``: drain_session's batch before this one is committed), or until no
    message is waiting between transactions once the time budget is spent, or for ``idle_ms``
    once the server has decoded past ``caught_up_at`` (exhausted: caught up).

    Large transactions streamed while in progress (``streams``, protocol 2) are kept by
    ``streamed.py`` (spilled to the warehouse past a bound) and join the batch at their Stream
    Commit. While one is open, the time budget waits for its commit as long as it keeps coming:
    ending the read before would drop its parts, and the next drain would read it all again.

    ``relations`` and ``plans`` carry what earlier batches of the same replication session
    learnt: the server sends a relation's Relation message once per session, not per batch."""
    types = load_types(conn)
    relations = {} if relations is None else relations
    plans = {} if plans is None else plans
    batches: dict[str, TableBatch] = {}
    failed: dict[str, str] = {}
    last_end = None
    changes = transactions = held = peak = 0
    exhausted = in_transaction = False
    skipping = False
    commit_lsn = commit_time = 0
    quiet_lsn = 0
    # relation oid: its table's current ColumnSegment's decoder. The stream's reader hands it
    # the relation's row changes itself (in C), and adds the oid to ``touched``: they reach this
    # loop only when the decoder does not take them.
    fast: dict[int, RowColumns] = {}
    touched: set[int] = set()  # relations changed in this transaction (stats noted at its commit)
    stream.route_changes(fast, touched)
    bytes_before, routed_before, routed_bytes_before = stream.bytes, stream.routed_changes, stream.routed_bytes
    deadline = time.monotonic() + settings.max_seconds
    idle = settings.idle_ms / 1000

    def plan_for(msg: po.Relation) -> _RelationPlan | None:
        table = _relation_table(msg, tables, by_oid)
        return _plan_or_fail(msg, table, types, mapper) if table else None

    def relation(oid: int, plan: _RelationPlan | None) -> None:
        relations[oid] = plan
        fast.pop(oid, None)  # its next change may start a segment
        if plan:
            previous = plans.get(plan.key)
            if previous is not None:  # earlier segments may still need dropped columns
                plan.mappings = {**previous.mappings, **plan.mappings}
            plans[plan.key] = plan

    def plan_of(oid: int) -> _RelationPlan | None:
        plan = relations.get(oid)
        if plan is None and oid not in relations:
            raise po.DecodeError(f"change for relation {oid} before its Relation message")
        return plan  # None: a published table we do not replicate (config changed): ignore

    for data in stream:
        if data is None:  # no message waiting
            if in_transaction or (streams is not None and streams.current is not None):
                continue
            spent = time.monotonic() >= deadline
            if streams is not None and streams.open and stream.quiet_for < settings.stream_idle_ms / 1000:
                # A large transaction is open: the server may be busy sending its last parts
                # (its decode position is past the commit already). Stopping would drop its parts.
                continue
            if stream.server_end >= caught_up_at and (spent or stream.quiet_for >= idle):
                exhausted = True
            elif not spent:
                continue
            elif last_end is None and stream.server_end <= start:
                # Still re-decoding from the slot's restart point (a long transaction kept it
                # back): stopping here would end every drain at the same place, forever.
                continue
            quiet_lsn = stream.server_end
            break
        if streams is not None and streams.current is not None:  # a block of a streamed transaction
            xid, msg = po.decode_streamed(data)
            kind = type(msg)
            txn = streams.current
            if kind is po.Insert or kind is po.Update or kind is po.Delete:
                oid = msg.relation  # type: ignore[union-attr]
                plan = txn.relations[oid] if oid in txn.relations else plan_of(oid)  # type: ignore[assignment]
                if plan is not None:
                    if plan.failure is not None:
                        txn.failures.setdefault(plan.key, f"{plan.key} (a large transaction, xid {xid}): {plan.failure}")
                    segment, stats = txn.segment(plan.key, xid, plan.columns, plan.key_positions)  # type: ignore[arg-type]
                    _fold_change(msg, plan, segment, stats)  # type: ignore[arg-type]
            elif kind is po.StreamStop:
                streams.stop()
                stream.in_stream_block = False
            elif kind is po.Relation:
                txn.relations[msg.oid] = plan_for(msg)  # type: ignore[arg-type, union-attr]
            elif kind is po.Truncate:
                for oid in msg.relations:  # type: ignore[union-attr]
                    plan = txn.relations[oid] if oid in txn.relations else relations.get(oid)  # type: ignore[assignment]
                    if plan:
                        segment, stats = txn.segment(plan.key, xid, plan.columns, plan.key_positions)  # type: ignore[arg-type]
                        segment.truncate()
                        stats.truncated += 1
            if streams.current is not None:
                streams.held(len(data))  # past its bound, the transaction is spilled to the warehouse
            peak = max(peak, held + streams.held_bytes)
            continue
        if data[0] in _ROW_CHANGES and len(data) > 5:  # Insert, Update, Delete: the hot path, decoded in C
            if skipping:
                continue
            oid = _RELATION_OID.unpack_from(data, 1)[0]
            rows = fast.get(oid)
            if rows is None or rows.add(data) < 0:
                plan = plan_of(oid)
                if plan is None:
                    continue
                tb = batches.get(plan.key)
                if tb is None:
                    tb = batches[plan.key] = TableBatch()
                if plan.failure is not None:
                    failed.setdefault(plan.key, f"{plan.key} at LSN {po.int_to_lsn(commit_lsn)}: {plan.failure}")
                _add_change(tb, plan, oid, data, fast)
            touched.add(oid)
            changes += 1
            held += len(data)
            continue
        msg = po.decode(data)
        kind = type(msg)
        if kind is po.Begin:
            in_transaction = True
            commit_lsn, commit_time = msg.final_lsn, msg.commit_time  # type: ignore[union-attr]
            skipping = stream.skip_changes = commit_lsn < skip_below
            continue
        if kind is po.Commit or kind is po.StreamCommit:
            if kind is po.StreamCommit:
                assert streams is not None
                txn = streams.open.get(msg.xid)  # type: ignore[union-attr]
                for oid, plan in (txn.relations.items() if txn else ()):  # its schema holds from now on
                    relation(oid, plan)  # type: ignore[arg-type]
                if msg.commit_lsn < skip_below:  # type: ignore[union-attr]  # applied before this session
                    streams.abort(msg.xid, msg.xid)  # type: ignore[union-attr]
                else:
                    held += txn.bytes if txn else 0
                    for key, why in (txn.failures.items() if txn else ()):
                        failed.setdefault(key, why)
                    changes += streams.commit(msg.xid, batches, msg.commit_lsn, msg.commit_time)  # type: ignore[union-attr]
                    transactions += 1
                fast.clear()  # the table's next changes go after the transaction's parts
            else:
                in_transaction = False
                for oid in touched:
                    batches[relations[oid].key].stats.saw(commit_lsn, commit_time)  # type: ignore[union-attr]
                touched.clear()
                transactions += 0 if skipping else 1
            last_end = msg.end_lsn  # type: ignore[union-attr]
            held_now = held + stream.routed_bytes - routed_bytes_before
            peak = max(peak, held_now + (streams.held_bytes if streams is not None else 0))
            spent = (time.monotonic() >= deadline or (enough is not None and enough())) and not (streams is not None and streams.open)
            if changes + stream.routed_changes - routed_before >= settings.max_changes or held_now >= settings.max_bytes or spent:
                break
            continue
        if kind is po.StreamStart:
            assert streams is not None
            streams.start(msg.xid, msg.first_segment)  # type: ignore[union-attr]
            stream.in_stream_block = True  # its row changes carry an xid: never routed
            continue
        if kind is po.StreamAbort:
            assert streams is not None
            streams.abort(msg.xid, msg.subxid)  # type: ignore[union-attr]
            continue
        if kind is po.Relation:
            relation(msg.oid, plan_for(msg))  # type: ignore[arg-type, union-attr]
            continue
        if kind is po.Truncate and not skipping:
            for oid in msg.relations:  # type: ignore[union-attr]
                plan = relations.get(oid)
                if plan:
                    if plan.failure is not None:
                        failed.setdefault(plan.key, f"{plan.key} at LSN {po.int_to_lsn(commit_lsn)}: {plan.failure}")
                    tb = batches.setdefault(plan.key, TableBatch())
                    _segment(tb, plan, fast).truncate()
                    tb.stats.truncated += 1
                    tb.stats.saw(commit_lsn, commit_time)
                    changes += 1
        # Origin, Type and logical messages (heartbeats) carry nothing to apply.
    for tb in batches.values():
        for segment in tb.segments:
            if type(segment) is ColumnSegment:
                segment.count_into(tb.stats)
    changes += stream.routed_changes - routed_before
    held += stream.routed_bytes - routed_bytes_before
    nbytes = stream.bytes - bytes_before
    decoded = _Decoded(batches, dict(plans), last_end, changes, transactions, nbytes, exhausted, quiet_lsn, failed)
    decoded.held_bytes = max(peak, held)
    decoded.staged_parts = streams.parts_staged if streams is not None else 0
    return decoded


def drain_once(conninfo: str, warehouse, tables: list[Table], settings: DrainSettings, log: Callable[[str], None] = lambda m: None) -> DrainResult:
    """Drain one bounded batch into ``warehouse`` (see warehouse/base.py)."""
    started = time.monotonic()
    with connect(conninfo, options=SESSION_OPTIONS) as conn:
        session = open_session(conn, warehouse, tables, settings, log)
        with SlotStream(conninfo, settings.slot, settings.publication, session.start, streaming=session.streaming) as stream:
            # The stream staging is touched only while this session holds the slot: another
            # drain waiting for it must not empty what this one staged.
            streams = session.streamed(warehouse)
            decoded, result = read_batch(conn, warehouse, session, stream, streams)
            failpoint("after_read")
            result.tables = apply_batch(conninfo, conn, warehouse, settings, decoded, result.drained_lsn, log)
            failpoint("after_commit")
            if result.drained_lsn > session.confirmed:
                try:
                    stream.confirm(result.drained_lsn)  # standby feedback, only now that the warehouse committed
                except PgReplicationError:
                    pass  # the stream broke during the apply: confirmed below instead
            if streams is not None and streams.parts_staged:
                warehouse.reset_stream_staging(settings.slot)  # applied, or to be re-sent to the next drain
        confirm_released(conn, settings.slot, result.drained_lsn)
    result.seconds = time.monotonic() - started
    log_failed(result, log)
    return result


@dataclass
class Session:
    """Where a replication session starts, and what it reads with (``open_session``)."""

    settings: DrainSettings  # its read budget resolved (``_read_budget``)
    tables: dict[tuple[str, str], Table]
    by_oid: dict[int, Table]
    restarted: dict[str, str]
    confirmed: int  # the slot's confirmed position when the session opened
    drained: int  # the position the warehouse has committed (batches move it)
    start: int  # where the stream starts
    caught_up_at: int  # the server's flush position when the session opened (drain_session: as its batch began)
    streaming: bool
    covered: tuple[str, ...]
    # What the session's Relation messages said (sent once per session): relation oid -> plan,
    # and table key -> its latest plan.
    relations: dict[int, _RelationPlan | None] = field(default_factory=dict)
    plans: dict[str, _RelationPlan] = field(default_factory=dict)

    def streamed(self, warehouse, *, empty: bool = True) -> StreamedTransactions | None:
        """A fresh keeper of large streamed transactions (emptying the slot's stream staging
        first unless told it is empty)."""
        if not self.streaming:
            return None
        s = self.settings
        spill_bytes = min(s.spill_bytes, max(s.max_bytes // 4, 64 << 10))
        return StreamedTransactions.staged_in(warehouse, s.slot, spill_bytes, empty=empty)


def open_session(conn: psycopg.Connection, warehouse, tables: list[Table], settings: DrainSettings, log: Callable[[str], None]) -> Session:
    """Check the slot against the warehouse's position (moving the slot up to it when a run died
    between commit and confirmation), restart the backfill of tables whose stream has a gap, and
    say where the session's stream starts."""
    status = require_slot(conn, settings.slot)
    sync_publication(conn, settings.publication, tables)
    drained = warehouse.drained_lsn(settings.slot)
    if drained is not None and drained < status.confirmed_lsn:
        raise StateBehindSlotError(
            f"warehouse has applied up to {po.int_to_lsn(drained)} but slot {settings.slot!r} "
            f"is at {po.int_to_lsn(status.confirmed_lsn)}",
            lsn=po.int_to_lsn(drained),
        )
    if drained is not None and drained > status.confirmed_lsn:
        advance(conn, settings.slot, drained)  # a previous run committed but died before advancing
    restarted, by_oid = _check_identities(conn, warehouse, tables, settings, drained or 0)
    for key, reason in restarted.items():
        log(f"{key}: backfill restarted: {reason}. Materialize all its partitions again")
    before = flushed_lsn(conn)
    start = max(drained or 0, status.confirmed_lsn)
    return Session(
        replace(settings, max_seconds=_read_budget(conn, settings.max_seconds)),
        {(t.schema, t.name): t for t in tables}, by_oid, restarted, status.confirmed_lsn, drained or 0, start, before,
        conn.info.server_version >= 140000, tuple(f"{t.schema}.{t.name}" for t in tables),
    )


def read_batch(
    conn: psycopg.Connection, warehouse, session: Session, stream: SlotStream, streams, enough: Callable[[], bool] | None = None
) -> tuple[_Decoded, DrainResult]:
    """Read the session's next batch; it starts from ``session.drained`` (the last committed
    batch's position) and ends at ``result.drained_lsn`` (at a commit once ``enough()``, if not before)."""
    decoded = _read_batch(
        conn, session.tables, session.settings, session.drained, warehouse.map_column, session.by_oid, stream,
        session.caught_up_at, session.start, streams, session.relations, session.plans, enough,
    )
    decoded.covered, decoded.drained_before = session.covered, session.drained
    decoded.documents = session.settings.documents
    target = max(session.start, decoded.last_end_lsn or 0, decoded.quiet_lsn)
    result = DrainResult(target, decoded.changes, decoded.transactions, decoded.bytes, decoded.exhausted)
    result.held_bytes, result.staged_parts = decoded.held_bytes, decoded.staged_parts
    result.restarted, session.restarted = session.restarted, {}  # reported with the session's first batch
    return decoded, result


def apply_batch(
    conninfo: str, conn: psycopg.Connection, warehouse, settings: DrainSettings, decoded: _Decoded, target: int, log: Callable[[str], None]
) -> dict[str, TableOutcome]:
    """One warehouse transaction: the batch's changes and ``target`` (warehouse/drain.py)."""
    return warehouse.apply_drain(
        decoded,
        target,
        settings.slot,
        lambda table: lambda names: describe_new_columns(conn, table, names),
        lambda table: row_reader(conninfo, table, warehouse.map_column),
        log=log,
    )


def log_failed(result: DrainResult, log: Callable[[str], None]) -> None:
    for key, outcome in result.failed.items():
        log(f"{key}: changes not applied ({outcome.error}); they wait in its change log")


def confirm_released(conn: psycopg.Connection, slot: str, target: int, wait: float = 10.0) -> None:
    """Wait until the drain's replication session has let go of the slot (so the next drain can
    start at once) and make sure the slot is confirmed up to ``target``: the feedback sent before
    closing normally did it; otherwise advance it here (the warehouse has committed ``target``)."""
    give_up = time.monotonic() + wait
    while True:
        status = slot_status(conn, slot)
        if status is None or (not status.active and status.confirmed_lsn >= target):
            return
        if not status.active:
            try:
                advance(conn, slot, target)
            except psycopg.errors.ObjectInUse:
                pass  # another drain took the slot meanwhile: it advances it (drained > confirmed)
            return
        if time.monotonic() >= give_up:  # still held: the next drain advances it (drained > confirmed)
            return
        time.sleep(0.02)


def _check_identities(
    conn: psycopg.Connection, warehouse, tables: list[Table], settings: DrainSettings, drained: int
) -> tuple[dict[str, str], dict[int, Table]]:
    """Restart the backfill of every table whose stream has a gap (source/relation_identity.py), and map
    the relation oids that stand for configured tables now."""
    restarted: dict[str, str] = {}
    by_oid: dict[int, Table] = {}
    for table in tables:
        now = relation_identity(conn, settings.publication, table)
        if now.oid is not None:
            by_oid[now.oid] = table
        reason = warehouse.restart_if_gap(table, now, drained)
        if reason is not None:
            restarted[f"{table.schema}.{table.name}"] = reason
    return restarted, by_oid


__all__ = ["DrainResult", "DrainSettings", "Segment", "StateBehindSlotError", "drain_once"]
