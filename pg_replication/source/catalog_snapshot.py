"""The last catalog read from the source, kept in a JSON file so that definitions can be built
while the source is down (a code location must not vanish, sensor included, because Postgres
restarted while it loaded). Only names, types, keys and options: no row, no connection string.

A snapshot is written after every successful load and read only when the source cannot be
reached; the drain runs it leads to re-read the catalog themselves (every run is a fresh process).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pg_replication.config import TableEntry
from pg_replication.source.catalog import Column, PgType, Table, Unavailable

VERSION = 1


@dataclass(frozen=True)
class CatalogSnapshot:
    tables: list[Table]
    unavailable: dict[str, Unavailable]  # by schema.table
    saved_at: float  # unix time


def save_snapshot(path: Path, tables: list[Table], unavailable: dict[str, Unavailable]) -> None:
    """Write atomically (a code location loading at the same time reads the old or the new one)."""
    payload = {
        "version": VERSION,
        "saved_at": time.time(),
        "tables": [_table_to_json(t) for t in tables],
        "unavailable": {k: asdict(u) for k, u in unavailable.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


def load_snapshot(path: Path) -> CatalogSnapshot | None:
    """The snapshot at ``path``; None when there is none (or it is from another version)."""
    try:
        payload = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    if payload.get("version") != VERSION:
        return None
    return CatalogSnapshot(
        [_table_from_json(t) for t in payload["tables"]],
        {k: Unavailable(**u) for k, u in payload["unavailable"].items()},
        float(payload["saved_at"]),
    )


def _table_to_json(table: Table) -> dict:
    raw = asdict(table)  # nested PgType and Column dataclasses become dicts
    raw["entry"] = table.entry.model_dump(mode="json") if table.entry else None
    return raw


def _type_from_json(raw: dict | None) -> PgType | None:
    if raw is None:
        return None
    return PgType(**{**raw, "element": _type_from_json(raw["element"]), "base": _type_from_json(raw["base"])})


def _table_from_json(raw: dict) -> Table:
    columns = tuple(Column(**{**c, "type": _type_from_json(c["type"])}) for c in raw["columns"])
    return Table(
        **{
            **raw,
            "columns": columns,
            "primary_key": tuple(raw["primary_key"]),
            "leaves": tuple(tuple(leaf) for leaf in raw["leaves"]),
            "entry": TableEntry.model_validate(raw["entry"]) if raw["entry"] else None,
        }
    )


__all__ = ["CatalogSnapshot", "Unavailable", "load_snapshot", "save_snapshot"]
