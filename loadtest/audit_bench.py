""""Who checked me" at a year's volume: ``checks_of`` over a year of audit segments.

    python -m loadtest.audit_bench [--days 365] [--per-day N] [--subjects M] [--queries Q]

Writes ``--days`` days of synthetic audit volume in the real file format (format 3:
``.dict`` with the writer's header, 56-byte entries, 9-byte batch items), one segment per
writer per city day as the writer rolls them over, each indexed by the real
``server.audit.build_index``; then times ``AuditLog.checks_of`` (limit 100) for
``--queries`` random citizens, half of them with entries, and ``find`` for a few decision
ids. Prints one JSON line: days, entries, subjects, bytes_on_disk, index_bytes, build_s
(writing + indexing), checks_of_p50_ms, p99_ms, max_ms (and find_p50_ms). The data lives
under a temporary directory, deleted at the end.

Volume assumed. The city has ~12.5 M people; metro and bus gates make several million
pay-later checks a day — about 5 M, plus a few hundred thousand score views and other
checks — so a year is ~2 G disclosures, ~100 GB with their indexes. The default is a fifth
of that per day (1 M disclosures: 18 GB for a year) so that it fits the disk of a shared
build machine and runs in minutes; the number of segments a query visits (days x
writers, at full scale here) drives the query cost, while five times as many entries per
segment add about two steps to each binary search within one read block. 2 M riders share
the checks (about 180 a year each), from 2 worker processes (writers); 30 % of
disclosures come in gateway batches of 100, the rest are unary checks. The page cache is
warm (the data was just written): each indexed segment visited costs one read of one index
block, which on a cold cache is a disk read.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from server.audit import (
    CITY_UTC_OFFSET_S, DAY_NS, ENTRY, ITEM, UNARY, AuditLog, build_index, city_day, segment_header,
)

CALLERS = ["metro-gateway", "bus-gateway", "citizen-app", "library-desk"]
METHODS = ["EligibilityService/Check", "EligibilityService/BatchCheck", "ScoreService/GetScore"]
SCENARIOS = ["metro_pay_later", "bus_pay_later", "self_view", "library_deposit_free"]
RELEASES = ["1+f2ffda0723ab c3a1 r12", "2+0b9e2c11d4aa c3a2 r12"]
FAKE_PID = 4_194_304 + 7  # above Linux's pid_max: no live process, as for a finished writer
BATCH = 100


def write_segment(directory: Path, writer: int, day: int, seq0: int, times: np.ndarray, subjects: np.ndarray,
                  batch_share: float, rng: np.random.Generator, pid: int = FAKE_PID) -> tuple[Path, int]:
    """One finished segment of ``writer`` for city ``day`` with the given disclosures (time
    order), exactly as the writer lays it out; returns (its .bin path, the next seq)."""
    n = len(times)
    n_batched = int(n * batch_share) // BATCH * BATCH
    is_item = np.zeros(n, dtype=bool)
    if n_batched:
        is_item[rng.choice(n // BATCH, n_batched // BATCH, replace=False)[:, None] * BATCH + np.arange(BATCH)] = True
    unary_at = np.flatnonzero(~is_item)
    heads_at = np.flatnonzero(is_item)[::BATCH]  # a batch's first disclosure: its header's place
    # entries in time order: unary ones and one header per batch
    at = np.sort(np.concatenate([unary_at, heads_at]))
    head = np.isin(at, heads_at)
    entries = np.zeros(len(at), ENTRY)
    entries["time_ns"] = times[at]
    entries["seq"] = np.arange(seq0, seq0 + len(at), dtype=np.uint64)
    entries["batch_index"] = np.where(head, BATCH, UNARY)
    k = int(head.sum())
    entries["subject"] = subjects[at]
    entries["subject"][head] = np.arange(k, dtype=np.uint64) * BATCH  # first item's position
    entries["position"] = np.uint64(day) * 1000 + np.arange(len(at), dtype=np.uint64) // 1000
    entries["as_of_day"] = day - 1
    entries["caller"] = np.where(head, 0, rng.integers(0, len(CALLERS), len(at)))
    entries["method"] = np.where(head, 1, 0)
    entries["scenario"] = np.where(head, 0, rng.integers(0, len(SCENARIOS), len(at)))
    entries["release"] = day % len(RELEASES)
    entries["result"] = np.where(head, 0, rng.integers(1, 8, len(at)))
    items = np.zeros(k * BATCH, ITEM)
    items["subject"] = subjects[np.flatnonzero(is_item)]  # batches in time order, items in order
    items["result"] = rng.integers(1, 8, len(items))
    stem = directory / f"audit-{day * DAY_NS - CITY_UTC_OFFSET_S * 10**9 + writer % 10**6}-{pid}"
    codes = [("caller", CALLERS), ("method", METHODS), ("scenario", SCENARIOS), ("release", RELEASES)]
    lines = [json.dumps(segment_header(writer, pid, day))] + [
        json.dumps({"kind": kind, "code": c, "value": v}) for kind, values in codes for c, v in enumerate(values)]
    Path(f"{stem}.dict").write_text("".join(line + "\n" for line in lines))
    items.tofile(f"{stem}.items")
    entries.tofile(f"{stem}.bin")
    return Path(f"{stem}.bin"), seq0 + len(at)


def build(directory: Path, key: bytes, days: int, per_day: int, citizens: list[str], writers: int,
          batch_share: float, seed: int = 1) -> dict:
    """Write and index ``days`` days ending today; returns figures and a few decision ids."""
    rng = np.random.default_rng(seed)
    pool = AuditLog(directory, key, retention_days=None).subjects_of(citizens)
    writer_ids = [int(w) for w in rng.integers(1, 2**63, writers, dtype=np.int64)]
    seqs = [1] * writers
    today = city_day(time.time_ns())
    samples = []  # (writer, seq, item) of a few stored decisions, for find()
    t0 = time.perf_counter()
    for day in range(today - days + 1, today + 1):
        start_ns = day * DAY_NS - CITY_UTC_OFFSET_S * 10**9
        for w in range(writers):
            n = per_day // writers
            times = np.sort(rng.integers(start_ns, start_ns + DAY_NS, n, dtype=np.int64))
            subjects = pool[rng.integers(0, len(pool), n)]
            bin_path, nxt = write_segment(directory, writer_ids[w], day, seqs[w], times, subjects, batch_share, rng)
            build_index(bin_path)
            if (today - day) % max(1, days // 6) == 0:
                samples.append((writer_ids[w], int(rng.integers(seqs[w], nxt))))
            seqs[w] = nxt
    return {"build_s": time.perf_counter() - t0, "samples": samples}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--per-day", type=int, default=1_000_000, help="disclosures a day (all writers)")
    p.add_argument("--subjects", type=int, default=2_000_000, help="distinct people checked")
    p.add_argument("--queries", type=int, default=400)
    p.add_argument("--writers", type=int, default=2, help="worker processes, one segment each a day")
    p.add_argument("--batch-share", type=float, default=0.3, help="share of disclosures in batches of 100")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--dir", default=None, help="where to write (a temporary directory inside it; default $TMPDIR)")
    a = p.parse_args(argv)
    for name in ("days", "per_day", "subjects", "queries", "writers", "limit"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= a.batch_share <= 1:
        p.error("--batch-share must be in [0, 1]")
    key = secrets.token_bytes(32)
    directory = Path(tempfile.mkdtemp(prefix="qj-audit-bench-", dir=a.dir))
    try:
        citizens = [f"c{i:08d}" for i in range(a.subjects)]
        built = build(directory, key, a.days, a.per_day, citizens, a.writers, a.batch_share)
        files = list(directory.iterdir())
        bytes_on_disk = sum(f.stat().st_size for f in files)
        index_bytes = sum(f.stat().st_size for f in files if f.suffix == ".idx")
        log = AuditLog(directory, key, retention_days=None)
        rng = np.random.default_rng(2)
        asked = [citizens[i] if q % 2 == 0 else f"x{i:08d}"  # the x... ids were never checked
                 for q, i in enumerate(rng.integers(0, a.subjects, a.queries))]
        t = time.perf_counter()
        log.checks_of(asked[0], a.limit)  # the first call of a process reads every index's fence: apart
        first_ms = (time.perf_counter() - t) * 1000
        times, found = [], 0
        for cid in asked:
            t = time.perf_counter()
            got = log.checks_of(cid, a.limit)
            times.append((time.perf_counter() - t) * 1000)
            found += bool(got)
        find_ms = []
        for writer, seq in built["samples"]:
            decision_id = log.ids.encode(writer, seq)
            t = time.perf_counter()
            entry = log.find(decision_id)
            find_ms.append((time.perf_counter() - t) * 1000)
            assert entry is not None and entry.decision_id.startswith(decision_id), decision_id
        times = np.array(times)
        out = {
            "days": a.days, "entries": a.days * (a.per_day // a.writers) * a.writers, "subjects": a.subjects,
            "writers": a.writers, "segments": a.days * a.writers, "bytes_on_disk": bytes_on_disk,
            "index_bytes": index_bytes, "build_s": round(built["build_s"], 2),
            "checks_of_p50_ms": round(float(np.percentile(times, 50)), 3),
            "p99_ms": round(float(np.percentile(times, 99)), 3), "max_ms": round(float(times.max()), 3),
            "queries": a.queries, "queries_with_entries": found,
            "first_query_ms": round(first_ms, 3),
            "find_p50_ms": round(float(np.median(find_ms)), 3) if find_ms else None,
        }
        print(json.dumps(out), flush=True)
        return out
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
