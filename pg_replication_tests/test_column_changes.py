"""The compiled CDC hot path (source/_rowdecode.c, column_changes.py) stages exactly what the
Python fold stages, on messages captured from a real Postgres 15 slot.

Proves:
  * Inserts, Updates (with and without a key change, under DEFAULT and FULL replica identity),
    Deletes and a TRUNCATE, over NULLs, non-ASCII text, excluded columns, composite keys and every
    converted type (arrays of int, float, bool and text with NULL elements, quotes, nesting and
    bounds; interval; money), stage to the same rows (op, unknown flags, fill key, values) whether
    the changes go through the compiled decoder and the fold in SQL, or through pgoutput.py and
    the Python fold (changes.Segment);
  * an unchanged TOAST value in the middle of a batch hands the segment over to the Python fold
    without losing or reordering a change;
  * the compiled array-to-JSON conversion writes what text_values.array_to_json writes, for
    literals Postgres itself printed and for fuzzed ones.

Leaves out: the drain around it (test_cdc.py, test_types.py, test_toast.py prove warehouse values
through the same path), and speed (bench/cdc.py).
"""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pg_replication.replicate import cdc
from pg_replication.replicate.changes import Segment, TableBatch
from pg_replication.replicate.column_changes import _convert, staged_table
from pg_replication.config import parse_config
from pg_replication.source import pgoutput as po
from pg_replication.source.catalog import introspect, load_types
from pg_replication.source.connection import connect
from pg_replication.source.text_values import array_to_json
from pg_replication.types import SESSION_OPTIONS, map_column
from pg_replication.warehouse import staging

SCHEMA = """
CREATE TABLE wide (
    id int, k2 text, v text, n numeric(10,2), arr text[], iarr int[], barr bool[], farr float8[],
    nested int[], iv interval, m money, secret text, PRIMARY KEY (id, k2));
CREATE TABLE toasted (id int PRIMARY KEY, note text, big text);
ALTER TABLE toasted ALTER COLUMN big SET STORAGE EXTERNAL;
INSERT INTO toasted SELECT i, 'n' || i, repeat(md5(i::text), 400) FROM generate_series(1, 20) i;
CREATE TABLE full_identity (id int PRIMARY KEY, v text);
ALTER TABLE full_identity REPLICA IDENTITY FULL;
"""

CHANGES = [
    """INSERT INTO wide SELECT i, 'k' || i, CASE WHEN i % 7 = 0 THEN NULL ELSE 'välue ' || i END, i * 1.25,
         CASE i % 4 WHEN 0 THEN ARRAY['a', NULL, 'x y', 'q"uote', 'b\\ack', ''] WHEN 1 THEN '{}'::text[]
                    WHEN 2 THEN ARRAY['plain', 'é'] ELSE NULL END,
         ARRAY[i, NULL, -i], ARRAY[true, NULL, false], ARRAY[1.5, 'NaN', '-Infinity', NULL]::float8[],
         CASE WHEN i % 3 = 0 THEN '[2:3]={1,2}'::int[] ELSE ARRAY[[i, 2], [3, 4]] END,
         make_interval(months => i, days => -i, secs => i * 1.5), (i * 100.5)::numeric::money, 'hidden'
       FROM generate_series(1, 60) i""",
    "UPDATE wide SET v = v || '!', iarr = iarr || 7 WHERE id % 5 = 0",
    "UPDATE wide SET id = id + 1000 WHERE id % 6 = 0",  # key changes: the old key is sent
    "UPDATE wide SET id = id - 1000 WHERE id = 1006",  # and back again
    "DELETE FROM wide WHERE id % 4 = 1",
    "INSERT INTO wide (id, k2, v) VALUES (1, 'k1', 're-inserted')",
    "ALTER TABLE wide RENAME COLUMN v TO w",  # same width, new columns: a new segment
    "UPDATE wide SET w = 'renamed' WHERE id = 2",
    "ALTER TABLE wide ALTER COLUMN n TYPE numeric(12,3)",
    "UPDATE wide SET n = n + 0.001 WHERE id IN (2, 3)",
    "ALTER TABLE wide ADD COLUMN extra int[] DEFAULT '{1,NULL}'",
    "UPDATE wide SET id = id + 2000 WHERE id = 3",
    "INSERT INTO toasted SELECT i, 'n' || i, repeat(md5(i::text), 400) FROM generate_series(21, 30) i",
    "UPDATE toasted SET note = note || '+' WHERE id % 2 = 0",  # big unchanged: 'u', some of rows from before
    "UPDATE toasted SET big = big || 'z' WHERE id = 3",
    "DELETE FROM toasted WHERE id = 5",
    "INSERT INTO toasted VALUES (100, 'after', 'small')",
    "INSERT INTO full_identity SELECT i, 'v' || i FROM generate_series(1, 30) i",
    "UPDATE full_identity SET v = v || '?' WHERE id % 3 = 0",  # the whole old row, same key
    "UPDATE full_identity SET id = id + 100 WHERE id % 5 = 0",  # the whole old row, new key
    "TRUNCATE full_identity",
    "INSERT INTO full_identity VALUES (7, 'after truncate')",
    "DELETE FROM full_identity WHERE id = 7",
    "INSERT INTO full_identity VALUES (8, 'last')",
]


@pytest.fixture
def captured(pg, pg_url):
    pg.execute(SCHEMA)
    config = parse_config({"tables": [{"name": "wide", "exclude_columns": ["secret"]}, "toasted", "full_identity"]})
    pg.execute("CREATE PUBLICATION p FOR TABLE wide, toasted, full_identity")
    pg.execute("SELECT pg_create_logical_replication_slot('cols', 'pgoutput')")
    for statement in CHANGES:
        pg.execute(statement)
    with connect(pg_url, options=SESSION_OPTIONS) as conn:
        tables = {t.name: t for t in introspect(conn, config)}
        types = load_types(conn)
        messages = [
            bytes(row[0])
            for row in conn.execute(
                "SELECT data FROM pg_logical_slot_peek_binary_changes('cols', NULL, NULL, "
                "'proto_version', '1', 'publication_names', 'p')"
            )
        ]
    return tables, types, messages


def _python_fold(tables, types, messages) -> dict[str, list[Segment]]:
    """The reference: every message decoded by pgoutput.py and folded by changes.Segment."""
    plans: dict[int, cdc._RelationPlan] = {}
    batches: dict[str, list[Segment]] = {}
    for data in messages:
        msg = po.decode(data)
        if isinstance(msg, po.Relation):
            plans[msg.oid] = cdc._plan_relation(msg, tables[msg.name], types, map_column)
            continue
        if isinstance(msg, po.Truncate):
            for oid in msg.relations:
                _segment_of(batches, plans[oid]).truncate()
            continue
        if not isinstance(msg, (po.Insert, po.Update, po.Delete)):
            continue
        plan = plans[msg.relation]
        segment = _segment_of(batches, plan)
        if isinstance(msg, po.Insert):
            segment.insert(cdc._stage(msg.new, plan)[0])
        elif isinstance(msg, po.Update):
            values, unknown = cdc._stage(msg.new, plan)
            segment.update(values, unknown, None if msg.old is None else cdc._old_key(msg.old, plan))
        else:
            segment.delete(cdc._old_key(msg.old, plan))
    return batches


def _segment_of(batches, plan) -> Segment:
    """A new segment for new columns, and (as the drain does) for a new Relation message."""
    segments = batches.setdefault(plan.key, [])
    if not segments or segments[-1].columns != plan.columns or segments[-1].plan is not plan:
        segments.append(Segment(plan.columns, plan.key_positions))
        segments[-1].plan = plan
    return segments[-1]


class _Replay:
    """The captured messages as the drain reads a slot stream (source/stream.py's SlotStream),
    every one of them handed to the loop (none routed)."""

    server_end = 1 << 62  # everything below has arrived
    quiet_for = 1e9
    routed_changes = routed_bytes = 0
    skip_changes = in_stream_block = False

    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages
        self.bytes = 0

    def route_changes(self, routes: dict, touched: set) -> None:
        pass

    def __iter__(self):
        for message in self.messages:
            self.bytes += len(message)
            yield message
        while True:
            yield None


def _compiled_fold(pg_url, tables, messages) -> dict[str, TableBatch]:
    """The drain's own read loop (cdc._read_batch: compiled decoder, Python when it must)."""
    settings = cdc.DrainSettings("cols", "p", max_changes=10**9, idle_ms=0)
    by_name = {(t.schema, t.name): t for t in tables.values()}
    with connect(pg_url, options=SESSION_OPTIONS) as conn:
        decoded = cdc._read_batch(conn, by_name, settings, 0, map_column, None, _Replay(messages), 0)
    return decoded.batches


def _staged_rows(table: pa.Table, key_width: int, key_positions) -> dict:
    """Staged rows by key (the fold's order is not part of the contract; _seq only orders)."""
    rows = table.to_pylist()
    out = {}
    for row in rows:
        values = tuple(row[staging.value_column(i)] for i in range(len(row) - 3 - key_width))
        key = ("T",) if row[staging.OP] == "T" else tuple(values[p] for p in key_positions)
        fills = tuple(row[staging.fill_column(i)] for i in range(key_width))
        assert key not in out, f"two staged rows for key {key}"
        out[key] = (row[staging.OP], row[staging.UNKNOWN], fills, values)
    return out


def test_compiled_path_stages_what_the_python_fold_stages(captured, pg_url):
    tables, types, messages = captured
    expected = _python_fold(tables, types, messages)
    got = _compiled_fold(pg_url, tables, messages)
    assert set(got) == set(expected) == {"public.wide", "public.toasted", "public.full_identity"}
    for key, segments in expected.items():
        width = len(tables[key.split(".")[1]].primary_key)
        assert [s.columns for s in got[key].segments] == [s.columns for s in segments]
        for mine, theirs in zip(got[key].segments, segments):
            assert mine.truncated == theirs.truncated
            want = _staged_rows(staging.segment_table(theirs, width), width, theirs.key_positions)
            have = _staged_rows(staged_table(mine, width), width, mine.key_positions)
            assert have == want
    assert len(expected["public.wide"]) == 4  # renamed, retyped, added: a segment each
    wide = expected["public.wide"][0]
    assert "w" in expected["public.wide"][1].columns and "extra" in expected["public.wide"][-1].columns
    assert "secret" not in wide.columns
    assert any(u is None for u in wide.rows.values()) and len(wide.rows) > 40  # deletes and rows both staged
    # the TOAST table went over to the Python fold at its first unchanged value, with its unknowns kept
    assert type(got["public.toasted"].segments[0]) is Segment and got["public.toasted"].segments[0].has_unknowns
    assert type(got["public.wide"].segments[0]) is not Segment  # the compiled path took the rest


def test_compiled_path_counts_changes(captured, pg_url):
    tables, types, messages = captured
    batches = _compiled_fold(pg_url, tables, messages)
    sent = {"I": 0, "U": 0, "D": 0}
    for data in messages:
        if data[:1] in (b"I", b"U", b"D"):
            sent[chr(data[0])] += 1
    stats = [tb.stats for tb in batches.values()]
    assert (sum(s.inserted for s in stats), sum(s.updated for s in stats), sum(s.deleted for s in stats)) == (
        sent["I"], sent["U"], sent["D"]
    )
    assert all(s.first_lsn and s.last_lsn and s.last_lsn >= s.first_lsn for s in stats)


def test_array_json_matches_python_on_postgres_literals(pg):
    literals = [
        r[0]
        for r in pg.execute(
            """SELECT a::text FROM (VALUES (ARRAY['a', NULL, 'x y', 'q"uote', 'b\\ack', '', 'NULL', 'é', E'tab\\t']),
               ('{}'::text[]), (ARRAY[ARRAY['a', 'b'], ARRAY['c', NULL]]), ('[0:1]={x,y}'::text[]),
               (ARRAY['null', 'true', '1,2'])) v(a)"""
        )
    ]
    numbers = [r[0] for r in pg.execute("SELECT a::text FROM (VALUES (ARRAY[1, NULL, -3]), ('{}'::int[]), (ARRAY[[1, 2], [3, 4]])) v(a)")]
    floats = [r[0] for r in pg.execute("SELECT a::text FROM (VALUES (ARRAY[1.5, 'NaN', '-Infinity', NULL, 1e300]::float8[])) v(a)")]
    bools = [r[0] for r in pg.execute("SELECT a::text FROM (VALUES (ARRAY[true, NULL, false]), ('{}'::bool[])) v(a)")]
    for kind, values in (("text", literals), ("int", numbers), ("float", floats), ("bool", bools)):
        _assert_same_json(kind, values + [None])


_ELEMENTS = st.sampled_from(["a", "NULL", "null", "t", "f", "1", "-2", "3.5", "NaN", "Infinity", "é", "x y", "\x01", '"', "\\", "{", "}", ""])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.none(), st.lists(_ELEMENTS, max_size=4).map(lambda items: "{" + ",".join(items) + "}")), max_size=20))
def test_array_json_matches_python_on_fuzzed_literals(values):
    for kind in ("text", "int", "float", "bool"):
        _assert_same_json(kind, values)


def _assert_same_json(kind: str, values: list) -> None:
    convert = array_to_json(kind)
    expected, kept = [], []
    for v in values:
        try:
            expected.append(None if v is None else convert(v))
        except (ValueError, IndexError):
            continue  # not an array literal: the Python converter refuses it, so does the drain
        kept.append(v)
    assert _convert(pa.array(kept, pa.string()), convert).to_pylist() == expected
