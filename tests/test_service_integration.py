"""Integration tests: the real client (clients/client.py) against the real server (the
session's ``served`` fixture: 3,000 synthetic citizens, in-process, port 0).

The fixture is shared by the whole session, so every test that changes a citizen takes
fresh rows from :data:`ROWS` (rows 0..2399 of the city; tests/test_service_bad_input.py
uses the rows above). Citizens changed here are remembered in :data:`CHANGED` so that the
restart test (last in this module) checks them too.
"""

from __future__ import annotations

import random
import re
import threading
import time

import grpc
import numpy as np
import pytest

from clients.client import QianjiangClient, Record
from qianjiang.v1 import common_pb2, eligibility_pb2, records_pb2, score_pb2
from server.state import iso_of

Outcome = eligibility_pb2.Outcome
Ack = records_pb2.RecordAck
ScoreStatus = score_pb2.ScoreResult.Status

SERVICES = ("qianjiang.v1.ScoreService", "qianjiang.v1.EligibilityService", "qianjiang.v1.RecordsService")

#: The seed's level table (2018 launch article): lower bound, level, Chinese name.
SEED_LEVELS = (
    (750, common_pb2.OUTSTANDING, "信用极好"),
    (700, common_pb2.EXCELLENT, "信用优秀"),
    (600, common_pb2.GOOD, "信用良好"),
    (550, common_pb2.FAIR, "信用一般"),
    (0, common_pb2.NEEDS_IMPROVEMENT, "信用待提高"),
)

#: The design's scenarios and thresholds (config/scenarios.toml, docs/product.md §4).
DESIGN_SCENARIOS = {
    "campus_fitness": (581, False),
    "bus_pay_later": (550, True),
    "metro_pay_later": (550, True),
    "medical_pay_later": (600, True),
    "public_rental_deposit_free": (650, False),
    "library_deposit_free": (550, False),
    "gym_booking": (580, False),
    "parking_booking": (600, True),
    "museum_signup": (550, False),
    "car_plate_lottery": (550, False),
    "second_hand_housing": (600, False),
}

FIRST_ROW, END_ROW = 0, 2400  # this module's rows; the bad-input module uses the rest


class Rows:
    """Hands out citizen rows at most once per module, chosen by what the serving state
    says about them now, so tests that change citizens never share one."""

    def __init__(self, first: int, end: int):
        self.first, self.end = first, end
        self.used: set[int] = set()

    def take(self, served, k: int = 1, *, consent: int | None = 1, adult: int | None = 1,
             hard_rule: bool | None = False, min_score: int | None = None, max_score: int | None = None,
             zero: tuple[str, ...] = ()) -> list[int]:
        """``zero``: variables the citizen has no feature in (so a new record surely moves the score)."""
        st = served.runtime.state
        end = min(self.end, st.n_citizens)
        rows = np.arange(self.first, end)
        score, flags = st.columns.score[self.first:end], st.columns.flags[self.first:end]
        ok = st.defaults[self.first:end] == 0
        if consent is not None:
            ok &= st.consent[self.first:end] == consent
        if adult is not None:
            ok &= st.adult[self.first:end] == adult
        if hard_rule is not None:
            ok &= ((flags & 1) != 0) == hard_rule
        if min_score is not None:
            ok &= score >= min_score
        if max_score is not None:
            ok &= score <= max_score
        names = [v.name for v in served.runtime.spec.variables]
        for name in zero:
            ok &= st.features[self.first:end, names.index(name)] == 0
        picked = [int(r) for r in rows[ok] if int(r) not in self.used][:k]
        assert len(picked) == k, f"not enough citizens left for {k} rows"
        self.used.update(picked)
        return picked

    def one(self, served, **kw) -> int:
        return self.take(served, 1, **kw)[0]


ROWS = Rows(FIRST_ROW, END_ROW)
CHANGED: set[str] = set()  # citizen ids changed by this module (the restart test re-reads them)
NEW_CARDS: dict[str, bytes] = {}  # cards of citizens created by this module


def today(served) -> str:
    return iso_of(served.runtime.state.as_of_day)


def record(served, record_id: str, row_or_id, variable: str, value: float = 1.0, scenario: str = "",
           date: str | None = None) -> Record:
    cid = served.citizen(row_or_id) if isinstance(row_or_id, int) else row_or_id
    CHANGED.add(cid)
    return Record(record_id=record_id, citizen_id=cid, variable=variable, date=date or today(served),
                  value=value, scenario=scenario)  # the source: the caller's own namespace


def outcome_of(served, scenario: str, row: int) -> int:
    return served.client.check(scenario, served.token(row)).outcome


def rpc_error(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    return info.value


def expected_level(score: int):
    for lower, level, zh in SEED_LEVELS:
        if score >= lower:
            return level, zh
    raise AssertionError(score)


# --- every distinct answer of Check ------------------------------------------------------------


def test_check_allows_a_consenting_adult_above_the_threshold(served):
    row = ROWS.one(served, min_score=650)
    d = served.client.check("public_rental_deposit_free", served.token(row))
    assert d.outcome == Outcome.ALLOW and d.allowed
    assert list(d.reason_codes) == []
    assert d.scenario == "public_rental_deposit_free"
    assert d.model_version == served.client.get_score(served.citizen(row)).model_version
    assert d.decision_id


def test_check_denies_below_the_scenario_threshold(served):
    row = ROWS.one(served, max_score=649)
    d = served.client.check("public_rental_deposit_free", served.token(row))
    assert d.outcome == Outcome.DENY_BELOW_THRESHOLD and not d.allowed
    assert list(d.reason_codes) == ["SCORE_BELOW_THRESHOLD"]


def test_check_denies_a_court_listed_debtor_by_hard_rule_until_repaired(served):
    row = ROWS.one(served, min_score=620)
    cid = served.citizen(row)
    assert outcome_of(served, "metro_pay_later", row) == Outcome.ALLOW
    (ack,) = served.client.ingest([record(served, "it-hard-1", row, "court_listed_dishonest_debtor")])
    assert ack.status == Ack.ACCEPTED

    d = served.client.check("metro_pay_later", served.token(row))
    assert d.outcome == Outcome.DENY_HARD_RULE and not d.allowed
    assert list(d.reason_codes) == ["HARD_RULE:LA05"]
    score = served.client.get_score(cid)
    assert score.hard_rule_applied and score.score <= 549
    # Not a pay-later scenario: the capped score is simply below its threshold.
    assert outcome_of(served, "campus_fitness", row) == Outcome.DENY_BELOW_THRESHOLD

    assert served.client.withdraw_record("it-hard-1", repaired=True).status == Ack.UPDATED
    assert outcome_of(served, "metro_pay_later", row) == Outcome.ALLOW
    assert not served.client.get_score(cid).hard_rule_applied


def test_check_hard_rule_codes_name_each_active_serious_record(served):
    row = ROWS.one(served, min_score=620)
    served.client.ingest([
        record(served, "it-hard-2a", row, "court_listed_dishonest_debtor"),
        record(served, "it-hard-2b", row, "blacklist_entries"),
    ])
    d = served.client.check("bus_pay_later", served.token(row))
    assert d.outcome == Outcome.DENY_HARD_RULE
    assert sorted(d.reason_codes) == ["HARD_RULE:LA05", "HARD_RULE:LA06"]


def test_check_denies_an_unpaid_default_in_the_same_pay_later_scenario_until_repaired(served):
    row = ROWS.one(served, min_score=620)
    assert outcome_of(served, "metro_pay_later", row) == Outcome.ALLOW
    (ack,) = served.client.ingest([record(served, "it-default-1", row, "transit_fare_defaults", scenario="metro_pay_later")])
    assert ack.status == Ack.ACCEPTED

    d = served.client.check("metro_pay_later", served.token(row))
    assert d.outcome == Outcome.DENY_UNPAID_DEFAULT and not d.allowed
    assert list(d.reason_codes) == ["UNPAID_DEFAULT"]
    # A default in the metro scenario does not block the bus scenario.
    assert outcome_of(served, "bus_pay_later", row) == Outcome.ALLOW

    assert served.client.withdraw_record("it-default-1", repaired=True).status == Ack.UPDATED
    assert outcome_of(served, "metro_pay_later", row) == Outcome.ALLOW


def test_check_a_default_without_a_scenario_is_no_unpaid_default(served):
    row = ROWS.one(served, min_score=620)
    served.client.ingest([record(served, "it-default-2", row, "transit_fare_defaults")])
    assert outcome_of(served, "metro_pay_later", row) == Outcome.ALLOW


def test_check_hard_rule_takes_precedence_over_unpaid_default(served):
    row = ROWS.one(served, min_score=620)
    served.client.ingest([
        record(served, "it-both-1", row, "transit_fare_defaults", scenario="metro_pay_later"),
        record(served, "it-both-2", row, "court_listed_dishonest_debtor"),
    ])
    assert outcome_of(served, "metro_pay_later", row) == Outcome.DENY_HARD_RULE


def test_check_unknown_card(served):
    token = random.Random(7).randbytes(16)
    d = served.client.check("campus_fitness", token)
    assert d.outcome == Outcome.UNKNOWN_CARD and not d.allowed
    assert list(d.reason_codes) == ["UNKNOWN_CARD"]


def test_check_not_authorised_without_consent(served):
    row = ROWS.one(served, consent=0, min_score=0)
    d = served.client.check("library_deposit_free", served.token(row))
    assert d.outcome == Outcome.NOT_AUTHORISED and not d.allowed
    assert list(d.reason_codes) == ["NOT_AUTHORISED"]
    assert rpc_error(served.client.get_score, served.citizen(row)).code() == grpc.StatusCode.FAILED_PRECONDITION


def test_check_under_18_for_a_consenting_minor(served):
    row = ROWS.one(served, adult=0, hard_rule=None)
    d = served.client.check("library_deposit_free", served.token(row))
    assert d.outcome == Outcome.UNDER_18 and not d.allowed
    assert list(d.reason_codes) == ["UNDER_18"]
    err = rpc_error(served.client.get_score, served.citizen(row))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_check_not_authorised_comes_before_under_18(served):
    """Without consent nothing about the person is disclosed, not even that they are a minor
    (the one precedence: tests/test_contracts.py checks it in every API)."""
    row = ROWS.one(served, adult=0, consent=0, hard_rule=None)
    assert outcome_of(served, "library_deposit_free", row) == Outcome.NOT_AUTHORISED


def test_check_unknown_scenario_is_not_found(served):
    row = ROWS.one(served)
    err = rpc_error(served.client.check, "moon_pay_later", served.token(row))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "moon_pay_later" in err.details()


def test_decision_never_carries_the_score(served):
    fields = {f.name for f in eligibility_pb2.Decision.DESCRIPTOR.fields}
    assert fields == {"outcome", "allowed", "reason_codes", "decision_id", "model_version", "scenario", "request_id",
                      "calibration_version", "rules_version", "records_position", "as_of_date", "detail"}
    assert not any(word in f for f in fields for word in ("score", "points", "level", "percentile", "citizen"))
    for row in ROWS.take(served, 3, min_score=0):
        score = served.client.get_score(served.citizen(row)).score
        for scenario in ("campus_fitness", "metro_pay_later", "public_rental_deposit_free"):
            d = served.client.check(scenario, served.token(row))
            assert not any(str(score) in code for code in d.reason_codes)
            assert served.citizen(row) not in str(d)
            assert d.request_id != score and d.outcome != score


def test_decision_ids_are_unique(served):
    row = ROWS.one(served)
    ids = {served.client.check("campus_fitness", served.token(row)).decision_id for _ in range(20)}
    assert len(ids) == 20


# --- campus fitness follows the seed: above 580 ----------------------------------------------


def test_campus_fitness_allows_from_581_for_everyone_in_the_city(served):
    st = served.runtime.state
    n = served.config.seed_citizens  # the seeded city, each with its synthetic card (other tests add people)
    tokens = [served.token(r) for r in range(n)]
    result = served.client.check_batch("campus_fitness", tokens)
    got = np.frombuffer(result.outcomes, np.uint8)
    score, adult, consent = st.columns.score[:n], st.adult[:n], st.consent[:n]
    want = np.where(score >= 581, Outcome.ALLOW, Outcome.DENY_BELOW_THRESHOLD)
    want = np.where(adult == 0, Outcome.UNDER_18, want)
    want = np.where(consent == 0, Outcome.NOT_AUTHORISED, want)  # before the age
    assert got.tolist() == want.tolist()
    scored = (adult == 1) & (consent == 1)
    # The boundary itself is exercised: the city has consenting adults on both sides of it.
    assert ((score == 581) & scored).any() and ((score == 580) & scored).any()
    assert (got[(score == 581) & scored] == Outcome.ALLOW).all()
    assert (got[(score == 580) & scored] == Outcome.DENY_BELOW_THRESHOLD).all()


# --- consent ---------------------------------------------------------------------------------


def test_revoked_consent_takes_effect_on_the_very_next_request_and_grant_restores(served):
    row = ROWS.one(served, min_score=600)
    cid, token = served.citizen(row), served.token(row)
    CHANGED.add(cid)
    before = served.client.get_score(cid)
    assert served.client.check("medical_pay_later", token).outcome == Outcome.ALLOW

    state = served.client.revoke_consent(cid)
    assert state.citizen_id == cid and not state.granted
    assert served.client.check("medical_pay_later", token).outcome == Outcome.NOT_AUTHORISED
    assert rpc_error(served.client.get_score, cid).code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_error(served.client.explain, cid).code() == grpc.StatusCode.FAILED_PRECONDITION
    (res,) = served.client.batch_scores([cid])
    assert res.status == ScoreStatus.NOT_AUTHORISED

    state = served.client.grant_consent(cid)
    assert state.granted
    assert served.client.check("medical_pay_later", token).outcome == Outcome.ALLOW
    assert served.client.get_score(cid).score == before.score


def test_consent_for_an_unknown_citizen_is_not_found(served):
    assert rpc_error(served.client.grant_consent, "nobody-here").code() == grpc.StatusCode.NOT_FOUND


# --- records ---------------------------------------------------------------------------------


def test_ingested_record_changes_score_and_decision_and_duplicate_changes_nothing(served):
    row = ROWS.one(served, min_score=700, zero=("welfare_fraud",))
    cid, token = served.citizen(row), served.token(row)
    before = served.client.get_score(cid)
    assert served.client.check("public_rental_deposit_free", token).outcome == Outcome.ALLOW

    rec = record(served, "it-rec-1", row, "welfare_fraud")
    (ack,) = served.client.ingest([rec])
    assert (ack.record_id, ack.status) == ("it-rec-1", Ack.ACCEPTED)
    after = served.client.get_score(cid)
    assert after.score < 650 <= before.score
    assert "SC02" in [r.code for r in after.reasons]
    assert served.client.check("public_rental_deposit_free", token).outcome == Outcome.DENY_BELOW_THRESHOLD

    # The same record again: DUPLICATE; the same id with other content: a conflict naming the
    # field (never a silent drop). Neither changes anything.
    again = record(served, "it-rec-1", row, "welfare_fraud", value=5.0)
    rescores = served.metric("qianjiang_rescores_total")
    (dup_ack,) = served.client.ingest([rec])
    err = rpc_error(served.client.ingest, [again])
    assert served.metric("qianjiang_rescores_total") == rescores
    assert dup_ack.status == Ack.DUPLICATE
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and err.metadata["field"] == "value"
    dup = served.client.get_score(cid)
    assert (dup.score, dup.raw_points, list(dup.reasons)) == (after.score, after.raw_points, list(after.reasons))
    assert dup.computed_at == after.computed_at


def test_correct_and_withdraw_record_rescore(served):
    row = ROWS.one(served, min_score=640, zero=("administrative_penalties",))
    cid = served.citizen(row)
    base = served.client.get_score(cid)
    served.client.ingest([record(served, "it-rec-2", row, "administrative_penalties", value=1.0)])
    one = served.client.get_score(cid)
    assert one.score < base.score

    # Correct it: dated 400 days ago, a general record (1 year) no longer counts.
    old = iso_of(served.runtime.state.as_of_day - 400)
    ack = served.client.correct_record("it-rec-2", old, 1.0)
    assert (ack.record_id, ack.status) == ("it-rec-2", Ack.UPDATED)
    assert served.client.get_score(cid).score == base.score

    # Correct it back to today: counts again.
    served.client.correct_record("it-rec-2", today(served), 1.0)
    assert served.client.get_score(cid).score == one.score

    ack = served.client.withdraw_record("it-rec-2")
    assert ack.status == Ack.UPDATED
    gone = served.client.get_score(cid)
    assert (gone.score, gone.raw_points, list(gone.reasons)) == (base.score, base.raw_points, list(base.reasons))


def test_correct_or_withdraw_an_unknown_record_is_not_found(served):
    assert rpc_error(served.client.correct_record, "it-no-such-record", today(served), 1.0).code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(served.client.withdraw_record, "it-no-such-record").code() == grpc.StatusCode.NOT_FOUND


def test_correcting_a_withdrawn_record_is_failed_precondition(served):
    row = ROWS.one(served)
    served.client.ingest([record(served, "it-rec-withdrawn", row, "traffic_violations")])
    served.client.withdraw_record("it-rec-withdrawn")
    before = served.client.get_score(served.citizen(row))
    err = rpc_error(served.client.correct_record, "it-rec-withdrawn", today(served), 3.0)
    assert served.client.get_score(served.citizen(row)).raw_points == before.raw_points  # nothing changed
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_positive_record_raises_the_score(served):
    row = ROWS.one(served, min_score=560, max_score=640, zero=("honours",))
    cid = served.citizen(row)
    before = served.client.get_score(cid).score
    served.client.ingest([record(served, "it-rec-3", row, "honours", value=1.0)])
    assert served.client.get_score(cid).score > before


def test_record_for_an_unknown_citizen_is_not_found(served):
    err = rpc_error(served.client.ingest, [record(served, "it-rec-4", "it-nobody", "honours")])
    CHANGED.discard("it-nobody")
    assert err.code() == grpc.StatusCode.NOT_FOUND


# --- score reads -----------------------------------------------------------------------------


def test_get_score_dimensions_level_and_reasons(served):
    spec = served.runtime.spec
    for row in ROWS.take(served, 25, min_score=0, hard_rule=None):
        s = served.client.get_score(served.citizen(row))
        assert s.citizen_id == served.citizen(row)
        assert s.score == int(served.runtime.state.columns.score[row])
        assert [d.dimension for d in s.dimensions] == ["identity", "law_abiding", "social_credit", "commercial_credit", "prosocial"]
        assert all(d.name_zh and d.name_en for d in s.dimensions)
        assert abs(sum(d.points for d in s.dimensions) - s.raw_points) <= 1e-9
        assert (s.level, s.level_zh) == expected_level(s.score)
        assert 0.0 < s.percentile < 1.0
        assert len(s.reasons) <= 4
        lost = [r.points_lost for r in s.reasons]
        assert lost == sorted(lost, reverse=True) and all(x > 0 for x in lost)
        names = {v.name: v for v in spec.variables}
        for r in s.reasons:
            assert r.text_zh and r.text_en and r.improve_zh and r.improve_en
            assert names[r.variable].reason.code == r.code
        assert s.model_version and s.calibration_version
        assert s.computed_at.seconds > 0


def test_check_echoes_the_request_id(served):
    row = ROWS.one(served)
    req = eligibility_pb2.CheckRequest(scenario="campus_fitness", card_token=served.token(row), request_id=2**63 + 5)
    assert served.client.eligibility.Check(req, timeout=5).request_id == 2**63 + 5


def test_get_score_unknown_citizen_is_not_found(served):
    assert rpc_error(served.client.get_score, "c99999999").code() == grpc.StatusCode.NOT_FOUND


def test_explain_score_returns_every_variable_consistent_with_the_score(served):
    for row in ROWS.take(served, 5, min_score=0, hard_rule=None):
        _check_explanation(served, row)


def _check_explanation(served, row: int) -> None:
    spec = served.runtime.spec
    e = served.client.explain(served.citizen(row))
    score = served.client.get_score(served.citizen(row))
    assert e.score.disclosure_id != score.disclosure_id, "each disclosure gets its own audit id"
    e.score.ClearField("disclosure_id")
    score.ClearField("disclosure_id")
    assert e.score == score
    assert [v.variable for v in e.variables] == [v.name for v in spec.variables]
    assert [(v.dimension, v.direction) for v in e.variables] == [(v.dimension, v.direction) for v in spec.variables]
    weights = {d.name: d.weight for d in spec.dimensions}
    for dim in e.score.dimensions:
        total = sum(v.points for v in e.variables if v.dimension == dim.dimension) * weights[dim.dimension]
        assert abs(total - dim.points) <= 1e-9
    for v in e.variables:
        assert v.feature >= 0
        assert v.points <= v.best_points + 1e-12
    # The reasons are the (at most 4) variables that lost the most weighted points, ties to
    # the earlier variable.
    loss = sorted((-(v.best_points - v.points) * weights[v.dimension], i) for i, v in enumerate(e.variables))
    top = [e.variables[i].variable for neg, i in loss if neg < 0][:4]
    assert [r.variable for r in e.score.reasons] == top
    assert [r.points_lost for r in e.score.reasons] == [-neg for neg, i in loss if neg < 0][:4]


def test_batch_get_scores_in_request_order_with_statuses(served):
    ok_rows = ROWS.take(served, 2, min_score=0, hard_rule=None)
    no_consent = ROWS.one(served, consent=0, hard_rule=None)
    minor = ROWS.one(served, adult=0, hard_rule=None)
    ids = [served.citizen(ok_rows[0]), "c99999998", served.citizen(no_consent), served.citizen(minor),
           served.citizen(ok_rows[1]), served.citizen(ok_rows[0])]
    results = served.client.batch_scores(ids, purpose="service_verification")
    assert [r.citizen_id for r in results] == ids
    assert [r.status for r in results] == [
        ScoreStatus.OK, ScoreStatus.NOT_FOUND, ScoreStatus.NOT_AUTHORISED, ScoreStatus.UNDER_18, ScoreStatus.OK, ScoreStatus.OK,
    ]
    for r in (results[0], results[4]):
        single = served.client.get_score(r.citizen_id)
        assert (r.score.score, r.score.raw_points, list(r.score.reasons)) == (single.score, single.raw_points, list(single.reasons))
    assert not results[1].HasField("score") and not results[2].HasField("score") and not results[3].HasField("score")


# --- batch and stream checks -------------------------------------------------------------------


def _mixed_tokens(served, n_known: int, n_unknown: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    rows = rng.sample(range(served.runtime.state.n_citizens), n_known)
    tokens = [served.token(r) for r in rows] + [rng.randbytes(16) for _ in range(n_unknown)]
    rng.shuffle(tokens)
    return tokens


@pytest.mark.parametrize("scenario", ["metro_pay_later", "campus_fitness"])
def test_batch_check_matches_unary_check_in_request_order(served, scenario):
    tokens = _mixed_tokens(served, 180, 20, seed=11)
    batch = served.client.check_batch(scenario, tokens)
    assert len(batch.outcomes) == len(tokens)
    unary = [served.client.check(scenario, t).outcome for t in tokens]
    assert list(batch.outcomes) == unary
    assert unary.count(Outcome.UNKNOWN_CARD) == 20
    assert batch.allowed == unary.count(Outcome.ALLOW)
    assert batch.model_version == served.client.check(scenario, tokens[0]).model_version


def test_batch_check_response_fields_and_decision_ids(served):
    tokens = _mixed_tokens(served, 40, 5, seed=12)
    resp = served.client.eligibility.BatchCheck(
        eligibility_pb2.BatchCheckRequest(scenario="bus_pay_later", card_tokens=b"".join(tokens)), timeout=5)
    assert resp.count == 45 and len(resp.outcomes) == 45 and resp.scenario == "bus_pay_later"
    assert resp.allowed == sum(o == Outcome.ALLOW for o in resp.outcomes)
    other = served.client.check_batch("bus_pay_later", tokens)
    assert resp.batch_id and other.batch_id and resp.batch_id != other.batch_id
    unary_ids = {served.client.check("bus_pay_later", t).decision_id for t in tokens}
    batch_ids = {f"{resp.batch_id}-{i}" for i in range(45)} | {other.decision_id(i) for i in range(45)}
    assert len(batch_ids) == 90 and not batch_ids & unary_ids
    assert other.decision_id(7) == f"{other.batch_id}-7"


def test_batch_check_of_nothing(served):
    batch = served.client.check_batch("campus_fitness", b"")
    assert batch.outcomes == b"" and batch.allowed == 0


def test_stream_check_answers_in_order_with_request_ids(served):
    scenarios = ["metro_pay_later", "campus_fitness", "public_rental_deposit_free", "medical_pay_later", "library_deposit_free"]
    tokens = _mixed_tokens(served, 45, 5, seed=13)
    requests = [(scenarios[i % len(scenarios)], t) for i, t in enumerate(tokens)]
    decisions = list(served.client.check_stream(requests, timeout=20))
    assert len(decisions) == 50
    assert [d.request_id for d in decisions] == list(range(1, 51))
    assert [d.scenario for d in decisions] == [s for s, _ in requests]
    assert [d.outcome for d in decisions] == [served.client.check(s, t).outcome for s, t in requests]
    assert all(d.allowed == (d.outcome == Outcome.ALLOW) for d in decisions)
    assert len({d.decision_id for d in decisions}) == 50


def test_stream_check_answers_an_unknown_scenario_and_goes_on(served):
    row = ROWS.one(served)
    requests = [("campus_fitness", served.token(row)), ("nowhere", served.token(row)), ("campus_fitness", served.token(row))]
    got = list(served.client.check_stream(requests, timeout=10))
    assert [d.request_id for d in got] == [1, 2, 3]
    assert [d.outcome for d in got] == [Outcome.ALLOW, Outcome.UNKNOWN_SCENARIO, Outcome.ALLOW]
    assert "nowhere" in got[1].detail and got[1].scenario == "nowhere"


def test_list_scenarios_has_the_design_scenarios(served):
    got = {s.name: s for s in served.client.scenarios()}
    assert set(got) == set(DESIGN_SCENARIOS)
    for name, (min_score, pay_later) in DESIGN_SCENARIOS.items():
        assert (got[name].min_score, got[name].pay_later) == (min_score, pay_later), name
        assert got[name].name_zh and got[name].name_en
    assert got["campus_fitness"].min_score == 581 and got["campus_fitness"].name_zh == "校园健身"


# --- new citizens ------------------------------------------------------------------------------


def test_new_adult_citizen_becomes_checkable(served):
    cid, token = "it-new-adult-1", random.Random(21).randbytes(16)
    CHANGED.add(cid)
    NEW_CARDS[cid] = token
    assert served.client.check("library_deposit_free", token).outcome == Outcome.UNKNOWN_CARD
    ack = served.client.upsert_citizen(cid, "1990-01-01")
    assert (ack.citizen_id, ack.created) == (cid, True)
    assert served.client.upsert_citizen(cid, "1990-01-01").created is False
    reg = served.client.register_card(cid, token)
    assert (reg.citizen_id, reg.created) == (cid, True)
    assert served.client.register_card(cid, token).created is False
    # New citizens have not authorised anything yet.
    assert served.client.check("library_deposit_free", token).outcome == Outcome.NOT_AUTHORISED
    assert served.client.grant_consent(cid).granted
    score = served.client.get_score(cid)
    assert score.citizen_id == cid and 0 <= score.score <= 1000
    want = Outcome.ALLOW if score.score >= 550 else Outcome.DENY_BELOW_THRESHOLD
    assert served.client.check("library_deposit_free", token).outcome == want
    # Records for the new citizen count.
    served.client.ingest([record(served, "it-new-rec-1", cid, "court_listed_dishonest_debtor")])
    assert served.client.check("metro_pay_later", token).outcome == Outcome.DENY_HARD_RULE


def test_new_minor_citizen_is_under_18(served):
    cid, token = "it-new-minor-1", random.Random(22).randbytes(16)
    CHANGED.add(cid)
    NEW_CARDS[cid] = token
    assert served.client.upsert_citizen(cid, "2015-01-01").created
    served.client.register_card(cid, token)
    served.client.grant_consent(cid)
    assert served.client.check("library_deposit_free", token).outcome == Outcome.UNDER_18
    assert rpc_error(served.client.get_score, cid).code() == grpc.StatusCode.FAILED_PRECONDITION
    (res,) = served.client.batch_scores([cid])
    assert res.status == ScoreStatus.UNDER_18


def test_upsert_of_an_existing_citizen_re_derives_adulthood(served):
    row = ROWS.one(served, min_score=0)
    cid, token = served.citizen(row), served.token(row)
    CHANGED.add(cid)
    score = served.client.get_score(cid).score
    assert served.client.upsert_citizen(cid, "2015-06-01").created is False
    assert served.client.check("library_deposit_free", token).outcome == Outcome.UNDER_18
    assert rpc_error(served.client.get_score, cid).code() == grpc.StatusCode.FAILED_PRECONDITION
    served.client.upsert_citizen(cid, "1980-06-01")
    assert served.client.get_score(cid).score == score


def test_a_second_card_for_a_citizen_answers_like_the_first(served):
    row = ROWS.one(served, min_score=0)
    extra = random.Random(23).randbytes(16)
    NEW_CARDS[f"second-card-{row}"] = extra
    assert served.client.register_card(served.citizen(row), extra).created
    for scenario in ("campus_fitness", "metro_pay_later"):
        assert served.client.check(scenario, extra).outcome == served.client.check(scenario, served.token(row)).outcome


def test_card_bound_to_another_citizen_is_refused(served):
    row, other = ROWS.take(served, 2)
    err = rpc_error(served.client.register_card, served.citizen(other), served.token(row))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert served.token(row).hex() not in err.details()
    assert served.client.get_score(served.citizen(row)).score == int(served.runtime.state.columns.score[row])
    # The card still belongs to its holder.
    assert served.runtime.state.tokens.get(served.token(row)) == row


# --- health, reflection, metrics, deadlines --------------------------------------------------


def test_health_is_serving(served):
    assert served.client.health() == "SERVING"
    for name in SERVICES:
        assert served.client.health(name) == "SERVING"


def test_reflection_lists_the_three_services(served):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(served.client.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="qianjiang.v1.EligibilityService"),
    ]
    listed, file_resp = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    names = {s.name for s in listed.list_services_response.service}
    assert set(SERVICES) <= names
    assert "grpc.health.v1.Health" in names
    assert file_resp.file_descriptor_response.file_descriptor_proto


def _labels(service: str, method: str, rpc_type: str = "unary") -> dict:
    return dict(grpc_type=rpc_type, grpc_service=service, grpc_method=method)


def test_metrics_count_a_check_with_its_labels(served):
    row = ROWS.one(served, min_score=600)
    labels = _labels("qianjiang.v1.EligibilityService", "Check")
    names = [
        ("grpc_server_handled_total", dict(labels, grpc_code="OK")),
        ("grpc_server_started_total", labels),
        ("grpc_server_handling_seconds_count", labels),
        ("qianjiang_decisions_total", dict(scenario="medical_pay_later", outcome="ALLOW")),
    ]
    before = [served.metric(n, **l) for n, l in names]
    assert served.client.check("medical_pay_later", served.token(row)).outcome == Outcome.ALLOW
    after = [served.metric(n, **l) for n, l in names]
    assert [a - b for a, b in zip(after, before)] == [1, 1, 1, 1]


def test_metrics_count_an_ingest_rescore_and_store_write(served):
    row = ROWS.one(served)
    names = [
        ("qianjiang_rescores_total", {}),
        ("qianjiang_rescore_seconds_count", {}),
        ("qianjiang_store_write_seconds_count", dict(operation="add_records")),
        ("grpc_server_handled_total", dict(_labels("qianjiang.v1.RecordsService", "IngestRecords", "bidi_stream"), grpc_code="OK")),
    ]
    before = [served.metric(n, **l) for n, l in names]
    served.client.ingest([record(served, "it-metric-1", row, "volunteer_hours", value=3.0)])
    after = [served.metric(n, **l) for n, l in names]
    assert [a - b for a, b in zip(after, before)] == [1, 1, 1, 1]


def test_metrics_count_batch_decisions_per_outcome(served):
    tokens = _mixed_tokens(served, 30, 7, seed=14)
    outcomes = list(served.client.check_batch("gym_booking", tokens).outcomes)
    names = ("ALLOW", "DENY_BELOW_THRESHOLD", "UNKNOWN_CARD", "NOT_AUTHORISED", "UNDER_18")
    before = {o: served.metric("qianjiang_decisions_total", scenario="gym_booking", outcome=o) for o in names}
    served.client.check_batch("gym_booking", tokens)
    for o in names:
        got = served.metric("qianjiang_decisions_total", scenario="gym_booking", outcome=o) - before[o]
        assert got == outcomes.count(getattr(Outcome, o)), o


def test_metrics_count_an_error_with_its_code(served):
    labels = _labels("qianjiang.v1.EligibilityService", "Check")
    before_nf = served.metric("grpc_server_handled_total", **labels, grpc_code="NOT_FOUND")
    before_ok = served.metric("grpc_server_handled_total", **labels, grpc_code="OK")
    before_started = served.metric("grpc_server_started_total", **labels)
    rpc_error(served.client.check, "no_such_scenario", served.token(0))
    assert served.metric("grpc_server_handled_total", **labels, grpc_code="NOT_FOUND") == before_nf + 1
    assert served.metric("grpc_server_handled_total", **labels, grpc_code="OK") == before_ok
    assert served.metric("grpc_server_started_total", **labels) == before_started + 1

    score_labels = _labels("qianjiang.v1.ScoreService", "GetScore")
    before_fp = served.metric("grpc_server_handled_total", **score_labels, grpc_code="FAILED_PRECONDITION")
    minor = ROWS.one(served, adult=0, hard_rule=None)
    rpc_error(served.client.get_score, served.citizen(minor))
    assert served.metric("grpc_server_handled_total", **score_labels, grpc_code="FAILED_PRECONDITION") == before_fp + 1


def test_metrics_count_streams(served):
    labels = _labels("qianjiang.v1.EligibilityService", "StreamCheck", "bidi_stream")
    before = served.metric("grpc_server_handled_total", **labels, grpc_code="OK")
    list(served.client.check_stream([("campus_fitness", served.token(1))] * 3, timeout=10))
    assert served.metric("grpc_server_handled_total", **labels, grpc_code="OK") == before + 1


def test_no_metric_label_carries_a_citizen_id_or_token(served):
    # Make sure every kind of call has been counted at least once.
    row = ROWS.one(served)
    served.client.check("campus_fitness", served.token(row))
    served.client.get_score(served.citizen(row))
    served.client.batch_scores([served.citizen(row), "it-unknown-x"])
    rpc_error(served.client.check, "nope", served.token(row))
    st = served.runtime.state
    token_hex = {served.token(r).hex() for r in range(st.n_citizens)}
    token_hex |= {t.hex() for t in NEW_CARDS.values()}
    person = re.compile(r"c\d{8}|[0-9a-fA-F]{32}")
    seen = 0
    for family in served.registry.collect():
        for sample in family.samples:
            for value in sample.labels.values():
                seen += 1
                assert not person.search(value), (sample.name, value)
                assert value not in token_hex and value not in CHANGED and "it-unknown-x" not in value, (sample.name, value)
    assert seen > 0


def test_deadline_exceeded_and_the_server_keeps_serving(served):
    # grpc deadlines have millisecond resolution and a unary Check is answered in-process in
    # well under a millisecond, so the calls here are ones that cannot finish in 1 µs.
    row = ROWS.one(served)
    err = rpc_error(served.client.check_batch, "campus_fitness", served.token(row) * 100_000, timeout=1e-6)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    release = threading.Event()

    def requests():  # the second request only comes after the deadline
        yield ("campus_fitness", served.token(row))
        release.wait(5)

    try:
        with pytest.raises(grpc.RpcError) as info:
            list(served.client.check_stream(requests(), timeout=1e-6))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        release.set()
    assert served.client.check("campus_fitness", served.token(row)).outcome in (Outcome.ALLOW, Outcome.DENY_BELOW_THRESHOLD)
    assert served.client.health() == "SERVING"


def _wait_for_handled(served, labels: dict, codes, before: dict, timeout: float = 3.0) -> dict:
    """Deltas of grpc_server_handled_total per code, once the server has counted one call."""
    end = time.monotonic() + timeout
    while True:
        delta = {c: served.metric("grpc_server_handled_total", **labels, grpc_code=c) - before[c] for c in codes}
        if sum(delta.values()) >= 1 or time.monotonic() > end:
            return delta
        time.sleep(0.02)


def test_stream_ended_by_the_client_deadline_is_counted_as_deadline_exceeded(served, caplog):
    labels = _labels("qianjiang.v1.EligibilityService", "StreamCheck", "bidi_stream")
    codes = ("OK", "INTERNAL", "DEADLINE_EXCEEDED", "CANCELLED")
    before = {c: served.metric("grpc_server_handled_total", **labels, grpc_code=c) for c in codes}
    row = ROWS.one(served)
    release = threading.Event()

    def requests():
        yield ("campus_fitness", served.token(row))
        release.wait(5)

    try:
        with pytest.raises(grpc.RpcError) as info:
            for _ in served.client.check_stream(requests(), timeout=0.3):
                pass
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        release.set()
    delta = _wait_for_handled(served, labels, codes, before)
    assert delta["OK"] == 0 and delta["INTERNAL"] == 0
    assert delta["DEADLINE_EXCEEDED"] + delta["CANCELLED"] == 1
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]


# --- restart: the same data gives the same scores (keep last: it re-reads CHANGED) -------------


def _all_results(client: QianjiangClient, ids: list[str]) -> list[score_pb2.ScoreResult]:
    out = []
    for i in range(0, len(ids), 1000):
        out.extend(client.batch_scores(ids[i:i + 1000]))
    for r in out:
        r.score.ClearField("computed_at")
        r.score.ClearField("disclosure_id")  # every disclosure has its own id
    return out


def test_restart_gives_the_same_scores_and_decisions(served):
    from prometheus_client import CollectorRegistry

    from server.app import Node, Runtime
    from server.metrics import Metrics

    # Changes of its own, so the check does not depend on which other tests ran.
    row_rec, row_default, row_withdrawn, row_revoked = ROWS.take(served, 4, min_score=600)
    c = served.client
    c.ingest([
        record(served, "it-rs-1", row_rec, "loan_overdue_90d", value=2.0),
        record(served, "it-rs-2", row_default, "transit_fare_defaults", scenario="bus_pay_later"),
        record(served, "it-rs-3", row_withdrawn, "criminal_convictions"),
        record(served, "it-rs-4", row_withdrawn, "volunteer_hours", value=40.0),
    ])
    c.correct_record("it-rs-1", iso_of(served.runtime.state.as_of_day - 100), 3.0)
    c.withdraw_record("it-rs-3")
    c.revoke_consent(served.citizen(row_revoked))
    CHANGED.add(served.citizen(row_revoked))
    assert c.check("bus_pay_later", served.token(row_default)).outcome == Outcome.DENY_UNPAID_DEFAULT

    n = served.runtime.state.n_citizens
    ids = sorted(set(served.citizen(r) for r in range(min(n, 3000))) | CHANGED)
    first = _all_results(c, ids)
    tokens = b"".join(served.token(r) for r in range(min(n, 3000)))
    first_outcomes = {s: c.check_batch(s, tokens).outcomes for s in ("bus_pay_later", "metro_pay_later", "campus_fitness")}

    runtime = Runtime.prepare(served.config)
    node = Node(runtime, port=0, metrics=Metrics(CollectorRegistry())).start()
    try:
        with QianjiangClient(f"127.0.0.1:{node.port}", timeout=10) as c2:
            # Started but not loaded: health says so and the services answer UNAVAILABLE.
            assert c2.health() == "NOT_SERVING"
            assert c2.health("qianjiang.v1.EligibilityService") == "NOT_SERVING"
            err = rpc_error(c2.check, "campus_fitness", served.token(0))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            runtime.load()
            node.attach()
            assert c2.health() == "SERVING"
            second = _all_results(c2, ids)
            assert len(second) == len(first)
            diffs = [(a.citizen_id, a.status, a.score.score, b.status, b.score.score)
                     for a, b in zip(first, second) if a != b]
            assert diffs == []
            assert {r.citizen_id for r in second if r.status == ScoreStatus.OK} >= {
                served.citizen(row_rec), served.citizen(row_default), served.citizen(row_withdrawn)}
            for s, outcomes in first_outcomes.items():
                assert c2.check_batch(s, tokens).outcomes == outcomes, s
            for cid, tok in NEW_CARDS.items():
                assert c2.check("metro_pay_later", tok).outcome == c.check("metro_pay_later", tok).outcome, cid
    finally:
        node.drain(0)
