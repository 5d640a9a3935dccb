"""Seeding at scale (server/seed.py, Store.bulk_load): the bulk-loaded store holds exactly the
generator's city, its change positions are right, its indexes are built, and a seed that is
interrupted (an exception, or SIGKILL) leaves the store empty, never half a city that a
server would serve as complete. Every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT, run_sql
from kernel.spec import load_spec
from kernel.synthetic import generate_city
from server import seed as seed_module
from server.app import citizen_id
from server.keys import Keys, card_token, synthetic_card_number
from server.seed import seed_store, synthetic_card_tokens
from server.store import Conflict, LoadChunk, NotFound, open_store

N, SEED, AS_OF, CHUNK, SLICE = 3000, 7, 20_000, 500, 2_000
KEYS = Keys(card=bytes(range(32)), audit=bytes(32))


@pytest.fixture(scope="module")
def spec():
    return load_spec()


@pytest.fixture(scope="module")
def city(spec):
    """What seeding must write: the generator's city (the same n, seed and chunk size) and
    the birth days and consents drawn as the service always drew them."""
    c = generate_city(spec, N, seed=SEED, chunk_size=CHUNK, as_of_day=AS_OF)
    rng = np.random.default_rng(SEED)
    birth = (AS_OF - (c.people.age.astype(np.int64) * 365 + rng.integers(0, 365, N))).astype(np.int32)
    consent = rng.random(N) < 0.85
    return c, birth, consent


def seed(store, spec, **kw):
    return seed_store(store, spec, N, SEED, KEYS, as_of=AS_OF, chunk_size=CHUNK, records_per_write=SLICE, **kw)


def schema(url: str) -> list[tuple]:
    """The store's indexes and constraints, as the database describes them."""
    if url.startswith("sqlite:///"):
        return run_sql(url, "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE type = 'index' ORDER BY name")
    return run_sql(url, "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()"
                        " ORDER BY indexname") + run_sql(
        url, "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), convalidated FROM pg_constraint"
             " WHERE connamespace = current_schema()::regnamespace ORDER BY conname")


def test_the_seeded_store_holds_the_generators_city(store_url, spec, city):
    c, birth, consent = city
    with open_store(store_url) as store:
        before, fresh = store.high_water_mark(), schema(store_url)
        seeded = seed(store, spec)
        assert (seeded.citizens, seeded.records) == (N, len(c.records))
        assert store.counts() == dict(citizens=N, cards=N, records=len(c.records), active_records=len(c.records),
                                      consents_granted=int(consent.sum()))
        position = store.high_water_mark()
        assert position == store.last_position() == before + 1  # the whole seed: one change

        table = store.citizens()
        assert table.ids == [citizen_id(i) for i in range(N)]
        assert np.array_equal(table.birth_day, birth) and np.array_equal(table.consent, consent.astype(np.uint8))
        cards = store.cards()  # registered in row order, one each
        tokens = b"".join(card_token(KEYS.card, synthetic_card_number(i)) for i in range(N))
        assert cards.tokens.tobytes() == tokens and cards.citizen_row.tolist() == list(range(N))
        assert [e.position for e in store.consent_history(citizen_id(int(np.flatnonzero(consent)[0])))] == [position]
        assert store.consent_history(citizen_id(int(np.flatnonzero(~consent)[0]))) == []
    assert run_sql(store_url, "SELECT COUNT(*), MIN(citizen_row), MAX(citizen_row), MIN(position), MAX(position),"
                              " SUM(granted) FROM consent_history") == [
        (consent.sum(), np.flatnonzero(consent)[0], np.flatnonzero(consent)[-1], position, position, consent.sum())]

    # Every record: its id, citizen, variable, day, value and source, and its version 1.
    names = [v.name for v in spec.variables]
    source_of = {v.name: v.source for v in spec.variables}
    got = run_sql(store_url, "SELECT r.record_id, r.citizen_row, r.variable, r.day, r.value, r.source, r.status,"
                             " r.version, v.version, v.day, v.value, v.status, v.sent_by, v.position, r.scenario"
                             " FROM records r JOIN record_versions v ON v.record = r.id ORDER BY r.id")
    expected = {f"syn-{SEED}-{k}": (row, names[var], day, float(value))
                for k, (row, var, day, value) in enumerate(zip(c.records.citizen.tolist(), c.records.variable.tolist(),
                                                                 c.records.day.tolist(), c.records.value.tolist()))}
    assert len(got) == len(expected) == run_sql(store_url, "SELECT COUNT(*) FROM record_versions")[0][0]
    for record_id, row, variable, day, value, source, status, version, v1, vday, vvalue, vstatus, sent_by, at, scen in got:
        assert (row, variable, day, value) == expected[record_id], record_id
        assert source == sent_by == source_of[variable] and scen is None
        assert (status, version, v1, vday, vvalue, vstatus, at) == ("active", 1, 1, day, value, "active", position)
    # In the generator's order (record k is the k-th inserted).
    assert [r[0] for r in got] == [f"syn-{SEED}-{k}" for k in range(len(expected))]
    assert schema(store_url) == fresh  # every index and constraint there, as the migrations made them


def test_positions_after_seeding(store_url, spec):
    from conftest import rec

    with open_store(store_url) as store:
        seed(store, spec)
        mark = store.high_water_mark()
        assert run_sql(store_url, "SELECT seq, kind, citizen_row FROM changes ORDER BY seq DESC LIMIT 1") == [
            (mark, "bulk_load", None)]
        now = store.active_records()
        as_of = store.active_records(as_of=mark)
        assert len(now) == len(as_of) > 0
        for f in ("record_id", "citizen_row", "variable", "day", "value"):
            assert np.array_equal(getattr(now, f), getattr(as_of, f)), f
        assert store.add_records([rec("after-seed", citizen_id(5))], "police") == ["accepted"]
        assert store.high_water_mark() == store.last_position() == mark + 1
        (source,), = run_sql(store_url, "SELECT source FROM records WHERE record_id = %s", (f"syn-{SEED}-0",))
        store.correct_record(source, f"syn-{SEED}-0", AS_OF - 1, 2.0, "ops")
        assert store.high_water_mark() == mark + 2
        assert len(store.active_records(as_of=mark)) == len(now)  # the seed as it stood
        assert store.upsert_citizen("late-comer", 7_000) == (N, True)  # rows stay dense after it
        assert store.register_card(b"\x01" * 16, "late-comer") == (N, True)


def test_a_seed_that_fails_half_way_leaves_the_store_empty(store_url, spec, monkeypatch):
    calls = []
    real_chunk = seed_module._chunk

    def failing_chunk(*args, **kw):
        calls.append(1)
        if len(calls) == 3:  # chunks 1 and 2 are generated, and at least 1 is written
            raise RuntimeError("injected: the generator fails mid-way")
        return real_chunk(*args, **kw)

    monkeypatch.setattr(seed_module, "_chunk", failing_chunk)
    with open_store(store_url) as store:
        before, last, fresh = store.high_water_mark(), store.last_position(), schema(store_url)
        with pytest.raises(RuntimeError, match="injected"):
            seed(store, spec)
        assert store.counts() == dict(citizens=0, cards=0, records=0, active_records=0, consents_granted=0)
        assert store.high_water_mark() == before and store.last_position() == last
        assert run_sql(store_url, "SELECT COUNT(*) FROM consent_history")[0][0] == 0
        assert run_sql(store_url, "SELECT COUNT(*) FROM record_versions")[0][0] == 0
        assert schema(store_url) == fresh
        monkeypatch.setattr(seed_module, "_chunk", real_chunk)
        assert seed(store, spec).citizens == N  # the next start seeds it from the beginning
        assert store.counts()["citizens"] == N and store.high_water_mark() == before + 1


_KILLED_CHILD = textwrap.dedent("""
    import os, signal, sys
    from kernel.spec import load_spec
    from server import store as S
    from server.keys import Keys
    from server.seed import seed_store

    real = S.BulkLoad.add_all
    def add_all(self, chunks, written=None):
        count = [0]
        def killed_after_two(chunk):
            written(chunk)
            count[0] += 1
            if count[0] == 2:  # two slices written in the open transaction: die
                print("written", self.citizens, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        return real(self, chunks, killed_after_two)
    S.BulkLoad.add_all = add_all
    store = S.open_store(sys.argv[1])
    seed_store(store, load_spec(), 3000, 7, Keys(bytes(range(32)), bytes(32)), as_of=20000, chunk_size=500,
               records_per_write=2000)
    print("not killed", flush=True)
""")


def test_a_killed_seed_leaves_the_store_empty(store_url, spec):
    with open_store(store_url) as store:
        before, fresh = store.high_water_mark(), schema(store_url)
    child = subprocess.run([sys.executable, "-c", _KILLED_CHILD, store_url], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert child.stdout.startswith("written"), child.stdout
    if store_url.startswith("sqlite:///"):  # killed inside the load's transaction: its journal is left
        path = store_url.removeprefix("sqlite:///")
        assert os.path.getsize(path + "-journal") > 0
    with open_store(store_url) as store:  # SQLite: the open rolls the journal back
        assert store.counts() == dict(citizens=0, cards=0, records=0, active_records=0, consents_granted=0)
        assert store.high_water_mark() == before
        assert schema(store_url) == fresh
        assert seed(store, spec).records > 0  # seeded again, from the beginning
        assert store.counts()["citizens"] == N and store.high_water_mark() == before + 1


def test_seeding_refuses_a_store_that_is_not_empty(store_url, spec):
    with open_store(store_url) as store:
        store.upsert_citizen("someone", 7_000)
        before = store.high_water_mark()
        with pytest.raises(Conflict, match="not empty"):
            seed(store, spec)
        assert store.counts()["citizens"] == 1 and store.high_water_mark() == before
        assert store.counts()["records"] == 0


def test_a_load_keeps_any_value_exactly_and_checks_its_rows(store_url):
    """The packed fast paths (SQLite) and binary COPY (PostgreSQL) store exactly the doubles
    given, whatever they are (in SQLite, runs of values the packed form cannot carry
    exactly, huge and tiny ones, fall back to rows bound one by one); rows must name
    citizens loaded so far."""
    values = [0.1, 1.0, 2.5, 1e300, 5e-324, -7.25, 3.0, 3.0, 12.800000190734863, 2.0**40, -1.5, 0.0]
    with open_store(store_url) as store:
        with pytest.raises(NotFound, match="rows must be in 0..0"):
            with store.bulk_load() as load:
                load.add(LoadChunk(citizen_ids=["a"], birth_days=[1], record_rows=[1], record_variables=[0],
                                   record_days=[1], record_values=[1.0], record_sources=[0], variables=["v"],
                                   sources=["s"]))  # row 1 does not exist
        assert store.counts()["citizens"] == 0
        with store.bulk_load() as load:
            load.add(LoadChunk(citizen_ids=["a", "b"], birth_days=[-3_000, 2**31 - 1], consent=[True, False],
                               card_tokens=np.arange(32, dtype=np.uint8).reshape(2, 16), card_rows=[1, 0]))
            n = len(values)
            load.add(LoadChunk(record_rows=np.arange(n) % 2, record_variables=np.repeat([0, 1], n // 2),
                               record_days=np.arange(n) - 5, record_values=values, record_sources=np.zeros(n, int),
                               variables=["v0", "v1"], sources=["src"], record_id_prefix="x-", record_id_first=98))
            load.add(LoadChunk())  # nothing: nothing happens
        got = run_sql(store_url, "SELECT record_id, citizen_row, variable, day, value FROM records ORDER BY id")
        assert [g[0] for g in got] == [f"x-{98 + k}" for k in range(n)]
        assert [g[4] for g in got] == values and [str(g[4]) for g in got] == [str(v) for v in values]
        assert [g[3] for g in got] == list(range(-5, n - 5)) and [g[1] for g in got] == [k % 2 for k in range(n)]
        assert store.citizens().birth_day.tolist() == [-3_000, 2**31 - 1]
        assert store.cards().citizen_row.tolist() == [1, 0] and store.citizens().consent.tolist() == [1, 0]
        assert store.high_water_mark() == store.last_position()
        with pytest.raises(Conflict):
            with store.bulk_load():
                pass


def test_an_empty_load_changes_nothing(store_url):
    with open_store(store_url) as store:
        before, last = store.high_water_mark(), store.last_position()
        with store.bulk_load():
            pass
        assert store.high_water_mark() == before and store.last_position() == last
        assert store.counts()["citizens"] == 0


def test_synthetic_card_tokens_are_the_keyed_tokens():
    for key in (bytes(range(32)), b"k" * 16, bytes(range(100))):  # a key longer than a block is hashed first
        tokens = synthetic_card_tokens(key, 99_998, 5)
        assert tokens.tobytes() == b"".join(card_token(key, synthetic_card_number(r)) for r in range(99_998, 100_003))


def test_seed_store_generates_with_the_default_chunk_size(spec, monkeypatch, tmp_path):
    """seed_store's defaults give the city of kernel.synthetic's default chunk size (the one
    generate_city used for the service's seed before, so the README's numbers hold)."""
    import kernel.synthetic

    seen = []
    real_chunks = seed_module._chunks
    monkeypatch.setattr(seed_module, "_chunks", lambda n, s, size: seen.append(size) or real_chunks(n, s, size))
    with open_store(tmp_path / "qj.db") as store:
        seed_store(store, spec, 10, 1, KEYS, as_of=AS_OF)
    assert seen == [kernel.synthetic.DEFAULT_CHUNK]


def test_a_load_beside_another_connection_stays_in_wal_mode(tmp_path, spec, city):
    """SQLite leaves WAL for the load only when it has the file to itself: with another
    connection open (a second store), it loads in WAL mode, as safely."""
    c, birth, _ = city
    url = f"sqlite:///{tmp_path}/qj.db"
    with open_store(url) as store, open_store(url) as other:
        seed(store, spec)
        assert other.counts()["records"] == len(c.records)
        assert np.array_equal(other.citizens().birth_day, birth)
        assert run_sql(url, "PRAGMA journal_mode") == [("wal",)]
        assert run_sql(url, "PRAGMA page_size") == [(4096,)]  # not changed: the file was shared
    with open_store(tmp_path / "alone.db") as store:
        seed(store, spec)
    assert run_sql(f"sqlite:///{tmp_path}/alone.db", "PRAGMA page_size") == [(16384,)]
    assert run_sql(f"sqlite:///{tmp_path}/alone.db", "PRAGMA journal_mode") == [("wal",)]
