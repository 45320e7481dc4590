"""The change log: a table's staged changes kept in order while it backfills or has failed, and
replayed into it later; and the apply of one staged segment, which completes values the
warehouse does not hold from the source (``apply_segment``)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from pg_replication.errors import (
    PgReplicationError,
    SchemaChangeError,
    WarehouseError,
)
from pg_replication.source.catalog import Table
from pg_replication.source.recovery import RowReader
from pg_replication.types import TypeMapping
from pg_replication.warehouse import staging
from pg_replication.warehouse.base import (
    STATE_SCHEMA,
    table_key,
)
from pg_replication.warehouse.evolution import DescribeNew
from pg_replication.warehouse.staging import StagedChanges

SEGMENT, COLUMNS = "_segment", "_columns"  # change-log columns beside the staged ones
RECOVERED_SEGMENT = -1  # change-log rows re-read from the source, applied and removed in one transaction


class ChangeLog:
    """Mixed into ``engine.SqlWarehouse``: uses its dialect hooks and the other parts."""

    def ensure_log(self, table: Table, columns: Sequence[str]) -> list[str]:
        """DDL: the table's change log, able to hold ``columns``; returns its data columns."""
        name = self.log_name(table)
        have = self.physical_columns(STATE_SCHEMA, name)
        if have is None:
            fills = "".join(f", {self.ident(staging.fill_column(i))} {self.text_type}" for i in range(len(table.primary_key)))
            t = self.text_type
            self.execute(
                f"""CREATE TABLE IF NOT EXISTS {self.state(name)} ({self.ident(staging.SEQ)} BIGINT, {self.ident(SEGMENT)} BIGINT,
                    {self.ident(COLUMNS)} {t}, {self.ident(staging.OP)} {t}, {self.ident(staging.UNKNOWN)} {t}{fills})"""
            )
            have = self.physical_columns(STATE_SCHEMA, name) or []
        folded = set(have)
        for column in columns:
            if self.fold(column) not in folded:
                self.execute(f"ALTER TABLE {self.state(name)} ADD COLUMN {self.ident(column)} {self.text_type}")
        return list(columns)

    def append_log(self, table: Table, changes: StagedChanges) -> None:
        """Append a staged segment to the table's change log, folded per key so the log stays
        bounded (one row per key and column set, not one per change):

        - a segment that starts with a TRUNCATE replaces the whole log: nothing before it matters;
        - a segment with the column set of the log's last segment is merged into it (``_fold_log``);
        - otherwise it becomes a new segment, replayed after the others.
        """
        log = self.state(self.log_name(table))
        seq_column, segment_column = self.ident(staging.SEQ), self.ident(SEGMENT)
        if changes.truncated:
            self.execute(f"DELETE FROM {log}")
        row = self.fetchall(f"SELECT coalesce(max({seq_column}), 0), coalesce(max({segment_column}), 0) FROM {log}")[0]
        seq, last = int(row[0]) + 1, int(row[1])
        columns_json = json.dumps(changes.columns)
        same = last > 0 and self.fetchall(
            f"SELECT count(*) FROM {log} WHERE {segment_column} = ? AND {self.ident(COLUMNS)} = ?", [last, columns_json]
        )[0][0]
        fills = [self.ident(staging.fill_column(i)) for i in range(len(table.primary_key))]
        names = [seq_column, segment_column, self.ident(COLUMNS), self.ident(staging.OP), self.ident(staging.UNKNOWN), *fills]
        names += [self.ident(c) for c in changes.columns]
        values = [f"{self.ident(staging.SEQ)} + {seq}", str(last + 1), "?", self.ident(staging.OP), self.ident(staging.UNKNOWN), *fills]
        values += [self.ident(staging.value_column(i)) for i in range(len(changes.columns))]
        self.execute(
            f"INSERT INTO {log} ({', '.join(names)}) SELECT {', '.join(values)} FROM {changes.relation} AS staged",  # a subquery (a streamed part) needs a name
            [columns_json],
        )
        if same:
            self._fold_log(table, changes.columns, last, last + 1)

    def _fold_log(self, table: Table, columns: Sequence[str], into: int, new: int) -> None:
        """Merge logged segment ``new`` into ``into`` (same columns): replaying the merged segment
        leaves the table as replaying both in order would.

        1. A row of ``new`` that keeps warehouse values (unchanged TOAST) and names a row ``into``
           upserts takes the values that row knows, and the rest from where that row takes them
           (its fill key): by then the warehouse holds ``into``'s version, not the one it starts from.
        2. The rows of ``into`` whose key ``new`` writes or deletes go: ``new``'s row is the last word.
        3. ``new``'s rows join ``into``.
        """
        log = self.state(self.log_name(table))
        op, unknown, segment = self.ident(staging.OP), self.ident(staging.UNKNOWN), self.ident(SEGMENT)
        sets = []
        flags = []
        for col, keeps, knows in self._fold_terms(columns):
            sets.append(f"{col} = CASE WHEN {keeps} AND {knows} THEN l.{col} ELSE n.{col} END")
            flags.append(f"CASE WHEN {keeps} AND NOT {knows} THEN '1' ELSE '0' END")
        sets.append(f"{unknown} = {' || '.join(flags)}")
        sets += [f"{f} = l.{f}" for f in self._fill_columns(table)]
        self.execute(
            f"UPDATE {log} AS n SET {', '.join(sets)} FROM {log} AS l "
            f"WHERE n.{segment} = {int(new)} AND n.{op} = 'U' AND n.{unknown} LIKE '%1%' "
            f"AND l.{segment} = {int(into)} AND l.{op} = 'U' AND {self._fold_join(table)}"
        )
        self._drop_replaced(table, log, into, new)
        self.execute(f"UPDATE {log} SET {segment} = {int(into)} WHERE {segment} = {int(new)}")

    def _fold_terms(self, columns: Sequence[str]) -> list[tuple[str, str, str]]:
        """Per column of a fold of ``new`` (n) into ``into`` (l): its identifier, "n keeps the
        warehouse's value" and "l knows the value" (SQL conditions)."""
        unknown = self.ident(staging.UNKNOWN)
        return [
            (
                self.ident(name),
                f"substr(n.{unknown}, {i + 1}, 1) = '1'",
                f"(l.{unknown} IS NULL OR substr(l.{unknown}, {i + 1}, 1) <> '1')",
            )
            for i, name in enumerate(columns)
        ]

    def _fill_columns(self, table: Table) -> list[str]:
        return [self.ident(staging.fill_column(j)) for j in range(len(table.primary_key))]

    def _fold_join(self, table: Table) -> str:
        """The join of a row of ``into`` (l) to the row of ``new`` (n) that fills its values: l's key
        equals n's fill columns."""
        return " AND ".join(f"l.{self.ident(k)} = n.{f}" for k, f in zip(table.primary_key, self._fill_columns(table)))

    def _drop_replaced(self, table: Table, log: str, into: int, new: int) -> None:
        """The rows of ``into`` whose key ``new`` writes or deletes go: ``new``'s row is the last word."""
        segment, op = self.ident(SEGMENT), self.ident(staging.OP)
        keys = ", ".join(self.ident(k) for k in table.primary_key)
        self.execute(
            f"DELETE FROM {log} WHERE {segment} = {int(into)} AND {op} <> 'T' AND ({keys}) IN "
            f"(SELECT {keys} FROM {log} WHERE {segment} = {int(new)} AND {op} <> 'T')"
        )

    def replay_log(self, table: Table, read_rows: RowReader | None = None) -> int:
        """Apply every logged segment in order, then empty the log. Returns the rows replayed."""
        name = self.log_name(table)
        if self.physical_columns(STATE_SCHEMA, name) is None:
            return 0
        log = self.state(name)
        mappings = self.stored_mappings(table)
        defaults = self.defaults(table, tuple(c.name for c in table.columns))
        replayed = 0
        segment_column, columns_column = self.ident(SEGMENT), self.ident(COLUMNS)
        for segment, columns_json, rows, truncates in self.fetchall(
            f"""SELECT {segment_column}, {columns_column}, count(*), sum(CASE WHEN {self.ident(staging.OP)} = 'T' THEN 1 ELSE 0 END)
                FROM {log} GROUP BY {segment_column}, {columns_column} ORDER BY 1"""
        ):
            logged = json.loads(columns_json)
            pairs = [(c, now) for c, now in zip(logged, self.current_names(table, logged)) if now in mappings]
            _require_key(table, logged, [now for _, now in pairs])
            relation = self._log_segment(table, int(segment), [c for c, _ in pairs])
            changes = StagedChanges(relation, tuple(now for _, now in pairs), bool(truncates), int(rows), defaults=defaults)
            self.apply_segment(table, changes, mappings, read_rows)
            replayed += int(rows)
        self.execute(f"DELETE FROM {log}")
        return replayed

    def _log_segment(self, table: Table, segment: int, columns: Sequence[str]) -> str:
        """One logged segment as a staged relation (see staging.py); ``columns`` are the log's
        column names (a renamed column's are its old name)."""
        fills = [self.ident(staging.fill_column(i)) for i in range(len(table.primary_key))]
        values = [f"{self.ident(c)} AS {self.ident(staging.value_column(i))}" for i, c in enumerate(columns)]
        return (
            f"(SELECT {self.ident(staging.OP)}, {self.ident(staging.UNKNOWN)}, {', '.join(fills)}, "
            f"{', '.join(values)} FROM {self.state(self.log_name(table))} WHERE {self.ident(SEGMENT)} = {int(segment)})"
        )

    def apply_segment(
        self, table: Table, changes: StagedChanges, mappings: dict[str, TypeMapping], read_rows: RowReader | None
    ) -> None:
        """Apply one staged segment inside the caller's transaction. Upserts that keep a value the
        warehouse does not hold (its row is missing) are completed from the source's current row
        (``read_rows``): a version at or after the change, so later changes converge on it."""
        target = self.table_name(table)
        orphans: list[tuple] = []
        if changes.unknowns:
            orphans = [tuple(r) for r in self.fetchall(staging.orphaned_fills(changes, target, mappings, table.primary_key, self.ident))]
        self.apply_changes(table, changes, mappings)
        if not orphans:
            return
        if read_rows is None:
            raise WarehouseError(
                f"{table.display}: {len(orphans)} change(s) keep a value of a row the warehouse does not hold, "
                "and no source is at hand to read it",
                table=table.display,
                hint="resync the table (pg-replication resync TABLE)",
            )
        self._apply_recovered(table, changes.columns, orphans, read_rows(changes.columns, orphans), mappings)

    def _apply_recovered(self, table: Table, columns: tuple[str, ...], keys: list[tuple], found: dict, mappings) -> None:
        """Rewrite ``keys`` with the rows the source has now (deleting the ones it no longer has),
        staged through the change log so every dialect applies them inside the transaction."""
        log = self.state(self.log_name(table))
        position = {name: i for i, name in enumerate(columns)}
        width = len(table.primary_key)
        rows = []
        for seq, key in enumerate(keys):
            values = found.get(key)
            if values is None:  # deleted since: a later change in the slot says so as well
                values = [None] * len(columns)
                for k, v in zip(table.primary_key, key):
                    values[position[k]] = v
                rows.append([seq, RECOVERED_SEGMENT, json.dumps(columns), "D", None, *([None] * width), *values])
            else:
                rows.append([seq, RECOVERED_SEGMENT, json.dumps(columns), "U", None, *key, *values])
        names = [staging.SEQ, SEGMENT, COLUMNS, staging.OP, staging.UNKNOWN]
        names += [staging.fill_column(i) for i in range(width)] + list(columns)
        marks = "(" + ", ".join("?" for _ in names) + ")"
        for start in range(0, len(rows), 200):
            chunk = rows[start : start + 200]
            self.execute(
                f"INSERT INTO {log} ({', '.join(self.ident(n) for n in names)}) VALUES {', '.join(marks for _ in chunk)}",
                [v for row in chunk for v in row],
            )
        relation = self._log_segment(table, RECOVERED_SEGMENT, columns)
        self.apply_changes(table, StagedChanges(relation, columns, False, len(rows), unknowns=False), mappings)
        self.execute(f"DELETE FROM {log} WHERE {self.ident(SEGMENT)} = ?", [RECOVERED_SEGMENT])

    def retry_table(self, table: Table, describe_new: DescribeNew, read_rows: RowReader | None) -> int:
        """A failed table, its cause fixed: follow the source's columns (DDL, as a drain's
        prepare), then replay its change log and set it streaming in one transaction. Returns the
        changes replayed. Fails (the table stays failed, its log kept) if the cause is not fixed."""
        key = table_key(table)
        status, error = self.statuses().get(key, (None, None))
        if status != "failed":
            raise PgReplicationError(
                f"{table.display} is not failed (status: {status or 'not started'}): nothing to retry",
                table=table.display,
                hint="see `pg-replication status`; retry replays the change log of a failed table",
            )
        try:
            added = self.add_columns(table, dict(self.column_mappings(table)), describe_new)
            self.prepare_replay(table)
            with self.transaction():
                self._lock_state(key)
                if added:
                    self._store_columns(key, {**self.stored_columns(key), **added})
                # Marked before the replay: on a warehouse without transactions (ClickHouse) a
                # retry killed after it still leaves the sets to be built again.
                self.mark_documents_stale(table, f"a retry of {table.display}")  # type: ignore[attr-defined]
                replayed = self.replay_log(table, read_rows)
                self.set_status(key, "streaming")
        except (*self.errors, PgReplicationError) as exc:
            if isinstance(exc, PgReplicationError) and not isinstance(exc, WarehouseError):
                raise
            raise WarehouseError(
                f"{table.display}: retry failed, the table stays failed with its change log kept: "
                + str(exc).strip().splitlines()[0],
                table=table.display,
                hint=f"the cause is not fixed yet (it failed with: {error}); fix it and retry, or resync the table",
            ) from exc
        return replayed


def _require_key(table: Table, logged: Sequence[str], replayable: Sequence[str]) -> None:
    """A segment logged while the table's key column had another name (or none) cannot be
    matched to warehouse rows: refuse, rather than apply it keyless (the caller rolls back)."""
    missing = [k for k in table.primary_key if k not in replayable]
    if missing:
        raise SchemaChangeError(
            f"{table.display}: its change log holds changes logged with columns {', '.join(logged)}, "
            f"without key column(s) {', '.join(missing)}: they cannot be matched to warehouse rows",
            hint=f"resync the table (`pg-replication resync {table.schema}.{table.name}`); the other tables are not affected",
            table=table.display,
        )
