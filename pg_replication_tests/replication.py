"""A test harness around the engine: backfill every configured table, drain until caught up,
and compare the warehouse with the source row for row."""

from __future__ import annotations

from pathlib import Path

import psycopg

from pg_replication.replicate.backfill import SlotSettings, run_backfill
from pg_replication.replicate.cdc import DrainResult, DrainSettings, drain_once
from pg_replication.config import parse_config
from pg_replication.source.catalog import Table, introspect
from pg_replication.source.connection import connect
from pg_replication_tests.targets import DuckDBTarget, Target


def bare_table(schema: str, name: str, key: tuple[str, ...] = ("id",)) -> Table:
    """Enough of a Table to name it in a warehouse (reading back, not replicating)."""
    return Table(schema, name, 0, "r", "d", (), key, True, (), 0, 0)


class Harness:
    def __init__(
        self, pg_url: str, target: Target | Path, tables: list, partitions: int = 3, slot: str = "pgr_test",
        max_snapshot_bytes: int | None = None,
    ) -> None:
        self.pg_url = pg_url
        self.max_snapshot_bytes = max_snapshot_bytes
        self.target = DuckDBTarget(target) if isinstance(target, Path) else target
        self.partitions = partitions
        self.raw_tables = tables
        self.settings = DrainSettings(slot=slot, publication="pgr_test_pub")
        self.reload()

    def reload(self, tables: list | None = None) -> list[Table]:
        if tables is not None:
            self.raw_tables = tables
        self.config = parse_config({"tables": self.raw_tables, "defaults": {"partitions": self.partitions}})
        with connect(self.pg_url) as conn:
            self.tables = introspect(conn, self.config)
        return self.tables

    def table(self, name: str) -> Table:
        return next(t for t in self.tables if t.name == name)

    def backfill(self, name: str | None = None, slices=None) -> None:
        with self.target.open() as wh:
            for table in self.tables:
                if name is None or table.name == name:
                    run_backfill(
                        self.pg_url, wh, table, range(self.partitions) if slices is None else slices,
                        partitions=self.partitions, cdc=SlotSettings(self.settings.slot, self.settings.publication),
                        max_snapshot_bytes=self.max_snapshot_bytes,
                    )

    def drain(self, **overrides) -> DrainResult:
        settings = DrainSettings(**{**self.settings.__dict__, **overrides})
        with self.target.open() as wh:
            return drain_once(self.pg_url, wh, self.tables, settings)

    def drain_session(self, max_seconds: float = 60.0, **overrides) -> list[DrainResult]:
        """Batches through one replication session, each applied while the next is read."""
        from pg_replication.replicate.drain_session import drain_session

        settings = DrainSettings(**{**self.settings.__dict__, **overrides})
        with self.target.open() as wh:
            return list(drain_session(self.pg_url, wh, self.tables, settings, max_seconds=max_seconds))

    def drain_all(self, limit: int = 100, **overrides) -> list[DrainResult]:
        results = []
        for _ in range(limit):
            results.append(self.drain(**overrides))
            if results[-1].caught_up:
                return results
        raise AssertionError("CDC did not catch up")

    def warehouse_rows(self, name: str, columns: list[str] | None = None) -> list[tuple]:
        return self.target.rows(self.table(name), columns)

    def source_rows(self, pg: psycopg.Connection, name: str, columns: list[str] | None = None) -> list[tuple]:
        table = self.table(name)
        cols = columns or [c.name for c in table.columns]
        query = psycopg.sql.SQL("SELECT {} FROM {} ORDER BY {}").format(
            psycopg.sql.SQL(", ").join(psycopg.sql.Identifier(c) for c in cols),
            table.ident,
            psycopg.sql.SQL(", ").join(psycopg.sql.Identifier(k) for k in table.primary_key),
        )
        return pg.execute(query).fetchall()

    def assert_equal(self, pg: psycopg.Connection, name: str, columns: list[str] | None = None) -> None:
        source, warehouse = self.source_rows(pg, name, columns), self.warehouse_rows(name, columns)
        if source != warehouse:
            s, w = set(source), set(warehouse)

            def show(rows):
                return [tuple(repr(v)[:40] for v in r) for r in sorted(rows)[:5]]

            raise AssertionError(
                f"{name}: {len(source)} source rows, {len(warehouse)} warehouse rows; "
                f"only in source: {show(s - w)}; only in warehouse: {show(w - s)}"
            )
