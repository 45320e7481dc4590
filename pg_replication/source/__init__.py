"""The Postgres side: connections, catalog introspection, snapshot slices."""
