"""Whether the slot holds changes to apply, without consuming any: a short streaming session that
stops at the first row change, or once the server has decoded up to a position with none.

WAL moves for reasons that carry nothing to apply (other databases, checkpoints, writes to tables
we do not publish, pgoutput's keepalives): comparing the slot's confirmed position with the
server's current one cannot tell them apart; decoding can. The probe never sends feedback, so the
slot does not move; the session stays well below ``wal_sender_timeout / 2``, before which the
server asks for no reply (psycopg2 would answer it with a flush position of its own).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pg_replication.source.stream import SlotStream

# pgoutput message types that carry a row change (protocol 1 and 2); 'S' starts a streamed
# (in-progress) transaction, whose changes follow.
_CHANGE_TYPES = frozenset(b"IUDTS")


@dataclass(frozen=True)
class Probe:
    has_changes: bool  # a row change (or a streamed transaction) is waiting
    server_end: int  # the server decoded everything below this (no change below it when has_changes is False)
    decided: bool  # False: the time ran out before the server decoded up to ``until_lsn``


def probe_slot(
    conninfo: str, slot: str, publication: str, start_lsn: int, *, until_lsn: int | None, timeout: float
) -> Probe:
    """Read the slot from ``start_lsn`` until the first row change (``has_changes``), until the
    server has decoded past ``until_lsn`` with none (None: wait the whole ``timeout`` for one), or
    until ``timeout`` seconds have passed."""
    give_up = time.monotonic() + timeout
    # Protocol 2 where the server has it, as drains read: a large transaction in progress then
    # arrives in parts (a change to stage) instead of being spilled to disk for this session.
    with SlotStream(conninfo, slot, publication, start_lsn, streaming=None) as stream:
        for data in stream:
            if data is not None:
                if data[0] in _CHANGE_TYPES:
                    return Probe(True, stream.server_end, True)
                continue  # Begin/Commit of an empty transaction, Relation, logical messages
            if until_lsn is not None and stream.server_end >= until_lsn:
                return Probe(False, stream.server_end, True)
            if time.monotonic() >= give_up:
                return Probe(False, stream.server_end, until_lsn is None)
    raise AssertionError("a slot stream never ends by itself")


def longest_probe(conn) -> float:
    """Seconds a probe may stay open: below half of ``wal_sender_timeout``, after which the server
    asks for a reply (see the module docstring)."""
    timeout_ms = int(conn.execute("SELECT setting FROM pg_settings WHERE name = 'wal_sender_timeout'").fetchone()[0])
    return 30.0 if timeout_ms <= 0 else max(1.0, timeout_ms / 2000 - 5)
