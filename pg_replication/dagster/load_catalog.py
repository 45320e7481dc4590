"""The catalog the definitions are built from: what a code location can load whatever the source's
state. One table that cannot be replicated is left out with its reason (never the whole load);
a source that is down gives the last snapshot (source/catalog_snapshot.py), or no tables, with
the outage named: the code location and its CDC sensor stay."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pg_replication.config import ReplicationConfig
from pg_replication.errors import SourceUnavailableError
from pg_replication.source.catalog import Table, Unavailable, introspect_each
from pg_replication.source.catalog_snapshot import CatalogSnapshot, load_snapshot, save_snapshot
from pg_replication.source.connection import connect, source_conninfo

log = logging.getLogger("pg_replication")


@dataclass(frozen=True)
class LoadedCatalog:
    tables: list[Table]  # what can be replicated now
    unavailable: dict[str, Unavailable] = field(default_factory=dict)  # by schema.table
    outage: str | None = None  # set when the source could not be read at load
    # Tables replicated before and left out now (missing, or no longer replicable), as last read:
    # their assets stay, marked with the reason.
    left_out: list[Table] = field(default_factory=list)

    def warnings(self) -> list[str]:
        notes = [self.outage] if self.outage else []
        return notes + [f"{key} {u.status}: {u.reason}" for key, u in sorted(self.unavailable.items())]


def snapshot_path(config: ReplicationConfig) -> Path | None:
    """In DAGSTER_HOME (the instance's own directory, there whenever Dagster runs for real), one
    file per source and configuration: another replication.yaml never reads this one's tables."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        return None
    digest = hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:12]
    return Path(home) / "pg_replication" / f"catalog.{config.source.name}.{digest}.json"


CATALOG_ENV_VAR = "PG_REPLICATION_CATALOG"


def load_catalog(config: ReplicationConfig) -> LoadedCatalog:
    """``PG_REPLICATION_CATALOG=saved``: the last snapshot when there is one, without connecting
    (refreshed by the ``refresh_catalog_<source>`` job); otherwise (``live``, the default) the
    source is read at every load and the snapshot saved."""
    path = snapshot_path(config)
    if path is not None and os.environ.get(CATALOG_ENV_VAR, "live") == "saved":
        saved = load_snapshot(path)
        if saved is not None:
            now, left_out = _split(saved.tables, saved.unavailable)
            return LoadedCatalog(now, saved.unavailable, None, left_out)
    try:
        with connect(source_conninfo()) as conn:
            tables, unavailable = introspect_each(conn, config)
    except SourceUnavailableError as exc:
        snapshot = load_snapshot(path) if path else None
        if snapshot is None:
            outage = f"source unavailable at load ({exc.message}): no table is defined until it is back and the code location reloads"
            log.warning(outage)
            return LoadedCatalog([], {}, outage)
        outage = (
            f"source unavailable at load ({exc.message}): tables as last read from it "
            f"({_when(snapshot.saved_at)}); reload the code location once it is back"
        )
        log.warning(outage)
        now, left_out = _split(snapshot.tables, snapshot.unavailable)
        return LoadedCatalog(now, snapshot.unavailable, outage, left_out)
    for key, problem in sorted(unavailable.items()):
        log.warning(f"{key} left out ({problem.status}): {problem.reason}")
    left_out = left_out_since(load_snapshot(path) if path else None, unavailable)
    if path is not None:
        try:
            save_snapshot(path, tables + left_out, unavailable)
        except OSError as exc:  # a read-only home: loading works, the next outage has no snapshot
            log.warning(f"could not save the catalog snapshot to {path}: {exc}")
    return LoadedCatalog(tables, unavailable, None, left_out)


def refresh_catalog(config: ReplicationConfig, conninfo: str, path: Path) -> tuple[int, int]:
    """Read the source's catalog and save it at ``path`` (the previous snapshot stays when the
    source cannot be read: the error says so). Returns (tables replicated, tables left out)."""
    with connect(conninfo) as conn:
        tables, unavailable = introspect_each(conn, config)
    left_out = left_out_since(load_snapshot(path), unavailable)
    save_snapshot(path, tables + left_out, unavailable)
    return len(tables), len(unavailable)


def catalog_from_snapshot(path: Path | None) -> LoadedCatalog:
    """The catalog a saved snapshot holds, without touching the source; none saved yet: no table,
    and a warning that says how to read one."""
    saved = load_snapshot(path) if path is not None else None
    if saved is None:
        return LoadedCatalog([], {}, "no catalog saved yet: run `dg utils refresh-defs-state` or the refresh_catalog job")
    now, left_out = _split(saved.tables, saved.unavailable)
    return LoadedCatalog(now, saved.unavailable, None, left_out)


def left_out_since(previous: CatalogSnapshot | None, unavailable: dict[str, Unavailable]) -> list[Table]:
    """Tables the previous snapshot held that cannot be replicated now: their assets stay."""
    return [t for t in previous.tables if _key(t) in unavailable] if previous else []


def _key(table: Table) -> str:
    return f"{table.schema}.{table.name}"


def _split(tables: list[Table], unavailable: dict[str, Unavailable]) -> tuple[list[Table], list[Table]]:
    """A snapshot's tables: those replicated when it was taken, and those already left out."""
    left_out = [t for t in tables if _key(t) in unavailable]
    return [t for t in tables if _key(t) not in unavailable], left_out


def _when(saved_at: float) -> str:
    return f"snapshot of {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(saved_at))}"


__all__ = ["LoadedCatalog", "catalog_from_snapshot", "load_catalog", "refresh_catalog", "snapshot_path"]
