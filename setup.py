"""The compiled part of the CDC hot path (pyproject.toml holds everything else): the replication
stream read and its pgoutput row changes decoded into column lists, in C. Needs a C compiler and
Python's headers (Debian: build-essential python3-dev); libpq is found at run time (_copyboth.c)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pg_replication.source._rowdecode",
            ["pg_replication/source/_rowdecode.c", "pg_replication/source/_copyboth.c"],
            depends=["pg_replication/source/_rowdecode.h"],
            extra_compile_args=["-O2"],
        ),
    ]
)
