"""``pg-replication``: the operator's command line (status, list, listwh, drop-slot, resync, retry,
wait-for-lsn, install-triggers, uninstall-triggers). Readable tables on a terminal, ``--json`` for scripts.

Exit codes: 0 ok; 1 an error (message and hint on stderr, no traceback); 2 usage; 3 wait-for-lsn
timed out; 4 status found a problem (a failed table, or a lost or missing slot).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

from psycopg import sql

from pg_replication.config import load_config
from pg_replication.errors import PgReplicationError, redact
from pg_replication.replicate.operations import drop_slot, resync_table, retry_table
from pg_replication.source.catalog import introspect, introspect_each, list_source_tables, select_tables
from pg_replication.source.connection import connect, source_conninfo
from pg_replication.source.pgoutput import int_to_lsn, lsn_to_int
from pg_replication.source.slot import slot_status
from pg_replication.source.triggers import install, uninstall
from pg_replication.warehouse.connect import open_warehouse

EXIT_ERROR, EXIT_USAGE, EXIT_TIMEOUT, EXIT_UNHEALTHY = 1, 2, 3, 4


def _component(args):
    """The PgReplicationComponent of ``--defs`` (loaded once; Dagster is imported only then)."""
    if getattr(args, "component", None) is None:
        from pathlib import Path

        from pg_replication.dagster.component import load_component

        args.component = load_component(Path(args.defs))
    return args.component


def _config(args):
    """replication.yaml, or with ``--defs`` the component's attributes."""
    return _component(args).config if args.defs else load_config()


def _conninfo(args) -> str:
    """POSTGRES_URL, or with ``--defs`` the component's ``postgres_url_env`` (as its resource
    reads it: unset, libpq takes the PG* variables)."""
    return os.environ.get(_component(args).postgres_url_env, "") if args.defs else source_conninfo()


def _print_table(rows: list[dict], columns: Sequence[str]) -> None:
    shown = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in shown]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)))
    for row in shown:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _emit(args, payload, rows: list[dict], columns: Sequence[str], header: str | None = None) -> None:
    if args.json:
        print(json.dumps(payload, default=str, indent=2))
        return
    if header:
        print(header)
    _print_table(rows, columns)


def cmd_status(args) -> int:
    config = _config(args)
    with connect(_conninfo(args)) as conn:
        slot = slot_status(conn, config.source.slot)
        tables, unavailable = introspect_each(conn, config)
        estimates = {f"{t.schema}.{t.name}": t.estimated_rows for t in tables}
    with open_warehouse(config, read_only=True) as wh:
        report, drained, since_drain = {}, None, None
        if wh.has_state():  # nothing was ever replicated here otherwise
            report = {r["table"]: r for r in wh.report()}
            drained = wh.drained_lsn(config.source.slot)
            since_drain = wh.seconds_since_drain(config.source.slot)
        rows = []
        for t in tables:
            key = f"{t.schema}.{t.name}"
            r = report.get(key, {"status": "not started"})
            wh_rows = wh.row_count(t) if wh.exists(t) else None
            rows.append(
                {
                    "table": key,
                    "status": r.get("status"),
                    "backfill": f"{r.get('slices_done', 0)}/{r.get('slices') or '-'}",  # snapshot slices, several per partition
                    "applied_lsn": int_to_lsn(r["applied_lsn"]) if r.get("applied_lsn") else None,
                    "source_rows_est": estimates.get(key),
                    "warehouse_rows": wh_rows,
                    "error": r.get("error"),
                }
            )
    for key, problem in sorted(unavailable.items()):  # left out of the definitions: say why
        rows.append({"table": key, "status": problem.status, "backfill": "-", "error": problem.reason})
    slot_info = None
    if slot is not None:
        slot_info = {
            "name": slot.name,
            "active": slot.active,
            "wal_status": slot.wal_status,
            "confirmed_lsn": int_to_lsn(slot.confirmed_lsn),
            "current_lsn": int_to_lsn(slot.current_lsn),
            "lag_bytes": slot.lag_bytes,
            "wal_retained_bytes": slot.retained_bytes,
            "warehouse_drained_lsn": int_to_lsn(drained) if drained else None,
            # pending WAL is at most this old: the last drain read everything before it
            "lag_seconds": round(since_drain, 1) if since_drain is not None and slot.lag_bytes else 0.0,
        }
    header = (
        f"slot {config.source.slot}: missing" + ("" if any(t.strategy == "cdc" for t in tables) else " (no table uses strategy cdc)")
        if slot_info is None
        else "slot {name}: active={active} wal_status={wal_status} confirmed={confirmed_lsn} current={current_lsn} "
        "lag={lag_bytes} B / {lag_seconds} s retained={wal_retained_bytes} B".format(**slot_info)
    )
    _emit(args, {"slot": slot_info, "tables": rows}, rows, ["table", "status", "backfill", "applied_lsn", "source_rows_est", "warehouse_rows", "error"], header)
    needs_slot = any(t.strategy == "cdc" for t in tables)
    slot_trouble = (slot is None and needs_slot) or (slot is not None and slot.wal_status == "lost")
    unhealthy = slot_trouble or any(r["status"] in ("failed", "missing") for r in rows)
    return EXIT_UNHEALTHY if unhealthy else 0


def cmd_list(args) -> int:
    config = _config(args)
    with connect(_conninfo(args)) as conn:
        candidates = list_source_tables(conn)
        selected = {(t.schema, t.name) for t, _ in select_tables(config, candidates)}
        pkeys = dict(
            conn.execute(
                "SELECT conrelid, true FROM pg_constraint WHERE contype = 'p'"
            ).fetchall()
        )
        sizes = dict(conn.execute("SELECT oid, pg_total_relation_size(oid) FROM pg_class WHERE relkind IN ('r', 'p')").fetchall())
    rows = [
        {
            "table": sql.Identifier(t.schema, t.name).as_string(),
            "primary_key": bool(pkeys.get(t.oid)),
            "replica_identity": {"d": "default", "f": "full", "i": "index", "n": "nothing"}.get(t.replica_identity),
            "size_bytes": sizes.get(t.oid),
            "est_rows": t.estimated_rows,
            "qualifies": bool(pkeys.get(t.oid)) and not t.is_partition,
            "configured": (t.schema, t.name) in selected,
        }
        for t in sorted(candidates, key=lambda c: (c.schema, c.name))
    ]
    _emit(args, rows, rows, ["table", "primary_key", "replica_identity", "size_bytes", "est_rows", "qualifies", "configured"])
    return 0


def cmd_listwh(args) -> int:
    config = _config(args)
    with open_warehouse(config, read_only=True) as wh:
        rows = [{"table": f"{schema}.{name}", "rows": count} for schema, name, count in wh.list_tables()]
    _emit(args, rows, rows, ["table", "rows"])
    return 0


def _confirm(args, question: str) -> bool:
    if args.yes:
        return True
    if not sys.stdin.isatty():
        print(f"{question} Refusing without --yes (no terminal to ask).", file=sys.stderr)
        return False
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def cmd_drop_slot(args) -> int:
    config = _config(args)
    if not _confirm(args, f"Drop replication slot {config.source.slot!r}? Undrained changes are lost; every table then needs a resync."):
        return EXIT_USAGE
    with open_warehouse(config) as wh:
        existed = drop_slot(_conninfo(args), wh, config.source.slot)
    print(f"slot {config.source.slot!r} {'dropped' if existed else 'did not exist'}; drained position forgotten")
    return 0


def _configured_table(args, config, name: str):
    """The configured table ``name`` names (schema.table, table, or its quoted form)."""
    with connect(_conninfo(args)) as conn:
        tables = [t for t in introspect(conn, config) if name in (f"{t.schema}.{t.name}", t.name, t.display)]
    if not tables:
        raise PgReplicationError(f"{name!r} is not a configured table", hint="see `pg-replication status`")
    (table,) = tables
    return table


def cmd_resync(args) -> int:
    config = _config(args)
    table = _configured_table(args, config, args.table)
    if not _confirm(args, f"Resync {table.display}? Its warehouse copy is dropped until the backfill runs again."):
        return EXIT_USAGE
    with open_warehouse(config) as wh:
        resync_table(wh, table)
    print(
        f"{table.display}: reset; materialize all its partitions to backfill it again (CDC resumes after, and the "
        "document sets holding it are built again when its backfill completes)"
    )
    from pg_replication.dagster.partition_status import clear_partition_status  # Dagster loads only here

    translator = _component(args).get_translator(config) if args.defs else None  # a component's keys carry its prefix
    try:
        print(clear_partition_status(config, table, translator))
    except Exception as exc:  # the warehouse is reset either way: say what is left to do
        print(
            f"pg-replication: Dagster's partition status of {table.display} was not cleared: "
            f"{redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)}; wipe the asset in the UI",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return 0


def cmd_retry(args) -> int:
    config = _config(args)
    table = _configured_table(args, config, args.table)
    if not _confirm(args, f"Retry {table.display}? Its logged changes are applied now (fix what made it fail first)."):
        return EXIT_USAGE
    with open_warehouse(config) as wh:
        replayed = retry_table(_conninfo(args), wh, table, frozenset(d.name for d in config.documents), print)
    print(f"{table.display}: {replayed:,} logged change(s) replayed; streaming again")
    return 0


def cmd_install_triggers(args) -> int:
    config = _config(args)
    with connect(_conninfo(args)) as conn:
        tables = [t for t in introspect(conn, config) if t.entry and t.entry.strategy == "triggers"]
        if not tables:
            raise PgReplicationError("no table in replication.yaml has strategy triggers", hint="set `strategy: triggers` on a table")
        install(conn, tables, grant_to=args.grant_to)
    for table in tables:
        print(f"{table.display}: changes captured")
    if args.grant_to:
        print(f"role {args.grant_to!r} may read and delete captured changes (grant it SELECT on the tables too)")
    return 0


def cmd_uninstall_triggers(args) -> int:
    if not _confirm(args, "Remove every capture trigger and the captured changes not yet drained?"):
        return EXIT_USAGE
    with connect(_conninfo(args)) as conn:
        removed = uninstall(conn)
    print(f"removed capture from {len(removed)} table(s){': ' + ', '.join(removed) if removed else ''}; schema _pg_replication_capture dropped")
    return 0


def wait_for_lsn(read_state: Callable[[], tuple[int | None, dict[str, str]]], lsn: int, timeout: float) -> bool:
    """Poll until the warehouse has drained past ``lsn`` and every table streams. (A drain run
    must be happening: the sensor requests them.)"""
    deadline = time.monotonic() + timeout
    while True:
        drained, statuses = read_state()
        if drained is not None and drained >= lsn and all(s == "streaming" for s in statuses.values()):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)


def cmd_wait_for_lsn(args) -> int:
    config = _config(args)
    target = lsn_to_int(args.lsn)

    def read_state():
        try:
            with open_warehouse(config, read_only=True, wait_seconds=max(1.0, args.timeout)) as wh:
                if not wh.has_state():
                    return None, {}
                return wh.drained_lsn(config.source.slot), {k: s for k, (s, _) in wh.statuses().items()}
        except PgReplicationError:
            return None, {}

    if wait_for_lsn(read_state, target, args.timeout):
        print(f"applied past {args.lsn}")
        return 0
    print(f"timed out after {args.timeout:g} s waiting for {args.lsn}", file=sys.stderr)
    return EXIT_TIMEOUT


def _driver_errors() -> tuple[type[BaseException], ...]:
    """The warehouse and source drivers' errors (Snowflake's only if it was loaded)."""
    import duckdb
    import psycopg

    errors: list[type[BaseException]] = [duckdb.Error, psycopg.Error]
    snowflake_errors = sys.modules.get("snowflake.connector.errors")
    if snowflake_errors is not None:
        errors.append(snowflake_errors.Error)
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pg-replication", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--defs", metavar="PATH",
        help="act on a PgReplicationComponent source: its defs.yaml (or the folder holding it) instead of replication.yaml",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="slot, lag, WAL retained and per-table state").set_defaults(run=cmd_status)
    sub.add_parser("list", help="source tables and whether they qualify").set_defaults(run=cmd_list)
    sub.add_parser("listwh", help="warehouse tables and row counts").set_defaults(run=cmd_listwh)
    drop = sub.add_parser("drop-slot", help="drop the replication slot")
    drop.add_argument("--yes", action="store_true")
    drop.set_defaults(run=cmd_drop_slot)
    resync = sub.add_parser("resync", help="forget a table so its backfill runs again (and clear its partitions in DAGSTER_HOME's instance)")
    resync.add_argument("table")
    resync.add_argument("--yes", action="store_true")
    resync.set_defaults(run=cmd_resync)
    retry = sub.add_parser("retry", help="replay a failed table's change log after its cause was fixed")
    retry.add_argument("table")
    retry.add_argument("--yes", action="store_true")
    retry.set_defaults(run=cmd_retry)
    triggers = sub.add_parser("install-triggers", help="capture changes with triggers (strategy triggers); run as the table owner")
    triggers.add_argument("--grant-to", metavar="ROLE", help="the role pg_replication connects as: may read and delete captured changes")
    triggers.set_defaults(run=cmd_install_triggers)
    untriggers = sub.add_parser("uninstall-triggers", help="remove every capture trigger and the change table")
    untriggers.add_argument("--yes", action="store_true")
    untriggers.set_defaults(run=cmd_uninstall_triggers)
    wait = sub.add_parser("wait-for-lsn", help="wait until every table has applied an LSN")
    wait.add_argument("lsn")
    wait.add_argument("--timeout", type=float, default=60.0)
    wait.set_defaults(run=cmd_wait_for_lsn)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except PgReplicationError as exc:
        print(f"pg-replication: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a driver's error: one line, never a traceback (or a password in one)
        if not isinstance(exc, _driver_errors()):
            raise
        print(f"pg-replication: warehouse error: {redact(str(exc).strip().splitlines()[0])}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
