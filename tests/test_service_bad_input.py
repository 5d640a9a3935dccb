"""Bad input through the real client: INVALID_ARGUMENT with a message that starts with the
offending field's name, nothing stored, and the server keeps serving.

Uses the session's ``served`` fixture (tests/conftest.py) and only citizen rows from 2400 on
(tests/test_service_integration.py takes the rows below).
"""

from __future__ import annotations

import math

import grpc
import pytest

from clients.client import Record
from qianjiang.v1 import eligibility_pb2, eligibility_pb2_grpc, records_pb2, score_pb2
from server.state import iso_of

Outcome = eligibility_pb2.Outcome
Ack = records_pb2.RecordAck
INVALID = grpc.StatusCode.INVALID_ARGUMENT

FIRST_ROW = 2400  # rows below belong to tests/test_service_integration.py
_used: set[int] = set()


def fresh_row(served, min_score: int = 600, zero: tuple[str, ...] = ()) -> int:
    """A consenting adult at or above min_score without a hard rule and with no feature in the
    ``zero`` variables, never handed out before."""
    st = served.runtime.state
    names = [v.name for v in served.runtime.spec.variables]
    for r in range(FIRST_ROW, st.n_citizens):
        if r in _used or any(st.features[r, names.index(z)] for z in zero):
            continue
        if st.consent[r] and st.adult[r] and not st.columns.flags[r] and st.defaults[r] == 0 and st.columns.score[r] >= min_score:
            _used.add(r)
            return r
    raise AssertionError("no citizen left")


@pytest.fixture(scope="module")
def probe(served):
    """A citizen the module never changes, whose answers prove the server still serves."""
    return fresh_row(served)


def still_serving(served, row: int) -> None:
    c = served.client
    score = c.get_score(served.citizen(row))
    assert score.score == int(served.runtime.state.columns.score[row])
    want = Outcome.ALLOW if score.score >= 581 else Outcome.DENY_BELOW_THRESHOLD
    assert c.check("campus_fitness", served.token(row)).outcome == want
    assert c.health() == "SERVING"


def invalid(fn, *args, field: str, **kw) -> str:
    """Call, expect INVALID_ARGUMENT whose message starts with ``field``; return the message."""
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    err = info.value
    assert err.code() == INVALID, (err.code(), err.details())
    assert err.details().startswith(field), err.details()
    return err.details()


def today(served) -> str:
    return iso_of(served.runtime.state.as_of_day)


def rec(served, record_id: str, row: int, **kw) -> Record:
    fields = dict(record_id=record_id, citizen_id=served.citizen(row), variable="traffic_violations",
                  date=today(served), value=1.0)  # the source: the caller's own namespace
    fields.update(kw)
    return Record(**fields)


# --- card tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize("token", [b"", b"x" * 15, b"x" * 17, b"x" * 32], ids=["empty", "15-bytes", "17-bytes", "32-bytes"])
def test_check_with_a_wrong_length_token_names_card_token(served, probe, token):
    invalid(served.client.check, "campus_fitness", token, field="card_token")
    still_serving(served, probe)


def test_check_with_an_empty_scenario_names_scenario(served, probe):
    invalid(served.client.check, "", served.token(probe), field="scenario")
    still_serving(served, probe)


@pytest.mark.parametrize("n_bytes", [1, 15, 17, 16 * 1000 + 5])
def test_batch_check_bytes_not_a_multiple_of_16_names_card_tokens(served, probe, n_bytes):
    invalid(served.client.check_batch, "metro_pay_later", b"\x01" * n_bytes, field="card_tokens")
    still_serving(served, probe)


def test_batch_check_above_the_limit_names_card_tokens(served, probe):
    tokens = served.token(probe) * 100_001
    message = invalid(served.client.check_batch, "metro_pay_later", tokens, field="card_tokens", timeout=20)
    assert "100000" in message.replace(",", "") or "100,000" in message
    still_serving(served, probe)


def test_batch_check_at_the_limit_is_answered(served, probe):
    batch = served.client.check_batch("campus_fitness", served.token(probe) * 100_000, timeout=20)
    want = served.client.check("campus_fitness", served.token(probe)).outcome
    assert len(batch.outcomes) == 100_000 and set(batch.outcomes) == {want}


def test_batch_get_scores_above_the_limit_names_citizen_ids(served, probe):
    ids = [served.citizen(i % 3000) for i in range(1001)]
    invalid(served.client.batch_scores, ids, field="citizen_ids")
    still_serving(served, probe)


def test_batch_get_scores_at_the_limit_is_answered(served, probe):
    ids = [served.citizen(i) for i in range(1000)]
    results = served.client.batch_scores(ids)
    assert [r.citizen_id for r in results] == ids


def test_batch_get_scores_with_a_malformed_id_names_it(served, probe):
    message = invalid(served.client.batch_scores, [served.citizen(probe), "bad id!"], field="citizen_ids")
    assert message.startswith("citizen_ids[1]")
    still_serving(served, probe)


# --- citizen ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("cid", ["", " ", "c 0001", "../c00000001", "c" * 65, "-c1", "汉字", "\nc1", "c1\r"],
                         ids=["empty", "space", "inner-space", "path", "too-long", "leading-dash", "non-ascii", "leading-newline", "trailing-cr"])
def test_malformed_citizen_id_names_citizen_id(served, probe, cid):
    invalid(served.client.get_score, cid, field="citizen_id")
    invalid(served.client.explain, cid, field="citizen_id")
    invalid(served.client.grant_consent, cid, field="citizen_id")
    invalid(served.client.revoke_consent, cid, field="citizen_id")
    invalid(served.client.upsert_citizen, cid, "1990-01-01", field="citizen_id")
    still_serving(served, probe)


def test_id_with_a_trailing_newline_is_invalid(served, probe):
    # Read-only calls only, so the buggy server stores nothing.
    invalid(served.client.get_score, served.citizen(probe) + "\n", field="citizen_id")
    invalid(served.client.batch_scores, [served.citizen(probe) + "\n"], field="citizen_ids[0]")
    still_serving(served, probe)


@pytest.mark.parametrize("birth", ["", "1990-13-01", "01/01/1990", "1990-02-30"])
def test_upsert_citizen_with_a_malformed_birth_date_names_birth_date(served, probe, birth):
    invalid(served.client.upsert_citizen, "bad-birth-1", birth, field="birth_date")
    still_serving(served, probe)


def test_upsert_citizen_born_in_the_future_names_birth_date(served, probe):
    tomorrow = iso_of(served.runtime.state.as_of_day + 1)
    invalid(served.client.upsert_citizen, "bad-birth-2", tomorrow, field="birth_date")
    # Nothing was created.
    with pytest.raises(grpc.RpcError) as info:
        served.client.get_score("bad-birth-2")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    still_serving(served, probe)


def test_register_card_with_a_wrong_length_token_names_card_token(served, probe):
    invalid(served.client.register_card, served.citizen(probe), b"short", field="card_token")
    still_serving(served, probe)


# --- withdraw and correct ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def stored_record(served):
    """One stored, active record of a citizen this module owns: (record_id, row)."""
    row = fresh_row(served)
    (ack,) = served.client.ingest([rec(served, "bad-stored-1", row)])
    assert ack.status == Ack.ACCEPTED
    return "bad-stored-1", row


@pytest.mark.parametrize("why", [0, 3, 7])
def test_withdraw_with_an_unknown_reason_names_why(served, probe, stored_record, why):
    record_id, row = stored_record
    before = served.client.get_score(served.citizen(row))
    req = records_pb2.WithdrawRecordRequest(record_id=record_id, why=why)
    invalid(served.client.records.WithdrawRecord, req, field="why", timeout=5)
    after = served.client.get_score(served.citizen(row))
    assert (after.score, after.raw_points) == (before.score, before.raw_points)  # still counts
    still_serving(served, probe)


@pytest.mark.parametrize("value, field", [(math.nan, "value"), (math.inf, "value"), (-1.0, "value")])
def test_correct_record_with_a_bad_value_names_value(served, probe, stored_record, value, field):
    record_id, row = stored_record
    before = served.client.get_score(served.citizen(row))
    invalid(served.client.correct_record, record_id, today(served), value, field=field)
    assert served.client.get_score(served.citizen(row)).raw_points == before.raw_points
    still_serving(served, probe)


@pytest.mark.parametrize("date", ["", "2024-02-30", "tomorrow", "FUTURE"])
def test_correct_record_with_a_bad_date_names_date(served, probe, stored_record, date):
    record_id, _ = stored_record
    if date == "FUTURE":
        date = iso_of(served.runtime.state.as_of_day + 1)
    invalid(served.client.correct_record, record_id, date, 1.0, field="date")
    still_serving(served, probe)


@pytest.mark.parametrize("record_id", ["", "bad id"])
def test_withdraw_or_correct_with_a_malformed_record_id_names_record_id(served, probe, record_id):
    invalid(served.client.withdraw_record, record_id, field="record_id")
    invalid(served.client.correct_record, record_id, today(served), 1.0, field="record_id")
    still_serving(served, probe)


# --- ingest -----------------------------------------------------------------------------------

BAD_RECORDS = {
    "nan-value": (dict(value=math.nan), "record.value"),
    "inf-value": (dict(value=math.inf), "record.value"),
    "negative-value": (dict(value=-1.0), "record.value"),
    "future-date": (dict(date="FUTURE"), "record.date"),
    "malformed-date": (dict(date="2024-13-40"), "record.date"),
    "not-a-date": (dict(date="last tuesday"), "record.date"),
    "empty-date": (dict(date=""), "record.date"),
    "unknown-variable": (dict(variable="jaywalking_minutes"), "record.variable"),
    "empty-variable": (dict(variable=""), "record.variable"),
    "scenario-on-positive-record": (dict(variable="volunteer_hours", value=5.0, scenario="metro_pay_later"), "record.scenario"),
    "scenario-not-pay-later": (dict(variable="transit_fare_defaults", scenario="campus_fitness"), "record.scenario"),
    "empty-record-id": (dict(record_id=""), "record.record_id"),
    "malformed-record-id": (dict(record_id="a b"), "record.record_id"),
    "malformed-citizen-id": (dict(citizen_id="c 1"), "record.citizen_id"),
    "empty-citizen-id": (dict(citizen_id=""), "record.citizen_id"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_ingest_bad_record_names_the_field_and_stores_nothing(served, probe, case):
    overrides, field = BAD_RECORDS[case]
    row = fresh_row(served)
    cid = served.citizen(row)
    before = served.client.get_score(cid)
    overrides = dict(overrides)
    if overrides.get("date") == "FUTURE":
        overrides["date"] = iso_of(served.runtime.state.as_of_day + 1)
    record_id = overrides.pop("record_id", f"bad-{case}")
    bad = rec(served, record_id, row, **overrides)
    invalid(served.client.ingest, [bad], field=field)
    after = served.client.get_score(cid)
    assert (after.score, after.raw_points, after.computed_at) == (before.score, before.raw_points, before.computed_at)
    assert served.runtime.state.defaults[row] == 0
    still_serving(served, probe)
    if "record_id" not in BAD_RECORDS[case][0] and "citizen_id" not in BAD_RECORDS[case][0]:
        good = rec(served, bad.record_id, row)  # nothing was stored under that id
        (ack,) = served.client.ingest([good])
        assert ack.status == Ack.ACCEPTED


def test_ingest_record_with_an_unknown_scenario_names_record_scenario(served, probe):
    row = fresh_row(served)
    bad = rec(served, "bad-unknown-scenario", row, variable="transit_fare_defaults", scenario="moon_pay_later")
    invalid(served.client.ingest, [bad], field="record.scenario")


def test_ingest_keeps_records_acknowledged_before_a_bad_one(served, probe):
    row = fresh_row(served, zero=("administrative_penalties", "tax_arrears"))
    cid = served.citizen(row)
    before = served.client.explain(cid)
    records = [
        rec(served, "bad-stream-good-1", row, variable="administrative_penalties"),
        rec(served, "bad-stream-good-2", row, variable="tax_arrears"),
        rec(served, "bad-stream-bad-3", row, value=math.nan),
        rec(served, "bad-stream-good-4", row, variable="loan_overdue_90d"),
    ]
    acks = []
    with pytest.raises(grpc.RpcError) as info:
        for ack in served.client.records.IngestRecords(iter(records), timeout=10):
            acks.append(ack)
    assert info.value.code() == INVALID
    assert info.value.details().startswith("record.value")
    assert [(a.record_id, a.status) for a in acks] == [("bad-stream-good-1", Ack.ACCEPTED), ("bad-stream-good-2", Ack.ACCEPTED)]

    # The two acknowledged records are stored and count; the ones from the bad one on are not.
    after = served.client.explain(cid)
    assert after.score.score < before.score.score
    delta = {b.variable: a.feature - b.feature for a, b in zip(after.variables, before.variables)}
    assert delta["administrative_penalties"] == pytest.approx(1.0, abs=1e-4)
    assert delta["tax_arrears"] == pytest.approx(1.0, abs=1e-4)
    assert delta["loan_overdue_90d"] == 0.0 and delta["traffic_violations"] == 0.0
    acks = served.client.ingest(records[:2] + [records[3]])
    assert [a.status for a in acks] == [Ack.DUPLICATE, Ack.DUPLICATE, Ack.ACCEPTED]
    still_serving(served, probe)


def test_ingest_into_an_unknown_citizen_keeps_earlier_records(served, probe):
    row = fresh_row(served)
    records = [
        rec(served, "bad-unknown-good-1", row),
        Record(record_id="bad-unknown-2", citizen_id="nobody-99", variable="traffic_violations",
               date=today(served), value=1.0, source="itest-bad"),
    ]
    acks = []
    with pytest.raises(grpc.RpcError) as info:
        for ack in served.client.records.IngestRecords(iter(records), timeout=10):
            acks.append(ack)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert [a.status for a in acks] == [Ack.ACCEPTED]
    assert served.client.ingest(records[:1])[0].status == Ack.DUPLICATE
    still_serving(served, probe)


# --- the limits that grpc itself enforces ---------------------------------------------------


def test_message_above_the_transport_limit_is_refused_and_the_server_keeps_serving(served, probe):
    # A channel that would send it: the server's own 4 MiB limit refuses it.
    req = eligibility_pb2.BatchCheckRequest(scenario="campus_fitness", card_tokens=b"\0" * (5 * 1024 * 1024))
    with grpc.insecure_channel(served.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = eligibility_pb2_grpc.EligibilityServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.BatchCheck(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    still_serving(served, probe)


def test_unknown_method_is_unimplemented(served, probe):
    call = served.client.channel.unary_unary(
        "/qianjiang.v1.ScoreService/GetEveryone",
        request_serializer=score_pb2.GetScoreRequest.SerializeToString,
        response_deserializer=score_pb2.Score.FromString,
    )
    with pytest.raises(grpc.RpcError) as info:
        call(score_pb2.GetScoreRequest(citizen_id="c00000001"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    still_serving(served, probe)


def test_compiled_outcome_codes_are_the_protos():
    """server/token_index.pyx hard-codes the Outcome values for its nogil loop."""
    import numpy as np

    from qianjiang.v1 import eligibility_pb2
    from server.scenarios import Outcome
    from server.token_index import TokenIndex, check_tokens

    for o in Outcome:
        assert eligibility_pb2.Outcome.Value(o.name) == o.value
    idx = TokenIndex.allocate(8)
    for row in range(6):
        idx.insert(bytes([row]) * 16, row)
    adult = np.array([0, 1, 1, 1, 1, 1], np.uint8)
    consent = np.array([1, 0, 1, 1, 1, 1], np.uint8)
    score = np.array([700, 700, 700, 700, 700, 500], np.int16)
    flags = np.array([0, 0, 1, 0, 0, 0], np.uint8)
    defaults = np.array([0, 0, 0, 4, 0, 0], np.uint32)
    subject = np.arange(10, 16, dtype=np.uint64)
    tokens = b"".join(bytes([r]) * 16 for r in range(6)) + b"\xff" * 16
    outcomes, subjects, allowed = check_tokens(idx, tokens, adult, consent, score, flags, defaults, subject, 600, True, 2)
    assert [Outcome(o).name for o in outcomes] == [
        "UNDER_18", "NOT_AUTHORISED", "DENY_HARD_RULE", "DENY_UNPAID_DEFAULT", "ALLOW", "DENY_BELOW_THRESHOLD", "UNKNOWN_CARD"]
    assert subjects.tolist() == [10, 11, 12, 13, 14, 15, 0] and allowed == 1
    outcomes, _, _ = check_tokens(idx, tokens, adult, consent, score, flags, defaults, subject, 600, False, 0)
    assert Outcome(outcomes[2]).name == "ALLOW" and Outcome(outcomes[3]).name == "ALLOW", "not pay-later: no hard rule or default"
