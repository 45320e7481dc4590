"""Read the slot through the streaming replication protocol (``START_REPLICATION … LOGICAL``).

psycopg 3 cannot stream replication (COPY_BOTH); psycopg2's ``LogicalReplicationConnection`` can.
The server sends pgoutput messages as it decodes them: nothing is built up on the source for a
read (the SQL functions materialize their whole result first, spilling to temp files), and a
read that stops early has cost the source only what it sent.

psycopg2 opens the session; the messages are read in C (``_rowdecode.CopyReader``, on
psycopg2's own libpq connection), many per call, and the row changes of relations the drain
routes (``route_changes``) go straight into their compiled decoder without reaching Python.

The slot is confirmed (standby feedback ``flush``) only by ``confirm``, after the warehouse has
committed the position. A keepalive the server asks a reply to (after ``wal_sender_timeout / 2``
without one) is answered with the last position confirmed that way (none yet: 0, which the
server ignores), so the slot is never told more than the warehouse holds. Only one session may
stream a slot: a busy slot raises ``SlotBusyError``.

With ``streaming`` (Postgres 14+, pgoutput protocol 2), a transaction that outgrows the server's
``logical_decoding_work_mem`` is sent in parts while still in progress instead of being spilled
to files on the source and sent whole at its commit (``streamed.py`` keeps the parts).
"""

from __future__ import annotations

import ctypes
import functools
import os
import time
from collections.abc import Iterator

import psycopg2
import psycopg2._psycopg
import psycopg2.errorcodes
import psycopg2.errors
import psycopg2.extras

from pg_replication.errors import SourceNotReadyError, SourceUnavailableError, redact
from pg_replication.source import _rowdecode
from pg_replication.source.connection import APPLICATION_NAME, describe_target
from pg_replication.source.slot import SlotBusyError, SlotMissingError
from pg_replication.types import SESSION_OPTIONS

# psycopg2 would send feedback on its own every status_interval (10 s) while it reads: it never
# reads here, and must not send feedback anyway (only confirm does).
_NEVER = 10.0**9

_LIBPQ_FUNCTIONS = (  # in _copyboth.c's order
    "PQgetCopyData", "PQconsumeInput", "PQfreemem", "PQgetResult", "PQresultStatus",
    "PQresultErrorMessage", "PQresultErrorField", "PQclear", "PQerrorMessage", "PQsocket",
)


@functools.cache
def _bind_libpq() -> None:
    """Hand the C reader the libpq functions of the library psycopg2's connections belong to.
    Looked up through psycopg2's extension module (dlsym searches the libraries it was linked
    with), already loaded (RTLD_NOLOAD: never a second copy): psycopg2-binary bundles its own
    libpq, psycopg 3 may load another, and only psycopg2's may touch psycopg2's PGconn."""
    lib = ctypes.CDLL(psycopg2._psycopg.__file__, mode=os.RTLD_NOLOAD | os.RTLD_NOW)
    _rowdecode.bind_libpq(tuple(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in _LIBPQ_FUNCTIONS))



class SlotStream:
    """One streaming session on ``slot`` from ``start_lsn``. Iterate it for message payloads
    (bytes); ``None`` is yielded whenever no message came for ``poll_seconds``, so the reader can
    decide to stop (``quiet_for``, ``server_end``). Close it at the end of the drain (or use it as a context
    manager)."""

    def __init__(
        self,
        conninfo: str,
        slot: str,
        publication: str,
        start_lsn: int,
        *,
        poll_seconds: float = 0.05,
        busy_seconds: float = 5.0,
        streaming: bool | None = False,
    ) -> None:
        self.slot, self.publication, self.start_lsn = slot, publication, start_lsn
        # Protocol 2: large transactions arrive in parts while in progress (None: when the server
        # has it, Postgres 14+).
        self.streaming = streaming
        self.poll_seconds = poll_seconds
        self.server_end = start_lsn  # the server decoded (and sent all messages) below this
        self._last_message = time.monotonic()
        self._reader: _rowdecode.CopyReader | None = None
        try:
            self._conn = psycopg2.connect(
                conninfo,
                connection_factory=psycopg2.extras.LogicalReplicationConnection,
                application_name=APPLICATION_NAME,
                connect_timeout=10,
                options=SESSION_OPTIONS,  # pgoutput formats values with the walsender's settings
            )
        except psycopg2.OperationalError as exc:
            text = str(exc).strip()
            raise SourceUnavailableError(
                f"cannot open a replication connection to Postgres at {describe_target(conninfo)}: "
                f"{redact(text.splitlines()[-1] if text else repr(exc))}",
                setting="POSTGRES_URL",
            ) from None
        self._cur = self._conn.cursor()
        give_up = time.monotonic() + busy_seconds
        try:
            while True:
                try:
                    self._start()
                    break
                except SlotBusyError:
                    # the session of a drain that just ended (or was killed) lets go in a moment
                    if time.monotonic() >= give_up:
                        raise
                    time.sleep(0.1)
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        if self.streaming is None:
            self.streaming = self._conn.server_version >= 140000
        with self._errors():
            self._cur.start_replication(
                slot_name=self.slot,
                decode=False,
                start_lsn=self.start_lsn,
                status_interval=_NEVER,
                options={
                    "publication_names": _quote_ident(self.publication),
                    "messages": "true",
                    **({"proto_version": "2", "streaming": "on"} if self.streaming else {"proto_version": "1"}),
                },
            )
        _bind_libpq()
        self._reader = _rowdecode.CopyReader(self._conn.pgconn_ptr)
        self._last_message = time.monotonic()

    def __enter__(self) -> SlotStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def quiet_for(self) -> float:
        """Seconds since the last data message."""
        return time.monotonic() - self._last_message

    @property
    def bytes(self) -> int:
        """pgoutput bytes read (routed row changes included)."""
        return self._reader.bytes if self._reader is not None else 0

    def route_changes(self, routes: dict, touched: set) -> None:
        """From now on, a row change (Insert, Update, Delete outside a streamed transaction's
        block) of a relation oid in ``routes`` is offered to its ``RowColumns``; taken, it is
        counted (``routed_changes``, ``routed_bytes``), its oid is added to ``touched``, and it
        is not yielded. The caller keeps both up to date as it reads; ``skip_changes`` and
        ``in_stream_block`` say what the messages it saw mean for the next ones."""
        assert self._reader is not None
        self._reader.route(routes, touched)

    @property
    def routed_changes(self) -> int:
        return self._reader.changes if self._reader is not None else 0

    @property
    def routed_bytes(self) -> int:
        return self._reader.change_bytes if self._reader is not None else 0

    @property
    def skip_changes(self) -> bool:
        return bool(self._reader and self._reader.skipping)

    @skip_changes.setter
    def skip_changes(self, value: bool) -> None:
        assert self._reader is not None
        self._reader.skipping = value

    @property
    def in_stream_block(self) -> bool:
        return bool(self._reader and self._reader.in_block)

    @in_stream_block.setter
    def in_stream_block(self, value: bool) -> None:
        assert self._reader is not None
        self._reader.in_block = value

    def __iter__(self) -> Iterator[bytes | None]:
        reader = self._reader
        assert reader is not None
        seen = reader.messages
        wait_ms = max(1, int(self.poll_seconds * 1000))
        while True:
            got = reader.next(wait_ms)
            if type(got) is bytes:
                seen = reader.messages
                self._last_message = time.monotonic()
                yield got
                continue
            if reader.messages != seen:  # routed row changes came in
                seen = reader.messages
                self._last_message = time.monotonic()
            if got is None:
                # Nothing came for poll_seconds: keepalives (if any) were consumed; the server's
                # position is past every message that has arrived.
                if reader.wal_end > self.server_end:
                    self.server_end = reader.wal_end
                yield None
            elif got == _rowdecode.MORE:
                continue
            elif got == _rowdecode.REPLY_REQUESTED:
                with self._errors():
                    self._cur.send_feedback(force=True)  # what confirm() sent last, or 0: nothing
            else:
                self._broken(got)

    def _broken(self, got) -> None:
        """Raise what ended the stream (``CopyReader.next``: STREAM_ENDED or (sqlstate, message))."""
        if got == _rowdecode.STREAM_ENDED:
            raise SourceUnavailableError(f"replication stream from slot {self.slot!r} was ended by the server", setting="POSTGRES_URL")
        sqlstate, message = got
        # A busy slot, a missing slot or publication are named as such; anything else broke the stream.
        named = sqlstate in (psycopg2.errorcodes.OBJECT_IN_USE, psycopg2.errorcodes.UNDEFINED_OBJECT)
        kind = psycopg2.errors.lookup(sqlstate) if named else psycopg2.OperationalError
        with self._errors():
            raise kind(message)

    def confirm(self, lsn: int) -> None:
        """Tell the server the warehouse committed everything below ``lsn`` (standby feedback)."""
        try:
            with self._errors():
                self._cur.send_feedback(write_lsn=lsn, flush_lsn=lsn, force=True)
        except psycopg2.Error:  # a closed session: the caller confirms by SQL once it is released
            raise SourceUnavailableError(f"replication stream from slot {self.slot!r} closed before the confirmation") from None

    def close(self) -> None:
        self._reader = None  # it holds the connection's PGconn pointer: never used past its close
        conn, self._conn = getattr(self, "_conn", None), None
        if conn is not None:
            conn.close()

    def _errors(self):
        return _map_errors(self.slot, self.publication)


class _map_errors:
    def __init__(self, slot: str, publication: str) -> None:
        self.slot, self.publication = slot, publication

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None:
            return False
        if isinstance(exc, psycopg2.errors.ObjectInUse):
            raise SlotBusyError(f"replication slot {self.slot!r} is in use by another session") from None
        if isinstance(exc, psycopg2.errors.UndefinedObject):
            if "publication" in str(exc):
                raise SourceNotReadyError(
                    f"publication {self.publication!r} does not exist", hint="run a backfill or a drain to create it"
                ) from None
            raise SlotMissingError(f"replication slot {self.slot!r} does not exist") from None
        if isinstance(exc, psycopg2.OperationalError):
            text = str(exc).strip()
            raise SourceUnavailableError(
                f"replication stream from slot {self.slot!r} broke: {redact(text.splitlines()[-1] if text else repr(exc))}",
                setting="POSTGRES_URL",
            ) from None
        return False


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
