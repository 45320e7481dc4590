"""The two ways to reach ClickHouse, behind one small interface: chDB (ClickHouse embedded in
this process, data in a directory) and a server through clickhouse-connect (HTTP).

Both run every statement with ``SESSION_SETTINGS``; values are rendered into statements by
clickhouse-connect's own literal formatting (``bind``), since chDB takes no parameters.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import pyarrow as pa

from pg_replication.errors import PgReplicationError

# join_use_nulls: an unmatched LEFT JOIN row reads NULL (not 0 or ''), as the engine's SQL expects.
# final: every read of a ReplacingMergeTree table sees each key's latest version, deleted rows hidden.
# default_table_engine + empty primary key: the engine's plain CREATE TABLE (change log, stream
# staging) makes a MergeTree table.
SESSION_SETTINGS = {
    "join_use_nulls": 1,
    "final": 1,
    "default_table_engine": "MergeTree",
    "create_table_empty_primary_key_by_default": 1,
}


def bind(query: str, params: Sequence) -> str:
    """``?`` marks (outside quotes) replaced by ClickHouse literals of ``params``."""
    if not params:
        return query
    from clickhouse_connect.driver.binding import format_query_value

    out, values, quote = [], iter(params), None
    i = 0
    while i < len(query):
        ch = query[i]
        if quote:
            out.append(ch)
            if ch == "\\" and quote == "'":
                out.append(query[i + 1])
                i += 1
            elif ch == quote:
                quote = None
        elif ch in ("'", '"', "`"):
            quote = ch
            out.append(ch)
        elif ch == "?":
            out.append(str(format_query_value(next(values))))
        else:
            out.append(ch)
        i += 1
    return "".join(out)


_CHDB_SESSIONS: dict[str, list] = {}  # path -> [session, clients open on it]


class ChdbClient:
    """ClickHouse in-process (chDB), its data in ``path``. chDB runs one embedded server per
    process: clients opened while another is open (a run opening the warehouse twice) share its
    session, which closes with the last of them."""

    def __init__(self, path: str) -> None:
        from chdb import session

        self.path = path
        shared = _CHDB_SESSIONS.get(path)
        if shared is None:
            shared = _CHDB_SESSIONS[path] = [_open_session(session, path), 0]
            # String columns as bytes (a ClickHouse String is bytes; bytea values are not UTF-8).
            for name, value in {**SESSION_SETTINGS, "output_format_arrow_string_as_string": 0}.items():
                shared[0].query(f"SET {name} = {bind('?', [value])}")
        shared[1] += 1
        self.session = shared[0]

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        from chdb import ChdbError

        return (ChdbError,)

    def command(self, query: str) -> None:
        self.session.query(query)

    def query_arrow(self, query: str) -> pa.Table:
        return self.session.query(query, "ArrowTable")

    def rows(self, query: str) -> list[tuple]:
        return _rows(self.query_arrow(query))

    def stream_rows(self, query: str) -> Iterator[list[tuple]]:
        """``query``'s rows a block at a time (ClickHouse's blocks: at most ~65k rows)."""
        stream = self.session.send_query(query, "ArrowTable")
        try:
            for block in stream:
                yield _rows(block)
        finally:
            stream.close()

    def insert_arrow(self, relation: str, data: pa.Table) -> None:
        staged = data  # chDB's Python() table function reads this local variable by name
        self.session.query(f"INSERT INTO {relation} SELECT * FROM Python(staged)")
        del staged

    def close(self) -> None:
        shared = _CHDB_SESSIONS[self.path]
        shared[1] -= 1
        if shared[1] == 0:
            del _CHDB_SESSIONS[self.path]
            self.session.close()


def _open_session(session, path: str, wait_seconds: float = 120.0):
    """chDB admits one process per data directory: wait (bounded) while another process (a
    drain, a backfill, a check run beside it) holds it, as for a DuckDB file."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return session.Session(path)
        except RuntimeError as exc:  # chDB's ChdbError is one
            if time.monotonic() > deadline:
                raise PgReplicationError(
                    f"cannot open the chDB warehouse {path}: {str(exc).strip().splitlines()[0]}",
                    hint="another process holds it; retry when the running drain, backfill or check ends",
                ) from None
            time.sleep(0.2)


class ServerClient:
    """A ClickHouse server through clickhouse-connect (HTTP)."""

    def __init__(self, client) -> None:
        self.client = client

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        from clickhouse_connect.driver.exceptions import ClickHouseError

        return (ClickHouseError,)

    def command(self, query: str) -> None:
        self.client.command(query, settings=SESSION_SETTINGS)

    def query_arrow(self, query: str) -> pa.Table:
        return self.client.query_arrow(query, settings=SESSION_SETTINGS)

    def rows(self, query: str) -> list[tuple]:
        return [tuple(r) for r in self.client.query(query, settings=SESSION_SETTINGS).result_rows]

    def stream_rows(self, query: str) -> Iterator[list[tuple]]:
        with self.client.query_row_block_stream(query, settings=SESSION_SETTINGS) as stream:
            for block in stream:
                yield [tuple(r) for r in block]

    def insert_arrow(self, relation: str, data: pa.Table) -> None:
        database, _, table = relation.partition(".")
        self.client.insert_arrow(_unquote(table), data, database=_unquote(database), settings=SESSION_SETTINGS)

    def close(self) -> None:
        self.client.close()


def _rows(table: pa.Table) -> list[tuple]:
    columns = [_decoded(c.to_pylist()) if pa.types.is_binary(c.type) else c.to_pylist() for c in table.columns]
    return list(zip(*columns)) if columns else []


def _decoded(values: list) -> list:
    """String columns arrive as bytes (a ClickHouse String is bytes): text where it is UTF-8."""
    out = []
    for v in values:
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                pass
        out.append(v)
    return out


def _unquote(name: str) -> str:
    return name[1:-1].replace('""', '"') if name.startswith('"') else name


def open_client(*, path: str | None = None, url: str | None = None, **server) -> ChdbClient | ServerClient:
    """chDB when ``path`` is given, else a server at ``url`` or host/port/user/password/database."""
    if path is not None:
        return ChdbClient(path)
    import clickhouse_connect

    if url:
        return ServerClient(clickhouse_connect.get_client(dsn=url))
    return ServerClient(clickhouse_connect.get_client(**{k: v for k, v in server.items() if v is not None}))
