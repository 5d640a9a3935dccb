"""Credit repair (server/rights.py, proto/qianjiang/v1/rights.proto): a citizen applies to
repair a negative record under the tier rules, the record's source decides within a number of
working days, an undecided application is escalated, never approved by default.

The working-day calendar and the deadlines on fixed dates (config/rights.toml: the 2026
notice of the State Council); the store methods on SQLite and on PostgreSQL; the service
through the real client against a real server in this process, its rights clock injected on
fixed dates; and ``qjscore serve --test-clock`` as a real process escalating an application.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid

import grpc
import numpy as np
import pytest

from clients.client import QianjiangClient, QianjiangError, Record
from conftest import Served, ServeProcess, rec, with_citizens
from qianjiang.v1 import rights_pb2
from server.rights import SYSTEM, RightsConfigError, day_start, load_rights_config
from server.state import day_of, iso_of
from server.store import AlreadyClosed, NotRepairable, RepairNotFound, RepairPending, UnderReview, WrongState

Repair = rights_pb2.RepairApplication
CONFIG = load_rights_config()
DAY = 86_400


# --- the calendar and the deadlines ------------------------------------------------------------


@pytest.mark.parametrize("filed, n, due", [
    ("2026-12-04", 5, "2026-12-11"),  # a Friday: Monday to Friday of the next week
    ("2026-12-07", 5, "2026-12-14"),  # a Monday: the next Monday
    ("2026-12-05", 1, "2026-12-07"),  # a Saturday: the Monday
    ("2026-02-13", 5, "2026-02-27"),  # the Spring Festival: Saturday 14th a make-up working day, 15th-23rd off
    ("2026-09-30", 5, "2026-10-13"),  # National Day: 1st-7th off, Saturday 10th a working day: 8, 9, 10, 12, 13
    ("2026-04-30", 3, "2026-05-08"),  # Labour Day: 1st-5th off
    ("2026-12-31", 1, "2027-01-01"),  # 2027 has no notice configured yet: weekends only
])
def test_working_days(filed, n, due):
    assert iso_of(CONFIG.calendar.add_working_days(day_of(filed), n)) == due


@pytest.mark.parametrize("filed, due", [
    ("2026-09-01", "2026-09-21"),  # 20 calendar days, a Monday
    ("2026-12-07", "2026-12-28"),  # the 27th is a Sunday: the next working day
    ("2026-09-11", "2026-10-08"),  # 1 October, National Day: the first working day after the holiday
    ("2026-01-25", "2026-02-14"),  # a make-up Saturday is a working day
])
def test_dispute_deadlines(filed, due):
    assert iso_of(CONFIG.dispute_due_day(day_of(filed))) == due


def test_the_defaults_and_the_configuration_s_mistakes(tmp_path):
    assert (CONFIG.answer_days, CONFIG.decision_working_days, CONFIG.min_publicity_days) == (
        20, 5, {"minor": 0, "general": 90, "serious": 365})
    assert CONFIG.calendar.covers(day_of("2026-06-01")) and not CONFIG.calendar.covers(day_of("2027-06-01"))
    base = (tmp_path / "ok.toml")
    good = ('[disputes]\nanswer_days = 10\nmax_text_chars = 100\n[repairs]\ndecision_working_days = 3\n'
            'max_statement_chars = 100\nmin_publicity_days = { minor = 0, general = 30, serious = 365 }\n')
    base.write_text(good)
    assert load_rights_config(base).answer_days == 10
    for text, message in [
        (good.replace("answer_days", "answer_dayz"), "[disputes].answer_dayz: unknown key"),
        (good.replace("answer_days = 10", "answer_days = 0"), "answer_days: expected a whole number in [1, 365]"),
        (good.replace(", serious = 365", ""), "min_publicity_days: expected minor, general and serious"),
        (good + '[calendar.2026]\nworking_weekends = ["2026-12-07"]\n', "'2026-12-07' is not a Saturday or Sunday"),
        (good + '[calendar.2026]\nholidays = ["2027-01-01"]\n', "'2027-01-01' is not in 2026"),
        (good + '[calendar.2026]\nholidays = ["2026-01-05..2026-01-01"]\n', "is not a run of at most 32 days"),
        (good + "[holidays]\n", "unknown table 'holidays'"),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(RightsConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
            load_rights_config(bad)


# --- the store, on SQLite and on PostgreSQL ---------------------------------------------------


def _apply(store, repair_id="rep-1", record_id="r-1", citizen="c-0", due=200.0, check=lambda r: "general",
           source="tax_bureau"):
    return store.apply_repair(repair_id, source, record_id, citizen, "paid in full", "citizen_app", 100.0, due, check)


def test_store_an_application_rejected_then_approved(store):
    with_citizens(store)
    store.add_records([rec("r-1", variable="tax_arrears", source="tax_bureau")], sent_by="tax_bureau")
    seen = []
    r = _apply(store, check=lambda record: seen.append(record) or "general")
    assert (r.state, r.tier, r.record_status, r.citizen_id, r.variable) == ("pending", "general", "active", "c-0",
                                                                           "tax_arrears")
    assert seen[0].record_id == "r-1" and store.changes_since(r.position - 1) == [(r.position, "apply_repair", 0)]
    with pytest.raises(RepairPending):
        _apply(store, "rep-2")
    with pytest.raises(UnderReview, match="one procedure at a time"):  # no dispute while it waits
        store.file_dispute("dsp-1", "tax_bureau", "r-1", "c-0", "x", "citizen_app", 1.0, 2.0)
    with pytest.raises(RepairNotFound):
        store.decide_repair("rep-1", "police", True, "", "police", 300.0)  # not police's record
    r, record = store.decide_repair("rep-1", "tax_bureau", False, "arrears of 2025 unpaid", "tax_bureau", 300.0)
    assert (r.state, r.decision_reason, r.decided_by, r.decided_at, record.status) == (
        "rejected", "arrears of 2025 unpaid", "tax_bureau", 300.0, "active")
    with pytest.raises(AlreadyClosed, match="decided already"):
        store.decide_repair("rep-1", "tax_bureau", True, "", "tax_bureau", 301.0)
    _apply(store, "rep-2")  # rejected: the citizen may apply again
    r, record = store.decide_repair("rep-2", "tax_bureau", True, "", "tax_bureau", 400.0)
    assert (r.state, record.status, record.version, record.sent_by) == ("approved", "repaired", 2, "tax_bureau")
    assert len(store.active_records(citizen_row=0)) == 0
    with pytest.raises(WrongState, match="is repaired"):
        _apply(store, "rep-3")
    assert [x.repair_id for x in store.list_repairs(citizen_row=0)] == ["rep-2", "rep-1"]
    assert store.list_repairs(citizen_row=0, pending_only=True) == [] and store.list_repairs(source="court") == []


def test_store_escalation_and_refusals(store):
    with_citizens(store, 2)
    store.add_records([rec("r-1", variable="tax_arrears", source="tax_bureau"),
                       rec("r-2", variable="tax_arrears", source="tax_bureau", citizen_id="c-1")], sent_by="tax_bureau")

    def too_early(record):
        raise NotRepairable("not yet")

    with pytest.raises(NotRepairable):
        _apply(store, check=too_early)
    with pytest.raises(Exception, match="no record 'r-2'"):
        _apply(store, record_id="r-2")  # another citizen's record
    _apply(store, due=200.0)
    assert store.due_repairs(199.0) == [] and store.due_repairs(200.0) == ["rep-1"]
    assert store.escalate_repair("rep-1", 150.0) is None
    r = store.escalate_repair("rep-1", 250.0)
    assert (r.state, r.escalated_at) == ("pending", 250.0)  # escalated, still pending: never decided by default
    assert store.escalate_repair("rep-1", 260.0) is None and store.due_repairs(1e12) == []
    assert store.changes_since(r.position - 1) == [(r.position, "escalate_repair", 0)]
    r, record = store.decide_repair("rep-1", "tax_bureau", True, "", "tax_bureau", 300.0)
    assert (r.state, r.escalated_at, record.status) == ("approved", 250.0, "repaired")
    # a record under dispute: no application meanwhile
    store.file_dispute("dsp-1", "tax_bureau", "r-2", "c-1", "x", "citizen_app", 1.0, 2.0)
    with pytest.raises(UnderReview):
        _apply(store, "rep-2", "r-2", "c-1")
    store.suspend_dispute("dsp-1", 3.0, SYSTEM)
    with pytest.raises(UnderReview):  # suspended by its dispute: still under review
        _apply(store, "rep-2", "r-2", "c-1")


# --- the service through the real client, a real server in this process -------------------------


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Served(tmp_path_factory, n_citizens=800, seed=23)
    st = s.runtime.state
    n = st.n_citizens
    s.rows = iter(np.flatnonzero((st.consent[:n] == 1) & (st.adult[:n] == 1) & (st.columns.flags[:n] == 0)).tolist())
    yield s
    s.stop()


@pytest.fixture
def clock(srv):
    rights = srv.node.rights.service

    class Clock:
        t = time.time()

        def __call__(self):
            return self.t

    c = Clock()
    rights.now = c
    yield c
    rights.now = rights.shared.now


def _record(srv, variable, source, day: int, cid: str | None = None):
    cid = cid or srv.citizen(next(srv.rows))
    record_id = f"r-{uuid.uuid4().hex[:10]}"
    (ack,) = srv.client.ingest([Record(record_id=record_id, citizen_id=cid, variable=variable, date=iso_of(day),
                                       value=1, source=source)])
    assert ack.status == ack.ACCEPTED
    return cid, record_id


def _refused(call, code, reason):
    with pytest.raises(QianjiangError) as err:
        call()
    assert (err.value.code(), err.value.reason) == (code, reason), err.value
    return err.value


@pytest.mark.parametrize("variable, source, days_ago, refused", [
    ("traffic_violations", "police", 0, None),  # minor: at once
    ("traffic_violations", "police", 95, "no longer counts"),  # past its 90-day lifetime: nothing to repair
    ("tax_arrears", "tax_bureau", 30, "general record may be repaired only after its minimum publicity period of 90 days"),
    ("tax_arrears", "tax_bureau", 90, None),
    ("court_listed_dishonest_debtor", "court", 200,
     "serious record may be repaired only after its minimum publicity period of 365 days"),
    ("court_listed_dishonest_debtor", "court", 364, "minimum publicity period of 365 days"),
    ("court_listed_dishonest_debtor", "court", 365, None),
    ("volunteer_hours", "volunteer_platform", 0, "positive record"),
])
def test_the_tier_rules(srv, variable, source, days_ago, refused):
    qj = srv.client
    today = srv.runtime.state.as_of_day
    cid, rid = _record(srv, variable, source, today - days_ago)
    if refused is None:
        r = qj.apply_repair(cid, source, rid, "remedied")
        assert (r.state, r.variable) == (Repair.PENDING, variable)
        tier = next(v.tier for v in srv.runtime.spec.variables if v.name == variable)
        assert r.tier == tier
        return
    err = _refused(lambda: qj.apply_repair(cid, source, rid, "remedied"), grpc.StatusCode.FAILED_PRECONDITION,
                   "NOT_REPAIRABLE")
    assert refused in err.details()
    if "minimum publicity" in refused:  # it says from when
        minimum = CONFIG.min_publicity_days["serious" if source == "court" else "general"]
        assert f"from {iso_of(today - days_ago + minimum)}" in err.details()
    (item,) = [x for x in qj.citizen_records(cid).records if x.record_id == rid]
    assert item.pending_repair_id == ""


def test_approval_lifts_a_serious_record_at_once(srv):
    qj = srv.client
    today = srv.runtime.state.as_of_day
    cid = srv.citizen(next(srv.rows))
    clean = qj.get_score(cid)
    _, rid = _record(srv, "court_listed_dishonest_debtor", "court", today - 400, cid)
    listed = qj.get_score(cid)
    assert listed.hard_rule_applied and listed.score <= 549 < clean.score
    (item,) = [x for x in qj.citizen_records(cid).records if x.record_id == rid]
    assert (item.tier, item.repairable_from, item.counts_until) == ("serious", iso_of(today - 400 + 365),
                                                                    iso_of(today - 400 + 1095 - 1))
    r = qj.apply_repair(cid, "court", rid, "judgment fulfilled, delisted on appeal")
    _refused(lambda: qj.apply_repair(cid, "court", rid, "again"), grpc.StatusCode.ALREADY_EXISTS, "REPAIR_PENDING")
    _refused(lambda: qj.file_dispute(cid, "court", rid, "and wrong"), grpc.StatusCode.FAILED_PRECONDITION, "UNDER_REVIEW")
    assert qj.get_score(cid).score == listed.score  # pending: it still counts
    _refused(lambda: qj.decide_repair(r.repair_id, True, source="police"), grpc.StatusCode.NOT_FOUND, "REPAIR_NOT_FOUND")
    d = qj.decide_repair(r.repair_id, True, "the judgment was fulfilled", source="court")
    assert (d.state, d.record_status, d.decided_by, d.decision_reason) == (Repair.APPROVED, "repaired", "insecure-dev",
                                                                          "the judgment was fulfilled")
    after = qj.get_score(cid)
    assert not after.hard_rule_applied and after.score == clean.score  # re-scored at once
    _refused(lambda: qj.decide_repair(r.repair_id, False, "changed my mind", source="court"),
             grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_ANSWERED")
    history = qj.record_history(rid, source="court").versions
    assert [v.status for v in history] == ["active", "repaired"]
    srv.node.audit.flush()
    events = [e.result for e in qj.list_checks(cid) if e.method.startswith("RightsService/")]
    assert events[:2] == ["REPAIR_APPROVED", "REPAIR_APPLIED"] and "RECORDS_VIEWED" in events


def test_rejection_needs_a_reason_and_the_record_keeps_counting(srv):
    qj = srv.client
    cid, rid = _record(srv, "tax_arrears", "tax_bureau", srv.runtime.state.as_of_day - 120)
    score = qj.get_score(cid).score
    r = qj.apply_repair(cid, "tax_bureau", rid, "paid")
    _refused(lambda: qj.decide_repair(r.repair_id, False, "", source="tax_bureau"), grpc.StatusCode.INVALID_ARGUMENT,
             "INVALID_ARGUMENT")
    with pytest.raises(grpc.RpcError) as err:  # no decision
        qj.rights.DecideRepair(rights_pb2.DecideRepairRequest(repair_id=r.repair_id, source="tax_bureau"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "decision" in err.value.details()
    err = _refused(lambda: qj.apply_repair(cid, "tax_bureau", rid, "x" * 1001), grpc.StatusCode.INVALID_ARGUMENT,
                   "INVALID_ARGUMENT")
    assert err.metadata["field"] == "statement"
    d = qj.decide_repair(r.repair_id, False, "the 2025 arrears are still unpaid", source="tax_bureau")
    assert (d.state, d.record_status) == (Repair.REJECTED, "active")
    assert qj.get_score(cid).score == score
    again = qj.apply_repair(cid, "tax_bureau", rid, "paid now, receipt attached")
    assert [x.repair_id for x in qj.list_repairs(citizen_id=cid)] == [again.repair_id, r.repair_id]
    assert [x.repair_id for x in qj.list_repairs(citizen_id=cid, pending_only=True)] == [again.repair_id]
    assert again.repair_id in [x.repair_id for x in qj.list_repairs(source="tax_bureau", pending_only=True)]
    assert again.repair_id not in [x.repair_id for x in qj.list_repairs(source="court")]


def _at(day: str, hour: int = 10) -> float:
    """``hour`` o'clock on ``day`` in the city."""
    return day_start(day_of(day)) + hour * 3600


@pytest.mark.parametrize("filed, due", [("2026-12-04", "2026-12-11"), ("2026-02-13", "2026-02-27")])
def test_the_decision_deadline_in_working_days_and_its_escalation(srv, clock, filed, due):
    """Filed on a Friday, due the next Friday; filed before the Spring Festival, due after it.
    Past the deadline the sweep escalates it (an event the citizen sees); it stays pending."""
    qj = srv.client
    rights = srv.node.rights.service
    cid, rid = _record(srv, "traffic_violations", "police", day_of(filed) - 10)
    clock.t = _at(filed)
    r = qj.apply_repair(cid, "police", rid, "fine paid")
    assert (r.due_date, r.due_at.ToSeconds(), r.filed_at.ToSeconds()) == (due, day_start(day_of(due) + 1), clock.t)
    clock.t = r.due_at.ToSeconds() - 1  # the last second of the last working day
    assert rights.sweep()["escalated"] == 0
    assert not qj.list_repairs(citizen_id=cid)[0].overdue
    clock.t = r.due_at.ToSeconds()
    assert rights.sweep() == {"suspended": 0, "escalated": 1}
    late = qj.list_repairs(citizen_id=cid)[0]
    assert (late.state, late.overdue, late.escalated_at.ToSeconds()) == (Repair.PENDING, True, clock.t)
    assert rights.sweep()["escalated"] == 0  # once
    assert qj.citizen_records(cid).records[0].status == "active"  # never approved by default
    srv.node.audit.flush()
    (event,) = [e for e in qj.list_checks(cid) if e.result == "REPAIR_OVERDUE"]
    assert (event.caller, event.scenario) == (SYSTEM, "repair:traffic_violations")
    d = qj.decide_repair(r.repair_id, True, "", source="police")  # the source still decides
    assert (d.state, d.overdue, d.record_status) == (Repair.APPROVED, False, "repaired")


# --- a real `qjscore serve` process, its test clock moved past the deadline -----------------------


def test_a_real_server_escalates_an_undecided_application(tmp_path):
    server = ServeProcess(tmp_path, "--data-dir", str(tmp_path / "data"), "--seed-citizens", "300", "--test-clock")
    try:
        with QianjiangClient(f"127.0.0.1:{server.port}", timeout=5) as qj:
            server.wait_serving(qj)
            cid = next(f"c{row:08d}" for row in range(300) if _scored(qj, f"c{row:08d}"))
            today = dt.date.fromisoformat(qj.get_score(cid).as_of_date)
            qj.ingest([Record(record_id="fare-1", citizen_id=cid, variable="transit_fare_defaults",
                              date=today.isoformat(), value=1, source="citizen_card_company")])
            with_record = qj.get_score(cid).score
            r = qj.apply_repair(cid, "citizen_card_company", "fare-1", "fare paid at the counter")
            assert r.tier == "minor" and r.state == Repair.PENDING
            now = qj.advance_test_clock(1).now.ToSeconds()
            qj.advance_test_clock(int(r.due_at.ToSeconds() - now) - 3600)  # an hour before the deadline
            time.sleep(2.5)  # the parent's sweep runs every second
            assert not qj.list_repairs(citizen_id=cid)[0].escalated_at.seconds
            qj.advance_test_clock(3600 + 60)
            deadline = time.monotonic() + 15
            while not qj.list_repairs(citizen_id=cid)[0].escalated_at.seconds:
                assert time.monotonic() < deadline, "not escalated"
                time.sleep(0.2)
            late = qj.list_repairs(citizen_id=cid)[0]
            assert (late.state, late.overdue) == (Repair.PENDING, True)
            assert qj.get_score(cid).score == with_record  # never approved by default
            d = qj.decide_repair(r.repair_id, True, "", source="citizen_card_company")
            assert d.state == Repair.APPROVED and qj.get_score(cid).score > with_record  # re-scored at once
    finally:
        assert server.stop() == 0


def _scored(qj, cid) -> bool:
    try:
        return not qj.get_score(cid).hard_rule_applied
    except QianjiangError:
        return False


def test_the_cli_applies_lists_and_decides(srv, capsys):
    import json

    from clients.cli import main

    cid, rid = _record(srv, "tax_arrears", "tax_bureau", srv.runtime.state.as_of_day - 100)
    target = ["--target", srv.target]

    def run(*argv) -> tuple[int, object]:
        code = main([*argv, *target, "--json"])
        return code, json.loads(capsys.readouterr().out)

    code, applied = run("repair", "apply", cid, "--source", "tax_bureau", "--record-id", rid, "--statement", "paid")
    assert (code, applied["state"], applied["tier"]) == (0, "PENDING", "general")
    code, listed = run("repair", "list", "--source", "tax_bureau", "--pending")
    assert code == 0 and applied["repair_id"] in [r["repair_id"] for r in listed]
    assert main(["repair", "decide", applied["repair_id"], "reject", "--source", "tax_bureau", *target]) == 2
    assert "reject: give --reason" in capsys.readouterr().err
    code, decided = run("repair", "decide", applied["repair_id"], "approve", "--source", "tax_bureau")
    assert (code, decided["state"], decided["record_status"]) == (0, "APPROVED", "repaired")
    assert main(["records", cid, *target]) == 0
    out = capsys.readouterr().out
    assert rid in out and "repaired" in out and "repairable from" in out
    assert main(["repair", "list", "--citizen", cid, *target]) == 0
    assert applied["repair_id"] in capsys.readouterr().out


def test_serve_refuses_a_wrong_rights_configuration(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    bad = tmp_path / "rights.toml"
    bad.write_text("[repairs]\ndecision_working_days = 0\n")
    out = subprocess.run([sys.executable, "-m", "clients.cli", "serve", "--data-dir", str(tmp_path / "data"), "--port", "0",
                          "--metrics-port", "0", "--rights-config", str(bad)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "error: rights.toml: [repairs].min_publicity_days: expected minor, general and serious" in out.stderr
