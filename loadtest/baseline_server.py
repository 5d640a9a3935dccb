"""The same-run baseline: a bare grpcio server with the service's message shapes and no logic.

    python -m loadtest.baseline_server --port 50199 --workers 2

It answers EligibilityService (Check, BatchCheck, StreamCheck, ListScenarios) with
responses of the same shapes and sizes as the real service — a Decision with an id, the
model version and the scenario; one outcome byte per token — from the same number of
processes on one port (SO_REUSEPORT), on the same server (grpc.aio, one event loop per
process, of the same kind: ``--event-loop``), but no interceptor, no metrics, no lookups,
no audit log. What it reaches is the framework's own limit on this machine; the benchmark
reports the service beside it (loadtest/bench.py).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys
import threading

import grpc

from qianjiang.v1 import eligibility_pb2, eligibility_pb2_grpc
from server.event_loop import EVENT_LOOPS, new_event_loop

MODEL_VERSION = "1+000000000000"


class BareEligibility(eligibility_pb2_grpc.EligibilityServiceServicer):
    def __init__(self):
        self._ids = itertools.count(1)
        self._prefix = f"d-{os.getpid():012x}"

    async def Check(self, request, context):
        return eligibility_pb2.Decision(
            outcome=eligibility_pb2.ALLOW, allowed=True, decision_id=f"{self._prefix}-{next(self._ids):x}",
            model_version=MODEL_VERSION, scenario=request.scenario, request_id=request.request_id,
        )

    async def BatchCheck(self, request, context):
        n = len(request.card_tokens) // 16
        return eligibility_pb2.BatchCheckResponse(
            outcomes=b"\x01" * n, batch_id=f"{self._prefix}-{next(self._ids):x}", model_version=MODEL_VERSION,
            scenario=request.scenario, count=n, allowed=n,
        )

    async def StreamCheck(self, request_iterator, context):
        async for request in request_iterator:
            yield await self.Check(request, context)

    async def ListScenarios(self, request, context):
        return eligibility_pb2.ListScenariosResponse()


def build(host: str, port: int, reuseport: bool) -> tuple[grpc.aio.Server, int]:
    """The bare server (call from inside the event loop that will run it)."""
    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 1 if reuseport else 0), ("grpc.max_receive_message_length", 4 << 20)],
    )
    eligibility_pb2_grpc.add_EligibilityServiceServicer_to_server(BareEligibility(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    return server, bound


async def _serve(host: str, port: int, reuseport: bool, parent: int | None) -> None:
    server, _ = build(host, port, reuseport)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            if parent is not None and os.getppid() != parent:
                break
    await server.stop(0)


def _run_one(host: str, port: int, reuseport: bool, parent: int | None, event_loop: str) -> None:
    with asyncio.Runner(loop_factory=lambda: new_event_loop(event_loop)) as runner:
        runner.run(_serve(host, port, reuseport, parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.baseline_server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--event-loop", choices=EVENT_LOOPS, default=EVENT_LOOPS[0], help="as the service's (qjscore serve --event-loop)")
    args = ap.parse_args(argv)
    if args.workers <= 1:
        print(f"baseline serving on {args.host}:{args.port}", flush=True)
        _run_one(args.host, args.port, False, None, args.event_loop)
        return 0
    parent, children = os.getpid(), []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            try:
                _run_one(args.host, args.port, True, parent, args.event_loop)
            finally:
                os._exit(0)
        children.append(pid)
    print(f"baseline serving on {args.host}:{args.port} ({args.workers} workers)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    stop.wait()
    for pid in children:
        os.kill(pid, signal.SIGTERM)
    for pid in children:
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
