"""Replay the adversarial test's attacks against real servers on loopback, one after another,
and print one JSON line with what legitimate callers got during each.

    python -m loadtest.attack [--seconds 10] [--skip store_hang]

* ``slots``: callers holding the call slots (half-open calls without credentials, health
  Watch floods, a partner over its quota): loadtest/attack/slots.py;
* ``store_hang``: PostgreSQL frozen with SIGSTOP under checks, reads and writes (needs the
  PostgreSQL server binaries: scripts/pg_test_server.sh): loadtest/attack/store_hang.py;
* ``audit_flood``: one gateway sending 100,000-token batches of random cards:
  loadtest/attack/audit_flood.py.

Each is bounded in time and cleans up after itself.
"""

from __future__ import annotations

import argparse
import json

from loadtest.attack import audit_flood, slots, store_hang

ATTACKS = {"slots": slots.run, "store_hang": store_hang.run, "audit_flood": audit_flood.run}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="how long each attack lasts")
    ap.add_argument("--skip", action="append", default=[], choices=sorted(ATTACKS), help="leave an attack out")
    args = ap.parse_args(argv)
    out = {name: run(args.seconds) for name, run in ATTACKS.items() if name not in args.skip}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
