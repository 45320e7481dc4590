"""The table assets' executor in the code location `pg_replication.dagster.definitions`: Dagster's
default (a process per step, or in process when a run asks), its step processes forked from a
server that has already imported Dagster and the engine.

A spawned step imports all of it again before it loads the code location (about 3 CPU-seconds
here), paid by every table a backfill run copies and by the checks step after it
(bench/executor.py measures a run of both). The preloaded modules open no connection and start
no thread when imported, so forking after them is safe; the code location itself (which reads
the source's catalog) still loads in each step.
"""

from __future__ import annotations

import multiprocessing

import dagster as dg

PRELOADED = (
    "dagster",
    "dagster_duckdb",
    "duckdb",
    "psycopg",
    "pyarrow",
    "pg_replication.dagster.assets",
    "pg_replication.dagster.checks",
    "pg_replication.dagster.jobs",
    "pg_replication.dagster.sensors",
)


def _fork_steps_from_a_server(config: dict) -> dict:
    """Run config as given, with a start method where a multiprocess run names none."""
    steps = config.get("multiprocess")
    if steps is None or steps.get("start_method") or "forkserver" not in multiprocessing.get_all_start_methods():
        return config  # Windows has no forkserver: Dagster's default there
    return {"multiprocess": {**steps, "start_method": {"forkserver": {"preload_modules": list(PRELOADED)}}}}


table_executor = dg.multi_or_in_process_executor.configured(
    _fork_steps_from_a_server,
    name="multi_or_in_process_forkserver",
    config_schema=dg.multi_or_in_process_executor.config_schema.as_field(),
)
