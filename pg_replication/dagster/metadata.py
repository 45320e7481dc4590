"""The metadata a materialization of a table asset carries: a CDC micro-batch's (the drain job,
and drains between backfill slices) and a backfill's (the table asset's body)."""

from __future__ import annotations

import dagster as dg

from pg_replication.replicate.backfill import BackfillResult
from pg_replication.replicate.cdc import TableOutcome
from pg_replication.source.pgoutput import int_to_lsn


def table_metadata(outcome: TableOutcome, now: float) -> dict[str, dg.MetadataValue]:
    stats = outcome.stats
    metadata: dict[str, dg.MetadataValue] = {
        "inserted": dg.MetadataValue.int(stats.inserted),
        "updated": dg.MetadataValue.int(stats.updated),
        "deleted": dg.MetadataValue.int(stats.deleted),
        "truncated": dg.MetadataValue.int(stats.truncated),
        "mode": dg.MetadataValue.text(outcome.mode),
    }
    if stats.first_lsn is not None:  # captured changes (strategy triggers) have no LSN
        metadata["first_lsn"] = dg.MetadataValue.text(int_to_lsn(stats.first_lsn))
        metadata["last_lsn"] = dg.MetadataValue.text(int_to_lsn(stats.last_lsn or stats.first_lsn))
    if stats.last_commit_time is not None:
        commit = stats.last_commit_time / 1e6
        metadata["last_commit_time"] = dg.MetadataValue.timestamp(commit)
        metadata["lag_seconds"] = dg.MetadataValue.float(round(max(0.0, now - commit), 3))
    if outcome.rows_now is not None:
        metadata["dagster/row_count"] = dg.MetadataValue.int(outcome.rows_now)
    return metadata


def backfill_metadata(result: BackfillResult, rows_now: int) -> dict[str, dg.MetadataValue]:
    return {
        "rows": dg.MetadataValue.int(result.rows),
        "bytes": dg.MetadataValue.int(result.bytes),
        "seconds": dg.MetadataValue.float(round(result.seconds, 3)),
        "rows_per_second": dg.MetadataValue.float(round(result.rows_per_second, 1)),
        "slices": dg.MetadataValue.text(", ".join(str(s) for s in result.slices)),
        "snapshots": dg.MetadataValue.int(result.snapshots),
        "longest_snapshot_seconds": dg.MetadataValue.float(round(result.longest_snapshot_seconds, 3)),
        "plan_lsn": dg.MetadataValue.text(result.plan_lsn),
        "dagster/row_count": dg.MetadataValue.int(rows_now),
    }
