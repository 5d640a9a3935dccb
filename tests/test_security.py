"""Security and privacy through the real client and server: authentication, the policy
matrix (callers x methods x scenarios x record types), the audit log of every disclosure,
and no identifiers in logs."""

from __future__ import annotations

import logging
import os

import grpc
import pytest
from prometheus_client import CollectorRegistry

from clients.client import QianjiangClient, Record
from conftest import STRANGER, SecureServer
from qianjiang.v1 import audit_pb2, eligibility_pb2, records_pb2, score_pb2
from server.app import Node, Runtime, ServerConfig, citizen_id
from server.auth import load_policy
from server.metrics import Metrics

POLICY = load_policy()
IDENTITIES = sorted(POLICY.callers) + [STRANGER]


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    s = SecureServer(tmp_path_factory.mktemp("secure"))
    yield s
    s.close()


def test_no_or_a_wrong_token_is_unauthenticated(secure):
    row = secure.fresh_row()
    for client in (QianjiangClient(secure.target), QianjiangClient(secure.target, token="not-a-known-token-at-all")):
        with client:
            for call in (
                lambda: client.get_score(citizen_id(row)),
                lambda: client.check("metro_pay_later", secure.runtime.synthetic_card_token(row)),
                lambda: client.scenarios(),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with QianjiangClient(secure.target) as anonymous:
        assert anonymous.health() == "SERVING", "health needs no identity"


def test_refusals_do_not_reveal_whether_a_person_exists(secure):
    hospital = secure.clients["hospital"]
    real = secure.runtime.synthetic_card_token(secure.fresh_row())
    for token in (real, os.urandom(16)):
        with pytest.raises(grpc.RpcError) as err:
            hospital.check("metro_pay_later", token)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "metro_pay_later" in err.value.details() and token.hex() not in err.value.details()
    for cid in (citizen_id(secure.fresh_row()), "c99999999"):
        with pytest.raises(grpc.RpcError) as err:
            secure.clients["metro_gateway"].get_score(cid)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert cid not in err.value.details()


def _calls(secure, row: int, identity: str):
    """Every rpc of the three services with a valid request: method -> callable."""
    c = secure.clients[identity]
    cid = citizen_id(row)
    token = secure.runtime.synthetic_card_token(row)
    bound = c._for(cid)  # a citizen app's calls carry the citizen it signs for (server/end_user.py)
    return {
        "ScoreService/SimulateScore": lambda: c.scores.SimulateScore(score_pb2.SimulateScoreRequest(citizen_id=cid, purpose="citizen_app_view"), timeout=5, metadata=bound),
        "ScoreService/GetScore": lambda: c.scores.GetScore(score_pb2.GetScoreRequest(citizen_id=cid, purpose="citizen_app_view"), timeout=5, metadata=bound),
        "ScoreService/ExplainScore": lambda: c.scores.ExplainScore(score_pb2.GetScoreRequest(citizen_id=cid, purpose="citizen_app_view"), timeout=5, metadata=bound),
        "ScoreService/BatchGetScores": lambda: c.scores.BatchGetScores(score_pb2.BatchGetScoresRequest(citizen_ids=[cid], purpose="citizen_app_view"), timeout=5, metadata=bound),
        "EligibilityService/ListScenarios": lambda: c.eligibility.ListScenarios(eligibility_pb2.ListScenariosRequest(), timeout=5, metadata=bound),
        "RecordsService/GrantConsent": lambda: c.records.GrantConsent(records_pb2.ConsentRequest(citizen_id=cid), timeout=5, metadata=bound),
        "RecordsService/RevokeConsent": lambda: (c.records.RevokeConsent(records_pb2.ConsentRequest(citizen_id=cid), timeout=5, metadata=bound),
                                                 secure.clients["citizen_app"].grant_consent(cid)),
        "RecordsService/UpsertCitizen": lambda: c.records.UpsertCitizen(records_pb2.Citizen(citizen_id=f"m-{identity}", birth_date="1990-01-01"), timeout=5, metadata=bound),
        "RecordsService/RegisterCard": lambda: c.records.RegisterCard(records_pb2.RegisterCardRequest(citizen_id=cid, card_token=token), timeout=5, metadata=bound),
        "AuditService/ListChecks": lambda: c.audit.ListChecks(audit_pb2.ListChecksRequest(citizen_id=cid), timeout=5, metadata=bound),
    }


@pytest.mark.parametrize("identity", IDENTITIES)
def test_policy_matrix_of_methods(secure, identity):
    caller = POLICY.caller(identity)
    row = secure.fresh_row()
    for method, call in _calls(secure, row, identity).items():
        if caller.may_call(method):
            result = call()
            if method in ("ScoreService/GetScore", "ScoreService/ExplainScore", "ScoreService/SimulateScore"):
                msg = {"ScoreService/ExplainScore": lambda r: r.score, "ScoreService/SimulateScore": lambda r: r.current}.get(
                    method, lambda r: r)(result)
                secure.disclosed.append(msg.disclosure_id)
            if method == "ScoreService/BatchGetScores":
                secure.disclosed.extend(r.score.disclosure_id for r in result.results if r.score.disclosure_id)
        else:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (identity, method)


@pytest.mark.parametrize("identity", IDENTITIES)
def test_policy_matrix_of_scenarios(secure, identity):
    """A metro gateway may check metro_pay_later and nothing else; a hospital only
    medical_pay_later; and so on for every caller x scenario, unary and batch."""
    caller = POLICY.caller(identity)
    client = secure.clients[identity]
    row = secure.fresh_row()
    token = secure.runtime.synthetic_card_token(row)
    for scenario in secure.runtime.scenarios:
        for method in ("EligibilityService/Check", "EligibilityService/BatchCheck"):
            allowed = caller.may_call(method) and caller.may_decide(scenario)
            call = (lambda: client.check(scenario, token)) if method.endswith("/Check") else (lambda: client.check_batch(scenario, token * 3))
            if allowed:
                result = call()
                if method.endswith("/Check"):
                    assert result.outcome in (1, 2) and not hasattr(result, "score")
                    secure.disclosed.append(result.decision_id)
                else:
                    secure.disclosed.extend(result.decision_id(i) for i in range(3))
            else:
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (identity, scenario, method)


@pytest.mark.parametrize("identity", IDENTITIES)
def test_policy_matrix_of_record_types(secure, identity):
    """Only data sources ingest, each only its own record types; corrections and
    withdrawals too."""
    caller = POLICY.caller(identity)
    client = secure.clients[identity]
    cid = citizen_id(secure.fresh_row())
    for k, var in enumerate(secure.runtime.spec.variables):
        rid = f"mx-{identity}-{k}"
        record = Record(record_id=rid, citizen_id=cid, variable=var.name, date="2026-01-05", value=1.0)
        allowed = caller.may_call("RecordsService/IngestRecords") and caller.may_write(var.name)
        if allowed:
            (ack,) = client.ingest([record])
            assert ack.status == records_pb2.RecordAck.ACCEPTED
            assert ack.source == identity, "the source is the authenticated caller"
            assert secure.service.store.get_record(identity, rid).sent_by == identity
            client.correct_record(rid, "2026-01-06", 2.0)
            client.withdraw_record(rid, repaired=True)
        else:
            with pytest.raises(grpc.RpcError) as err:
                client.ingest([record])
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (identity, var.name)


def test_a_source_cannot_touch_another_sources_records(secure):
    """A source's record ids are its own namespace: another source's id is not found, in the
    same words as an id never used (tests/test_contracts.py checks the words)."""
    cid = citizen_id(secure.fresh_row())
    (ack,) = secure.clients["court"].ingest([Record(record_id="court-1", citizen_id=cid, variable="court_listed_dishonest_debtor", date="2026-02-01", value=1)])
    tax = secure.clients["tax_bureau"]
    for call in (lambda: tax.withdraw_record("court-1"), lambda: tax.correct_record("court-1", "2026-02-01", 0)):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    for call in (lambda: tax.withdraw_record("court-1", source="court"), lambda: tax.correct_record("court-1", "2026-02-01", 0, source="court")):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert secure.clients["citizen_app"].get_score(cid).hard_rule_applied  # the court's record still counts


def test_every_disclosure_is_in_the_audit_log_exactly_once(secure):
    """Runs after the matrices above (same module): each score view and decision a caller
    received appears exactly once, with the caller, and the citizen can list it."""
    row = secure.fresh_row()
    cid = citizen_id(row)
    token = secure.runtime.synthetic_card_token(row)
    d1 = secure.clients["metro_gateway"].check("metro_pay_later", token).decision_id
    d2 = secure.clients["hospital"].check("medical_pay_later", token).decision_id
    batch = secure.clients["bus_gateway"].check_batch("bus_pay_later", token + os.urandom(16))
    s1 = secure.clients["citizen_app"].get_score(cid, purpose="citizen_app_view").disclosure_id
    secure.disclosed += [d1, d2, batch.decision_id(0), s1]
    secure.node.audit.flush()
    # an unknown card concerns nobody: counted in its batch's header, not an entry of its own
    (header,) = [b for b in secure.node.audit.batches() if b.batch_id == batch.batch_id]
    assert (header.known, header.unknown, header.caller) == (1, 1, "bus_gateway")
    entries = secure.node.audit.entries()
    ids = [e.decision_id for e in entries]
    assert len(ids) == len(set(ids)), "no entry twice"
    missing = set(secure.disclosed) - set(ids)
    assert not missing, f"disclosures missing from the audit log: {sorted(missing)[:5]}"
    mine = secure.clients["citizen_app"].list_checks(cid)
    by_id = {e.decision_id: e for e in mine}
    assert [d1, d2, batch.decision_id(0), s1] == [x for x in (d1, d2, batch.decision_id(0), s1) if x in by_id]
    assert by_id[d1].caller == "metro_gateway" and by_id[d1].scenario == "metro_pay_later"
    assert by_id[d2].caller == "hospital" and by_id[s1].result == "SCORE_VIEWED"
    assert batch.decision_id(1) not in by_id, "an unknown card is nobody's check"
    times = [e.time.ToNanoseconds() for e in mine]
    assert times == sorted(times, reverse=True), "newest first"


def test_no_identifier_reaches_the_logs(secure, caplog):
    row = secure.fresh_row()
    cid, token = citizen_id(row), secure.runtime.synthetic_card_token(row)
    caplog.set_level(logging.DEBUG)
    app = secure.clients["citizen_app"]
    app.get_score(cid)
    for bad in (lambda: app.get_score(cid + "x"), lambda: secure.clients["metro_gateway"].check("metro_pay_later", token[:5])):
        with pytest.raises(grpc.RpcError):
            bad()
    text = caplog.text
    assert cid not in text and token.hex() not in text


# --- mutual TLS with real certificates ----------------------------------------------------------


@pytest.fixture(scope="module")
def mtls(tmp_path_factory):
    from server import tls

    base = tmp_path_factory.mktemp("mtls")
    certs = base / "certs"
    tls.make_dev_pki(certs, callers=["metro_gateway", "citizen_app"])
    config = ServerConfig(data_dir=base / "data", seed_citizens=800, metrics_port=0, port=0, security="mtls", cert_dir=certs, host="127.0.0.1")
    runtime = Runtime.prepare(config)
    node = Node(runtime, port=0, metrics=Metrics(CollectorRegistry())).start()
    runtime.load()
    node.attach()
    yield node, runtime, certs, f"localhost:{node.port}"
    node.drain(0)


def test_mtls_caller_identity_comes_from_its_certificate(mtls):
    node, runtime, certs, target = mtls
    with QianjiangClient(target, cert_dir=str(certs), caller="metro_gateway") as metro:
        assert metro.check("metro_pay_later", runtime.synthetic_card_token(0)).outcome > 0
        with pytest.raises(grpc.RpcError) as err:
            metro.check("medical_pay_later", runtime.synthetic_card_token(0))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _refused(target, credentials) -> grpc.StatusCode:
    channel = grpc.secure_channel(target, credentials)
    try:
        from qianjiang.v1 import eligibility_pb2_grpc

        eligibility_pb2_grpc.EligibilityServiceStub(channel).ListScenarios(eligibility_pb2.ListScenariosRequest(), timeout=3)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()


def test_mtls_refuses_no_certificate_another_ca_and_an_expired_one(mtls, tmp_path):
    from server import tls

    node, runtime, certs, target = mtls
    ca = (certs / "ca.pem").read_bytes()
    assert _refused(target, grpc.ssl_channel_credentials(root_certificates=ca)) != grpc.StatusCode.OK
    other = tmp_path / "other"
    tls.make_dev_pki(other, callers=["metro_gateway"])
    foreign = grpc.ssl_channel_credentials(ca, (other / "metro_gateway.key").read_bytes(), (other / "metro_gateway.pem").read_bytes())
    assert _refused(target, foreign) != grpc.StatusCode.OK
    expired_cert, expired_key = tls.make_expired_client_cert(certs, "metro_gateway", tmp_path)
    expired = grpc.ssl_channel_credentials(ca, expired_key.read_bytes(), expired_cert.read_bytes())
    assert _refused(target, expired) != grpc.StatusCode.OK
    good = grpc.ssl_channel_credentials(ca, (certs / "metro_gateway.key").read_bytes(), (certs / "metro_gateway.pem").read_bytes())
    assert _refused(target, good) == grpc.StatusCode.OK


def test_insecure_mode_is_refused_off_loopback(tmp_path):
    with pytest.raises(ValueError, match="only allowed on a loopback address"):
        Runtime.prepare(ServerConfig(data_dir=tmp_path, seed_citizens=10, host="0.0.0.0", security="insecure"))
