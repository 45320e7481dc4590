"""The UI as a person sees it: `dagster dev` (webserver + daemon) on a local port, a change in
Postgres applied by the sensor's drain runs, and headless Chromium screenshots of the asset graph,
a table's partitions, its CDC events with their metadata, its lag plot and its freshness (the
FreshnessPolicy, evaluated by the daemon).

Set PGR_SCREENSHOTS=docs/screenshots to refresh the README's pictures. Skipped only when no
Chromium is installed (`make test` installs it when run as root).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from pg_replication_tests.browser import CHROMIUM, Browser

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
KEY = dg.AssetKey(["shop", "orders"])

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, data: bytes | None = None) -> bytes:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read()


def _wait(condition, what: str, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
            if value:
                return value
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def _stop(server: subprocess.Popen) -> None:
    """Stop `dagster dev` and everything it started (its process group): SIGTERM, and SIGKILL
    when it has not exited after a generous grace period. A slow exit is not a test failure."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=120)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    try:  # children (daemon, code server, runs) may outlive the leader
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _cdc_events(instance: dg.DagsterInstance) -> int:
    records = instance.fetch_materializations(KEY, limit=100).records
    return sum(1 for r in records if "lag_seconds" in r.asset_materialization.metadata)


@pytest.fixture
def ui(pg, write_config, duckdb_path, tmp_path, monkeypatch):
    pg.execute("CREATE SCHEMA shop")
    pg.execute("CREATE TABLE shop.orders (id bigint PRIMARY KEY, status text, total numeric(12,2), ordered_at timestamptz)")
    pg.execute("INSERT INTO shop.orders SELECT i, 'new', i / 4.0, now() - i * interval '1 minute' FROM generate_series(1, 20000) i")
    write_config({"tables": ["shop.orders"], "defaults": {"partitions": 4}, "source": {"sensor_interval_seconds": 2}})
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.chdir(tmp_path)  # dagster.yaml's storage path is relative to the working directory
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    env = {**os.environ, "FRESHNESS_DAEMON_INTERVAL_SECONDS": "5"}  # Dagster's default: every 30 s
    subprocess.run(
        [str(BIN / "dagster"), "asset", "materialize", "-m", "pg_replication.dagster.definitions", "--select", "shop/orders",
         "--partition-range", "000...003"],
        env=env, cwd=tmp_path, check=True, capture_output=True, timeout=900,
    )
    port = _free_port()
    server = subprocess.Popen(
        [str(BIN / "dagster"), "dev", "-m", "pg_replication.dagster.definitions", "-h", "127.0.0.1", "-p", str(port)],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _get(f"{base}/server_info"), "the webserver", 600)
        _get(f"{base}/graphql", json.dumps({"query": "mutation { setNuxSeen }"}).encode())  # no welcome dialog
        yield base
    finally:
        _stop(server)


def test_ui_shows_assets_partitions_cdc_events_lag_plot_and_freshness(ui, pg):
    shots = Path(os.environ.get("PGR_SCREENSHOTS") or Path.cwd() / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    with dg.DagsterInstance.get() as instance:
        for round_ in range(1, 3):  # two micro-batches: two points on the lag plot
            pg.execute("UPDATE shop.orders SET status = 'shipped', total = total + 1 WHERE id %% 50 = %s", (round_,))
            _wait(lambda: _cdc_events(instance) >= round_, f"CDC micro-batch {round_} applied by the sensor's run", 600)

    query = '{ assetNodeOrError(assetKey: {path: ["shop", "orders"]}) { ... on AssetNode { freshnessStatusInfo { freshnessStatus } } } }'
    fresh = lambda: json.loads(_get(f"{ui}/graphql", json.dumps({"query": query}).encode()))["data"]["assetNodeOrError"]  # noqa: E731
    _wait(lambda: (fresh()["freshnessStatusInfo"] or {}).get("freshnessStatus") == "HEALTHY", "the daemon to find the table fresh", 600)

    browser = Browser()
    try:
        browser.open(f"{ui}/asset-groups")
        browser.wait_for_text("orders", "Latest event")
        browser.wait_until_still()  # the graph has finished laying out: then the picture
        browser.screenshot(shots / "asset-graph.png")

        browser.open(f"{ui}/assets/shop/orders?view=partitions")
        browser.wait_for_text("000", "003")
        browser.screenshot(shots / "partitions.png")

        browser.open(f"{ui}/assets/shop/orders?view=events")
        browser.wait_for_text("lag_seconds", "CDC micro-batch", "updated", "last_lsn")
        browser.screenshot(shots / "cdc-events.png")

        browser.open(f"{ui}/assets/shop/orders")
        browser.wait_for_text("Metadata")
        browser.click_text("Plots")
        browser.click_text("Events")  # plot against time: CDC events carry no partition
        browser.wait_for_text("lag_seconds")
        browser.scroll_to_text("lag_seconds")
        browser.wait_until_still()
        browser.screenshot(shots / "lag-plot.png")

        browser.open(f"{ui}/assets/shop/orders")
        browser.wait_for_text("Freshness policy", "Passing")
        browser.scroll_to_text("Freshness policy")
        browser.wait_until_still()
        browser.screenshot(shots / "freshness.png")
    finally:
        browser.close()
    for name in ("asset-graph", "partitions", "cdc-events", "lag-plot", "freshness"):
        assert (shots / f"{name}.png").stat().st_size > 10_000, name
