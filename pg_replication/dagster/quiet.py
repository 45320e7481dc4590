"""Warnings Dagster raises about its own calls, which a user of this code location cannot act on.

Dagster 1.13 passes ``owners`` to ``SensorDefinition`` internally whenever a sensor is built or
copied (the run status sensors of notifications.py, and every copy Definitions makes), and warns
each time that the parameter is in beta: a dozen lines before any `dagster` command's output.
Only these messages are silenced; Dagster's other warnings (a superseded CLI command names its
replacement) still reach the user.
"""

from __future__ import annotations

import warnings

import dagster as dg

_OURS_TO_CARRY = [
    r"Parameter `owners` of initializer `SensorDefinition\.__init__` is currently in beta",
]


def silence_internal_beta_warnings() -> None:
    for message in _OURS_TO_CARRY:
        warnings.filterwarnings("ignore", message=message, category=dg.BetaWarning)
