"""Replicas that follow the store (server/replica.py, docs/replicas.md), for real: a PostgreSQL
database, two `qjscore serve --replica` nodes (the second with two workers, its follower in the
parent) and Debian's HAProxy in front (deploy/haproxy.cfg.in), all on loopback.

What must hold: a write through one node changes the other's answers within the staleness
bound; a follower catches up after it missed notifications (its LISTEN connection cut while
writes went on) and after a SIGKILL (from its snapshot and the change log); a node whose
follower stalls says NOT_SERVING and the front stops sending it checks; the front answers
an overload with RESOURCE_EXHAUSTED (never CANCELLED) and serves again at once after it;
"who checked me" is complete whichever node served the checks; a bulk write, or a store far
ahead, makes a node reload; SQLite refuses replicas.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import grpc
import pytest

from clients.client import QianjiangClient
from deploy.cluster import Cluster, haproxy_binary, health, health_check_bytes
from qianjiang.v1 import eligibility_pb2, eligibility_pb2_grpc
from server.keys import card_token, synthetic_card_number
from server.seed import citizen_id

CITIZENS = 3000
SCENARIO = "campus_fitness"


def _outcome_name(decision) -> str:
    return eligibility_pb2.Outcome.Name(decision.outcome)


@pytest.fixture(scope="module")
def cluster(pg_server, tmp_path_factory):
    import psycopg
    from psycopg import sql

    if haproxy_binary() is None:  # CI installs it (deploy/cluster.py haproxy_binary runs apt-get as root)
        if os.environ.get("QJ_TEST_PG_DSN"):
            pytest.fail("haproxy is missing and could not be installed (apt-get install haproxy)")
        pytest.skip("no haproxy here (Debian: apt-get install haproxy)")
    name = f"qj_replica_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = urlsplit(pg_server)._replace(path=f"/{name}").geturl()
    c = Cluster(tmp_path_factory.mktemp("cluster"), nodes=2, workers=[1, 2], citizens=CITIZENS, max_lag=0.5,
                maxconn=4, queue=8, dsn=dsn, snapshot_interval=1.0)
    try:
        c.start()
        yield c
        # a follower retries after an error, so a bug in it would only show as slowness: none
        for i in range(c.n):
            assert "follower: catch-up failed" not in c.log_tail(i, 10_000_000), c.log_tail(i, 5000)
    finally:
        c.stop()
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def _token(cluster, row: int) -> bytes:
    return card_token(bytes.fromhex(cluster._env()["QJ_CARD_KEY"]), synthetic_card_number(row))


def _cid(row: int) -> str:
    return citizen_id(row)


def _until(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.005)


def _authorised_row(client, cluster, start: int) -> int:
    """A citizen whose check is answered (consent granted, adult) from ``start`` on."""
    for row in range(start, CITIZENS):
        if _outcome_name(client.check(SCENARIO, _token(cluster, row))) != "NOT_AUTHORISED":
            return row
    raise AssertionError("no authorised citizen")


def test_a_write_through_one_node_changes_the_others_answer_within_the_bound(cluster):
    a, b = QianjiangClient(cluster.target(0)), QianjiangClient(cluster.target(1))
    row = _authorised_row(b, cluster, 10)
    token = _token(cluster, row)
    t0 = time.perf_counter()
    a.revoke_consent(_cid(row))
    _until(lambda: _outcome_name(b.check(SCENARIO, token)) == "NOT_AUTHORISED", 0.5, "the revoke reached node 1")
    revoke_ms = (time.perf_counter() - t0) * 1000
    a.grant_consent(_cid(row))
    _until(lambda: _outcome_name(b.check(SCENARIO, token)) != "NOT_AUTHORISED", 0.5, "the grant reached node 1")
    # a serious record (a court-listed dishonest debtor) through node 1 caps the score on node 0
    from qianjiang.v1 import records_pb2

    b.ingest([records_pb2.Record(record_id=f"serious-{uuid.uuid4().hex[:8]}", citizen_id=_cid(row),
                                 variable="court_listed_dishonest_debtor", date="2026-11-20", value=1.0)])
    _until(lambda: a.get_score(_cid(row)).score < 550, 0.5, "the serious record reached node 0")
    assert revoke_ms < 500


def test_catch_up_after_missed_notifications(cluster):
    """The followers' LISTEN connections are cut (their notifications lost) while writes go
    on through node 0: node 1 still reflects every one, from the change log."""
    import psycopg

    a, b = QianjiangClient(cluster.target(0)), QianjiangClient(cluster.target(1))
    rows = [_authorised_row(b, cluster, 100 + 40 * k) for k in range(3)]
    with psycopg.connect(cluster.dsn, autocommit=True) as db:
        cut = db.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                         " WHERE application_name = 'qianjiang-follower'").fetchone()[0]
    assert cut >= 2  # one follower a node
    for row in rows:
        a.revoke_consent(_cid(row))
    for row in rows:
        _until(lambda: _outcome_name(b.check(SCENARIO, _token(cluster, row))) == "NOT_AUTHORISED", 3.0,
               f"node 1 caught up with row {row}")
    _until(lambda: "listening again" in cluster.log_tail(1, 200_000), 3.0, "node 1's follower reconnected")
    for row in rows:
        a.grant_consent(_cid(row))


def test_a_killed_node_comes_back_from_its_snapshot_and_catches_up(cluster):
    a = QianjiangClient(cluster.target(0))
    row = _authorised_row(a, cluster, 400)
    _until(lambda: "snapshot of" in cluster.log_tail(1, 400_000), 5.0, "node 1 wrote a snapshot")
    cluster.kill_node(1, signal.SIGKILL)
    a.revoke_consent(_cid(row))  # while node 1 is down
    cluster.start_node(1)
    assert "started from the snapshot" in cluster.log_tail(1, 400_000)
    b = QianjiangClient(cluster.target(1))
    assert _outcome_name(b.check(SCENARIO, _token(cluster, row))) == "NOT_AUTHORISED"
    a.grant_consent(_cid(row))
    _until(lambda: _outcome_name(b.check(SCENARIO, _token(cluster, row))) != "NOT_AUTHORISED", 1.0, "grant")
    _until(lambda: cluster.servers_up().get("node1", "").startswith("UP"), 5.0, "the front sends to node 1 again")


def test_a_node_behind_its_bound_is_not_serving_and_the_front_leaves_it(cluster):
    """Node 1's follower (its parent process) stalls: its workers go on answering, but past
    the 0.5 s bound health says NOT_SERVING and the front marks it DOWN; once it runs again
    it catches up (a write made meanwhile is there) and serves again."""
    a = QianjiangClient(cluster.target(0))
    row = _authorised_row(a, cluster, 600)
    parent = cluster.procs[1].pid
    os.kill(parent, signal.SIGSTOP)
    try:
        a.revoke_consent(_cid(row))
        t0 = time.monotonic()
        _until(lambda: health(cluster.target(1)) == "NOT_SERVING", 3.0, "node 1 NOT_SERVING")
        assert time.monotonic() - t0 < 1.5
        _until(lambda: cluster.servers_up().get("node1", "").startswith("DOWN"), 3.0, "the front took node 1 out")
        f = QianjiangClient(cluster.front)
        for _ in range(20):  # every check through the front goes to node 0, which is current
            assert _outcome_name(f.check(SCENARIO, _token(cluster, row))) == "NOT_AUTHORISED"
    finally:
        os.kill(parent, signal.SIGCONT)
    _until(lambda: health(cluster.target(1)) == "SERVING", 3.0, "node 1 SERVING again")
    b = QianjiangClient(cluster.target(1))
    assert _outcome_name(b.check(SCENARIO, _token(cluster, row))) == "NOT_AUTHORISED"
    a.grant_consent(_cid(row))
    _until(lambda: cluster.servers_up().get("node1", "").startswith("UP"), 5.0, "node 1 back in the front")


def test_a_bulk_write_that_names_no_citizen_makes_every_node_reload(cluster):
    """An operator's bulk consent change (one change, no single citizen: the follower cannot
    tell whom it touched) makes each node reload (its snapshot and the changes since, or,
    as here, the whole store), NOT_SERVING meanwhile, then serve what the store says."""
    import numpy as np

    from server.store import open_store

    a, b = QianjiangClient(cluster.target(0)), QianjiangClient(cluster.target(1))
    row = _authorised_row(a, cluster, 1000)
    store = open_store(cluster.dsn)
    try:
        store.set_consents_bulk(np.array([row]), False)
        for client in (a, b):
            _until(lambda: _outcome_name(client.check(SCENARIO, _token(cluster, row))) == "NOT_AUTHORISED", 10.0,
                   "the bulk revoke reached the node")
        for i in (0, 1):
            assert "reloading the serving state" in cluster.log_tail(i, 1_000_000)
            _until(lambda: health(cluster.target(i)) == "SERVING", 5.0, f"node {i} serving after its reload")
    finally:
        store.close()
        a.grant_consent(_cid(row))


def test_the_front_sheds_overload_with_resource_exhausted_and_recovers_at_once(cluster):
    """Far more calls at once than the nodes take (maxconn 4 each) plus the front's queue
    (8): the excess is answered RESOURCE_EXHAUSTED by the front, a status a grpcio client
    sees as such (never CANCELLED or UNKNOWN), and the very next calls are served."""
    token = _token(cluster, 5)
    channel = grpc.insecure_channel(cluster.front)
    stub = eligibility_pb2_grpc.EligibilityServiceStub(channel)
    request = eligibility_pb2.CheckRequest(scenario=SCENARIO, card_token=token)
    codes: dict[str, int] = {}
    lock = threading.Lock()

    def burst(_):
        futures = [stub.Check.future(request, timeout=10) for _ in range(150)]
        for fut in futures:
            try:
                fut.result()
                name = "OK"
            except grpc.RpcError as e:
                name = e.code().name
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert "queue full" in (e.details() or "")
            with lock:
                codes[name] = codes.get(name, 0) + 1

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(burst, range(4)))
    assert codes.get("RESOURCE_EXHAUSTED", 0) > 0, codes
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes.get("OK", 0) > 0, codes
    t0 = time.perf_counter()
    for _ in range(20):  # at once after it
        stub.Check(request, timeout=2)
    assert time.perf_counter() - t0 < 2.0
    channel.close()


def test_who_checked_me_is_complete_whichever_node_served(cluster):
    a, b, f = QianjiangClient(cluster.target(0)), QianjiangClient(cluster.target(1)), QianjiangClient(cluster.front)
    row = _authorised_row(a, cluster, 800)
    token = _token(cluster, row)
    ids = {a.check(SCENARIO, token).decision_id for _ in range(3)} | {b.check(SCENARIO, token).decision_id for _ in range(3)}
    ids |= {f.check(SCENARIO, token).decision_id for _ in range(4)}
    time.sleep(0.3)  # the audit log's group commit (50 ms) on each node
    for client in (a, b, f):
        listed = {e.decision_id for e in client.list_checks(_cid(row), limit=1000)}
        assert ids <= listed, f"{len(ids - listed)} of {len(ids)} checks missing"


def test_the_front_health_check_bytes_are_the_configs():
    """deploy/haproxy.cfg.in sends exactly deploy/cluster.py's health-check request."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "deploy" / "haproxy.cfg.in").read_text()
    assert f"tcp-check send-binary {health_check_bytes().hex()}" in text


def test_sqlite_serves_one_node_and_says_so(tmp_path):
    from server.app import ServerConfig
    from server.replica import ReplicaError, check_config

    with pytest.raises(ReplicaError, match="SQLite store serves one node"):
        check_config(ServerConfig(data_dir=tmp_path, replica=True))
    check_config(ServerConfig(data_dir=tmp_path, replica=True, store_url="postgresql://qj@db/qj"))
    check_config(ServerConfig(data_dir=tmp_path))  # no replica: nothing to say


def test_notify_carries_the_seq_at_commit_and_multi_citizen_batches_name_their_rows(pg_url):
    """The store's side: each write notifies its seq once committed (a rolled-back one never),
    and the rows of an add_records of several citizens are found from its position."""
    import psycopg

    from server.store import RecordIn, StoreError, open_store

    store = open_store(pg_url)
    listen = psycopg.connect(pg_url, autocommit=True)
    try:
        listen.execute("LISTEN qj_changes")
        for k in range(4):
            store.upsert_citizen(f"c-{k}", 7000)
        store.add_records([RecordIn("r-1", "c-1", "traffic_violations", 19000, 1.0, "police"),
                           RecordIn("r-2", "c-3", "traffic_violations", 19000, 1.0, "police")], sent_by="police")
        with pytest.raises(StoreError):  # an unknown citizen: rolled back, no change, no notification
            store.add_records([RecordIn("r-3", "nobody", "traffic_violations", 19000, 1.0, "police")], sent_by="police")
        store.add_records([RecordIn("r-4", "c-2", "traffic_violations", 19000, 1.0, "police")], sent_by="police")
        seen = [int(n.payload) for n in listen.notifies(timeout=1.0, stop_after=6)]
        hwm = store.high_water_mark()
        assert seen == list(range(hwm - 5, hwm + 1))
        changes = store.changes_between(hwm - 2)
        assert [(kind, row) for _, kind, row, _ in changes] == [("add_records", None), ("add_records", 2)]
        batch = changes[0][0]
        assert store.rows_of_new_records(batch, batch) == [1, 3]
        assert store.rows_of_new_records(batch + 1, batch + 1) == [2]
    finally:
        listen.close()
        store.close()


def test_a_follower_catches_up_in_chunks_and_reloads_when_far_behind(pg_url, tmp_path):
    """The follower driven by hand on a real state and store (in this process): a catch-up
    reads the change log in chunks (here of 2), and a store further ahead than ten chunks
    makes it reload the state rather than re-derive one citizen at a time."""
    import numpy as np

    from server.app import Runtime, ServerConfig
    from server.replica import KNOWN, RELOADS, Follower
    from server.seed import citizen_id
    from server.store import open_store

    runtime = Runtime.prepare(ServerConfig(data_dir=tmp_path, store_url=pg_url, seed_citizens=300, replica=True,
                                           metrics_port=0))
    runtime.load()
    follower = Follower(runtime, runtime.replica, max_rows=2)  # not started: each step by hand
    follower._store = runtime.open_store()
    store = open_store(pg_url)
    rows = [5, 6, 7, 8, 9]
    try:
        for row in rows:
            store.set_consent(citizen_id(row), False)
        assert follower.catch_up() == 5  # three chunks of the log: 2, 2, 1
        assert runtime.replica.applied == store.high_water_mark()
        assert not np.any(runtime.state.consent[rows])
        for row in rows:
            store.set_consent(citizen_id(row), True)
        runtime.replica.slots[KNOWN] = runtime.replica.applied + 100  # what a notification would have said
        follower.catch_up()
        assert runtime.replica.slots[RELOADS] == 1
        assert np.all(runtime.state.consent[rows] == 1) and runtime.state.ready
        assert runtime.replica.applied == store.high_water_mark() and runtime.replica.current()
    finally:
        store.close()
        follower._store.close()


def test_one_node_publishes_the_offline_gates_lists_and_every_node_serves_them(cluster):
    """Replicas share --gate-dir: node 0 publishes (signs), node 1 (--gate-delta-interval 0,
    no signing key) serves the very same signed lists, so a gate behind the front sees one
    sequence whichever node answers."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from qianjiang.v1 import gate_pb2, gate_pb2_grpc

    def manifest(i):
        stub = gate_pb2_grpc.GateServiceStub(QianjiangClient(cluster.target(i)).channel)
        try:
            return stub.GetManifest(gate_pb2.GetManifestRequest(scenario="metro_pay_later"), timeout=5)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc  # not published yet
            return None

    first = _until(lambda: manifest(0), 60, "node 0 publishes the metro's list")
    second = manifest(1)
    assert second is not None  # the default interval is 5 minutes: no new delta in between
    assert (second.body, second.signature, second.latest_sequence) == (first.body, first.signature, first.latest_sequence)
    public = load_pem_public_key((cluster.node_dir(0) / "keys" / "gate_signing.pub").read_bytes())
    public.verify(second.signature, second.body)  # node 0's signature, served by node 1
    assert not (cluster.node_dir(1) / "keys" / "gate_signing.key").exists()
