"""The whole-population load without a snapshot (server/state.py ``ServingState.fill``, the
stores' ``bulk_read``, server/bulk_read.pyx), on SQLite and PostgreSQL (``store_url``).

A load in chunks of citizens gives exactly the state a per-citizen re-derivation
(``ServingState.rederive``, the write path's) gives every citizen, bit for bit: features,
scores, levels, reasons, flags, unpaid-default masks, adulthood, consents, audit subjects,
the citizen index and the card-token index; so do a load in one chunk, a load through the
generic reader (whole tables, as server/models.py's StoreSnapshot) and, on PostgreSQL, one
that takes its rows through psycopg instead of libpq directly. The store has corrected,
withdrawn and repaired records, scenario-tagged defaults, records of variables the model does
not score and of scenarios nobody knows, citizens without records and several cards each.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3

import numpy as np
import pytest

from kernel.columns import ScoreColumns
from kernel.score import Scorer
from server.keys import subject_of
from server.scenarios import load_scenarios
from server.state import AS_OF_DAY, N_CITIZENS, ServingState, citizen_hashes, citizen_key
from server.store import CitizenChunk, RecordIn, StoreBulkRead, open_store

AS_OF = 19_500
N = 61
UNSCORED = ("bike_unpaid", "not_a_variable")  # the model scores neither
AUDIT_KEY = bytes(range(7, 39))


def citizen_ids(n: int) -> list[str]:
    # Several lengths, and non-ASCII ids: the bulk path hashes the stored UTF-8 bytes.
    return [f"c-{i}" if i % 3 else f"市民-{i:05d}-ü" for i in range(n)]


def build_city(store, spec, seed: int = 5) -> dict:
    """A small city with everything a load must get right; returns what was written."""
    rng = np.random.default_rng(seed)
    ids = citizen_ids(N)
    # Birthdays around the 18th birthday on AS_OF, and plainly adult or not.
    birth = np.where(rng.random(N) < 0.5, AS_OF - 18 * 365 - rng.integers(-6, 7, N),
                     AS_OF - rng.integers(1_000, 30_000, N)).astype(np.int32)
    for cid, day in zip(ids, birth.tolist()):
        store.upsert_citizen(cid, day)
    for row in np.flatnonzero(rng.random(N) < 0.7).tolist():
        store.set_consent(ids[row], True)
    store.set_consent(ids[1], False)
    cards = {}
    for row in rng.choice(N, 40, replace=True).tolist():  # some citizens hold several cards
        token = hashlib.sha256(f"card-{len(cards)}".encode()).digest()[:16]
        store.register_card(token, ids[row])
        cards[token] = row
    names = [v.name for v in spec.variables] + list(UNSCORED)
    scenarios = ["metro_pay_later", "bus_pay_later", "parking_booking", "gym_booking", "no_such_scenario"]
    without = set(rng.choice(N, 8, replace=False).tolist()) | {N - 1}  # citizens with no records
    with_records = [r for r in range(N) if r not in without]
    n_records = 0
    for batch in range(6):  # batches interleave citizens, so a citizen's records are spread out
        records = []
        for _ in range(140):
            row = int(rng.choice(with_records))
            variable = names[int(rng.integers(len(names)))]
            day = int(AS_OF - rng.integers(-3, 2_200))  # a few dated after today
            value = float(rng.integers(1, 400)) / 7.0  # sums that round differently by order
            scenario = scenarios[int(rng.integers(len(scenarios)))] if rng.random() < 0.3 else None
            source = f"src{int(rng.integers(3))}"
            records.append(RecordIn(f"r-{n_records}", ids[row], variable, day, value, source, scenario))
            n_records += 1
        for source in sorted({r.source for r in records}):
            store.add_records([r for r in records if r.source == source], sent_by=source)
    # Corrections, withdrawals and repairs (the current view and the history differ).
    stored = [(f"src{s}", f"r-{i}") for i in range(n_records) for s in range(3)]
    changed = 0
    for i in rng.choice(n_records, 120, replace=False).tolist():
        for source, record_id in stored[3 * i: 3 * i + 3]:
            try:
                rec = store.get_record(source, record_id)
            except Exception:
                continue
            kind = changed % 3
            if kind == 0:
                store.correct_record(source, record_id, rec.day - 11, rec.value * 2 + 0.25, sent_by=source)
            else:
                store.set_record_status(source, record_id, "withdrawn" if kind == 1 else "repaired", sent_by=source)
            changed += 1
    return {"ids": ids, "birth": birth, "cards": cards, "without": without}


@pytest.fixture
def city_store(store_url, spec):
    store = open_store(store_url)
    city = build_city(store, spec)
    yield store, city
    store.close()


def new_state(spec, n: int = N) -> ServingState:
    return ServingState.allocate(spec, n + 5, token_capacity=n + 5, audit_key=AUDIT_KEY)


def per_citizen(store, spec, scorer, scenarios) -> ServingState:
    """The reference: every citizen re-derived alone, as the write path does."""
    ref = new_state(spec)
    table = store.citizens()
    n = len(table.ids)
    ref.meta[N_CITIZENS] = n
    ref.meta[AS_OF_DAY] = AS_OF
    ref.birth_day[:n] = table.birth_day
    ref.consent[:n] = table.consent
    rows = scorer.bind(ref.features, ref.adult, ref.columns)
    for row in range(n):
        ref.rederive(row, store, scenarios, rows)
    return ref


def derived(state: ServingState, n: int) -> dict[str, np.ndarray]:
    out = {name: getattr(state, name)[:n] for name in ("features", "adult", "consent", "birth_day", "defaults", "gate")}
    for name in ScoreColumns.DTYPES:
        out[f"col_{name}"] = getattr(state.columns, name)[:n]
    return out


def whole(state: ServingState) -> dict[str, np.ndarray]:
    """Every array of the state but the re-score times."""
    out = dict(state._arena.arrays)
    out.pop("computed_at")
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        # Bit for bit (NaN included: a minor's raw points).
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def test_a_chunked_load_is_a_per_citizen_rederivation_of_everyone(city_store, spec, calibration, monkeypatch):
    store, city = city_store
    scenarios = load_scenarios()
    scorer = Scorer(spec, calibration)
    chunked = new_state(spec)
    chunked.fill(store, scorer, scenarios, AS_OF, chunk_citizens=7)  # 9 chunks, the last short
    n = chunked.n_citizens
    assert n == N and chunked.as_of_day == AS_OF and chunked.ready

    ref = per_citizen(store, spec, scorer, scenarios)
    assert_same(derived(chunked, n), derived(ref, n))
    # Not a vacuous comparison: the city has features, defaults, both kinds of people.
    assert chunked.features[:n].any() and chunked.defaults[:n].any()
    assert 0 < chunked.adult[:n].sum() < n and 0 < chunked.consent[:n].sum() < n
    assert not chunked.features[sorted(city["without"])].any()
    load = chunked.last_load
    assert load["citizens"] == n and load["records"] == len(store.active_records()) - load["skipped_records"]
    assert load["skipped_records"] > 0  # the unscored variables

    # Who is who: pseudonyms, the citizen index, the card tokens, positions.
    for row, cid in enumerate(city["ids"]):
        assert int(chunked.subject[row]) == subject_of(AUDIT_KEY, cid)
        assert chunked.citizens.get(citizen_key(cid)) == row
    assert chunked.citizens.get(citizen_key("nobody")) == -1
    assert len(chunked.tokens) == len(city["cards"])
    for token, row in city["cards"].items():
        assert chunked.tokens.get(token) == row
    assert chunked.position == store.high_water_mark()
    assert (chunked.row_position[:n] == chunked.position).all()
    assert (chunked.consent_position[:n] == chunked.position).all()

    # One chunk, and the generic reader over whole tables: the same state, every array.
    one = new_state(spec)
    one.fill(store, scorer, scenarios, AS_OF, chunk_citizens=10**6)
    assert_same(whole(one), whole(chunked))
    generic = new_state(spec)
    generic.fill(Duck(store), scorer, scenarios, AS_OF, chunk_citizens=16)
    assert_same(whole(generic), whole(chunked))
    if store.name.startswith("postgresql"):
        # Rows through psycopg, one at a time (libpq's functions not found): the same.
        import server.store_pg

        monkeypatch.setattr(server.store_pg, "_libpq_addresses", lambda: None)
        rows = new_state(spec)
        rows.fill(store, scorer, scenarios, AS_OF, chunk_citizens=5)
        assert_same(whole(rows), whole(chunked))


class Duck:
    """The store's read methods and nothing else (as server/models.py's StoreSnapshot)."""

    def __init__(self, store):
        self._store = store

    def __getattr__(self, name):
        if name not in ("high_water_mark", "citizens", "cards", "active_records"):
            raise AttributeError(name)
        return getattr(self._store, name)


def test_the_bulk_reader_gives_the_active_records_as_codes(city_store, spec):
    store, _ = city_store
    names = [v.name for v in spec.variables]
    bits = {"metro_pay_later": 1, "bus_pay_later": 0, "parking_booking": 3, "gym_booking": -1}
    with store.bulk_read() as reader:
        # The records come in parts (ranges of ids), read one after another here.
        assert reader.parts == 2
        blocks = [b for part in range(reader.parts) for b in reader.records(names, bits, block_rows=50, part=part)]
        skipped = reader.skipped
        cards = list(reader.cards(block_rows=7))
        citizens = list(reader.citizens(13))
        assert reader.n_citizens == N and reader.position == store.high_water_mark()
    assert all(0 < len(b) <= 50 for b in blocks) and all(0 < len(c) <= 7 for c in cards)
    got = [np.concatenate([getattr(b, f) for b in blocks]) for f in ("citizen_row", "variable", "day", "value", "scenario")]
    active = store.active_records()
    index = {name: i for i, name in enumerate(names)}
    keep = np.array([v in index for v in active.variable])
    assert skipped == int((~keep).sum()) > 0
    assert got[0].tolist() == active.citizen_row[keep].tolist()
    assert got[1].tolist() == [index[v] for v in active.variable[keep]]
    assert got[2].tolist() == active.day[keep].tolist()
    assert got[3].tobytes() == active.value[keep].tobytes()
    assert got[4].tolist() == [bits.get(s, -1) for s in active.scenario[keep]]
    table = store.cards()
    assert np.concatenate([c.tokens for c in cards]).tobytes() == table.tokens.tobytes()
    assert np.concatenate([c.citizen_row for c in cards]).tolist() == table.citizen_row.tolist()
    everyone = store.citizens()
    assert [c.first_row for c in citizens] == list(range(0, N, 13))
    assert [i for c in citizens for i in c.id_list()] == everyone.ids
    assert np.concatenate([c.birth_day for c in citizens]).tolist() == everyone.birth_day.tolist()
    assert np.concatenate([c.consent for c in citizens]).tolist() == everyone.consent.tolist()
    # The generic reader agrees.
    with StoreBulkRead(store) as generic:
        again = list(generic.records(names, bits, block_rows=50))
    assert [np.concatenate([getattr(b, f) for b in again]).tobytes() for f in ("citizen_row", "variable", "day", "value", "scenario")] \
        == [g.tobytes() for g in got]


def test_buckets_keep_each_citizens_records_in_the_store_order(city_store, spec):
    # Feature sums are floating point: a citizen's records must be added in the order the
    # per-citizen path reads them (insertion order), whichever blocks and buckets they crossed.
    from server.state import _RecordBuckets

    store, _ = city_store
    names = [v.name for v in spec.variables]
    with store.bulk_read() as reader:
        buckets = _RecordBuckets(reader, names, {"metro_pay_later": 1}, reader.n_citizens, 7, block_rows=13)
        buckets.join()
        for j, (lo, hi) in enumerate(buckets.chunks()):
            block = buckets.take(j)
            assert ((block.citizen_row >= lo) & (block.citizen_row < hi)).all()
            for row in range(lo, hi):
                mine = block.citizen_row == row
                theirs = store.active_records(citizen_row=row)
                scored = np.array([v in names for v in theirs.variable], bool)
                assert block.variable[mine].tolist() == [names.index(v) for v in theirs.variable[scored]]
                assert block.day[mine].tolist() == theirs.day[scored].tolist()
                assert block.value[mine].tobytes() == theirs.value[scored].tobytes()


def test_a_store_of_only_unscored_variables_and_an_empty_store_load(store, spec):
    scenarios = load_scenarios()
    empty = new_state(spec)
    empty.fill(store, Scorer(spec), scenarios, AS_OF, chunk_citizens=2)
    assert empty.n_citizens == 0 and empty.ready and empty.last_load["records"] == 0
    for i in range(5):
        store.upsert_citizen(f"c-{i}", 7_000)
    store.add_records([RecordIn(f"r-{i}", f"c-{i % 5}", UNSCORED[i % 2], AS_OF - i, 1.0, "bikes", "metro_pay_later")
                       for i in range(12)], sent_by="bikes")
    state = new_state(spec)
    state.fill(store, Scorer(spec), scenarios, AS_OF, chunk_citizens=2)
    assert state.n_citizens == 5 and state.ready
    assert not state.features[:5].any() and not state.defaults[:5].any()
    assert state.last_load["records"] == 0 and state.last_load["skipped_records"] == 12


def test_a_copy_the_server_ends_with_an_error_fails_the_load_with_its_message(pg_url, spec, monkeypatch):
    # PostgreSQL ends a COPY early with an error (here a division by zero at citizen 3):
    # the load fails with the server's message, never with a half-read city, and the store
    # (its own connection untouched) serves on; the next load works.
    import server.store_pg
    from server.store import StoreError

    store = open_store(pg_url)
    for i in range(6):
        store.upsert_citizen(f"c-{i}", 7_000)
    store.add_records([RecordIn(f"r-{i}", f"c-{i % 6}", "traffic_violations", AS_OF - i, 1.0, "police")
                       for i in range(30)], sent_by="police")
    good = server.store_pg._BULK_ACTIVE
    monkeypatch.setattr(server.store_pg, "_BULK_ACTIVE", good.replace("value::float8", "(1 / (citizen_row - 3))::float8"))
    for addresses in (server.store_pg._libpq_addresses, lambda: None):  # libpq directly, then psycopg
        monkeypatch.setattr(server.store_pg, "_libpq_addresses", addresses)
        state = new_state(spec, 6)
        with pytest.raises(StoreError, match="division by zero"):
            state.fill(store, Scorer(spec), load_scenarios(), AS_OF, chunk_citizens=2)
        assert not state.ready
    assert store.counts()["citizens"] == 6
    monkeypatch.setattr(server.store_pg, "_BULK_ACTIVE", good)
    state = new_state(spec, 6)
    state.fill(store, Scorer(spec), load_scenarios(), AS_OF, chunk_citizens=2)
    assert state.ready and state.last_load["records"] == 30
    store.close()


@pytest.mark.parametrize("sha_extensions", [True, False], ids=["sha-ni", "portable"])
def test_citizen_hashes_are_citizen_key_and_subject_of(sha_extensions):
    # In C (server/bulk_read.pyx): BLAKE2b and HMAC-SHA256, on the CPU's SHA extensions where
    # it has them and in portable C: the very values of citizen_key and subject_of.
    from server import bulk_read

    rng = np.random.default_rng(9)
    alphabet = list("abcxyz-_.0123456789ü市民")
    ids = citizen_ids(300) + ["", "x" * 55, "y" * 56, "z" * 64, "w" * 128, "v" * 129, "u" * 1000] + [
        "".join(rng.choice(alphabet, int(rng.integers(0, 300)))) for _ in range(300)]
    chunk = CitizenChunk.of(0, ids, np.zeros(len(ids), np.int32), np.zeros(len(ids), np.uint8))
    had = bulk_read.sha_extensions()
    try:
        bulk_read.sha_extensions(sha_extensions)
        for key in (b"", b"k" * 16, bytes(range(55)), bytes(range(64)), bytes(range(65)), os.urandom(200)):
            keys, subjects = citizen_hashes(key, chunk.ids, chunk.id_offsets)
            assert keys.shape == (len(ids), 16) and subjects.dtype == np.uint64
            assert [k.tobytes() for k in keys] == [citizen_key(i) for i in ids]
            assert subjects.tolist() == [subject_of(key, i) for i in ids]
    finally:
        bulk_read.sha_extensions(had)


def test_the_bulk_reader_uses_the_one_sqlite_library_of_the_process():
    # Two copies of SQLite in one process break each other's locks (server/bulk_read.pyx).
    from server import bulk_read

    assert bulk_read.sqlite_version() == sqlite3.sqlite_version
    with open("/proc/self/maps") as maps:
        mapped = {line.split(None, 5)[5].strip() for line in maps if "libsqlite3" in line}
    assert len({os.path.realpath(p) for p in mapped}) == 1, mapped
