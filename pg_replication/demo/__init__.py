"""The quickstart: demo tables in a local Postgres, backfilled through the dagster CLI."""
