"""The compiled part of the CDC hot path (pyproject.toml holds everything else): pgoutput row
changes decoded into column lists in C. Needs a C compiler and Python's headers
(Debian: build-essential python3-dev)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("pg_replication.source._rowdecode", ["pg_replication/source/_rowdecode.c"], extra_compile_args=["-O2"]),
    ]
)
