"""The Dagster layer: assets, checks, jobs, sensors and resources over the engine."""

from pg_replication.dagster.quiet import silence_internal_beta_warnings

silence_internal_beta_warnings()
