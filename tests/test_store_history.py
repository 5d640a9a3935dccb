"""Record identity, record history and the change log (server/store.py), on both stores.

A record is identified by (source, record_id); a resend is a duplicate only with the content
it was first stored with; corrections and withdrawals add versions; every write appends one
entry to the change log, and ``active_records(as_of=)``/``consent_at`` read the data back as
it stood at any position of it. Also: integrity errors are StoreRejected, and the schema
migration from version 1 keeps the data. Fixtures: tests/conftest.py (``store``, ``store_url``,
``sql``: SQLite and PostgreSQL)."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import rec, run_sql, with_citizens
from server.store import (
    ACCEPTED, DUPLICATE, RECORD_CONTENT, SCHEMA_VERSION, Conflict, NotFound, RecordConflict, RecordIn, RecordVersion,
    SQLiteStore, StoreRejected, StoreUnavailable, WrongState, open_store,
)


def active(store, citizen_row=None, as_of=None) -> list[tuple]:
    a = store.active_records(citizen_row, as_of=as_of)
    return list(zip(a.record_id.tolist(), a.citizen_row.tolist(), a.day.tolist(), a.value.tolist()))


# Identity -------------------------------------------------------------------------------------


def test_the_same_id_from_two_sources_is_two_records(store):
    with_citizens(store)
    # The incident: the police had used the court's id, and the court's record was dropped.
    assert store.add_records([rec("2026-0042", "c-0", source="police")], "police") == [ACCEPTED]
    assert store.add_records([rec("2026-0042", "c-1", "court_listed_dishonest_debtor", source="court")],
                             "court") == [ACCEPTED]
    police, court = store.get_record("police", "2026-0042"), store.get_record("court", "2026-0042")
    assert (police.citizen_id, police.variable, police.source) == ("c-0", "traffic_violations", "police")
    assert (court.citizen_id, court.variable, court.source) == ("c-1", "court_listed_dishonest_debtor", "court")
    assert store.counts()["records"] == 2 and len(store.active_records()) == 2
    # Each is changed through its own source only.
    store.set_record_status("court", "2026-0042", "withdrawn", "court")
    assert store.get_record("police", "2026-0042").status == "active"
    assert active(store) == [("2026-0042", 0, 19_000, 1.0)]


def test_a_resend_with_the_same_content_is_a_duplicate_and_changes_nothing(store):
    with_citizens(store)
    first = rec("r-1", "c-1", "bike_unpaid", 19_001, 2.5, "metro", "bike")
    assert store.add_records([first], "metro") == [ACCEPTED]
    mark, stored = store.high_water_mark(), store.get_record("metro", "r-1")
    # Sent again, by anyone, even with the value as an int: the same content.
    again = rec("r-1", "c-1", "bike_unpaid", np.int64(19_001), 2.5, "metro", "bike")
    assert store.add_records([again, first], "metro_retry") == [DUPLICATE, DUPLICATE]
    assert store.add_records([rec("r-1", "c-1", "bike_unpaid", 19_001, 2.5, "metro", "bike")], "metro") == [DUPLICATE]
    assert store.high_water_mark() == mark and store.get_record("metro", "r-1") == stored
    assert len(store.record_history("metro", "r-1")) == 1


CHANGED = {"citizen_id": "c-2", "variable": "volunteer_hours", "day": 19_002, "value": 1.5, "scenario": "bike"}


@pytest.mark.parametrize("field", RECORD_CONTENT)
def test_a_resend_with_other_content_is_a_conflict_naming_the_field(store, field):
    with_citizens(store)
    store.add_records([rec("r-1", "c-1")], "police")
    mark = store.high_water_mark()
    other = rec("r-1", "c-1").__dict__ | {field: CHANGED[field]}
    with pytest.raises(RecordConflict) as e:
        store.add_records([rec("r-0"), RecordIn(**other), rec("r-2")], "police")
    assert isinstance(e.value, Conflict)  # ALREADY_EXISTS to callers, as any conflict
    assert (e.value.field, e.value.source, e.value.record_id) == (field, "police", "r-1")
    assert str(e.value) == f"record 'r-1' from source 'police' is already stored with another {field}"
    # Nothing of the batch was written.
    assert store.high_water_mark() == mark and store.counts()["records"] == 1
    with pytest.raises(NotFound):
        store.get_record("police", "r-0")


def test_the_first_differing_field_is_named(store):
    with_citizens(store)
    store.add_records([rec("r-1")], "police")
    with pytest.raises(RecordConflict) as e:  # variable, value and scenario differ
        store.add_records([rec("r-1", variable="volunteer_hours", value=3.0, scenario="bike")], "police")
    assert RECORD_CONTENT == ("citizen_id", "variable", "day", "value", "scenario")
    assert e.value.field == "variable"
    with pytest.raises(RecordConflict) as e:
        store.add_records([rec("r-1", value=3.0, scenario="bike")], "police")
    assert e.value.field == "value"


def test_a_conflict_inside_one_batch_writes_nothing(store):
    with_citizens(store)
    with pytest.raises(RecordConflict, match="another value") as e:
        store.add_records([rec("r-1"), rec("r-1", value=2.0)], "police")
    assert e.value.field == "value"
    assert store.counts()["records"] == 0


def test_a_retried_ingest_after_a_correction_is_still_a_duplicate(store):
    # The content compared is version 1's, as first received: a source that retries an
    # ingest it had sent before correcting it gets DUPLICATE, not a conflict...
    with_citizens(store)
    store.add_records([rec("r-1", day=19_000, value=1.0)], "police")
    store.correct_record("police", "r-1", 18_900, 4.0, "police")
    mark = store.high_water_mark()
    assert store.add_records([rec("r-1", day=19_000, value=1.0)], "police") == [DUPLICATE]
    assert store.high_water_mark() == mark and store.get_record("police", "r-1").value == 4.0
    # ... and the corrected content is not what was first sent.
    with pytest.raises(RecordConflict, match="another day"):
        store.add_records([rec("r-1", day=18_900, value=4.0)], "police")


def test_bad_input_is_named(store):
    with_citizens(store)
    for sent_by in ("", None, 3):
        with pytest.raises(ValueError, match="sent_by"):
            store.add_records([rec("r-1")], sent_by)
    with pytest.raises(ValueError, match="record 'r-1': value nan is not a finite number"):
        store.add_records([rec("r-1", value=float("nan"))], "police")
    with pytest.raises(ValueError, match="record 'r-1': day 4294967296 is out of range"):
        store.add_records([rec("r-1", day=2**32)], "police")
    store.add_records([rec("r-1")], "police")
    with pytest.raises(ValueError, match="not a finite number"):
        store.correct_record("police", "r-1", 19_000, float("inf"), "police")
    with pytest.raises(ValueError, match="sent_by"):
        store.set_record_status("police", "r-1", "withdrawn", "")
    for as_of in (-1, "3", 1.5, True):
        with pytest.raises(ValueError, match="as_of must be a change log position"):
            store.active_records(as_of=as_of)
    assert store.counts()["records"] == 1 and len(store.record_history("police", "r-1")) == 1


# History --------------------------------------------------------------------------------------


def test_history_keeps_every_version_with_when_who_and_where(store):
    with_citizens(store)
    writes = [
        lambda: store.add_records([rec("r-1", "c-2", day=19_000, value=1.0)], "police_gateway"),
        lambda: store.correct_record("police", "r-1", 18_990, 2.0, "police_desk"),
        lambda: store.correct_record("police", "r-1", 18_990, 2.0, "police_desk"),  # the same: no-op
        lambda: store.set_record_status("police", "r-1", "withdrawn", "appeals_office"),
        lambda: store.set_record_status("police", "r-1", "withdrawn", "appeals_office"),  # no-op
        lambda: store.set_record_status("police", "r-1", "repaired", "credit_repair"),
    ]
    positions, times = [], []
    for write in writes:
        before = time.time()
        write()
        positions.append(store.last_position())
        times.append((before, time.time()))
    with pytest.raises(WrongState):  # a repaired record is not corrected: no version either
        store.correct_record("police", "r-1", 1, 1.0, "police_desk")

    history = store.record_history("police", "r-1")
    assert all(isinstance(v, RecordVersion) for v in history)
    assert [(v.version, v.day, v.value, v.status, v.sent_by) for v in history] == [
        (1, 19_000, 1.0, "active", "police_gateway"),
        (2, 18_990, 2.0, "active", "police_desk"),
        (3, 18_990, 2.0, "withdrawn", "appeals_office"),
        (4, 18_990, 2.0, "repaired", "credit_repair"),
    ]
    effective = [0, 1, 3, 5]  # the writes that made a version
    assert [v.position for v in history] == [positions[i] for i in effective]
    assert positions[2] == positions[1] and positions[4] == positions[3]  # no-ops: no new position
    for v, i in zip(history, effective):
        assert times[i][0] <= v.received_at <= times[i][1]
    now = store.get_record("police", "r-1")
    assert (now.version, now.day, now.value, now.status, now.received_at, now.sent_by, now.position) == (
        4, 18_990, 2.0, "repaired", history[-1].received_at, "credit_repair", history[-1].position)
    assert (now.citizen_id, now.citizen_row, now.variable) == ("c-2", 2, "traffic_violations")


def test_the_change_log_has_one_entry_per_write(store, sql):
    with_citizens(store, 2)  # entries 2 and 3 (1: the migration that created the store)
    store.set_consent("c-1", True)
    store.add_records([rec("r-1", "c-1"), rec("r-2", "c-1")], "police")
    store.add_records([rec("r-3", "c-0"), rec("r-4", "c-1")], "police")  # two citizens
    store.correct_record("police", "r-1", 18_000, 2.0, "police")
    store.upsert_citizens_bulk(["c-2", "c-3"], np.array([1, 2]))
    store.set_consents_bulk(np.array([2, 3]), True)
    store.register_cards_bulk(np.arange(32, dtype=np.uint8).reshape(2, 16), np.array([2, 3]))
    store.add_records_bulk(np.array([2, 3, 2]), ["v"] * 3, np.array([1, 2, 3]), np.ones(3), "seed",
                           ["s-1", "s-2", "s-3"])
    log = sql("SELECT seq, kind, citizen_row, at FROM changes ORDER BY seq")
    assert [entry[:3] for entry in log] == [
        (1, "migrate", None), (2, "upsert_citizen", 0), (3, "upsert_citizen", 1), (4, "set_consent", 1),
        (5, "add_records", 1), (6, "add_records", None), (7, "correct_record", 1),
        (8, "upsert_citizens_bulk", None), (9, "set_consents_bulk", None), (10, "register_cards_bulk", None),
        (11, "add_records_bulk", None),  # seeding: one entry per bulk call, not per row
    ]
    assert all(a[3] <= b[3] <= time.time() for a, b in zip(log, log[1:]))
    assert store.high_water_mark() == store.last_position() == 11
    # Seeded records have their version 1, written at the bulk call's position.
    assert store.record_history("seed", "s-2") == [RecordVersion(1, 2, 1.0, "active", log[-1][3], "seed", 11)]
    assert sql("SELECT COUNT(*) FROM record_versions") == [(4 + 1 + 3,)]  # records, a correction, seeds
    assert [e.position for e in store.consent_history("c-1")] == [4]
    assert [e.position for e in store.consent_history("c-3")] == [9]


def test_last_position_is_per_store_object(store_url):
    with open_store(store_url) as a, open_store(store_url) as b:
        assert b.last_position() == 0  # a migrated the store; b has written nothing
        a.upsert_citizen("c-0", 7_000)
        assert b.last_position() == 0 and a.last_position() == b.high_water_mark()
        b.set_consent("c-0", True)
        assert b.last_position() == a.last_position() + 1 == a.high_water_mark()
        with pytest.raises(NotFound):  # a write that fails leaves it alone
            b.set_consent("ghost", True)
        assert b.last_position() == b.high_water_mark()


def test_the_current_view_is_one_scan_of_records(tmp_path):
    # The start-up load reads the whole city: it must not turn into a history query.
    with SQLiteStore(tmp_path / "qj.db") as s:
        with_citizens(s)
        s.add_records([rec("r-1"), rec("r-2", "c-1")], "police")
        s.correct_record("police", "r-1", 18_000, 2.0, "police")
        statements: list[str] = []
        s._db.set_trace_callback(statements.append)
        try:
            assert active(s) == [("r-1", 0, 18_000, 2.0), ("r-2", 1, 19_000, 1.0)]
        finally:
            s._db.set_trace_callback(None)
    selects = [q for q in statements if q.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 1 and "FROM records r WHERE" in selects[0] and "record_versions" not in selects[0]


# As of a position -----------------------------------------------------------------------------


def test_active_records_and_consent_as_of_every_position(store):
    with_citizens(store)
    s = store
    script = [
        lambda: s.add_records([rec("a", "c-0"), rec("b", "c-1", day=19_001)], "police"),
        lambda: s.set_consent("c-0", True),
        lambda: s.add_records([rec("a", "c-2", source="court", value=5.0)], "court"),
        lambda: s.correct_record("police", "a", 18_000, 2.0, "police"),
        lambda: s.set_record_status("police", "b", "withdrawn", "police"),
        lambda: s.upsert_citizen("c-3", 9_000),
        lambda: s.add_records([rec("c", "c-3")], "police"),
        lambda: s.set_consent("c-0", False),
        lambda: s.correct_record("police", "a", 18_001, 3.0, "police"),
        lambda: s.set_record_status("police", "b", "repaired", "police"),
        lambda: s.set_consents_bulk(np.array([1, 3]), True),
        lambda: s.set_record_status("court", "a", "withdrawn", "court"),
    ]
    seen = {s.high_water_mark(): (active(s), {r: s.citizens().consent.tolist()[r] for r in range(3)})}
    for write in script:
        write()
        n = len(s.citizens())
        seen[s.last_position()] = (active(s), {r: s.citizens().consent.tolist()[r] for r in range(n)})
    assert sorted(seen) == list(range(min(seen), min(seen) + len(script) + 1))  # every position
    for position, (records, consent) in seen.items():
        assert active(s, as_of=position) == records, position
        for row in range(4):
            assert active(s, row, as_of=position) == [r for r in records if r[1] == row]
            assert s.consent_at(row, position) == bool(consent.get(row, 0)), (row, position)
    assert active(s, as_of=0) == [] and active(s, as_of=10**9) == active(s)
    assert active(s, as_of=next(iter(seen)) + 1) == [("a", 0, 19_000, 1.0), ("b", 1, 19_001, 1.0)]
    with pytest.raises(NotFound, match="citizen row 9 not found"):
        s.consent_at(9, 1)


# The property: no sequence of corrections and withdrawals loses a version ----------------------

_example = itertools.count()

OPS = st.lists(st.tuples(
    st.sampled_from(["add", "correct", "correct", "withdraw", "repair", "resend"]),
    st.integers(0, 2),  # which of three records
    st.sampled_from([18_000, 18_001]),  # a day
    st.sampled_from([0.0, 1.0, 2.5]),  # a value
), min_size=1, max_size=16)
STATUS = {"withdraw": "withdrawn", "repair": "repaired"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_no_sequence_of_corrections_and_withdrawals_loses_a_version(store, ops):
    """Random corrections, withdrawals, repairs and resends on three records (the first one
    added up front, the others when an "add" or "resend" comes)."""
    # One store for all examples: each example has its own citizen and source, so sees only
    # its own records (and the whole-city reads are filtered to its citizen).
    k = next(_example)
    citizen, source = f"p-{k}", f"src-{k}"
    row, _ = store.upsert_citizen(citizen, 7_000)
    start = store.high_water_mark()
    model: dict[str, list[tuple]] = {}  # record id -> versions (day, value, status, sent_by, position)
    order: list[str] = []  # insertion order
    positions = [start]
    for n, (op, which, day, value) in enumerate([("add", 0, 18_000, 1.0), *ops]):
        rid, by = f"r{which}", f"caller-{n % 3}"
        versions = model.get(rid)
        before = store.high_water_mark()
        if op in ("add", "resend"):
            content = RecordIn(rid, citizen, "traffic_violations", day, value, source)
            if versions is None:
                assert store.add_records([content], by) == [ACCEPTED]
                model[rid] = [(day, value, "active", by, store.last_position())]
                order.append(rid)
            elif (day, value) == model[rid][0][:2]:
                assert store.add_records([content], by) == [DUPLICATE]
            else:
                with pytest.raises(RecordConflict):
                    store.add_records([content], by)
        elif versions is None:  # not added yet
            with pytest.raises(NotFound):
                if op == "correct":
                    store.correct_record(source, rid, day, value, by)
                else:
                    store.set_record_status(source, rid, STATUS[op], by)
        elif op == "correct":
            last = versions[-1]
            if last[2] != "active":
                with pytest.raises(WrongState):
                    store.correct_record(source, rid, day, value, by)
            else:
                store.correct_record(source, rid, day, value, by)
                if (day, value) != last[:2]:
                    versions.append((day, value, "active", by, store.last_position()))
        else:
            status = STATUS[op]
            store.set_record_status(source, rid, status, by)
            if versions[-1][2] != status:
                versions.append((*versions[-1][:2], status, by, store.last_position()))
        after = store.high_water_mark()
        if after != before:  # an effective write: one new position, after every earlier one
            assert after == before + 1 == store.last_position() and after > positions[-1]
            positions.append(after)

    for rid, versions in model.items():
        history = store.record_history(source, rid)
        assert [(v.day, v.value, v.status, v.sent_by, v.position) for v in history] == versions
        assert [v.version for v in history] == list(range(1, len(versions) + 1))
    assert sum(len(v) for v in model.values()) == len(positions) - 1  # one version per position

    def replay(p: int) -> list[tuple]:
        out = []
        for rid in order:
            upto = [v for v in model[rid] if v[4] <= p]
            if upto and upto[-1][2] == "active":
                out.append((rid, row, upto[-1][0], upto[-1][1]))
        return out

    for p in range(start, positions[-1] + 1):
        assert active(store, row, as_of=p) == replay(p)
        assert [r for r in active(store, as_of=p) if r[1] == row] == replay(p)
    assert active(store, row) == replay(positions[-1])


# Errors ---------------------------------------------------------------------------------------


def test_an_integrity_error_is_store_rejected_and_writes_nothing(store):
    with_citizens(store)
    store.add_records([rec("r-1")], "police")
    mark, position = store.high_water_mark(), store.last_position()
    # A NOT NULL the database enforces (the variable): refused for good, not "unavailable",
    # which clients would retry forever.
    with pytest.raises(StoreRejected, match=r"add_records: the store refused the write \(.*variable") as e:
        store.add_records([rec("r-2"), rec("r-3", variable=None)], "police")
    assert not isinstance(e.value, StoreUnavailable)
    with pytest.raises(StoreRejected, match=r"add_records_bulk: the store refused the write \(.*variable"):
        # Was reported as "a record_id in the batch is already stored" (any IntegrityError).
        store.add_records_bulk(np.array([0, 1]), ["v", None], np.array([1, 2]), np.ones(2), "seed", ["s-1", "s-2"])
    assert store.high_water_mark() == mark and store.last_position() == position
    assert store.counts()["records"] == 1
    assert store.add_records([rec("r-2")], "police") == [ACCEPTED]  # the store goes on


# Migration from schema version 1 --------------------------------------------------------------


def _old_schema(url: str) -> None:
    """A version-1 database, as the released code made it, with data in every table."""
    if url.startswith("sqlite:///"):
        from server.store import MIGRATIONS

        ddl = ["CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"]
    else:
        from server.store_pg import MIGRATIONS

        ddl = ["CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"]
    for statement in ddl + MIGRATIONS[0]:
        run_sql(url, statement)
    for statement, params in [
        ("INSERT INTO schema_version (version, applied_at) VALUES (1, 0)", ()),
        ("INSERT INTO citizens (citizen_row, citizen_id, birth_day, consent) VALUES"
         " (0, 'c-0', 7000, 1), (1, 'c-1', 7001, 0)", ()),
        ("INSERT INTO consent_history (citizen_row, granted, at) VALUES (0, 1, 100.0), (1, 1, 101.0),"
         " (1, 0, 102.0)", ()),
        ("INSERT INTO cards (token, citizen_row) VALUES (%s, 0)", (bytes(range(16)),)),
        ("INSERT INTO records (record_id, citizen_row, variable, day, value, source, scenario, status) VALUES"
         " ('r-1', 0, 'traffic_violations', 19000, 1.0, 'police', NULL, 'active'),"
         " ('r-2', 1, 'bike_unpaid', 19001, 2.5, 'metro', 'bike', 'withdrawn'),"
         " ('r-3', 1, 'volunteer_hours', 19002, 4.0, 'volunteers', NULL, 'active')", ()),
        ("UPDATE changes SET n = 41", ()),  # the old high-water mark
    ]:
        run_sql(url, statement, params)


def test_a_version_1_database_is_migrated_with_its_data(store_url, sql):
    if store_url.startswith("sqlite:///"):
        from pathlib import Path

        Path(store_url.removeprefix("sqlite:///")).parent.mkdir(parents=True)
    _old_schema(store_url)
    before = time.time()
    with open_store(store_url) as s:
        assert sql("SELECT version FROM schema_version ORDER BY version") == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
        # The mark goes on from the old one: the old count is entry 41, the migration 42.
        assert s.high_water_mark() == s.last_position() == 42
        assert [e[:3] for e in sql("SELECT seq, kind, citizen_row FROM changes ORDER BY seq")] == [
            (41, "before_log", None), (42, "migrate", None)]
        # Every record is version 1 of itself: received at an unknown time (0), sent by its
        # source, at the position standing for everything before the log.
        r2 = s.get_record("metro", "r-2")
        assert (r2.citizen_id, r2.variable, r2.day, r2.value, r2.scenario, r2.status) == (
            "c-1", "bike_unpaid", 19_001, 2.5, "bike", "withdrawn")
        assert (r2.version, r2.received_at, r2.sent_by, r2.position) == (1, 0.0, "metro", 41)
        assert s.record_history("police", "r-1") == [RecordVersion(1, 19_000, 1.0, "active", 0.0, "police", 41)]
        assert s.record_history("metro", "r-2") == [RecordVersion(1, 19_001, 2.5, "withdrawn", 0.0, "metro", 41)]
        assert active(s) == [("r-1", 0, 19_000, 1.0), ("r-3", 1, 19_002, 4.0)]  # order kept
        assert active(s, as_of=41) == active(s) and active(s, as_of=40) == []
        assert s.counts() == dict(citizens=2, cards=1, records=3, active_records=2, consents_granted=1)
        assert [(e.granted, e.at, e.position) for e in s.consent_history("c-1")] == [
            (True, 101.0, 41), (False, 102.0, 41)]
        assert s.consent_at(0, 41) and not s.consent_at(1, 41) and not s.consent_at(0, 40)
        # The new rules apply to the old records.
        assert s.add_records([rec("r-1")], "police") == [DUPLICATE]
        with pytest.raises(RecordConflict, match="another value"):
            s.add_records([rec("r-1", value=2.0)], "police")
        assert s.add_records([rec("r-1", "c-1", source="court")], "court") == [ACCEPTED]
        fixed = s.correct_record("police", "r-1", 18_000, 3.0, "police_desk")
        assert (fixed.version, fixed.position, fixed.sent_by) == (2, 44, "police_desk")
        assert before <= fixed.received_at <= time.time()
        assert [v.version for v in s.record_history("police", "r-1")] == [1, 2]
        assert active(s, as_of=42) == [("r-1", 0, 19_000, 1.0), ("r-3", 1, 19_002, 4.0)]
        s.set_consent("c-1", True)
        assert s.consent_at(1, 45) and not s.consent_at(1, 44)
    with open_store(store_url) as again:  # migrated once
        assert again.high_water_mark() == 45 and again.last_position() == 0
