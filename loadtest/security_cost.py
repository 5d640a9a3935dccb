"""What TLS and the audit log cost on the unary check path, measured in one run.

    python -m loadtest.security_cost --seconds 6 --rounds 2

Starts the same service (same data, one worker) four ways — plain, plain + audit log,
mutual TLS, mutual TLS + audit log — on loopback, and runs the closed-loop probe against
each in turn, round after round, so a slow spell on this shared machine hits all alike.
Prints one JSON line with each configuration's best checks per second and p50/p99, and the
ratios to the plain server.
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

from loadtest import closed_loop

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(data_dir: Path, port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "clients.cli", "serve", "--data-dir", str(data_dir), "--port", str(port),
         "--metrics-port", "0", "--seed-citizens", "100000", *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    out = ""
    deadline = time.time() + 300
    while "Stop with Ctrl-C" not in out:
        line = proc.stdout.readline()
        if not line or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start:\n{out}")
        out += line
    return proc


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m loadtest.security_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="data/security-cost")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args(argv)
    data = Path(args.data_dir)
    certs = data / "certs"
    if not (certs / "ca.pem").exists():
        from server import tls

        tls.make_dev_pki(certs, callers=["metro_gateway"])
    configs = {
        "plain": ["--no-audit"],
        "plain_audit": [],
        "mtls": ["--no-audit", "--security", "mtls", "--certs", str(certs)],
        "mtls_audit": ["--security", "mtls", "--certs", str(certs)],
    }
    procs, ports = {}, {}
    try:
        _start(data, _free_port(), "--no-audit").terminate()  # seed the shared store once
        for name, extra in configs.items():
            ports[name] = _free_port()
            procs[name] = _start(data, ports[name], *extra)
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for name in configs:
                probe = ["--target", f"localhost:{ports[name]}", "--mode", "unary", "--seconds", str(args.seconds),
                         "--processes", "1", "--concurrency", str(args.concurrency), "--data-dir", str(data)]
                if name.startswith("mtls"):
                    probe += ["--certs", str(certs), "--caller", "metro_gateway"]
                r = closed_loop.main(probe, quiet=True)
                if name not in best or r["checks_per_s"] > best[name]["checks_per_s"]:
                    best[name] = r
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(timeout=30)
    plain = best["plain"]["checks_per_s"]
    result = {
        name: {k: best[name][k] for k in ("checks_per_s", "p50_ms", "p99_ms", "errors")} for name in configs
    }
    result["ratio_to_plain"] = {name: round(best[name]["checks_per_s"] / plain, 3) for name in configs}
    result["seconds"], result["rounds"] = args.seconds, args.rounds
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
