"""Asset checks on every table asset: row-count parity with the source, freshness, and for
strategy cdc the slot's health."""

import time

import dagster as dg
from dagster._utils.schedules import cron_string_iterator
from psycopg import sql

from pg_replication.dagster.assets import TableAssetTranslator
from pg_replication.replicate.capture import CaptureSettings
from pg_replication.config import QUERY_STRATEGIES, ReplicationConfig
from pg_replication.dagster.resources import PostgresSource, ResourceKeys, WarehouseResource
from pg_replication.source.catalog import Table
from pg_replication.source.pgoutput import int_to_lsn, lsn_to_int
from pg_replication.source.slot import slot_status
from pg_replication.source.triggers import CHANGES
from pg_replication.source.watermarks import append_exactness


def _warehouse_state(resource: WarehouseResource, table: Table, position: str | None) -> tuple[int | None, float | None, str, int | None]:
    """(drained position, seconds since the table was last written, table status, warehouse rows).
    ``position``: the slot's or the capture's cursor row; None for the query strategies."""
    with resource.open(read_only=True) as warehouse:  # a check creates nothing
        if not warehouse.has_state():  # nothing was ever replicated here
            return None, None, "not started", None
        status = warehouse.statuses().get(f"{table.schema}.{table.name}", ("not started", None))[0]
        if position is not None:
            drained, since = warehouse.drained_lsn(position), warehouse.seconds_since_drain(position)
        else:
            drained, since = None, warehouse.seconds_since_write(table)
        rows = warehouse.row_count(table) if warehouse.exists(table) else None
    return drained, since, status, rows


def _fresh_within(table: Table, config: ReplicationConfig) -> int:
    """The freshness bound: the configured one, and for a scheduled sync at least two intervals."""
    if table.strategy not in QUERY_STRATEGIES or table.entry is None:
        return config.source.freshness_seconds
    ticks = cron_string_iterator(time.time(), table.entry.schedule or config.defaults.schedule, "UTC")
    first, second = next(ticks), next(ticks)
    return max(config.source.freshness_seconds, int(2 * (second - first).total_seconds()))


def build_table_checks(
    tables: list[Table], config: ReplicationConfig, translator: TableAssetTranslator, keys: ResourceKeys = ResourceKeys()
) -> list:
    checks = []
    for table in tables:
        checks += _checks_for(
            table,
            translator.get_asset_key(table),
            config.source.slot,
            config.source.max_retained_wal_mb << 20,
            _fresh_within(table, config),
            keys,
        )
    return checks


def _source_count(source: PostgresSource, table: Table) -> tuple[int, int, bool, str | None]:
    """(rows, flushed WAL position, captured changes of the table waiting) in one snapshot, and
    for append why it may skip rows that commit late (None when it cannot)."""
    with source.connect() as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table.ident)).fetchone()[0]  # type: ignore[index]
        at = lsn_to_int(conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0])  # type: ignore[index]
        waiting = table.strategy == "triggers" and bool(
            conn.execute(
                sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE schema_name = %s AND table_name = %s)").format(CHANGES),
                (table.schema, table.name),
            ).fetchone()[0]  # type: ignore[index]
        )
        late = append_exactness(conn, table) if table.strategy == "append" else None
    return rows, at, waiting, late


def _checks_for(table: Table, key: dg.AssetKey, slot: str, max_retained: int, fresh_within: int, keys: ResourceKeys) -> list:
    position = {"cdc": slot, "triggers": CaptureSettings.position}.get(table.strategy)

    @dg.asset_check(asset=key, name="row_count_parity", description="Warehouse rows = source rows (exact once changes have caught up).", required_resource_keys=keys.both)
    def parity(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        source, warehouse = keys.source_of(context), keys.warehouse_of(context)
        source_rows, at, waiting, late = _source_count(source, table)
        drained, _, status, wh_rows = _warehouse_state(warehouse, table, position)
        if table.strategy == "cdc":
            exact = drained is not None and drained >= at and status == "streaming"
        else:  # the query strategies never see deletes in between reloads: never exact
            exact = table.strategy == "triggers" and not waiting and status == "streaming"
        metadata = {
            "source_rows": source_rows,
            "warehouse_rows": wh_rows if wh_rows is not None else -1,
            "source_lsn": int_to_lsn(at),
            "warehouse_lsn": int_to_lsn(drained) if drained and table.strategy == "cdc" else "none",
            "exact": exact,
        }
        if table.strategy == "append":
            metadata["keeps_late_commits"] = late is None
        passed = wh_rows == source_rows
        return dg.AssetCheckResult(
            passed=passed,
            severity=dg.AssetCheckSeverity.ERROR if exact else dg.AssetCheckSeverity.WARN,
            description=(f"append may skip rows that commit late: {late}" if late else None) if passed else (
                f"{table.display}: {source_rows:,} rows in Postgres, {wh_rows} in the warehouse"
                + (f" (source at {int_to_lsn(at)}, warehouse at {int_to_lsn(drained) if drained else 'nothing drained'})" if table.strategy == "cdc" else "")
                + ("" if exact else f" ({table.strategy}: not caught up, or a difference it cannot see until a reload)")
                + (f"; append may skip rows that commit late: {late}" if late else "")
            ),
            metadata=metadata,
        )

    @dg.asset_check(asset=key, name="cdc_freshness", description=f"Changes were applied within {fresh_within} s and the table streams.", required_resource_keys={keys.warehouse})
    def freshness(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        _, age, status, _ = _warehouse_state(keys.warehouse_of(context), table, position)
        passed = status == "streaming" and age is not None and age <= fresh_within
        return dg.AssetCheckResult(
            passed=passed,
            description=None if passed else f"{table.display}: status {status}, last drain or sync "
            + (f"{age:.0f} s ago" if age is not None else "never"),
            metadata={"seconds_since_last_drain": round(age, 1) if age is not None else -1.0, "status": status},
        )

    if table.strategy != "cdc":  # no slot to watch
        return [parity, freshness]

    @dg.asset_check(asset=key, name="slot_health", description="The replication slot exists, is not lost, and retains little WAL.", required_resource_keys={keys.source})
    def slot_health(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        with keys.source_of(context).connect() as conn:
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
