"""Nested documents (README, Documents): a three-level tree publisher 1-n book n-1 author,
book 1-n review, kept fresh by the drains while a writer changes every table; every document
then equals a build from scratch in the warehouse and the same document built by Postgres itself
on the source (json_build_object / json_agg), compared as parsed JSON, lists ordered by the
child's primary key. On DuckDB, the Postgres replica, Snowflake (fakesnow) and ClickHouse (chDB);
on ClickHouse also a drain killed between its data and its documents, then replayed."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import psycopg
import pytest

from pg_replication.config import DocumentSetConfig, parse_config
from pg_replication.errors import ConfigError, PgReplicationError
from pg_replication.replicate.document_tree import DocumentSet, resolve_document_sets
from pg_replication.source.foreign_keys import foreign_keys
from pg_replication_tests.replication import Harness
from pg_replication_tests.targets import make_target

TABLES = ["publisher", "author", "book", "review"]
SCHEMA = """
CREATE TABLE publisher (id int PRIMARY KEY, name text);
CREATE TABLE author (id int PRIMARY KEY, name text);
CREATE TABLE book (
    isbn text PRIMARY KEY, title text, price numeric(8,2),
    publisher_id int REFERENCES publisher ON UPDATE CASCADE ON DELETE SET NULL,
    author_id int REFERENCES author ON UPDATE CASCADE ON DELETE SET NULL
);
CREATE TABLE review (
    book_isbn text REFERENCES book ON UPDATE CASCADE ON DELETE CASCADE, n int, stars int, body text,
    PRIMARY KEY (book_isbn, n)
);
INSERT INTO publisher SELECT i, 'publisher ' || i FROM generate_series(1, 20) i;
INSERT INTO author SELECT i, 'author ' || i FROM generate_series(1, 30) i;
INSERT INTO book SELECT 'b' || lpad(i::text, 5, '0'), 'title ' || i, i * 1.25,
    CASE WHEN i % 17 = 0 THEN NULL ELSE 1 + i % 20 END, CASE WHEN i % 13 = 0 THEN NULL ELSE 1 + i % 30 END
    FROM generate_series(1, 200) i;
INSERT INTO review SELECT 'b' || lpad((1 + i % 200)::text, 5, '0'), i, 1 + i % 5, 'review ' || i FROM generate_series(1, 400) i;
"""

# The tree as replication.yaml declares it: joins found from the source's foreign keys.
PUBLISHER_DOCS = {
    "name": "publisher_docs",
    "root": "public.publisher",
    "columns": {"id": "id", "name": "publisher"},
    "children": [
        {
            "table": "public.book", "as": "books", "relationship": "one_to_many", "columns": ["isbn", "title", "price"],
            "children": [
                {"table": "public.author", "as": "author", "relationship": "many_to_one", "columns": ["id", "name"]},
                {"table": "public.review", "as": "reviews", "relationship": "one_to_many", "columns": {"n": "n", "stars": "rating"}},
            ],
        }
    ],
}

# The same documents, built by Postgres on the source: what the warehouse must hold.
SOURCE_DOCUMENTS = """
SELECT p.id, json_build_object(
    'id', p.id, 'publisher', p.name,
    'books', COALESCE((
        SELECT json_agg(json_build_object(
            'isbn', b.isbn, 'title', b.title, 'price', b.price,
            'author', (SELECT json_build_object('id', a.id, 'name', a.name) FROM author a WHERE a.id = b.author_id),
            'reviews', COALESCE((
                SELECT json_agg(json_build_object('n', r.n, 'rating', r.stars) ORDER BY r.book_isbn, r.n)
                FROM review r WHERE r.book_isbn = b.isbn), '[]'::json)
        ) ORDER BY b.isbn)
        FROM book b WHERE b.publisher_id = p.id), '[]'::json)
)
FROM publisher p ORDER BY p.id
"""


def _backfilled_tree(pg, pg_url, tmp_path: Path, server_url: str, kind: str, partitions: int):
    """The tree's tables on the source, backfilled into a warehouse of ``kind``."""
    pg.execute(SCHEMA)
    with make_target(kind, tmp_path, server_url) as target:
        h = Harness(pg_url, target, TABLES, partitions=partitions)
        h.backfill()
        yield h


@pytest.fixture(params=["duckdb", "postgres", "snowflake", "clickhouse"])
def tree(request, pg, pg_url, tmp_path: Path, server_url: str):
    yield from _backfilled_tree(pg, pg_url, tmp_path, server_url, request.param, partitions=2)


@pytest.fixture
def duckdb_tree(pg, pg_url, tmp_path: Path, server_url: str):
    yield from _backfilled_tree(pg, pg_url, tmp_path, server_url, "duckdb", partitions=1)


@pytest.fixture
def replica_tree(pg, pg_url, tmp_path: Path, server_url: str):
    yield from _backfilled_tree(pg, pg_url, tmp_path, server_url, "postgres", partitions=1)


def resolve(h: Harness, pg: psycopg.Connection, raw: dict = PUBLISHER_DOCS) -> DocumentSet:
    fks = foreign_keys(pg, {(t.schema, t.name) for t in h.tables})
    (dset,) = resolve_document_sets([DocumentSetConfig.model_validate(raw)], h.tables, fks)
    return dset


def build_documents(h: Harness, dset: DocumentSet) -> int:
    """Build ``dset`` whole in ``h``'s warehouse; the documents written."""
    with h.target.open() as wh:
        return wh.materialize_documents(dset)


def parsed(value):
    return json.loads(value) if isinstance(value, str) else value


def stored_documents(h: Harness, dset: DocumentSet) -> dict:
    with h.target.open(read_only=True) as wh:
        return {k: parsed(d) for k, d in wh.fetchall(f"SELECT id, document FROM {wh.document_table(dset)}")}


def rebuilt_documents(h: Harness, dset: DocumentSet) -> dict:
    """A recomputation from scratch, from the warehouse's tables."""
    with h.target.open(read_only=True) as wh:
        return {k: parsed(d) for k, d in wh.fetchall(wh._document_sql(dset).select())}


def source_documents(pg: psycopg.Connection) -> dict:
    return {k: d for k, d in pg.execute(SOURCE_DOCUMENTS).fetchall()}


def assert_documents_fresh(h: Harness, pg: psycopg.Connection, dset: DocumentSet) -> None:
    stored, source = stored_documents(h, dset), source_documents(pg)
    assert stored == rebuilt_documents(h, dset)
    wrong = sorted(k for k in set(stored) | set(source) if stored.get(k) != source.get(k))
    assert not wrong, f"{len(wrong)} documents differ, e.g. {wrong[0]}: warehouse {stored.get(wrong[0])} source {source.get(wrong[0])}"


def test_full_build_equals_the_document_postgres_builds(tree, pg):
    dset = resolve(tree, pg)
    assert build_documents(tree, dset) == 20
    assert_documents_fresh(tree, pg, dset)
    doc = stored_documents(tree, dset)[1]
    book = doc["books"][0]
    assert set(doc) == {"id", "publisher", "books"} and set(book) == {"isbn", "title", "price", "author", "reviews"}
    assert [b["isbn"] for b in doc["books"]] == sorted(b["isbn"] for b in doc["books"])


def _writer(url: str, ops: int, seed: int, errors: list) -> None:
    """Every kind of change on every table of the tree, each in its own transaction."""
    rnd = random.Random(seed)
    next_id = [1000]

    def new_id() -> int:
        next_id[0] += 1
        return next_id[0]

    def isbn() -> str:
        return "b" + str(rnd.randint(1, 400)).zfill(5)

    statements = [
        ("INSERT INTO publisher VALUES (%(n)s, 'new publisher')", 2),
        ("INSERT INTO author VALUES (%(n)s, 'new author')", 2),
        ("INSERT INTO book VALUES ('b' || %(n)s, 'new', 9.5, %(p)s, %(a)s)", 4),
        ("INSERT INTO review VALUES (%(b)s, %(n)s, 3, 'new') ON CONFLICT DO NOTHING", 5),
        ("UPDATE book SET title = title || '!', price = price + 1 WHERE isbn = %(b)s", 4),
        ("UPDATE book SET publisher_id = %(p)s, author_id = %(a)s WHERE isbn = %(b)s", 5),  # FK moves
        ("UPDATE book SET isbn = isbn || 'x' WHERE isbn = %(b)s", 2),  # a child's key change (cascades to reviews)
        ("UPDATE review SET n = n + 10000 WHERE book_isbn = %(b)s", 2),  # a grandchild's key change
        ("UPDATE review SET book_isbn = %(b2)s WHERE book_isbn = %(b)s AND n %% 2 = 0 AND NOT EXISTS (SELECT 1 FROM review r2 WHERE r2.book_isbn = %(b2)s)", 2),
        ("UPDATE review SET stars = stars %% 5 + 1 WHERE book_isbn = %(b)s", 4),
        ("UPDATE author SET name = name || '*' WHERE id = %(a)s", 3),
        ("UPDATE author SET id = %(n)s WHERE id = %(a)s", 1),  # a many-to-one child's key change (cascades)
        ("UPDATE publisher SET name = name || '+' WHERE id = %(p)s", 2),
        ("UPDATE publisher SET id = %(n)s WHERE id = %(p)s", 1),  # a root's key change
        ("DELETE FROM review WHERE book_isbn = %(b)s", 2),
        ("DELETE FROM book WHERE isbn = %(b)s", 2),
        ("DELETE FROM author WHERE id = %(a)s", 1),
        ("DELETE FROM publisher WHERE id = %(p)s", 1),
    ]
    weighted = [s for s, w in statements for _ in range(w)]
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            for i in range(ops):
                if i == ops // 2:
                    conn.execute("TRUNCATE review")
                    continue
                params = {"n": new_id(), "p": rnd.randint(1, 25), "a": rnd.choice([None, *range(1, 35)]), "b": isbn(), "b2": isbn()}
                try:
                    with conn.transaction():
                        for _ in range(rnd.randint(1, 3)):
                            conn.execute(rnd.choice(weighted), params)
                            params = {**params, "n": new_id(), "b": isbn()}
                except psycopg.errors.IntegrityError:
                    pass  # a random reference to a row that is gone: the transaction rolls back
    except Exception as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def while_writing(url: str, ops: int, seed: int, step) -> int:
    """``step()`` again and again while ``_writer`` runs its ``ops`` transactions; the sum of what
    it returned (documents recomputed). The writer's errors fail the test."""
    errors: list = []
    writer = threading.Thread(target=_writer, args=(url, ops, seed, errors))
    writer.start()
    total = 0
    while writer.is_alive():
        total += step()
    writer.join()
    assert not errors, errors
    return total


def test_documents_stay_fresh_under_a_concurrent_writer(tree, pg, pg_url):
    dset = resolve(tree, pg)
    build_documents(tree, dset)
    # drains interleaved with the writer's transactions
    touched = while_writing(pg_url, 400, 14, lambda: sum(r.tables.documents.get("publisher_docs", 0) for r in tree.drain_all(max_changes=60)))
    results = tree.drain_all()
    touched += sum(r.tables.documents.get("publisher_docs", 0) for r in results)
    for name in TABLES:
        tree.assert_equal(pg, name)
    assert_documents_fresh(tree, pg, dset)
    assert touched > 0


def test_a_drain_recomputes_only_the_documents_it_touched(tree, pg):
    dset = resolve(tree, pg)
    build_documents(tree, dset)
    pg.execute("UPDATE review SET stars = 5 WHERE book_isbn = 'b00001'")  # book 1 is publisher 2's
    pg.execute("UPDATE author SET name = 'renamed' WHERE id = 2")  # author 2 wrote books of publishers 2 and 12
    (result,) = tree.drain_all()
    assert result.tables.documents == {"publisher_docs": 2}
    assert_documents_fresh(tree, pg, dset)
    pg.execute("TRUNCATE review")  # any TRUNCATE in the tree rebuilds the set
    (result,) = tree.drain_all()
    assert result.tables.documents == {"publisher_docs": 20}
    assert_documents_fresh(tree, pg, dset)


@pytest.fixture
def clickhouse_tree(pg, pg_url, tmp_path: Path, server_url: str):
    yield from _backfilled_tree(pg, pg_url, tmp_path, server_url, "clickhouse", partitions=1)


@pytest.mark.parametrize("failpoint", ["before_documents", "mid_apply"])
def test_a_clickhouse_drain_killed_before_its_position_replays_to_fresh_documents(clickhouse_tree, pg, failpoint):
    """ClickHouse has no transaction: a drain killed (SIGKILL) after its data and before its
    documents, or after its documents and before its position, is replayed by the next drain,
    which finds the tree changed already; the roots the killed one mapped before its changes
    (publisher 2, which loses a book) are still refreshed."""
    from pg_replication_tests.test_exactly_once import drain_in_subprocess

    h = clickhouse_tree
    dset = resolve(h, pg)
    build_documents(h, dset)
    pg.execute("UPDATE book SET publisher_id = 3 WHERE isbn = 'b00001'")  # from publisher 2 to 3
    pg.execute("UPDATE review SET book_isbn = 'b00002' WHERE book_isbn = 'b00005'")  # publisher 6's reviews to publisher 3's book
    pg.execute("DELETE FROM book WHERE isbn = 'b00007'")  # publisher 8's
    assert drain_in_subprocess(h, failpoint) == -9
    h.drain_all()
    for name in TABLES:
        h.assert_equal(pg, name)
    assert_documents_fresh(h, pg, dset)


TYPED_SCHEMA = r"""
CREATE TABLE typed (
    id int PRIMARY KEY, big bigint, small smallint, amount numeric(12,3), ratio double precision, r real, flag boolean,
    label text, day date, at timestamp, uid uuid, clock time, blob bytea,
    at_tz timestamptz, doc jsonb, tags int[], loose numeric
);
CREATE TABLE typed_item (typed_id int REFERENCES typed, n int, at timestamp, PRIMARY KEY (typed_id, n));
INSERT INTO typed VALUES
    (1, 9007199254740993, -7, 1234.500, 'NaN', 1.5, true, E'q"uote \\ back\nline\té', '2024-02-29',
     '2024-01-02 03:04:05.5', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '03:04:05', '\x00ff',
     '2024-01-02 03:04:05.25+00', '{"b": 1, "a": [1, 2.5]}', '{1,NULL,3}', 1.50),
    (2, NULL, NULL, NULL, 'Infinity', NULL, false, NULL, NULL, '2024-01-02 03:04:00', NULL, NULL, NULL, NULL, NULL, NULL, NULL),
    (3, NULL, NULL, -0.001, '-Infinity', 0.1, NULL, '', NULL, '1999-12-31 23:59:59.999999', NULL, NULL, '', NULL, 'null', '{}', NULL);
INSERT INTO typed_item VALUES (1, 2, '2024-01-01 00:00:00'), (1, 1, NULL);
"""
TYPED_DOCS = {
    "name": "typed_docs", "root": "public.typed",
    "children": [{"table": "public.typed_item", "as": "items", "relationship": "one_to_many", "columns": ["n", "at"]}],
}


def test_clickhouse_renders_values_as_postgres_json_does_where_it_can_tell(pg, pg_url, tmp_path, server_url):
    """Each field of a ClickHouse document against Postgres's json_build_object of the same row:
    equal as parsed JSON for integers, decimals, floats (NaN and infinities as Postgres's strings),
    booleans, text, dates, timestamps, uuid, time, bytea and NULLs, lists of children included; what
    differs is checked as documented (README, Documents): timestamptz without its zone, jsonb,
    arrays and unconstrained numeric as their text."""
    pg.execute(TYPED_SCHEMA)
    with make_target("clickhouse", tmp_path, server_url) as target:
        h = Harness(pg_url, target, ["typed", "typed_item"], partitions=1)
        h.backfill()
        fks = foreign_keys(pg, {(t.schema, t.name) for t in h.tables})
        (dset,) = resolve_document_sets([DocumentSetConfig.model_validate(TYPED_DOCS)], h.tables, fks)
        with target.open() as wh:
            assert wh.materialize_documents(dset) == 3
        pg.execute("UPDATE typed SET label = 'changed', at = '2025-06-30 12:00:00.000001' WHERE id = 2")
        pg.execute("INSERT INTO typed_item VALUES (2, 1, '2024-05-05 05:05:05.05')")
        h.drain_all()
        with target.open(read_only=True) as wh:
            stored = {k: json.loads(d) for k, d in wh.fetchall(f"SELECT id, document FROM {wh.document_table(dset)} FINAL")}
    with pg.cursor() as cur:
        cur.execute("SET TimeZone = 'UTC'")
        source = dict(cur.execute(
            "SELECT t.id, json_build_object('id', t.id, 'big', big, 'small', small, 'amount', amount, 'ratio', ratio, 'r', r, "
            "'flag', flag, 'label', label, 'day', day, 'at', t.at, 'uid', uid, 'clock', clock, 'blob', blob, "
            "'at_tz', at_tz AT TIME ZONE 'UTC', 'doc', doc::text, 'tags', to_json(tags)::text, 'loose', loose::text, "
            "'items', COALESCE((SELECT json_agg(json_build_object('n', i.n, 'at', i.at) ORDER BY i.typed_id, i.n) "
            "FROM typed_item i WHERE i.typed_id = t.id), '[]'::json)) FROM typed t"
        ).fetchall())
    assert set(stored) == set(source) == {1, 2, 3}
    for key in stored:
        assert stored[key] == source[key], key
    assert stored[1]["big"] == 9007199254740993 and stored[1]["ratio"] == "NaN" and stored[1]["blob"] == "\\x00ff"
    assert stored[1]["at"] == "2024-01-02T03:04:05.5" and stored[2]["at"] == "2025-06-30T12:00:00.000001"
    assert json.loads(stored[1]["doc"]) == {"a": [1, 2.5], "b": 1} and json.loads(stored[1]["tags"]) == [1, None, 3]
    assert stored[1]["at_tz"] == "2024-01-02T03:04:05.25" and stored[1]["loose"] == "1.50"


def test_a_column_gone_from_the_tree_holds_the_documents_not_the_drain(duckdb_tree, pg):
    h = duckdb_tree
    dset = resolve(h, pg)
    build_documents(h, dset)
    pg.execute("ALTER TABLE author RENAME COLUMN name TO full_name")  # the warehouse follows it
    pg.execute("UPDATE author SET full_name = 'renamed' WHERE id = 2")
    pg.execute("UPDATE book SET title = 'changed' WHERE isbn = 'b00001'")
    (result,) = h.drain_all()
    assert {k: o.mode for k, o in result.tables.items()} == {"public.author": "applied", "public.book": "applied"}
    assert result.tables.documents == {}
    assert "documents publisher_docs not refreshed: the warehouse lacks public.author (name)" in result.tables.document_problems["publisher_docs"]
    h.reload()
    fixed = {**PUBLISHER_DOCS, "children": [{**PUBLISHER_DOCS["children"][0], "children": [
        {"table": "public.author", "as": "author", "relationship": "many_to_one", "columns": {"id": "id", "full_name": "name"}},
        PUBLISHER_DOCS["children"][0]["children"][1],
    ]}]}
    dset = resolve(h, pg, fixed)
    build_documents(h, dset)
    assert stored_documents(h, dset) == rebuilt_documents(h, dset)
    assert stored_documents(h, dset)[2]["books"][0] == {
        "isbn": "b00001", "title": "changed", "price": 1.25, "author": {"id": 2, "name": "renamed"},
        "reviews": [{"n": 200, "rating": 1}, {"n": 400, "rating": 1}],
    }


def _until(condition, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
        time.sleep(0.05)


def _in_thread(work, errors: list) -> threading.Thread:
    def body() -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    return thread


def _waits_on_a_lock(h: Harness) -> bool:
    with psycopg.connect(h.target.url, autocommit=True) as conn:
        return bool(conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()[0])


def test_the_first_build_waits_for_a_drain_in_flight(replica_tree, pg, tmp_path, monkeypatch):
    """A drain holds its applied changes uncommitted (paused mid-apply: it read the sets before the
    set existed) while the set's first build runs on another connection: the build must wait for
    it, else the build's snapshot lacks the change and no drain ever refreshes that document."""
    h = replica_tree
    dset = resolve(h, pg)
    gates = tmp_path / "failpoints"
    gates.mkdir()
    monkeypatch.setenv("PGR_FAILPOINT_DIR", str(gates))
    (gates / "mid_apply.pause").touch()
    # author: no index of the build's on it (book's would wait for the drain's lock on book)
    pg.execute("UPDATE author SET name = 'during the first build' WHERE id = 2")
    errors: list = []
    drain = _in_thread(h.drain_all, errors)
    _until(lambda: (gates / "mid_apply.paused").exists() or not drain.is_alive(), "the drain to pause mid-apply")

    def build() -> None:
        build_documents(h, dset)

    builder = _in_thread(build, errors)
    _until(lambda: not builder.is_alive() or _waits_on_a_lock(h), "the build to finish or wait for the drain")
    (gates / "mid_apply.pause").unlink()
    drain.join()
    builder.join()
    assert not errors, errors
    assert stored_documents(h, dset)[2]["books"][0]["author"]["name"] == "during the first build"
    assert_documents_fresh(h, pg, dset)


def test_a_failed_refresh_holds_the_set_not_the_drain(replica_tree, pg):
    """The root's key retyped int -> bigint: the Postgres replica widens the root table in place,
    but the set's tables keep int until the set is built again; a root key beyond int fails the
    refresh. The drain applies every table and reports the set; the set stays held until it is
    built again, which recreates its tables with the root key's new type."""
    h = replica_tree
    dset = resolve(h, pg)
    build_documents(h, dset)
    pg.execute("ALTER TABLE publisher ALTER id TYPE bigint")
    pg.execute("INSERT INTO publisher VALUES (3000000000, 'big')")
    pg.execute("UPDATE book SET title = 'changed' WHERE isbn = 'b00001'")
    h.reload()
    (result,) = h.drain_all()
    assert {k: o.mode for k, o in result.tables.items()} == {"public.publisher": "applied", "public.book": "applied"}
    h.assert_equal(pg, "publisher")
    h.assert_equal(pg, "book")
    problem = result.tables.document_problems["publisher_docs"]
    assert "documents publisher_docs" in problem and "materialize the asset public/publisher_docs" in problem, problem
    pg.execute("UPDATE author SET name = 'later' WHERE id = 2")
    (result,) = h.drain_all()  # held: later drains leave the set alone and say why
    assert result.tables.documents == {} and "publisher_docs" in result.tables.document_problems
    h.assert_equal(pg, "author")
    assert build_documents(h, dset) == 21
    assert_documents_fresh(h, pg, dset)
    pg.execute("UPDATE publisher SET name = 'big, renamed' WHERE id = 3000000000")
    (result,) = h.drain_all()
    assert result.tables.documents == {"publisher_docs": 1} and result.tables.document_problems == {}
    assert_documents_fresh(h, pg, dset)


def test_a_rebuild_after_the_root_key_is_retyped_and_backfilled_again_follows_the_new_type(duckdb_tree, pg):
    """The root's key widened to bigint is followed in place (DuckDB tables declare no key that
    would pin its type); resynced then (what ``pg-replication resync`` does) and backfilled again,
    the set is built again; its tables must follow, or a root key beyond int fails its refresh."""
    from pg_replication.replicate.operations import resync_table

    h = duckdb_tree
    dset = resolve(h, pg)
    build_documents(h, dset)
    pg.execute("ALTER TABLE publisher ALTER id TYPE bigint")
    h.reload()
    pg.execute("UPDATE publisher SET name = 'after the retype' WHERE id = 1")
    (result,) = h.drain_all()
    assert result.tables["public.publisher"].mode == "applied"
    assert_documents_fresh(h, pg, dset)
    with h.target.open() as wh:
        resync_table(wh, h.table("publisher"))
    h.backfill("publisher")
    assert stored_documents(h, dset) == rebuilt_documents(h, dset)  # the backfill's last slice built them again
    assert build_documents(h, dset) == 20
    pg.execute("INSERT INTO publisher VALUES (3000000000, 'big')")
    pg.execute("UPDATE book SET publisher_id = NULL WHERE isbn = 'b00001'")
    (result,) = h.drain_all()
    assert result.tables.documents == {"publisher_docs": 2} and result.tables.document_problems == {}
    assert_documents_fresh(h, pg, dset)


def test_a_set_named_like_a_replicated_table_but_for_case_is_refused(duckdb_tree, pg):
    """DuckDB resolves quoted names regardless of case: a set named Review would be public.review."""
    h = duckdb_tree
    problem = _problem(h, pg, {**PUBLISHER_DOCS, "name": "Review"})
    assert "documents: Review: " in problem and "public.review" in problem, problem
    # the build refuses too (a set stored before the load check existed)
    dset = DocumentSet("Review", resolve(h, pg).root)
    before = h.warehouse_rows("review")
    with h.target.open() as wh, pytest.raises(PgReplicationError) as refused:
        wh.materialize_documents(dset)
    assert "documents Review" in str(refused.value) and "public.review" in str(refused.value), str(refused.value)
    assert h.warehouse_rows("review") == before


def _problem(h: Harness, pg, raw: dict, tables: list | None = None) -> str:
    if tables is not None:
        h = Harness.__new__(Harness)
        h.tables = tables
    with pytest.raises(ConfigError) as caught:
        resolve(h, pg, raw)
    return str(caught.value)


@pytest.fixture
def catalog(pg, pg_url):
    """The tree's tables in the source, without replicating them (no warehouse needed)."""
    pg.execute(SCHEMA)
    h = Harness.__new__(Harness)
    h.pg_url, h.partitions, h.raw_tables = pg_url, 1, TABLES
    from pg_replication.source.catalog import introspect
    from pg_replication.source.connection import connect

    with connect(pg_url) as conn:
        h.tables = introspect(conn, parse_config({"tables": TABLES}))
    return h


def test_configuration_errors_name_what_is_wrong(catalog, pg):
    def child(**overrides) -> dict:
        return {**PUBLISHER_DOCS, "children": [{**PUBLISHER_DOCS["children"][0], **overrides}]}

    assert "public.nope is not a replicated table" in _problem(catalog, pg, {**PUBLISHER_DOCS, "root": "public.nope"})
    without_author = [t for t in catalog.tables if t.name != "author"]
    assert "public.author is not a replicated table" in _problem(catalog, pg, PUBLISHER_DOCS, without_author)
    assert "public.book has no column subtitle" in _problem(catalog, pg, child(columns=["isbn", "subtitle"]))
    cycle = child(children=[{"table": "public.review", "relationship": "one_to_many",
                             "children": [{"table": "public.book", "relationship": "many_to_one",
                                           "foreign_key": {"parent": ["book_isbn"], "child": ["isbn"]}}]}])
    assert "public.book -> public.review -> public.book is a cycle" in _problem(catalog, pg, cycle)
    not_key = child(children=[{"table": "public.author", "relationship": "many_to_one",
                               "foreign_key": {"parent": ["title"], "child": ["name"]}}])
    assert "not its primary key (id)" in _problem(catalog, pg, not_key)
    assert "no foreign key public.publisher referencing public.book in the source (many_to_one)" in _problem(
        catalog, pg, child(relationship="many_to_one", children=[])
    )
    assert "author twice" in _problem(catalog, pg, {**PUBLISHER_DOCS, "columns": {"id": "author", "name": "author"}})
    captured = parse_config({"tables": ["publisher", "author", "review", {"name": "book", "strategy": "triggers"}]})
    with psycopg.connect(catalog.pg_url) as conn:
        from pg_replication.source.catalog import introspect

        tables = introspect(conn, captured)
    assert "public.book has strategy triggers" in _problem(catalog, pg, PUBLISHER_DOCS, tables)
    assert "publisher_docs" in _problem(catalog, pg, {**PUBLISHER_DOCS, "root": "public.nope"})  # names the set


def test_a_bad_documents_section_fails_the_load_naming_the_set(pg, write_config, duckdb_path):
    from pg_replication.dagster.definitions import build_definitions

    pg.execute(SCHEMA)
    bad = {**PUBLISHER_DOCS, "children": [{**PUBLISHER_DOCS["children"][0], "columns": ["isbn", "subtitle"]}]}
    write_config({"tables": TABLES, "documents": [bad]})
    with pytest.raises(ConfigError, match="documents: publisher_docs: public.book has no column subtitle"):
        build_definitions()


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["duckdb", "clickhouse"])
def test_document_asset_and_drain_job_through_the_cli(pg, write_config, duckdb_path, tmp_path, monkeypatch, kind):
    """What an operator runs: the tables' and the documents' assets materialized, then the drain
    job, each in a fresh process; the drain reports the documents it recomputed on their asset.
    On ClickHouse (chDB) readers query the documents with FINAL."""
    import dagster as dg
    import duckdb

    from pg_replication_tests import operator
    from pg_replication_tests.operator import dagster_env, run_cli

    def ok(args) -> None:
        out = run_cli(args, env, tmp_path)
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]

    pg.execute(SCHEMA)
    write_config({
        "source": {"slot": "pgr_docs", "publication": "pgr_docs"}, "tables": TABLES, "defaults": {"partitions": 1},
        "documents": [PUBLISHER_DOCS],
        **({"warehouse": {"kind": "clickhouse", "path": str(tmp_path / "warehouse.chdb")}} if kind == "clickhouse" else {}),
    })
    env = dagster_env(tmp_path)
    tables = operator.materialize(",".join(f"public/{t}" for t in TABLES), "000...000")
    # chDB admits one process per directory: the tables' steps in one process, not four waiting on each other
    ok(tables + (["--config-json", json.dumps({"execution": {"config": {"in_process": {}}}})] if kind == "clickhouse" else []))
    ok(["dagster", "asset", "materialize", "-m", "pg_replication.dagster.definitions", "--select", "public/publisher_docs"])
    pg.execute("UPDATE book SET publisher_id = 3 WHERE isbn = 'b00001'")  # from publisher 2 to 3
    pg.execute("DELETE FROM review WHERE book_isbn = 'b00005'")  # publisher 6's
    ok(operator.drain())

    if kind == "clickhouse":
        from pg_replication_tests.targets import ClickHouseTarget

        with ClickHouseTarget(tmp_path / "warehouse.chdb").open(read_only=True) as wh:
            rows = wh.fetchall('SELECT id, document FROM "public"."publisher_docs" FINAL')
    else:
        with duckdb.connect(str(duckdb_path), read_only=True) as conn:
            rows = conn.execute('SELECT id, document FROM "public"."publisher_docs"').fetchall()
    stored = {k: json.loads(d) for k, d in rows}
    assert stored == source_documents(pg)
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    monkeypatch.chdir(tmp_path)  # dagster.yaml's storage path is relative to where the CLI ran
    with dg.DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey(["public", "publisher_docs"]))
    assert event.asset_materialization.metadata["documents_recomputed"].value == 3


def test_the_document_asset_holds_the_source_pool_on_clickhouse(pg, write_config, tmp_path):
    """No locks in ClickHouse: a build waits for a drain in flight through the pool they share."""
    import dagster as dg

    from pg_replication.dagster.definitions import build_definitions

    pg.execute(SCHEMA)
    write_config({"tables": TABLES, "documents": [PUBLISHER_DOCS], "warehouse": {"kind": "clickhouse", "path": str(tmp_path / "wh.chdb")}})
    assert build_definitions().get_assets_def(dg.AssetKey(["public", "publisher_docs"])).op.pool == "postgres_source"


def test_the_component_takes_the_same_documents_section():
    from pg_replication.dagster.component import PgReplicationComponent

    component = PgReplicationComponent(tables=TABLES, documents=[PUBLISHER_DOCS])
    assert component.config.documents == parse_config({"tables": TABLES, "documents": [PUBLISHER_DOCS]}).documents
    with pytest.raises(ConfigError, match="documents.0.children.0.relationship"):
        PgReplicationComponent(tables=TABLES, documents=[{**PUBLISHER_DOCS, "children": [{"table": "public.book"}]}]).config
