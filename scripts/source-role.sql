-- Least privilege for pg_replication on the source database (role "replicator": names starting
-- with pg_ are reserved). Run as a superuser (or the owner
-- of the tables), with psql variables:
--   psql -v password="'...'" -v schema=shop -v publication=pg_replication -f scripts/source-role.sql
-- The role reads the tables (backfill), reads its replication slot (CDC) and nothing else.
CREATE ROLE replicator LOGIN REPLICATION PASSWORD :password;
GRANT CONNECT ON DATABASE :"DBNAME" TO replicator;
GRANT USAGE ON SCHEMA :"schema" TO replicator;
GRANT SELECT ON ALL TABLES IN SCHEMA :"schema" TO replicator;
ALTER DEFAULT PRIVILEGES IN SCHEMA :"schema" GRANT SELECT ON TABLES TO replicator;
-- A publication may only list tables its owner owns, so create it here as their owner; the
-- role then keeps its table list in step (ALTER PUBLICATION) only if it owns the publication and
-- the tables. Otherwise list new tables here and re-run this statement.
CREATE PUBLICATION :"publication" FOR TABLES IN SCHEMA :"schema" WITH (publish_via_partition_root = true);
