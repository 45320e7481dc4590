"""Materializations for the streamed tables a drain kept current without changing them.

Dagster's freshness daemon (1.13) judges a ``FreshnessPolicy`` by the asset's last
*materialization* alone (observations do not count), and a drain materializes only the tables it
applied changes to: a table nobody writes to would show stale although every drain keeps it
current. So a drain that caught up (it read every change committed before it started) reports
each streaming table it did not touch as materialized, ``mode: caught_up``, once its last
materialization is older than half the freshness window: at most one event per table per half
window, whatever the number of batches, and a table stays fresh with half a window to spare for
the time between drains. A table that is failed, held or still backfilling is never reported;
when drains stop, nothing is reported and the table goes stale. A source where nothing changes
at all gets a one-batch drain from its CDC sensor for that purpose, once per half window
(``report_due``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping

import dagster as dg

from pg_replication.dagster.assets import TableAssetTranslator
from pg_replication.replicate.cdc import DrainResult
from pg_replication.source.catalog import Table


IN_PROGRESS = {
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
}


class KeptCurrent:
    """One drain run's reporter. ``statuses()`` reads the warehouse's {table key: (status, error)};
    it is called only when some table's report is due."""

    def __init__(self, instance: dg.DagsterInstance, translator: TableAssetTranslator, tables: list[Table], every_seconds: float):
        self._instance = instance
        self._every = every_seconds
        self._keys = {f"{t.schema}.{t.name}": translator.get_asset_key(t) for t in tables}
        self._last: dict[str, float] | None = None  # table key -> its last materialization (epoch s)

    def _last_materialized(self) -> dict[str, float]:
        """Read from the instance once per run (one query for every table), then kept here."""
        if self._last is None:
            by_asset = {key: name for name, key in self._keys.items()}
            self._last = dict.fromkeys(self._keys, 0.0)
            for record in self._instance.get_asset_records(list(by_asset)):
                entry = record.asset_entry
                if entry.last_materialization is not None and entry.asset_key in by_asset:
                    self._last[by_asset[entry.asset_key]] = entry.last_materialization.timestamp
        return self._last

    def events(
        self, result: DrainResult, tables: list[Table], position: str, statuses: Callable[[], Mapping[str, tuple[str, str | None]]]
    ) -> Iterator[dg.AssetMaterialization]:
        """One ``caught_up`` materialization per due table among ``tables`` (the ones ``result``'s
        drain covers, up to ``position``), when that drain caught up."""
        now = time.time()
        last = self._last_materialized()
        for key, outcome in result.tables.items():  # materialized by the drain's own report
            if outcome.mode == "applied" and key in last:
                last[key] = now
        if not result.caught_up:  # changes beyond this batch may touch any table: nothing is known current
            return
        due = [k for t in tables if (k := f"{t.schema}.{t.name}") in last and k not in result.tables and now - last[k] >= self._every]
        if not due:
            return
        status = statuses()
        for key in due:
            if status.get(key, ("not started", None))[0] != "streaming":
                continue
            last[key] = now
            yield dg.AssetMaterialization(
                asset_key=self._keys[key],
                description=f"kept current: caught up to {position}, no change to apply since the last materialization",
                metadata={"mode": dg.MetadataValue.text("caught_up"), "caught_up_to": dg.MetadataValue.text(position)},
            )


def report_due(instance: dg.DagsterInstance, job_name: str, keys: list[dg.AssetKey], every_seconds: float) -> bool:
    """Whether an idle source needs a one-batch drain run only to report its tables kept current:
    no drain run is in progress or started within ``every_seconds``, and a table materialized
    before (backfilled) was not within ``every_seconds``. Without it, a source where nothing
    changes gets no drain and every table shows stale after its window."""
    now = time.time()
    latest = instance.get_run_records(dg.RunsFilter(job_name=job_name), limit=1)
    if latest and (latest[0].dagster_run.status in IN_PROGRESS or now - latest[0].create_timestamp.timestamp() < every_seconds):
        return False
    for record in instance.get_asset_records(keys):
        last = record.asset_entry.last_materialization
        if last is not None and now - last.timestamp >= every_seconds:
            return True
    return False


__all__ = ["KeptCurrent", "report_due"]
