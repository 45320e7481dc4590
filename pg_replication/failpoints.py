"""Named failure points for the crash tests: they kill the process with SIGKILL there, as a power
cut would (before the warehouse commit, after it, before the slot moves).

``PGR_FAILPOINT=<name>`` kills every process that gets there. With ``PGR_FAILPOINT_DIR``, a file
``<name>`` in that folder arms one kill: the first process to get there removes it and dies
(tests arm kills in runs that the daemon launches)."""

from __future__ import annotations

import os
import signal


def failpoint(name: str) -> None:
    armed = os.environ.get("PGR_FAILPOINT_DIR")
    if armed:
        try:
            os.remove(os.path.join(armed, name))
        except FileNotFoundError:
            pass
        else:
            os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("PGR_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
