"""The city-scale benchmark: seeding, a cold start, a snapshot start, a restart after SIGKILL,
memory per citizen and per worker, and a day rollover under load, at N citizens.

    python -m loadtest.scale --citizens 1000000      # one JSON line; cleans up after itself
    python -m loadtest.scale --citizens 12500000 --data /tmp/qj12m   # seeds it once, reuses it after

Each step runs the real thing on loopback: the seed (server/seed.py) in a process of its own,
``qjscore serve`` for the starts (health SERVING is the end of a start), and, for the
rollover, a server process whose day is moved on by one while a writer sends records one at
a time and a gateway sends checks (both through the real client), so the write latencies
and the check p99 are those a caller sees during it. The figures, in order:

* ``seed_s``, ``store_bytes``, ``seed_peak_rss_bytes``: the synthetic city into SQLite;
* ``cold_start_s``, ``start_peak_rss_bytes``: a start with no snapshot (the whole load);
* ``snapshot_bytes``, ``snapshot_start_s``: the snapshot a clean stop writes, and a start
  from it; ``state_bytes_per_citizen``: the shared serving state over the citizens (token
  and citizen indexes included); ``rollover_index_bytes_per_citizen``: the loading
  process's own index of ageing records (server/ageing.py), written in the snapshot too;
* ``kill_restart_s``: after writes, SIGKILL of two workers and their parent, and a start
  (the last snapshot plus the store's changes since); ``rss_per_worker_bytes``: a worker's
  private memory (its share of the state is shared);
* ``rollover_s``, ``rollover_rows``, ``max_write_ms`` / ``max_write_ms_before`` /
  ``max_write_ms_after`` (during the rollover / in the 3 s before it / for as long again
  after it, with no rollover: what the store costs a write anyway), ``writes`` (percentiles
  and writes over 50 ms of each window), ``check_p99_ms`` during it: the rollover runs in
  the server's parent process while a worker process serves, as in production;
* ``full_rescore_s``: the kernel over everyone on 2 threads.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss(pid: int | str = "self") -> int:
    """VmHWM of a process, bytes (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _private_bytes(pid: int) -> int:
    """A process's private memory (smaps_rollup Private_Clean + Private_Dirty), bytes."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1]) * 1024
    return total


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Serve:
    """``qjscore serve`` on ``data`` in its own process group; :meth:`wait` until SERVING."""

    started: list = []  # every server process started, for the cleanup of a failed run

    def __init__(self, data: Path, log: Path, *args: str):
        from clients.client import QianjiangClient

        self.port = _free_port()
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "clients.cli", "serve", "--data-dir", str(data), "--port", str(self.port),
                 "--metrics-port", "0", "--snapshot-interval", "0", *args],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        Serve.started.append(self.proc)
        self.client = QianjiangClient(f"127.0.0.1:{self.port}", timeout=10)

    def wait(self, t0: float, timeout: float = 3600) -> float:
        import grpc

        while True:
            try:
                if self.client.health(timeout=1) == "SERVING":
                    return time.monotonic() - t0
            except grpc.RpcError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}); see {self.log}")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"not SERVING after {timeout:.0f} s; see {self.log}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(3600)

    def kill(self) -> None:
        self.client.close()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _seed(data: Path, n: int) -> dict:
    """The seed in a process of its own (its peak RSS is the seed's)."""
    code = f"""
import json, sys, time
from pathlib import Path
from kernel.spec import load_spec
from loadtest.scale import _peak_rss
from server.keys import load_keys
from server.seed import seed_store
from server.store import open_store
data = Path({str(data)!r})
data.mkdir(parents=True, exist_ok=True)
t0 = time.perf_counter()
with open_store(f"sqlite:///{{data / 'qianjiang.db'}}") as store:
    seeded = seed_store(store, load_spec(), {n}, 2018, load_keys(data))
print(json.dumps({{"records": seeded.records, "seed_s": round(time.perf_counter() - t0, 2), "seed_peak_rss_bytes": _peak_rss()}}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rollover_server(data: str, port: int, conn) -> None:
    """A server as ``qjscore serve --workers 1`` runs one, a worker process serving the
    shared state and this parent doing the maintenance (server/app.py): here, moving the
    day on by one when told ("roll"; "wait S": S seconds without), then the kernel over
    everyone ("rescore"), reporting each."""
    import logging

    from kernel.columns import ScoreColumns
    from kernel.score import Scorer
    from server.app import Runtime, ServerConfig, _worker
    from server.rollover import roll_over
    from server.state import CONTROL_WORKERS_SERVING

    logging.basicConfig(level=logging.WARNING)
    runtime = Runtime.prepare(ServerConfig(data_dir=Path(data), port=port, metrics_port=0, workers=1))
    parent = os.getpid()
    worker = os.fork()
    if worker == 0:
        code = 0
        try:
            _worker(runtime, parent)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    runtime.load()
    while runtime.control.meta[CONTROL_WORKERS_SERVING] < 1:
        time.sleep(0.05)
    runtime._ageing_ready.wait(600)  # the rollover's index, read after a snapshot start (as refresh_if_new_day waits)
    conn.send("ready")
    what = conn.recv()
    state, scorer = runtime.state, Scorer(runtime.spec, runtime.calibration())
    store = runtime.open_store()
    try:
        if what == "roll":
            try:  # as the server's maintenance thread runs it (server/app.py _maintenance)
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
            except OSError:
                pass
            figures = roll_over(state, store, scorer, runtime.scenarios, state.as_of_day + 1)
        else:  # a baseline: as long as a rollover would take, without one
            time.sleep(float(what.split()[1]))
            figures = {"seconds": float(what.split()[1]), "rows": 0}
    finally:
        store.close()
    conn.send(figures)
    assert conn.recv() == "rescore"
    n = state.n_citizens
    out = ScoreColumns.empty(n, compact=True)
    t0 = time.perf_counter()
    scorer.score(state.features[:n], state.adult[:n], out=out, n_threads=2)
    conn.send(round(time.perf_counter() - t0, 3))
    conn.recv()
    os.kill(worker, signal.SIGTERM)
    os.waitpid(worker, 0)


def _latencies(seconds: list[float]) -> dict:
    """p50, p99, p99.9 and the maximum of call latencies (ms), and how many took over 50 ms."""
    if not seconds:
        return {}
    ms = 1000 * np.asarray(seconds)
    return {"n": len(ms), "p50": round(float(np.percentile(ms, 50)), 2), "p99": round(float(np.percentile(ms, 99)), 2),
            "p999": round(float(np.percentile(ms, 99.9)), 2), "max": round(float(ms.max()), 2),
            "over_50ms": int((ms > 50).sum())}


def _rollover(data: Path, n: int, before_s: float = 3.0, roll: bool = True, wait_s: float = 60.0) -> dict:
    """The rollover in a server process while a writer and a gateway call it; then as long
    again without one (``after``: the store's own latencies over as long a time, to tell
    what the rollover adds from what a 33 GB store costs a write anyway)."""
    from clients.client import QianjiangClient, Record
    from server.keys import load_keys
    from server.seed import synthetic_card_tokens

    port = _free_port()
    spawn = multiprocessing.get_context("spawn")  # not fork: this process runs grpc clients
    parent, child = spawn.Pipe()
    proc = spawn.Process(target=_rollover_server, args=(str(data), port, child))
    proc.start()
    assert parent.recv() == "ready"
    tokens = synthetic_card_tokens(load_keys(data).card, 0, min(n, 10_000))
    writes, checks, phase, stop = {"before": [], "during": [], "after": []}, [], ["before"], threading.Event()
    started = [0.0]  # when the rollover was asked for (perf_counter)
    slow: list[tuple[float, float]] = []  # (seconds after the rollover began, write ms) of the slowest writes

    def writer() -> None:
        with QianjiangClient(f"127.0.0.1:{port}", timeout=30) as qj:
            i = 0
            while not stop.is_set():
                t = time.perf_counter()
                qj.ingest([Record(record_id=f"scale-{os.getpid()}-{t:.6f}-{i}", citizen_id=f"c{(i * 7919) % n:08d}",
                                  variable="volunteer_hours", date="2026-01-01", value=1.0, source="")])
                took = time.perf_counter() - t
                writes[phase[0]].append(took)
                if phase[0] == "during" and took > 0.02:
                    slow.append((round(t - started[0], 2), round(1000 * took, 1)))
                i += 1

    def gateway() -> None:
        rng = np.random.default_rng(1)
        with QianjiangClient(f"127.0.0.1:{port}", timeout=30) as qj:
            while not stop.is_set():
                t = time.perf_counter()
                qj.check("metro_pay_later", bytes(tokens[int(rng.integers(0, len(tokens)))]))
                if phase[0] == "during":
                    checks.append(time.perf_counter() - t)

    threads = [threading.Thread(target=writer), threading.Thread(target=gateway)]
    for t in threads:
        t.start()
    try:
        time.sleep(before_s)
        started[0] = time.perf_counter()
        phase[0] = "during"
        parent.send("roll" if roll else f"wait {wait_s}")
        figures = parent.recv()
        phase[0] = "after"
        time.sleep(max(time.perf_counter() - started[0], 1.0))
    finally:
        stop.set()
        for t in threads:
            t.join()
    parent.send("rescore")
    full_rescore_s = parent.recv()
    parent.send("stop")
    proc.join(60)
    return {
        "rollover_s": figures["seconds"], "rollover_rows": figures["rows"], "rollover": figures,
        "max_write_ms": round(1000 * max(writes["during"], default=0), 2),
        "max_write_ms_before": round(1000 * max(writes["before"], default=0), 2),
        "max_write_ms_after": round(1000 * max(writes["after"], default=0), 2),
        "writes": {name: _latencies(w) for name, w in writes.items()},
        "writes_during_rollover": len(writes["during"]),
        "check_p99_ms": round(1000 * float(np.percentile(checks, 99)), 2) if checks else None,
        "checks_during_rollover": len(checks), "full_rescore_s": full_rescore_s,
        "slowest_writes": sorted(slow, key=lambda w: -w[1])[:8],  # [seconds into the rollover, ms]
    }


def _seeded(data: Path, n: int) -> dict:
    """The seed's figures: a seed into ``data`` now, or, when ``data`` was seeded with ``n``
    citizens by an earlier run (``--data``), that seed's figures (``data/seed.json``). A kept
    data directory starts every run as a fresh seed would: no snapshot, no model release or
    calibration (so the cold start loads and calibrates again); only the records earlier
    runs' writes added remain."""
    import shutil as _shutil

    from server import snapshot

    saved = data / "seed.json"
    if saved.exists():
        figures = json.loads(saved.read_text())
        if figures.get("citizens") != n:
            raise SystemExit(f"{data} holds a city of {figures.get('citizens')} citizens, not {n}")
        _shutil.rmtree(snapshot.snapshot_path(data).parent, ignore_errors=True)
        _shutil.rmtree(data / "models", ignore_errors=True)
        for f in data.glob("calibration-*.npz"):
            f.unlink()
        figures["reused_seed"] = True
    else:
        figures = {"citizens": n, **_seed(data, n)}
        saved.write_text(json.dumps(figures))
    figures.pop("citizens", None)
    return figures


def run(n: int, work: Path, data: Path | None = None) -> dict:
    from clients.client import Record
    from server import snapshot

    logs = work
    data = data or work / "data"
    result = {"citizens": n, **_seeded(data, n)}
    result["store_bytes"] = sum(f.stat().st_size for f in data.glob("qianjiang.db*"))

    t0 = time.monotonic()
    server = Serve(data, logs / "serve.log")
    result["cold_start_s"] = round(server.wait(t0), 2)
    result["start_peak_rss_bytes"] = _peak_rss(server.proc.pid)
    server.stop()
    snap = snapshot.snapshot_path(data)
    result["snapshot_bytes"] = snap.stat().st_size
    header = snapshot.read_header(snap)
    result["state_bytes_per_citizen"] = round(header["bytes"] / max(n, 1), 1)
    index = sum(np.dtype(t).itemsize * k for _, t, k in (header.get("ageing") or {}).get("arrays", ()))
    result["rollover_index_bytes_per_citizen"] = round(index / max(n, 1), 1)

    t0 = time.monotonic()
    server = Serve(data, logs / "serve.log", "--workers", "2")
    result["snapshot_start_s"] = round(server.wait(t0), 2)
    for i in range(200):  # acknowledged writes the restart must replay
        server.client.ingest([Record(record_id=f"before-kill-{t0:.3f}-{i}", citizen_id=f"c{(i * 104729) % n:08d}",
                                     variable="volunteer_hours", date="2026-01-01", value=1.0, source="")])
    result["rss_per_worker_bytes"] = max((_private_bytes(p) for p in _children(server.proc.pid)), default=0)
    server.kill()
    t0 = time.monotonic()
    server = Serve(data, logs / "serve.log", "--workers", "2")
    result["kill_restart_s"] = round(server.wait(t0), 2)
    server.stop()
    result["snapshot_starts"] = (logs / "serve.log").read_text(errors="replace").count("started from the snapshot")
    result.update(_rollover(data, n))
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m loadtest.scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--citizens", type=int, default=1_000_000, help="size of the synthetic city (default %(default)s)")
    ap.add_argument("--dir", default=None, help="where to work (default: a temporary directory, removed after)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--data", default=None, metavar="DIR",
                    help="a data directory kept between runs (never removed): seeded on the first run (its figures "
                         "saved in DIR/seed.json), reused by the next ones with the same --citizens")
    ap.add_argument("--seed-only", action="store_true", help="with --data: seed it (if not yet) and stop")
    args = ap.parse_args(argv)
    if args.citizens < 100:
        ap.error("--citizens must be at least 100")
    if args.seed_only:
        if not args.data:
            ap.error("--seed-only needs --data")
        result = {"citizens": args.citizens, **_seeded(Path(args.data), args.citizens)}
        print(json.dumps(result), flush=True)
        return result
    work = Path(tempfile.mkdtemp(prefix="qj-scale-", dir=args.dir))
    try:
        result = run(args.citizens, work, Path(args.data) if args.data else None)
    except BaseException:
        for proc in Serve.started:  # no server of a failed run is left behind
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        print(f"work directory kept: {work}", file=sys.stderr)
        raise
    if args.keep:
        result["work_dir"] = str(work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
