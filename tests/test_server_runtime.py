"""The server as an operator runs it: health through loading and draining, load shedding,
several worker processes on one port, SIGTERM, and the qjscore command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from clients.client import QianjiangClient
from conftest import free_port
from server.app import Node, Runtime, ServerConfig, citizen_id
from server.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent


def test_health_is_not_serving_while_loading_and_draining(tmp_path):
    runtime = Runtime.prepare(ServerConfig(data_dir=tmp_path, seed_citizens=500, metrics_port=0))
    node = Node(runtime, port=0, metrics=Metrics(CollectorRegistry())).start()
    with QianjiangClient(f"127.0.0.1:{node.port}") as qj:
        assert qj.health() == "NOT_SERVING"
        assert qj.health("qianjiang.v1.EligibilityService") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as err:  # the services refuse until loaded
            qj.check("campus_fitness", runtime.synthetic_card_token(0), timeout=1)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        runtime.load()
        node.attach()
        assert qj.health() == "SERVING"
        assert qj.check("campus_fitness", runtime.synthetic_card_token(0)).outcome > 0
        node.set_health(2, names=("",))  # what drain() does first: NOT_SERVING = 2
        assert qj.health() == "NOT_SERVING"
    node.drain(0)


def test_overload_is_refused_with_resource_exhausted_not_queued(tmp_path):
    # max_streams=0: no stream limit of its own, so the two held streams fill both call slots
    # (the stream limit is tests/test_connections.py's)
    config = ServerConfig(data_dir=tmp_path, seed_citizens=500, metrics_port=0, threads=4, max_concurrent_rpcs=2,
                          max_streams=0)
    runtime = Runtime.prepare(config)
    node = Node(runtime, port=0, metrics=Metrics(CollectorRegistry())).start()
    runtime.load()
    node.attach()
    target = f"127.0.0.1:{node.port}"
    release = threading.Event()

    def held_stream():
        while not release.is_set():
            time.sleep(0.01)
        return
        yield

    qj = QianjiangClient(target, timeout=10)
    held = [qj.eligibility.StreamCheck(held_stream(), timeout=10) for _ in range(2)]
    time.sleep(0.3)  # both streams now occupy the server
    t0 = time.perf_counter()
    with pytest.raises(grpc.RpcError) as err:
        qj.check("campus_fitness", runtime.synthetic_card_token(0), timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert time.perf_counter() - t0 < 1.0, "refused at once, not after queueing"
    release.set()
    for call in held:
        list(call)
    assert qj.check("campus_fitness", runtime.synthetic_card_token(0)).outcome > 0, "recovers as soon as load drops"
    qj.close()
    node.drain(0)


def _run_cli(*args, target=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "clients.cli", *args]
    if target:
        cmd[3:3] = []
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


@pytest.mark.slow
def test_two_workers_share_one_port_and_one_state_and_drain_on_sigterm(tmp_path):
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "clients.cli", "serve", "--data-dir", str(tmp_path), "--port", str(port),
         "--metrics-port", str(metrics_port), "--workers", "2", "--seed-citizens", "2000"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 90
        banner = ""
        while "Stop with Ctrl-C" not in banner and time.time() < deadline:
            line = proc.stdout.readline()
            assert line, f"server exited early: {banner}"
            banner += line
        target = f"127.0.0.1:{port}"
        from server.decision_ids import DecisionIds, ids_key
        from server.keys import card_token, load_keys, synthetic_card_number

        token = card_token(load_keys(tmp_path).card, synthetic_card_number(_consenting_adult(tmp_path)))
        # separate connections land on both workers (SO_REUSEPORT spreads connections);
        # a local subchannel pool stops grpc from sharing one connection between channels
        clients = [
            QianjiangClient(target, timeout=5, channel=grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]))
            for _ in range(12)
        ]
        # decision ids hide their worker; the audit key's id key tells them apart
        ids = DecisionIds(ids_key(load_keys(tmp_path).audit))
        writers = {ids.parse(qj.check("campus_fitness", token).decision_id)[0] for qj in clients}
        assert len(writers) == 2, f"both workers answer: {writers}"
        row = _consenting_adult(tmp_path)
        clients[0].revoke_consent(citizen_id(row))
        outcomes = {qj.check("campus_fitness", token).outcome for qj in clients}
        assert outcomes == {6}, "a revoke on one worker is seen by every worker at once"  # NOT_AUTHORISED
        clients[1].grant_consent(citizen_id(row))
        assert {qj.check("campus_fitness", token).outcome for qj in clients} != {6}
        import urllib.request

        def handled_checks() -> float:
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            line = next((x for x in text.splitlines() if x.startswith("grpc_server_handled_total") and 'grpc_method="Check"' in x), None)
            return float(line.rsplit(" ", 1)[1]) if line else 0.0

        # each worker hands its per-call figures to Prometheus a few times a second
        deadline = time.monotonic() + 5
        while handled_checks() < 36 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert handled_checks() >= 36, "metrics add up across the worker processes"
        for qj in clients:
            qj.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def _consenting_adult(data_dir) -> int:
    from server.store import open_store
    from server.state import adults, today

    store = open_store(f"sqlite:///{data_dir}/qianjiang.db")
    try:
        c = store.citizens()
    finally:
        store.close()
    import numpy as np

    ok = np.flatnonzero((c.consent == 1) & (adults(c.birth_day, today()) == 1))
    return int(ok[0])


def test_cli_prints_tables_and_json(served):
    row = int(next(r for r in range(100) if served.runtime.state.consent[r] and served.runtime.state.adult[r]))
    env_target = ["--target", served.target]
    out = _run_cli("score", served.citizen(row), *env_target)
    assert out.returncode == 0, out.stderr
    assert "score" in out.stdout and "law_abiding" in out.stdout and "reason" in out.stdout
    out = _run_cli("check", "campus_fitness", "--card", served.token(row).hex(), "--json", *env_target)
    decision = json.loads(out.stdout)
    assert decision["scenario"] == "campus_fitness" and "score" not in decision
    out = _run_cli("check", "nowhere", "--card", served.token(row).hex(), *env_target)
    assert out.returncode == 2 and "NOT_FOUND" in out.stderr
    out = _run_cli("check", "campus_fitness", "--card", "abc", *env_target)
    assert out.returncode != 0 and "--card" in out.stderr
    out = _run_cli("scenarios", "--json", *env_target)
    assert {s["name"] for s in json.loads(out.stdout)} >= {"campus_fitness", "metro_pay_later"}
    out = _run_cli("token", served.citizen(row), "--data-dir", str(served.data_dir))
    assert out.stdout.strip() == served.token(row).hex()


@pytest.mark.slow
def test_a_dead_worker_stops_the_service_instead_of_leaving_writes_hanging(tmp_path):
    """A worker killed while it may hold the shared write lock would leave every write
    hanging; the parent notices the death, stops the others and exits non-zero."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "clients.cli", "serve", "--data-dir", str(tmp_path), "--port", str(port),
         "--metrics-port", "0", "--workers", "2", "--seed-citizens", "500"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out = ""
        while "Stop with Ctrl-C" not in out:
            line = proc.stdout.readline()
            assert line, out
            out += line
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        os.kill(int(workers[0]), signal.SIGKILL)
        assert proc.wait(timeout=30) == 1
        rest = proc.stdout.read()
        assert "a worker died" in rest
        assert subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True).returncode != 0, "no worker left behind"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_serve_flags_set_the_overload_bounds(capsys):
    from clients.cli import parser, serve_config

    config = serve_config(parser().parse_args(["serve", "--max-pending-calls", "300", "--max-concurrent-rpcs", "0"]))
    assert (config.max_pending_calls, config.max_concurrent_rpcs) == (300, 0)
    defaults = serve_config(parser().parse_args(["serve"]))
    assert (defaults.max_pending_calls, defaults.max_concurrent_rpcs) == (128, 128)
    for bad, says in ((["--max-pending-calls", "0"], "must be at least 1, got 0"),
                      (["--max-concurrent-rpcs", "-1"], "must be at least 0, got -1"),
                      (["--max-pending-calls", "many"], "'many' is not a whole number")):
        with pytest.raises(SystemExit):
            parser().parse_args(["serve", *bad])
        err = capsys.readouterr().err
        assert bad[0] in err and says in err, err


@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_a_worker_serves_on_either_event_loop(tmp_path, kind):
    import uvloop

    from clients.cli import parser, serve_config

    assert serve_config(parser().parse_args(["serve", "--event-loop", kind])).event_loop == kind
    runtime = Runtime.prepare(ServerConfig(data_dir=tmp_path, seed_citizens=300, metrics_port=0, event_loop=kind))
    runtime.load()
    node = Node(runtime, port=0, metrics=Metrics(CollectorRegistry())).start()
    try:
        node.attach()
        assert isinstance(node.loop, uvloop.Loop) == (kind == "uvloop")
        with QianjiangClient(f"127.0.0.1:{node.port}") as qj:
            assert qj.check("campus_fitness", runtime.synthetic_card_token(0)).outcome > 0
            assert len(qj.check_batch("metro_pay_later", [runtime.synthetic_card_token(r) for r in range(50)]).outcomes) == 50
    finally:
        node.drain(0)


def test_an_unknown_event_loop_is_named():
    from server.event_loop import new_event_loop

    with pytest.raises(ValueError, match="event loop 'tokio': expected one of uvloop, asyncio"):
        new_event_loop("tokio")
