"""The start-up load without a snapshot, timed: ``ServingState.load`` of a whole seeded city.

    python -m loadtest.load_bench --citizens 1000000 --store sqlite
    python -m loadtest.load_bench --citizens 1000000 --store postgresql://user@host/db

Seeds the store with a synthetic city of ``--citizens`` people if it does not hold that many
already (SQLite: ``--db``, by default /tmp/qj-load-bench/qj-N.db, kept for the next run;
PostgreSQL: an empty database, or one this tool seeded before), then loads it in a fresh
process, so that its peak RSS is the load's alone: the shared state allocated as a server
allocates it (capacity 1.25 x the citizens), the store read in bulk, features derived and
everyone scored with the model's reference calibration (2 kernel threads). Prints one JSON
line: citizens, records, load_s, records_per_s, peak_rss_bytes (VmHWM of the loading
process, the shared state included), and the split: read_s (records, citizens and cards
read at once: records_read_s by the records' threads, citizens_read_s the cards and citizens
by the main thread, of which hash_s hashing the citizen ids), features_s, kernel_s.
``--delete`` removes the SQLite file afterwards.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path


def _seed_store():
    try:
        from server.seed import seed_store  # the bulk seeder, where there is one
    except ImportError:
        from server.app import seed_store
    return seed_store


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def seed_if_needed(url: str, n: int, seed: int) -> float:
    """Seed ``url`` with ``n`` citizens unless it holds them; the seconds it took (0: reused)."""
    from kernel.spec import load_spec
    from server.keys import Keys
    from server.store import open_store

    store = open_store(url)
    try:
        have = store.counts()["citizens"]
        if have == n:
            return 0.0
        if have:
            raise SystemExit(f"{store.name} holds {have} citizens, not {n}: give an empty store (or --db)")
        t0 = time.perf_counter()
        _seed_store()(store, load_spec(), n, seed, Keys(card=b"bench-card-key-0", audit=b"bench-audit-key-"))
        return time.perf_counter() - t0
    finally:
        store.close()


def load(url: str, chunk_citizens: int | None, n_threads: int) -> dict:
    """One load as a server's start does it (run in a fresh process)."""
    from kernel.calibration import reference_table
    from kernel.score import Scorer
    from kernel.spec import load_spec
    from server.city_time import today
    from server.scenarios import load_scenarios
    from server.state import ServingState
    from server.store import open_store

    spec = load_spec()
    store = open_store(url)
    try:
        counts = store.counts()
        capacity = max(1024, int(counts["citizens"] * 1.25) + 1024)  # as Runtime.prepare
        state = ServingState.allocate(spec, capacity, token_capacity=max(capacity, int(counts["cards"] * 1.25) + 1024),
                                      audit_key=b"bench-audit-key-")
        scorer = Scorer(spec, reference_table(spec))
        t0 = time.perf_counter()
        with state.lock:  # ServingState.load, with the chunk size given
            state.fill(store, scorer, load_scenarios(), today(), n_threads=n_threads, chunk_citizens=chunk_citizens)
        load_s = time.perf_counter() - t0
    finally:
        store.close()
    info = state.last_load
    return {
        "store": "sqlite" if url.startswith("sqlite") else "postgresql",
        "citizens": info["citizens"], "records": info["records"], "load_s": round(load_s, 2),
        "records_per_s": round(info["records"] / load_s) if load_s else 0, "peak_rss_bytes": peak_rss_bytes(),
        "read_s": round(info["read_s"], 2), "records_read_s": round(info["records_read_s"], 2),
        "citizens_read_s": round(info["citizens_read_s"], 2), "hash_s": round(info["hash_s"], 2),
        "features_s": round(info["features_s"], 2), "kernel_s": round(info["kernel_s"], 2),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--citizens", type=int, default=1_000_000)
    ap.add_argument("--store", default="sqlite", help="sqlite, or a postgresql:// URL")
    ap.add_argument("--db", help="the SQLite file (default /tmp/qj-load-bench/qj-N.db)")
    ap.add_argument("--seed", type=int, default=2018)
    ap.add_argument("--chunk-citizens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--delete", action="store_true", help="remove the SQLite file afterwards")
    ap.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)  # the child
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.store == "sqlite":
        path = Path(args.db or f"/tmp/qj-load-bench/qj-{args.citizens}.db")
        url = f"sqlite:///{path.resolve()}"
    else:
        path, url = None, args.store
    if args.load_only:
        print(json.dumps(load(url, args.chunk_citizens, args.threads)), flush=True)
        return
    seed_s = seed_if_needed(url, args.citizens, args.seed)
    try:
        child = [sys.executable, "-m", "loadtest.load_bench", "--load-only", "--citizens", str(args.citizens),
                 "--store", args.store, "--threads", str(args.threads)]
        if path is not None:
            child += ["--db", str(path)]
        if args.chunk_citizens:
            child += ["--chunk-citizens", str(args.chunk_citizens)]
        out = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True, env=os.environ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        if seed_s:
            result["seed_s"] = round(seed_s, 1)
        print(json.dumps(result), flush=True)
    finally:
        if args.delete and path is not None:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
