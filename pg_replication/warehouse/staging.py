"""Change batches in one staged shape, shared by the drain, the change log and every warehouse.

A folded Segment becomes one Arrow table of strings:

- ``_seq``: order within the segment; ``_op``: 'U' (upsert), 'D' (delete) or 'T' (truncate);
- ``_unknown``: one '0'/'1' per column, '1' = keep the warehouse's value (unchanged TOAST);
- ``_f0..``: the key of the warehouse row unknown values come from (the row's own key unless
  the update changed it);
- ``c0..``: the values, staged as text, in the segment's column order.

The change log stores the same rows, so applying a drain and replaying the log are one
operation: ``resolved_select`` turns staged rows into typed warehouse rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from pg_replication.replicate.changes import Segment
from pg_replication.types import TypeMapping

SEQ, OP, UNKNOWN = "_seq", "_op", "_unknown"


def fill_column(i: int) -> str:
    return f"_f{i}"


def value_column(i: int) -> str:
    return f"c{i}"


@dataclass(frozen=True)
class StagedChanges:
    """A relation of staged change rows (see the module docstring) the warehouse can read."""

    relation: str  # a table name or a parenthesized subquery
    columns: tuple[str, ...]  # the source column behind c0, c1, ...
    truncated: bool  # the segment starts by emptying the table
    rows: int
    unknowns: bool = True  # some row keeps a warehouse value (False only when known to be none)
    defaults: dict[str, str] = field(default_factory=dict)  # typed literal for a column it lacks, on new rows


def _strings(values) -> pa.Array:
    return pa.array(values, pa.string())


def segment_table(segment: Segment, key_width: int) -> pa.Table:
    """The staged form of one folded segment."""
    width = len(segment.columns)
    ops: list[str] = []
    unknown: list[str | None] = []
    fills: list[tuple] = []
    rows: list[Sequence[str | None]] = []
    no_key = (None,) * key_width
    if segment.truncated:
        ops.append("T"), unknown.append(None), fills.append(no_key), rows.append((None,) * width)
    for key, upsert in segment.rows.items():
        if upsert is None:
            values: list[str | None] = [None] * width
            for pos, v in zip(segment.key_positions, key):
                values[pos] = v
            ops.append("D"), unknown.append(None), fills.append(no_key), rows.append(values)
        else:
            flags = "".join("1" if i in upsert.unknown else "0" for i in range(width)) if upsert.unknown else None
            ops.append("U"), unknown.append(flags), fills.append(upsert.fill_key), rows.append(upsert.values)
    data = {SEQ: pa.array(range(len(ops)), pa.int64()), OP: _strings(ops), UNKNOWN: _strings(unknown)}
    by_fill = list(zip(*fills)) if fills else [()] * key_width
    for i in range(key_width):
        data[fill_column(i)] = _strings(by_fill[i])
    by_column = list(zip(*rows)) if rows else [()] * width  # transpose rows to columns in C
    for i in range(width):
        data[value_column(i)] = _strings(by_column[i])
    return pa.table(data)


def typed(mapping: TypeMapping, expr: str) -> str:
    """A staged text value converted to the warehouse column's type."""
    return f"CAST({mapping.load_sql(expr)} AS {mapping.ddl})"


def literal(mapping: TypeMapping, value: str) -> str:
    """A staged text value as a typed SQL literal (DDL defaults, where no parameter can go)."""
    return typed(mapping, "'" + value.replace("'", "''") + "'")


def resolved_select(
    changes: StagedChanges,
    target: str,
    target_columns: Sequence[str],
    mappings: dict[str, TypeMapping],
    key: Sequence[str],
    ident: Callable[..., str],
) -> str:
    """``SELECT _op, <every warehouse column, typed>`` for the segment's 'U' and 'D' rows.

    A column the row marks unknown, or one the segment does not carry (dropped from the source,
    or added to the warehouse later), keeps the value of the warehouse row named by ``_f*``; a
    new row takes the column's ``defaults`` entry (Postgres's value for rows that existed when the
    column was added). A 'D' row carries only its key.
    """
    position = {name: i for i, name in enumerate(changes.columns)}
    select = [f"s.{ident(OP)} AS {ident(OP)}"]
    if not changes.unknowns and all(name in position for name in target_columns):
        # Every value is in the staged row: no warehouse row to read (a join with the whole table).
        select += [f"{typed(mappings[n], 's.' + ident(value_column(position[n])))} AS {ident(n)}" for n in target_columns]
        return f"SELECT {', '.join(select)} FROM {changes.relation} s WHERE s.{ident(OP)} <> 'T'"
    for name in target_columns:
        kept = f"w.{ident(name)}"
        if name not in position:
            if name in changes.defaults:
                kept = f"CASE WHEN w.{ident(key[0])} IS NULL THEN {changes.defaults[name]} ELSE {kept} END"
            select.append(f"{kept} AS {ident(name)}")
            continue
        i = position[name]
        value = typed(mappings[name], f"s.{ident(value_column(i))}")
        if name not in key:
            value = f"CASE WHEN substr(s.{ident(UNKNOWN)}, {i + 1}, 1) = '1' THEN {kept} ELSE {value} END"
        select.append(f"{value} AS {ident(name)}")
    return (
        f"SELECT {', '.join(select)} FROM {changes.relation} s LEFT JOIN {target} w ON {fill_join(mappings, key, ident)} "
        f"WHERE s.{ident(OP)} <> 'T'"
    )


def fill_join(mappings: dict[str, TypeMapping], key: Sequence[str], ident: Callable[..., str]) -> str:
    """Staged rows ``s`` to the warehouse rows ``w`` their unknown values come from."""
    return " AND ".join(f"w.{ident(k)} = {typed(mappings[k], 's.' + ident(fill_column(j)))}" for j, k in enumerate(key))


def orphaned_fills(
    changes: StagedChanges, target: str, mappings: dict[str, TypeMapping], key: Sequence[str], ident: Callable[..., str]
) -> str:
    """``SELECT <staged key>`` of the upserts that keep a warehouse value the warehouse does not
    hold: the row to take it from is missing."""
    position = {name: i for i, name in enumerate(changes.columns)}
    keys = ", ".join(f"s.{ident(value_column(position[k]))}" for k in key)
    return (
        f"SELECT {keys} FROM {changes.relation} s LEFT JOIN {target} w ON {fill_join(mappings, key, ident)} "
        f"WHERE s.{ident(OP)} = 'U' AND s.{ident(UNKNOWN)} LIKE '%1%' AND w.{ident(key[0])} IS NULL"
    )
