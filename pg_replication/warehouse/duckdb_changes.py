"""Applying folded change segments to DuckDB, and the per-table change log.

A segment becomes two Arrow tables (upserts with their staged values, deleted keys), then one
resolve query (filling unknown TOAST values from the rows the warehouse holds), one DELETE and
one INSERT. Rows are rebuilt rather than UPDATEd: DuckDB skips an UPDATE whose new value compares
equal to the old one (-0.0 vs 0.0, '1 mon' vs '30 days'), which would lose the change.

Tables whose backfill is not complete, or that failed, get their segments appended to a change
log (``_pg_replication."log.<schema>.<table>"``) instead; ``replay_log`` applies it later.
"""

from __future__ import annotations

from collections.abc import Mapping

import duckdb
import pyarrow as pa

from pg_replication.changes import Segment, Upsert
from pg_replication.types import TypeMapping
from pg_replication.warehouse.base import SLICE_COLUMN, STATE_SCHEMA
from pg_replication.warehouse.base import quote as q


def one(conn: duckdb.DuckDBPyConnection, query: str, params: list | None = None) -> tuple | None:
    """The first row of a query. (DuckDB 2 keeps a partly fetched result open and refuses the
    next statement on the connection, so always fetch everything.)"""
    rows = conn.execute(query, params or []).fetchall()
    return rows[0] if rows else None


def log_table(schema: str, name: str) -> str:
    return q(STATE_SCHEMA, f"log.{schema}.{name}")


def _typed(mapping: TypeMapping, expr: str) -> str:
    return f"CAST({mapping.load_sql(expr)} AS {mapping.duckdb})"


def _strings(values) -> pa.Array:
    return pa.array(values, pa.string())


def apply_segment(
    conn: duckdb.DuckDBPyConnection,
    target: str,
    segment: Segment,
    mappings: Mapping[str, TypeMapping],
    key: tuple[str, ...],
) -> None:
    """Apply one segment inside the caller's transaction."""
    if segment.truncated:
        conn.execute(f"DELETE FROM {target}")
    upserts = [(k, u) for k, u in segment.rows.items() if u is not None]
    deleted = [k for k, u in segment.rows.items() if u is None]
    key_exprs = ", ".join(q(k) for k in key)
    if upserts:  # resolved first: unknown values may come from rows deleted below
        _resolve_upserts(conn, target, segment, upserts, mappings, key)
    if deleted:
        conn.register("pgr_deleted", pa.table({f"k{i}": _strings([d[i] for d in deleted]) for i in range(len(key))}))
        staged_keys = ", ".join(_typed(mappings[k], q(f"k{i}")) for i, k in enumerate(key))
        conn.execute(f"DELETE FROM {target} WHERE ({key_exprs}) IN (SELECT {staged_keys} FROM pgr_deleted)")
        conn.unregister("pgr_deleted")
    if not upserts:
        return
    conn.execute(f"DELETE FROM {target} WHERE ({key_exprs}) IN (SELECT {key_exprs} FROM pgr_resolved)")
    names = ", ".join(q(c) for c in segment.columns)
    conn.execute(f"INSERT INTO {target} ({names}, {q(SLICE_COLUMN)}) SELECT {names}, NULL FROM pgr_resolved")
    conn.execute("DROP TABLE pgr_resolved")


def _resolve_upserts(conn, target, segment, upserts, mappings, key) -> None:
    """Stage the upserts and resolve them into the temp table ``pgr_resolved`` (typed values,
    unknown ones taken from the warehouse row named by ``fill_key``)."""
    columns = segment.columns
    by_column = list(zip(*(u.values for _, u in upserts)))  # transpose rows to columns in C
    data = {name: _strings(by_column[i]) for i, name in enumerate(columns)}
    unknown_cols = sorted({i for _, u in upserts if u.unknown for i in u.unknown})
    for i in unknown_cols:
        data[f"_u{i}"] = pa.array([i in u.unknown for _, u in upserts], pa.bool_())
    if unknown_cols:
        for j, _ in enumerate(key):
            data[f"_fill{j}"] = _strings([u.fill_key[j] for _, u in upserts])
    conn.register("pgr_stage", pa.table(data))
    select = []
    for i, name in enumerate(columns):
        value = _typed(mappings[name], f"s.{q(name)}")
        if i in unknown_cols:
            value = f"CASE WHEN s.{q(f'_u{i}')} THEN w.{q(name)} ELSE {value} END"
        select.append(f"{value} AS {q(name)}")
    source = "pgr_stage s"
    if unknown_cols:
        join = " AND ".join(f"w.{q(k)} = {_typed(mappings[k], 's.' + q(f'_fill{j}'))}" for j, k in enumerate(key))
        source = f"pgr_stage s LEFT JOIN {target} w ON {join}"
    conn.execute(f"CREATE OR REPLACE TEMP TABLE pgr_resolved AS SELECT {', '.join(select)} FROM {source}")
    conn.unregister("pgr_stage")


# -- the change log -------------------------------------------------------------------------------

_LOG_META = ("_seq", "_segment", "_op", "_unknown", "_fill_key")


def ensure_log(conn: duckdb.DuckDBPyConnection, schema: str, name: str, columns: tuple[str, ...]) -> tuple[str, list[str]]:
    """The log table (created or widened to hold ``columns``) and all its data columns."""
    table = log_table(schema, name)
    conn.execute(
        f"""CREATE TABLE IF NOT EXISTS {table} (_seq BIGINT, _segment BIGINT, _op VARCHAR,
            _unknown VARCHAR[], _fill_key VARCHAR[])"""
    )
    have = {r[0] for r in conn.execute(f"SELECT name FROM pragma_table_info('{table.replace(chr(39), chr(39) * 2)}')").fetchall()}
    for column in columns:
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {q(column)} VARCHAR")
    return table, [c for c in have if c not in _LOG_META] + [c for c in columns if c not in have]


def append_log(conn: duckdb.DuckDBPyConnection, schema: str, name: str, segment: Segment, key: tuple[str, ...]) -> int:
    """Append one folded segment to the table's log. Returns the number of log rows."""
    table, log_columns = ensure_log(conn, schema, name, segment.columns)
    # Columns the log holds but this segment does not (dropped, or not yet added): on replay the
    # warehouse row keeps its value for them, as for unchanged TOAST.
    absent = [c for c in log_columns if c not in segment.columns]
    seq0 = one(conn, f"SELECT coalesce(max(_seq), 0), coalesce(max(_segment), 0) FROM {table}")
    seq, seg_id = int(seq0[0]) + 1, int(seq0[1]) + 1  # type: ignore[index]
    ops: list[str] = []
    unknown: list[list[str] | None] = []
    fill: list[list[Staged] | None] = []
    rows: list[list[Staged]] = []
    width = len(segment.columns)
    if segment.truncated:
        ops.append("T"), unknown.append(None), fill.append(None), rows.append([None] * width)
    for k, u in segment.rows.items():
        if u is None:
            values: list[Staged] = [None] * width
            for pos, v in zip(segment.key_positions, k):
                values[pos] = v
            ops.append("D"), unknown.append(None), fill.append(None), rows.append(values)
        else:
            ops.append("U")
            unknown.append([segment.columns[i] for i in sorted(u.unknown)] + absent or None)
            fill.append(list(u.fill_key) if u.unknown or absent else None)
            rows.append(u.values)
    n = len(ops)
    data = {
        "_seq": pa.array(range(seq, seq + n), pa.int64()),
        "_segment": pa.array([seg_id] * n, pa.int64()),
        "_op": _strings(ops),
        "_unknown": pa.array(unknown, pa.list_(pa.string())),
        "_fill_key": pa.array(fill, pa.list_(pa.string())),
    }
    for i, column in enumerate(segment.columns):
        data[column] = _strings([r[i] for r in rows])
    conn.register("pgr_log", pa.table(data))
    names = ", ".join(q(c) for c in data)
    conn.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM pgr_log")
    conn.unregister("pgr_log")
    return n


Staged = str | None


def replay_log(
    conn: duckdb.DuckDBPyConnection,
    schema: str,
    name: str,
    target: str,
    mappings: Mapping[str, TypeMapping],
    key: tuple[str, ...],
) -> int:
    """Apply every logged segment in order, then empty the log. Returns the rows replayed."""
    table = log_table(schema, name)
    exists = one(
        conn,
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
        [STATE_SCHEMA, f"log.{schema}.{name}"],
    )[0]  # type: ignore[index]
    if not exists:
        return 0
    columns = tuple(
        r[0]
        for r in conn.execute(f"SELECT name FROM pragma_table_info('{table.replace(chr(39), chr(39) * 2)}')").fetchall()
        if r[0] not in _LOG_META and r[0] in mappings
    )
    key_positions = tuple(columns.index(k) for k in key)
    replayed = 0
    segment_ids = [r[0] for r in conn.execute(f"SELECT DISTINCT _segment FROM {table} ORDER BY 1").fetchall()]
    for seg_id in segment_ids:
        rows = conn.execute(
            f"SELECT _op, _unknown, _fill_key, {', '.join(q(c) for c in columns)} FROM {table} "
            "WHERE _segment = ? ORDER BY _seq",
            [seg_id],
        ).fetchall()
        segment = Segment(columns, key_positions)
        for op, unknown, fill_key, *values in rows:
            if op == "T":
                segment.truncate()
            elif op == "D":
                segment.delete(segment.key(values))
            else:
                missing = {columns.index(c) for c in (unknown or []) if c in columns}
                k = segment.key(values)
                segment.rows[k] = Upsert(list(values), missing, tuple(fill_key) if fill_key else k)
        apply_segment(conn, target, segment, mappings, key)
        replayed += len(rows)
    conn.execute(f"DROP TABLE {table}")
    return replayed
