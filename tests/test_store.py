"""The durable store's contract (server/store.py), on both stores: schema, semantics, durability.

Tests taking ``store`` or ``store_url`` (tests/conftest.py) run twice: ``[sqlite]`` on a new
file, ``[postgres]`` on a new database (QJ_TEST_PG_DSN; see ``pg_server``). The rest are about
SQLite itself; tests/test_store_pg.py has PostgreSQL's own, tests/test_store_history.py record
identity, versions, the change log and the schema migration."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import rec, with_citizens
from server.store import (
    ACCEPTED, DUPLICATE, SCHEMA_VERSION, Conflict, NotFound, RecordConflict, SQLiteStore, StoreError, WrongState,
    open_store,
)

REPO = Path(__file__).resolve().parents[1]
TOKEN_A = bytes(range(16))
TOKEN_B = bytes(range(100, 116))


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "nested" / "qj.db"  # the parent does not exist yet: the store creates it


@pytest.fixture
def sqlite_store(db_path):
    s = SQLiteStore(db_path)
    yield s
    s.close()


# Schema and connection ---------------------------------------------------------------------


def test_migrate_is_idempotent(store_url, sql):
    with open_store(store_url) as first:
        first.upsert_citizen("c-0", 7_000)
        mark = first.high_water_mark()
        first.migrate()  # nothing to do: no change, no new version row
        assert first.high_water_mark() == mark
    with open_store(store_url) as second:  # opening migrates again
        assert second.citizens().ids == ["c-0"]
        assert second.high_water_mark() == mark
    versions = sql("SELECT version FROM schema_version ORDER BY version")
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]


def test_newer_schema_is_refused(store_url, sql):
    open_store(store_url).close()
    sql("INSERT INTO schema_version (version, applied_at) VALUES (99, 0)")
    with pytest.raises(StoreError, match="schema version 99"):
        open_store(store_url)


def test_wal_and_durability_pragmas(sqlite_store, db_path):
    # journal_mode is a property of the file: any other connection sees it.
    assert sqlite3.connect(db_path).execute("PRAGMA journal_mode").fetchone() == ("wal",)
    # The others belong to the store's own connection.
    pragma = lambda name: sqlite_store._db.execute(f"PRAGMA {name}").fetchone()[0]  # noqa: E731
    assert pragma("synchronous") == 2  # FULL
    assert pragma("busy_timeout") == 10_000
    assert pragma("foreign_keys") == 1


def test_closed_store_refuses_and_close_is_idempotent(store_url):
    s = open_store(store_url)
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.counts()


# Citizens and consent ----------------------------------------------------------------------


def test_citizens_get_dense_rows_and_upsert_keeps_the_row(store):
    assert [store.upsert_citizen(c, 7_000) for c in ("b", "a", "c")] == [(0, True), (1, True), (2, True)]
    assert store.upsert_citizen("a", 8_000) == (1, False)
    assert store.upsert_citizen("d", 9_000) == (3, True)
    table = store.citizens()
    assert table.ids == ["b", "a", "c", "d"]
    assert table.birth_day.dtype == np.int32 and table.birth_day.tolist() == [7_000, 8_000, 7_000, 9_000]
    assert store.citizen_row("c") == 2
    with pytest.raises(NotFound, match="'nobody' not found"):
        store.citizen_row("nobody")


def test_consent_grant_and_revoke(store):
    with_citizens(store)
    table = store.citizens()
    assert table.consent.dtype == np.uint8 and table.consent.tolist() == [0, 0, 0]
    assert store.set_consent("c-1", True) == 1
    assert store.citizens().consent.tolist() == [0, 1, 0]
    assert store.counts()["consents_granted"] == 1
    store.set_consent("c-1", False)
    assert store.citizens().consent.tolist() == [0, 0, 0]
    assert [e.granted for e in store.consent_history("c-1")] == [True, False]
    assert store.consent_history("c-0") == []
    history = store.consent_history("c-1")
    assert history[0].at <= history[1].at and history[0].position < history[1].position
    with pytest.raises(NotFound):
        store.set_consent("nobody", True)


# Cards ---------------------------------------------------------------------------------------


def test_register_card_created_same_conflict_and_bad_length(store):
    with_citizens(store)
    assert store.register_card(TOKEN_A, "c-1") == (1, True)
    assert store.register_card(TOKEN_A, "c-1") == (1, False)
    with pytest.raises(Conflict, match="card token 00010203… is bound to another citizen") as e:
        store.register_card(TOKEN_A, "c-2")
    assert TOKEN_A.hex() not in str(e.value)  # never the whole token
    for bad in (TOKEN_A[:15], TOKEN_A + b"\0", "0123456789abcdef"):
        with pytest.raises(ValueError, match="16 bytes"):
            store.register_card(bad, "c-1")
    with pytest.raises(NotFound):
        store.register_card(TOKEN_B, "nobody")
    store.register_card(TOKEN_B, "c-0")
    cards = store.cards()
    assert cards.tokens.dtype == np.uint8 and cards.tokens.shape == (2, 16)
    assert [bytes(t) for t in cards.tokens] == [TOKEN_A, TOKEN_B]
    assert cards.citizen_row.tolist() == [1, 0]


# Records -------------------------------------------------------------------------------------


def test_add_records_resend_is_a_duplicate_other_content_a_conflict(store):
    with_citizens(store)
    assert store.add_records([rec("r-1"), rec("r-2", "c-1")], "police") == [ACCEPTED, ACCEPTED]
    mark = store.high_water_mark()
    # A resend of the same content is a duplicate and changes nothing.
    assert store.add_records([rec("r-1")], "police") == [DUPLICATE]
    assert store.high_water_mark() == mark
    # The same id with other content is refused; the rest of the batch is not written.
    with pytest.raises(RecordConflict, match="record 'r-1' from source 'police' is already stored with another"
                                             " citizen_id"):
        store.add_records([rec("r-9"), rec("r-1", "c-2", value=9.0, day=1)], "police")
    assert store.high_water_mark() == mark and store.counts()["records"] == 2
    got = store.get_record("police", "r-1")
    assert (got.citizen_id, got.citizen_row, got.day, got.value, got.status) == ("c-0", 0, 19_000, 1.0, "active")
    # A duplicate inside one batch, too.
    assert store.add_records([rec("r-3"), rec("r-3")], "police") == [ACCEPTED, DUPLICATE]
    assert store.counts()["records"] == 3


def test_unknown_citizen_rolls_back_the_whole_batch(store):
    with_citizens(store)
    mark = store.high_water_mark()
    with pytest.raises(NotFound, match="citizen 'ghost' not found"):
        store.add_records([rec("r-1"), rec("r-2", "ghost"), rec("r-3")], "police")
    with pytest.raises(NotFound, match="no record 'r-1' from source 'police'"):
        store.get_record("police", "r-1")
    assert store.counts()["records"] == 0
    assert store.high_water_mark() == mark


def test_get_record_round_trips_every_field(store):
    with_citizens(store)
    before = time.time()
    store.add_records([rec("r-1", "c-2", "bike_unpaid", 19_001, 2.5, "metro", "bike")], "metro_gateway")
    got = store.get_record("metro", "r-1")
    assert got.record_id == "r-1" and got.citizen_row == 2 and got.citizen_id == "c-2"
    assert (got.variable, got.day, got.value, got.source, got.scenario, got.status) == (
        "bike_unpaid", 19_001, 2.5, "metro", "bike", "active")
    assert (got.version, got.sent_by, got.position) == (1, "metro_gateway", store.high_water_mark())
    assert before <= got.received_at <= time.time()


def test_correct_withdraw_and_repair_change_active_records(store):
    with_citizens(store)
    store.add_records([rec("r-1"), rec("r-2"), rec("r-3")], "police")
    fixed = store.correct_record("police", "r-1", day=18_500, value=3.0, sent_by="police")
    assert (fixed.day, fixed.value, fixed.status, fixed.version) == (18_500, 3.0, "active", 2)
    assert store.get_record("police", "r-1") == fixed
    active = store.active_records()
    assert active.day[active.record_id == "r-1"].tolist() == [18_500]
    assert active.value[active.record_id == "r-1"].tolist() == [3.0]

    assert store.set_record_status("police", "r-2", "withdrawn", "police").status == "withdrawn"
    assert store.set_record_status("police", "r-3", "repaired", "police").status == "repaired"
    assert store.active_records().record_id.tolist() == ["r-1"]
    assert store.counts()["active_records"] == 1 and store.counts()["records"] == 3
    assert store.get_record("police", "r-2").status == "withdrawn"  # still stored, just not counted

    with pytest.raises(WrongState, match="record 'r-2' from source 'police' is withdrawn"):
        store.correct_record("police", "r-2", day=1, value=1.0, sent_by="police")
    assert store.get_record("police", "r-2").day == 19_000
    with pytest.raises(ValueError, match="status"):
        store.set_record_status("police", "r-1", "active", "police")
    for call in (lambda: store.correct_record("police", "nope", 1, 1.0, "police"),
                 lambda: store.set_record_status("police", "nope", "withdrawn", "police"),
                 lambda: store.get_record("police", "nope"),
                 lambda: store.record_history("police", "nope"),
                 # Another source's record is, to this source, not there: the same message.
                 lambda: store.correct_record("court", "r-1", 1, 1.0, "court"),
                 lambda: store.set_record_status("court", "r-1", "withdrawn", "court"),
                 lambda: store.get_record("court", "r-1")):
        with pytest.raises(NotFound, match=r"^no record '(nope|r-1)' from source '(police|court)'$"):
            call()


def test_active_records_columns_and_per_citizen(store):
    with_citizens(store)
    store.add_records([
        rec("r-1", "c-0"), rec("r-2", "c-1", "volunteer_hours", 19_002, 4.0, scenario="library"),
        rec("r-3", "c-0", day=19_003), rec("r-4", "c-2"),
    ], "police")
    everything = store.active_records()
    assert everything.record_id.tolist() == ["r-1", "r-2", "r-3", "r-4"]  # insertion order
    assert everything.citizen_row.dtype == np.int64 and everything.citizen_row.tolist() == [0, 1, 0, 2]
    assert everything.day.dtype == np.int32 and everything.value.dtype == np.float32
    assert everything.variable.tolist() == ["traffic_violations", "volunteer_hours",
                                            "traffic_violations", "traffic_violations"]
    assert everything.scenario.tolist() == [None, "library", None, None]

    one = store.active_records(citizen_row=0)
    assert one.record_id.tolist() == ["r-1", "r-3"] and one.day.tolist() == [19_000, 19_003]
    assert everything.for_citizen(0).record_id.tolist() == ["r-1", "r-3"]
    assert len(store.active_records(citizen_row=99)) == 0


def test_empty_store_tables(store):
    assert len(store.citizens()) == 0 and store.citizens().birth_day.dtype == np.int32
    assert store.cards().tokens.shape == (0, 16)
    empty = store.active_records()
    assert len(empty) == 0 and empty.citizen_row.dtype == np.int64
    assert store.counts() == dict(citizens=0, cards=0, records=0, active_records=0, consents_granted=0)


# Bulk (seeding) paths ------------------------------------------------------------------------


def test_bulk_paths(store):
    n = 2_000
    store.upsert_citizen("c-5", 1)  # already there: the bulk upsert updates it, rows stay dense
    store.upsert_citizens_bulk([f"c-{i}" for i in range(n)], np.arange(n) + 7_000)
    table = store.citizens()
    assert len(table) == n
    assert table.ids[:7] == ["c-5", "c-0", "c-1", "c-2", "c-3", "c-4", "c-6"]
    assert table.birth_day[0] == 7_005

    store.set_consents_bulk(np.arange(0, n, 2), True)
    assert store.citizens().consent.tolist() == [1, 0] * (n // 2)
    assert len(store.consent_history("c-5")) == 1

    tokens = np.random.default_rng(1).integers(0, 256, (n, 16), dtype=np.uint8)
    store.register_cards_bulk(tokens, np.arange(n)[::-1])
    cards = store.cards()
    assert np.array_equal(cards.tokens, tokens) and cards.citizen_row.tolist() == list(range(n))[::-1]
    assert store.register_card(tokens[0].tobytes(), table.ids[n - 1]) == (n - 1, False)

    m = 10_000
    rows = np.arange(m) % n
    variables = np.array(["traffic_violations", "volunteer_hours"], dtype=object)[np.arange(m) % 2]
    store.add_records_bulk(rows, variables, np.full(m, 19_000), np.arange(m) / 4, "seed",
                           [f"s-{i}" for i in range(m)])
    active = store.active_records()
    assert len(active) == m and active.citizen_row.tolist() == rows.tolist()
    assert active.value.tolist() == (np.arange(m) / 4).astype(np.float32).tolist()
    assert active.variable[:3].tolist() == ["traffic_violations", "volunteer_hours", "traffic_violations"]
    assert store.get_record("seed", "s-3").source == "seed" and store.get_record("seed", "s-3").sent_by == "seed"
    assert store.counts() == dict(citizens=n, cards=n, records=m, active_records=m,
                                  consents_granted=n // 2)


def test_bulk_errors_write_nothing(store):
    with_citizens(store)
    before, mark = store.counts(), store.high_water_mark()
    with pytest.raises(NotFound, match="rows"):
        store.set_consents_bulk(np.array([0, 3]), True)
    with pytest.raises(NotFound):
        store.register_cards_bulk(np.zeros((1, 16), np.uint8), np.array([-1]))
    with pytest.raises(Conflict):  # the second token repeats the first
        store.register_cards_bulk(np.zeros((2, 16), np.uint8), np.array([0, 1]))
    with pytest.raises(ValueError):
        store.register_cards_bulk(np.zeros((1, 15), np.uint8), np.array([0]))
    with pytest.raises(Conflict, match="already stored for source 'seed'"):
        store.add_records_bulk(np.array([0, 1]), ["v", "v"], np.array([1, 2]), np.array([1.0, 1.0]),
                               "seed", ["dup", "dup"])
    with pytest.raises(ValueError, match="finite"):
        store.add_records_bulk(np.array([0]), ["v"], np.array([1]), np.array([np.nan]), "seed", ["x"])
    with pytest.raises(NotFound):
        store.add_records_bulk(np.array([0, 3]), ["v", "v"], np.array([1, 2]), np.array([1.0, 1.0]),
                               "seed", ["x", "y"])
    assert store.counts() == before and store.high_water_mark() == mark
    assert store.citizens().consent.tolist() == [0, 0, 0]


# High-water mark -----------------------------------------------------------------------------


def test_high_water_mark_increases_on_every_write_kind(store):
    writes = [
        lambda: store.upsert_citizen("c-0", 7_000),
        lambda: store.upsert_citizen("c-0", 7_001),  # an update
        lambda: store.upsert_citizens_bulk(["c-1", "c-2"], np.array([1, 2])),
        lambda: store.set_consent("c-0", True),
        lambda: store.set_consent("c-0", False),
        lambda: store.set_consents_bulk(np.array([1, 2]), True),
        lambda: store.register_card(TOKEN_A, "c-0"),
        lambda: store.register_cards_bulk(np.ones((1, 16), np.uint8), np.array([1])),
        lambda: store.add_records([rec("r-1")], "police"),
        lambda: store.add_records_bulk(np.array([1]), ["v"], np.array([1]), np.array([1.0]), "s", ["r-2"]),
        lambda: store.correct_record("police", "r-1", 18_000, 2.0, "police"),
        lambda: store.set_record_status("police", "r-1", "withdrawn", "police"),
        lambda: store.set_record_status("police", "r-1", "repaired", "police"),
    ]
    marks = [store.high_water_mark()]
    for write in writes:
        write()
        marks.append(store.high_water_mark())
        assert store.last_position() == marks[-1]  # the write this object just made
    # One change log entry per write: positions 1, 2, 3 … without gaps.
    assert marks == list(range(marks[0], marks[0] + len(writes) + 1)), marks
    # Calls that change nothing leave it alone (a snapshot stays current).
    for no_op in (lambda: store.upsert_citizen("c-0", 7_001), lambda: store.register_card(TOKEN_A, "c-0"),
                  lambda: store.add_records([rec("r-1")], "police"),
                  lambda: store.set_record_status("police", "r-1", "repaired", "police")):
        no_op()
        assert store.high_water_mark() == marks[-1] == store.last_position()


# Durability and sharing between connections --------------------------------------------------


def test_everything_survives_close_and_reopen(store_url):
    with open_store(store_url) as s:
        with_citizens(s)
        s.set_consent("c-1", True)
        s.register_card(TOKEN_A, "c-2")
        s.add_records([rec("r-1"), rec("r-2", "c-1")], "police")
        s.set_record_status("police", "r-2", "repaired", "police")
        counts, mark = s.counts(), s.high_water_mark()
    with open_store(store_url) as again:
        assert again.counts() == counts and again.high_water_mark() == mark
        assert again.citizens().consent.tolist() == [0, 1, 0]
        assert bytes(again.cards().tokens[0]) == TOKEN_A
        assert again.active_records().record_id.tolist() == ["r-1"]
        assert again.get_record("police", "r-2").status == "repaired"
        assert [v.status for v in again.record_history("police", "r-2")] == ["active", "repaired"]
        assert again.last_position() == 0  # no write through this object yet


def test_a_write_through_one_store_is_seen_by_another_open_one(store_url):
    with open_store(store_url) as a, open_store(store_url) as b:
        assert b.counts()["citizens"] == 0  # b has read before a writes
        mark = b.high_water_mark()
        a.upsert_citizen("c-0", 7_000)
        a.add_records([rec("r-1")], "police")
        assert b.citizen_row("c-0") == 0
        assert b.active_records(0).record_id.tolist() == ["r-1"]
        assert b.high_water_mark() > mark
        assert b.add_records([rec("r-1")], "police") == [DUPLICATE]  # b's writes see a's too
        b.set_record_status("police", "r-1", "withdrawn", "police")
        assert b.last_position() == b.high_water_mark() == a.last_position() + 1
        assert len(a.active_records()) == 0


def test_concurrent_writers_wait_for_each_other(store_url):
    # Two connections (as two worker processes would have), each used from several threads:
    # the store's write lock (SQLite: the file lock plus busy_timeout; PostgreSQL: an advisory
    # lock) serialises them; nobody gets "database is locked".
    with open_store(store_url) as a, open_store(store_url) as b:
        a.upsert_citizen("c-0", 7_000)

        def ingest(args):
            s, k = args
            return s.add_records([rec(f"r-{k}-{j}") for j in range(5)], "police")

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(ingest, [((a, b)[k % 2], k) for k in range(80)]))
        assert all(r == [ACCEPTED] * 5 for r in results)
        assert a.counts()["records"] == b.counts()["records"] == 400
        # One change per write, in commit order, without gaps or repeats across both writers.
        assert a.high_water_mark() == 1 + 1 + 80  # the migration, the citizen, the batches


_INGEST_AND_DIE = textwrap.dedent("""
    import os, sys, time
    from server.store import RecordIn, open_store
    store = open_store(sys.argv[1])
    store.upsert_citizen("c-0", 7000)
    assert store.add_records([RecordIn("r-acked", "c-0", "traffic_violations", 19000, 1.0, "police", None)],
                             "police") == ["accepted"]
    print("acked", flush=True)
    if sys.argv[2] == "exit":
        os._exit(0)  # no close, no checkpoint, no atexit
    time.sleep(60)  # wait to be killed
""")


@pytest.mark.parametrize("death", ["exit", "sigkill"])
def test_an_acknowledged_record_survives_the_process_dying(store_url, death):
    # Process death, not a power cut: the latter is what synchronous=FULL (SQLite) and
    # synchronous_commit (PostgreSQL) are for. This checks that the ack comes after the commit.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _INGEST_AND_DIE, store_url, death],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "acked"
        if death == "sigkill":
            proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == (0 if death == "exit" else -signal.SIGKILL)
    finally:
        proc.kill()
        proc.stdout.close()
    with open_store(store_url) as reopened:
        assert reopened.get_record("police", "r-acked").citizen_id == "c-0"
        assert reopened.active_records().record_id.tolist() == ["r-acked"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_store_is_not_usable_across_fork(store, store_url):
    store.upsert_citizen("c-0", 7_000)
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code, never return into pytest
        code = 1
        try:
            try:
                store.counts()
            except StoreError as e:
                if "after fork" in str(e):
                    code = 2
            store.close()  # must not close the parent's connection
            if code == 2:
                with open_store(store_url) as own:  # the right way: open after fork
                    code = 0 if own.citizen_row("c-0") == 0 else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.add_records([rec("r-1")], "police") == [ACCEPTED]  # the parent's store still works


# Metrics hook and URLs -----------------------------------------------------------------------


def test_on_write_is_called_after_each_committed_write(store_url):
    calls = []
    seen_by_other = []

    def hook(op, seconds):
        calls.append((op, seconds))
        with open_store(store_url) as other:  # committed before the hook runs
            seen_by_other.append(other.counts()["records"])

    with open_store(store_url, on_write=hook) as s:
        calls.clear(), seen_by_other.clear()  # the migration at open was a write too
        s.upsert_citizen("c-0", 7_000)
        s.add_records([rec("r-1")], "police")
        with pytest.raises(NotFound):
            s.add_records([rec("r-2", "ghost")], "police")  # rolled back: no call
    assert [op for op, _ in calls] == ["upsert_citizen", "add_records"]
    assert all(isinstance(t, float) and 0 <= t < 5 for _, t in calls)
    assert seen_by_other == [0, 1]


def test_a_failing_hook_does_not_fail_a_committed_write(store_url, caplog):
    def broken(op, seconds):
        raise RuntimeError("metrics down")

    with open_store(store_url, on_write=broken) as s:
        assert s.upsert_citizen("c-0", 7_000) == (0, True)
        assert s.citizen_row("c-0") == 0
    assert "on_write hook failed" in caplog.text


def test_open_store_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:///rel/a.db") as s:
        assert isinstance(s, SQLiteStore)
    assert (tmp_path / "rel" / "a.db").exists()
    with open_store(f"sqlite:///{tmp_path}/abs/b.db"):  # an absolute path: four slashes
        pass
    assert (tmp_path / "abs" / "b.db").exists()
    with open_store(tmp_path / "plain.db"), open_store("plain2.db"):
        pass
    assert (tmp_path / "plain.db").exists() and (tmp_path / "plain2.db").exists()
    # postgresql:// is PostgresStore (tests/test_store_pg.py); nothing listens on port 1.
    with pytest.raises(StoreError, match="cannot connect"):
        open_store("postgresql://qj@127.0.0.1:1/qj")
    with pytest.raises(ValueError, match="mysql"):
        open_store("mysql://x")


def test_threads_share_one_store(store):
    with_citizens(store, 4)

    def work(k):
        store.add_records([rec(f"t-{k}", f"c-{k % 4}")], "police")
        store.set_consent(f"c-{k % 4}", k % 2 == 0)
        return len(store.active_records(k % 4))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(200)))
    assert store.counts()["records"] == 200
    assert [len(store.active_records(r)) for r in range(4)] == [50] * 4
    assert sum(len(store.consent_history(f"c-{r}")) for r in range(4)) == 200
