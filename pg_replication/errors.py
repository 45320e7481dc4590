"""The errors pg_replication raises: one base class, one subclass per kind of operator action.

Every error carries a one-line ``hint`` (what to do) and whether retrying without a change can
help. Attributes are plain values so errors pickle across Dagster's process boundaries, and no
message ever includes a password: connection strings are redacted before they are shown.
"""

from __future__ import annotations

import re
import sys


class PgReplicationError(Exception):
    """Base class. ``str(err)`` is the message followed by the hint."""

    retryable: bool = False
    default_hint: str = ""

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        table: str | None = None,
        lsn: str | None = None,
        setting: str | None = None,
    ) -> None:
        self.message = message
        self.hint = hint if hint is not None else self.default_hint
        self.table = table
        self.lsn = lsn
        self.setting = setting
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message

    def __reduce__(self):  # keep keyword attributes when pickled
        return (
            _rebuild,
            (type(self), self.message, self.hint, self.table, self.lsn, self.setting),
        )


def _rebuild(cls, message, hint, table, lsn, setting):
    return cls(message, hint=hint, table=table, lsn=lsn, setting=setting)


class ConfigError(PgReplicationError):
    """replication.yaml or an environment variable is wrong: fix the file and reload."""

    default_hint = "fix the named key in replication.yaml (see README, Configuration)"


class SourceUnavailableError(PgReplicationError):
    """Postgres cannot be reached or refused the login."""

    retryable = True
    default_hint = "check that Postgres is running and that POSTGRES_URL (or PG* variables) point to it"


class SourceNotReadyError(PgReplicationError):
    """Postgres is reachable but not set up for replication (wal_level, privileges...)."""

    default_hint = "see README, Operations: source prerequisites"


class TableNotReplicableError(PgReplicationError):
    """A configured table is missing, has no primary key, or cannot be sliced."""

    default_hint = "fix the table's entry in replication.yaml"


class SchemaChangeError(PgReplicationError):
    """The source table changed in a way the warehouse table cannot follow in place."""

    default_hint = "resync the table: pg-replication resync TABLE"


class WarehouseError(PgReplicationError):
    """The warehouse refused a write; nothing of the batch was committed."""

    retryable = True
    default_hint = "fix the warehouse problem named above, then re-run; no data was lost"


class TransientWarehouseError(WarehouseError):
    """The warehouse failed for a passing reason (out of memory, deadlock, serialization failure,
    lock or statement timeout, lost connection) on every retry of the drain: nothing was applied,
    the slot did not move, and no table was marked failed."""

    retryable = True
    default_hint = (
        "nothing to do if it passes: the next drain retries from the same position. If it keeps "
        "happening, fix the cause named above (e.g. raise warehouse.memory_limit, end the session "
        "holding the lock)"
    )


class ConcurrentDrainError(PgReplicationError):
    """Another drain committed past the position this one started from."""

    retryable = True
    default_hint = "this drain applied nothing; the next run continues from where the other one stopped"


class PlanMismatchError(PgReplicationError):
    """The stored backfill plan no longer fits the configuration."""

    default_hint = "restore the old partition count or resync the table to plan again"


class BackfillRestartedError(PgReplicationError):
    """A drain sent the table back to backfilling (a gap in its stream) while a slice was copied:
    the slice belongs to a plan that no longer exists and is not recorded."""

    default_hint = "materialize all the table's partitions again (its backfill starts over under a new plan)"


_PASSWORD_IN_URL = re.compile(r"(://[^:/@\s]*:)([^@\s]*)(@)")
_PASSWORD_KV = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact(text: str) -> str:
    """Replace passwords in connection URLs and key=value conninfo strings with ``***``."""
    text = _PASSWORD_IN_URL.sub(r"\1***\3", text)
    return _PASSWORD_KV.sub(r"\1***", text)


# Snowflake error numbers of passing conditions: 604 statement canceled, 625 too many statements
# waiting for a lock, 630 statement or warehouse timeout.
_SNOWFLAKE_TRANSIENT_ERRNOS = frozenset({604, 625, 630})


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same work later can succeed without anyone fixing anything. Decided by
    the drivers' exception classes (and Snowflake's error numbers), never by message text. A
    ``WarehouseError`` that wraps a driver error is transient when that error is."""
    if isinstance(exc, TransientWarehouseError):
        return True
    if isinstance(exc, PgReplicationError):
        inner = exc.__cause__ or exc.__context__
        return isinstance(exc, WarehouseError) and inner is not None and is_transient(inner)
    duckdb = sys.modules.get("duckdb")
    if duckdb is not None and isinstance(exc, (duckdb.OutOfMemoryException, duckdb.TransactionException)):
        return True  # TransactionException: a write-write conflict with another connection
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(exc, psycopg.Error):
        e = psycopg.errors
        passing = (
            e.TransactionRollback, e.SerializationFailure, e.DeadlockDetected,  # class 40
            e.LockNotAvailable,  # lock_timeout
            e.QueryCanceled,  # statement_timeout
            e.ConnectionException,  # class 08
            e.AdminShutdown, e.CrashShutdown, e.CannotConnectNow, e.IdleSessionTimeout,
            e.OutOfMemory, e.TooManyConnections,
        )
        # A bare OperationalError (no SQLSTATE) is the client's: the connection was lost.
        return isinstance(exc, passing) or (type(exc) is psycopg.OperationalError and exc.sqlstate is None)
    snowflake = sys.modules.get("snowflake.connector.errors")
    if snowflake is not None and isinstance(exc, snowflake.Error):
        if isinstance(exc, (snowflake.OperationalError, snowflake.ServiceUnavailableError, snowflake.RequestTimeoutError)):
            return True
        return getattr(exc, "errno", None) in _SNOWFLAKE_TRANSIENT_ERRNOS
    return False
