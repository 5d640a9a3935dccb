"""Disputes (server/rights.py, proto/qianjiang/v1/rights.proto): a citizen disputes a record,
the record's source answers before a deadline, and an unanswered one suspends the record.

Three layers, each real: the store methods on SQLite and on PostgreSQL (``store``); the
service through the real client against a real server in this process, its rights clock
injected (``Rights.now``) where a deadline must pass; and ``qjscore serve --test-clock`` as a
real process, whose own maintenance loop suspends the record once its test clock is moved
past the deadline (on SQLite and on PostgreSQL).
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import grpc
import numpy as np
import pytest

from clients.client import QianjiangClient, QianjiangError, Record
from conftest import ROOT, SecureServer, Served, ServeProcess, rec, with_citizens
from qianjiang.v1 import rights_pb2
from server.rights import SYSTEM, RightsShared
from server.state import iso_of
from server.store import (
    AlreadyClosed, DisputeNotFound, DisputeOpen, NotFound, UnderReview, WrongState,
)

Dispute = rights_pb2.Dispute
DAY = 86_400


# --- the store, on SQLite and on PostgreSQL ---------------------------------------------------


def _file(store, dispute_id="dsp-1", record_id="r-1", citizen="c-0", at=100.0, due=200.0, source="police"):
    return store.file_dispute(dispute_id, source, record_id, citizen, "not mine", "citizen_app", at, due)


def test_store_a_dispute_suspended_at_its_deadline_then_confirmed(store):
    with_citizens(store)
    store.add_records([rec("r-1"), rec("r-2", variable="administrative_penalties")], sent_by="police")
    dispute, marks = _file(store)
    assert (dispute.state, dispute.record_status, dispute.citizen_id, dispute.variable) == ("open", "active", "c-0",
                                                                                             "traffic_violations")
    assert marks.open == (("traffic_violations", "open"),) and marks.position == store.last_position()
    filed_at = store.last_position()
    assert store.changes_since(filed_at - 1) == [(filed_at, "file_dispute", 0)]  # one change, its citizen's row

    assert store.due_disputes(199.0) == [] and store.due_disputes(200.0) == ["dsp-1"]
    assert store.suspend_dispute("dsp-1", 150.0, SYSTEM) is None  # not due yet: nothing
    dispute, record, marks = store.suspend_dispute("dsp-1", 250.0, SYSTEM)
    suspended_at = store.last_position()
    assert (dispute.state, dispute.suspended_at, record.status, record.version, record.sent_by) == (
        "suspended", 250.0, "suspended", 2, SYSTEM)
    assert marks.open == (("traffic_violations", "suspended"),)
    assert store.active_records(citizen_row=0).record_id.tolist() == ["r-2"]  # it stops counting
    assert store.suspend_dispute("dsp-1", 300.0, SYSTEM) is None and store.due_disputes(1e12) == []

    dispute, record, marks = store.answer_dispute("dsp-1", "police", "confirmed", None, None, "checked", "police", 400.0)
    assert (dispute.state, dispute.answered_by, dispute.answered_at, dispute.note) == ("confirmed", "police", 400.0,
                                                                                       "checked")
    assert (record.status, record.version, marks.open) == ("active", 3, ())
    assert store.active_records(citizen_row=0).record_id.tolist() == ["r-1", "r-2"]  # counts again
    # the history keeps every step, and the data as it stood at each position
    assert [(v.version, v.status, v.sent_by) for v in store.record_history("police", "r-1")] == [
        (1, "active", "police"), (2, "suspended", SYSTEM), (3, "active", "police")]
    assert store.active_records(citizen_row=0, as_of=suspended_at).record_id.tolist() == ["r-2"]
    assert store.active_records(citizen_row=0, as_of=suspended_at - 1).record_id.tolist() == ["r-1", "r-2"]
    with pytest.raises(AlreadyClosed, match="answered already"):
        store.answer_dispute("dsp-1", "police", "withdrawn", None, None, "again", "police", 500.0)


def test_store_answers_correct_and_withdraw(store):
    with_citizens(store)
    store.add_records([rec("r-1"), rec("r-2")], sent_by="police")
    _file(store, "dsp-1", "r-1")
    _file(store, "dsp-2", "r-2")
    dispute, record, marks = store.answer_dispute("dsp-1", "police", "corrected", 19_001, 2.0, "wrong day", "police", 300.0)
    assert (dispute.state, record.status, record.day, record.value, record.version) == ("corrected", "active", 19_001,
                                                                                        2.0, 2)
    assert marks.open == (("traffic_violations", "open"),)  # dsp-2 still open
    dispute, record, marks = store.answer_dispute("dsp-2", "police", "withdrawn", None, None, "our error", "police", 300.0)
    assert (dispute.state, record.status, marks.open) == ("withdrawn", "withdrawn", ())
    assert store.active_records(citizen_row=0).record_id.tolist() == ["r-1"]
    # a suspended record corrected: counts again, as corrected
    store.add_records([rec("r-3")], sent_by="police")
    _file(store, "dsp-3", "r-3", due=10.0)
    store.suspend_dispute("dsp-3", 20.0, SYSTEM)
    _, record, _ = store.answer_dispute("dsp-3", "police", "corrected", 18_990, 1.0, "older", "police", 30.0)
    assert (record.status, record.day, record.version) == ("active", 18_990, 3)


def test_store_refusals(store):
    with_citizens(store)
    store.add_records([rec("r-1"), rec("r-2"), rec("r-9", citizen_id="c-1")], sent_by="police")
    with pytest.raises(NotFound, match="no record 'r-0' from source 'police'"):
        _file(store, record_id="r-0")  # unknown
    with pytest.raises(NotFound, match="no record 'r-9' from source 'police'"):
        _file(store, record_id="r-9")  # another citizen's: the same answer
    with pytest.raises(NotFound):
        _file(store, source="court")  # another source's id space
    _file(store)
    with pytest.raises(DisputeOpen, match="open dispute already"):
        _file(store, "dsp-2")
    store.set_record_status("police", "r-2", "withdrawn", sent_by="police")
    with pytest.raises(WrongState, match="is withdrawn"):
        _file(store, "dsp-3", "r-2")
    with pytest.raises(DisputeNotFound):
        store.answer_dispute("dsp-1", "court", "confirmed", None, None, "x", "court", 1.0)  # not court's record
    with pytest.raises(DisputeNotFound):
        store.answer_dispute("dsp-404", "police", "confirmed", None, None, "x", "police", 1.0)
    # a repair application waiting: no dispute meanwhile (one procedure at a time)
    store.add_records([rec("r-4")], sent_by="police")
    store.apply_repair("rep-1", "police", "r-4", "c-0", "paid", "citizen_app", 1.0, 2.0, lambda r: "minor")
    with pytest.raises(UnderReview, match="one procedure at a time"):
        _file(store, "dsp-4", "r-4")
    # nothing of the refused writes reached the log
    kinds = [kind for _, kind, _ in store.changes_since(0)]
    assert kinds.count("file_dispute") == 1 and kinds.count("answer_dispute") == 0


def test_store_one_open_dispute_per_record_is_the_database_s_rule_too(store, sql):
    with_citizens(store)
    store.add_records([rec("r-1")], sent_by="police")
    _file(store)
    (record,) = sql("SELECT record FROM disputes WHERE dispute_id = %s", ("dsp-1",))[0]
    with pytest.raises(Exception, match="(?i)unique"):
        sql("INSERT INTO disputes (dispute_id, record, citizen_row, source, reason, state, filed_by, filed_at, due_at,"
            " position) VALUES ('dsp-x', %s, 0, 'police', 'x', 'suspended', 'x', 0, 0, 0)", (record,))
    store.answer_dispute("dsp-1", "police", "confirmed", None, None, "ok", "police", 1.0)
    _file(store, "dsp-2")  # once answered, the record may be disputed again
    assert [d.dispute_id for d in store.list_disputes(citizen_row=0)] == ["dsp-2", "dsp-1"]  # newest first
    assert [d.dispute_id for d in store.list_disputes(citizen_row=0, open_only=True)] == ["dsp-2"]
    assert store.list_disputes(source="court") == [] and len(store.list_disputes(source="police", limit=1)) == 1


def test_marks_are_rebuilt_from_the_store(store):
    with_citizens(store, 3)
    store.add_records([rec("r-1"), rec("r-2", variable="tax_arrears", source="tax_bureau"),
                       rec("r-3", citizen_id="c-2")], sent_by="police")
    _file(store, "dsp-1", "r-1", due=10.0)
    store.file_dispute("dsp-2", "tax_bureau", "r-2", "c-0", "paid", "citizen_app", 1.0, 1e12)
    _file(store, "dsp-3", "r-3", citizen="c-2")
    store.suspend_dispute("dsp-1", 20.0, SYSTEM)
    store.answer_dispute("dsp-3", "police", "confirmed", None, None, "ok", "police", 30.0)
    shared = RightsShared(capacity=8)
    assert shared.rebuild(store) == 1
    assert shared.marked(0) == (frozenset({"tax_arrears"}), frozenset({"traffic_violations"}))
    assert shared.marked(1) == shared.marked(2) == (frozenset(), frozenset())
    citizens = store.citizen_records(0)
    assert [(c.record.record_id, c.record.status, c.open_dispute) for c in citizens] == [
        ("r-1", "suspended", "dsp-1"), ("r-2", "active", "dsp-2")]


# --- the service through the real client, a real server in this process -------------------------


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Served(tmp_path_factory, n_citizens=800, seed=17)
    st = s.runtime.state
    n = st.n_citizens
    s.rows = iter(np.flatnonzero((st.consent[:n] == 1) & (st.adult[:n] == 1) & (st.columns.flags[:n] == 0)).tolist())
    yield s
    s.stop()


@pytest.fixture
def clock(srv):
    """The rights clock of the server's Rights, injected: ``clock.t`` (seconds since the
    epoch) is what it says until the test ends."""
    rights = srv.node.rights.service

    class Clock:
        t = time.time()

        def __call__(self):
            return self.t

    c = Clock()
    rights.now = c
    yield c
    rights.now = rights.shared.now


def _citizen_with_record(srv, variable="administrative_penalties", source="police", days_ago=0):
    """A consenting adult without a hard rule and a new negative record of theirs: (citizen
    id, record id)."""
    cid = srv.citizen(next(srv.rows))
    record_id = f"r-{uuid.uuid4().hex[:10]}"
    day = iso_of(srv.runtime.state.as_of_day - days_ago)
    (ack,) = srv.client.ingest([Record(record_id=record_id, citizen_id=cid, variable=variable, date=day, value=1,
                                       source=source)])
    assert ack.status == ack.ACCEPTED
    return cid, record_id


def _marks(qj, cid, variable):
    v = next(v for v in qj.explain(cid).variables if v.variable == variable)
    return v.disputed, v.suspended


def _refused(call, code, reason):
    with pytest.raises(QianjiangError) as err:
        call()
    assert (err.value.code(), err.value.reason) == (code, reason), err.value
    return err.value


def test_file_list_and_confirm_through_the_client(srv):
    qj = srv.client
    cid, rid = _citizen_with_record(srv)
    before = qj.get_score(cid).score
    d = qj.file_dispute(cid, "police", rid, "I was abroad that day")
    assert (d.state, d.citizen_id, d.variable, d.record_status, d.overdue) == (Dispute.OPEN, cid,
                                                                              "administrative_penalties", "active", False)
    assert d.dispute_id.startswith("dsp-") and len(d.dispute_id) == 28 and d.event_id.startswith("d-")
    # the deadline: 20 days after the day it was filed, moved off a rest day
    cfg = srv.runtime.rights_config
    filed = srv.node.rights.service.today(d.filed_at.ToSeconds())
    assert d.due_date == iso_of(cfg.dispute_due_day(filed))
    assert cfg.calendar.is_working_day(cfg.dispute_due_day(filed))
    assert 20 <= cfg.dispute_due_day(filed) - filed <= 30
    # it still counts, marked disputed in the explanation
    assert qj.get_score(cid).score == before
    assert _marks(qj, cid, "administrative_penalties") == (True, False)
    assert [x.dispute_id for x in qj.list_disputes(citizen_id=cid)] == [d.dispute_id]
    assert d.dispute_id in [x.dispute_id for x in qj.list_disputes(source="police", open_only=True)]
    assert d.dispute_id not in [x.dispute_id for x in qj.list_disputes(source="court")]
    (item,) = [r for r in qj.citizen_records(cid).records if r.record_id == rid]
    assert (item.open_dispute_id, item.status, item.tier, item.direction) == (d.dispute_id, "active", "general",
                                                                            "negative")

    a = qj.answer_dispute(d.dispute_id, "confirm", "the ticket carries your plate", source="police")
    assert (a.state, a.note, a.answered_by, a.record_status, a.record_version) == (
        Dispute.CONFIRMED, "the ticket carries your plate", "insecure-dev", "active", 1)
    assert qj.get_score(cid).score == before and _marks(qj, cid, "administrative_penalties") == (False, False)
    _refused(lambda: qj.answer_dispute(d.dispute_id, "withdraw", "again", source="police"),
             grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_ANSWERED")


def test_the_deadline_suspends_the_record_and_the_answer_restores_it(srv, clock):
    qj = srv.client
    rights = srv.node.rights.service
    cid, rid = _citizen_with_record(srv, variable="tax_arrears", source="tax_bureau")
    with_record = qj.get_score(cid).score
    d = qj.file_dispute(cid, "tax_bureau", rid, "paid in full last year")
    due = d.due_at.ToSeconds()
    clock.t = due - 1  # one second before: nothing happens
    assert rights.sweep() == {"suspended": 0, "escalated": 0}
    assert qj.list_disputes(citizen_id=cid)[0].state == Dispute.OPEN

    clock.t = due  # the deadline: the record stops counting, the citizen re-scored at once
    assert rights.sweep() == {"suspended": 1, "escalated": 0}
    suspended = qj.list_disputes(citizen_id=cid)[0]
    assert (suspended.state, suspended.record_status, suspended.record_version) == (Dispute.SUSPENDED, "suspended", 2)
    assert suspended.suspended_at.ToSeconds() == due and not suspended.overdue  # no longer waiting: suspended
    without = qj.get_score(cid).score
    assert without > with_record
    assert _marks(qj, cid, "tax_arrears") == (False, True)
    history = qj.record_history(rid, source="tax_bureau").versions
    assert [(v.status, v.sent_by) for v in history] == [("active", "insecure-dev"), ("suspended", SYSTEM)]
    _refused(lambda: qj.correct_record(rid, iso_of(srv.runtime.state.as_of_day), 2, source="tax_bureau"),
             grpc.StatusCode.FAILED_PRECONDITION, "RECORD_NOT_ACTIVE")  # the source answers the dispute instead

    clock.t = due + 3 * DAY
    a = qj.answer_dispute(d.dispute_id, "confirm", "arrears of 2025 still unpaid", source="tax_bureau")
    assert (a.state, a.record_status, a.record_version) == (Dispute.CONFIRMED, "active", 3)
    assert qj.get_score(cid).score == with_record  # restored, at once
    assert _marks(qj, cid, "tax_arrears") == (False, False)
    assert rights.sweep() == {"suspended": 0, "escalated": 0}

    # the steps are events the citizen sees in "who checked me"
    srv.node.audit.flush()
    events = {e.result: e for e in qj.list_checks(cid) if e.method.startswith("RightsService/")}
    assert set(events) == {"DISPUTE_FILED", "RECORD_SUSPENDED", "DISPUTE_CONFIRMED"}
    assert (events["RECORD_SUSPENDED"].caller, events["RECORD_SUSPENDED"].method) == (SYSTEM, "RightsService/DeadlineSweep")
    assert events["DISPUTE_CONFIRMED"].scenario == "dispute:tax_arrears"
    assert events["DISPUTE_FILED"].decision_id == d.event_id
    # an event is not a decision: nothing to replay
    _refused(lambda: qj.replay_decision(a.event_id), grpc.StatusCode.FAILED_PRECONDITION, "NOTHING_TO_REPLAY")


def test_correct_and_withdraw_answers_rescore_at_once(srv):
    qj = srv.client
    cid, rid = _citizen_with_record(srv)
    _, rid2 = None, f"r-{uuid.uuid4().hex[:10]}"
    day = iso_of(srv.runtime.state.as_of_day)
    qj.ingest([Record(record_id=rid2, citizen_id=cid, variable="administrative_penalties", date=day, value=1,
                      source="police")])
    two = qj.get_score(cid).score
    d1, d2 = qj.file_dispute(cid, "police", rid, "one ticket, not two"), qj.file_dispute(cid, "police", rid2, "and this")
    old = iso_of(srv.runtime.state.as_of_day - 300)
    c = qj.answer_dispute(d1.dispute_id, "correct", "it was last winter", date=old, value=1, source="police")
    assert (c.state, c.record_status, c.record_version) == (Dispute.CORRECTED, "active", 2)
    one_old = qj.get_score(cid).score
    assert one_old > two  # a 300-day-old penalty has nearly decayed (linear over 365 days)
    assert _marks(qj, cid, "administrative_penalties") == (True, False)  # d2 still open
    w = qj.answer_dispute(d2.dispute_id, "withdraw", "issued in error", source="police")
    assert (w.state, w.record_status) == (Dispute.WITHDRAWN, "withdrawn")
    assert qj.get_score(cid).score > one_old
    assert _marks(qj, cid, "administrative_penalties") == (False, False)
    _refused(lambda: qj.file_dispute(cid, "police", rid2, "again"), grpc.StatusCode.FAILED_PRECONDITION,
             "RECORD_NOT_ACTIVE")  # a withdrawn record: nothing to dispute


def test_bad_input_each_with_its_status(srv):
    qj = srv.client
    cid, rid = _citizen_with_record(srv)
    other, other_rid = _citizen_with_record(srv)
    code = grpc.StatusCode
    unknown = _refused(lambda: qj.file_dispute(cid, "police", "r-none", "x"), code.NOT_FOUND, "RECORD_NOT_FOUND")
    not_theirs = _refused(lambda: qj.file_dispute(cid, "police", other_rid, "x"), code.NOT_FOUND, "RECORD_NOT_FOUND")
    assert unknown.details().replace("r-none", "ID") == not_theirs.details().replace(other_rid, "ID")  # one answer
    _refused(lambda: qj.file_dispute("c-nobody", "police", rid, "x"), code.NOT_FOUND, "UNKNOWN_CITIZEN")
    err = _refused(lambda: qj.file_dispute(cid, "police", rid, "x" * 501), code.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert err.metadata["field"] == "reason" and "501 characters exceed the limit of 500" in err.details()
    _refused(lambda: qj.file_dispute(cid, "police", rid, "   "), code.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    _refused(lambda: qj.file_dispute(cid, "police", rid, "bell\x07"), code.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    _refused(lambda: qj.file_dispute(cid, "", rid, "x"), code.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    d = qj.file_dispute(cid, "police", rid, "x" * 500)  # the limit itself is fine
    _refused(lambda: qj.file_dispute(cid, "police", rid, "twice"), code.ALREADY_EXISTS, "DISPUTE_OPEN")
    # answers: someone else's dispute, an unknown one, a bad answer, a correction that changes nothing
    _refused(lambda: qj.answer_dispute(d.dispute_id, "confirm", "x", source="court"), code.NOT_FOUND, "DISPUTE_NOT_FOUND")
    _refused(lambda: qj.answer_dispute("dsp-unknown", "confirm", "x", source="police"), code.NOT_FOUND,
             "DISPUTE_NOT_FOUND")
    _refused(lambda: qj.answer_dispute(d.dispute_id, 0, "x", source="police"), code.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    _refused(lambda: qj.answer_dispute(d.dispute_id, "confirm", "", source="police"), code.INVALID_ARGUMENT,
             "INVALID_ARGUMENT")
    _refused(lambda: qj.answer_dispute(d.dispute_id, "correct", "x", source="police"), code.INVALID_ARGUMENT,
             "INVALID_ARGUMENT")  # no date
    today = iso_of(srv.runtime.state.as_of_day)
    _refused(lambda: qj.answer_dispute(d.dispute_id, "correct", "x", date=today, value=1, source="police"),
             code.INVALID_ARGUMENT, "INVALID_ARGUMENT")  # the same date and value: that is a confirmation
    _refused(lambda: qj.answer_dispute(d.dispute_id, "correct", "x", date="2999-01-01", value=1, source="police"),
             code.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    _refused(lambda: qj.answer_dispute(d.dispute_id, "correct", "x", date=today, value=-1, source="police"),
             code.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    _refused(lambda: qj.list_disputes(limit=5), code.INVALID_ARGUMENT, "INVALID_ARGUMENT")  # neither citizen nor source
    _refused(lambda: qj.list_disputes(source="police", limit=1001), code.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert qj.list_disputes(citizen_id=cid)[0].state == Dispute.OPEN  # nothing refused changed it
    qj.answer_dispute(d.dispute_id, "confirm", "checked", source="police")
    _refused(lambda: qj.answer_dispute(d.dispute_id, "confirm", "checked", source="police"),
             code.FAILED_PRECONDITION, "ALREADY_ANSWERED")


def test_the_test_clock_is_off_unless_asked_for(srv):
    _refused(lambda: srv.client.advance_test_clock(60), grpc.StatusCode.FAILED_PRECONDITION, "TEST_CLOCK_OFF")


def test_who_may_do_what(tmp_path):
    """Token mode: the citizen app files for the citizen its call is bound to; a source sees
    and answers only the disputes of its own records; nobody else takes part."""
    from server.seed import citizen_id

    (tmp_path / "data").mkdir()
    secure = SecureServer(tmp_path / "data", n_citizens=400)
    try:
        app, police, court = secure.clients["citizen_app"], secure.clients["police"], secure.clients["court"]
        cid = citizen_id(secure.fresh_row())
        day = iso_of(secure.runtime.state.as_of_day)
        police.ingest([Record(record_id="p-1", citizen_id=cid, variable="traffic_violations", date=day, value=1)])
        court.ingest([Record(record_id="k-1", citizen_id=cid, variable="contract_judgments_lost", date=day, value=1)])
        code = grpc.StatusCode
        _refused(lambda: police.file_dispute(cid, "police", "p-1", "x"), code.PERMISSION_DENIED, "PERMISSION_DENIED")
        _refused(lambda: secure.clients["metro_gateway"].list_disputes(source="police"), code.PERMISSION_DENIED,
                 "PERMISSION_DENIED")
        d_police = app.file_dispute(cid, "police", "p-1", "not my car")
        d_court = app.file_dispute(cid, "court", "k-1", "settled")
        assert {d.dispute_id for d in app.list_disputes(citizen_id=cid)} == {d_police.dispute_id, d_court.dispute_id}
        assert [d.dispute_id for d in police.list_disputes(citizen_id=cid)] == [d_police.dispute_id]
        assert [d.dispute_id for d in court.list_disputes()] == [d_court.dispute_id]
        _refused(lambda: police.list_disputes(source="court"), code.PERMISSION_DENIED, "PERMISSION_DENIED")
        _refused(lambda: court.answer_dispute(d_police.dispute_id, "withdraw", "x"), code.NOT_FOUND, "DISPUTE_NOT_FOUND")
        _refused(lambda: app.answer_dispute(d_police.dispute_id, "confirm", "x"), code.PERMISSION_DENIED,
                 "PERMISSION_DENIED")
        # a citizen app's call is bound to its end user: another citizen's records are not its
        other = citizen_id(secure.fresh_row())
        with pytest.raises(grpc.RpcError) as err:
            app.rights.FileDispute(rights_pb2.FileDisputeRequest(citizen_id=other, source="police", record_id="p-1",
                                                                 reason="x"), timeout=5, metadata=app._for(cid))
        assert err.value.code() == code.PERMISSION_DENIED
        a = police.answer_dispute(d_police.dispute_id, "withdraw", "camera fault")
        assert (a.state, a.answered_by, a.record_status) == (Dispute.WITHDRAWN, "police", "withdrawn")
        secure.node.audit.flush()
        callers = {e.result: e.caller for e in app.list_checks(cid) if e.method.startswith("RightsService/")}
        assert callers["DISPUTE_WITHDRAWN"] == "police" and callers["DISPUTE_FILED"].startswith("citizen_app")
        _refused(lambda: secure.clients["citizen_app"].advance_test_clock(60), code.PERMISSION_DENIED,
                 "PERMISSION_DENIED")  # granted to nobody
    finally:
        secure.close()


# --- a real `qjscore serve` process, its test clock moved past the deadline -----------------------


def _wait(what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _adult_with_consent(qj, first=0):
    for row in range(first, first + 200):
        cid = f"c{row:08d}"
        try:
            score = qj.get_score(cid)
        except QianjiangError:
            continue
        if not score.hard_rule_applied:
            return cid
    raise AssertionError("no consenting adult in the synthetic city")


def test_a_real_server_suspends_at_the_deadline_and_keeps_the_marks_across_a_restart(tmp_path, store_url):
    data = tmp_path / "data"
    args = ("--data-dir", str(data), "--store", store_url, "--seed-citizens", "300", "--test-clock")
    server = ServeProcess(tmp_path, *args)
    try:
        with QianjiangClient(f"127.0.0.1:{server.port}", timeout=5) as qj:
            server.wait_serving(qj)
            cid = _adult_with_consent(qj)
            before = qj.get_score(cid).score
            day = qj.get_score(cid).as_of_date
            qj.ingest([Record(record_id="pen-1", citizen_id=cid, variable="administrative_penalties", date=day, value=1,
                              source="police")])
            with_record = qj.get_score(cid).score
            assert with_record < before
            d = qj.file_dispute(cid, "police", "pen-1", "the officer wrote the wrong name")
            clock = qj.advance_test_clock(19 * DAY)
            assert clock.offset_seconds == 19 * DAY
            time.sleep(2.5)  # the parent's sweep runs every second: still before the deadline
            assert qj.list_disputes(citizen_id=cid)[0].state == Dispute.OPEN and qj.get_score(cid).score == with_record
            qj.advance_test_clock(int(d.due_at.ToSeconds() - clock.now.ToSeconds()) + 60)
            suspended = _wait(lambda: [x for x in qj.list_disputes(citizen_id=cid) if x.state == Dispute.SUSPENDED])[0]
            assert suspended.record_status == "suspended"
            assert qj.get_score(cid).score == before  # it stopped counting, re-scored at once
            assert _marks(qj, cid, "administrative_penalties") == (False, True)
            assert _wait(lambda: [e for e in qj.list_checks(cid) if e.result == "RECORD_SUSPENDED"])[0].caller == SYSTEM
            a = qj.answer_dispute(d.dispute_id, "confirm", "it is yours", source="police")
            assert (a.state, a.record_status, a.record_version) == (Dispute.CONFIRMED, "active", 3)
            assert qj.get_score(cid).score == with_record  # counts again, at once
            d2 = qj.file_dispute(cid, "police", "pen-1", "still not me")
    finally:
        assert server.stop() == 0
    server = ServeProcess(tmp_path, *args)  # a restart: the marks come back from the store
    try:
        with QianjiangClient(f"127.0.0.1:{server.port}", timeout=5) as qj:
            server.wait_serving(qj)
            assert _marks(qj, cid, "administrative_penalties") == (True, False)
            assert qj.list_disputes(citizen_id=cid, open_only=True)[0].dispute_id == d2.dispute_id
    finally:
        assert server.stop() == 0


def test_production_refuses_the_test_clock(tmp_path):
    from server import tls

    certs = tmp_path / "certs"
    assert tls.main(["--out", str(certs), "--caller", "citizen_app"]) == 0
    out = subprocess.run([sys.executable, "-m", "clients.cli", "serve", "--data-dir", str(tmp_path / "data"),
                          "--port", "0", "--metrics-port", "0", "--production", "--security", "mtls", "--certs",
                          str(certs), "--test-clock"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "error: --production keeps the real clock: drop --test-clock" in out.stderr and "Traceback" not in out.stderr


def test_the_cli_files_lists_and_answers(srv, capsys):
    import json

    from clients.cli import main

    cid, rid = _citizen_with_record(srv)
    target = ["--target", srv.target]

    def run(*argv) -> tuple[int, object]:
        code = main([*argv, *target, "--json"])
        return code, json.loads(capsys.readouterr().out)

    code, records = run("records", cid)
    assert code == 0 and rid in [r["record_id"] for r in records["records"]]
    code, filed = run("dispute", "file", cid, "--source", "police", "--record-id", rid, "--reason", "wrong person")
    assert (code, filed["state"], filed["record_id"]) == (0, "OPEN", rid)
    code, listed = run("dispute", "list", "--source", "police", "--open")
    assert code == 0 and filed["dispute_id"] in [d["dispute_id"] for d in listed]
    code, answered = run("dispute", "answer", filed["dispute_id"], "withdraw", "--note", "our mistake", "--source", "police")
    assert (code, answered["state"], answered["record_status"]) == (0, "WITHDRAWN", "withdrawn")
    # the table, and a refusal: status and reason on stderr, exit 2
    assert main(["dispute", "list", "--citizen", cid, *target]) == 0
    out = capsys.readouterr().out
    assert filed["dispute_id"] in out and "WITHDRAWN" in out
    assert main(["dispute", "answer", filed["dispute_id"], "confirm", "--note", "x", "--source", "police", *target]) == 2
    assert "error: FAILED_PRECONDITION [ALREADY_ANSWERED]" in capsys.readouterr().err
    assert main(["dispute", "answer", filed["dispute_id"], "correct", "--note", "x", *target]) == 2
    assert "correct: give --date and --value" in capsys.readouterr().err
    assert main(["test-clock", "--days", "1", *target]) == 2
    assert "TEST_CLOCK_OFF" in capsys.readouterr().err
