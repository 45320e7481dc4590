"""Decode pgoutput messages (protocol versions 1 and 2): bytes in, small frozen dataclasses out.

Protocol 2 adds the messages of a large transaction streamed while in progress (Stream Start,
Stop, Commit, Abort); between a Stream Start and its Stop, every change message carries the xid
of the (sub)transaction that made it: ``decode_streamed`` returns it beside the message.

Only decoding lives here; what the changes mean for a warehouse is ``changes.py``'s job. Every
malformed input raises ``DecodeError`` naming the message type and offset: the decoder never
guesses, never loops on its input, and never returns a partly decoded message.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pg_replication.errors import PgReplicationError

PG_EPOCH_MICROS = 946_684_800_000_000  # 2000-01-01 in Unix microseconds


class DecodeError(PgReplicationError):
    default_hint = "this is a bug or a protocol version we do not speak; report it with the LSN"


# A tuple's column values: str (text form), None (NULL) or UNCHANGED (unchanged TOAST value).
class _Unchanged:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __reduce__(self):
        return "UNCHANGED"


UNCHANGED = _Unchanged()
Value = str | None | _Unchanged


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    commit_time: int  # µs since the Unix epoch
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    commit_lsn: int
    end_lsn: int
    commit_time: int


@dataclass(frozen=True, slots=True)
class Origin:
    lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class RelationColumn:
    name: str
    type_oid: int
    typmod: int
    is_key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    schema: str
    name: str
    replica_identity: str
    columns: tuple[RelationColumn, ...]


@dataclass(frozen=True, slots=True)
class TypeMessage:
    oid: int
    schema: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    relation: int
    new: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class Update:
    relation: int
    new: tuple[Value, ...]
    old: tuple[Value, ...] | None  # key columns ('K') or the whole old row ('O'), when sent
    old_is_key: bool


@dataclass(frozen=True, slots=True)
class Delete:
    relation: int
    old: tuple[Value, ...]
    old_is_key: bool


@dataclass(frozen=True, slots=True)
class Truncate:
    relations: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


@dataclass(frozen=True, slots=True)
class StreamStart:
    xid: int
    first_segment: bool  # the first block of this transaction in this session


@dataclass(frozen=True, slots=True)
class StreamStop:
    pass


@dataclass(frozen=True, slots=True)
class StreamCommit:
    xid: int
    commit_lsn: int
    end_lsn: int
    commit_time: int


@dataclass(frozen=True, slots=True)
class StreamAbort:
    xid: int
    subxid: int  # == xid: the whole transaction; otherwise only this subtransaction's changes


Message = StreamStart | StreamStop | StreamCommit | StreamAbort | Begin | Commit | Origin | Relation | TypeMessage | Insert | Update | Delete | Truncate | LogicalMessage

_I64 = struct.Struct(">q")
_U64 = struct.Struct(">Q")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_I16 = struct.Struct(">h")


class _Reader:
    __slots__ = ("buf", "pos", "kind")

    def __init__(self, buf: bytes, kind: str) -> None:
        self.buf = buf
        self.pos = 1
        self.kind = kind

    def fail(self, what: str) -> DecodeError:
        return DecodeError(f"pgoutput {self.kind!r} message: {what} at byte {self.pos} of {len(self.buf)}")

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise self.fail(f"truncated (needs {n} more bytes)")

    def u8(self) -> int:
        self.need(1)
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def i16(self) -> int:
        self.need(2)
        v = _I16.unpack_from(self.buf, self.pos)[0]
        self.pos += 2
        return v

    def i32(self) -> int:
        self.need(4)
        v = _I32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return v

    def u32(self) -> int:
        self.need(4)
        v = _U32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return v

    def u64(self) -> int:
        self.need(8)
        v = _U64.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return v

    def i64(self) -> int:
        self.need(8)
        v = _I64.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return v

    def cstr(self) -> str:
        end = self.buf.find(b"\0", self.pos)
        if end < 0:
            raise self.fail("unterminated string")
        try:
            s = self.buf[self.pos : end].decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("string is not UTF-8") from None
        self.pos = end + 1
        return s

    def raw(self, n: int) -> bytes:
        if n < 0:
            raise self.fail(f"negative length {n}")
        self.need(n)
        v = self.buf[self.pos : self.pos + n]
        self.pos += n
        return v

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise self.fail(f"{len(self.buf) - self.pos} trailing bytes")


def _fail(kind: str, buf: bytes, pos: int, what: str) -> DecodeError:
    return DecodeError(f"pgoutput {kind!r} message: {what} at byte {pos} of {len(buf)}")


def _tuple(buf: bytes, pos: int, kind_name: str) -> tuple[tuple[Value, ...], int]:
    """TupleData at ``pos``: the values and the position after them. The hot path of CDC (one
    call per row change), so it avoids per-field calls."""
    size = len(buf)
    if pos + 2 > size:
        raise _fail(kind_name, buf, pos, "truncated tuple header")
    n = _I16.unpack_from(buf, pos)[0]
    pos += 2
    if n < 0:
        raise _fail(kind_name, buf, pos, f"negative column count {n}")
    values: list[Value] = []
    append = values.append
    unpack_i32 = _I32.unpack_from
    for _ in range(n):
        if pos >= size:
            raise _fail(kind_name, buf, pos, "truncated tuple")
        kind = buf[pos]
        if kind == 0x74:  # 't' text
            if pos + 5 > size:
                raise _fail(kind_name, buf, pos, "truncated value length")
            length = unpack_i32(buf, pos + 1)[0]
            start = pos + 5
            pos = start + length
            if length < 0 or pos > size:
                raise _fail(kind_name, buf, start, f"bad value length {length}")
            try:
                append(buf[start:pos].decode())
            except UnicodeDecodeError:
                raise _fail(kind_name, buf, start, "value is not UTF-8 (is the database encoding UTF8?)") from None
        elif kind == 0x6E:  # 'n' null
            append(None)
            pos += 1
        elif kind == 0x75:  # 'u' unchanged TOAST
            append(UNCHANGED)
            pos += 1
        elif kind == 0x62:  # 'b' binary: only with the binary option, which we never ask for
            raise _fail(kind_name, buf, pos, "binary tuple value (binary option is not supported)")
        else:
            raise _fail(kind_name, buf, pos, f"unknown tuple value kind {kind!r}")
    return tuple(values), pos


_REL_MARKER = struct.Struct(">IB")


def _decode_insert(data: bytes) -> Insert:
    if len(data) < 6:
        raise _fail("I", data, len(data), "truncated (needs 5 more bytes)")
    rel, marker = _REL_MARKER.unpack_from(data, 1)
    if marker != 0x4E:
        raise _fail("I", data, 5, "expected 'N' before the new tuple")
    values, pos = _tuple(data, 6, "I")
    if pos != len(data):
        raise _fail("I", data, pos, f"{len(data) - pos} trailing bytes")
    return Insert(rel, values)


def _decode_update(data: bytes) -> Update:
    if len(data) < 6:
        raise _fail("U", data, len(data), "truncated (needs 5 more bytes)")
    rel, marker = _REL_MARKER.unpack_from(data, 1)
    pos = 6
    old = None
    if marker in (0x4B, 0x4F):  # 'K' key or 'O' old row
        old, pos = _tuple(data, pos, "U")
        if pos >= len(data):
            raise _fail("U", data, pos, "truncated before the new tuple")
        new_marker = data[pos]
        pos += 1
    else:
        new_marker = marker
    if new_marker != 0x4E:
        raise _fail("U", data, pos, "expected 'N' before the new tuple")
    values, pos = _tuple(data, pos, "U")
    if pos != len(data):
        raise _fail("U", data, pos, f"{len(data) - pos} trailing bytes")
    return Update(rel, values, old, marker == 0x4B)


def _decode_delete(data: bytes) -> Delete:
    if len(data) < 6:
        raise _fail("D", data, len(data), "truncated (needs 5 more bytes)")
    rel, marker = _REL_MARKER.unpack_from(data, 1)
    if marker not in (0x4B, 0x4F):
        raise _fail("D", data, 5, "expected 'K' or 'O' before the old tuple")
    old, pos = _tuple(data, 6, "D")
    if pos != len(data):
        raise _fail("D", data, pos, f"{len(data) - pos} trailing bytes")
    return Delete(rel, old, marker == 0x4B)


_FAST = {0x49: _decode_insert, 0x55: _decode_update, 0x44: _decode_delete}


def decode(data: bytes) -> Message:
    """Decode one pgoutput message (one row of pg_logical_slot_peek_binary_changes)."""
    if not data:
        raise DecodeError("empty pgoutput message")
    fast = _FAST.get(data[0])
    if fast is not None:  # row changes: the common messages, decoded without a reader object
        return fast(data if isinstance(data, bytes) else bytes(data))
    kind = chr(data[0])
    r = _Reader(data if isinstance(data, bytes) else bytes(data), kind)
    msg: Message
    if kind == "B":
        msg = Begin(r.u64(), r.i64() + PG_EPOCH_MICROS, r.u32())
    elif kind == "C":
        r.u8()  # flags, unused
        msg = Commit(r.u64(), r.u64(), r.i64() + PG_EPOCH_MICROS)
    elif kind == "R":
        oid, schema, name, ident = r.u32(), r.cstr(), r.cstr(), chr(r.u8())
        ncols = r.i16()
        if ncols < 0:
            raise r.fail(f"negative column count {ncols}")
        cols = []
        for _ in range(ncols):
            flags = r.u8()
            cols.append(RelationColumn(r.cstr(), r.u32(), r.i32(), bool(flags & 1)))
        msg = Relation(oid, schema, name, ident, tuple(cols))
    elif kind == "T":
        n = r.i32()
        if n < 0:
            raise r.fail(f"negative relation count {n}")
        options = r.u8()
        msg = Truncate(tuple(r.u32() for _ in range(n)), bool(options & 1), bool(options & 2))
    elif kind == "Y":
        msg = TypeMessage(r.u32(), r.cstr(), r.cstr())
    elif kind == "O":
        msg = Origin(r.u64(), r.cstr())
    elif kind == "S":
        msg = StreamStart(r.u32(), r.u8() == 1)
    elif kind == "E":
        msg = StreamStop()
    elif kind == "c":
        xid = r.u32()
        r.u8()  # flags, unused
        msg = StreamCommit(xid, r.u64(), r.u64(), r.i64() + PG_EPOCH_MICROS)
    elif kind == "A":
        msg = StreamAbort(r.u32(), r.u32())
    elif kind == "M":
        flags = r.u8()
        lsn = r.u64()
        prefix = r.cstr()
        msg = LogicalMessage(bool(flags & 1), lsn, prefix, r.raw(r.i32()))
    else:
        raise DecodeError(f"unknown pgoutput message type {kind!r} (0x{data[0]:02x})")
    r.done()
    return msg


_WITH_XID = frozenset(b"IUDTRYM")  # message types that carry an xid inside a streamed block


def decode_streamed(data: bytes) -> tuple[int | None, Message]:
    """Decode one message read between a Stream Start and its Stop: the changes carry the xid of
    their (sub)transaction after the type byte (protocol 2). Returns (xid or None, message)."""
    if data and data[0] in _WITH_XID:
        if len(data) < 5:
            raise DecodeError(f"pgoutput {chr(data[0])!r} message in a streamed block: truncated before its xid")
        return _U32.unpack_from(data, 1)[0], decode(data[:1] + data[5:])
    return None, decode(data)


def lsn_to_int(lsn: str) -> int:
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def int_to_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"
