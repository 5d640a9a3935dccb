"""The citizen bound to the request (server/end_user.py): a citizen app's calls about a person
carry the end user it authenticated, signed with its Ed25519 key; the service lets the call
reach only that citizen, and the audit log says the request was the citizen's own. Through
the real client against a real server in token mode, plus the assertion's time rules."""

from __future__ import annotations

import os
import stat

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clients.client import QianjiangClient
from conftest import SecureServer, dev_token
from qianjiang.v1 import audit_pb2, eligibility_pb2, records_pb2, score_pb2
from server.app import citizen_id
from server.end_user import (
    MAX_LIFETIME_S, METADATA_KEY, key_dir, load_private_key, load_public_keys, sign_assertion, verify_assertion,
)
from server.errors import Unauthenticated

#: A second citizen app, to show one app cannot speak for another's users.
SECOND_APP = """
[callers.health_app]
role = "citizen_app"
methods = ["ScoreService/GetScore", "AuditService/ListChecks"]
"""


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    s = SecureServer(tmp_path_factory.mktemp("end-user"), n_citizens=300, extra_policy=SECOND_APP)
    yield s
    s.close()


def _raw(secure, identity="citizen_app"):
    """The app's client without automatic signing: the test sets the header itself."""
    return QianjiangClient(secure.target, timeout=5, token=dev_token(identity))


def _key(secure, identity="citizen_app") -> Ed25519PrivateKey:
    return load_private_key(key_dir(secure.config.data_dir) / f"{identity}.key")


def _get(client, cid, header=None):
    md = None if header is None else ((METADATA_KEY, header),) if isinstance(header, str) else header
    return client.scores.GetScore(score_pb2.GetScoreRequest(citizen_id=cid, purpose="citizen_app_view"), timeout=5,
                                  metadata=md)


def _code(fn, *args):
    with pytest.raises(grpc.RpcError) as err:
        fn(*args)
    return err.value.code(), err.value.details()


def test_a_signed_call_reads_its_citizen_and_the_audit_says_it_was_theirs(secure):
    row = secure.fresh_row()
    cid = citizen_id(row)
    app = secure.clients["citizen_app"]
    viewed = app.get_score(cid)
    secure.clients["metro_gateway"].check("metro_pay_later", secure.token(row))
    secure.service.audit.flush()
    entries = {e.decision_id: e for e in app.list_checks(cid)}
    mine = entries[viewed.disclosure_id]
    assert (mine.caller, mine.by_the_citizen, mine.result) == ("citizen_app", True, "SCORE_VIEWED")
    gate = [e for e in entries.values() if e.caller == "metro_gateway"]
    assert gate and not gate[0].by_the_citizen
    # the appeal replay of the citizen's own disclosure is theirs too
    assert app.replay_decision(viewed.disclosure_id, cid).matches


def test_no_assertion_is_unauthenticated_for_every_call_about_a_person(secure):
    cid = citizen_id(secure.fresh_row())
    raw = _raw(secure)
    try:
        calls = {
            "GetScore": lambda: _get(raw, cid),
            "ExplainScore": lambda: raw.scores.ExplainScore(score_pb2.GetScoreRequest(citizen_id=cid), timeout=5),
            "SimulateScore": lambda: raw.scores.SimulateScore(score_pb2.SimulateScoreRequest(citizen_id=cid), timeout=5),
            "ListChecks": lambda: raw.audit.ListChecks(audit_pb2.ListChecksRequest(citizen_id=cid), timeout=5),
            "RevokeConsent": lambda: raw.revoke_consent(cid),
        }
        for name, call in calls.items():
            code, details = _code(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED and METADATA_KEY in details, name
        # nothing about a person: no end user needed
        assert raw.eligibility.ListScenarios(eligibility_pb2.ListScenariosRequest(), timeout=5).scenarios
        assert secure.clients["citizen_app"].get_score(cid).score  # the consent was never revoked
    finally:
        raw.close()


def test_a_call_bound_to_one_citizen_cannot_reach_another(secure):
    me, other = citizen_id(secure.fresh_row()), citizen_id(secure.fresh_row())
    raw = _raw(secure)
    key = _key(secure)
    try:
        header = sign_assertion(key, "citizen_app", me)
        assert _get(raw, me, header).citizen_id == me
        code, details = _code(_get, raw, other, header)
        assert code == grpc.StatusCode.PERMISSION_DENIED and other not in details and me not in details
        code, _ = _code(lambda: raw.audit.ListChecks(audit_pb2.ListChecksRequest(citizen_id=other), timeout=5,
                                                     metadata=((METADATA_KEY, header),)))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, _ = _code(lambda: raw.records.RevokeConsent(records_pb2.ConsentRequest(citizen_id=other), timeout=5,
                                                          metadata=((METADATA_KEY, header),)))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert secure.clients["citizen_app"].get_score(other).score  # still authorised: nothing was revoked
        # a decision about someone else is not theirs to replay
        viewed = secure.clients["citizen_app"].get_score(other)
        secure.service.audit.flush()
        code, _ = _code(lambda: raw.audit.ReplayDecision(audit_pb2.ReplayDecisionRequest(decision_id=viewed.disclosure_id),
                                                         timeout=5, metadata=((METADATA_KEY, header),)))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    finally:
        raw.close()


def test_forged_stale_and_foreign_assertions_are_refused(secure):
    cid = citizen_id(secure.fresh_row())
    raw, other_app = _raw(secure), _raw(secure, "health_app")
    key, stranger = _key(secure), Ed25519PrivateKey.generate()
    good = sign_assertion(key, "citizen_app", cid)
    body = good.split(".")
    cases = {
        "another key": sign_assertion(stranger, "citizen_app", cid),
        "expired": sign_assertion(key, "citizen_app", cid, lifetime_s=1, now=0),
        "too long": sign_assertion(key, "citizen_app", cid, lifetime_s=MAX_LIFETIME_S + 1),
        "garbage": "v1.!!!.???",
        "not v1": "v2." + ".".join(body[1:]),
        "tampered": ".".join([body[0], body[1][:-2] + ("A" if body[1][-2] != "A" else "B") + body[1][-1], body[2]]),
    }
    try:
        for name, header in cases.items():
            code, _ = _code(_get, raw, cid, header)
            assert code == grpc.StatusCode.UNAUTHENTICATED, name
        code, details = _code(_get, raw, cid, ((METADATA_KEY, good), (METADATA_KEY, good)))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "2 times" in details
        # one app's assertion is not another's: checked with the calling app's key
        code, details = _code(_get, other_app, cid, good)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "health_app" in details
        own = sign_assertion(_key(secure, "health_app"), "citizen_app", cid)  # its own key, claiming the other
        code, details = _code(_get, other_app, cid, own)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "issued by 'citizen_app'" in details
        assert _get(other_app, cid, sign_assertion(_key(secure, "health_app"), "health_app", cid)).score
    finally:
        raw.close()
        other_app.close()


def test_assertion_time_rules():
    key = Ed25519PrivateKey.generate()
    keys = {"app": key.public_key()}
    t = 1_900_000_000
    header = sign_assertion(key, "app", "c1", now=t, lifetime_s=120)
    assert verify_assertion(header, keys, "app", now=t + 119) == "c1"
    with pytest.raises(Unauthenticated, match="expired"):
        verify_assertion(header, keys, "app", now=t + 120)
    with pytest.raises(Unauthenticated, match="in the future"):
        verify_assertion(header, keys, "app", now=t - 61)
    assert verify_assertion(header, keys, "app", now=t - 59) == "c1"  # clock skew tolerated
    with pytest.raises(Unauthenticated, match="no end-user key"):
        verify_assertion(header, keys, "other", now=t)
    with pytest.raises(Unauthenticated, match="longer than"):
        verify_assertion("v1." + "A" * 2000 + ".B", keys, "app", now=t)


def test_development_makes_the_key_pair_and_production_requires_it(tmp_path):
    keys = load_public_keys(tmp_path, ["citizen_app"], create=True)
    private = key_dir(tmp_path) / "citizen_app.key"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert load_public_keys(tmp_path, ["citizen_app"], create=False)["citizen_app"].public_bytes_raw() == \
        keys["citizen_app"].public_bytes_raw()  # kept, not made again
    with pytest.raises(ValueError, match=r"end_user/other_app.pub: the Ed25519 public key citizen app 'other_app'"):
        load_public_keys(tmp_path, ["other_app"], create=False)


def test_the_command_line_signs_for_the_citizen_it_names(secure):
    """``qjscore score C --end-user-key PEM`` against a token-mode server: bound to C; the
    same command without the key is refused with the server's reason, no traceback."""
    from tests.test_cli import qj, refused

    cid = citizen_id(secure.fresh_row())
    key = str(key_dir(secure.config.data_dir) / "citizen_app.key")
    common = ["--target", secure.target, "--token", dev_token("citizen_app")]
    out = qj("score", cid, "--end-user-key", key, "--json", *common)
    assert out.returncode == 0, out.stderr
    checks = qj("checks", cid, "--end-user-key", key, *common)
    assert "citizen_app (you asked)" in checks.stdout, checks.stdout
    refused(qj("score", cid, *common), "qj-end-user")
