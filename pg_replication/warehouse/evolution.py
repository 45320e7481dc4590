"""Schema evolution: the warehouse table follows the source's columns, decided from what the
warehouse stored (its column state), never from what a process saw when it loaded.

- A column the stored state lacks is new: rows already in the warehouse get Postgres's value for
  rows that existed at ADD COLUMN (its 'missing value', read from the source for exactly those
  columns), and so do rows inserted earlier in the same batch (``defaults``). A value no change
  event carries (a volatile default, a rewrite) fails the table: never NULLs under streaming.
- A renamed column is recognised by its attribute number and renamed in the warehouse.
- A widening type change the warehouse can follow in place (smaller to larger integer, numeric
  with more digits, longer or unbounded varchar) is followed; any other type change fails the table.
- A dropped source column stays in the warehouse.

Each DDL step is idempotent and records its result in the stored state before the next, so a
run killed between them resumes where it stopped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from pg_replication.errors import SchemaChangeError
from pg_replication.source.catalog import VOLATILE_DEFAULT, Table
from pg_replication.types import TypeMapping
from pg_replication.warehouse import staging

# names -> {name: (attnum or None, missing value text or None or VOLATILE_DEFAULT)}, read from the source
DescribeNew = Callable[[list[str]], dict[str, tuple[int | None, str | None]]]

_INTEGERS = {
    **{"SMALLINT": 0, "INTEGER": 1, "BIGINT": 2, "INT2": 0, "INT4": 1, "INT8": 2},
    **{"NUMBER(5,0)": 0, "NUMBER(10,0)": 1, "NUMBER(19,0)": 2},
    **{"INT16": 0, "INT32": 1, "INT64": 2},  # ClickHouse
}
_DECIMAL = re.compile(r"^(DECIMAL|NUMERIC|NUMBER)\((\d+),\s*(\d+)\)$", re.IGNORECASE)
_VARCHAR = re.compile(r"^(CHARACTER VARYING|VARCHAR)(\((\d+)\))?$", re.IGNORECASE)


def widens(old: str, new: str) -> bool:
    """Whether every value of warehouse type ``old`` fits ``new`` unchanged."""
    old, new = _plain(old), _plain(new)
    if old.upper() in _INTEGERS and new.upper() in _INTEGERS:
        return _INTEGERS[new.upper()] > _INTEGERS[old.upper()]
    a, b = _DECIMAL.match(old), _DECIMAL.match(new)
    if a and b and a.group(1).upper() == b.group(1).upper():
        (p, s), (p2, s2) = (int(a.group(2)), int(a.group(3))), (int(b.group(2)), int(b.group(3)))
        return (p2, s2) != (p, s) and s2 >= s and p2 - s2 >= p - s
    v = _VARCHAR.match(old)
    if v and v.group(3) is not None:
        w = _VARCHAR.match(new)
        if new.lower() == "text" or (w and w.group(3) is None):
            return True
        return bool(w and int(w.group(3)) > int(v.group(3)))
    return False


def _plain(ddl: str) -> str:
    """A Postgres replica's quoted catalog name ("pg_catalog"."int4") as a plain type name, and a
    ClickHouse Nullable(T) as T (every value column is Nullable there, before and after)."""
    ddl = ddl.replace('"pg_catalog".', "").replace('"', "").strip()
    return ddl[len("Nullable(") : -1] if ddl.startswith("Nullable(") and ddl.endswith(")") else ddl


class SchemaEvolution:
    """Mixed into the engine (``SqlWarehouse``): uses its execute/ident/state helpers."""

    def add_columns(self, table: Table, mappings: dict[str, TypeMapping], describe_new: DescribeNew) -> dict:
        """DDL half of following the source's columns (idempotent). Returns what the stored
        column state gains; renames and widenings are stored at once."""
        key = f"{table.schema}.{table.name}"
        stored = self.stored_columns(key)  # type: ignore[attr-defined]
        for name, mapping in mappings.items():
            if name in stored and stored[name]["type"] != mapping.ddl:
                self._follow_type_change(table, name, stored[name]["type"], mapping)
        new = [n for n in mappings if n not in stored]
        creating = not stored  # the first slice creates the table: its rows come with every column
        facts = describe_new(new) if new else {}
        stored = self._follow_renames(table, stored, set(mappings), facts)
        physical = {self.fold(c) for c in self.physical_columns(self.schema_of(table), table.name) or ()}  # type: ignore[attr-defined]
        added = {}
        for name in [n for n in new if n not in stored]:
            mapping = mappings[name]
            attnum, value = facts.get(name, (None, None))
            if creating:
                value = None
            if value == VOLATILE_DEFAULT:
                raise SchemaChangeError(
                    f"{table.display}: column {name!r} was added with a volatile default (or the table was "
                    "rewritten since): the values existing rows got are in no change event",
                    table=table.display,
                    hint="resync the table (pg-replication resync TABLE); its changes wait in its change log",
                )
            if value is not None and mapping.from_text is not None:
                value = mapping.from_text(value)  # Postgres's text form -> the staged form loads read
            added[name] = {"type": mapping.ddl, "load": mapping.load, "attnum": attnum, "missing": value}
            if self.fold(name) not in physical:  # type: ignore[attr-defined]  # else added by a run that then died
                self.add_column(table, name, mapping, value)
        return added

    def _follow_type_change(self, table: Table, name: str, old: str, mapping: TypeMapping) -> None:
        if not widens(old, mapping.ddl):
            raise SchemaChangeError(
                f"{table.display}: column {name!r} changed type from {old} to {mapping.ddl} in the source; "
                "the warehouse table cannot follow in place",
                table=table.display,
                hint="resync the table (pg-replication resync TABLE); its changes wait in its change log",
            )
        self.alter_column_type(table, name, mapping.ddl)
        key = f"{table.schema}.{table.name}"
        stored = self.stored_columns(key)  # type: ignore[attr-defined]
        stored[name] = {**stored[name], "type": mapping.ddl, "load": mapping.load}
        self._store_columns(key, stored)  # type: ignore[attr-defined]

    def _follow_renames(self, table: Table, stored: dict, current: set[str], facts: dict) -> dict:
        """A new name whose attribute number a vanished stored column had is that column renamed."""
        vanished = {c.get("attnum"): name for name, c in stored.items() if name not in current and c.get("attnum")}
        renames = {vanished[attnum]: name for name, (attnum, _) in facts.items() if attnum in vanished}
        if not renames:
            return stored
        physical = {self.fold(c) for c in self.physical_columns(self.schema_of(table), table.name) or ()}  # type: ignore[attr-defined]
        for old, new in renames.items():
            if self.fold(old) in physical and self.fold(new) not in physical:  # type: ignore[attr-defined]
                self.execute(f"ALTER TABLE {self.table_name(table)} RENAME COLUMN {self.ident(old)} TO {self.ident(new)}")  # type: ignore[attr-defined]
        renamed = {  # "was": earlier names, which changes drained or logged before the rename carry
            renames.get(name, name): {**c, "was": [*c.get("was", []), name]} if name in renames else c
            for name, c in stored.items()
        }
        self._store_columns(f"{table.schema}.{table.name}", renamed)  # type: ignore[attr-defined]
        return renamed

    def current_names(self, table: Table, columns: Sequence[str]) -> tuple[str, ...]:
        """A segment's columns under their names now: a segment from before a rename carries the
        old name (and not the new one, which is how it is told from a later column reusing it)."""
        stored = self.stored_columns(f"{table.schema}.{table.name}")  # type: ignore[attr-defined]
        now = {old: name for name, c in stored.items() for old in c.get("was", ())}
        return tuple(now[c] if c in now and now[c] not in columns else c for c in columns)

    def sql_literal(self, mapping: TypeMapping, value: str) -> str:
        """A staged value as a typed literal of this warehouse's SQL (where no parameter can go)."""
        return staging.literal(mapping, value)

    def alter_column_type(self, table: Table, name: str, ddl: str) -> None:
        self.execute(f"ALTER TABLE {self.table_name(table)} ALTER COLUMN {self.ident(name)} TYPE {ddl}")  # type: ignore[attr-defined]

    def add_column(self, table: Table, name: str, mapping: TypeMapping, value: str | None) -> None:
        """Add a column; rows already there get ``value`` (Postgres's missing value), later
        inserts do not."""
        target, column = self.table_name(table), self.ident(name)  # type: ignore[attr-defined]
        if value is None:
            self.execute(f"ALTER TABLE {target} ADD COLUMN {column} {mapping.ddl}")  # type: ignore[attr-defined]
            return
        self.execute(f"ALTER TABLE {target} ADD COLUMN {column} {mapping.ddl} DEFAULT {self.sql_literal(mapping, value)}")  # type: ignore[attr-defined]
        # Every write names every column, so a default left by a crash here would never apply.
        self.execute(f"ALTER TABLE {target} ALTER COLUMN {column} DROP DEFAULT")  # type: ignore[attr-defined]

    def defaults(self, table: Table, current: tuple[str, ...]) -> dict[str, str]:
        """For rows a segment inserts without a column the table gained later in the stream (the
        ADD COLUMN came after them): the value Postgres gives them, as typed SQL literals."""
        stored = self.stored_columns(f"{table.schema}.{table.name}")  # type: ignore[attr-defined]
        return {
            name: self.sql_literal(TypeMapping(None, c["type"], load=c["load"]), c["missing"])  # type: ignore[arg-type]
            for name, c in stored.items()
            if c.get("missing") is not None and name in current
        }
