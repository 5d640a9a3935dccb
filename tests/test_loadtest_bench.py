"""``python -m loadtest.bench`` end to end, on a small city with one-second measurements: the
JSON line the load-test issue asks for, each figure beside the baseline's, and the report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from loadtest.bench import _server_cpu_s

ROOT = Path(__file__).resolve().parents[1]

#: what the issue's benchmark command must print, at least
REQUIRED = {"processes", "baseline_unary_rps", "check_unary_rps", "unary_ratio", "open_loop_rps",
            "p50_ms", "p99_ms", "p999_ms", "batch_checks_per_s", "stream_checks_per_s"}


def test_bench_prints_every_figure_beside_the_baseline(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--data-dir", str(tmp_path), "--citizens", "3000",
         "--seconds", "1", "--rounds", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert REQUIRED <= r.keys(), REQUIRED - r.keys()
    assert (r["metrics"], r["audit_log"], r["event_loop"]) == (True, True, "uvloop")
    for ours, theirs in (("check_unary_rps", "baseline_unary_rps"), ("batch_checks_per_s", "baseline_batch_checks_per_s"),
                         ("stream_checks_per_s", "baseline_stream_checks_per_s"), ("p99_ms", "baseline_p99_ms")):
        assert r[ours] > 0 and r[theirs] > 0, (ours, theirs)
    for ratio in ("unary", "batch"):
        rounds = r[f"{ratio}_ratio_rounds"]
        assert len(rounds) == 2 and min(rounds) <= r[f"{ratio}_ratio"] <= max(rounds)
    for ours, theirs in (("check_unary_cpu_us", "baseline_unary_cpu_us"), ("batch_cpu_us", "baseline_batch_cpu_us"),
                         ("stream_cpu_us", "baseline_stream_cpu_us")):
        assert r[ours] > 0 and r[theirs] > 0, (ours, theirs)
    # a 1,000-token batch costs the service more than one unary check; the clients cost CPU too
    assert r["batch_cpu_us"] > r["check_unary_cpu_us"] and r["unary_client_cpu_us"] > 0 and r["batch_client_cpu_us"] > 0
    assert all(0 < r[f"{kind}_cpu_ratio"] for kind in ("unary", "batch", "stream"))
    assert r["open_loop_rps"] > 0 and r["p50_ms"] <= r["p99_ms"] <= r["p999_ms"] <= r["max_ms"]
    assert r["open_loop_errors"] == {} and r["batch_errors"] == {} and r["stream_errors"] == {}
    assert r["overload_rate"] == round(2 * r["check_unary_rps"], 1)
    assert (tmp_path / "report.html").stat().st_size > 0 and (tmp_path / "report.png").stat().st_size > 0


def test_server_cpu_counts_the_worker_processes():
    """A server's CPU is its own and its workers': a worker that burns 0.4 s of CPU shows in
    the parent's figure (the parent alone uses a fraction of that to start)."""
    burn = ("import os, time\n"
            "if os.fork() == 0:\n"
            "    t = time.process_time()\n"
            "    while time.process_time() - t < 0.4: pass\n"
            "    print('burnt', flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "burnt"
        time.sleep(0.05)
        cpu = _server_cpu_s(proc.pid)
        assert 0.4 - 0.02 <= cpu < 2.0, cpu  # /proc counts whole 10 ms ticks of what process_time saw as 0.4 s
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
