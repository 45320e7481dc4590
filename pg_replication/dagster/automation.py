"""Declarative automation of a source: one automation-condition sensor, running by default, that
launches the asset checks on their cadence (``source.checks_schedule``) without anyone clicking."""

from __future__ import annotations

import dagster as dg

from pg_replication.config import ReplicationConfig


def check_condition(config: ReplicationConfig) -> dg.AutomationCondition:
    """Every tick of the checks' cron, unless the check still runs from the last one. A cadence,
    not after each materialization: a CDC table materializes with every micro-batch."""
    return dg.AutomationCondition.cron_tick_passed(config.source.checks_schedule, "UTC") & ~dg.AutomationCondition.in_progress()


def build_automation_sensor(config: ReplicationConfig, asset_keys: list[dg.AssetKey]) -> dg.AutomationConditionSensorDefinition:
    """The source's own checks only: two sources in one project each have their sensor, and Dagster
    lets one sensor, not two, evaluate a check."""
    return dg.AutomationConditionSensorDefinition(
        f"{config.source.name}_automation_sensor",
        target=dg.AssetSelection.checks_for_assets(*asset_keys),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        description=f"Runs {config.source.name}'s asset checks on their cron ({config.source.checks_schedule}, UTC).",
    )


__all__ = ["build_automation_sensor", "check_condition"]
