"""Open-loop latency runner: requests on a fixed schedule, latency from the intended send time.

    python -m loadtest.open_loop --target 127.0.0.1:50051 --rate 1000 --seconds 10 --processes 2
    python -m loadtest.open_loop --target 127.0.0.1:50051 --rate 500 --seconds 3 --sweep --p99-ms 5

Request i is *intended* at ``t0 + i/rate`` whatever the responses do, and its latency is
measured from that intended time to its response. A closed-loop client (``closed_loop``)
waits for an answer before sending the next request, so when the server stalls it simply
stops sending and the requests that would have queued behind the stall are never measured
("coordinated omission"); here they are sent on time and their waiting counts.

Each process (``--processes N``, spawned, each with its own connection) takes every N-th
request of the one schedule. A scheduler coroutine sleeps until each intended time (never
waiting for a response) and launches the call as a task; at most ``max_in_flight`` calls
per process are outstanding, and a request due while that many are is counted as the error
``CLIENT_BACKLOG`` (never dropped silently, never delayed). Latencies of answered requests
go into an HDR histogram per process (``loadtest.hdr``), merged at the end. The event loop
uses ``select()`` (microsecond timeouts) instead of epoll (millisecond timeouts) so the
scheduler wakes on time; the report gives how late it ran (``max_schedule_lag_ms``) and
the runner's own CPU seconds, to show the runner is not the bottleneck.

Only loopback targets are accepted, and every run is bounded (``MAX_SECONDS``,
``MAX_REQUESTS``): after the schedule, calls still in flight get their deadline plus
``DRAIN_GRACE_S`` to finish and are then cancelled (counted as ``CLIENT_CANCELLED``).

From Python::

    from loadtest.open_loop import run_open_loop, sweep
    r = run_open_loop("127.0.0.1:50051", rate=1000, seconds=5, processes=2)
    s = sweep("127.0.0.1:50051", start_rate=500, target_p99_ms=5.0)   # s["best_rate"]

Request kinds are ``CallKind`` objects in ``CALLS`` (``check``, ``baseline``); pass a name
or a ``CallKind`` of your own (its ``payloads`` function must be importable by the spawned
processes, i.e. defined at the top level of a module).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import random
import selectors
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from loadtest.hdr import Histogram

MAX_SECONDS = 600.0  # one run's schedule
MAX_REQUESTS = 5_000_000  # one run's requests, all processes
MAX_PROCESSES = 32
DRAIN_GRACE_S = 2.0  # after the last call's deadline
CONNECT_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 120.0  # spawn, imports, tokens, connect, warm-up
START_DELAY_S = 0.25  # t0 is this far after every process is ready
TOKEN_POOL = 20_000  # distinct requests per process, cycled


# --- request kinds ------------------------------------------------------------------------


@dataclass(frozen=True)
class CallKind:
    """A kind of request: the full gRPC method name and a function making the serialized
    requests a process cycles through: ``payloads(plan, rng, n) -> list[bytes]``."""

    name: str
    method: str
    payloads: Callable[["Plan", random.Random, int], list[bytes]]
    description: str = ""


def _card_key(data_dir: str, required: bool) -> bytes | None:
    """The server's card-token key, without ever creating a key file; None if there is none
    and it is not ``required``."""
    from server.keys import existing_card_key

    try:
        return existing_card_key(Path(data_dir))
    except FileNotFoundError:
        if required:
            raise
        return None


def _check_requests(plan: "Plan", rng: random.Random, n: int, key: bytes | None) -> list[bytes]:
    from qianjiang.v1 import eligibility_pb2
    from server.keys import card_token, synthetic_card_number

    out = []
    for _ in range(n):
        token = card_token(key, synthetic_card_number(rng.randrange(plan.citizens))) if key else rng.randbytes(16)
        out.append(eligibility_pb2.CheckRequest(scenario=plan.scenario, card_token=token).SerializeToString())
    return out


def check_payloads(plan: "Plan", rng: random.Random, n: int) -> list[bytes]:
    """CheckRequests for card tokens of the synthetic city, rows uniform in ``citizens``."""
    return _check_requests(plan, rng, n, _card_key(plan.data_dir, required=True))


def baseline_payloads(plan: "Plan", rng: random.Random, n: int) -> list[bytes]:
    """The same CheckRequests (the server's key if ``data_dir`` has one, else random tokens
    of the same size: a server with no logic does not read them)."""
    return _check_requests(plan, rng, n, _card_key(plan.data_dir, required=False))


CHECK_METHOD = "/qianjiang.v1.EligibilityService/Check"
CALLS: dict[str, CallKind] = {
    "check": CallKind("check", CHECK_METHOD, check_payloads, "unary Check against the real service"),
    "baseline": CallKind("baseline", CHECK_METHOD, baseline_payloads, "unary Check against a no-logic server"),
}


# --- one run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What every process of one run needs (pickled to the spawned processes)."""

    target: str
    rate: float
    total: int
    processes: int
    call: CallKind
    data_dir: str
    citizens: int
    scenario: str
    timeout: float
    max_in_flight: int
    seed: int
    warmup: int


def require_loopback(target: str) -> None:
    """Refuse any target that is not ``host:port`` on a loopback address."""
    from server.auth import is_loopback

    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not is_loopback(host):
        raise ValueError(f"target {target!r}: only host:port on a loopback address may be load-tested")


def _precise_loop() -> asyncio.AbstractEventLoop:
    # epoll_wait() rounds timeouts up to whole milliseconds; select() takes microseconds.
    # A load-test client has a handful of descriptors, far below select()'s 1024.
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


async def _run_schedule(plan: Plan, index: int, call, payloads: list[bytes], t0: float, offset: float) -> dict:
    """Send this process's share of the schedule; ``t0`` is on the perf_counter clock."""
    import grpc

    indices = range(index, plan.total, plan.processes)
    latencies = np.full(len(indices), np.nan)
    refused = np.full(len(indices), np.nan)  # time to an error status (a refusal must be quick too)
    errors: dict[str, int] = {}
    tasks: set[asyncio.Task] = set()
    state = {"in_flight": 0, "max_in_flight": 0, "last_done": 0.0}
    timeout = plan.timeout

    def count(code: str) -> None:
        errors[code] = errors.get(code, 0) + 1

    async def one(j: int, intended: float, payload: bytes) -> None:
        try:
            await call(payload, timeout=timeout)
            latencies[j] = time.perf_counter() - intended
        except grpc.aio.AioRpcError as exc:
            refused[j] = time.perf_counter() - intended
            count(exc.code().name)
        except asyncio.CancelledError:
            count("CLIENT_CANCELLED")
        except Exception as exc:  # noqa: BLE001 - a client-side failure is a counted error
            count(f"CLIENT_{type(exc).__name__}")
        finally:
            state["in_flight"] -= 1
            state["last_done"] = max(state["last_done"], time.perf_counter())

    cpu0 = time.process_time()
    max_lag = lag_sum = 0.0
    burst = 0
    n_payloads = len(payloads)
    for j, i in enumerate(indices):
        intended = t0 + i / plan.rate
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
            burst = 0
        else:
            burst += 1
            if burst >= 32:  # behind schedule: still let the calls in flight make progress
                await asyncio.sleep(0)
                burst = 0
        lag = time.perf_counter() - intended
        max_lag = max(max_lag, lag)
        lag_sum += lag
        if state["in_flight"] >= plan.max_in_flight:
            count("CLIENT_BACKLOG")
            continue
        state["in_flight"] += 1
        state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        task = asyncio.create_task(one(j, intended, payloads[j % n_payloads]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        _, late = await asyncio.wait(set(tasks), timeout=timeout + DRAIN_GRACE_S)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
    cpu_s = time.process_time() - cpu0
    answered = latencies[~np.isnan(latencies)]
    hist = Histogram()
    hist.record_many(answered)
    refused_hist = Histogram()
    refused_hist.record_many(refused[~np.isnan(refused)])
    return {
        "histogram": hist.to_dict(),
        "refused_histogram": refused_hist.to_dict(),
        "ok": int(answered.size),
        "scheduled": len(indices),
        "errors": errors,
        "cpu_s": cpu_s,
        "max_lag_s": max_lag,
        "lag_sum_s": lag_sum,
        "max_in_flight": state["max_in_flight"],
        "last_done_wall": (state["last_done"] - offset) if state["last_done"] else None,
    }


async def _process_main(plan: Plan, index: int, conn) -> dict | None:
    import grpc

    n_mine = len(range(index, plan.total, plan.processes))
    rng = random.Random(plan.seed * 1000 + index)
    payloads = plan.call.payloads(plan, rng, max(1, min(TOKEN_POOL, n_mine)))
    # A subchannel pool of its own: each process (and each run) opens its own connection.
    channel = grpc.aio.insecure_channel(plan.target, options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        try:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ConnectionError(f"cannot connect to {plan.target} within {CONNECT_TIMEOUT_S:.0f} s") from None
        call = channel.unary_unary(plan.call.method)  # bytes in, bytes out: no per-call protobuf work
        for k in range(plan.warmup):  # outside the schedule, not measured
            try:
                await call(payloads[k % len(payloads)], timeout=plan.timeout)
            except grpc.aio.AioRpcError:
                pass
        conn.send(("ready", None))
        if not conn.poll(READY_TIMEOUT_S + START_DELAY_S + 10):
            raise TimeoutError("no start signal from the parent")
        what, t0_wall = conn.recv()
        if what != "start":
            return None
        offset = time.perf_counter() - time.time()  # perf_counter = wall + offset
        return await _run_schedule(plan, index, call, payloads, t0_wall + offset, offset)
    finally:
        await channel.close()


def _process(plan: Plan, index: int, conn) -> None:
    """Entry point of one spawned process."""
    try:
        with asyncio.Runner(loop_factory=_precise_loop) as runner:
            result = runner.run(_process_main(plan, index, conn))
        conn.send(("done", result))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        try:
            conn.send(("error", f"process {index}: {type(exc).__name__}: {exc}"))
        except (OSError, ValueError):
            pass
    finally:
        conn.close()


def _receive(conn, deadline: float, expect: str):
    if not conn.poll(max(0.0, deadline - time.time())):
        raise TimeoutError(f"a load-test process sent no {expect!r} in time")
    what, payload = conn.recv()
    if what == "error":
        raise RuntimeError(payload)
    if what != expect:
        raise RuntimeError(f"a load-test process sent {what!r}, expected {expect!r}")
    return payload


def run_open_loop(
    target: str,
    rate: float,
    seconds: float,
    processes: int = 1,
    call: str | CallKind = "check",
    data_dir: str = "data",
    citizens: int = 100_000,
    scenario: str = "metro_pay_later",
    timeout: float = 1.0,
    *,
    max_in_flight: int = 10_000,
    seed: int = 2018,
    warmup: int = 5,
) -> dict:
    """Send ``round(rate · seconds)`` requests on the fixed schedule ``t0 + i/rate``, split
    over ``processes`` spawned processes, and report latency from each intended send time.

    ``max_in_flight`` is per process; ``timeout`` is each call's deadline (from its send);
    ``warmup`` calls per process are sent, unmeasured, before the schedule starts.

    Returns ``rate, seconds, processes, call, sent`` (requests scheduled), ``ok`` (answered
    without error), ``errors`` (gRPC status name or ``CLIENT_*`` → count; ``ok`` plus the
    errors is ``sent``), ``error_rate``, ``achieved_rps`` (``ok`` over the time from t0 to
    the last answer), ``p50_ms p90_ms p99_ms p999_ms max_ms`` (answered requests; None if
    none), ``runner_cpu_s`` (CPU seconds of all runner processes during the run),
    ``runner_cpu_util`` (that over elapsed × processes: near 1.0 means the runner itself is
    saturated), ``max_schedule_lag_ms`` / ``mean_schedule_lag_ms`` (how late the scheduler
    launched requests), ``max_in_flight_seen`` (largest per process), ``elapsed_s``.
    """
    require_loopback(target)
    kind = CALLS[call] if isinstance(call, str) else call
    if not isinstance(kind, CallKind):
        raise TypeError(f"call: expected one of {sorted(CALLS)} or a CallKind")
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate {rate}: must be > 0")
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"seconds {seconds}: must be in (0, {MAX_SECONDS:g}]")
    if not 1 <= processes <= MAX_PROCESSES:
        raise ValueError(f"processes {processes}: must be 1..{MAX_PROCESSES}")
    total = round(rate * seconds)
    if not 1 <= total <= MAX_REQUESTS:
        raise ValueError(f"rate x seconds = {total} requests: must be 1..{MAX_REQUESTS:,}")
    if kind.payloads is check_payloads:
        _card_key(data_dir, required=True)  # fail here, before spawning anything
    plan = Plan(target, float(rate), total, processes, kind, str(data_dir), int(citizens), scenario,
                float(timeout), int(max_in_flight), int(seed), int(warmup))

    ctx = mp.get_context("spawn")
    conns, procs = [], []
    for k in range(processes):
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=_process, args=(plan, k, child_end), name=f"open-loop-{k}", daemon=True)
        proc.start()
        child_end.close()
        conns.append(parent_end)
        procs.append(proc)
    try:
        deadline = time.time() + READY_TIMEOUT_S
        for conn in conns:
            _receive(conn, deadline, "ready")
        t0_wall = time.time() + START_DELAY_S
        for conn in conns:
            conn.send(("start", t0_wall))
        deadline = t0_wall + total / rate + timeout + DRAIN_GRACE_S + 30
        parts = [_receive(conn, deadline, "done") for conn in conns]
    except BaseException:
        for conn in conns:
            try:
                conn.send(("abort", None))
            except (OSError, ValueError):
                pass
        raise
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in conns:
            conn.close()

    hist, refused = Histogram(), Histogram()
    errors: dict[str, int] = {}
    for part in parts:
        hist.merge(Histogram.from_dict(part["histogram"]))
        refused.merge(Histogram.from_dict(part["refused_histogram"]))
        for code, n in part["errors"].items():
            errors[code] = errors.get(code, 0) + n
    ok = sum(part["ok"] for part in parts)
    last = [part["last_done_wall"] for part in parts if part["last_done_wall"] is not None]
    elapsed = max(last) - t0_wall if last else 0.0
    cpu_s = sum(part["cpu_s"] for part in parts)
    n_errors = sum(errors.values())
    summary = hist.summary()
    return {
        "call": kind.name,
        "target": target,
        "rate": rate,
        "seconds": seconds,
        "processes": processes,
        "sent": total,
        "ok": ok,
        "errors": dict(sorted(errors.items())),
        "error_rate": round(n_errors / total, 6),
        "achieved_rps": round(ok / elapsed, 1) if elapsed > 0 else 0.0,
        **{k: summary[k] for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")},
        # how long the calls that got an error status took to get it
        **{f"error_{k}": v for k, v in refused.summary().items() if k in ("p50_ms", "p99_ms", "max_ms")},
        "runner_cpu_s": round(cpu_s, 3),
        "runner_cpu_util": round(cpu_s / (max(elapsed, 1e-9) * processes), 3) if elapsed > 0 else None,
        "max_schedule_lag_ms": round(max(part["max_lag_s"] for part in parts) * 1000, 3),
        "mean_schedule_lag_ms": round(sum(part["lag_sum_s"] for part in parts) / total * 1000, 3),
        "max_in_flight_seen": max(part["max_in_flight"] for part in parts),
        "elapsed_s": round(elapsed, 3),
        "histogram": hist.to_dict(),  # for plots (loadtest/report.py); left out of printed JSON
    }


# --- sweep --------------------------------------------------------------------------------


def passes(result: dict, target_p99_ms: float, max_error_rate: float = 0.001) -> bool:
    """A step passes when some requests were answered, p99 is under the target and the
    errors (any kind, CLIENT_BACKLOG included) are under ``max_error_rate`` of those sent."""
    return bool(result["ok"]) and result["p99_ms"] < target_p99_ms and result["error_rate"] < max_error_rate


def sweep(
    target: str,
    start_rate: float,
    target_p99_ms: float,
    *,
    seconds: float = 3.0,
    max_steps: int = 8,
    max_rate: float = 100_000,
    min_rate: float = 10.0,
    max_error_rate: float = 0.001,
    tolerance: float = 0.05,
    pause_s: float = 0.5,
    on_step: Callable[[dict], None] | None = None,
    **run_kwargs,
) -> dict:
    """The highest rate at which p99 stays under ``target_p99_ms`` and errors under
    ``max_error_rate``: from ``start_rate``, double while the step passes, then bisect
    between the best passing and the lowest failing rate until they are within
    ``tolerance`` of each other. At most ``max_steps`` runs of ``seconds`` each, at rates
    from ``min_rate`` (below it, too few samples to say much about a p99: the sweep gives
    up) to ``max_rate``; ``run_kwargs`` go to ``run_open_loop`` (processes, call, ...).

    Returns ``best_rate`` (None if no step passed), ``bracket`` [best passing, lowest
    failing or None], ``target_p99_ms``, ``max_error_rate`` and ``steps`` (each step's
    ``run_open_loop`` result with ``"pass"``).
    """
    if max_steps < 1:
        raise ValueError("max_steps must be >= 1")
    steps: list[dict] = []
    lo, hi = 0.0, None
    rate = float(min(start_rate, max_rate))
    while len(steps) < max_steps:
        if steps:
            time.sleep(pause_s)  # let the server drain the previous step
        result = run_open_loop(target, rate, seconds, **run_kwargs)
        result["pass"] = passes(result, target_p99_ms, max_error_rate)
        steps.append(result)
        if on_step:
            on_step(result)
        if result["pass"]:
            lo = max(lo, rate)
        else:
            hi = rate if hi is None else min(hi, rate)
        if hi is None:
            if rate >= max_rate:
                break
            rate = min(rate * 2, max_rate)
        else:
            if hi - lo <= tolerance * hi or hi - lo < 2:
                break
            rate = float(max(1, round((lo + hi) / 2)))
            if rate < min_rate:
                break
    return {
        "target": target,
        "target_p99_ms": target_p99_ms,
        "max_error_rate": max_error_rate,
        "best_rate": lo or None,
        "bracket": [lo or None, hi],
        "steps": steps,
    }


# --- command line -------------------------------------------------------------------------


def _step_line(r: dict) -> dict:
    keys = ("rate", "sent", "ok", "errors", "achieved_rps", "p50_ms", "p99_ms", "max_ms",
            "runner_cpu_s", "max_schedule_lag_ms", "pass")
    return {k: r[k] for k in keys if k in r}


def main(argv=None, quiet: bool = False) -> dict:
    ap = argparse.ArgumentParser(prog="python -m loadtest.open_loop", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="127.0.0.1:50051", help="host:port on a loopback address")
    ap.add_argument("--rate", type=float, default=1000.0, help="requests a second (the start rate with --sweep)")
    ap.add_argument("--seconds", type=float, default=10.0, help="schedule length (of each step with --sweep)")
    ap.add_argument("--processes", type=int, default=1, help="runner processes sharing the rate")
    ap.add_argument("--call", choices=sorted(CALLS), default="check")
    ap.add_argument("--data-dir", default="data", help="the server's data directory (for the card-token key)")
    ap.add_argument("--citizens", type=int, default=100_000, help="size of the seeded synthetic city")
    ap.add_argument("--scenario", default="metro_pay_later")
    ap.add_argument("--timeout", type=float, default=1.0, help="each call's deadline, seconds")
    ap.add_argument("--max-in-flight", type=int, default=10_000, help="per process; more are CLIENT_BACKLOG")
    ap.add_argument("--seed", type=int, default=2018, help="seeds the token mix")
    ap.add_argument("--sweep", action="store_true", help="find the highest rate with p99 under --p99-ms")
    ap.add_argument("--p99-ms", type=float, default=5.0, help="the sweep's p99 target")
    ap.add_argument("--max-steps", type=int, default=8, help="the sweep's runs at most")
    ap.add_argument("--max-rate", type=float, default=100_000, help="the sweep never goes above this")
    ap.add_argument("--min-rate", type=float, default=10.0, help="the sweep gives up below this")
    args = ap.parse_args(argv)
    run_kwargs = dict(processes=args.processes, call=args.call, data_dir=args.data_dir, citizens=args.citizens,
                      scenario=args.scenario, timeout=args.timeout, max_in_flight=args.max_in_flight, seed=args.seed)
    if args.sweep:
        def progress(step: dict) -> None:
            if not quiet:
                print(json.dumps(_step_line(step)), file=sys.stderr, flush=True)

        result = sweep(args.target, args.rate, args.p99_ms, seconds=args.seconds, max_steps=args.max_steps,
                       max_rate=args.max_rate, min_rate=args.min_rate, on_step=progress, **run_kwargs)
        line = {**result, "steps": [_step_line(s) for s in result["steps"]],
                "processes": args.processes, "call": args.call, "cpu_count": os.cpu_count()}
    else:
        result = run_open_loop(args.target, args.rate, args.seconds, **run_kwargs)
        line = {k: v for k, v in result.items() if k != "histogram"} | {"cpu_count": os.cpu_count()}
    if not quiet:
        print(json.dumps(line), flush=True)
    return line


if __name__ == "__main__":
    main()
