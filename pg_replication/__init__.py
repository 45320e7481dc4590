"""pg_replication: Postgres tables mirrored into an analytical warehouse as Dagster assets.

The engine (``source``, ``types``, ``changes``, ``warehouse``, ``backfill``, ``cdc``) knows nothing
of Dagster; ``definitions`` wires it into a code location.
"""
