"""The adversarial test's attacks, replayed against real servers on loopback (``python -m
loadtest.attack``): ``slots``, ``store_hang``, ``audit_flood``."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def gateway_checks(target: str, token: str, card: bytes, seconds: float, scenario: str = "metro_pay_later") -> dict:
    """A legitimate gateway during an attack: checks ``card`` at a gate's pace for ``seconds``
    (2 s deadline each). Returns checks_ok, checks_failed (by status) and check_p99_ms."""
    import collections
    import time

    import grpc
    import numpy as np

    from clients.client import QianjiangClient

    latencies, failed = [], collections.Counter()
    with QianjiangClient(target, timeout=2, token=token) as gateway:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                gateway.check(scenario, card)
                latencies.append(time.perf_counter() - t0)
            except grpc.RpcError as exc:
                failed[exc.code().name] += 1
            time.sleep(0.002)  # a gate's pace, not a benchmark
    return {
        "checks_ok": len(latencies),
        "checks_failed": dict(failed),
        "check_p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 2) if latencies else None,
    }


@contextmanager
def token_server(prefix: str, token_of, citizens: int = 1500) -> Iterator[tuple]:
    """A real server in this process: token mode, config/policy.toml (``token_of(identity)``
    is each caller's bearer token), loopback, port 0, ``citizens`` synthetic people. Yields
    (config, runtime, node, target); drained and its data directory removed afterwards."""
    from prometheus_client import CollectorRegistry

    from server.app import Node, Runtime, ServerConfig
    from server.auth import load_policy
    from server.metrics import Metrics

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        data = Path(tmp)
        tokens = data / "tokens.toml"
        tokens.write_text("".join(f'"{token_of(i)}" = "{i}"\n' for i in sorted(load_policy().callers)))
        config = ServerConfig(data_dir=data, seed_citizens=citizens, metrics_port=0, port=0, host="127.0.0.1",
                              security="token", tokens_path=tokens)
        runtime = Runtime.prepare(config)
        node = Node(runtime, port=0, metrics=Metrics(CollectorRegistry())).start()
        try:
            runtime.load()
            node.attach()
            yield config, runtime, node, f"127.0.0.1:{node.port}"
        finally:
            node.drain(0)
