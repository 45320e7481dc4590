"""Which relation a configured name stands for, and how it is published.

A table's stream is gap-free when every change of *its relation* after its plan position
reached the warehouse. The warehouse stores, next to the plan (warehouse/engine.py, state table
``tables``), what this module reads: the relation's pg_class oid and the publication entry that
publishes it. Each drain compares them with the catalog (``identity_problem``):
- another oid: the relation was dropped and re-created, or another table renamed into the name;
  the old rows and the new relation's changes before it was published are nowhere;
- another publication entry: the table left the publication and came back (an entry's oid is
  new each time it is added), and changes in between were never published.
A third check needs no catalog: ``covered_lsn``, the drained position up to which drains
included the table. It starts at the plan position; each drain that includes the table moves it
to the position it commits, provided it was at least the position that drain started from. A
table whose ``covered_lsn`` is below the slot's drained position missed a drain (removed from
replication.yaml and added back, or a run with an older configuration), so its changes in
between were skipped. Any of the three sends the table back to backfilling.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from pg_replication.source.catalog import Table


@dataclass(frozen=True)
class RelationIdentity:
    oid: int | None  # None: no relation has the name now
    member: str | None  # the publication entry: table:<oid>, schema:<oid> or all:<oid>; None: unpublished


_MEMBER_SQL = """
SELECT coalesce(
    (SELECT 'table:' || pr.oid FROM pg_publication_rel pr WHERE pr.prpubid = p.oid AND pr.prrelid = %(rel)s),
    (SELECT 'schema:' || pn.oid FROM pg_publication_namespace pn
      WHERE pn.pnpubid = p.oid AND pn.pnnspid = (SELECT relnamespace FROM pg_class WHERE oid = %(rel)s)),
    CASE WHEN p.puballtables THEN 'all:' || p.oid END)
FROM pg_publication p WHERE p.pubname = %(publication)s
"""


def relation_identity(conn: psycopg.Connection, publication: str, table: Table) -> RelationIdentity:
    row = conn.execute("SELECT to_regclass(%s)::oid", (table.ident.as_string(conn),)).fetchone()
    oid = int(row[0]) if row and row[0] is not None else None
    if oid is None:
        return RelationIdentity(None, None)
    member = conn.execute(_MEMBER_SQL, {"rel": oid, "publication": publication}).fetchone()
    return RelationIdentity(oid, member[0] if member else None)


def identity_problem(
    display: str, stored: tuple[int | None, str | None, int | None], now: RelationIdentity, drained: int
) -> str | None:
    """Why the stream of a planned table has a gap, or None. ``stored``: (oid, publication
    entry, covered_lsn) from the warehouse (None for state written before they existed: those
    are adopted, not judged); ``drained``: the slot's drained position before this drain."""
    from pg_replication.source.pgoutput import int_to_lsn

    oid, member, covered = stored
    if oid is not None and now.oid is not None and now.oid != oid:
        return f"{display} was dropped and re-created (or another table renamed to its name): relation oid {oid} is now {now.oid}"
    if covered is not None and covered < drained:
        return (
            f"drains from {int_to_lsn(covered)} to {int_to_lsn(drained)} ran without it (removed from "
            "replication.yaml and added back, or a run with another configuration)"
        )
    if member is not None and now.oid is not None and now.member != member:
        return f"{display} left the publication and came back ({member} is now {now.member}): changes in between were not published"
    return None


__all__ = ["RelationIdentity", "identity_problem", "relation_identity"]
