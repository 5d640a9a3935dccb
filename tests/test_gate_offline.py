"""Offline gate mode end to end (issue 19): a real server in token mode on a real port, the
real publisher (server/gate_snapshot.py, driven here instead of by its timer) and the gate
library (clients/gate.py) through GateService: exactness against the online check for every
card after a stream of writes, refusals of bad lists, authorisation, the audit of snapshots
and offline decisions, expiry, and a link cut."""

from __future__ import annotations

import json
import time
import os
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clients.client import QianjiangClient, QianjiangError
from clients.gate import (
    BadSignature, Gate, ReplayedDelta, ScenarioPolicy, SequenceGap, TamperedSnapshot, TruncatedDelta, VerifiedList,
)
from qianjiang.v1 import gate_pb2, gate_pb2_grpc, records_pb2
from server.gate_snapshot import GatePublisher, load_signing_key
from tests.conftest import STRANGER, SecureServer

METRO = "metro_pay_later"


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    s = SecureServer(tmp_path_factory.mktemp("gate"), n_citizens=1500)
    rt = s.runtime
    s.clock = Clock(time.time() - 86_400)  # a day ago: the tests move it forward by hours at most
    s.publisher = GatePublisher(rt.config.data_dir, rt.scenarios, rt.gate_key,
                                lambda: (rt.state, rt.spec.model_version, rt.calibration().calibration_version),
                                clock=s.clock, keep_deltas=6, rebase_every=1000)
    s.publisher.publish()
    yield s
    s.close()


def gate_of(secure, online=False, **kw) -> Gate:
    kw.setdefault("clock", secure.clock)
    return Gate(secure.runtime.gate_key.public_key(), [METRO], client=secure.clients["metro_gateway"], online=online, **kw)


def stub(secure, identity="metro_gateway"):
    return gate_pb2_grpc.GateServiceStub(secure.clients[identity].channel)


def online_allowed(secure, tokens: list[bytes]) -> np.ndarray:
    client = secure.clients["metro_gateway"]
    out = []
    for lo in range(0, len(tokens), 10_000):
        batch = client.check_batch(METRO, b"".join(tokens[lo:lo + 10_000]))
        out.append(np.frombuffer(batch.outcomes, np.uint8) == 1)
    return np.concatenate(out)


def allowed_fresh_row(secure) -> int:
    """A citizen the metro allows now, that no other test writes."""
    while True:
        row = secure.fresh_row()
        if online_allowed(secure, [secure.token(row)])[0]:
            return row


def every_card(secure) -> list[bytes]:
    n = secure.runtime.state.n_citizens
    return [secure.token(r) for r in range(n)]


def write_stream(secure, rows):
    """Writes that change metro answers: consent revoked for metro alone and for everything,
    a serious record, an unpaid metro default, consent granted back, a new card."""
    app = secure.clients["citizen_app"]  # bound to each call's citizen (its end-user key)
    from server.app import citizen_id

    a, b, c, d, e, f = rows
    app.revoke_consent(citizen_id(a), purposes=[METRO])
    app.revoke_consent(citizen_id(b))
    secure.clients["court"].ingest([records_pb2.Record(record_id=f"gate-{c}", citizen_id=citizen_id(c),
                                                       variable="court_listed_dishonest_debtor", date="2026-11-20", value=1)])
    secure.clients["citizen_card_company"].ingest([records_pb2.Record(
        record_id=f"gate-default-{d}", citizen_id=citizen_id(d), variable="transit_fare_defaults", date="2026-11-20",
        value=1, scenario=METRO)])
    app.revoke_consent(citizen_id(e))
    app.grant_consent(citizen_id(e))
    new_card = bytes.fromhex("ab" * 16)
    secure.clients["citizen_card_company"].register_card(citizen_id(f), new_card)
    return new_card


def test_gate_equals_the_online_check_for_every_card_after_a_stream_of_writes(secure):
    tokens = every_card(secure)
    gate = gate_of(secure)
    gate.sync()
    assert (gate.lists[METRO].allows_many(b"".join(tokens)).astype(bool) == online_allowed(secure, tokens)).all()
    rows = [allowed_fresh_row(secure) for _ in range(6)]
    new_card = write_stream(secure, rows)
    tokens.append(new_card)
    secure.clock.t += 300
    secure.publisher.publish()
    seq = gate.sequence(METRO)
    gate.sync()
    assert gate.sequence(METRO) == seq + 1  # a delta, not a reload
    assert gate.m_reloads.labels(scenario=METRO, why="first")._value.get() == 1
    online = online_allowed(secure, tokens)
    local = np.array([gate.check_local(METRO, t) for t in tokens])
    assert (local == online).all(), np.flatnonzero(local != online)
    assert gate.lists[METRO].removed  # the overlay is in use: the batch path agrees too
    assert (gate.lists[METRO].allows_many(b"".join(tokens)).astype(bool) == online).all()
    assert not local[[tokens.index(secure.token(r)) for r in rows[:4]]].any()  # the writes took them out
    assert local[-1] == online[-1]
    # a gate that loads the snapshot afresh agrees too (a rebase)
    secure.publisher.rebase_every = 1
    secure.clock.t += 300
    secure.publisher.publish()
    secure.publisher.rebase_every = 1000
    fresh = gate_of(secure)
    fresh.sync()
    assert (fresh.lists[METRO].allows_many(b"".join(tokens)).astype(bool) == online).all()
    # unknown cards: denied (up to the filter's 2**-17)
    unknown = np.random.default_rng(1).integers(0, 256, (20_000, 16), dtype=np.uint8).tobytes()
    assert fresh.lists[METRO].allows_many(unknown).sum() <= 2


def _snapshot(secure):
    gate = gate_of(secure)
    return gate, gate.fetch_snapshot(METRO)


def test_bad_lists_are_refused_with_a_clear_error(secure):
    gate, (body, signature, parts) = _snapshot(secure)
    public = secure.runtime.gate_key.public_key()
    name = next(iter(parts))
    tampered = dict(parts)
    tampered[name] = bytes([parts[name][0] ^ 1]) + parts[name][1:]
    with pytest.raises(TamperedSnapshot, match="SHA-256"):
        VerifiedList.load(public, METRO, body, signature, tampered)
    with pytest.raises(TamperedSnapshot, match="truncated"):
        VerifiedList.load(public, METRO, body, signature, {**parts, name: parts[name][:-3]})
    with pytest.raises(BadSignature, match="signature"):
        VerifiedList.load(public, METRO, body.replace(b'"allowed":', b'"allowed":1'), signature, parts)
    with pytest.raises(BadSignature, match="another key"):
        VerifiedList.load(Ed25519PrivateKey.generate().public_key(), METRO, body, signature, parts)
    gate.load_snapshot(METRO, body, signature, parts)
    secure.clock.t += 300
    secure.publisher.publish()
    secure.clock.t += 300
    secure.publisher.publish()
    seq = gate.sequence(METRO)
    deltas = list(stub(secure).GetDeltas(gate_pb2.GetDeltasRequest(scenario=METRO, since_sequence=seq)))
    assert len(deltas) >= 2
    first, second = deltas[0], deltas[1]
    with pytest.raises(SequenceGap, match="missing"):
        gate.apply_delta(METRO, second.body, second.signature)
    with pytest.raises(TruncatedDelta, match="truncated|bytes"):
        gate.apply_delta(METRO, first.body[:-5], first.signature)
    with pytest.raises(BadSignature):
        gate.apply_delta(METRO, first.body, bytes(64))
    assert gate.sequence(METRO) == seq  # nothing refused changed the list
    gate.apply_delta(METRO, first.body, first.signature)
    with pytest.raises(ReplayedDelta, match="replay"):
        gate.apply_delta(METRO, first.body, first.signature)
    assert gate.sequence(METRO) == seq + 1


def test_gate_reloads_when_deltas_are_gone_or_it_is_ahead(secure):
    gate = gate_of(secure)
    gate.sync()
    for _ in range(8):  # past the kept window (6)
        secure.clock.t += 300
        secure.publisher.publish()
    with pytest.raises(grpc.RpcError) as err:
        list(stub(secure).GetDeltas(gate_pb2.GetDeltasRequest(scenario=METRO, since_sequence=gate.sequence(METRO))))
    assert QianjiangError.of(err.value).reason == "SNAPSHOT_REQUIRED"
    gate.sync()
    assert gate.m_reloads.labels(scenario=METRO, why="snapshot_required")._value.get() == 1
    latest = stub(secure).GetManifest(gate_pb2.GetManifestRequest(scenario=METRO)).latest_sequence
    assert gate.sequence(METRO) == latest
    with pytest.raises(grpc.RpcError) as err:
        list(stub(secure).GetDeltas(gate_pb2.GetDeltasRequest(scenario=METRO, since_sequence=latest + 5)))
    assert QianjiangError.of(err.value).reason == "SNAPSHOT_REQUIRED"


def test_lists_are_authorised_per_caller_and_scenario(secure):
    for identity, scenario in (("bus_gateway", METRO), ("metro_gateway", "bus_pay_later"), ("hospital", "medical_pay_later"),
                               (STRANGER, METRO), ("citizen_app", METRO)):
        with pytest.raises(grpc.RpcError) as err:
            stub(secure, identity).GetManifest(gate_pb2.GetManifestRequest(scenario=scenario))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, identity
        with pytest.raises(grpc.RpcError) as err:
            list(stub(secure, identity).GetSnapshot(gate_pb2.GetSnapshotRequest(scenario=scenario)))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, identity
    with pytest.raises(grpc.RpcError) as err:
        stub(secure).GetManifest(gate_pb2.GetManifestRequest(scenario="no_such"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    bus = stub(secure, "bus_gateway").GetManifest(gate_pb2.GetManifestRequest(scenario="bus_pay_later"))
    assert json.loads(bus.body)["scenario"] == "bus_pay_later"


def test_a_snapshot_is_audited_as_one_bulk_disclosure(secure):
    audit = secure.node.audit
    audit.flush()
    before = [e for e in audit.entries(subject=0) if e.method == "GateService/GetSnapshot"]
    gate, (body, _, parts) = _snapshot(secure)
    audit.flush()
    after = [e for e in audit.entries(subject=0) if e.method == "GateService/GetSnapshot"]
    assert len(after) == len(before) + 1
    entry = after[-1]
    manifest = json.loads(body)
    assert (entry.caller, entry.scenario) == ("metro_gateway", METRO)
    assert f"cards={manifest['allowed']}" in entry.rules_version
    assert f"bytes={sum(len(p) for p in parts.values())}" in entry.rules_version
    assert f"seq={manifest['sequence']}" in entry.rules_version


def test_expired_lists_fail_closed_unless_configured(secure):
    closed = gate_of(secure)
    closed.sync()
    lenient = Gate(secure.runtime.gate_key.public_key(), {METRO: ScenarioPolicy(fail_closed=False)},
                   client=secure.clients["metro_gateway"], online=False, clock=secure.clock)
    lenient.sync()
    token = secure.token(allowed_fresh_row(secure))
    assert closed.check(METRO, token) and lenient.check(METRO, token)
    saved = secure.clock.t
    secure.clock.t = closed.lists[METRO].expires + 1
    try:
        assert closed.check(METRO, token) is False
        assert closed.m_expired.labels(scenario=METRO)._value.get() == 1
        assert lenient.check(METRO, token) is True
        assert closed.age(METRO) > 3600
    finally:
        secure.clock.t = saved


def _decision(seq, token, scenario=METRO, allowed=True, at=None):
    return gate_pb2.OfflineDecision(gate_sequence=seq, scenario=scenario, card_token=token, allowed=allowed,
                                    list_sequence=1, decided_at_unix=int(at or time.time()))


def test_uploads_are_bounded_authorised_and_idempotent(secure):
    s = stub(secure)
    row = secure.fresh_row()
    token = secure.token(row)
    up = lambda decisions, gate_id="up-1": s.UploadOfflineDecisions(  # noqa: E731
        gate_pb2.UploadOfflineDecisionsRequest(gate_id=gate_id, decisions=decisions))

    def refused(decisions, code, gate_id="up-1"):
        with pytest.raises(grpc.RpcError) as err:
            up(decisions, gate_id)
        assert err.value.code() == code
        return QianjiangError.of(err.value)

    assert "decisions[1]" in refused([_decision(1, token), _decision(2, token, "bus_pay_later")],
                                     grpc.StatusCode.PERMISSION_DENIED).details()
    assert refused([_decision(1, token[:5])], grpc.StatusCode.INVALID_ARGUMENT).field_violations[0][0] == "decisions[0].card_token"
    assert refused([_decision(2, token), _decision(2, token)], grpc.StatusCode.INVALID_ARGUMENT).field_violations[0][0] \
        == "decisions[1].gate_sequence"
    assert refused([_decision(1, token, at=1)], grpc.StatusCode.INVALID_ARGUMENT).field_violations[0][0] \
        == "decisions[0].decided_at_unix"
    refused([_decision(1, token)], grpc.StatusCode.INVALID_ARGUMENT, gate_id="../etc")
    assert refused([_decision(i + 1, token) for i in range(10_001)], grpc.StatusCode.INVALID_ARGUMENT
                   ).field_violations[0][0] == "decisions"
    stranger = os.urandom(16)
    decided = int(time.time()) - 3 * 3600  # scanned three hours ago, uploaded now
    first = up([_decision(1, token, at=decided), _decision(2, token, allowed=False), _decision(3, stranger)])
    assert (first.written, first.already_uploaded, first.unknown_cards, first.acknowledged_sequence) == (2, 0, 1, 3)
    again = up([_decision(1, token), _decision(2, token, allowed=False), _decision(3, stranger), _decision(4, token)])
    assert (again.written, again.already_uploaded, again.acknowledged_sequence) == (1, 3, 4)
    other_gate = up([_decision(1, token)], gate_id="up-2")  # another gate of the caller: its own sequence
    assert other_gate.written == 1
    secure.node.audit.flush()
    from server.app import citizen_id

    checks = secure.clients["citizen_app"].list_checks(citizen_id(row))
    offline = [(e.caller, e.method, e.result) for e in checks if e.method == "GateService/OfflineCheck"]
    assert sorted(offline) == sorted([("metro_gateway", "GateService/OfflineCheck", "OFFLINE_ALLOW")] * 3
                                     + [("metro_gateway", "GateService/OfflineCheck", "OFFLINE_DENY")])
    # "who checked me" shows when the gate decided, not when the decision was uploaded
    times = sorted(e.time.seconds for e in checks if e.method == "GateService/OfflineCheck")
    assert times[0] == decided and times[1] >= int(time.time()) - 120


def test_a_link_cut_under_scans_answers_every_scan_as_of_the_list_then_uploads(secure):
    """A compressed-time version of the bench's 10-minute cut: the gate is online, the link
    drops (its client points at a port nobody listens on: real UNAVAILABLE), scans go on while
    the city changes, every answer equals the online answer at the list's time, and when the
    link is back the kept decisions reach "who checked me"."""
    from server.app import citizen_id

    gate = gate_of(secure, online=True, gate_id="cut-1")
    gate.sync()
    fresh = [allowed_fresh_row(secure) for _ in range(2)]
    rows = fresh + [r for r in range(300) if r not in fresh]
    tokens = [secure.token(r) for r in rows]
    at_list_time = online_allowed(secure, tokens)
    assert gate.check(METRO, tokens[0]) == bool(at_list_time[0]) and gate.link_up and not gate.pending
    dead = QianjiangClient("127.0.0.1:1", timeout=0.2)
    live, gate.client = gate.client, dead
    try:
        secure.clients["citizen_app"].revoke_consent(citizen_id(rows[0]))  # the city changes meanwhile
        answers = []
        for i, token in enumerate(tokens):
            secure.clock.t += 1
            answers.append(gate.check(METRO, token))
        assert not gate.link_up
        assert answers == at_list_time.tolist()  # the list's time, not now: row 0 is still allowed
        assert online_allowed(secure, tokens[:1])[0] == False  # noqa: E712 - online it is not any more
        assert len(gate.pending) == len(tokens)
        r = gate.registry  # the gate's own metrics
        assert r.get_sample_value("qj_gate_offline_decisions_total", {"scenario": METRO, "result": "allow"}) \
            == at_list_time.sum()
        assert r.get_sample_value("qj_gate_pending_decisions") == len(tokens)
        assert r.get_sample_value("qj_gate_sequence", {"scenario": METRO}) == gate.sequence(METRO) > 0
        assert r.get_sample_value("qj_gate_snapshot_age_seconds", {"scenario": METRO}) >= len(tokens)  # 1 s a scan
    finally:
        gate.client = live
        dead.close()
    uploaded = gate.upload()
    assert uploaded == len(tokens) and not gate.pending and gate.link_up
    secure.node.audit.flush()
    checks = secure.clients["citizen_app"].list_checks(citizen_id(rows[1]))
    assert [e.result for e in checks if e.method == "GateService/OfflineCheck"] == ["OFFLINE_ALLOW"]


def test_the_signing_key_is_kept_like_the_other_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("QJ_GATE_SIGNING_KEY", raising=False)
    with pytest.raises(ValueError, match="gate_signing.key"):
        load_signing_key(tmp_path, create=False)  # --production: no key, no start
    key = load_signing_key(tmp_path, create=True)
    private = Path(tmp_path) / "keys" / "gate_signing.key"
    assert private.stat().st_mode & 0o777 == 0o600
    assert (Path(tmp_path) / "keys" / "gate_signing.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY")
    again = load_signing_key(tmp_path, create=False)
    assert again.public_key().public_bytes_raw() == key.public_key().public_bytes_raw()
    other = Ed25519PrivateKey.generate()
    monkeypatch.setenv("QJ_GATE_SIGNING_KEY", other.private_bytes_raw().hex())
    assert load_signing_key(tmp_path, create=False).public_key().public_bytes_raw() == other.public_key().public_bytes_raw()


def test_the_publisher_feeds_the_servers_metrics(secure, tmp_path):
    from prometheus_client import CollectorRegistry

    from server.gate_snapshot import publisher_metrics
    from server.metrics import Metrics

    registry = CollectorRegistry()
    rt = secure.runtime
    publisher = GatePublisher(tmp_path, rt.scenarios, rt.gate_key,
                              lambda: (rt.state, rt.spec.model_version, rt.calibration().calibration_version),
                              metrics=publisher_metrics(Metrics(registry)))
    first = publisher.publish()[METRO]
    from server.app import citizen_id

    secure.clients["citizen_app"].revoke_consent(citizen_id(allowed_fresh_row(secure)), purposes=[METRO])
    second = publisher.publish()[METRO]
    assert registry.get_sample_value("qianjiang_gate_sequence", {"scenario": METRO}) == second["sequence"] == 2
    assert registry.get_sample_value("qianjiang_gate_snapshot_bytes", {"scenario": METRO}) == first["snapshot_bytes"]
    assert registry.get_sample_value("qianjiang_gate_delta_changes_total", {"scenario": METRO, "change": "removed"}) \
        == second["removed"] >= 1
    assert registry.get_sample_value("qianjiang_gate_publish_seconds_count") == 2 * len(publisher.scenarios)


def test_qjscore_gate_fetches_and_verifies_a_list(secure, capsys, tmp_path):
    """The operator's and partner's look at a list: `qjscore gate` (in this process)."""
    from clients.cli import main
    from server.gate_snapshot import key_paths
    from tests.conftest import dev_token

    row = allowed_fresh_row(secure)
    saved, secure.clock.t = secure.clock.t, max(secure.clock.t, time.time())  # the command's gate keeps the real time
    secure.publisher.publish()
    secure.clock.t = saved
    common = ["--target", secure.target, "--token", dev_token("metro_gateway"), "--json"]
    assert main(["gate", METRO, "--public-key", str(key_paths(secure.runtime.config.data_dir)[1]),
                 "--card", secure.token(row).hex(), *common]) == 0
    info = json.loads(capsys.readouterr().out)
    latest = stub(secure).GetManifest(gate_pb2.GetManifestRequest(scenario=METRO)).latest_sequence
    assert (info["sequence"], info["expired"], info["card_allowed"]) == (latest, False, True)
    wrong = tmp_path / "other.pub"
    from cryptography.hazmat.primitives import serialization

    wrong.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert main(["gate", METRO, "--public-key", str(wrong), *common]) == 2
    assert "another key" in capsys.readouterr().err


def test_a_snapshot_streams_in_chunks_and_reassembles(secure, monkeypatch):
    import server.gate_snapshot as gs

    monkeypatch.setattr(gs, "CHUNK_BYTES", 1000)  # the in-process server reads it per call
    chunks = list(stub(secure).GetSnapshot(gate_pb2.GetSnapshotRequest(scenario=METRO)))
    manifest = json.loads(chunks[0].manifest.body)
    assert len(chunks) - 1 == sum(-(-p["size"] // 1000) for p in manifest["parts"]) > 2
    assert all(len(c.data) <= 1000 for c in chunks[1:])
    gate = gate_of(secure)
    gate.load_snapshot(METRO, *gate.fetch_snapshot(METRO))
    assert gate.sequence(METRO) == manifest["sequence"]
