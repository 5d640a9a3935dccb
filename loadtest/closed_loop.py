"""Closed-loop throughput probe: how many checks a second the service answers.

    python -m loadtest.closed_loop --target 127.0.0.1:50051 --mode unary --seconds 10

Each client process runs ``--concurrency`` asyncio tasks, each sending its next request as
soon as the previous one is answered (closed loop: it measures capacity, not latency under
a fixed rate; the open-loop runner of the load-test issue does that). Tokens are the
synthetic city's card tokens (``--citizens`` of seed ``--seed``), with a share of unknown
cards. Prints one JSON line: requests and checks per second, p50/p99 latency, errors by code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import time
from pathlib import Path

import numpy as np


def _tokens(n_citizens: int, data_dir: str, count: int, unknown_share: float, rng: random.Random) -> list[bytes]:
    from server.keys import card_token, existing_card_key, synthetic_card_number

    key = existing_card_key(Path(data_dir))
    out = []
    for _ in range(count):
        if rng.random() < unknown_share:
            out.append(rng.randbytes(16))
        else:
            out.append(card_token(key, synthetic_card_number(rng.randrange(n_citizens))))
    return out


async def _run(args, proc_index: int, result_queue) -> None:
    import grpc

    from qianjiang.v1 import eligibility_pb2, eligibility_pb2_grpc

    rng = random.Random(args.seed * 1000 + proc_index)
    tokens = _tokens(args.citizens, args.data_dir, 20_000, args.unknown_share, rng)
    options = [("grpc.use_local_subchannel_pool", 1)]
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else None
    channels = []
    for c in range(args.channels):
        # a channel option of its own: its own connection, so a multi-worker server (one
        # listening port, SO_REUSEPORT) spreads the channels over its workers
        opts = options + [("qianjiang.loadtest.channel", c)]
        if args.certs:
            from server.tls import channel_credentials

            channels.append(grpc.aio.secure_channel(args.target, channel_credentials(Path(args.certs), args.caller), options=opts))
        else:
            channels.append(grpc.aio.insecure_channel(args.target, options=opts))
    stubs = [eligibility_pb2_grpc.EligibilityServiceStub(ch) for ch in channels]
    # A station's batches hold different cards each time: rotate through distinct batches
    # (one batch sent over and over would be served from warm caches).
    batch_requests = [
        eligibility_pb2.BatchCheckRequest(
            scenario=args.scenario, card_tokens=b"".join(tokens[(i * args.batch_size + j) % len(tokens)] for j in range(args.batch_size)),
        )
        for i in range(16 if args.mode == "batch" else 0)
    ]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    checks = 0
    stop_at = time.perf_counter() + args.seconds

    async def worker(k: int) -> None:
        nonlocal checks
        i = k
        stub = stubs[k % len(stubs)]
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                if args.mode == "unary":
                    await stub.Check(eligibility_pb2.CheckRequest(scenario=args.scenario, card_token=tokens[i % len(tokens)]), timeout=5, metadata=metadata)
                    checks += 1
                else:
                    await stub.BatchCheck(batch_requests[(i // args.concurrency) % len(batch_requests)], timeout=5, metadata=metadata)
                    checks += args.batch_size
                latencies.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
            i += args.concurrency

    async def streamer(k: int) -> None:
        """One long-lived gateway stream: keep a window of requests in flight on it."""
        nonlocal checks
        window = 32
        call = stubs[k % len(stubs)].StreamCheck(metadata=metadata, timeout=args.seconds + 30)
        sent_at: dict[int, float] = {}
        i = 0
        try:
            while time.perf_counter() < stop_at:
                for _ in range(window):
                    i += 1
                    sent_at[i] = time.perf_counter()
                    await call.write(eligibility_pb2.CheckRequest(scenario=args.scenario, card_token=tokens[(k + i) % len(tokens)], request_id=i))
                for _ in range(window):
                    d = await call.read()
                    latencies.append(time.perf_counter() - sent_at.pop(d.request_id))
                    checks += 1
            await call.done_writing()
        except grpc.aio.AioRpcError as exc:
            errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

    cpu0 = time.process_time()
    await asyncio.gather(*((streamer if args.mode == "stream" else worker)(k) for k in range(args.concurrency)))
    result_queue.put({"latencies": latencies, "errors": errors, "checks": checks, "cpu_s": time.process_time() - cpu0})
    for channel in channels:
        await channel.close()


def _proc(args, index, queue):
    asyncio.run(_run(args, index, queue))


#: how long a client process may take, beyond --seconds, to start (spawn, imports, the card
#: tokens) and to hand in its result
STARTUP_GRACE_S = 120.0


def _collect(queue, procs, deadline: float) -> list[dict]:
    """One result from each client process; raises if one dies without handing one in (an
    import error, a crash) or the deadline passes, instead of waiting for ever."""
    import queue as queue_mod

    parts: list[dict] = []
    while len(parts) < len(procs):
        try:
            parts.append(queue.get(timeout=0.5))
            continue
        except queue_mod.Empty:
            pass
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if dead:
            raise RuntimeError(f"client process {dead[0].name} exited with code {dead[0].exitcode} before reporting")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(procs) - len(parts)} of {len(procs)} client processes did not report in time")
    return parts


def main(argv=None, quiet: bool = False) -> dict:
    ap = argparse.ArgumentParser(prog="python -m loadtest.closed_loop", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="127.0.0.1:50051")
    ap.add_argument("--mode", choices=("unary", "batch", "stream"), default="unary")
    ap.add_argument("--scenario", default="metro_pay_later")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--processes", type=int, default=2, help="client processes")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight per process")
    ap.add_argument("--channels", type=int, default=1, help="connections per process (the requests in flight are spread over them)")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--citizens", type=int, default=100_000, help="size of the seeded synthetic city")
    ap.add_argument("--seed", type=int, default=2018, help="seeds the token mix")
    ap.add_argument("--data-dir", default="data", help="the server's data directory (for the card-token key)")
    ap.add_argument("--unknown-share", type=float, default=0.02)
    ap.add_argument("--token", help="development bearer token")
    ap.add_argument("--certs", help="certificate directory (mutual TLS)")
    ap.add_argument("--caller", default="metro_gateway", help="caller certificate to present with --certs")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error(f"--batch-size {args.batch_size}: must be at least 1")
    from server.keys import existing_card_key

    existing_card_key(Path(args.data_dir))  # fail here, before spawning anything
    queue = mp.get_context("spawn").Queue()
    procs = [mp.get_context("spawn").Process(target=_proc, args=(args, i, queue)) for i in range(args.processes)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    try:
        parts = _collect(queue, procs, deadline=time.monotonic() + args.seconds + STARTUP_GRACE_S)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join()
    wall = time.perf_counter() - t0
    lat = np.array([x for part in parts for x in part["latencies"]]) * 1000
    errors: dict[str, int] = {}
    for part in parts:
        for k, v in part["errors"].items():
            errors[k] = errors.get(k, 0) + v
    checks = sum(part["checks"] for part in parts)
    result = {
        "mode": args.mode,
        "processes": args.processes,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "requests_per_s": round(len(lat) / args.seconds, 1),
        "checks_per_s": round(checks / args.seconds, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 3) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 3) if len(lat) else None,
        "errors": errors,
        "client_cpu_s": round(sum(part["cpu_s"] for part in parts), 2),
        "wall_s": round(wall, 2),
        "cpu_count": os.cpu_count(),
    }
    if not quiet:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
