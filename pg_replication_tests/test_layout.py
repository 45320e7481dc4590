"""The engine knows nothing of Dagster: importing every module outside ``pg_replication/dagster``
loads no Dagster module (a fresh interpreter, so nothing else has imported it first)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pg_replication"


def engine_modules() -> list[str]:
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        if relative.parts[1] == "dagster" or relative.name == "__main__":
            continue
        modules.append(".".join(p for p in relative.parts if p != "__init__"))
    return modules


def test_engine_imports_no_dagster():
    modules = engine_modules()
    assert "pg_replication.replicate.cdc" in modules and "pg_replication.cli" in modules
    probe = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0].startswith('dagster')}))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", f"an engine module imports Dagster: {loaded.stdout}"
