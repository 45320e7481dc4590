"""The stream staging: segments of large transactions the server streams while they are in
progress (``streamed.py``), written to the warehouse so the drain's memory stays bounded, and read
back when their transaction commits, inside the drain's apply transaction.

One table per slot, rows in the staged shape (``staging.py``) plus the transaction, the
subtransaction and the part they belong to. Its content is valid within one replication session
only (a new session re-sends every open transaction from its first change), so each drain empties
it when it starts and once it has committed.
"""

from __future__ import annotations

from pg_replication.replicate.changes import Segment, StagedPart
from pg_replication.warehouse import staging
from pg_replication.warehouse.base import STATE_SCHEMA

XID, SUBXID, PART = "_xid", "_subxid", "_part"


class StreamStaging:
    """Mixed into ``engine.SqlWarehouse``: uses its dialect hooks."""

    def _stream_table(self, slot: str) -> str:
        return f"stream.{slot}"

    def reset_stream_staging(self, slot: str) -> None:
        """Empty the slot's stream staging (outside any transaction)."""
        if self.physical_columns(STATE_SCHEMA, self._stream_table(slot)) is not None:
            self.execute(f"DELETE FROM {self.state(self._stream_table(slot))}")

    def stage_stream_part(self, slot: str, xid: int, subxid: int, part: int, segment: Segment, key_width: int) -> StagedPart:
        """Write one folded segment of an open streamed transaction (outside any transaction)."""
        data = staging.segment_table(segment, key_width)
        name = self._stream_table(slot)
        self._ensure_stream_table(name, key_width, len(segment.columns))
        columns = [c for c in data.schema.names]
        relation = self.stage("pgr_stream_part", data)
        try:
            names = ", ".join(self.ident(c) for c in (XID, SUBXID, PART, *columns))
            self.execute(
                f"INSERT INTO {self.state(name)} ({names}) SELECT {int(xid)}, {int(subxid)}, {int(part)}, "
                f"{', '.join(self.ident(c) for c in columns)} FROM {relation}"
            )
        finally:
            self.unstage("pgr_stream_part")
        return StagedPart(
            f"(SELECT {', '.join(self.ident(c) for c in columns)} FROM {self.state(name)} WHERE {self.ident(PART)} = {int(part)})",
            segment.columns,
            segment.truncated,
            data.num_rows,
            segment.has_unknowns,
        )

    def discard_stream(self, slot: str, xid: int, subxid: int | None) -> None:
        """A streamed transaction (``subxid`` None) or one subtransaction of it rolled back."""
        where, params = f"{self.ident(XID)} = ?", [xid]
        if subxid is not None:
            where, params = f"{where} AND {self.ident(SUBXID)} = ?", [xid, subxid]
        self.execute(f"DELETE FROM {self.state(self._stream_table(slot))} WHERE {where}", params)

    def _ensure_stream_table(self, name: str, key_width: int, width: int) -> None:
        have = self.physical_columns(STATE_SCHEMA, name)
        if have is None:
            self.execute(
                f"CREATE TABLE IF NOT EXISTS {self.state(name)} ({self.ident(XID)} BIGINT, {self.ident(SUBXID)} BIGINT, "
                f"{self.ident(PART)} BIGINT, {self.ident(staging.SEQ)} BIGINT, {self.ident(staging.OP)} {self.text_type}, "
                f"{self.ident(staging.UNKNOWN)} {self.text_type})"
            )
            have = self.physical_columns(STATE_SCHEMA, name) or []
        folded = set(have)
        wanted = [staging.fill_column(i) for i in range(key_width)] + [staging.value_column(i) for i in range(width)]
        for column in wanted:  # as wide as the widest table streamed so far
            if self.fold(column) not in folded:
                self.execute(f"ALTER TABLE {self.state(name)} ADD COLUMN {self.ident(column)} {self.text_type}")
