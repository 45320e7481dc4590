"""Read the slot through the streaming replication protocol (``START_REPLICATION … LOGICAL``).

psycopg 3 cannot stream replication (COPY_BOTH); psycopg2's ``LogicalReplicationConnection`` can.
The server sends pgoutput messages as it decodes them: nothing is built up on the source for a
read (the SQL functions materialize their whole result first, spilling to temp files), and a
read that stops early has cost the source only what it sent.

The slot is confirmed (standby feedback ``flush``) only by ``confirm``, after the warehouse has
committed the position. psycopg2 answers the keepalives the server asks a reply to (after
``wal_sender_timeout / 2`` without one); the flush it sends then may be a position it took from
an earlier keepalive (the server's decode position: nothing to apply lies below it). The drain
commits at least that position, so the slot is told nothing the warehouse will not hold, but a
drain killed between such a reply and its commit leaves the slot ahead of its warehouse (drains
shorter than that send nothing before their commit). Only one session may stream a slot: a
busy slot raises ``SlotBusyError``.

With ``streaming`` (Postgres 14+, pgoutput protocol 2), a transaction that outgrows the server's
``logical_decoding_work_mem`` is sent in parts while still in progress instead of being spilled
to files on the source and sent whole at its commit (``streamed.py`` keeps the parts).
"""

from __future__ import annotations

import select
import time
from collections.abc import Iterator

import psycopg2
import psycopg2.errors
import psycopg2.extras

from pg_replication.errors import SourceNotReadyError, SourceUnavailableError, redact
from pg_replication.source.connection import APPLICATION_NAME, describe_target
from pg_replication.source.slot import SlotBusyError, SlotMissingError
from pg_replication.types import SESSION_OPTIONS

# psycopg2 would send feedback on its own every status_interval (10 s): it must not, since its
# flush may be ahead of the warehouse. It still answers the keepalives the server asks a reply
# to (after wal_sender_timeout / 2 without one), which keeps the session alive while reading.
_NEVER = 10.0**9


class SlotStream:
    """One streaming session on ``slot`` from ``start_lsn``. Iterate it for message payloads
    (bytes); ``None`` is yielded whenever no message is waiting, so the reader can decide to stop
    (``quiet_for``, ``server_end``). Close it at the end of the drain (or use it as a context
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
        self.bytes = 0
        self._last_message = time.monotonic()
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
        self._last_message = time.monotonic()

    def __enter__(self) -> SlotStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def quiet_for(self) -> float:
        """Seconds since the last data message."""
        return time.monotonic() - self._last_message

    def __iter__(self) -> Iterator[bytes | None]:
        cur = self._cur
        read = cur.read_message
        while True:
            try:
                msg = read()
            except BaseException as exc:  # not a context manager per message: this is the hot path
                self._errors().__exit__(type(exc), exc, exc.__traceback__)
                raise
            if msg is not None:
                payload = msg.payload
                self.bytes += len(payload)
                self._last_message = time.monotonic()
                yield payload
                continue
            # No data message waiting: keepalives (if any) were consumed; wal_end is the
            # server's decode position, every message below it has arrived.
            if cur.wal_end > self.server_end:
                self.server_end = cur.wal_end
            yield None
            select.select([cur], [], [], self.poll_seconds)

    def confirm(self, lsn: int) -> None:
        """Tell the server the warehouse committed everything below ``lsn`` (standby feedback)."""
        try:
            with self._errors():
                self._cur.send_feedback(write_lsn=lsn, flush_lsn=lsn, force=True)
        except psycopg2.Error:  # a closed session: the caller confirms by SQL once it is released
            raise SourceUnavailableError(f"replication stream from slot {self.slot!r} closed before the confirmation") from None

    def close(self) -> None:
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
