"""Catalog introspection: which tables exist, their columns, types, keys and partitions.

Everything the rest of the engine knows about a source table comes from ``Table``, read here in
a handful of catalog queries (one for all types, one for all candidate tables), so building the
Dagster definitions costs milliseconds even with hundreds of tables.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from pg_replication.config import ReplicationConfig, TableEntry, split_qualified_name
from pg_replication.errors import TableNotReplicableError
from pg_replication.source.replica_identity import check_publication_columns, check_replica_identity, identity_problems

TYPE_KINDS = {"b": "base", "c": "composite", "d": "domain", "e": "enum", "p": "pseudo", "r": "range", "m": "multirange"}


@dataclass(frozen=True)
class PgType:
    """A Postgres type with domains and arrays resolved one level (``element``/``base``)."""

    oid: int
    schema: str
    name: str
    kind: str  # base, array, domain, enum, composite, range, multirange, pseudo
    element: PgType | None = None  # arrays
    base: PgType | None = None  # domains
    base_typmod: int = -1  # domains: the typmod of the base type

    def resolved(self, typmod: int) -> tuple[PgType, int]:
        """Strip domains: the type values are really stored as, with its typmod."""
        t, mod = self, typmod
        while t.kind == "domain" and t.base is not None:
            t, mod = t.base, t.base_typmod
        return t, mod


@dataclass(frozen=True)
class Column:
    name: str
    attnum: int
    type: PgType
    typmod: int
    ndims: int
    not_null: bool
    type_sql: str  # format_type(): what a person would write in DDL


@dataclass(frozen=True)
class Table:
    schema: str
    name: str
    oid: int
    relkind: str  # r: table, p: partitioned table
    replica_identity: str  # d default, f full, i index, n nothing
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    primary_key_declared: bool  # False when the key comes from replication.yaml
    leaves: tuple[tuple[str, str], ...]  # relations that hold the rows (itself, or partitions)
    size_bytes: int
    estimated_rows: int
    comment: str | None = None
    entry: TableEntry | None = field(default=None, compare=False)

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def strategy(self) -> str:
        """How changes are found: cdc, append, updated_at, reload or triggers."""
        return self.entry.strategy if self.entry else "cdc"

    @property
    def display(self) -> str:
        return sql.Identifier(self.schema, self.name).as_string()

    def column(self, name: str) -> Column:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(name)


def load_types(conn: psycopg.Connection) -> dict[int, PgType]:
    rows = conn.execute(
        """
        SELECT t.oid, n.nspname, t.typname, t.typtype, t.typcategory, t.typelem,
               t.typbasetype, t.typtypmod, t.typsubscript::text
        FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        """
    ).fetchall()
    raw = {r[0]: r for r in rows}
    cache: dict[int, PgType] = {}

    def build(oid: int) -> PgType:
        if oid in cache:
            return cache[oid]
        _, nsp, name, typtype, _category, elem, basetype, typmod, subscript = raw[oid]
        if elem and subscript == "array_subscript_handler":
            t = PgType(oid, nsp, name, "array", element=build(elem))
        elif typtype == "d":
            t = PgType(oid, nsp, name, "domain", base=build(basetype), base_typmod=typmod)
        else:
            t = PgType(oid, nsp, name, TYPE_KINDS.get(typtype, "base"))
        cache[oid] = t
        return t

    for oid in raw:
        build(oid)
    return cache


_TABLES_SQL = """
SELECT c.oid, n.nspname, c.relname, c.relkind, c.relreplident, c.relispartition,
       obj_description(c.oid, 'pg_class'),
       greatest(c.reltuples, 0)::bigint
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp%%'
  AND n.nspname <> '_pg_replication'
"""

_COLUMNS_SQL = """
SELECT a.attrelid, a.attname, a.attnum, a.atttypid, a.atttypmod, a.attndims, a.attnotnull,
       format_type(a.atttypid, a.atttypmod)
FROM pg_attribute a
WHERE a.attrelid = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
ORDER BY a.attrelid, a.attnum
"""

_PKEY_SQL = """
SELECT con.conrelid, array_agg(a.attname ORDER BY k.ord)
FROM pg_constraint con
CROSS JOIN LATERAL unnest(con.conkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
WHERE con.contype = 'p' AND con.conrelid = ANY(%s)
GROUP BY con.conrelid
"""

# A plain table is its own only leaf; a partitioned table's leaves are its partitions' tables.
# One query for all the selected tables, each joined to its leaves by oid: a query per table
# that matched pg_class with `oid = x OR oid IN (...)` scanned all of pg_class each time (7 s for
# 1,000 tables, at every load that reads the source).
_LEAVES_SQL = """
SELECT r.oid, c.oid, n.nspname, c.relname, pg_relation_size(c.oid)
FROM unnest(%s::oid[]) AS r(oid)
CROSS JOIN LATERAL (
  SELECT r.oid::regclass AS relid UNION SELECT relid FROM pg_partition_tree(r.oid::regclass) WHERE isleaf
) AS leaf
JOIN pg_class c ON c.oid = leaf.relid AND c.relkind = 'r'
JOIN pg_namespace n ON n.oid = c.relnamespace
ORDER BY r.oid, n.nspname, c.relname
"""


@dataclass(frozen=True)
class Unavailable:
    """A configured table left out of the definitions, and why (shown by `status` and in the UI)."""

    status: str  # missing: not in the source; skipped: there, but it cannot be replicated as it is
    reason: str


@dataclass(frozen=True)
class SourceTable:
    """A candidate table as listed by the catalog, before options are applied."""

    oid: int
    schema: str
    name: str
    relkind: str
    replica_identity: str
    is_partition: bool
    comment: str | None
    estimated_rows: int


def list_source_tables(conn: psycopg.Connection) -> list[SourceTable]:
    return [SourceTable(*row) for row in conn.execute(_TABLES_SQL).fetchall()]


def select_tables(
    config: ReplicationConfig, candidates: list[SourceTable], missing: dict[str, Unavailable] | None = None
) -> list[tuple[SourceTable, TableEntry]]:
    """Resolve ``tables:`` against the catalog. Exact names must exist (or, given ``missing``,
    are recorded there, by schema.table, with the reason); patterns may match none.

    Partitions of a partitioned table are never selected on their own: the root carries them.
    The first entry that names a table wins, so an exact entry placed before a pattern can
    override the pattern's options.
    """
    by_name = {(t.schema, t.name): t for t in candidates}
    chosen: dict[tuple[str, str], tuple[SourceTable, TableEntry]] = {}
    for index, entry in enumerate(config.tables):
        schema_pat, table_pat = split_qualified_name(entry.name)
        if not entry.is_pattern:
            found = by_name.get((schema_pat, table_pat))
            if found is None:
                if missing is not None:
                    missing[f"{schema_pat}.{table_pat}"] = Unavailable(
                        "missing",
                        f"table {sql.Identifier(schema_pat, table_pat).as_string()} does not exist in the source "
                        "(dropped or renamed?); restore it, or remove it from replication.yaml",
                    )
                    continue
                raise TableNotReplicableError(
                    f"tables[{index}]: table {sql.Identifier(schema_pat, table_pat).as_string()} "
                    "does not exist in the source (or is not a table)",
                    hint="check the spelling and schema; names are case-sensitive; "
                    "run `pg-replication list` to see what qualifies",
                    table=entry.name,
                )
            chosen.setdefault((found.schema, found.name), (found, entry))
            continue
        excludes = [split_qualified_name(e) for e in entry.exclude]
        for t in sorted(candidates, key=lambda c: (c.schema, c.name)):
            if t.is_partition:
                continue
            if not (fnmatch.fnmatchcase(t.schema, schema_pat) and fnmatch.fnmatchcase(t.name, table_pat)):
                continue
            if any(fnmatch.fnmatchcase(t.schema, s) and fnmatch.fnmatchcase(t.name, n) for s, n in excludes):
                continue
            chosen.setdefault((t.schema, t.name), (t, entry))
    return list(chosen.values())


def describe_tables(
    conn: psycopg.Connection, selected: list[tuple[SourceTable, TableEntry]], skipped: dict[str, Unavailable] | None = None
) -> list[Table]:
    """Columns, keys and leaves for the selected tables; checks that each can be replicated.
    Raises on the first table that cannot, or, given ``skipped``, leaves it out and records
    why there (by schema.table)."""
    if not selected:
        return []
    with conn.transaction():
        # Postgres's JIT judged these catalog queries costly (pg_partition_tree's estimate) and
        # compiled them for 2 s of a 1,000-table catalog read; they run in milliseconds without.
        conn.execute("SET LOCAL jit = off")
        return _describe(conn, selected, skipped)


def _describe(conn: psycopg.Connection, selected: list[tuple[SourceTable, TableEntry]], skipped: dict[str, Unavailable] | None) -> list[Table]:
    types = load_types(conn)
    oids = [t.oid for t, _ in selected]
    columns: dict[int, list[Column]] = {oid: [] for oid in oids}
    for relid, name, attnum, typid, typmod, ndims, notnull, type_sql in conn.execute(_COLUMNS_SQL, (oids,)):
        columns[relid].append(Column(name, attnum, types[typid], typmod, ndims, notnull, type_sql))
    pkeys = {relid: tuple(cols) for relid, cols in conn.execute(_PKEY_SQL, (oids,))}
    leaves: dict[int, list[tuple]] = {oid: [] for oid in oids}
    for root, *leaf in conn.execute(_LEAVES_SQL, (oids,)):
        leaves[root].append(tuple(leaf))
    tables = []
    for src, entry in selected:
        try:
            tables.append(_build_table(src, entry, columns[src.oid], pkeys.get(src.oid), leaves[src.oid]))
        except TableNotReplicableError as exc:
            if skipped is None:
                raise
            skipped[f"{src.schema}.{src.name}"] = Unavailable("skipped", _one_line(exc))
    if skipped is None:
        check_replica_identity(conn, tables)  # published tables must keep the source's writes working
        return tables
    problems = identity_problems(conn, tables)
    for (schema, name), problem in problems.items():
        skipped[f"{schema}.{name}"] = Unavailable("skipped", _one_line(problem))
    return [t for t in tables if (t.schema, t.name) not in problems]


_TIME_CURSORS = {"timestamp", "timestamptz", "date"}
_NUMBER_CURSORS = {"int2", "int4", "int8", "numeric"}


def _check_cursor(display: str, column: Column, lookback: str) -> None:
    """An updated_at cursor must order changes: a time or a number, with a look-back to match."""
    t, _ = column.type.resolved(column.typmod)
    if t.schema != "pg_catalog" or t.name not in _TIME_CURSORS | _NUMBER_CURSORS:
        raise TableNotReplicableError(
            f"{display}: cursor {column.name!r} is {column.type_sql}; it must be a timestamp, date or number",
            table=display,
        )
    if t.name in _NUMBER_CURSORS and not lookback.strip().lstrip("-").replace(".", "", 1).isdigit():
        raise TableNotReplicableError(
            f"{display}: cursor {column.name!r} is a number, so lookback must be one (not {lookback!r})",
            hint="e.g. lookback: '1000' re-reads the last 1000 cursor values",
            table=display,
        )


def _build_table(src: SourceTable, entry: TableEntry, cols: list[Column], pkey: tuple[str, ...] | None, leaves) -> Table:
    display = sql.Identifier(src.schema, src.name).as_string()
    names = [c.name for c in cols]
    for excluded in entry.exclude_columns:
        if excluded not in names:
            raise TableNotReplicableError(
                f"{display}: exclude_columns names {excluded!r}, which the table does not have",
                hint=f"columns are: {', '.join(names)}",
                table=display,
            )
    declared = pkey is not None
    key = tuple(entry.primary_key) if entry.primary_key else pkey
    if not key:
        raise TableNotReplicableError(
            f"{display} has no primary key, so changes cannot be matched to warehouse rows",
            hint="add a primary key in Postgres, or declare one with `primary_key: [col, ...]` "
            "on this table in replication.yaml, or exclude the table",
            table=display,
        )
    for k in key:
        if k not in names:
            raise TableNotReplicableError(
                f"{display}: primary_key names {k!r}, which the table does not have",
                hint=f"columns are: {', '.join(names)}",
                table=display,
            )
        if k in entry.exclude_columns:
            raise TableNotReplicableError(
                f"{display}: key column {k!r} cannot be excluded", table=display,
                hint="remove it from exclude_columns",
            )
    if entry.cursor is not None and entry.cursor not in [n for n in names if n not in entry.exclude_columns]:
        raise TableNotReplicableError(
            f"{display}: cursor names {entry.cursor!r}, which the table does not have (or excludes)",
            hint=f"columns are: {', '.join(names)}",
            table=display,
        )
    if entry.cursor is not None:
        _check_cursor(display, next(c for c in cols if c.name == entry.cursor), entry.lookback)
    kept = tuple(c for c in cols if c.name not in entry.exclude_columns)
    return Table(
        schema=src.schema,
        name=src.name,
        oid=src.oid,
        relkind=src.relkind,
        replica_identity=src.replica_identity,
        columns=kept,
        primary_key=key,
        primary_key_declared=declared and not entry.primary_key,
        leaves=tuple((schema, name) for _, schema, name, _ in leaves),
        size_bytes=sum(size for *_, size in leaves),
        estimated_rows=src.estimated_rows,
        comment=src.comment,
        entry=entry,
    )


def introspect(conn: psycopg.Connection, config: ReplicationConfig) -> list[Table]:
    """The configured tables, fully described. Raises TableNotReplicableError on the first problem."""
    tables = describe_tables(conn, select_tables(config, list_source_tables(conn)))
    check_publication_columns(conn, config.source.publication, tables)
    return tables


def _one_line(exc: TableNotReplicableError) -> str:
    return f"{exc.message}; {exc.hint}" if exc.hint else exc.message


def introspect_each(conn: psycopg.Connection, config: ReplicationConfig) -> tuple[list[Table], dict[str, Unavailable]]:
    """The configured tables that can be replicated now, and, by schema.table, why each other one
    cannot (missing from the source, no usable key or replica identity...): one table's trouble
    must not keep the others from loading. A publication that leaks an excluded column still
    raises (the values would leave the source)."""
    skipped: dict[str, Unavailable] = {}
    tables = describe_tables(conn, select_tables(config, list_source_tables(conn), skipped), skipped)
    check_publication_columns(conn, config.source.publication, tables)
    return tables, skipped


VOLATILE_DEFAULT = "\x00volatile"  # marks a column added with a volatile default (table rewritten)


def missing_values(conn: psycopg.Connection, table: Table, names) -> dict[str, str | None]:
    """For columns added by ALTER TABLE ADD COLUMN: the value rows that existed then have.

    Postgres stores a constant default once (the 'missing value') instead of rewriting the table,
    so no change event carries it. A volatile default rewrites the table, also without events:
    that is reported as VOLATILE_DEFAULT, which the warehouse refuses to guess.
    """
    out: dict[str, str | None] = {}
    for name in names:
        row = conn.execute(
            """SELECT a.atthasmissing, a.attmissingval::text, d.adbin IS NOT NULL
               FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
               WHERE a.attrelid = %s AND a.attname = %s AND NOT a.attisdropped""",
            (table.oid, name),
        ).fetchone()
        if row is None or not (row[0] or row[2]):
            out[name] = None
        elif row[0]:
            out[name] = _single_array_element(row[1])
        else:
            # A default but no stored missing value: either the table was empty or rewritten.
            has_rows = conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(table.ident)).fetchone()[0]  # type: ignore[index]
            out[name] = VOLATILE_DEFAULT if has_rows else None
    return out


def describe_new_columns(conn: psycopg.Connection, table: Table, names: list[str]) -> dict[str, tuple[int | None, str | None]]:
    """For columns the warehouse does not have yet: their attribute number (renames keep it) and
    missing value (see ``missing_values``); (None, None) for a name the source no longer has."""
    attnums = dict(
        conn.execute(
            "SELECT attname, attnum FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped "
            "AND attname = ANY(%s)",
            (table.oid, list(names)),
        ).fetchall()
    )
    missing = missing_values(conn, table, names)
    return {name: (attnums.get(name), missing.get(name)) for name in names}


def _single_array_element(text: str | None) -> str | None:
    from pg_replication.source.text_values import parse_array

    if text is None:
        return None
    items = parse_array(text)
    return items[0] if items else None


def refresh_table(conn: psycopg.Connection, table: Table) -> Table:
    """The same table as the catalog describes it now (columns may have been added or dropped)."""
    src = SourceTable(table.oid, table.schema, table.name, table.relkind, table.replica_identity, False, table.comment, 0)
    assert table.entry is not None
    return describe_tables(conn, [(src, table.entry)])[0]
