"""The audit log cannot be filled or polluted by a caller, through the real server in token
mode: score reads name a configured purpose (never free text), and a caller's batch checks
are bounded in card tokens a second (each token is a disclosure the log writes)."""

from __future__ import annotations

import os
import time

import grpc
import pytest

from conftest import SecureServer
from server.purposes import PurposeConfigError, load_purposes
from server.quotas import TokenBuckets

BATCH_RATE = 3000  # card tokens a second per caller, small for the test


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    s = SecureServer(tmp_path_factory.mktemp("audit-flood"), n_citizens=600, batch_tokens_per_second=BATCH_RATE)
    yield s
    s.close()


def test_score_reads_name_a_configured_purpose(secure):
    from server.app import citizen_id

    app = secure.clients["citizen_app"]
    cid = citizen_id(secure.fresh_row())
    assert app.get_score(cid, purpose="citizen_app_view").score > 0
    audit = secure.node.audit
    codes_before = len(audit._codes["scenario"])
    for k in range(200):  # the attack: a new purpose every call, one a national id
        with pytest.raises(grpc.RpcError) as err:
            app.get_score(cid, purpose=f"p{k}" if k else "330106199001011234")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.field_violations[0][0] == "purpose"
    assert len(audit._codes["scenario"]) == codes_before, "no made-up purpose reached the audit dictionary"
    audit.flush()
    seen = {e.scenario for e in app.list_checks(cid) if e.method.startswith("ScoreService/")}
    assert seen == {"citizen_app_view"}
    assert "330106199001011234" not in b"".join(p.read_bytes() for p in audit.directory.glob("audit-*.dict")).decode()


def test_a_callers_batch_volume_is_bounded_and_others_are_served(secure):
    bus, metro = secure.clients["bus_gateway"], secure.clients["metro_gateway"]
    batch = os.urandom(16 * 1000)
    time.sleep(1.1)  # a full bucket
    answered = refused = 0
    for _ in range(6):
        try:
            bus.check_batch("bus_pay_later", batch)
            answered += 1
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert exc.reason == "CALLER_QUOTA" and exc.metadata["quota"] == "batch_tokens"
            assert exc.metadata["limit"] == str(BATCH_RATE)
            refused += 1
    assert answered == 3 and refused == 3  # 3,000 tokens a second: three batches of 1,000, at once
    assert metro.check_batch("metro_pay_later", batch).response.count == 1000  # another caller is served
    time.sleep(0.5)
    bus.check_batch("bus_pay_later", os.urandom(16 * 1000))  # the bucket refills at the rate


def test_token_buckets():
    now = [0.0]
    buckets = TokenBuckets(rate=100.0, clock=lambda: now[0])
    assert buckets.take("a", 60) and not buckets.take("a", 60) and buckets.take("b", 100)  # per key
    now[0] = 0.5  # a refilled by 50: 90
    assert buckets.take("a", 60) and not buckets.take("a", 31) and buckets.take("a", 30)
    # a request bigger than the bucket passes when it is full, and leaves a debt
    assert buckets.take("c", 250) and not buckets.take("c", 1)
    now[0] = 2.5
    assert not buckets.take("c", 51) and buckets.take("c", 50)


def test_the_purposes_file_is_checked(tmp_path):
    assert {"citizen_app_view", "unspecified"} <= set(load_purposes())
    bad = tmp_path / "purposes.toml"
    for text, message in (
        ('[citizen_app_view]\nzh = "x"\nen = "y"\n', "'unspecified' must be listed"),
        ('[Bad-Name]\nzh = "x"\nen = "y"\n', "a purpose's name is 1-64 of"),
        ('[unspecified]\nzh = "x"\n', "expected a table with a non-empty zh and en"),
    ):
        bad.write_text(text)
        with pytest.raises(PurposeConfigError, match=message):
            load_purposes(bad)


def test_an_answer_past_its_deadline_is_not_disclosed(secure):
    """A call whose deadline passed before its answer (a score read queued behind slow work,
    a batch of a thousand reads) gets DEADLINE_EXCEEDED, and nothing of it is audited."""
    import contextvars
    import dataclasses

    from server.app import citizen_id
    from server.auth import set_call_deadline
    from server.errors import DeadlineExceeded

    service, audit = secure.service, secure.node.audit
    cids = [citizen_id(secure.fresh_row())] * 3
    # the app's call bound to its end user (server/end_user.py), as the interceptor makes it
    caller = dataclasses.replace(secure.runtime.policy.caller("citizen_app"), citizen=cids[0])
    audit.flush()
    before = len(audit.entries())

    def late(call):
        set_call_deadline(-0.001)  # as the interceptor sets it for a call that is already late
        return call()

    for call in (lambda: service.get_score(cids[0], caller, "citizen_app_view"),
                 lambda: service.batch_scores(cids, caller, "citizen_app_view"),
                 lambda: service.check("campus_fitness", secure.token(0), secure.runtime.policy.caller("campus_fitness_app"))):
        with pytest.raises(DeadlineExceeded, match="nothing was disclosed"):
            contextvars.copy_context().run(late, call)
    audit.flush()
    assert len(audit.entries()) == before
    # in time, the same calls disclose (and are audited) as usual
    assert len(contextvars.copy_context().run(lambda: service.batch_scores(cids, caller, "citizen_app_view"))) == 3
    audit.flush()
    assert len(audit.entries()) == before + 3
