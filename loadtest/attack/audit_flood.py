"""Flooding the audit log: how fast can one gateway grow it, and what do others get meanwhile?

    python -m loadtest.attack.audit_flood --seconds 10

Starts a real server in this process (token mode, config/policy.toml, loopback, port 0), and
for ``seconds`` one gateway (bus_gateway, a real token) sends BatchCheck calls of
``--batch`` random card tokens (cards nobody holds) as fast as it can, while a legitimate
gateway (metro_gateway) checks in a loop. Returns (and prints as one JSON line): the audit
log's growth in bytes a second under the flood, the flood's batches and tokens a second and
what they were answered, and the legitimate checks answered OK with their p99. Bounded in
time; the server is drained and its data directory removed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import threading
import time
from pathlib import Path

import grpc

from loadtest.attack import gateway_checks, token_server

PARTNER, FLOODER = "metro_gateway", "bus_gateway"


def _token(identity: str) -> str:
    return f"attack-audit-{identity}-0123456789"


def _bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("audit-*") if p.is_file())


def run(seconds: float = 10.0, batch: int = 100_000, citizens: int = 1500) -> dict:
    from clients.client import QianjiangClient

    with token_server("qj-attack-audit-", _token, citizens) as (_, runtime, node, target):
        audit_dir = node.audit.directory
        card = runtime.synthetic_card_token(0)
        stop = threading.Event()
        flood = collections.Counter()

        def flooder():
            with QianjiangClient(target, timeout=10, token=_token(FLOODER)) as qj:
                while not stop.is_set():
                    try:
                        qj.check_batch("bus_pay_later", os.urandom(16 * batch))
                        flood["OK"] += 1
                    except grpc.RpcError as exc:
                        flood[exc.code().name] += 1
                        time.sleep(0.05)

        node.audit.flush()
        before, t0 = _bytes(audit_dir), time.monotonic()
        thread = threading.Thread(target=flooder, daemon=True)
        thread.start()
        try:
            checks = gateway_checks(target, _token(PARTNER), card, seconds)
        finally:
            stop.set()
            thread.join(30)
        elapsed = time.monotonic() - t0
        node.audit.flush()
        grown = _bytes(audit_dir) - before
        return {
            "seconds": round(elapsed, 2),
            "batch_tokens": batch,
            "audit_growth_bytes_per_s": round(grown / elapsed),
            "flood_batches": dict(flood),
            "flood_tokens_per_s": round(flood["OK"] * batch / elapsed),
            **checks,
        }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=100_000, help="random tokens a flooding batch")
    args = ap.parse_args(argv)
    print(json.dumps(run(args.seconds, args.batch)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
