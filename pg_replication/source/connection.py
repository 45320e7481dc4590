"""Opening connections to the source, with errors that say what to fix and show no password."""

from __future__ import annotations

import os

import psycopg

from pg_replication.errors import SourceUnavailableError, redact

APPLICATION_NAME = "pg_replication"


def source_conninfo() -> str:
    """POSTGRES_URL when set; otherwise libpq reads the standard PG* variables itself."""
    return os.environ.get("POSTGRES_URL", "")


def describe_target(conninfo: str) -> str:
    """host:port/dbname of a conninfo, for messages (never the password)."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "(unparseable connection string)"
    host = params.get("host") or os.environ.get("PGHOST", "localhost")
    port = params.get("port") or os.environ.get("PGPORT", "5432")
    db = params.get("dbname") or os.environ.get("PGDATABASE", "")
    return f"{host}:{port}/{db}"


def connect(conninfo: str, *, autocommit: bool = True, **kwargs: object) -> psycopg.Connection:
    try:
        return psycopg.connect(
            conninfo,
            autocommit=autocommit,
            application_name=APPLICATION_NAME,
            connect_timeout=10,
            **kwargs,  # type: ignore[arg-type]
        )
    except psycopg.OperationalError as exc:
        first_line = redact(str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc))
        raise SourceUnavailableError(
            f"cannot connect to Postgres at {describe_target(conninfo)}: {first_line}",
            setting="POSTGRES_URL",
        ) from None
