"""The Dagster layer: assets, checks, jobs, sensors and resources over the engine."""
