"""How fresh each table asset must be, as a ``dg.FreshnessPolicy`` (Dagster's freshness daemon
evaluates it and the UI shows it): a time window for tables that stream (cdc, triggers), the
schedule's own cron for the query strategies."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from itertools import islice

import dagster as dg
from cronsim import CronSim

from pg_replication.config import QUERY_STRATEGIES, ReplicationConfig
from pg_replication.source.catalog import Table


def sync_schedule(table: Table, config: ReplicationConfig) -> str:
    """The cron a query-strategy table syncs on."""
    return (table.entry.schedule if table.entry else None) or config.defaults.schedule


def cron_gaps(cron: str, ticks: int = 64) -> list[timedelta]:
    """The gaps between the next ``ticks`` ticks ('0 9 * * 1-5': one day, and the weekend's three)."""
    times = list(islice(CronSim(cron, datetime.now(timezone.utc)), ticks + 1))
    return [b - a for a, b in zip(times, times[1:])]


def _reload_days_cron(table: Table) -> str | None:
    """The days ``reload_on`` lists, as a cron at midnight UTC (None: no day limit)."""
    days = table.entry.reload_days() if table.entry else None
    if days is None:
        return None
    weekdays, month_days = days  # weekdays 0 = Monday; cron's 0 = Sunday
    if weekdays:
        return "0 0 * * " + ",".join(str((d + 1) % 7) for d in sorted(weekdays))
    return "0 0 " + ",".join(str(d) for d in sorted(month_days)) + " * *"


def freshness_policy(table: Table, config: ReplicationConfig) -> dg.FreshnessPolicy:
    """A scheduled sync is fresh when it materialized since the tick before the last one (the
    sync of the last tick may still run); a reload limited to some days, until the next listed
    day's sync; a streamed table when a change was applied within ``source.freshness_seconds``."""
    if table.strategy in QUERY_STRATEGIES:
        cron = sync_schedule(table, config)
        days = _reload_days_cron(table) if table.strategy == "reload" else None
        if days is not None:  # its syncs skip the other days: fresh until the next listed day's sync
            return dg.FreshnessPolicy.time_window(fail_window=max(cron_gaps(days)) + max(cron_gaps(cron)))
        # Dagster takes no window longer than the shortest gap: after a longer one (a weekend) the
        # table shows stale from the tick until that tick's sync lands
        return dg.FreshnessPolicy.cron(deadline_cron=cron, lower_bound_delta=min(cron_gaps(cron)), timezone="UTC")
    return dg.FreshnessPolicy.time_window(fail_window=timedelta(seconds=config.source.freshness_seconds))


__all__ = ["cron_gaps", "freshness_policy", "sync_schedule"]
