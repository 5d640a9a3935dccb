"""What only the PostgreSQL store has (server/store_pg.py); the contract both stores share is
tested on both in tests/test_store.py. The server: ``pg_server`` in tests/conftest.py
(QJ_TEST_PG_DSN, or a throwaway one)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import rec, with_citizens
from server import store as store_mod
from server.store import (
    SCHEMA_VERSION, Conflict, NotFound, SQLiteStore, StoreError, StoreRejected, StoreUnavailable, WrongState,
    open_store,
)

REPO = Path(__file__).resolve().parents[1]


def raw(url: str, query: str, params: tuple = ()) -> list[tuple]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        cur = db.execute(query, params)
        return cur.fetchall() if cur.description else []


def run_python(code: str, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True, **kw)


# --------------------------------------------------------------------------------------------
# PostgreSQL only

_UPSERT_MANY = """
    import sys
    from server.store_pg import PostgresStore
    url, me = sys.argv[1], sys.argv[2]
    store = PostgresStore(url)
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    out = []
    for i in range(150):
        for cid in (f"{me}-{i}", f"shared-{i}"):
            row, created = store.upsert_citizen(cid, 7000 + i)
            out.append(f"{cid} {row} {int(created)}")
        if i % 50 == 25:  # a bulk upsert in the middle, overlapping the other process's too
            store.upsert_citizens_bulk([f"bulk-{me}-{j}" for j in range(40)] + [f"shared-bulk-{j}" for j in range(40)],
                                       [1] * 80)
    store.close()
    print("\\n".join(out), flush=True)
"""


def test_processes_upserting_citizens_at_once_get_dense_unique_rows(pg_url):
    open_store(pg_url).close()  # migrated before the race: the race is about rows
    procs = [run_python(_UPSERT_MANY, pg_url, name) for name in ("p", "q", "r")]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 3
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0]
    finally:
        for p in procs:
            p.kill()
    with open_store(pg_url) as s:
        table = s.citizens()
        stored = raw(pg_url, "SELECT citizen_row, citizen_id FROM citizens ORDER BY citizen_row")
    n = 3 * 150 + 150 + 3 * 40 + 40  # own, shared, own bulk (the same 40 three times), shared bulk
    assert len(table) == n and len(set(table.ids)) == n
    assert [row for row, _ in stored] == list(range(n))  # dense, 0..n-1
    seen: dict[str, set[int]] = {}
    for out in outputs:
        mine = [line.split() for line in out.splitlines()]
        for cid, row, _ in mine:
            seen.setdefault(cid, set()).add(int(row))
        created = [int(row) for _, row, c in mine if c == "1"]
        assert created == sorted(created)  # each process's new rows in its own creation order
    assert all(len(rows) == 1 for rows in seen.values())  # every process saw the same row
    assert all(table.ids[next(iter(rows))] == cid for cid, rows in seen.items())
    created_shared = sum(int(line.split()[2]) for out in outputs for line in out.splitlines()
                         if line.startswith("shared-") and not line.startswith("shared-bulk"))
    assert created_shared == 150  # one process created each shared id; the others found it


_OPEN = """
    import sys
    from server.store_pg import PostgresStore
    print("ready", flush=True)
    sys.stdin.readline()
    PostgresStore(sys.argv[1]).close()
"""


def test_processes_opening_an_empty_database_at_once_migrate_it_once(pg_url):
    procs = [run_python(_OPEN, pg_url, stderr=subprocess.PIPE) for _ in range(4)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 4
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        errors = [p.communicate(timeout=60)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, errors
    finally:
        for p in procs:
            p.kill()
    assert raw(pg_url, "SELECT version FROM schema_version ORDER BY version") == [
        (v,) for v in range(1, SCHEMA_VERSION + 1)]
    with open_store(pg_url) as s:
        assert s.high_water_mark() == 1  # one migration, one change


def test_schema_matches_sqlite(pg_url, tmp_path):
    from server import store_pg

    assert store_pg.SCHEMA_VERSION == store_mod.SCHEMA_VERSION
    open_store(pg_url).close()
    with SQLiteStore(tmp_path / "qj.db") as lite:
        tables = [t for (t,) in lite._db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        lite_columns = {t: [c[1] for c in lite._db.execute(f"PRAGMA table_info({t})")] for t in tables}
    pg_columns = {}
    for table, column in raw(pg_url, "SELECT table_name, column_name FROM information_schema.columns"
                                     " WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"):
        pg_columns.setdefault(table, []).append(column)
    assert pg_columns == lite_columns


def test_session_keeps_commits_durable_and_bounds_lock_waits(pg_url):
    name = urlsplit(pg_url).path.strip("/")
    raw(pg_url, f'ALTER DATABASE "{name}" SET synchronous_commit = off')  # a careless default
    with open_store(pg_url) as s:
        setting = lambda what: s._db.execute(f"SHOW {what}").fetchone()[0]  # noqa: E731
        assert setting("synchronous_commit") == "on"  # raised back for this store's session
        assert setting("lock_timeout") == "10s"  # like SQLite's busy_timeout
        assert setting("fsync") == "on"


def test_a_writer_waits_for_another_then_gives_up_with_store_error(pg_url, monkeypatch):
    import psycopg

    from server import store_pg

    monkeypatch.setattr(store_pg, "_LOCK_TIMEOUT", "300ms")
    with open_store(pg_url) as s, psycopg.connect(pg_url) as other:
        s.upsert_citizen("c-0", 7_000)
        # Another writer, in the middle of a write.
        other.execute("SELECT pg_advisory_xact_lock(%s)", (store_pg._WRITERS_LOCK,))
        start = time.perf_counter()
        with pytest.raises(StoreError, match="lock timeout"):
            s.add_records([rec("r-1")], "police")
        assert time.perf_counter() - start >= 0.25
        other.rollback()
        assert s.add_records([rec("r-1")], "police") == ["accepted"]  # the same store goes on
        assert s.citizen_row("c-0") == 0


def test_a_lost_connection_is_a_store_error_and_the_next_call_reconnects(pg_url, caplog):
    with open_store(pg_url) as s:
        with_citizens(s)
        pid = s._db.info.backend_pid
        assert raw(pg_url, "SELECT pg_terminate_backend(%s)", (pid,)) == [(True,)]
        with pytest.raises(StoreUnavailable) as e:  # retryable, unlike the errors below
            s.add_records([rec("r-1")], "police")
        assert not isinstance(e.value, (NotFound, Conflict, WrongState, StoreRejected))
        assert s.add_records([rec("r-1")], "police") == ["accepted"]  # a new connection
        assert s._db.info.backend_pid != pid
        assert s.counts()["records"] == 1
    assert "reconnecting" in caplog.text


def test_a_value_postgresql_cannot_hold_is_store_rejected(pg_url):
    # SQLite keeps a NUL inside a text; PostgreSQL refuses it (a DataError): for good, so
    # StoreRejected (a client must not retry it as it would a lost connection).
    with open_store(pg_url) as s:
        with_citizens(s)
        mark = s.high_water_mark()
        with pytest.raises(StoreRejected, match="add_records: the store refused the write .*NUL") as e:
            s.add_records([rec("r-1"), rec("r-\x002")], "police")
        assert not isinstance(e.value, StoreUnavailable)
        assert s.high_water_mark() == mark and s.counts()["records"] == 0
        assert s.add_records([rec("r-1")], "police") == ["accepted"]  # the same connection goes on


def test_messages_never_carry_the_password(pg_server):
    # Nothing listens on port 1 of the loopback address: the connection is refused at once.
    with pytest.raises(StoreError, match="cannot connect") as e:
        open_store("postgresql://qj:s3cret-pw@127.0.0.1:1/qj")
    assert "s3cret" not in str(e.value)
    from server.store_pg import _describe

    assert _describe("postgresql://qj:s3cret-pw@db:5433/qj?sslmode=require") == "postgresql://qj@db:5433/qj"
    assert _describe("host=db user=qj password=s3cret-pw dbname=qj") == "postgresql://qj@db/qj"
    with pytest.raises(ValueError, match="not a PostgreSQL connection string") as bad:
        open_store("postgresql://qj:s3cret-pw@[::1/qj")
    assert "s3cret" not in str(bad.value)


def test_open_store_routes_postgresql_urls(pg_url):
    from server.store_pg import PostgresStore

    with open_store(pg_url) as s:
        assert isinstance(s, PostgresStore)
    with open_store(pg_url.replace("postgresql://", "postgresql+psycopg://", 1)) as s:
        assert isinstance(s, PostgresStore) and s.counts()["citizens"] == 0
