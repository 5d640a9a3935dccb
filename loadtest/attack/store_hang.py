"""A hung PostgreSQL under a serving node: the server is SIGSTOPped (a partition looks the
same to the client: a socket that stays open and never answers), then SIGCONTed.

    python -m loadtest.attack.store_hang --seconds 10

Starts a throwaway PostgreSQL on 127.0.0.1 (scripts/pg_test_server.sh) and a real server on
it in this process (port 0, loopback, 1,500 synthetic citizens), freezes every process of the
PostgreSQL cluster for ``seconds`` while a loop of legitimate checks and score reads runs,
and returns (and, from the command line, prints as one JSON line):

* checks_ok, checks_failed, check_p99_ms; reads_ok, reads_failed, read_p99_ms: the loop's
  calls during the freeze (each with a 2 s deadline);
* write_unavailable_ms: how long the first write after the freeze took to be refused
  (UNAVAILABLE; the store's bound, ``QJ_STORE_TIMEOUT``, 3 s by default);
* health_not_serving_after_ms: from the freeze to ``qianjiang.v1.RecordsService``
  NOT_SERVING (and ``qianjiang_store_up`` 0: store_down_after_ms);
* recovered_after_s: from the SIGCONT to health SERVING and a write acknowledged again;
* acknowledged_lost: writes acknowledged during the run that are not in the store (0).

Bounded in time (``seconds`` plus about 30 s of set-up), and it cleans up: the cluster is
always resumed before it is stopped and removed. :func:`freeze` and :func:`thaw` are what
tests/test_store_hang.py uses too.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pg_test_server.sh"
RECORDS = "qianjiang.v1.RecordsService"
SOURCE = "attack"


def pg(cmd: str, where: str) -> subprocess.CompletedProcess:
    """scripts/pg_test_server.sh ``cmd`` ``where`` (start prints the DSN on stdout)."""
    return subprocess.run(["bash", str(SCRIPT), cmd, where], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "QJ_PG_NO_INSTALL": "1"})


def cluster_pids(where: str) -> list[int]:
    """The postmaster of the test server in ``where`` and every process it started (the
    backends serving the connections, the background workers)."""
    postmaster = int((Path(where) / "data" / "postmaster.pid").read_text().split()[0])
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # the command may hold spaces and parentheses: the fields after its last ")"
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == postmaster:
            children.append(int(stat.parent.name))
    return [postmaster] + children


def freeze(where: str) -> list[int]:
    """SIGSTOP the whole cluster: sockets stay open and the kernel still acknowledges what
    is sent, but nothing ever answers (a hung server; to the client, like a partition)."""
    pids = cluster_pids(where)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    return pids


def thaw(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _p99_ms(seconds: list[float]) -> float:
    if not seconds:
        return 0.0
    ordered = sorted(seconds)
    return round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 1)


def run(seconds: float = 10.0) -> dict:
    """Freeze PostgreSQL for ``seconds`` under a serving node; the figures (module docstring)."""
    if not 1 <= seconds <= 300:
        raise ValueError(f"seconds must be between 1 and 300, not {seconds}")
    import grpc
    from prometheus_client import CollectorRegistry

    from clients.client import QianjiangClient
    from qianjiang.v1.records_pb2 import Record
    from server.app import Node, Runtime, ServerConfig, citizen_id
    from server.metrics import Metrics
    from server.store import NotFound, open_store

    where = tempfile.mkdtemp(prefix="qj-pg-hang-")
    data = tempfile.mkdtemp(prefix="qj-hang-data-")
    started = pg("start", where)
    if started.returncode != 0:
        pg("stop", where)
        raise RuntimeError(f"could not start a PostgreSQL server: {started.stderr[-500:]}")
    dsn = started.stdout.strip()
    node = qj = None
    frozen: list[int] = []
    acknowledged: list[str] = []
    out: dict = {"seconds": seconds}
    try:
        runtime = Runtime.prepare(ServerConfig(data_dir=Path(data), store_url=dsn, seed_citizens=1500,
                                               metrics_port=0, port=0))
        registry = CollectorRegistry()
        node = Node(runtime, port=0, metrics=Metrics(registry)).start()
        runtime.load()
        node.attach()
        out["bound_s"] = node.store_watch.bound
        target = f"127.0.0.1:{node.port}"
        # No client retries: the figures are the server's own answers.
        qj = QianjiangClient(target, timeout=2.0, channel=grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)]))
        s = runtime.state
        rows = [r for r in range(200) if s.consent[r] and s.adult[r]]
        tokens = [runtime.synthetic_card_token(r) for r in rows]
        today = dt.date.today().isoformat()
        serial = iter(range(1_000_000))

        def write(row: int, timeout: float = 10.0):
            rid = f"hang-{next(serial)}"
            ack = qj.ingest([Record(record_id=rid, citizen_id=citizen_id(row), variable="volunteer_hours",
                                    date=today, value=1.0, source=SOURCE)], timeout=timeout)
            acknowledged.append(rid)
            return ack

        write(rows[0])
        stop = threading.Event()
        figures = {"checks": [], "checks_failed": 0, "reads": [], "reads_failed": 0}

        def loop(kind: str, call) -> None:
            k = 0
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    call(k)
                    figures[kind].append(time.perf_counter() - t0)
                except grpc.RpcError:
                    figures[f"{kind}_failed"] += 1
                k += 1

        loops = [
            threading.Thread(target=loop, args=("checks", lambda k: qj.check("metro_pay_later", tokens[k % len(tokens)])),
                             daemon=True),
            threading.Thread(target=loop, args=("reads", lambda k: qj.get_score(citizen_id(rows[k % len(rows)]))),
                             daemon=True),
        ]
        frozen = freeze(where)
        t_freeze = time.monotonic()
        for t in loops:
            t.start()

        def health_down() -> None:
            while not stop.is_set():
                if "health_not_serving_after_ms" not in out and qj.health(RECORDS) == "NOT_SERVING":
                    out["health_not_serving_after_ms"] = round((time.monotonic() - t_freeze) * 1000)
                if "store_down_after_ms" not in out and registry.get_sample_value("qianjiang_store_up") == 0:
                    out["store_down_after_ms"] = round((time.monotonic() - t_freeze) * 1000)
                if "health_not_serving_after_ms" in out and "store_down_after_ms" in out:
                    return
                time.sleep(0.02)

        watcher = threading.Thread(target=health_down, daemon=True)
        watcher.start()
        t0 = time.monotonic()
        try:
            write(rows[1])
            out["write_during_freeze"] = "ACKNOWLEDGED"  # must not happen: the store cannot have committed it
        except grpc.RpcError as err:
            out["write_during_freeze"] = err.code().name
        out["write_unavailable_ms"] = round((time.monotonic() - t0) * 1000)
        time.sleep(max(0.0, seconds - (time.monotonic() - t_freeze)))
        stop.set()
        for t in loops:
            t.join(5)
        watcher.join(5)

        thaw(frozen)
        t_thaw = time.monotonic()
        frozen = []
        deadline = t_thaw + 60
        while time.monotonic() < deadline:
            try:
                if qj.health(RECORDS) == "SERVING" and write(rows[2])[0].status == 1:
                    out["recovered_after_s"] = round(time.monotonic() - t_thaw, 2)
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        out.update(
            checks_ok=len(figures["checks"]), checks_failed=figures["checks_failed"],
            check_p99_ms=_p99_ms(figures["checks"]), reads_ok=len(figures["reads"]),
            reads_failed=figures["reads_failed"], read_p99_ms=_p99_ms(figures["reads"]),
        )
    finally:
        thaw(frozen)
        if qj is not None:
            qj.close()
        if node is not None:
            node.drain(0)
    try:
        store = open_store(dsn)
        try:
            lost = 0
            for rid in acknowledged:
                try:
                    store.get_record(SOURCE, rid)
                except NotFound:
                    lost += 1
            out["acknowledged"], out["acknowledged_lost"] = len(acknowledged), lost
        finally:
            store.close()
    finally:
        pg("stop", where)
        subprocess.run(["rm", "-rf", data], check=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="how long PostgreSQL stays frozen")
    args = parser.parse_args()
    print(json.dumps(run(args.seconds)))


if __name__ == "__main__":
    main()
