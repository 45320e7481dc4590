"""Decode pgoutput (protocol version 1) messages: bytes in, small frozen dataclasses out.

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


Message = Begin | Commit | Origin | Relation | TypeMessage | Insert | Update | Delete | Truncate | LogicalMessage

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

    def tuple_data(self) -> tuple[Value, ...]:
        # The hot path of CDC: one call per row change, so it avoids per-field method calls.
        buf, pos, size = self.buf, self.pos, len(self.buf)
        if pos + 2 > size:
            raise self.fail("truncated tuple header")
        n = _I16.unpack_from(buf, pos)[0]
        pos += 2
        if n < 0:
            raise self.fail(f"negative column count {n}")
        values: list[Value] = []
        append = values.append
        unpack_i32 = _I32.unpack_from
        for _ in range(n):
            if pos >= size:
                self.pos = pos
                raise self.fail("truncated tuple")
            kind = buf[pos]
            if kind == 0x74:  # 't' text
                if pos + 5 > size:
                    self.pos = pos
                    raise self.fail("truncated value length")
                length = unpack_i32(buf, pos + 1)[0]
                start = pos + 5
                pos = start + length
                if length < 0 or pos > size:
                    self.pos = start
                    raise self.fail(f"bad value length {length}")
                try:
                    append(buf[start:pos].decode())
                except UnicodeDecodeError:
                    self.pos = start
                    raise self.fail("value is not UTF-8 (is the database encoding UTF8?)") from None
            elif kind == 0x6E:  # 'n' null
                append(None)
                pos += 1
            elif kind == 0x75:  # 'u' unchanged TOAST
                append(UNCHANGED)
                pos += 1
            elif kind == 0x62:  # 'b' binary: only with the binary option, which we never ask for
                self.pos = pos
                raise self.fail("binary tuple value (binary option is not supported)")
            else:
                self.pos = pos
                raise self.fail(f"unknown tuple value kind {kind!r}")
        self.pos = pos
        return tuple(values)

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise self.fail(f"{len(self.buf) - self.pos} trailing bytes")


def decode(data: bytes) -> Message:
    """Decode one pgoutput message (one row of pg_logical_slot_peek_binary_changes)."""
    if not data:
        raise DecodeError("empty pgoutput message")
    kind = chr(data[0])
    r = _Reader(data if isinstance(data, bytes) else bytes(data), kind)
    msg: Message
    if kind == "B":
        msg = Begin(r.u64(), r.i64() + PG_EPOCH_MICROS, r.u32())
    elif kind == "C":
        r.u8()  # flags, unused
        msg = Commit(r.u64(), r.u64(), r.i64() + PG_EPOCH_MICROS)
    elif kind == "I":
        rel = r.u32()
        if r.u8() != 0x4E:
            raise r.fail("expected 'N' before the new tuple")
        msg = Insert(rel, r.tuple_data())
    elif kind == "U":
        rel = r.u32()
        marker = r.u8()
        old: tuple[Value, ...] | None = None
        old_is_key = False
        if marker in (0x4B, 0x4F):  # 'K' key or 'O' old row
            old_is_key = marker == 0x4B
            old = r.tuple_data()
            marker = r.u8()
        if marker != 0x4E:
            raise r.fail("expected 'N' before the new tuple")
        msg = Update(rel, r.tuple_data(), old, old_is_key)
    elif kind == "D":
        rel = r.u32()
        marker = r.u8()
        if marker not in (0x4B, 0x4F):
            raise r.fail("expected 'K' or 'O' before the old tuple")
        msg = Delete(rel, r.tuple_data(), marker == 0x4B)
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
    elif kind == "M":
        flags = r.u8()
        lsn = r.u64()
        prefix = r.cstr()
        msg = LogicalMessage(bool(flags & 1), lsn, prefix, r.raw(r.i32()))
    else:
        raise DecodeError(f"unknown pgoutput message type {kind!r} (0x{data[0]:02x})")
    r.done()
    return msg


def lsn_to_int(lsn: str) -> int:
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def int_to_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"
