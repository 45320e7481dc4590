"""Asset checks on every table asset: row-count parity with the source, CDC freshness, slot health."""


import dagster as dg
from psycopg import sql

from pg_replication.assets import TableAssetTranslator
from pg_replication.config import ReplicationConfig
from pg_replication.resources import PostgresSource, WarehouseResource
from pg_replication.source.catalog import Table
from pg_replication.source.pgoutput import int_to_lsn, lsn_to_int
from pg_replication.source.slot import slot_status


def _warehouse_state(resource: WarehouseResource, table: Table, slot: str) -> tuple[int | None, float | None, str, int | None]:
    """(drained LSN, seconds since the last drain, table status, warehouse rows)."""
    with resource.open(read_only=True) as warehouse:  # a check creates nothing
        if not warehouse.has_state():  # nothing was ever replicated here
            return None, None, "not started", None
        status = warehouse.statuses().get(f"{table.schema}.{table.name}", ("not started", None))[0]
        drained, since = warehouse.drained_lsn(slot), warehouse.seconds_since_drain(slot)
        rows = warehouse.row_count(table) if warehouse.exists(table) else None
    return drained, since, status, rows


def build_table_checks(tables: list[Table], config: ReplicationConfig, translator: TableAssetTranslator) -> list:
    checks = []
    for table in tables:
        checks += _checks_for(
            table,
            translator.get_asset_key(table),
            config.source.slot,
            config.source.max_retained_wal_mb << 20,
            config.source.freshness_seconds,
        )
    return checks


def _checks_for(table: Table, key: dg.AssetKey, slot: str, max_retained: int, fresh_within: int) -> list:

    @dg.asset_check(asset=key, name="row_count_parity", description="Warehouse rows = source rows (exact once CDC has caught up).")
    def parity(source: PostgresSource, warehouse: WarehouseResource) -> dg.AssetCheckResult:
        with source.connect() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            source_rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table.ident)).fetchone()[0]  # type: ignore[index]
            at = lsn_to_int(conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0])  # type: ignore[index]
        drained, _, status, wh_rows = _warehouse_state(warehouse, table, slot)
        exact = drained is not None and drained >= at and status == "streaming"
        metadata = {
            "source_rows": source_rows,
            "warehouse_rows": wh_rows if wh_rows is not None else -1,
            "source_lsn": int_to_lsn(at),
            "warehouse_lsn": int_to_lsn(drained) if drained else "none",
            "exact": exact,
        }
        passed = wh_rows == source_rows
        return dg.AssetCheckResult(
            passed=passed,
            severity=dg.AssetCheckSeverity.ERROR if exact else dg.AssetCheckSeverity.WARN,
            description=None if passed else (
                f"{table.display}: {source_rows:,} rows in Postgres at {int_to_lsn(at)}, {wh_rows} in the "
                f"warehouse at {int_to_lsn(drained) if drained else 'nothing drained'}"
                + ("" if exact else " (CDC has not caught up: a difference may be in flight)")
            ),
            metadata=metadata,
        )

    @dg.asset_check(asset=key, name="cdc_freshness", description=f"A drain ran within {fresh_within} s and the table streams.")
    def freshness(warehouse: WarehouseResource) -> dg.AssetCheckResult:
        _, age, status, _ = _warehouse_state(warehouse, table, slot)
        passed = status == "streaming" and age is not None and age <= fresh_within
        return dg.AssetCheckResult(
            passed=passed,
            description=None if passed else f"{table.display}: status {status}, last drain "
            + (f"{age:.0f} s ago" if age is not None else "never"),
            metadata={"seconds_since_last_drain": round(age, 1) if age is not None else -1.0, "status": status},
        )

    @dg.asset_check(asset=key, name="slot_health", description="The replication slot exists, is not lost, and retains little WAL.")
    def slot_health(source: PostgresSource) -> dg.AssetCheckResult:
        with source.connect() as conn:
            status = slot_status(conn, slot)
        if status is None:
            return dg.AssetCheckResult(passed=False, description=f"replication slot {slot!r} does not exist")
        problems = []
        if status.wal_status == "lost":
            problems.append(f"slot {slot!r} is lost: Postgres removed WAL it needed (resync every table)")
        if status.retained_bytes > max_retained:
            problems.append(
                f"slot {slot!r} retains {status.retained_bytes / 2**20:,.0f} MiB of WAL "
                f"(limit {max_retained / 2**20:,.0f} MiB): is the CDC sensor running?"
            )
        return dg.AssetCheckResult(
            passed=not problems,
            description="; ".join(problems) or None,
            metadata={
                "wal_status": status.wal_status or "",
                "active": status.active,
                "wal_retained_bytes": status.retained_bytes,
                "lag_bytes": status.lag_bytes,
            },
        )

    return [parity, freshness, slot_health]


__all__ = ["build_table_checks"]
