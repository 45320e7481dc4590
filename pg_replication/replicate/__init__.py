"""The engine's work: backfill, CDC drain and sync flows joining source/ and warehouse/; no Dagster here."""
