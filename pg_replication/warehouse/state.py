"""Replication state in the warehouse, next to the data: per table its plan, stored columns,
status, applied position and relation identity; per slot the drained position; per slice what
it copied. Writes go through ``_upsert_state`` (portable: no ON CONFLICT or MERGE); writers of
one table's state wait for each other on its row (``_lock_state``); the drained position and the
plan are compare-and-set, so progress never moves backwards."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import datetime, timezone

import pyarrow as pa

from pg_replication.errors import (
    ConcurrentDrainError,
)
from pg_replication.source.catalog import Table
from pg_replication.source.relation_identity import RelationIdentity, identity_problem
from pg_replication.source.snapshot import BackfillPlan
from pg_replication.types import TypeMapping
from pg_replication.warehouse.base import (
    STATE_SCHEMA,
    TableState,
    table_key,
)


class StateStore:
    """Mixed into ``engine.SqlWarehouse``: uses its dialect hooks and the other parts."""

    STATE_TABLES = {  # name: (columns, primary key)
        "tables": (
            (("table_key", "text"), ("plan", "text"), ("columns", "text"), ("status", "text"), ("error", "text"),
             ("applied_lsn", "BIGINT"), ("watermark", "text"), ("updated_at", "DOUBLE PRECISION"),
             # relation identity (source/relation_identity.py): pg_class oid, publication entry, drains covered
             ("relation_oid", "BIGINT"), ("publication_member", "text"), ("covered_lsn", "BIGINT")),
            ("table_key",),
        ),
        "cursor": ((("slot", "text"), ("drained_lsn", "BIGINT"), ("updated_at", "DOUBLE PRECISION")), ("slot",)),
        # document sets kept fresh by every drain (documents.py): the resolved tree as JSON; error:
        # why drains hold the set (its documents missed a refresh) until it is built again; stale:
        # why it needs a build in full (a table of its tree rewritten outside a drain)
        "documents": (
            (("name", "text"), ("definition", "text"), ("updated_at", "DOUBLE PRECISION"), ("error", "text"), ("stale", "text")),
            ("name",),
        ),
        "slices": (
            (("table_key", "text"), ("slice", "INTEGER"), ("rows", "BIGINT"), ("bytes", "BIGINT"),
             ("seconds", "DOUBLE PRECISION"), ("copied_at", "DOUBLE PRECISION")),
            ("table_key", "slice"),
        ),
    }

    def create_schema(self, name: str) -> None:
        self.execute(f"CREATE SCHEMA IF NOT EXISTS {self.ident(name)}")

    def _ensure_state_tables(self) -> None:
        self.create_schema(STATE_SCHEMA)
        for name, (columns, key) in self.STATE_TABLES.items():
            typed = [(c, self.text_type if t == "text" else t) for c, t in columns]
            cols = ", ".join(f"{self.ident(c)} {t}" for c, t in typed)  # quoted: ROWS is reserved in Snowflake
            keys = ", ".join(self.ident(k) for k in key)
            self.execute(f"CREATE TABLE IF NOT EXISTS {self.state(name)} ({cols}, PRIMARY KEY ({keys}))")
            have = {c.lower() for c in self.physical_columns(STATE_SCHEMA, name) or ()}
            for column, ddl in typed:  # state written by an earlier version: add what it lacks
                if column not in have:
                    self.execute(f"ALTER TABLE {self.state(name)} ADD COLUMN {self.ident(column)} {ddl}")

    def _upsert_state(self, table: str, key: dict, values: dict) -> None:
        """Update the row named by ``key`` or insert it (portable: no ON CONFLICT / MERGE)."""
        where = " AND ".join(f"{self.ident(k)} = ?" for k in key)
        sets = ", ".join(f"{self.ident(c)} = ?" for c in values)
        self.execute(f"UPDATE {self.state(table)} SET {sets} WHERE {where}", [*values.values(), *key.values()])
        names = ", ".join(self.ident(c) for c in (*key, *values))
        marks = ", ".join("?" for _ in (*key, *values))
        self.execute(
            f"INSERT INTO {self.state(table)} ({names}) SELECT {marks} WHERE NOT EXISTS "
            f"(SELECT 1 FROM {self.state(table)} WHERE {where})",
            [*key.values(), *values.values(), *key.values()],
        )

    def _lock_state(self, key: str) -> None:
        """Inside a transaction: writers of one table's state (slices, drains) wait for each other
        here, and read what the one before them committed."""
        self.execute(f"UPDATE {self.state('tables')} SET updated_at = ? WHERE table_key = ?", [time.time(), key])

    def _table_row(self, key: str) -> tuple | None:
        rows = self.fetchall(f"SELECT plan, status, error, columns FROM {self.state('tables')} WHERE table_key = ?", [key])
        return rows[0] if rows else None

    def load_state(self, table: Table) -> TableState:
        row = self._table_row(table_key(table))
        done = self.fetchall(f"SELECT slice FROM {self.state('slices')} WHERE table_key = ?", [table_key(table)])
        plan = BackfillPlan.from_json(row[0]) if row and row[0] else None
        status = (row[1] if row else None) or "backfilling"
        return TableState(table_key(table), plan, frozenset(int(r[0]) for r in done), status)

    def save_plan(
        self, table: Table, plan: BackfillPlan, watermark: str | None = None, identity: dict | None = None
    ) -> BackfillPlan:
        """Store the plan (and a query strategy's starting watermark, and a CDC table's relation
        identity: relation_oid, publication_member, covered_lsn) unless one exists."""
        key = table_key(table)
        row = self._table_row(key)
        if row and row[0]:
            return BackfillPlan.from_json(row[0])
        values = {"plan": plan.to_json(), "watermark": watermark, "updated_at": time.time(), **(identity or {})}
        with self.transaction():
            # Compare-and-set: of two runs planning at once, the first plan stored wins and both use it.
            sets = ", ".join(f"{self.ident(c)} = ?" for c in values)
            self.execute(
                f"UPDATE {self.state('tables')} SET {sets} WHERE table_key = ? AND plan IS NULL", [*values.values(), key]
            )
            if self._table_row(key) is None:
                self._upsert_state("tables", {"table_key": key}, values)
            stored = self._table_row(key)
        return BackfillPlan.from_json(stored[0]) if stored and stored[0] else plan

    def replace_plan(self, table: Table, stale: BackfillPlan, plan: BackfillPlan, rerun: int) -> BackfillPlan:
        """Swap ``plan`` (a re-plan after a rewrite) in for ``stale`` unless another run already
        replaced it; returns the plan now stored. Slice ``rerun``, which the new plan gives pages
        even if it was copied before, counts as not copied until it is copied again."""
        key = table_key(table)
        with self.transaction():
            self._lock_state(key)
            row = self._table_row(key)
            stored = BackfillPlan.from_json(row[0]) if row and row[0] else None
            if stored is not None and stored != stale:
                return stored
            self._upsert_state("tables", {"table_key": key}, {"plan": plan.to_json(), "updated_at": time.time()})
            self.execute(f"DELETE FROM {self.state('slices')} WHERE table_key = ? AND slice = ?", [key, rerun])
        return plan

    def restart_if_gap(self, table: Table, now: RelationIdentity, drained: int) -> str | None:
        """Send a planned table whose stream has a gap (see source/relation_identity.py) back to
        backfilling: its data, plan, slices and change log are dropped, and its status says why.
        Returns the reason, or None (state from before identities were stored adopts ``now``)."""
        key = table_key(table)
        rows = self.fetchall(
            f"SELECT plan, relation_oid, publication_member, covered_lsn FROM {self.state('tables')} WHERE table_key = ?",
            [key],
        )
        if not rows or not rows[0][0]:
            return None
        _, oid, member, covered = rows[0]
        stored = (None if oid is None else int(oid), member, None if covered is None else int(covered))
        reason = identity_problem(table.display, stored, now, drained)
        if reason is None:
            adopt = {"relation_oid": now.oid} if oid is None else {}
            adopt.update({"publication_member": now.member} if member is None and now.member else {})
            adopt.update({"covered_lsn": drained} if covered is None else {})
            if adopt:
                self._upsert_state("tables", {"table_key": key}, adopt)
            return None
        self.reset_table(table)
        self.set_status(key, "backfilling", f"backfill restarted: {reason}")
        return reason

    def _advance_coverage(self, keys: Sequence[str], drained: int, target: int) -> None:
        """Inside the drain's transaction: the tables this drain included are covered up to
        ``target``, provided no earlier drain skipped them (covered from ``drained`` on)."""
        if keys:
            marks = ", ".join("?" for _ in keys)
            self.execute(
                f"UPDATE {self.state('tables')} SET covered_lsn = ? WHERE table_key IN ({marks}) AND covered_lsn >= ?",
                [target, *keys, drained],
            )

    def stored_columns(self, key: str) -> dict[str, dict[str, str]]:
        """{name: {"type": warehouse type, "load": expression}} of the table's warehouse columns."""
        row = self._table_row(key)
        columns = json.loads(row[3]) if row and row[3] else {}
        for column in columns.values():  # written by an earlier version, which said "duckdb"
            column.setdefault("type", column.get("duckdb"))
        return columns

    def stored_mappings(self, table: Table) -> dict[str, TypeMapping]:
        """The warehouse's columns as mappings of staged text (what the change log holds)."""
        return {
            name: TypeMapping(pa.string(), c["type"], load=c["load"])
            for name, c in self.stored_columns(table_key(table)).items()
        }

    def _store_columns(self, key: str, columns: dict) -> None:
        self._upsert_state("tables", {"table_key": key}, {"columns": json.dumps(columns), "updated_at": time.time()})

    def set_status(self, key: str, status: str, error: str | None = None) -> None:
        self._upsert_state("tables", {"table_key": key}, {"status": status, "error": error, "updated_at": time.time()})

    def statuses(self) -> dict[str, tuple[str, str | None]]:
        rows = self.fetchall(f"SELECT table_key, status, error FROM {self.state('tables')}")
        return {k: (s or "backfilling", e) for k, s, e in rows}

    def drained_lsn(self, slot: str) -> int | None:
        rows = self.fetchall(f"SELECT drained_lsn FROM {self.state('cursor')} WHERE slot = ?", [slot])
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    def seconds_since_drain(self, slot: str) -> float | None:
        rows = self.fetchall(f"SELECT updated_at FROM {self.state('cursor')} WHERE slot = ?", [slot])
        return time.time() - float(rows[0][0]) if rows and rows[0][0] is not None else None

    def seconds_since_write(self, table: Table) -> float | None:
        """Since the table's state was last written (its last sync, for the query strategies)."""
        rows = self.fetchall(f"SELECT updated_at FROM {self.state('tables')} WHERE table_key = ?", [table_key(table)])
        return time.time() - float(rows[0][0]) if rows and rows[0][0] is not None else None

    def set_drained_lsn(self, slot: str, lsn: int) -> None:
        self._upsert_state("cursor", {"slot": slot}, {"drained_lsn": lsn, "updated_at": time.time()})

    def _claim_cursor(self, slot: str, expected: int) -> None:
        """Inside the drain's transaction, before anything is applied: the drained position is
        still the one this drain started from (compare-and-set; the row lock makes a concurrent
        drain wait here and then see ours). Otherwise another drain committed first, and applying
        this batch would move the position backwards and replay older changes over newer ones."""
        self.execute(f"UPDATE {self.state('cursor')} SET updated_at = ? WHERE slot = ?", [time.time(), slot])
        stored = self.drained_lsn(slot) or 0
        if stored != expected:
            from pg_replication.source.pgoutput import int_to_lsn

            raise ConcurrentDrainError(
                f"slot {slot!r}: another drain committed up to {int_to_lsn(stored)} while this one read from "
                f"{int_to_lsn(expected)}",
                lsn=int_to_lsn(stored),
            )

    def reopen_for_rerun(self, table: Table, index: int) -> None:
        """Before a slice's snapshot is taken: the slice counts as not copied until this copy
        commits, and a streaming table's drains log its changes from now on. So no change applied
        after the snapshot can be overwritten by it, and no other slice can complete the backfill
        (and start applying) while it runs; the copy that completes it replays the log and
        streams again. A re-run that dies leaves the table backfilling, its slice missing."""
        key = table_key(table)
        state = self.load_state(table)
        if index not in state.slices_done and state.status != "streaming":
            return  # a first copy (the common case): nothing to reopen, no transaction to commit
        with self.transaction():
            self._lock_state(key)  # waits for a drain applying to it: its changes precede the snapshot
            self.execute(f"DELETE FROM {self.state('slices')} WHERE table_key = ? AND slice = ?", [key, index])
            if self.statuses().get(key, ("backfilling", None))[0] == "streaming":
                self.set_status(key, "backfilling")

    def report(self) -> list[dict]:
        """Per table: status, error, applied LSN, backfill slices done, plan size, last update."""
        done: dict[str, int] = {}
        for key, _ in self.fetchall(f"SELECT table_key, slice FROM {self.state('slices')}"):
            done[key] = done.get(key, 0) + 1
        report = []
        for key, status, error, lsn, plan, updated in sorted(
            self.fetchall(f"SELECT table_key, status, error, applied_lsn, plan, updated_at FROM {self.state('tables')}")
        ):
            report.append(
                {
                    "table": key,
                    "status": status or "backfilling",
                    "error": error,
                    "applied_lsn": lsn,
                    "partitions": BackfillPlan.from_json(plan).partitions if plan else None,
                    "slices": len(BackfillPlan.from_json(plan).slices) if plan else None,
                    "slices_done": done.get(key, 0),
                    "updated_at": datetime.fromtimestamp(float(updated), timezone.utc) if updated else None,
                }
            )
        return report

    def reset_table(self, table: Table) -> None:
        self.execute(f"DROP TABLE IF EXISTS {self.table_name(table)}")
        self.execute(f"DROP TABLE IF EXISTS {self.state(self.log_name(table))}")
        self.execute(f"DROP TABLE IF EXISTS {self.state(f'reload.{table.schema}.{table.name}')}")
        with self.transaction():
            self.execute(f"DELETE FROM {self.state('slices')} WHERE table_key = ?", [table_key(table)])
            self.execute(f"DELETE FROM {self.state('tables')} WHERE table_key = ?", [table_key(table)])

    def reset_cursor(self, slot: str) -> None:
        self.execute(f"DELETE FROM {self.state('cursor')} WHERE slot = ?", [slot])

    def has_state(self) -> bool:
        return self.physical_columns(STATE_SCHEMA, "tables") is not None
