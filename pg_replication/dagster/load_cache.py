"""The table assets and checks of the last definitions builds, kept for the next build in the same
process. Dagster calls a code location's ``@definitions`` function twice when it loads it (once
to find the target, once to reconstruct the repository: ``dagster definitions validate``, every
code server), and with 1,000 tables these two lists are most of each build.

The key is everything they are built from: the configuration, the catalog, the translator's class
and its attributes (the warehouse kind among them), the resource keys, and the warehouse's
relation names, which come from the environment (DUCKDB_PATH, the replica's URL, ...). A key that
cannot be computed (a translator Python cannot pickle) means no caching, never a wrong hit.
"""

from __future__ import annotations

import gc
import hashlib
import pickle
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

# A few entries: a project with several sources builds each of them in turn, twice.
_KEEP = 8
_built: OrderedDict[bytes, Any] = OrderedDict()


def build_key(*parts: object) -> bytes | None:
    try:
        raw = pickle.dumps(parts, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - any object pickle refuses: build without the cache
        return None
    return hashlib.sha256(raw).digest()


def cached_build(key: bytes | None, build: Callable[[], T]) -> T:
    """``build()``'s result, or the one built before under the same ``key``."""
    if key is not None and key in _built:
        _built.move_to_end(key)
        return _built[key]
    value = build()
    if key is not None:
        _built[key] = value
        while len(_built) > _KEEP:
            _built.popitem(last=False)
    return value


@contextmanager
def gc_paused() -> Iterator[None]:
    """No garbage collection while a build allocates its objects (it frees none): with 1,000
    tables the collector traversed them again and again, a third of the build's time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_frozen = False


def freeze_once() -> None:
    """Move what the first build made (and all else alive then) out of the collector's sight:
    those definitions live as long as the process, and every full collection after the build
    (Dagster's snapshots of 1,000 assets and 3,000 checks) traversed them again, about a quarter
    of `dagster definitions validate`'s time. Once per process, so a process that builds again
    and again (a test suite) keeps at most the first build's cycles, never one per build."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()  # the build ran with collection paused: its garbage cycles go first, not frozen for good
        gc.freeze()


__all__ = ["build_key", "cached_build", "freeze_once", "gc_paused"]
