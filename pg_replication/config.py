"""replication.yaml: the pydantic model, ``${VAR}`` expansion, and errors that name the key.

The file is read from ``PG_REPLICATION_CONFIG`` (default ``./replication.yaml``). Connections
never live in it: Postgres comes from ``POSTGRES_URL`` or the standard ``PG*`` variables, DuckDB's
file from ``DUCKDB_PATH`` (which overrides ``warehouse.path``), a Postgres warehouse from
``WAREHOUSE_POSTGRES_URL``, Snowflake from ``SNOWFLAKE_*``. ``PG_REPLICATION_WAREHOUSE`` overrides
``warehouse.kind``, so one file serves DuckDB on a laptop and Snowflake in production.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from cronsim import CronSim, CronSimError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pg_replication.errors import ConfigError


def _qualified(value: str) -> str:
    split_qualified_name(value)  # raises ValueError with the reason
    return value


# schema.table (quoted parts allowed; patterns too where a field says so)
QualifiedName = Annotated[str, AfterValidator(_qualified)]

DEFAULT_CONFIG_PATH = "replication.yaml"
CONFIG_ENV_VAR = "PG_REPLICATION_CONFIG"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SourceConfig(_Model):
    name: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")] = Field(
        "postgres", description="Name of this source in Dagster (sensor and pool names derive from it)."
    )
    slot: Annotated[str, Field(pattern=r"^[a-z0-9_]{1,63}$")] = Field(
        "pg_replication", description="Logical replication slot (lower case, digits, _)."
    )
    publication: Annotated[str, Field(min_length=1, max_length=63)] = Field(
        "pg_replication", description="Publication holding exactly the configured tables."
    )
    pool: Annotated[str, Field(pattern=r"^[A-Za-z0-9_]+$")] = Field(
        "postgres_source", description="Dagster concurrency pool that limits reads of the source."
    )
    readers: Annotated[int, Field(ge=1, le=16)] = Field(
        2, description="Parallel COPY streams per backfill slice."
    )
    sensor_interval_seconds: Annotated[int, Field(ge=1, le=3600)] = 10
    run_seconds: Annotated[int, Field(ge=0, le=86400)] = Field(
        300,
        description="How long a drain run the sensor requests stays up applying micro-batches as changes "
        "come (0: one batch per run). While it is up the sensor requests no other.",
    )
    idle_slot_advance_mb: Annotated[int, Field(ge=1)] = Field(
        64,
        description="With nothing to apply, the sensor still requests a one-batch drain run once the "
        "slot holds back this much WAL (written by other databases or unpublished tables).",
    )
    freshness_seconds: Annotated[int, Field(ge=60)] = Field(
        300,
        description="A cdc or triggers table's FreshnessPolicy: stale when no drain applied a change to it or reported "
        "it kept current for this long (Dagster takes no window under a minute); its cdc_freshness check fails "
        "when no drain ran for this long.",
    )
    max_retained_wal_mb: Annotated[int, Field(ge=1)] = Field(
        1024, description="The slot_health check fails when the slot retains more WAL than this."
    )
    checks_schedule: str = Field(
        "*/15 * * * *",
        description="Cron (UTC) on which the asset checks run by themselves (the source's automation sensor launches them).",
    )

    @field_validator("checks_schedule")
    @classmethod
    def _checks_schedule_is_cron(cls, value: str) -> str:
        return _check_cron(value)


WAREHOUSE_ENV_VAR = "PG_REPLICATION_WAREHOUSE"
WarehouseKind = Literal["duckdb", "postgres", "snowflake", "clickhouse"]
WAREHOUSE_KINDS: tuple[str, ...] = ("duckdb", "postgres", "snowflake", "clickhouse")


class WarehouseConfig(_Model):
    kind: WarehouseKind = Field("duckdb", description=f"Where tables go; {WAREHOUSE_ENV_VAR} overrides it.")
    path: str = Field(
        "warehouse.duckdb",
        description="duckdb: the file; DUCKDB_PATH overrides it. clickhouse (embedded, chDB): the data directory; "
        "CHDB_PATH overrides it (default warehouse.chdb).",
    )
    memory_limit: str = Field(
        "512MB", description="duckdb: memory_limit for our connections: it spills beyond it."
    )
    schema_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_]*$")] = Field(
        "",
        description="postgres: warehouse schema = prefix + source schema (needed when the replica "
        "is the source database itself).",
    )
    merge: bool = Field(
        True,
        description="snowflake: apply change batches with one MERGE per table; false: DELETE + INSERT "
        "(the same result, for emulators such as fakesnow that cannot MERGE inside a transaction).",
    )


class NotificationConfig(_Model):
    webhook_url: Annotated[str, Field(pattern=r"^https?://")] = Field(
        description="Where to POST a JSON message after each sync; write it as ${VAR} if it holds a token."
    )
    on_success: bool = Field(False, description="Also notify successful syncs (failures always are).")


def _check_cron(value: str) -> str:
    try:
        CronSim(value, datetime(2000, 1, 1))
    except CronSimError:
        raise ValueError(f"{value!r} is not a cron expression (five fields, e.g. '*/15 * * * *')")
    return value


OnSchemaChange = Literal["resync", "fail"]

_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|TiB|kB|MB|GB|TB)?\s*$")
_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
          "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
MIN_SNAPSHOT_BYTES = 8192  # one heap page: a slice never holds less


def parse_size(value: Any) -> int:
    """A byte count: an integer, or a string such as "1 GiB", "512MiB", "2GB"."""
    if isinstance(value, bool):
        raise ValueError("expected a size in bytes, e.g. 1073741824 or \"1 GiB\"")
    if isinstance(value, int):
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a size: write bytes (1073741824) or a number with a unit (\"1 GiB\", \"512 MiB\")")
    return int(match.group(1)) * _UNITS[match.group(2)]


class BackfillConfig(_Model):
    max_snapshot_bytes: int = Field(
        1 << 30,
        description="Heap bytes one backfill slice copies under one source snapshot (an int, or \"1 GiB\"). "
        "Partitions larger than this are copied as several slices, each with its own snapshot and "
        "commit, so the source's xmin horizon is held only while one slice copies.",
    )

    @field_validator("max_snapshot_bytes", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        size = parse_size(value)
        if size < MIN_SNAPSHOT_BYTES:
            raise ValueError(f"{size} bytes is less than one 8 KiB heap page; use at least {MIN_SNAPSHOT_BYTES} (e.g. \"1 GiB\")")
        return size


class Defaults(_Model):
    partitions: Annotated[int, Field(ge=1, le=4096)] = 4
    on_schema_change: OnSchemaChange = Field(
        "fail", description="A schema change the warehouse cannot follow in place: fail the table, or resync it."
    )
    schedule: str = Field("*/15 * * * *", description="Cron of query-strategy syncs (append, updated_at, reload).")

    @field_validator("schedule")
    @classmethod
    def _schedule_is_cron(cls, value: str) -> str:
        return _check_cron(value)


Strategy = Literal["cdc", "append", "updated_at", "reload", "triggers"]
QUERY_STRATEGIES = ("append", "updated_at", "reload")  # run from a schedule, no slot
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _parse_days(value: str) -> set[int]:
    """'1-31', '1,15', '1-7,28' -> days of the month."""
    days: set[int] = set()
    for part in value.split(","):
        lo, _, hi = part.strip().partition("-")
        first, last = int(lo), int(hi or lo)
        if not 1 <= first <= last <= 31:
            raise ValueError(f"{part.strip()!r} is not a day or range of days of the month (1-31)")
        days.update(range(first, last + 1))
    return days


class TableEntry(_Model):
    """One line of ``tables:``: an exact table or a ``schema.*`` pattern, with options."""

    name: QualifiedName = Field(description="schema.table, a pattern such as sales.* or sales.order_*")
    exclude: list[str] = Field(default_factory=list, description="Patterns a wildcard name skips.")
    primary_key: list[str] | None = Field(None, description="Key columns when the table has no PK.")
    exclude_columns: list[str] = Field(default_factory=list)
    partitions: Annotated[int, Field(ge=1, le=4096)] | None = None
    row_limit: Annotated[int, Field(ge=1)] | None = Field(None, description="Copy at most N rows (trials).")
    max_partitions_per_run: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="Backfill N partitions per run (multi-run); default: one run for any range.",
    )
    strategy: Strategy = Field("cdc", description="How changes are found: cdc (the slot), append, updated_at, reload, triggers.")
    cursor: str | None = Field(None, description="updated_at: the column holding the row's last change time.")
    lookback: str = Field(
        "5 minutes",
        description="updated_at: re-read rows this far behind the watermark (a Postgres interval, or a number "
        "for integer cursors): transactions commit out of cursor order.",
    )
    reload_on: list[str] | str | None = Field(
        None,
        description="Full reload only on these days: weekdays ([sun, wed]) or days of the month ('1-31', '1,15'); "
        "for append/updated_at a periodic reload that also catches deletes.",
    )
    schedule: str | None = Field(None, description="Cron of the sync schedule of a query strategy (default: defaults.schedule).")
    on_schema_change: OnSchemaChange | None = Field(
        None,
        description="A schema change the warehouse cannot follow in place (an incompatible type change, an ADD "
        "COLUMN whose existing values no change carries): fail the table (its changes wait in its change log "
        "until `pg-replication resync`), or resync it automatically (its backfill runs again). "
        "Default: defaults.on_schema_change.",
    )

    @model_validator(mode="after")
    def _exclude_needs_pattern(self) -> TableEntry:
        if self.exclude and not self.is_pattern:
            raise ValueError("'exclude' only applies to a pattern name such as schema.*")
        if self.is_pattern and self.primary_key:
            raise ValueError("'primary_key' applies to one table, not to a pattern")
        return self

    @model_validator(mode="after")
    def _strategy_options(self) -> TableEntry:
        if (self.strategy == "updated_at") != (self.cursor is not None):
            raise ValueError("'cursor' names the change-time column of strategy updated_at (and only of it)")
        if self.reload_on is not None and self.strategy not in QUERY_STRATEGIES:
            raise ValueError(f"'reload_on' applies to the strategies {', '.join(QUERY_STRATEGIES)}")
        if self.schedule is not None and self.strategy not in QUERY_STRATEGIES:
            raise ValueError(f"'schedule' applies to the strategies {', '.join(QUERY_STRATEGIES)} (cdc and triggers follow the sensor)")
        self.reload_days()  # raises ValueError naming a bad day
        if self.schedule is not None:
            _check_cron(self.schedule)
        return self

    def reload_days(self) -> tuple[set[int], set[int]] | None:
        """(weekdays 0=Monday.., days of the month) of ``reload_on``; None: no day limit."""
        if self.reload_on is None:
            return None
        if isinstance(self.reload_on, str):
            return set(), _parse_days(self.reload_on)
        unknown = [d for d in self.reload_on if d.lower()[:3] not in WEEKDAYS]
        if unknown:
            raise ValueError(f"reload_on: {unknown} are not weekdays ({', '.join(WEEKDAYS)})")
        return {WEEKDAYS.index(d.lower()[:3]) for d in self.reload_on}, set()

    @property
    def is_pattern(self) -> bool:
        return any(ch in part for part in split_qualified_name(self.name) for ch in "*?")


Relationship = Literal["one_to_many", "many_to_one"]


class DocumentForeignKey(_Model):
    parent: list[str] = Field(min_length=1, description="Columns of the parent table.")
    child: list[str] = Field(min_length=1, description="The matching columns of the child table, in order.")

    @model_validator(mode="after")
    def _same_width(self) -> DocumentForeignKey:
        if len(self.parent) != len(self.child):
            raise ValueError(f"foreign_key: {len(self.parent)} parent column(s) but {len(self.child)} child column(s)")
        return self


class DocumentChild(_Model):
    """One child of a document node, along a foreign key: ``one_to_many`` (the child table
    references the parent: a list) or ``many_to_one`` (the parent references the child: an object)."""

    table: QualifiedName = Field(description="schema.table of the child (a replicated table with strategy cdc).")
    name: str | None = Field(None, alias="as", description="Its key in the parent's document (default: the table's name).")
    relationship: Relationship = Field(description="one_to_many: a list of the child's rows; many_to_one: one object (or null).")
    foreign_key: DocumentForeignKey | None = Field(
        None, description="The join: parent columns = child columns; default: the source's foreign key between the two."
    )
    columns: list[str] | dict[str, str] | None = Field(
        None, description="Columns in the document: a list, or {column: name in the document}; default: all."
    )
    children: list[DocumentChild] = Field(default_factory=list)


class DocumentSetConfig(_Model):
    """One set of nested documents: a root table and its children (PGSync's schema shape)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")] = Field(
        description="The warehouse table <root's schema>.<name> holding one document per root row."
    )
    root: QualifiedName = Field(description="schema.table of the root (a replicated table with strategy cdc).")
    columns: list[str] | dict[str, str] | None = Field(None, description="Root columns in the document; default: all.")
    children: list[DocumentChild] = Field(default_factory=list)


class ReplicationConfig(_Model):
    source: SourceConfig = SourceConfig()
    warehouse: WarehouseConfig = WarehouseConfig()
    defaults: Defaults = Defaults()
    backfill: BackfillConfig = BackfillConfig()
    notifications: NotificationConfig | None = None
    tables: list[TableEntry] = Field(min_length=1)
    documents: list[DocumentSetConfig] = Field(
        default_factory=list, description="Nested documents kept fresh in the warehouse (README, Documents)."
    )

    @field_validator("tables", mode="before")
    @classmethod
    def _strings_are_names(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _apply_defaults(self) -> ReplicationConfig:
        """Entries carry their resolved on_schema_change: the engine sees entries, not defaults."""
        tables = [
            t if t.on_schema_change is not None else t.model_copy(update={"on_schema_change": self.defaults.on_schema_change})
            for t in self.tables
        ]
        object.__setattr__(self, "tables", tables)  # frozen model: set once, while it is validated
        return self

    @model_validator(mode="after")
    def _document_names_unique(self) -> ReplicationConfig:
        names = [d.name for d in self.documents]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"documents: {', '.join(twice)} named twice; each set needs a name of its own")
        return self

    def duckdb_path(self) -> str:
        return os.environ.get("DUCKDB_PATH") or self.warehouse.path

    def clickhouse_path(self) -> str:
        """chDB's data directory: CHDB_PATH, else warehouse.path when it was set, else warehouse.chdb."""
        default = type(self.warehouse).model_fields["path"].default
        return os.environ.get("CHDB_PATH") or (self.warehouse.path if self.warehouse.path != default else "warehouse.chdb")

    def warehouse_kind(self) -> str:
        kind = os.environ.get(WAREHOUSE_ENV_VAR) or self.warehouse.kind
        if kind not in WAREHOUSE_KINDS:
            raise ConfigError(f"{WAREHOUSE_ENV_VAR}={kind!r} is not a warehouse kind; use one of {', '.join(WAREHOUSE_KINDS)}")
        return kind


def split_qualified_name(name: str) -> tuple[str, str]:
    """Split ``schema.table``; either part may be double-quoted to hold dots or quotes."""
    parts: list[str] = []
    i = 0
    while i <= len(name):
        if i < len(name) and name[i] == '"':
            j, buf = i + 1, []
            while True:
                if j >= len(name):
                    raise ValueError(f"unterminated quote in {name!r}")
                if name[j] == '"':
                    if j + 1 < len(name) and name[j + 1] == '"':
                        buf.append('"')
                        j += 2
                        continue
                    break
                buf.append(name[j])
                j += 1
            parts.append("".join(buf))
            i = j + 1
        else:
            j = name.find(".", i)
            j = len(name) if j < 0 else j
            parts.append(name[i:j])
            i = j
        if i < len(name) and name[i] != ".":
            raise ValueError(f"unexpected character after quoted name in {name!r}")
        i += 1
    if len(parts) == 1:
        parts.insert(0, "public")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"{name!r} is not 'schema.table' (quote parts that contain dots)")
    return parts[0], parts[1]


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, where: str) -> Any:
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(
                f"{where}: environment variable {name} is not set",
                hint=f"export {name}=... or write ${{{name}:-default}}",
                setting=name,
            )

        return _ENV_REF.sub(substitute, value)
    if isinstance(value, list):
        return [_expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{where}.{k}") for k, v in value.items()}
    return value


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH)


def load_config(path: str | os.PathLike[str] | None = None) -> ReplicationConfig:
    """Read and validate replication.yaml; every problem becomes a ConfigError naming the key."""
    file = Path(path) if path is not None else config_path()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{file}: configuration file not found",
            hint=f"create it (see replication.example.yaml) or set {CONFIG_ENV_VAR}",
            setting=CONFIG_ENV_VAR,
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"{file}: not valid YAML{where}: {getattr(exc, 'problem', exc)}",
            hint="fix the YAML syntax",
        ) from None
    return parse_config(raw, source=str(file))


def parse_config(raw: Any, source: str = "replication.yaml") -> ReplicationConfig:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: expected a mapping with a 'tables:' list, got {type(raw).__name__}",
            hint="start from replication.example.yaml",
        )
    try:
        return ReplicationConfig.model_validate(_expand_env(raw, source))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            problems.append(f"{key}: {msg}")
        raise ConfigError(
            f"{source}: " + "; ".join(problems),
            setting=".".join(str(p) for p in exc.errors()[0]["loc"]),
        ) from None
