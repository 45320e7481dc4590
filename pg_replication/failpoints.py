"""Named failure points for the crash tests: ``PGR_FAILPOINT=<name>`` kills the process there
with SIGKILL, as a power cut would (before the warehouse commit, after it, before the slot moves)."""

from __future__ import annotations

import os
import signal


def failpoint(name: str) -> None:
    if os.environ.get("PGR_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
