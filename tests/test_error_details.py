"""Structured errors through the real server and client: every error status carries
google.rpc details (an ErrorInfo with a stable reason, BadRequest for a bad field), so that
callers branch on data, not on the message (server/errors.py lists the reasons).

Uses the session's ``served`` fixture read-only (it changes no citizen), and a small server
of its own in token mode for identities, a record conflict and a store that refuses a write.
"""

from __future__ import annotations

import re
import sqlite3

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import CollectorRegistry

from clients.client import QianjiangClient, QianjiangError, Record
from server import errors
from server.app import Node, Runtime, ServerConfig, citizen_id
from server.metrics import Metrics
from server.state import iso_of
from server.store import Conflict, NotFound, RecordConflict, StoreError, StoreRejected, StoreUnavailable, WrongState

S = grpc.StatusCode


def refused(fn, *args, **kw) -> QianjiangError:
    with pytest.raises(QianjiangError) as info:
        fn(*args, **kw)
    err = info.value
    assert isinstance(err, grpc.RpcError) and err.domain == "qianjiang.v1", (err.code(), err.details(), err.domain)
    return err


def _rows(served, consent: int, adult: int) -> int:
    s = served.runtime.state
    n = s.n_citizens
    return int(np.flatnonzero((s.consent[:n] == consent) & (s.adult[:n] == adult))[0])


# --- through the session's server (insecure mode: every method allowed) ------------------------


def test_not_authorised_and_under_18_differ_by_reason_not_by_text(served):
    no_consent = refused(served.client.get_score, served.citizen(_rows(served, consent=0, adult=1)))
    minor = refused(served.client.get_score, served.citizen(_rows(served, consent=1, adult=0)))
    assert no_consent.code() == minor.code() == S.FAILED_PRECONDITION
    assert (no_consent.reason, minor.reason) == ("NOT_AUTHORISED", "UNDER_18")
    assert no_consent.field_violations == minor.field_violations == []
    # the human text is still the status's message
    assert "authorised" in no_consent.details() and "18" in minor.details()


def test_an_invalid_field_carries_a_bad_request_violation_naming_it(served):
    err = refused(served.client.check, "campus_fitness", b"x" * 15)
    assert err.code() == S.INVALID_ARGUMENT and err.reason == "INVALID_ARGUMENT"
    assert err.metadata == {"field": "card_token"}
    assert err.field_violations == [("card_token", err.details())]

    err = refused(served.client.batch_scores, [served.citizen(0), "bad id!"])
    assert err.metadata["field"] == "citizen_ids[1]"
    assert [f for f, _ in err.field_violations] == ["citizen_ids[1]"]


def test_unknown_scenario_and_unknown_citizen(served):
    err = refused(served.client.check, "城市-nowhere", served.token(0))
    assert (err.code(), err.reason) == (S.NOT_FOUND, "UNKNOWN_SCENARIO")
    assert err.metadata == {"scenario": "城市-nowhere"}  # non-ASCII survives the trailer
    err = refused(served.client.get_score, "c99999999")
    assert (err.code(), err.reason) == (S.NOT_FOUND, "UNKNOWN_CITIZEN")


def test_unknown_record_is_record_not_found(served):
    err = refused(served.client.withdraw_record, "ed-no-such-record")
    assert (err.code(), err.reason) == (S.NOT_FOUND, "RECORD_NOT_FOUND")


def test_a_failed_stream_has_the_details_too(served):
    """A bidi stream (IngestRecords) that ends with an error carries the same details: the
    interceptor's streaming path. Nothing is written (the citizen does not exist)."""
    record = Record(record_id="ed-nobody-1", citizen_id="ed-nobody", variable="traffic_violations",
                    date=iso_of(served.runtime.state.as_of_day), value=1.0, source="ed")
    err = refused(served.client.ingest, [record])
    assert (err.code(), err.reason) == (S.NOT_FOUND, "UNKNOWN_CITIZEN")


def test_raw_stub_errors_can_be_typed(served):
    from qianjiang.v1 import eligibility_pb2

    with pytest.raises(grpc.RpcError) as info:
        served.client.eligibility.Check(eligibility_pb2.CheckRequest(scenario="", card_token=served.token(0)), timeout=5)
    typed = QianjiangError.of(info.value)
    assert typed.reason == "INVALID_ARGUMENT" and typed.metadata == {"field": "scenario"}
    assert QianjiangError.of(typed) is typed


# --- identities and a store that refuses: a small server of this module's own -------------------

IDENTITIES = ("citizen_app", "hospital", "police")


def _token(identity: str) -> str:
    return f"ed-token-{identity}-0123456789abcdef"


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("error-details")
    tokens = data_dir / "tokens.toml"
    tokens.write_text("".join(f'"{_token(i)}" = "{i}"\n' for i in IDENTITIES))
    config = ServerConfig(data_dir=data_dir, seed_citizens=400, metrics_port=0, port=0, security="token", tokens_path=tokens)
    runtime = Runtime.prepare(config)
    node = Node(runtime, port=0, metrics=Metrics(CollectorRegistry())).start()
    runtime.load()
    node.attach()
    target = f"127.0.0.1:{node.port}"
    clients = {i: QianjiangClient(target, timeout=5, token=_token(i)) for i in IDENTITIES}
    clients[None] = QianjiangClient(target, timeout=5)
    yield runtime, clients
    for c in clients.values():
        c.close()
    node.drain(0)


def test_no_identity_and_a_refused_identity(secure):
    runtime, clients = secure
    err = refused(clients[None].check, "medical_pay_later", runtime.synthetic_card_token(0))
    assert (err.code(), err.reason) == (S.UNAUTHENTICATED, "UNAUTHENTICATED")
    err = refused(clients["hospital"].check, "metro_pay_later", runtime.synthetic_card_token(0))
    assert (err.code(), err.reason) == (S.PERMISSION_DENIED, "PERMISSION_DENIED")
    err = refused(clients["hospital"].get_score, citizen_id(0))
    assert (err.code(), err.reason) == (S.PERMISSION_DENIED, "PERMISSION_DENIED")


def test_a_write_the_store_rejects_is_not_unavailable(secure):
    """A write the store refuses for good (here a constraint: a trigger in the real SQLite
    file) must not be UNAVAILABLE, which the client would retry in vain."""
    runtime, clients = secure
    db_path = runtime.config.resolved_store_url.removeprefix("sqlite:///")
    db = sqlite3.connect(db_path)
    with db:
        db.execute("CREATE TRIGGER ed_reject BEFORE INSERT ON records WHEN NEW.record_id LIKE 'ed-reject-%' "
                   "BEGIN SELECT RAISE(ABORT, 'ed: rejected by a constraint'); END")
    db.close()
    day = iso_of(runtime.state.as_of_day)
    record = Record(record_id="ed-reject-1", citizen_id=citizen_id(1), variable="traffic_violations", date=day, value=1.0)
    with pytest.raises(QianjiangError) as info:
        clients["police"].ingest([record])
    err = info.value
    assert err.code() != S.UNAVAILABLE, err.details()
    assert sqlite3.connect(db_path).execute("SELECT COUNT(*) FROM records WHERE record_id = 'ed-reject-1'").fetchone() == (0,)
    assert (err.code(), err.reason) == (S.FAILED_PRECONDITION, "STORE_REJECTED")


def test_a_record_resent_with_other_content_is_a_record_conflict_naming_the_field(secure):
    runtime, clients = secure
    day = iso_of(runtime.state.as_of_day)
    first = Record(record_id="ed-conflict-1", citizen_id=citizen_id(2), variable="traffic_violations", date=day, value=1.0)
    clients["police"].ingest([first])
    again = Record(record_id="ed-conflict-1", citizen_id=citizen_id(2), variable="traffic_violations", date=day, value=2.0)
    err = refused(clients["police"].ingest, [again])
    assert (err.code(), err.reason, err.metadata) == (S.ALREADY_EXISTS, "RECORD_CONFLICT", {"field": "value"})


# --- the table ------------------------------------------------------------------------------------


def _status(exc) -> tuple[grpc.StatusCode, str, status_pb2.Status]:
    code, message, trailers = errors.status_of(exc)
    assert [k for k, _ in trailers] == ["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(trailers[0][1])
    assert (status.code, status.message) == (code.value[0], message)
    return code, message, status


def _info(status) -> error_details_pb2.ErrorInfo:
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


@pytest.mark.parametrize("exc, code, reason", [
    (StoreUnavailable("down"), S.UNAVAILABLE, "STORE_UNAVAILABLE"),
    (StoreRejected("violates a constraint"), S.FAILED_PRECONDITION, "STORE_REJECTED"),
    (StoreError("something unclassified"), S.UNKNOWN, "STORE_ERROR"),
    (NotFound("record 'r' not found"), S.NOT_FOUND, "RECORD_NOT_FOUND"),
    (NotFound("citizen 'c' not found"), S.NOT_FOUND, "UNKNOWN_CITIZEN"),
    (Conflict("card token ... is bound to another citizen"), S.ALREADY_EXISTS, "CONFLICT"),
    (WrongState("record 'r' is withdrawn"), S.FAILED_PRECONDITION, "RECORD_NOT_ACTIVE"),
    (errors.StreamLimit(8), S.RESOURCE_EXHAUSTED, "STREAM_LIMIT"),
])
def test_store_and_capacity_errors_map_to_their_status(exc, code, reason):
    got, message, status = _status(exc)
    assert (got, _info(status).reason, _info(status).domain) == (code, reason, "qianjiang.v1")
    assert message == str(exc)


def test_a_record_conflict_names_its_field():
    code, _, status = _status(RecordConflict("police", "r-1", "value"))
    assert (code, _info(status).reason, dict(_info(status).metadata)) == (S.ALREADY_EXISTS, "RECORD_CONFLICT", {"field": "value"})


def test_a_bug_is_internal_and_says_nothing_else():
    code, message, status = _status(KeyError("secret row 1234"))
    assert (code, message) == (S.INTERNAL, "internal error")
    assert len(status.details) == 1
    info = _info(status)
    assert (info.reason, info.domain, dict(info.metadata)) == ("INTERNAL", "qianjiang.v1", {})


def test_only_what_a_retry_can_fix_is_unavailable():
    """Clients retry UNAVAILABLE blindly: nothing that fails again may map to it."""
    unavailable = {cls for cls, kind in errors.ERRORS.items() if kind.code == S.UNAVAILABLE}
    assert {cls.__name__ for cls in unavailable} == {"StoreUnavailable", "AuditUnavailable", "NotReady"}


def test_every_reason_is_stable_upper_snake_and_documented():
    documented = set(re.findall(r"``([A-Z][A-Z0-9_]+)``", errors.__doc__))
    reasons = {kind.reason for kind in errors.ERRORS.values()} | {"UNKNOWN_CITIZEN", errors.INTERNAL.reason}
    assert all(re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*", r) for r in reasons)
    assert reasons <= documented, reasons - documented


def test_an_invalid_argument_has_one_field_violation():
    code, message, status = _status(errors.InvalidArgument("record.date", "is in the future"))
    bad = error_details_pb2.BadRequest()
    assert status.details[1].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [("record.date", message)]
