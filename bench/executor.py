"""Run wall time of the one-step jobs with `dagster job execute`: in process against a process per step.

    POSTGRES_URL=… python bench/executor.py [--repeats 3]

On small tables (1,000 rows each: ``exec_bench`` with strategy reload, ``exec_cdc`` backfilled and
marked failed before each retry) in database ``pgr_bench`` of the server in POSTGRES_URL, with a
fresh DuckDB file and DAGSTER_HOME, measured alternately in the same run: the sync job and the
retry job as shipped (in-process executor), and the same jobs with
Dagster's multiprocess executor (what they ran with before: a process per step, which loads the
code location again before the step starts). Prints the median wall time of each and the ratio.

Then a table asset's backfill with `dagster asset materialize` (the table's step and its checks
step), as shipped (step processes forked from a server that has imported Dagster and the engine,
pg_replication/dagster/executor.py) and with each step spawned (Dagster's default start method):
the median wall time and the CPU the whole machine spent (from /proc/stat: run it on a quiet
machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import psycopg
import yaml
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backfill import bench_database  # noqa: E402

from pg_replication.config import load_config  # noqa: E402
from pg_replication.replicate.backfill import run_backfill  # noqa: E402
from pg_replication.source.catalog import introspect  # noqa: E402
from pg_replication.source.connection import connect  # noqa: E402
from pg_replication.warehouse.connect import open_warehouse  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

MULTIPROCESS_DEFS = '''
import dagster as dg
from pg_replication.dagster.definitions import build_definitions


def _with_a_process_per_step() -> dg.Definitions:
    shipped = build_definitions()
    return dg.Definitions(
        jobs=[job.with_executor_def(dg.multiprocess_executor) for job in shipped.jobs],
        resources=shipped.resources,
    )


defs = _with_a_process_per_step()
'''


def _machine_cpu_seconds() -> float:
    """user + nice + system + irq + softirq of every CPU since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return sum(int(fields[i]) for i in (0, 1, 2, 5, 6)) / os.sysconf("SC_CLK_TCK")


def _timed(args: list[str], what: str, env: dict, cwd: Path) -> tuple[float, float]:
    """Wall and machine CPU seconds of one `dagster` command; its error ends the benchmark."""
    cpu, started = _machine_cpu_seconds(), time.monotonic()
    done = subprocess.run([str(BIN / "dagster"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    seconds, cpu = time.monotonic() - started, _machine_cpu_seconds() - cpu
    if done.returncode != 0:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return seconds, cpu


def _execute(module: str, job: str, env: dict, cwd: Path, config: Path | None = None) -> float:
    args = ["job", "execute", "-m", module, "-j", job] + (["-c", str(config)] if config else [])
    return _timed(args, job, env, cwd)[0]


def _materialize(select: str, partitions: str, env: dict, cwd: Path, run_config: dict) -> tuple[float, float]:
    args = ["asset", "materialize", "-m", "pg_replication.dagster.definitions",
            "--select", select, "--partition-range", partitions, "--config-json", json.dumps(run_config)]
    return _timed(args, f"materialize {select}", env, cwd)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    url = bench_database(os.environ["POSTGRES_URL"])
    with psycopg.connect(url, autocommit=True) as conn:
        for name in ("exec_bench", "exec_cdc"):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("INSERT INTO {} SELECT i, 'v' || i FROM generate_series(1, 1000) i").format(sql.Identifier(name)))
    work = Path(tempfile.mkdtemp(prefix="pgr_bench_executor_"))
    try:
        home = work / "dagster_home"
        home.mkdir()
        shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
        (work / "replication.yaml").write_text(yaml.safe_dump({"tables": [{"name": "exec_bench", "strategy": "reload"}, {"name": "exec_cdc"}]}))
        (work / "multiprocess_defs.py").write_text(MULTIPROCESS_DEFS)
        (work / "retry.yaml").write_text(yaml.safe_dump({"ops": {"postgres_replay_change_log": {"config": {"table": "public.exec_cdc"}}}}))
        env = {
            **os.environ, "POSTGRES_URL": url, "DAGSTER_HOME": str(home), "PYTHONPATH": str(work),
            "PG_REPLICATION_CONFIG": str(work / "replication.yaml"), "DUCKDB_PATH": str(work / "warehouse.duckdb"),
        }
        sys.path.insert(0, str(work))
        os.environ.update(env)
        from pg_replication.dagster.definitions import build_definitions

        (sync_job,) = [j.name for j in build_definitions().jobs if j.name.startswith("postgres_sync_")]
        config = load_config()
        with connect(url) as conn:
            cdc_table = next(t for t in introspect(conn, config) if t.name == "exec_cdc")
        with open_warehouse(config) as wh:  # no slot: the retry replays the (empty) change log only
            run_backfill(url, wh, cdc_table, range(config.defaults.partitions), partitions=config.defaults.partitions)

        def fail_cdc_table() -> None:
            with open_warehouse(config) as wh:
                wh.set_status("public.exec_cdc", "failed", "bench: failed on purpose")

        jobs = [(sync_job, None, lambda: None), ("postgres_retry_table", work / "retry.yaml", fail_cdc_table)]
        _execute("pg_replication.dagster.definitions", sync_job, env, work)  # the first load warms caches
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats):
            for job, run_config, before in jobs:
                for label, module in (("in process", "pg_replication.dagster.definitions"), ("process per step", "multiprocess_defs")):
                    before()
                    times.setdefault((job, label), []).append(_execute(module, job, env, work, run_config))
        print(f"`dagster job execute`, median of {args.repeats} (alternating):")
        for job, _, _ in jobs:
            inproc = statistics.median(times[(job, "in process")])
            multi = statistics.median(times[(job, "process per step")])
            print(f"  {job:<28} in process {inproc:6.2f} s   process per step {multi:6.2f} s   ratio {inproc / multi:.2f}")
        keys = build_definitions().resolve_assets_def(dg.AssetKey(["public", "exec_cdc"])).partitions_def.get_partition_keys()
        spawned = {"execution": {"config": {"multiprocess": {"start_method": {"spawn": {}}}}}}
        runs: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.repeats):
            for label, run_config in (("forked from a server", {}), ("spawned", spawned)):
                runs.setdefault(label, []).append(_materialize("public/exec_cdc", f"{keys[0]}...{keys[-1]}", env, work, run_config))
        print(f"`dagster asset materialize` of one table and its checks, median of {args.repeats} (alternating):")
        for label, measured in runs.items():
            wall, cpu = statistics.median(m[0] for m in measured), statistics.median(m[1] for m in measured)
            print(f"  steps {label:<22} {wall:6.2f} s   machine CPU {cpu:6.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
