"""The pgoutput (protocol version 1) decoder, checked against a real Postgres 15 and fuzzed.

Proves:
  * bytes captured from a real slot (pg_logical_slot_peek_binary_changes) decode to what the SQL
    did: Begin/Commit pairing and LSN order, Relation columns, types, key flags and replica
    identity, Insert values as text with NULL as None, an unchanged out-of-line TOAST value as
    UNCHANGED, Update's old key ('K') on a key change and whole old row ('O') under REPLICA
    IDENTITY FULL, Delete's old key, Truncate's relation oids and options, transactional and
    non-transactional logical messages; lsn_to_int/int_to_lsn agree with the server's pg_lsn.
  * the hand-built encoder below re-produces every captured message byte for byte, so the
    messages it builds for the fuzz tests are the real wire format;
  * on damaged input (truncated, trailing junk, replaced or flipped bytes, random bytes behind a
    valid type byte, a valid prefix spliced to random bytes) ``decode`` raises ``DecodeError`` and
    nothing else, and truncated or over-long messages never decode.

  * protocol 2 (streaming of in-progress transactions, from a real server): Stream Start (first
    block flagged), Stop, Abort of a subtransaction (its own xid) and Commit (the transaction's
    xid, LSNs in order), and the (sub)transaction xid that changes carry inside a block.

Leaves out: protocol versions 3-4 (two-phase, parallel apply; we never ask for them), the 'binary'
option, Origin and Type messages from a real server (only hand-built: they need replication
origins or user-defined types), and what the decoded changes mean for the warehouse (changes.py).
Fuzz sizes: PGR_FUZZ_EXAMPLES overrides the 300 examples per property.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pg_replication.source.pgoutput import (
    PG_EPOCH_MICROS,
    UNCHANGED,
    Begin,
    Commit,
    DecodeError,
    Delete,
    Insert,
    LogicalMessage,
    Origin,
    Relation,
    RelationColumn,
    Truncate,
    TypeMessage,
    Update,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    decode,
    decode_streamed,
    int_to_lsn,
    lsn_to_int,
)

FUZZ_EXAMPLES = int(os.environ.get("PGR_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TYPE_BY_BYTE = {
    ord("B"): Begin,
    ord("C"): Commit,
    ord("O"): Origin,
    ord("R"): Relation,
    ord("Y"): TypeMessage,
    ord("I"): Insert,
    ord("U"): Update,
    ord("D"): Delete,
    ord("T"): Truncate,
    ord("M"): LogicalMessage,
}

INT4, TEXT = 23, 25


# --------------------------------------------------------------------------- hand-built encoder


def _cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def _tuple(values) -> bytes:
    out = [struct.pack(">h", len(values))]
    for v in values:
        if v is None:
            out.append(b"n")
        elif v is UNCHANGED:
            out.append(b"u")
        else:
            raw = v.encode()
            out.append(b"t" + struct.pack(">i", len(raw)) + raw)
    return b"".join(out)


def encode(msg) -> bytes:
    """The pgoutput v1 bytes for a decoded message (the inverse of ``decode``)."""
    if isinstance(msg, Begin):
        return b"B" + struct.pack(">QqI", msg.final_lsn, msg.commit_time - PG_EPOCH_MICROS, msg.xid)
    if isinstance(msg, Commit):
        return b"C\0" + struct.pack(">QQq", msg.commit_lsn, msg.end_lsn, msg.commit_time - PG_EPOCH_MICROS)
    if isinstance(msg, Origin):
        return b"O" + struct.pack(">Q", msg.lsn) + _cstr(msg.name)
    if isinstance(msg, Relation):
        cols = b"".join(
            bytes([int(c.is_key)]) + _cstr(c.name) + struct.pack(">Ii", c.type_oid, c.typmod) for c in msg.columns
        )
        return (
            b"R" + struct.pack(">I", msg.oid) + _cstr(msg.schema) + _cstr(msg.name)
            + bytes([ord(msg.replica_identity)]) + struct.pack(">h", len(msg.columns)) + cols
        )
    if isinstance(msg, TypeMessage):
        return b"Y" + struct.pack(">I", msg.oid) + _cstr(msg.schema) + _cstr(msg.name)
    if isinstance(msg, Insert):
        return b"I" + struct.pack(">I", msg.relation) + b"N" + _tuple(msg.new)
    if isinstance(msg, Update):
        old = b"" if msg.old is None else (b"K" if msg.old_is_key else b"O") + _tuple(msg.old)
        return b"U" + struct.pack(">I", msg.relation) + old + b"N" + _tuple(msg.new)
    if isinstance(msg, Delete):
        return b"D" + struct.pack(">I", msg.relation) + (b"K" if msg.old_is_key else b"O") + _tuple(msg.old)
    if isinstance(msg, Truncate):
        options = int(msg.cascade) | (int(msg.restart_identity) << 1)
        oids = b"".join(struct.pack(">I", o) for o in msg.relations)
        return b"T" + struct.pack(">iB", len(msg.relations), options) + oids
    if isinstance(msg, LogicalMessage):
        return (
            b"M" + bytes([int(msg.transactional)]) + struct.pack(">Q", msg.lsn) + _cstr(msg.prefix)
            + struct.pack(">i", len(msg.content)) + msg.content
        )
    raise TypeError(msg)


# --------------------------------------------------------------------------- the real server


@pytest.fixture
def captured(pg):
    """Run every kind of change through a real pgoutput slot; return (rows, decoded, oids)."""
    pg.execute("CREATE TABLE items (id int PRIMARY KEY, name text, qty int, body text)")
    pg.execute("ALTER TABLE items ALTER COLUMN body SET STORAGE EXTERNAL")  # out of line, uncompressed
    pg.execute("CREATE TABLE full_ident (id int, note text)")
    pg.execute("ALTER TABLE full_ident REPLICA IDENTITY FULL")
    pg.execute("CREATE PUBLICATION p FOR TABLE items, full_ident")
    pg.execute("SELECT pg_create_logical_replication_slot('s', 'pgoutput')")
    # One statement per transaction (autocommit).
    pg.execute("INSERT INTO items VALUES (1, 'a', 10, repeat('x', 50000)), (2, NULL, NULL, 'short')")
    pg.execute("UPDATE items SET qty = 11 WHERE id = 1")  # body untouched: sent as 'u'
    pg.execute("UPDATE items SET id = 3 WHERE id = 2")  # key change: old key 'K'
    pg.execute("DELETE FROM items WHERE id = 3")
    pg.execute("INSERT INTO full_ident VALUES (1, 'x')")
    pg.execute("UPDATE full_ident SET note = 'y'")  # REPLICA IDENTITY FULL: old row 'O'
    pg.execute("DELETE FROM full_ident")
    pg.execute("SELECT pg_logical_emit_message(true, 'prefix', 'content')")
    pg.execute("SELECT pg_logical_emit_message(false, 'nontx', 'c2')")
    pg.execute("TRUNCATE items, full_ident RESTART IDENTITY CASCADE")
    rows = pg.execute(
        "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes("
        "'s', NULL, NULL, 'proto_version', '1', 'publication_names', 'p', 'messages', 'true')"
    ).fetchall()
    oids = dict(pg.execute("SELECT relname, oid::int8 FROM pg_class WHERE relname IN ('items', 'full_ident')"))
    return rows, [decode(bytes(data)) for _, data in rows], oids


def test_protocol_2_streamed_transaction_blocks(pg):
    if pg.info.server_version < 140000:
        pytest.skip("protocol 2 needs Postgres 14+")
    pg.execute("SET logical_decoding_work_mem = '64kB'")  # this session decodes: stream past 64kB
    pg.execute("CREATE TABLE items (id int PRIMARY KEY, body text)")
    pg.execute("CREATE PUBLICATION p FOR TABLE items")
    pg.execute("SELECT pg_create_logical_replication_slot('s', 'pgoutput')")
    with pg.transaction():
        xid = int(pg.execute("SELECT txid_current()").fetchone()[0]) & 0xFFFFFFFF
        pg.execute("INSERT INTO items SELECT g, repeat('a', 200) FROM generate_series(1, 2000) g")
        pg.execute("SAVEPOINT s")
        pg.execute("INSERT INTO items SELECT g, repeat('b', 200) FROM generate_series(2001, 4000) g")
        pg.execute("ROLLBACK TO SAVEPOINT s")
    rows = pg.execute(
        "SELECT data FROM pg_logical_slot_peek_binary_changes('s', NULL, NULL, 'proto_version', '2', "
        "'publication_names', 'p', 'streaming', 'on')"
    ).fetchall()
    in_block, seen, change_xids = False, [], set()
    for (data,) in rows:
        data = bytes(data)
        if in_block and data[:1] != b"E":
            sub, msg = decode_streamed(data)
            if isinstance(msg, Insert):
                change_xids.add(sub)
            continue
        msg = decode(data)
        seen.append(msg)
        in_block = isinstance(msg, StreamStart)
    starts = [m for m in seen if isinstance(m, StreamStart)]
    assert starts and starts[0] == StreamStart(xid, True) and all(not m.first_segment and m.xid == xid for m in starts[1:])
    assert sum(isinstance(m, StreamStop) for m in seen) == len(starts)
    (abort,) = [m for m in seen if isinstance(m, StreamAbort)]
    assert abort.xid == xid and abort.subxid != xid and change_xids == {xid, abort.subxid}
    commit = seen[-1]
    assert isinstance(commit, StreamCommit) and commit.xid == xid and commit.commit_lsn < commit.end_lsn


def _transactions(msgs):
    """Split into [(Begin, [changes], Commit)] plus the messages outside any transaction."""
    txs, outside, current = [], [], None
    for m in msgs:
        if isinstance(m, Begin):
            assert current is None, "Begin inside a transaction"
            current = (m, [])
        elif isinstance(m, Commit):
            assert current is not None, "Commit without Begin"
            txs.append((current[0], current[1], m))
            current = None
        elif current is None:
            outside.append(m)
        else:
            current[1].append(m)
    assert current is None, "transaction never committed"
    return txs, outside


def _changes(txs):
    return [[m for m in changes if not isinstance(m, Relation)] for _, changes, _ in txs]


def test_begin_commit_pairing_and_lsn_order(captured, pg):
    rows, msgs, _ = captured
    txs, outside = _transactions(msgs)
    assert len(txs) == 9
    assert [type(m) for m in outside] == [LogicalMessage]
    now_us = int(pg.execute("SELECT (extract(epoch from clock_timestamp()) * 1000000)::int8").fetchone()[0])
    previous_end = 0
    for begin, _, commit in txs:
        assert begin.final_lsn == commit.commit_lsn
        assert commit.end_lsn > commit.commit_lsn > previous_end
        assert begin.commit_time == commit.commit_time
        assert now_us - 60_000_000 < commit.commit_time <= now_us
        previous_end = commit.end_lsn
    xids = [b.xid for b, _, _ in txs]
    assert xids == sorted(xids) and len(set(xids)) == len(xids) and xids[0] > 0
    row_lsns = [lsn_to_int(lsn) for lsn, _ in rows]
    assert row_lsns == sorted(row_lsns)


def test_relations_columns_keys_and_identity(captured):
    _, msgs, oids = captured
    relations = {m.name: m for m in msgs if isinstance(m, Relation)}
    items, full = relations["items"], relations["full_ident"]
    assert (items.oid, items.schema, items.replica_identity) == (oids["items"], "public", "d")
    assert items.columns == (
        RelationColumn("id", INT4, -1, True),
        RelationColumn("name", TEXT, -1, False),
        RelationColumn("qty", INT4, -1, False),
        RelationColumn("body", TEXT, -1, False),
    )
    assert (full.oid, full.schema, full.replica_identity) == (oids["full_ident"], "public", "f")
    # Under REPLICA IDENTITY FULL every column is part of the identity.
    assert full.columns == (RelationColumn("id", INT4, -1, True), RelationColumn("note", TEXT, -1, True))
    # A Relation precedes the first change of its table within the decoding session.
    first_change = next(i for i, m in enumerate(msgs) if isinstance(m, Insert) and m.relation == items.oid)
    assert any(isinstance(m, Relation) and m.oid == items.oid for m in msgs[:first_change])


def test_row_changes(captured):
    _, msgs, oids = captured
    items, full = oids["items"], oids["full_ident"]
    txs, _ = _transactions(msgs)
    changes = _changes(txs)
    assert changes[0] == [Insert(items, ("1", "a", "10", "x" * 50000)), Insert(items, ("2", None, None, "short"))]
    # Key unchanged: no old tuple; the out-of-line body nobody touched is not sent.
    assert changes[1] == [Update(items, ("1", "a", "11", UNCHANGED), None, False)]
    assert changes[1][0].new[3] is UNCHANGED
    # Key change: the old key, non-key columns as NULL.
    assert changes[2] == [Update(items, ("3", None, None, "short"), ("2", None, None, None), True)]
    assert changes[3] == [Delete(items, ("3", None, None, None), True)]
    assert changes[4] == [Insert(full, ("1", "x"))]
    assert changes[5] == [Update(full, ("1", "y"), ("1", "x"), False)]
    assert changes[6] == [Delete(full, ("1", "y"), False)]


def test_messages_and_truncate(captured):
    _, msgs, oids = captured
    txs, outside = _transactions(msgs)
    changes = _changes(txs)
    (message,) = changes[7]
    assert (message.transactional, message.prefix, message.content) == (True, "prefix", b"content")
    assert txs[6][2].end_lsn <= message.lsn <= txs[7][2].commit_lsn
    (nontx,) = outside
    assert (nontx.transactional, nontx.prefix, nontx.content) == (False, "nontx", b"c2")
    assert txs[7][2].end_lsn <= nontx.lsn < txs[8][0].final_lsn
    assert changes[8] == [Truncate((oids["items"], oids["full_ident"]), cascade=True, restart_identity=True)]


def test_hand_built_encoder_matches_the_server_byte_for_byte(captured):
    rows, msgs, _ = captured
    assert len(rows) == len(msgs) > 0
    for (_, data), msg in zip(rows, msgs):
        assert encode(msg) == bytes(data), msg


def test_lsn_conversions_agree_with_pg_lsn(captured, pg):
    rows, msgs, _ = captured
    lsns = {lsn for lsn, _ in rows} | {int_to_lsn(m.end_lsn) for m in msgs if isinstance(m, Commit)}
    lsns |= {"0/0", "0/1", "1/0", "16/B374D848", "FFFFFFFF/FFFFFFFF"}
    for lsn in sorted(lsns):
        as_num, text = pg.execute("SELECT %s::pg_lsn - '0/0'::pg_lsn, %s::pg_lsn::text", (lsn, lsn)).fetchone()
        assert lsn_to_int(lsn) == int(as_num)
        assert int_to_lsn(int(as_num)) == text
    assert lsn_to_int("16/b374d848") == 0x16_B374_D848  # lower case, as some tools print it


@FUZZ
@given(st.integers(min_value=0, max_value=2**64 - 1))
@example(0)
@example(2**64 - 1)
@example(2**32)
def test_lsn_round_trip(value):
    text = int_to_lsn(value)
    assert lsn_to_int(text) == value
    hi, lo = text.split("/")
    assert hi == hi.upper() and not (len(hi) > 1 and hi.startswith("0")) and not (len(lo) > 1 and lo.startswith("0"))


# --------------------------------------------------------------------------- fuzzing

_names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
_values = st.one_of(st.none(), st.just(UNCHANGED), st.text(st.characters(codec="utf-8"), max_size=20))
_tuples = st.lists(_values, max_size=6).map(tuple)
_u32 = st.integers(0, 2**32 - 1)
_u64 = st.integers(0, 2**64 - 1)
_i32 = st.integers(-(2**31), 2**31 - 1)
_time = st.integers(-(2**63), 2**63 - 1).map(lambda t: t + PG_EPOCH_MICROS)

valid_messages = st.one_of(
    st.builds(Begin, _u64, _time, _u32),
    st.builds(Commit, _u64, _u64, _time),
    st.builds(Origin, _u64, _names),
    st.builds(
        Relation, _u32, _names, _names, st.sampled_from("dnfi"),
        st.lists(st.builds(RelationColumn, _names, _u32, _i32, st.booleans()), max_size=5).map(tuple),
    ),
    st.builds(TypeMessage, _u32, _names, _names),
    st.builds(Insert, _u32, _tuples),
    st.builds(Update, _u32, _tuples, st.none(), st.just(False)),
    st.builds(Update, _u32, _tuples, _tuples, st.booleans()),
    st.builds(Delete, _u32, _tuples, st.booleans()),
    st.builds(Truncate, st.lists(_u32, max_size=5).map(tuple), st.booleans(), st.booleans()),
    st.builds(LogicalMessage, st.booleans(), _u64, _names, st.binary(max_size=20)),
)
valid_bytes = valid_messages.map(encode)


def _decode_or_error(data: bytes):
    """decode() must return a message of the leading byte's type or raise DecodeError: nothing else."""
    try:
        msg = decode(data)
    except DecodeError:
        return None
    assert type(msg) is TYPE_BY_BYTE[data[0]]
    assert decode(encode(msg)) == msg  # whatever it accepted is a well-formed message
    return msg


@FUZZ
@given(valid_messages)
def test_valid_messages_round_trip(msg):
    assert decode(encode(msg)) == msg


@FUZZ
@given(valid_bytes, st.data())
def test_truncated_messages_never_decode(data, draw):
    cut = draw.draw(st.integers(0, len(data) - 1), label="cut")
    with pytest.raises(DecodeError):
        decode(data[:cut])


@FUZZ
@given(valid_bytes, st.binary(min_size=1, max_size=16))
def test_trailing_junk_never_decodes(data, junk):
    with pytest.raises(DecodeError, match="trailing bytes"):
        decode(data + junk)


@FUZZ
@given(valid_bytes, st.data())
def test_replaced_and_flipped_bytes_raise_only_decode_error(data, draw):
    damaged = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4), label="edits")):
        pos = draw.draw(st.integers(0, len(damaged) - 1), label="pos")
        if draw.draw(st.booleans(), label="flip"):
            damaged[pos] ^= 1 << draw.draw(st.integers(0, 7), label="bit")
        else:
            damaged[pos] = draw.draw(st.integers(0, 255), label="byte")
    _decode_or_error(bytes(damaged))


@FUZZ
@given(st.sampled_from(sorted(TYPE_BY_BYTE)), st.binary(max_size=64))
def test_random_bytes_after_a_valid_type_byte(kind, body):
    _decode_or_error(bytes([kind]) + body)


@FUZZ
@given(valid_bytes, st.data())
def test_valid_prefix_spliced_to_random_bytes(data, draw):
    cut = draw.draw(st.integers(1, len(data)), label="cut")
    tail = draw.draw(st.binary(max_size=32), label="tail")
    _decode_or_error(data[:cut] + tail)


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "empty"),
        (b"Z", "unknown pgoutput message type"),
        (b"I" + struct.pack(">I", 1) + b"X" + _tuple(("1",)), "expected 'N'"),
        (b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", -1), "negative column count"),
        (b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 1) + b"t" + struct.pack(">i", -1), "bad value length"),
        (b"I" + struct.pack(">IBhBi", 1, ord("N"), 1, ord("t"), 1) + b"\xff", "not UTF-8"),
        (b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 1) + b"b" + struct.pack(">i", 1) + b"\x01", "binary"),
        (b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 1) + b"?", "unknown tuple value kind"),
        (b"U" + struct.pack(">I", 1) + b"K" + _tuple(("1",)) + b"K" + _tuple(("1",)), "expected 'N'"),
        (b"D" + struct.pack(">I", 1) + b"N" + _tuple(("1",)), "expected 'K' or 'O'"),
        (b"R" + struct.pack(">I", 1) + b"public\0t", "unterminated string"),
        (b"R" + struct.pack(">I", 1) + b"p\xffblic\0t\0d" + struct.pack(">h", 0), "not UTF-8"),
        (b"T" + struct.pack(">iB", -1, 0), "negative relation count"),
        (b"T" + struct.pack(">iB", 2**31 - 1, 0) + struct.pack(">I", 1), "truncated"),
        (b"M\x01" + struct.pack(">Q", 1) + b"p\0" + struct.pack(">i", -5), "negative length"),
        (b"M\x01" + struct.pack(">Q", 1) + b"p\0" + struct.pack(">i", 5) + b"abc", "truncated"),
    ],
)
def test_malformed_messages_name_the_problem(data, fragment):
    with pytest.raises(DecodeError, match=fragment):
        decode(data)
