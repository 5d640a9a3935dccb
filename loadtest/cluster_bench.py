"""The replica set-up under load, one JSON line (docs/replicas.md).

    python -m loadtest.cluster_bench                     # 3 nodes, 20,000 citizens, about 2 1/2 minutes
    python -m loadtest.cluster_bench --nodes 2 --citizens 5000 --quick

Starts deploy/cluster.py's set-up on loopback (a throwaway PostgreSQL, ``--nodes`` replicas of
one worker each, HAProxy in front) and measures, in one run:

* ``checks_per_s``: closed-loop unary checks through the front, and ``checks_per_s_node``
  against node 0 alone (loadtest/closed_loop.py, same client processes and concurrency), back
  to back. On one machine the nodes, PostgreSQL, HAProxy and the load generator share the
  cores: ``cpu`` says who used them during the front's run.
* ``staleness_p99_ms`` (and p50, max): a consent revoke or grant through one node (round
  robin), then the time until every other node's answer to a check of that citizen has
  changed, polled every millisecond: the write's acknowledgement to the last node's changed
  answer. ``staleness_bound_ms`` is the configured NOT_SERVING bound.
* ``staleness_record_p99_ms``: the same for a serious record (a court-listed dishonest debtor
  ingested through one node: the others' GetScore below 550) and its withdrawal.
* overload: open-loop checks through the front at ``--overload`` (2) times the front's
  measured capacity for 4 s (loadtest/open_loop.py, two spawned processes):
  ``overload_statuses`` (status → share of the calls due; ``CLIENT_BACKLOG`` are calls the
  runner itself could not send on this machine) and ``resource_exhausted_share`` (also
  ``_of_sent``); ``overload_schedule_lag_max_ms`` says how far the runner fell behind its
  schedule; ``overload_recovery_s``: from the end of the flood to the first check answered
  in under 50 ms.
* failover: open-loop checks through the front at half its capacity for ``--failover-seconds``
  while records are ingested through the front (each acknowledged one remembered); node 1 is
  SIGKILLed a third of the way in and started again at once (from its snapshot, then the
  change log). The client retries UNAVAILABLE once (latency counts from the intended send
  time, the retry included). ``failover_errors`` (by status, after that retry) and
  ``failover_p99_ms`` (the checks intended from the kill to 3 s after the node serves
  again), ``recovery_s`` (restart to SERVING: snapshot read, replay, follower current),
  ``writes_acked`` and ``writes_lost`` (acknowledged records not in the store afterwards).
* the one audit: ``list_checks_p99_ms`` ("who checked me" through the front, random citizens,
  reading every node's segments in the shared audit directory after all of the above).
  The check path itself is a single node's (an append to memory; no database round trip):
  ``checks_per_s_node`` is a node writing into the shared directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from server.seed import citizen_id

SCENARIO = "campus_fitness"


def _pct(values, q):
    return round(float(np.percentile(np.asarray(values, float), q)), 2) if len(values) else None


def _cpu_of(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) of each named process and its children."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for name, pid in pids.items():
        total = 0.0
        try:
            for task in {pid, *_descendants(pid)}:
                with open(f"/proc/{task}/stat") as fh:
                    parts = fh.read().rsplit(")", 1)[1].split()
                total += (int(parts[11]) + int(parts[12])) / tick
        except (OSError, ValueError):
            pass
        out[name] = total
    return out


_STAT: list = []


def _machine_busy(_start, wall: float) -> float | None:
    """Cores the whole machine was busy (every process, ours or not: /proc/stat's first
    line, user to steal, less idle and iowait, over all its ticks) since the previous call;
    the first call only takes the sample."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:9]]
    total = sum(fields)
    busy = total - fields[3] - fields[4]
    before = _STAT[:]
    _STAT[:] = [busy, total]
    if not before or total <= before[1]:
        return None
    return round((busy - before[0]) / (total - before[1]) * (os.cpu_count() or 1), 2)


def _descendants(pid: int) -> set[int]:
    found = set()
    try:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            found.add(int(child))
            found |= _descendants(int(child))
    except OSError:
        pass
    return found


def _pg_pids(dsn_dir: Path) -> list[int]:
    pidfile = dsn_dir / "data" / "postmaster.pid"
    try:
        return [int(pidfile.read_text().split()[0])]
    except (OSError, ValueError, IndexError):
        return []


def closed_loop(target: str, seconds: float, citizens: int, processes: int = 2, concurrency: int = 16) -> dict:
    from loadtest.closed_loop import main as closed_main

    return closed_main(["--target", target, "--mode", "unary", "--seconds", str(seconds), "--processes", str(processes),
                        "--concurrency", str(concurrency), "--citizens", str(citizens), "--scenario", SCENARIO,
                        "--data-dir", "/nonexistent"], quiet=True)


# --- staleness ------------------------------------------------------------------------------


def _until_every_node(cluster, writer: int, what: str, changed) -> float:
    """Milliseconds from now (a write's acknowledgement through ``writer``) until
    ``changed(i)`` holds on every other node i; RuntimeError past 5 s."""
    acked = time.perf_counter()
    pending = set(range(cluster.n)) - {writer}
    while pending:
        pending = {i for i in pending if not changed(i)}
        if pending and time.perf_counter() - acked > 5:
            raise RuntimeError(f"{what} did not reach nodes {sorted(pending)} in 5 s")
        if pending:
            time.sleep(0.001)
    return (time.perf_counter() - acked) * 1000


def staleness(cluster, trials: int, citizens: int) -> list[float]:
    """Milliseconds from a consent write's acknowledgement (through node k) to the last other
    node answering the changed decision."""
    from clients.client import QianjiangClient
    from server.keys import card_token, synthetic_card_number

    key = bytes.fromhex(cluster._env()["QJ_CARD_KEY"])
    clients = [QianjiangClient(cluster.target(i)) for i in range(cluster.n)]
    rng = random.Random(7)
    out = []
    for t in range(trials):
        writer = t % cluster.n
        for _ in range(50):  # an authorised citizen
            row = rng.randrange(citizens)
            token = card_token(key, synthetic_card_number(row))
            if clients[writer].check(SCENARIO, token).outcome != _NOT_AUTHORISED:
                break
        cid = citizen_id(row)
        for revoke in (True, False):
            (clients[writer].revoke_consent if revoke else clients[writer].grant_consent)(cid)
            out.append(_until_every_node(cluster, writer, "a consent write",
                                         lambda i: (clients[i].check(SCENARIO, token).outcome == _NOT_AUTHORISED) == revoke))
    return out


def staleness_records(cluster, trials: int, citizens: int) -> list[float]:
    """Milliseconds from a serious record's acknowledgement (a court-listed dishonest debtor,
    ingested through node k) to the last other node scoring the citizen below 550; then the
    record's withdrawal, to the last other node scoring them 550 or more again."""
    from clients.client import QianjiangClient
    from qianjiang.v1 import records_pb2

    clients = [QianjiangClient(cluster.target(i)) for i in range(cluster.n)]
    rng = random.Random(9)
    out = []
    for t in range(trials):
        writer = t % cluster.n
        for _ in range(100):
            cid = citizen_id(rng.randrange(citizens))
            try:
                if clients[writer].get_score(cid).score >= 560:
                    break
            except Exception:  # noqa: BLE001 - a minor, or no consent to read: another one
                continue
        record_id = f"stale-{os.getpid()}-{t}"
        for capped in (True, False):
            if capped:
                clients[writer].ingest([records_pb2.Record(record_id=record_id, citizen_id=cid,
                                                           variable="court_listed_dishonest_debtor",
                                                           date="2026-11-20", value=1.0)])
            else:
                clients[writer].withdraw_record(record_id)
            out.append(_until_every_node(cluster, writer, "a record",
                                         lambda i: (clients[i].get_score(cid).score < 550) == capped))
    return out


def list_checks_latency(cluster, citizens: int, n: int = 60) -> list[float]:
    """Milliseconds of ListChecks ("who checked me") through the front, random citizens, after
    the runs (every node's segments in the one audit directory)."""
    from clients.client import QianjiangClient

    client = QianjiangClient(cluster.front, timeout=5.0)
    rng = random.Random(5)
    out, entries = [], 0
    for _ in range(n):
        t = time.perf_counter()
        entries += len(client.list_checks(citizen_id(rng.randrange(citizens)), limit=100))
        out.append((time.perf_counter() - t) * 1000)
    return out


def _outcome(name: str) -> int:
    from qianjiang.v1 import eligibility_pb2

    return eligibility_pb2.Outcome.Value(name)


_NOT_AUTHORISED = None


# --- an open-loop run through the front, with one retry of UNAVAILABLE ----------------------


async def _open_loop(target: str, rate: float, seconds: float, payloads: list[bytes], timeout: float,
                     retry_unavailable: bool, t0: float, events: list) -> None:
    import grpc

    from qianjiang.v1 import eligibility_pb2

    channel = grpc.aio.insecure_channel(target)
    call = channel.unary_unary("/qianjiang.v1.EligibilityService/Check",
                               response_deserializer=eligibility_pb2.Decision.FromString)
    n = int(rate * seconds)
    tasks = []

    async def one(i: int, intended: float) -> None:
        launched = time.perf_counter()
        code = "OK"
        for attempt in (0, 1):
            try:
                await call(payloads[i % len(payloads)], timeout=timeout)
                code = "OK"
                break
            except grpc.aio.AioRpcError as e:
                code = e.code().name
                if not (retry_unavailable and attempt == 0 and e.code() == grpc.StatusCode.UNAVAILABLE):
                    break
        events.append((intended - t0, time.perf_counter() - intended, code, launched - intended))

    loop = asyncio.get_running_loop()
    for i in range(n):
        intended = t0 + i / rate
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(i, intended)))
    await asyncio.gather(*tasks)
    await channel.close()


def open_loop(target: str, rate: float, seconds: float, payloads: list[bytes], timeout: float = 2.0,
              retry_unavailable: bool = False, processes: int = 2) -> tuple[list, float]:
    """(events (offset s, latency s, status), t0 perf_counter) of a run split over threads."""
    t0 = time.perf_counter() + 0.2
    events: list = []
    threads = [threading.Thread(target=lambda k=k: asyncio.run(_open_loop(
        target, rate / processes, seconds, payloads[k::processes], timeout, retry_unavailable, t0 + k / rate, events)))
        for k in range(processes)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return events, t0


def _payloads(cluster, citizens: int, n: int = 4000) -> list[bytes]:
    from qianjiang.v1 import eligibility_pb2
    from server.keys import card_token, synthetic_card_number

    key = bytes.fromhex(cluster._env()["QJ_CARD_KEY"])
    rng = random.Random(11)
    return [eligibility_pb2.CheckRequest(scenario=SCENARIO, card_token=card_token(
        key, synthetic_card_number(rng.randrange(citizens)))).SerializeToString() for _ in range(n)]


def _writes(cluster, stop: threading.Event, acked: list, citizens: int) -> None:
    """Ingest a record at a time through the front until ``stop``; remember each acknowledged one."""
    from clients.client import QianjiangClient
    from qianjiang.v1 import records_pb2

    client = QianjiangClient(cluster.front, timeout=3.0)
    rng = random.Random(3)
    k = 0
    while not stop.is_set():
        record_id = f"bench-{os.getpid()}-{k}"
        cid = citizen_id(rng.randrange(citizens))
        try:
            acks = client.ingest([records_pb2.Record(record_id=record_id, citizen_id=cid, variable="volunteer_hours",
                                                     date="2026-11-20", value=1.0)])
            if acks and records_pb2.RecordAck.Status.Name(acks[0].status) in ("ACCEPTED", "DUPLICATE"):
                acked.append((record_id, cid))
        except Exception:  # noqa: BLE001 - refused or failed: not acknowledged, not counted
            pass
        k += 1
        time.sleep(0.02)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m loadtest.cluster_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--citizens", type=int, default=20_000)
    ap.add_argument("--seconds", type=float, default=6.0, help="each throughput run")
    ap.add_argument("--trials", type=int, default=60, help="staleness trials (each a revoke and a grant)")
    ap.add_argument("--overload", type=float, default=2.0, help="the flood's rate, times the front's capacity")
    ap.add_argument("--failover-seconds", type=float, default=15.0)
    ap.add_argument("--max-lag", type=float, default=1.0)
    ap.add_argument("--maxconn", type=int, default=16, help="calls the front sends one node at once")
    ap.add_argument("--queue", type=int, default=32, help="calls waiting in the front")
    ap.add_argument("--dir", type=Path, default=None, help="where the set-up lives (default: a temporary directory)")
    ap.add_argument("--quick", action="store_true", help="shorter runs (a smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.trials, args.failover_seconds = 3.0, 15, 9.0
    global _NOT_AUTHORISED
    _NOT_AUTHORISED = _outcome("NOT_AUTHORISED")

    from deploy.cluster import Cluster, health

    root = args.dir or Path(tempfile.mkdtemp(prefix="qj-cluster-bench-"))
    cluster = Cluster(root, nodes=args.nodes, workers=1, citizens=args.citizens, max_lag=args.max_lag,
                      maxconn=args.maxconn, queue=args.queue, snapshot_interval=5.0)
    result: dict = {"nodes": args.nodes, "citizens": args.citizens, "cores": os.cpu_count()}
    try:
        cluster.start()
        os.environ["QJ_CARD_KEY"] = cluster._env()["QJ_CARD_KEY"]  # the load tools' card tokens
        time.sleep(1.0)

        # throughput: the front, then node 0 alone, same client
        named = {f"node{i}": p.pid for i, p in cluster.procs.items()}
        named["haproxy"] = cluster.haproxy.pid
        for pid in _pg_pids(root / "pg"):
            named["postgresql"] = pid
        _machine_busy(None, 0)
        cpu0, w0 = _cpu_of(named), time.perf_counter()
        client_cpu0 = os.times()
        front = closed_loop(cluster.front, args.seconds, args.citizens)
        wall = time.perf_counter() - w0
        cpu1 = _cpu_of(named)
        client_cpu = os.times()
        node = closed_loop(cluster.target(0), args.seconds, args.citizens)
        result["checks_per_s"] = front["checks_per_s"]
        result["checks_per_s_node"] = node["checks_per_s"]
        result["front_p99_ms"], result["node_p99_ms"] = front["p99_ms"], node["p99_ms"]
        result["cpu_cores_used"] = {name: round((cpu1[name] - cpu0[name]) / wall, 2) for name in named}
        result["cpu_cores_used"]["load_generator"] = round(
            (client_cpu.children_user + client_cpu.children_system - client_cpu0.children_user
             - client_cpu0.children_system) / wall, 2)
        result["cpu_cores_used"]["machine"] = _machine_busy(w0, wall)

        # staleness
        stale = staleness(cluster, args.trials, args.citizens)
        result.update(staleness_p50_ms=_pct(stale, 50), staleness_p99_ms=_pct(stale, 99),
                      staleness_max_ms=round(max(stale), 2), staleness_bound_ms=int(args.max_lag * 1000),
                      staleness_samples=len(stale))

        stale = staleness_records(cluster, max(args.trials // 3, 5), args.citizens)
        result.update(staleness_record_p50_ms=_pct(stale, 50), staleness_record_p99_ms=_pct(stale, 99),
                      staleness_record_max_ms=round(max(stale), 2), staleness_record_samples=len(stale))

        # overload at 2x through the front
        payloads = _payloads(cluster, args.citizens)
        capacity = max(front["checks_per_s"], 100.0)
        rate = capacity * args.overload
        from loadtest.open_loop import run_open_loop

        # the project's open-loop runner: spawned processes, a precise scheduler
        flood = run_open_loop(cluster.front, rate, 4.0, processes=2, call="check", data_dir="/nonexistent",
                              citizens=args.citizens, scenario=SCENARIO, timeout=2.0)
        flood_end = time.perf_counter()
        codes = {"OK": flood["ok"], **flood["errors"]}
        total = max(flood["sent"], 1)
        result["overload_rate"] = round(rate, 1)
        result["overload_answered_per_s"] = flood["achieved_rps"]
        # how late the runner launched calls (small next to the run: the rate was really offered)
        result["overload_schedule_lag_max_ms"] = flood["max_schedule_lag_ms"]
        result["overload_statuses"] = {k: round(v / total, 4) for k, v in sorted(codes.items())}
        result["resource_exhausted_share"] = round(codes.get("RESOURCE_EXHAUSTED", 0) / total, 4)
        # of the calls the runner did send (CLIENT_BACKLOG: due while it had too many in flight)
        sent = total - sum(v for k, v in codes.items() if k.startswith("CLIENT_"))
        result["resource_exhausted_share_of_sent"] = round(codes.get("RESOURCE_EXHAUSTED", 0) / max(sent, 1), 4)
        result["overload_ok_p99_ms"] = flood["p99_ms"]
        result["overload_refused_p99_ms"] = flood.get("error_p99_ms")
        from clients.client import QianjiangClient

        probe = QianjiangClient(cluster.front)
        while True:
            t = time.perf_counter()
            try:
                probe.check(SCENARIO, bytes(16))
                if time.perf_counter() - t < 0.05:
                    break
            except Exception:  # noqa: BLE001
                pass
            if time.perf_counter() - flood_end > 30:
                break
        result["overload_recovery_s"] = round(time.perf_counter() - flood_end, 3)

        # failover: SIGKILL node 1 under open-loop load and writes, start it again
        rate = capacity / 2
        acked: list = []
        stop = threading.Event()
        writer = threading.Thread(target=_writes, args=(cluster, stop, acked, args.citizens), daemon=True)
        marks: dict = {}

        def failover():
            time.sleep(args.failover_seconds / 3)
            marks["kill"] = time.perf_counter()
            cluster.kill_node(1, signal.SIGKILL)
            marks["restart"] = time.perf_counter()
            cluster.start_node(1, wait=False)
            cluster.wait_serving(1)
            marks["serving"] = time.perf_counter()

        killer = threading.Thread(target=failover, daemon=True)
        writer.start()
        killer.start()
        events, t0 = open_loop(cluster.front, rate, args.failover_seconds, payloads, timeout=2.0,
                               retry_unavailable=True)
        killer.join(120)
        stop.set()
        writer.join(10)
        if "serving" in marks:
            lo, hi = marks["kill"] - t0, marks["serving"] - t0 + 3.0
            window = [(lat, code) for off, lat, code, _ in events if lo <= off <= hi]
            errors: dict[str, int] = {}
            for _, code in window:
                if code != "OK":
                    errors[code] = errors.get(code, 0) + 1
            all_errors: dict[str, int] = {}
            for _, _, code, _ in events:
                if code != "OK":
                    all_errors[code] = all_errors.get(code, 0) + 1
            result["failover_rate"] = round(rate, 1)
            result["failover_send_lag_p99_ms"] = _pct([lag * 1000 for *_, lag in events], 99)
            result["failover_checks"] = len(events)
            result["failover_errors"] = all_errors
            result["failover_window_errors"] = errors
            result["failover_p99_ms"] = _pct([lat * 1000 for lat, code in window if code == "OK"], 99)
            result["failover_p50_ms"] = _pct([lat * 1000 for lat, code in window if code == "OK"], 50)
            result["recovery_s"] = round(marks["serving"] - marks["restart"], 2)
        else:
            result["failover_errors"] = "node 1 did not come back"
        # no acknowledged write lost: each is in the store, and node 1 (the one killed) has it
        from server.store import open_store

        store = open_store(cluster.dsn)
        lost = 0
        try:
            for record_id, _ in acked:
                if not store._fetch_all("SELECT 1 FROM records WHERE record_id = %s", (record_id,)):
                    lost += 1
            hwm = store.high_water_mark()
        finally:
            store.close()
        result["writes_acked"] = len(acked)
        result["writes_lost"] = lost
        # every node caught up to the store's position
        deadline = time.monotonic() + 10
        for i in range(cluster.n):
            while health(cluster.target(i)) != "SERVING" and time.monotonic() < deadline:
                time.sleep(0.05)
        took = list_checks_latency(cluster, args.citizens)
        result.update(list_checks_p50_ms=_pct(took, 50), list_checks_p99_ms=_pct(took, 99),
                      audit_segments=len(list((root / "audit").glob("*.bin"))))
        result["nodes_serving_after"] = sum(health(cluster.target(i)) == "SERVING" for i in range(cluster.n))
        result["store_position"] = hwm
        result["limits"] = ("one 2-core machine runs the nodes, PostgreSQL, HAProxy and the Python load generator "
                            "together: see cpu_cores_used (cores each used during the front's throughput run)"
                            if (os.cpu_count() or 1) <= 4 else "")
    finally:
        cluster.stop()
        if args.dir is None:  # a temporary set-up: its data directories and logs go too
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
