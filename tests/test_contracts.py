"""Contracts that hold up to an appeal, through the real client against the real server in
token mode (each caller of config/policy.toml with its own grants):

* every serious record carries the hard rule (a conviction caps the score, denies pay-later);
* one precedence for the same person across Check, BatchCheck, StreamCheck, GetScore and
  BatchGetScores;
* StreamCheck answers a bad message for itself and goes on;
* records are identified by (source, record_id): duplicates, conflicts naming the field,
  another source's id answered like an id never used;
* a correction or withdrawal adds a version (GetRecordHistory);
* every decision carries what reproduces it, and ReplayDecision recomputes it from the
  history after the records changed;
* decision ids are unguessable.
"""

from __future__ import annotations

import os
import re

import grpc
import numpy as np
import pytest

from clients.client import Record
from conftest import SecureServer
from qianjiang.v1 import eligibility_pb2, records_pb2, score_pb2
from server.app import citizen_id
from server.state import iso_of

Outcome = eligibility_pb2.Outcome
Ack = records_pb2.RecordAck
ScoreStatus = score_pb2.ScoreResult.Status


#: Bulk score reads are no partner's: an operator role granted on purpose (config/policy.toml).
CREDIT_OFFICE = """
[callers.credit_office]
role = "operator"
description = "the city credit office's bulk reads, for the precedence tests"
methods = ["ScoreService/BatchGetScores"]
"""


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    s = SecureServer(tmp_path_factory.mktemp("contracts"), extra_policy=CREDIT_OFFICE)
    yield s
    s.close()


def _today(secure) -> str:
    return iso_of(secure.runtime.state.as_of_day)


def _error(fn, *args, **kw):
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    return info.value


def _row(secure, *, consent: int, adult: int) -> int:
    s = secure.runtime.state
    n = s.n_citizens
    rows = np.flatnonzero((s.consent[:n] == consent) & (s.adult[:n] == adult))
    assert len(rows), f"the synthetic city has no citizen with consent={consent}, adult={adult}"
    return int(rows[0])


# --- serious records -----------------------------------------------------------------------


def test_a_conviction_caps_the_score_and_denies_pay_later_with_the_rule_named(secure):
    row = secure.fresh_row()
    cid = citizen_id(row)
    app, court, metro = secure.clients["citizen_app"], secure.clients["court"], secure.clients["metro_gateway"]
    before = app.get_score(cid)
    assert not before.hard_rule_applied
    court.ingest([Record(record_id="conv-1", citizen_id=cid, variable="criminal_convictions", date=_today(secure), value=1)])
    after = app.get_score(cid)
    assert after.hard_rule_applied
    assert after.score <= 549 and after.level == 1  # needs improvement, whatever it was before
    decision = metro.check("metro_pay_later", secure.token(row))
    assert decision.outcome == Outcome.DENY_HARD_RULE
    assert list(decision.reason_codes) == ["HARD_RULE:LA04"]


# --- one precedence ------------------------------------------------------------------------


@pytest.mark.parametrize("consent, adult, outcome, status", [
    (0, 0, Outcome.NOT_AUTHORISED, ScoreStatus.NOT_AUTHORISED),  # a minor without consent: not authorised first
    (1, 0, Outcome.UNDER_18, ScoreStatus.UNDER_18),
    (0, 1, Outcome.NOT_AUTHORISED, ScoreStatus.NOT_AUTHORISED),
])
def test_one_precedence_in_every_api(secure, consent, adult, outcome, status):
    row = _row(secure, consent=consent, adult=adult)
    cid, token = citizen_id(row), secure.token(row)
    metro, app, office = secure.clients["metro_gateway"], secure.clients["citizen_app"], secure.clients["credit_office"]
    assert metro.check("metro_pay_later", token).outcome == outcome
    assert metro.check_batch("metro_pay_later", [token]).outcome(0) == outcome
    (streamed,) = list(metro.check_stream([("metro_pay_later", token)]))
    assert streamed.outcome == outcome
    err = _error(app.get_score, cid)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.reason == Outcome.Name(outcome)  # the ErrorInfo reason says which, as data
    (result,) = office.batch_scores([cid])
    assert result.status == status


# --- StreamCheck survives a bad message ---------------------------------------------------------


def test_stream_check_answers_a_bad_message_and_goes_on(secure):
    row = secure.fresh_row()
    token = secure.token(row)
    metro = secure.clients["metro_gateway"]
    requests = [
        ("metro_pay_later", token),
        ("no_such_scenario", token),
        ("metro_pay_later", token[:15]),
        ("bus_pay_later", token),  # configured, but not the metro gateway's to decide
        ("", token),
        ("metro_pay_later", token),
    ]
    answers = list(metro.check_stream(requests))
    assert [a.outcome for a in answers] == [
        Outcome.ALLOW, Outcome.UNKNOWN_SCENARIO, Outcome.INVALID_REQUEST, Outcome.SCENARIO_NOT_PERMITTED,
        Outcome.INVALID_REQUEST, Outcome.ALLOW,
    ]
    assert [a.request_id for a in answers] == list(range(1, 7))  # each answer is its own message's
    for bad in answers[1:5]:
        assert bad.decision_id == "" and not bad.allowed
    assert "16 bytes" in answers[2].detail and "card_token" in answers[2].detail
    assert "may not decide" in answers[3].detail
    assert answers[0].decision_id and answers[5].decision_id


def test_stream_check_refusals_are_not_disclosures(secure):
    """Nothing about a person is disclosed by a refused message: nothing is audited."""
    row = secure.fresh_row()
    metro, app = secure.clients["metro_gateway"], secure.clients["citizen_app"]
    secure.service.audit.flush()
    before = len(app.list_checks(citizen_id(row)))
    list(metro.check_stream([("bus_pay_later", secure.token(row)), ("nope", secure.token(row))]))
    secure.service.audit.flush()
    assert len(app.list_checks(citizen_id(row))) == before


def test_stream_check_still_ends_for_a_caller_that_may_not_stream(secure):
    """Authentication and the method grant are decided before the first message."""
    with pytest.raises(grpc.RpcError) as err:
        list(secure.clients["hospital"].check_stream([("medical_pay_later", secure.token(0))]))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


# --- record identity and history -----------------------------------------------------------------


def test_two_sources_may_use_the_same_record_id(secure):
    cid = citizen_id(secure.fresh_row())
    police, court = secure.clients["police"], secure.clients["court"]
    (p,) = police.ingest([Record(record_id="shared-7", citizen_id=cid, variable="traffic_violations", date=_today(secure), value=1)])
    (c,) = court.ingest([Record(record_id="shared-7", citizen_id=cid, variable="court_listed_dishonest_debtor",
                                date=_today(secure), value=1)])
    assert (p.status, p.source, c.status, c.source) == (Ack.ACCEPTED, "police", Ack.ACCEPTED, "court")
    assert secure.clients["citizen_app"].get_score(cid).hard_rule_applied  # the court's record was not dropped


def test_resending_a_record_is_a_duplicate_and_other_content_a_conflict_naming_the_field(secure):
    cid = citizen_id(secure.fresh_row())
    police = secure.clients["police"]
    rec = Record(record_id="dup-1", citizen_id=cid, variable="traffic_violations", date=_today(secure), value=1)
    (first,) = police.ingest([rec])
    (again,) = police.ingest([rec])
    assert (first.status, again.status) == (Ack.ACCEPTED, Ack.DUPLICATE)
    assert again.version == 1 and again.position == first.position
    changed = Record(record_id="dup-1", citizen_id=cid, variable="traffic_violations", date=_today(secure), value=2)
    err = _error(police.ingest, [changed])
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert err.reason == "RECORD_CONFLICT" and err.metadata.get("field") == "value"
    assert "dup-1" in err.details() and "value" in err.details()


def test_another_sources_record_is_not_found_like_one_never_used(secure):
    cid = citizen_id(secure.fresh_row())
    court, tax = secure.clients["court"], secure.clients["tax_bureau"]
    court.ingest([Record(record_id="court-only-1", citizen_id=cid, variable="contract_judgments_lost", date=_today(secure), value=1)])
    answers = []
    for record_id in ("court-only-1", "never-used-1"):
        for call in (lambda: tax.withdraw_record(record_id), lambda: tax.correct_record(record_id, _today(secure), 0),
                     lambda: tax.record_history(record_id)):
            err = _error(call)
            answers.append((err.code(), err.details().replace(record_id, "ID")))
    assert {code for code, _ in answers} == {grpc.StatusCode.NOT_FOUND}
    assert answers[:3] == answers[3:]  # the same words for "not yours" and "not there"
    err = _error(tax.withdraw_record, "court-only-1", source="court")
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED  # a source writes only as itself


def test_corrections_and_withdrawals_add_versions(secure):
    cid = citizen_id(secure.fresh_row())
    tax = secure.clients["tax_bureau"]
    day = _today(secure)
    (ack,) = tax.ingest([Record(record_id="hist-1", citizen_id=cid, variable="tax_arrears", date=day, value=1)])
    corrected = tax.correct_record("hist-1", day, 2.0)
    withdrawn = tax.withdraw_record("hist-1", repaired=True)
    assert (corrected.version, withdrawn.version) == (2, 3)
    assert ack.position < corrected.position < withdrawn.position
    history = tax.record_history("hist-1")
    assert history.source == "tax_bureau"
    assert [(v.version, v.value, v.status) for v in history.versions] == [(1, 1.0, "active"), (2, 2.0, "active"), (3, 2.0, "repaired")]
    assert {v.sent_by for v in history.versions} == {"tax_bureau"}
    assert [v.position for v in history.versions] == [ack.position, corrected.position, withdrawn.position]
    times = [v.received_at.ToNanoseconds() for v in history.versions]
    assert times == sorted(times) and times[0] > 0


# --- what reproduces a decision, and the replay ----------------------------------------------------


def test_decisions_and_scores_carry_what_reproduces_them(secure):
    row = secure.fresh_row()
    metro, app = secure.clients["metro_gateway"], secure.clients["citizen_app"]
    d = metro.check("metro_pay_later", secure.token(row))
    release = secure.service
    assert (d.model_version, d.calibration_version) == (release.model_version, release.calibration_version)
    assert d.rules_version == "min550+pay_later"
    assert d.records_position == secure.runtime.state.position > 0
    assert d.as_of_date == _today(secure)
    b = metro.check_batch("metro_pay_later", [secure.token(row)])
    assert (b.response.rules_version, b.response.records_position) == ("min550+pay_later", d.records_position)
    s = app.get_score(citizen_id(row))
    assert s.records_position == d.records_position and s.as_of_date == _today(secure)
    scenarios = {sc.name: sc for sc in metro.scenarios()}
    assert scenarios["campus_fitness"].rules_version == "min581"


def test_replay_gives_the_original_answer_after_the_records_changed(secure):
    """The appeal: a decision, then its citizen's records change; the replay recomputes the
    decision from the history as it stood and gets the original answer."""
    row = secure.fresh_row()
    cid, token = citizen_id(row), secure.token(row)
    metro, app, court = secure.clients["metro_gateway"], secure.clients["citizen_app"], secure.clients["court"]
    day = _today(secure)
    allowed = metro.check("metro_pay_later", token)
    viewed = app.get_score(cid)
    assert allowed.outcome == Outcome.ALLOW
    court.ingest([Record(record_id="appeal-1", citizen_id=cid, variable="court_listed_dishonest_debtor", date=day, value=1)])
    denied = metro.check("metro_pay_later", token)
    assert denied.outcome == Outcome.DENY_HARD_RULE
    court.correct_record("appeal-1", day, 2.0)  # and the record was corrected since
    app.revoke_consent(cid)  # and the citizen withdrew consent: the replays still see the past
    secure.service.audit.flush()

    first = app.replay_decision(allowed.decision_id, cid)
    assert (first.original.result, first.replayed_result, first.matches) == ("ALLOW", "ALLOW", True)
    assert first.original.records_position == allowed.records_position
    assert first.score == viewed.score and not first.hard_rule_applied
    second = app.replay_decision(denied.decision_id, cid)
    assert (second.replayed_result, second.matches, second.hard_rule_applied) == ("DENY_HARD_RULE", True, True)
    assert second.score <= 549 and "LA05" in second.reason_codes
    score = app.replay_decision(viewed.disclosure_id, cid)
    assert (score.replayed_result, score.score, score.matches) == ("SCORE_VIEWED", viewed.score, True)
    app.grant_consent(cid)


def test_replay_of_a_batch_item_and_unknown_ids(secure):
    row = secure.fresh_row()
    metro, app = secure.clients["metro_gateway"], secure.clients["citizen_app"]
    batch = metro.check_batch("metro_pay_later", [secure.token(row), b"\x00" * 16])
    secure.service.audit.flush()
    cid = citizen_id(row)
    item = app.replay_decision(batch.decision_id(0), cid)
    assert item.matches and item.original.result == "ALLOW"
    # an unknown card concerns nobody: the log counts it in the batch, no decision of its own
    err = _error(app.replay_decision, batch.decision_id(1), cid)
    assert err.code() == grpc.StatusCode.NOT_FOUND and err.reason == "UNKNOWN_DECISION"
    for bad in ("d-" + "0" * 32, "d-nothex", "not-an-id"):
        assert _error(app.replay_decision, bad, cid).code() == grpc.StatusCode.NOT_FOUND
    assert _error(app.replay_decision, "", cid).code() == grpc.StatusCode.INVALID_ARGUMENT
    # partners never replay: a replay discloses the score
    assert _error(metro.replay_decision, batch.decision_id(0)).code() == grpc.StatusCode.PERMISSION_DENIED


def test_decision_ids_reveal_neither_volume_nor_worker(secure):
    metro = secure.clients["metro_gateway"]
    token = secure.token(secure.fresh_row())
    ids = [metro.check("metro_pay_later", token).decision_id for _ in range(50)]
    assert all(re.fullmatch(r"d-[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == 50
    # consecutive ids of one worker share no prefix or suffix beyond chance
    common = [len(os.path.commonprefix([a[2:], b[2:]])) for a, b in zip(ids, ids[1:])]
    assert max(common) < 6
