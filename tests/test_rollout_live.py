"""Model rollout while serving (server/rollout.py), through the real client and server:
a new release is switched in under load with no failed call, writes made during the switch
land in the new state, an invalid release is rejected while the old one keeps serving, and
the previous release comes back with one command."""

from __future__ import annotations

import datetime as dt
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
from kernel.spec import DEFAULT_SPEC_PATH
from qianjiang.v1 import eligibility_pb2
from qianjiang.v1.records_pb2 import Record
from server.app import Node, Runtime, ServerConfig, citizen_id
from server.metrics import Metrics
from server.models import ModelRegistry
from server.rollout import roll_out

ROOT = Path(__file__).resolve().parents[1]
N = 2000


def variant_spec(tmp_path: Path) -> Path:
    """v1 with the pro-social dimension weighing three times as much."""
    text = DEFAULT_SPEC_PATH.read_text()
    old = "[dimensions.prosocial]\nweight = 0.15"
    assert text.count(old) == 1
    path = tmp_path / "v1-prosocial.toml"
    path.write_text(text.replace(old, "[dimensions.prosocial]\nweight = 0.45"))
    return path


class Live:
    def __init__(self, data_dir: Path):
        self.registry = CollectorRegistry()
        self.runtime = Runtime.prepare(ServerConfig(data_dir=data_dir, seed_citizens=N, metrics_port=0, port=0))
        self.metrics = Metrics(self.registry)
        self.node = Node(self.runtime, port=0, metrics=self.metrics).start()
        self.runtime.load()
        self.node.attach()
        self.client = QianjiangClient(f"127.0.0.1:{self.node.port}", timeout=10)

    def stage(self, spec_path) -> str:
        store = self.runtime.open_store()
        try:
            rid, report = self.runtime.registry.stage(spec_path, store=store)
        finally:
            store.close()
        assert report is not None and report.n_adults > 0
        return rid

    def close(self):
        self.client.close()
        self.node.drain(0)


@pytest.fixture
def live(tmp_path):
    s = Live(tmp_path / "data")
    yield s
    s.close()


class Load(threading.Thread):
    """A simple closed loop of checks and score reads on its own channel, counting every
    failure and the model versions seen."""

    def __init__(self, live: Live):
        super().__init__(daemon=True)
        self.client = QianjiangClient(f"127.0.0.1:{live.node.port}", timeout=10)
        self.tokens = [live.runtime.synthetic_card_token(r) for r in range(0, N, 7)]
        self.stop = threading.Event()
        self.calls = 0
        self.failures: list[str] = []
        self.versions: list[str] = []

    def run(self):
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                d = self.client.check("metro_pay_later", self.tokens[i % len(self.tokens)])
                if not self.versions or self.versions[-1] != d.model_version:
                    self.versions.append(d.model_version)
                if i % 5 == 0:
                    self.client.batch_scores([citizen_id(r) for r in range(i % 50, i % 50 + 20)])
                self.calls += 1
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")

    def finish(self):
        self.stop.set()
        self.join(30)
        self.client.close()


def test_rollout_under_load_then_restore(live, tmp_path):
    old_version = live.node.service.model_version
    old_release = live.runtime.release
    assert old_release == live.runtime.registry.active()  # bootstrapped at first start
    new_release = live.stage(variant_spec(tmp_path))
    live.runtime.registry.activate(new_release)

    load = Load(live)
    load.start()
    time.sleep(0.3)
    # Writes while the new state is being built: they must be in it after the switch.
    writer = QianjiangClient(f"127.0.0.1:{live.node.port}", timeout=10)
    revoked = citizen_id(5)
    result: dict = {}
    rollout = threading.Thread(target=lambda: result.update(report=roll_out(live.runtime, 1, live.metrics)))
    rollout.start()
    acked = []
    day = dt.date.today().isoformat()
    k = 0
    while rollout.is_alive():
        k += 1
        (ack,) = writer.ingest([Record(record_id=f"ro-{k}", citizen_id=citizen_id(100 + k % 50), variable="volunteer_hours",
                                       date=day, value=40.0, source="itest")])
        acked.append(ack.record_id)
        if k == 3:
            writer.revoke_consent(revoked)
    rollout.join()
    time.sleep(0.3)
    load.finish()

    report = result["report"]
    assert report is not None and report.n_adults > 1000
    assert report.to_dict()["psi_raw"] > 0.1  # the pro-social weight tripled: raw points moved
    assert load.failures == [] and load.calls > 20
    assert load.versions[0] == old_version and load.versions[-1] != old_version  # switched, no flapping back
    assert len(load.versions) == 2
    assert live.runtime.release == new_release
    assert live.node.service.model_version == load.versions[-1]
    assert k >= 3 and acked

    # Everything acknowledged during the switch is in the new state: the revoked consent for
    # score reads and for the checks (which read the packed gate words, not the column).
    with pytest.raises(grpc.RpcError) as err:
        live.client.get_score(revoked)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert live.runtime.state.adult[5] == 1  # so NOT_AUTHORISED is the answer, not UNDER_18
    for scenario in ("metro_pay_later", "library_deposit_free"):
        decision = live.client.check(scenario, live.runtime.synthetic_card_token(5))
        assert decision.outcome == eligibility_pb2.NOT_AUTHORISED, scenario
    store = live.runtime.open_store()
    try:
        rows = {store.citizen_row(citizen_id(100 + j % 50)) for j in range(1, k + 1)}
        for row in rows:
            before = live.runtime.state.features[row].copy()
            live.node.service._rescore(row)  # from the store: must not change anything
            assert (live.runtime.state.features[row] == before).all()
    finally:
        store.close()
    score = live.client.get_score(citizen_id(120))
    assert score.model_version == load.versions[-1]
    assert live.registry.get_sample_value("qianjiang_rollouts_total", {"result": "switched"}) == 1

    # One command brings the previous release back.
    assert live.runtime.registry.restore() == old_release
    assert roll_out(live.runtime, 1, live.metrics) is not None
    assert live.client.check("metro_pay_later", live.runtime.synthetic_card_token(0)).model_version == old_version
    assert live.runtime.release == old_release


def test_an_invalid_release_is_rejected_and_the_old_one_keeps_serving(live, tmp_path):
    version = live.node.service.model_version
    rid = live.stage(variant_spec(tmp_path))
    live.runtime.registry.activate(rid)
    spec_file = live.runtime.registry.path(rid) / "spec.toml"
    spec_file.write_text(spec_file.read_text().replace("hard_rule_cap = 549", "hard_rule_cap = 2000"))
    assert roll_out(live.runtime, 1, live.metrics) is None
    assert live.registry.get_sample_value("qianjiang_rollouts_total", {"result": "rejected"}) == 1
    assert live.client.check("metro_pay_later", live.runtime.synthetic_card_token(1)).model_version == version
    assert live.client.health() == "SERVING"


def test_sighup_rolls_out_across_worker_processes(tmp_path):
    """`qjscore model activate` signals the running server; both workers switch."""
    data = tmp_path / "data"
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "clients.cli", "serve", "--data-dir", str(data), "--port", str(port), "--metrics-port", "0",
         "--workers", "2", "--seed-citizens", str(N)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        with QianjiangClient(f"127.0.0.1:{port}", timeout=5) as qj:
            deadline = time.time() + 120
            while True:
                try:
                    if qj.health() == "SERVING":
                        break
                except grpc.RpcError:
                    pass
                assert time.time() < deadline and proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.2)
            old = qj.check("metro_pay_later", bytes(16)).model_version
            spec = variant_spec(tmp_path)
            out = subprocess.run([sys.executable, "-m", "clients.cli", "model", "stage", str(spec), "--data-dir", str(data)],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr
            rid = next(r for r in ModelRegistry(data).releases() if r != ModelRegistry(data).active())
            out = subprocess.run([sys.executable, "-m", "clients.cli", "model", "activate", rid, "--data-dir", str(data)],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
            assert out.returncode == 0 and f"now serves {rid}" in out.stdout, out.stdout + out.stderr
            # acknowledged only once switched: every connection (either worker) answers with the new version at once
            seen = set()
            for _ in range(20):
                with QianjiangClient(f"127.0.0.1:{port}", timeout=5) as fresh:  # new connections spread over workers
                    seen.add(fresh.check("metro_pay_later", bytes(16)).model_version)
            assert old not in seen and len(seen) == 1, seen

            # a server that cannot answer (stopped): the switch is not reported as done
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                out = subprocess.run([sys.executable, "-m", "clients.cli", "model", "restore", "--data-dir", str(data),
                                      "--wait", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            assert out.returncode == 1 and "NOT CONFIRMED" in out.stdout, out.stdout + out.stderr
            deadline = time.time() + 120  # it goes on once it runs again, and `model status` says so
            while f"serving {ModelRegistry(data).active()}" not in (status := subprocess.run(
                    [sys.executable, "-m", "clients.cli", "model", "status", "--data-dir", str(data)],
                    cwd=ROOT, env=env, capture_output=True, text=True, timeout=60).stdout):
                assert time.time() < deadline, status
                time.sleep(0.5)
            assert qj.check("metro_pay_later", bytes(16)).model_version == old
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    assert proc.returncode == 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
