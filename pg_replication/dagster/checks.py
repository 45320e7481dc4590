"""Asset checks on every table asset: row-count parity with the source; for the tables that
stream (cdc, triggers) that their drain keeps running, and for strategy cdc the slot's health.
How fresh a table must be is its FreshnessPolicy (freshness.py), not a check. They run by
themselves on ``source.checks_schedule`` (automation.py), on read-only warehouse connections."""

import warnings
from dataclasses import dataclass

import dagster as dg
from psycopg import sql

from pg_replication.dagster.assets import TableAssetTranslator
from pg_replication.dagster.automation import check_condition
from pg_replication.replicate.capture import CaptureSettings
from pg_replication.config import ReplicationConfig
from pg_replication.errors import redact
from pg_replication.failpoints import pause
from pg_replication.dagster.resources import PostgresSource, ResourceKeys, WarehouseResource
from pg_replication.source.catalog import Table
from pg_replication.source.pgoutput import int_to_lsn, lsn_to_int
from pg_replication.source.slot import slot_status
from pg_replication.source.triggers import CHANGES
from pg_replication.source.watermarks import append_exactness


@dataclass(frozen=True)
class WarehouseReading:
    drained: int | None  # the position the drain applied up to; None for the query strategies
    since: float | None  # seconds since the last drain (or sync)
    status: str
    rows: int | None


def _warehouse_state(resource: WarehouseResource, table: Table, position: str | None) -> WarehouseReading:
    """``position``: the slot's or the capture's cursor row; None for the query strategies."""
    with resource.open(read_only=True) as warehouse:  # a check creates nothing
        if not warehouse.has_state():  # nothing was ever replicated here
            return WarehouseReading(None, None, "not started", None)
        status = warehouse.statuses().get(f"{table.schema}.{table.name}", ("not started", None))[0]
        if position is not None:
            drained, since = warehouse.drained_lsn(position), warehouse.seconds_since_drain(position)
        else:
            drained, since = None, warehouse.seconds_since_write(table)
        rows = warehouse.row_count(table) if warehouse.exists(table) else None
    return WarehouseReading(drained, since, status, rows)


def _drained(resource: WarehouseResource, position: str) -> int | None:
    with resource.open(read_only=True) as warehouse:
        return warehouse.drained_lsn(position) if warehouse.has_state() else None


def _read_both(source: PostgresSource, warehouse: WarehouseResource, table: Table, position: str | None, attempts: int = 5):
    """The warehouse (its position first), then the source, then the warehouse's position again: a
    drain that committed after the first read (the counts would belong to different positions)
    moved it, and both are read again. Returns (warehouse, source, stable); a position that never
    held still for ``attempts`` readings makes the comparison inexact (a WARN, never an ERROR)."""
    for _ in range(attempts):
        held = _warehouse_state(warehouse, table, position)
        pause("parity_between_reads")  # the race tests hold the check here
        counted = _source_count(source, table)
        if position is None or _drained(warehouse, position) == held.drained:
            return held, counted, True
    return held, counted, False


@dataclass(frozen=True)
class _Check:
    """One table's check, as the source's multi-check runs it."""

    table: Table
    name: str
    position: str | None  # the slot's or the capture's cursor row; None for the query strategies


def _check_specs(table: Table, config: ReplicationConfig) -> list[tuple[str, str]]:
    """(name, description) of each check a table gets."""
    specs = [("row_count_parity", "Warehouse rows = source rows (exact once changes have caught up).")]
    if table.strategy in ("cdc", "triggers"):  # a query strategy: its schedule's FreshnessPolicy says when it is stale
        specs.append(("cdc_freshness", f"The drain ran within {config.source.freshness_seconds} s and the table streams."))
    if table.strategy == "cdc":
        specs.append(("slot_health", "The replication slot exists, is not lost, and retains little WAL."))
    return specs


# Tables per multi-check. Dagster resolves each check key of a multi-check by copying the whole
# definition, so one multi-check over 1,000 tables (3,000 checks) cost 9 M spec visits and ~50 s
# at load (bench/definitions_load.py); groups of 50 keep that linear, and a run of every check
# is still a few steps, not one per table.
TABLES_PER_CHECK_STEP = 50


def build_table_checks(
    tables: list[Table], config: ReplicationConfig, translator: TableAssetTranslator, keys: ResourceKeys = ResourceKeys()
) -> list:
    """Every table's checks, in multi-checks of up to ``TABLES_PER_CHECK_STEP`` tables: a run of
    checks is one step per group, each loading the code once."""
    groups = [tables[i : i + TABLES_PER_CHECK_STEP] for i in range(0, len(tables), TABLES_PER_CHECK_STEP)]
    names = [f"{config.source.name}_table_checks" + (f"_{n:03d}" if len(groups) > 1 else "") for n in range(len(groups))]
    return [_group_checks(name, group, config, translator, keys) for name, group in zip(names, groups)]


def _group_checks(
    name: str, tables: list[Table], config: ReplicationConfig, translator: TableAssetTranslator, keys: ResourceKeys
) -> dg.AssetChecksDefinition:
    automation = check_condition(config)
    checks: dict[dg.AssetCheckKey, _Check] = {}
    specs = []
    for table in tables:
        key = translator.get_asset_key(table)
        position = {"cdc": config.source.slot, "triggers": CaptureSettings.position}.get(table.strategy)
        for check_name, description in _check_specs(table, config):
            specs.append(dg.AssetCheckSpec(check_name, asset=key, description=description, automation_condition=automation))
            checks[dg.AssetCheckKey(key, check_name)] = _Check(table, check_name, position)

    @dg.multi_asset_check(name=name, specs=specs, can_subset=True, required_resource_keys=keys.both)
    def table_checks(context: dg.AssetCheckExecutionContext):
        source, warehouse = keys.source_of(context), keys.warehouse_of(context)
        for key in sorted(context.selected_asset_check_keys, key=lambda k: (k.asset_key.to_user_string(), k.name)):
            check = checks[key]
            try:
                yield _run(key, check, config, source, warehouse)
            except Exception as exc:  # one check that cannot run fails alone, saying why
                context.log.warning(f"{check.table.display}: {check.name} could not run: {exc!r}")
                reason = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
                yield dg.AssetCheckResult(
                    asset_key=key.asset_key, check_name=key.name, passed=False,
                    description=f"{check.table.display}: the check could not run: {reason}",
                )

    return CheckGroup.dagster_internal_init(**table_checks.get_attributes_dict())


class CheckGroup(dg.AssetChecksDefinition):
    """A multi-check that stays an ``AssetChecksDefinition`` when Dagster copies it. Dagster
    copies through ``self.__class__.dagster_internal_init``, which builds a plain
    ``AssetsDefinition``; the component tree copies every definition to add its defs.yaml
    metadata, and the repository then turned each copy back into a check definition once per
    check key: 3,000 copies of 150-check groups for 1,000 tables (bench/definitions_load.py)."""

    @staticmethod
    def dagster_internal_init(**attributes) -> "CheckGroup":
        with warnings.catch_warnings():  # as Dagster's own copy: no beta warnings for its fields
            warnings.simplefilter("ignore")
            return CheckGroup(**attributes)


def _run(key: dg.AssetCheckKey, check: _Check, config: ReplicationConfig, source: PostgresSource, warehouse: WarehouseResource) -> dg.AssetCheckResult:
    if check.name == "row_count_parity":
        result = _parity(check.table, check.position, source, warehouse)
    elif check.name == "cdc_freshness":
        result = _freshness(check.table, check.position, config.source.freshness_seconds, warehouse)
    else:
        result = _slot_health(config.source.slot, config.source.max_retained_wal_mb << 20, source)
    return dg.AssetCheckResult(
        asset_key=key.asset_key, check_name=key.name, passed=result.passed, severity=result.severity,
        description=result.description, metadata=result.metadata,
    )


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


def _parity(table: Table, position: str | None, source: PostgresSource, warehouse: WarehouseResource) -> dg.AssetCheckResult:
    for _ in range(2):
        held, (source_rows, at, waiting, late), stable = _read_both(source, warehouse, table, position)
        drained, status, wh_rows = held.drained, held.status, held.rows
        if table.strategy == "cdc":  # the warehouse read first: it has drained all the source holds only if it reached `at`
            exact = stable and drained is not None and drained >= at and status == "streaming"
        else:  # the query strategies never see deletes in between reloads: never exact
            exact = stable and table.strategy == "triggers" and not waiting and status == "streaming"
        # A transaction whose commit record precedes `at` but which ended just after the source's
        # snapshot is in the warehouse and not in the count: an ERROR only when a second reading agrees.
        if not exact or wh_rows == source_rows:
            break
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


def _freshness(table: Table, position: str | None, fresh_within: int, warehouse: WarehouseResource) -> dg.AssetCheckResult:
    """A table's FreshnessPolicy sees only its materializations: a quiet table gets none while its
    drain keeps it current. This says what the policy cannot: the drain runs and the table
    streams (not failed, not held), whether or not it changed."""
    held = _warehouse_state(warehouse, table, position)
    age, status = held.since, held.status
    passed = status == "streaming" and age is not None and age <= fresh_within
    return dg.AssetCheckResult(
        passed=passed,
        description=None if passed else f"{table.display}: status {status}, last drain "
        + (f"{age:.0f} s ago" if age is not None else "never"),
        metadata={"seconds_since_last_drain": round(age, 1) if age is not None else -1.0, "status": status},
    )


def _slot_health(slot: str, max_retained: int, source: PostgresSource) -> dg.AssetCheckResult:
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


__all__ = ["build_table_checks"]
