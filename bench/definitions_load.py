"""Definitions load and CDC sensor tick with many replicated tables (PgReplicationComponent).

    POSTGRES_URL=… .venv/bin/python bench/definitions_load.py [--tables 1000]

Creates (or reuses) N small tables in database ``pgr_bench_defs`` of the server in POSTGRES_URL,
a dg project with one PgReplicationComponent replicating them, refreshes its catalog (the
definitions state), then measures in the same run:
  1. ``dagster definitions validate`` of that project (a fresh process, as Dagster loads it),
     against ``dagster definitions validate`` of an empty project: the CLI's own start-up;
  2. the CDC sensor's tick with N tables: the sensor built from those definitions, evaluated with
     ``build_sensor_context`` on a real (temporary) Dagster instance, while the slot holds changes
     to drain (it requests a run), median of several ticks.
  3. the same command for the simple path: replication.yaml over the same tables, its catalog read
     from the source at each load (``live``, the default) and from the saved snapshot
     (``PG_REPLICATION_CATALOG=saved``).
Each validate runs ``--runs`` times (default 3), the projects alternating, and prints the median
and its ratio to the empty project's median of the same run (other work on the machine slows
both alike).
Targets: validate < 10 s, tick < 2 s. ``--compare-python OTHER/bin/python`` validates both
projects again with another environment's ``dagster``, alternating with this one (what a package
registered with Dagster's component loader, e.g. dagster-snowflake, costs every code location).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

BIN = Path(sys.executable).parent
PYPROJECT = """\
[project]
name = "{name}"
version = "0.1.0"

[tool.dg]
directory_type = "project"

[tool.dg.project]
root_module = "{name}"
code_location_name = "{name}"
registry_modules = ["pg_replication.dagster.component"]
"""
DEFINITIONS = """\
from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(project_root=Path(__file__).parent.parent)
"""
COMPONENT = """\
type: pg_replication.dagster.component.PgReplicationComponent
attributes:
  source: {{name: bench, slot: bench_defs_slot, publication: bench_defs_pub, pool: bench_source}}
  postgres_url_env: BENCH_URL
  warehouse: {{path: {warehouse}}}
  tables: [bench_defs.*]
"""


def bench_database(admin_url: str, tables: int) -> str:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        if not admin.execute("SELECT 1 FROM pg_database WHERE datname = 'pgr_bench_defs'").fetchone():
            admin.execute("CREATE DATABASE pgr_bench_defs")
    params = psycopg.conninfo.conninfo_to_dict(admin_url)
    params["dbname"] = "pgr_bench_defs"
    url = psycopg.conninfo.make_conninfo(**params)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS bench_defs")
        have = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'bench_defs'").fetchone()[0]
        for i in range(have, tables):
            conn.execute(f"CREATE TABLE bench_defs.t{i:04d} (id bigint PRIMARY KEY, label text, amount numeric(12,2), at timestamptz)")
        # The sensor's tick must find changes to drain: a slot over a publication of the tables.
        if not conn.execute("SELECT 1 FROM pg_publication WHERE pubname = 'bench_defs_pub'").fetchone():
            conn.execute("CREATE PUBLICATION bench_defs_pub FOR TABLES IN SCHEMA bench_defs")
        if not conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = 'bench_defs_slot'").fetchone():
            conn.execute("SELECT pg_create_logical_replication_slot('bench_defs_slot', 'pgoutput')")
        conn.execute("INSERT INTO bench_defs.t0000 SELECT coalesce(max(id), 0) + 1, 'x', 1, now() FROM bench_defs.t0000")
    return url


def make_project(root: Path, name: str, component: str | None) -> None:
    (root / name / "defs").mkdir(parents=True)
    (root / "pyproject.toml").write_text(PYPROJECT.format(name=name))
    (root / name / "__init__.py").write_text("")
    (root / name / "defs" / "__init__.py").write_text("")
    (root / name / "definitions.py").write_text(DEFINITIONS)
    if component:
        (root / name / "defs" / "bench").mkdir()
        (root / name / "defs" / "bench" / "defs.yaml").write_text(component)


REPLICATION_YAML = """\
source: {{name: bench, slot: bench_defs_slot, publication: bench_defs_pub}}
warehouse: {{path: {warehouse}}}
tables: [bench_defs.*]
"""


def validate_seconds(project: Path, module: str, env: dict, bin_dir: Path = BIN) -> float:
    start = time.perf_counter()
    out = subprocess.run(
        [str(bin_dir / "dagster"), "definitions", "validate", "-m", module], cwd=project, env=env, capture_output=True, text=True, timeout=900
    )
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"dagster definitions validate failed:\n{(out.stdout + out.stderr)[-3000:]}")
    return seconds


DISCOVERY = """\
import time
import dagster
from dagster.components.core.package_entry import discover_entry_point_package_objects
start = time.perf_counter()
discover_entry_point_package_objects()
print(time.perf_counter() - start)
"""


def discovery_seconds(python: Path) -> float:
    """What Dagster's component loader spends importing the packages registered with it
    (``dagster_dg_cli.registry_modules`` entry points) when any code location loads a defs folder."""
    out = subprocess.run([str(python), "-c", DISCOVERY], capture_output=True, text=True, timeout=900, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _breakdown(project: Path, tmp_path: Path) -> tuple[float, float, int]:
    """Where the build goes: the table assets, and the asset checks (one op per check)."""
    from pg_replication.config import parse_config
    from pg_replication.dagster.assets import TableAssetTranslator, build_table_asset
    from pg_replication.dagster.checks import build_table_checks
    from pg_replication.dagster.load_catalog import catalog_from_snapshot
    from pg_replication.dagster.resources import ResourceKeys

    state = next(project.rglob(".local_defs_state/*/state"))
    config = parse_config({"source": {"name": "bench"}, "warehouse": {"path": str(tmp_path / "w.duckdb")}, "tables": ["bench_defs.*"]})
    tables = catalog_from_snapshot(state).tables
    translator, keys = TableAssetTranslator(config, ["bench"]), ResourceKeys.for_source("bench")
    start = time.perf_counter()
    for table in tables:
        build_table_asset(table, config, translator, tables, keys)
    assets = time.perf_counter() - start
    start = time.perf_counter()
    checks = build_table_checks(tables, config, translator, keys)
    return assets, time.perf_counter() - start, len(checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", type=int, default=1000)
    parser.add_argument("--ticks", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3, help="validate runs per project (median)")
    parser.add_argument(
        "--compare-python", type=Path, metavar="PYTHON",
        help="also validate both projects with another environment's dagster (e.g. one with dagster-snowflake "
        "installed), alternating with this one three times: the medians compare under the same load",
    )
    args = parser.parse_args()
    admin_url = os.environ.get("POSTGRES_URL")
    if not admin_url:
        raise SystemExit("set POSTGRES_URL to a server with wal_level=logical (scripts/local-postgres prints one)")
    url = bench_database(admin_url, args.tables)

    import dagster as dg

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        env = {**os.environ, "BENCH_URL": url, "DAGSTER_HOME": str(tmp_path / "home")}
        env.pop("DUCKDB_PATH", None)
        (tmp_path / "home").mkdir()
        (tmp_path / "home" / "dagster.yaml").write_text("")
        big, empty = tmp_path / "big", tmp_path / "empty"
        make_project(big, "bench_big", COMPONENT.format(warehouse=tmp_path / "w.duckdb"))
        make_project(empty, "bench_empty", None)

        start = time.perf_counter()
        out = subprocess.run([str(BIN / "dg"), "utils", "refresh-defs-state"], cwd=big, env={**env, "PYTHONPATH": str(big)}, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            raise SystemExit(f"dg utils refresh-defs-state failed:\n{(out.stdout + out.stderr)[-3000:]}")
        refresh = time.perf_counter() - start

        # The simple path: replication.yaml, the catalog read at load (its first load saves the snapshot).
        simple = tmp_path / "simple"
        simple.mkdir()
        (simple / "replication.yaml").write_text(REPLICATION_YAML.format(warehouse=tmp_path / "simple.duckdb"))
        simple_env = {**env, "POSTGRES_URL": url, "PG_REPLICATION_CONFIG": str(simple / "replication.yaml")}
        projects = {
            "empty project": (empty, "bench_empty.definitions", {**env, "PYTHONPATH": str(empty)}),
            f"{args.tables:,} tables, PgReplicationComponent": (big, "bench_big.definitions", {**env, "PYTHONPATH": str(big)}),
            f"{args.tables:,} tables, replication.yaml, catalog read at load": (simple, "pg_replication.dagster.definitions", simple_env),
            f"{args.tables:,} tables, replication.yaml, saved catalog": (
                simple, "pg_replication.dagster.definitions", {**simple_env, "PG_REPLICATION_CATALOG": "saved"},
            ),
        }
        validated: dict[str, list[float]] = {}
        for _ in range(args.runs):
            for what, (project, module, project_env) in projects.items():
                validated.setdefault(what, []).append(validate_seconds(project, module, project_env))
        medians = {what: statistics.median(runs) for what, runs in validated.items()}
        baseline = medians["empty project"]
        compared = None
        if args.compare_python:
            other = args.compare_python.parent
            runs: dict[tuple[str, str], list[float]] = {}
            for _ in range(3):
                for project, module in ((empty, "bench_empty.definitions"), (big, "bench_big.definitions")):
                    for which, bin_dir in (("this", BIN), ("other", other)):
                        seconds = validate_seconds(project, module, {**env, "PYTHONPATH": str(project)}, bin_dir)
                        runs.setdefault((module.split(".")[0], which), []).append(seconds)
                for which, python in (("this", Path(sys.executable)), ("other", args.compare_python)):
                    runs.setdefault(("discovery", which), []).append(discovery_seconds(python))
            compared = {k: statistics.median(v) for k, v in runs.items()}

        # The tick, in this process: the definitions as a code server builds them.
        os.environ.update(BENCH_URL=url, DAGSTER_HOME=str(tmp_path / "home"))
        sys.path.insert(0, str(big))
        import importlib

        start = time.perf_counter()
        defs = importlib.import_module("bench_big.definitions").defs
        defs = defs() if callable(defs) and not isinstance(defs, dg.Definitions) else defs
        graph = defs.resolve_asset_graph()
        build = time.perf_counter() - start
        tables = len(list(graph.get_all_asset_keys()))
        assets_s, checks_s, n_checks = _breakdown(big, tmp_path)
        sensor = defs.resolve_sensor_def("bench_cdc_sensor")
        resources = {key: defs.resources[key] for key in sensor.required_resource_keys}
        ticks = []
        with dg.instance_for_test() as instance:
            for _ in range(args.ticks):
                context = dg.build_sensor_context(instance=instance, resources=resources, definitions=defs)
                start = time.perf_counter()
                result = sensor.evaluate_tick(context)
                ticks.append(time.perf_counter() - start)
        requested = len(result.run_requests or [])
        skipped = result.skip_message

    tick = statistics.median(ticks)
    print(f"command: POSTGRES_URL=… .venv/bin/python bench/definitions_load.py --tables {args.tables} --runs {args.runs}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"tables replicated: {tables} (catalog refresh by `dg utils refresh-defs-state`: {refresh:.1f} s)")
    print(f"dagster definitions validate, median of {args.runs} (target < 10 s with {args.tables:,} tables):")
    for what, median in medians.items():
        runs = ", ".join(f"{r:.2f}" for r in validated[what])
        print(f"  {what}: {median:.2f} s, {median / baseline:.2f} x the empty project ({runs})")
    if compared:
        for project in ("bench_empty", "bench_big", "discovery"):
            this, other = compared[(project, "this")], compared[(project, "other")]
            what = "the component loader's entry-point discovery" if project == "discovery" else f"{project}: validate"
            print(f"{what}: median of 3, this environment {this:.2f} s, {args.compare_python} {other:.2f} s (ratio {this / other:.2f})")
    print(f"definitions built in-process: {build:.2f} s, of which table assets {assets_s:.2f} s and {n_checks:,} asset checks {checks_s:.2f} s")
    print(f"CDC sensor tick: median {tick:.3f} s over {len(ticks)} (min {min(ticks):.3f}, max {max(ticks):.3f}); target < 2 s; "
          f"last tick: {requested} run request(s){', skipped: ' + skipped if skipped else ''}")


if __name__ == "__main__":
    main()
