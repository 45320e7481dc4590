"""A slice read by several sessions of its snapshot at once, as one stream of Postgres binary COPY
tuples: for a target that writes them with one ``COPY … FROM STDIN (FORMAT binary)`` in its own
transaction (the Postgres replica).

Each session reads its share of the slice's pieces with ``COPY (…) TO STDOUT (FORMAT binary)``.
Postgres sends each row of a COPY TO as one CopyData message, the file header in front of the
first row and the trailer as a message of its own (copyto.c), so a run of whole messages is a run
of whole tuples: runs from different sessions interleave under the one header the consumer
writes. A message that breaks that layout fails the read rather than corrupt the target.
"""

from __future__ import annotations

import queue
import struct
import threading
from collections.abc import Callable, Iterator

from psycopg import sql

from pg_replication.source.snapshot import SliceReader, put_unless_stopped
from pg_replication.types import TypeMapping

SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
HEADER = SIGNATURE + bytes(8)  # no flags, no header extension
TRAILER = b"\xff\xff"
_BLOCK_BYTES = 1 << 18  # tuples handed over at a time: few queue operations, little memory


class MergedTuples:
    """Iterate for blocks of whole binary tuples (no header, no trailer) of every row of the
    slice, from ``sessions`` threads; ``rows`` counts them. Leaving the iteration early (or an
    error in a session) stops every session; their transactions end with their connections."""

    def __init__(
        self,
        reader: SliceReader,
        select: Callable[[str, TypeMapping], sql.Composable],
        *extra: sql.Composable,
        sessions: int = 2,
    ) -> None:
        reader.claim_raw()
        self.reader, self.select, self.extra = reader, select, extra
        self.work: queue.SimpleQueue = queue.SimpleQueue()
        for piece in reader.pieces:
            self.work.put(piece)
        self.out: queue.Queue = queue.Queue(maxsize=2 * sessions)
        self.stop = threading.Event()
        self.rows = 0
        self.threads = [
            threading.Thread(target=self._session, name=f"pgr-copy-{i}", daemon=True)
            for i in range(max(1, min(sessions, len(reader.pieces))))
        ]

    def __iter__(self) -> Iterator[bytes]:
        for t in self.threads:
            t.start()
        try:
            finished = 0
            while finished < len(self.threads):
                item = self.out.get()
                if isinstance(item, tuple):
                    block, rows = item
                    self.rows += rows
                    yield block
                    continue
                finished += 1
                if isinstance(item, BaseException):
                    raise item
        finally:
            self.close()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            if t.is_alive():
                t.join(timeout=60)

    def _session(self) -> None:
        outcome: BaseException | None = None
        try:
            with self.reader.session() as conn:
                while not self.stop.is_set():
                    try:
                        piece = self.work.get_nowait()
                    except queue.Empty:
                        break
                    with conn.cursor().copy(self.reader.binary_copy_of(piece, self.select, *self.extra)) as copy:
                        self._forward(iter(copy))
        except _Stopped:
            pass
        except BaseException as exc:  # re-raised by the consumer
            outcome = exc
        self._put(outcome if outcome is not None else _Finished())

    def _forward(self, messages: Iterator) -> None:
        block: list = []
        size = 0
        first = True
        for message in messages:
            if first:
                message = _after_header(message)
                first = False
                if not message:  # the header alone
                    continue
            length = len(message)
            # A tuple starts with its field count (at least 1 here); the trailer is that count -1.
            if length <= 2 or message[0] == 0xFF:
                if bytes(message) != TRAILER:
                    raise ValueError(f"binary COPY: a message of {length} bytes where a tuple was expected")
                continue
            block.append(message)
            size += length
            if size >= _BLOCK_BYTES:
                self._hand_over(block)
                block, size = [], 0
        if block:
            self._hand_over(block)

    def _hand_over(self, block: list) -> None:
        if self.stop.is_set():
            raise _Stopped()
        self._put((b"".join(block), len(block)))

    def _put(self, item: object) -> None:
        put_unless_stopped(self.out, item, self.stop)


def _after_header(message) -> memoryview:
    """The first message without the file header (which must be Postgres's: no flags)."""
    view = memoryview(message)
    if bytes(view[: len(SIGNATURE)]) != SIGNATURE or len(view) < len(HEADER):
        raise ValueError("binary COPY: the output does not start with a COPY file header")
    flags, extension = struct.unpack("!ii", view[len(SIGNATURE) : len(HEADER)])
    if flags != 0:
        raise ValueError(f"binary COPY: unexpected header flags {flags:#x}")
    return view[len(HEADER) + extension :]


class _Finished:
    """A session read all its pieces."""


class _Stopped(Exception):
    """The consumer stopped early."""
