"""The service's load benchmark, beside a bare grpcio baseline, in one run.

    python -m loadtest.bench            # about 2 1/2 minutes once data/bench is seeded

Starts the service as it runs in production (one worker per core, metrics on, the audit log
on) and the baseline (loadtest/baseline_server.py: the same message shapes and process count,
no logic) on loopback, then measures both, alternating where they are compared (in
``--rounds`` paired rounds: baseline, then service, back to back; medians, and the rounds'
ratios):

* unary Check: the closed-loop maximum of each (``baseline_unary_rps``, ``check_unary_rps``,
  ``unary_ratio``);
* latency: the open-loop runner (loadtest/open_loop.py) at half of ``check_unary_rps``:
  p50/p99/p99.9 from the intended send time, of the service and of the baseline at that rate;
* BatchCheck of 1,000 tokens (16 distinct batches in turn, so the lookups are not served
  from warm caches) and StreamCheck (a gateway's long-lived streams), closed loop, over eight
  connections per worker (``batch_ratio``, ``stream_ratio``);
* overload: open loop at twice the maximum for a few seconds (RESOURCE_EXHAUSTED is the
  expected answer, not a queue), then half the maximum again (it must recover at once).

Each closed-loop measurement also gives what a call cost in CPU: the server's, all its
processes together (``check_unary_cpu_us``, ``batch_cpu_us``, ``stream_cpu_us`` and the
baseline's beside them; ``*_cpu_ratio`` = baseline / service, 1.0 when the service costs no
more than grpc alone), and the load generator's (``*_client_cpu_us``), which runs on the
same cores. On a shared machine a call's CPU moves less than the calls a second, and it is
what capacity planning needs: cores = calls a second x CPU a call.

The last line printed is one JSON object with every figure; ``<data-dir>/report.html`` tables
the service's figures beside the baseline's, with units and ratios, and it and ``report.png``
plot both open-loop latency distributions and the throughput ratios (loadtest/report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from loadtest import closed_loop
from loadtest.hdr import Histogram
from loadtest.open_loop import run_open_loop
from loadtest.report import write_report
from server.event_loop import EVENT_LOOPS

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], ready_text: str, log_path: Path, timeout: float = 600) -> subprocess.Popen:
    """Start a server with its output going to a file (a pipe nobody reads would fill up
    and block the server's logging, and with it the server)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while ready_text not in log_path.read_text():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"{cmd[2:4]} did not start:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _server_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a server has used so far: the process and its workers
    (its children), from /proc, in clock ticks (10 ms; a measurement lasts seconds)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone meanwhile
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm)": state, ppid, ...
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / _TICKS_PER_S


def _probe(target: str, server_pid: int, mode: str, seconds: float, data_dir: str, concurrency: int = 16,
           channels: int = 1) -> dict:
    """A closed-loop measurement, with what each call cost in CPU: the server's (all its
    processes, ``server_cpu_us``) and the load generator's (``client_cpu_us``), both on this
    box. A call's CPU varies less with the neighbours than the calls a second do."""
    cpu0 = _server_cpu_s(server_pid)
    r = closed_loop.main(
        ["--target", target, "--mode", mode, "--seconds", str(seconds), "--processes", "1",
         "--concurrency", str(concurrency), "--channels", str(channels), "--data-dir", data_dir],
        quiet=True,
    )
    calls = r["requests_per_s"] * seconds
    r["server_cpu_us"] = (_server_cpu_s(server_pid) - cpu0) / calls * 1e6 if calls else float("nan")
    r["client_cpu_us"] = r["client_cpu_s"] / calls * 1e6 if calls else float("nan")
    return r


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="data/bench")
    ap.add_argument("--citizens", type=int, default=100_000)
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="server worker processes")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each measurement")
    ap.add_argument("--rounds", type=int, default=3, help="paired rounds of each comparison (unary, batch, stream)")
    ap.add_argument("--no-audit", action="store_true", help="run the service without its audit log")
    ap.add_argument("--event-loop", choices=EVENT_LOOPS, default=EVENT_LOOPS[0], help="the service's and the baseline's")
    args = ap.parse_args(argv)
    data = str(Path(args.data_dir))
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    svc_port, base_port = _free_port(), _free_port()
    svc_target, base_target = f"127.0.0.1:{svc_port}", f"127.0.0.1:{base_port}"
    log(f"starting the service ({args.processes} workers) and the baseline ...")
    service = _start(
        [sys.executable, "-m", "clients.cli", "serve", "--data-dir", data, "--port", str(svc_port),
         "--metrics-port", str(_free_port()), "--workers", str(args.processes), "--seed-citizens", str(args.citizens),
         "--event-loop", args.event_loop]
        + (["--no-audit"] if args.no_audit else []),
        "Stop with Ctrl-C", Path(data) / "service.log",
    )
    baseline = _start(
        [sys.executable, "-m", "loadtest.baseline_server", "--port", str(base_port), "--workers", str(args.processes),
         "--event-loop", args.event_loop],
        "baseline serving", Path(data) / "baseline.log",
    )
    result: dict = {"processes": args.processes, "metrics": True, "audit_log": not args.no_audit, "event_loop": args.event_loop}
    try:
        median = lambda xs: float(np.median(xs))  # noqa: E731

        def paired(mode: str, seconds: float, **probe) -> tuple[dict, dict, list[float]]:
            """args.rounds rounds of the baseline and then the service, back to back: a slow
            spell of this shared machine hits a pair rather than one side. Returns the
            medians of each side's figures and the rounds' ratios (service / baseline); the
            service's medians include ``cpu_ratio``, the median of the rounds' baseline
            server CPU per call over the service's (1.0: the service costs no more than
            grpc alone)."""
            rounds = [{name: _probe(target, proc.pid, mode, seconds, data, **probe)
                       for name, target, proc in (("baseline", base_target, baseline), ("service", svc_target, service))}
                      for _ in range(args.rounds)]
            med = {side: {k: median([r[side][k] for r in rounds])
                          for k in ("checks_per_s", "p50_ms", "p99_ms", "server_cpu_us", "client_cpu_us")}
                   for side in ("baseline", "service")}
            ratios = [r["service"]["checks_per_s"] / r["baseline"]["checks_per_s"] for r in rounds]
            med["service"]["cpu_ratio"] = median([r["baseline"]["server_cpu_us"] / r["service"]["server_cpu_us"] for r in rounds])
            errors = {}
            for r in rounds:
                for code, n in r["service"]["errors"].items():
                    errors[code] = errors.get(code, 0) + n
            med["service"]["errors"] = errors
            return med["baseline"], med["service"], ratios

        log("unary maximum, service and baseline alternating ...")
        base, check, ratios = paired("unary", args.seconds)
        check_rps = check["checks_per_s"]
        result.update(
            baseline_unary_rps=round(base["checks_per_s"], 1), check_unary_rps=round(check_rps, 1),
            unary_ratio=round(median(ratios), 3), unary_ratio_rounds=[round(x, 3) for x in ratios],
            check_unary_closed_p50_ms=check["p50_ms"], check_unary_closed_p99_ms=check["p99_ms"],
            check_unary_cpu_us=round(check["server_cpu_us"], 1), baseline_unary_cpu_us=round(base["server_cpu_us"], 1),
            unary_cpu_ratio=round(check["cpu_ratio"], 3), unary_client_cpu_us=round(check["client_cpu_us"], 1),
        )

        log(f"open loop at half the maximum ({check_rps / 2:.0f}/s), service and baseline ...")
        seconds = max(args.seconds, 6.0)
        ol = run_open_loop(svc_target, rate=check_rps / 2, seconds=seconds, processes=1, data_dir=data, citizens=args.citizens)
        base_ol = run_open_loop(base_target, rate=check_rps / 2, seconds=seconds, processes=1, data_dir=data,
                                citizens=args.citizens)
        result.update(
            open_loop_rps=ol["achieved_rps"], p50_ms=ol["p50_ms"], p90_ms=ol["p90_ms"], p99_ms=ol["p99_ms"],
            p999_ms=ol["p999_ms"], max_ms=ol["max_ms"], open_loop_errors=ol["errors"],
            open_loop_runner_cpu_s=ol["runner_cpu_s"], open_loop_max_schedule_lag_ms=ol["max_schedule_lag_ms"],
            baseline_p50_ms=base_ol["p50_ms"], baseline_p99_ms=base_ol["p99_ms"], baseline_p999_ms=base_ol["p999_ms"],
        )

        log("batch and stream, service and baseline alternating ...")
        # Gateways batch over many connections. One connection lands on one worker, chosen
        # by the kernel's SO_REUSEPORT hash: with two a worker, in one run in eight a worker
        # got none and sat idle; with eight a worker, in one run in tens of thousands. Two
        # calls in flight on each (one stream each); the baseline is measured the same way.
        channels = 8 * args.processes
        short = min(args.seconds, 4.0)
        base_batch, batch, batch_ratios = paired("batch", short, concurrency=2 * channels, channels=channels)
        base_stream, stream, stream_ratios = paired("stream", short, concurrency=channels, channels=channels)
        result.update(
            batch_checks_per_s=batch["checks_per_s"], baseline_batch_checks_per_s=base_batch["checks_per_s"],
            batch_ratio=round(median(batch_ratios), 3), batch_ratio_rounds=[round(x, 3) for x in batch_ratios],
            batch_p99_ms=batch["p99_ms"], baseline_batch_p99_ms=base_batch["p99_ms"],
            stream_checks_per_s=stream["checks_per_s"], baseline_stream_checks_per_s=base_stream["checks_per_s"],
            stream_ratio=round(median(stream_ratios), 3),
            batch_cpu_us=round(batch["server_cpu_us"], 1), baseline_batch_cpu_us=round(base_batch["server_cpu_us"], 1),
            batch_cpu_ratio=round(batch["cpu_ratio"], 3), batch_client_cpu_us=round(batch["client_cpu_us"], 1),
            stream_cpu_us=round(stream["server_cpu_us"], 1), baseline_stream_cpu_us=round(base_stream["server_cpu_us"], 1),
            stream_cpu_ratio=round(stream["cpu_ratio"], 3),
            batch_errors=batch["errors"], stream_errors=stream["errors"],
        )

        log(f"overload at twice the maximum ({2 * check_rps:.0f}/s), then recovery ...")
        over = run_open_loop(svc_target, rate=2 * check_rps, seconds=3.0, processes=2, data_dir=data,
                             citizens=args.citizens, timeout=0.5)
        after = run_open_loop(svc_target, rate=check_rps / 2, seconds=3.0, processes=1, data_dir=data,
                              citizens=args.citizens)
        result.update(
            overload_rate=round(2 * check_rps, 1), overload_ok=over["ok"], overload_errors=over["errors"],
            overload_p99_ms=over["p99_ms"], overload_error_p99_ms=over["error_p99_ms"],
            overload_runner_cpu_s=over["runner_cpu_s"], overload_max_schedule_lag_ms=over["max_schedule_lag_ms"],
            recovery_errors=after["errors"], recovery_p99_ms=after["p99_ms"],
        )
    finally:
        for proc in (service, baseline):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    result["cpu_count"] = os.cpu_count()
    png, page = write_report(result, Histogram.from_dict(ol["histogram"]), Path(data) / "report",
                             baseline=Histogram.from_dict(base_ol["histogram"]))
    log(f"report: {page} ({png})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
