"""Named failure points for the crash tests: they kill the process with SIGKILL there, as a power
cut would (before the warehouse commit, after it, before the slot moves).

``PGR_FAILPOINT=<name>`` kills every process that gets there. With ``PGR_FAILPOINT_DIR``, a file
``<name>`` in that folder arms one kill: the first process to get there removes it and dies
(tests arm kills in runs that the daemon launches). ``pause`` holds a process at a point instead."""

from __future__ import annotations

import os
import signal
import time


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


def pause(name: str, timeout: float = 600.0) -> None:
    """Hold here while ``<name>.pause`` exists in ``PGR_FAILPOINT_DIR`` (a race test arms it, does
    what must happen in between, then removes it). ``<name>.paused`` says the process got here."""
    armed = os.environ.get("PGR_FAILPOINT_DIR")
    gate = os.path.join(armed, f"{name}.pause") if armed else None
    if gate is None or not os.path.exists(gate):
        return
    open(os.path.join(armed, f"{name}.paused"), "w").close()  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout  # a test that died never holds a process forever
    while os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
