"""Holding the call slots: can a caller freeze the service? (server/interceptors.py)

    python -m loadtest.attack.slots --seconds 10

Starts a real server in this process (token mode, config/policy.toml, loopback, port 0,
1,500 synthetic citizens, the default limits), and for ``seconds`` keeps up, from a grpc.aio
client on its own thread and connections:

* half-open unary calls without credentials or with a wrong token (headers, never the
  message), each re-sent half a second after it is refused;
* half-open Health.Check calls (health needs no identity) and Health.Watch streams, four
  times the worker's Watch places;
* one authenticated partner (bus_gateway, a real token) holding twice its quota of calls
  without their message, reopened as the server ends them;

while a legitimate gateway (metro_gateway) checks in a loop (2 s deadline each) and a probe
asks health every 100 ms. Returns (and prints as one JSON line): checks_ok, checks_failed
(by status), check_p99_ms, health_ok, health_failed, and what the attack got: attack_calls
(by status or "open" at the end). Bounded in time (``seconds`` plus a few of set-up and the
server's call bound), and it cleans up (every call cancelled, the server drained, its data
directory removed).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import threading
import time

import grpc

from loadtest.attack import gateway_checks, token_server
from grpc_health.v1 import health_pb2

CHECK = "/qianjiang.v1.EligibilityService/Check"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
PARTNER, ATTACKING_PARTNER = "metro_gateway", "bus_gateway"
PER_CONNECTION = 64  # held calls per attacking connection (below the server's HTTP/2 limit)
RESEND_SECONDS = 0.5  # a refused or ended attacking call is sent again after this


def _token(identity: str) -> str:
    return f"attack-slots-{identity}-0123456789"


class _Attack:
    """The attacker: on its own event loop, keeps ``want`` calls of each kind going."""

    def __init__(self, target: str, open_streams: int, partner_quota: int):
        self.target = target
        self.stop = False
        self.codes: collections.Counter[str] = collections.Counter()
        self.kinds = {  # kind -> (how many at once, metadata)
            "no_credentials": (2 * PER_CONNECTION, ()),
            "wrong_token": (PER_CONNECTION, (("authorization", "Bearer not-a-token-of-this-server"),)),
            "health_check": (PER_CONNECTION, ()),
            "health_watch": (4 * open_streams, ()),
            "partner_over_quota": (2 * partner_quota, (("authorization", f"Bearer {_token(ATTACKING_PARTNER)}"),)),
        }
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="attack-slots", daemon=True)
        self.thread.start()
        self.task = asyncio.run_coroutine_threadsafe(self._run(), self.loop)

    async def _never(self, release: asyncio.Event):
        await release.wait()
        return
        yield

    async def _keep(self, kind: str, n: int, metadata, release: asyncio.Event) -> None:
        """n calls of ``kind`` at once, each re-sent when it ends, over connections of at most
        PER_CONNECTION calls."""
        channels = [grpc.aio.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(-(-n // PER_CONNECTION))]
        try:
            async def one(channel):
                while not self.stop:
                    if kind == "health_watch":
                        call = channel.unary_stream(HEALTH_WATCH, request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                                    response_deserializer=health_pb2.HealthCheckResponse.FromString)(
                            health_pb2.HealthCheckRequest())
                    else:
                        method = HEALTH_CHECK if kind == "health_check" else CHECK
                        call = channel.stream_unary(method)(self._never(release), metadata=metadata)
                    try:
                        await call.code()
                        self.codes[f"{kind}:{(await call.code()).name}"] += 1
                    except asyncio.CancelledError:
                        call.cancel()
                        raise
                    # re-sent after a pause: the attack is on the slots, not a flood of the CPU
                    # (the attacker shares this process, and its GIL, with the server)
                    await asyncio.sleep(RESEND_SECONDS)

            await asyncio.gather(*(one(channels[i // PER_CONNECTION]) for i in range(n)))
        finally:
            for channel in channels:
                await channel.close()

    async def _run(self) -> None:
        self.release = asyncio.Event()
        self.tasks = [asyncio.ensure_future(self._keep(kind, n, md, self.release)) for kind, (n, md) in self.kinds.items()]
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def close(self) -> None:
        def cancel():
            self.stop = True
            self.release.set()
            for t in self.tasks:
                t.cancel()
        self.loop.call_soon_threadsafe(cancel)
        try:
            self.task.result(15)
        except Exception:  # noqa: BLE001 - cancelled: what it counted is what matters
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def run(seconds: float = 10.0, citizens: int = 1500) -> dict:
    """The attack of the module's docstring for ``seconds``; returns its figures."""
    from clients.client import QianjiangClient

    with token_server("qj-attack-slots-", _token, citizens) as (config, runtime, node, target):
        limits = config.limits
        attack = _Attack(target, limits.open_streams, limits.caller_calls)
        health = collections.Counter()
        card = runtime.synthetic_card_token(0)
        stop = threading.Event()

        def probe():
            with QianjiangClient(target, timeout=2) as qj:
                while not stop.wait(0.1):
                    try:
                        health[qj.health()] += 1
                    except grpc.RpcError as exc:
                        health[exc.code().name] += 1

        prober = threading.Thread(target=probe, daemon=True)
        try:
            time.sleep(0.5)  # the attack in place first
            prober.start()
            checks = gateway_checks(target, _token(PARTNER), card, seconds)
        finally:
            stop.set()
            if prober.is_alive():
                prober.join(5)
            attack.close()
        return {
            "seconds": seconds,
            **checks,
            "health_ok": health.get("SERVING", 0),
            "health_failed": {k: v for k, v in health.items() if k != "SERVING"},
            "attack_calls": dict(sorted(attack.codes.items())),
        }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--citizens", type=int, default=1500)
    args = ap.parse_args(argv)
    print(json.dumps(run(args.seconds, args.citizens)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
