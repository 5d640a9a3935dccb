"""A model rollout and its restore while the open-loop runner keeps a fixed rate of checks.

    python -m loadtest.rollout_under_load            # about 2 minutes once data/rollout is seeded

Starts the service (two workers, the 100,000-person synthetic city), stages a variant of the
v1 spec (the pro-social dimension weighing three times as much), then, while
loadtest/open_loop.py sends checks at ``--rate`` from the intended schedule, activates it
(``qjscore model activate``: SIGHUP) and, once every worker answers with the new model
version, restores the previous one (``qjscore model restore``). Prints, as its last line, one
JSON object: the load's errors by code and latency percentiles, each switch's time from the
command to the last worker serving the new version, and the staging report's PSI and level
migration. Zero errors is the pass mark.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from clients.client import QianjiangClient
from kernel.spec import DEFAULT_SPEC_PATH, load_spec
from loadtest.bench import _free_port, _start
from loadtest.open_loop import run_open_loop
from server.models import ModelRegistry

ROOT = Path(__file__).resolve().parent.parent


def _qjscore(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "clients.cli", *args], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"qjscore {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return out.stdout


def _versions(target: str, probes: int = 16) -> set[str]:
    """Model versions answering on fresh connections (SO_REUSEPORT spreads them over workers)."""
    seen = set()
    for _ in range(probes):
        with QianjiangClient(target, timeout=5) as qj:
            for attempt in range(20):
                try:
                    seen.add(qj.check("metro_pay_later", bytes(16)).model_version)
                    break
                except grpc.RpcError:  # a probe, not the measured load: try again
                    time.sleep(0.05)
    return seen


def _switch(target: str, command: list[str], want_not: str, timeout: float = 300) -> float:
    t0 = time.perf_counter()
    _qjscore(*command)
    deadline = time.monotonic() + timeout
    while True:
        try:
            seen = _versions(target)
        except grpc.RpcError:
            seen = {want_not}
        if want_not not in seen and len(seen) == 1:
            return time.perf_counter() - t0
        if time.monotonic() > deadline:
            raise RuntimeError(f"still serving {want_not} after {timeout} s")
        time.sleep(0.2)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m loadtest.rollout_under_load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="data/rollout")
    ap.add_argument("--citizens", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rate", type=float, default=1000.0, help="checks a second during the rollout")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the open-loop run")
    args = ap.parse_args(argv)
    data = Path(args.data_dir)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    registry = ModelRegistry(data)
    v1 = load_spec().model_version
    if registry.active() is not None and not registry.active().startswith(v1 + "~"):
        # an interrupted earlier run left its variant active: start from v1 again
        registry.activate(next(r for r in registry.releases() if r.startswith(v1 + "~")))
    port = _free_port()
    target = f"127.0.0.1:{port}"
    log(f"starting the service ({args.workers} workers) ...")
    server = _start(
        [sys.executable, "-m", "clients.cli", "serve", "--data-dir", str(data), "--port", str(port), "--metrics-port", "0",
         "--workers", str(args.workers), "--seed-citizens", str(args.citizens)],
        "Stop with Ctrl-C", data / "service.log",
    )
    result: dict = {"workers": args.workers, "rate": args.rate}
    try:
        variant = data / "v1-prosocial-x3.toml"
        text = DEFAULT_SPEC_PATH.read_text()
        variant.write_text(text.replace("[dimensions.prosocial]\nweight = 0.15", "[dimensions.prosocial]\nweight = 0.45"))
        log("staging the variant (scores the population under both releases) ...")
        staged = json.loads(_qjscore("model", "stage", str(variant), "--data-dir", str(data), "--json"))
        new_release = staged.get("release") or staged.get("release_id")
        report = staged.get("report") or {}
        result.update(psi_raw=report.get("psi_raw"), psi_score=report.get("psi_score"),
                      level_changed_share=report.get("changed_share"), migration=report.get("migration"))
        old_version = _versions(target).pop()

        box: dict = {}
        load = threading.Thread(target=lambda: box.update(ol=run_open_loop(
            target, rate=args.rate, seconds=args.seconds, processes=1, data_dir=str(data), citizens=args.citizens)))
        load.start()
        time.sleep(min(5.0, args.seconds / 6))
        log("activating the variant under load ...")
        result["switch_seconds"] = round(_switch(target, ["model", "activate", new_release, "--data-dir", str(data)], old_version), 2)
        new_version = _versions(target).pop()
        time.sleep(min(5.0, args.seconds / 6))
        log("restoring the previous release under load ...")
        result["restore_seconds"] = round(_switch(target, ["model", "restore", "--data-dir", str(data)], new_version), 2)
        load.join()
        ol = box["ol"]
        result.update(
            old_version=old_version, new_version=new_version, requests=ol["sent"] if "sent" in ol else ol["ok"],
            ok=ol["ok"], errors=ol["errors"], p50_ms=ol["p50_ms"], p99_ms=ol["p99_ms"], p999_ms=ol["p999_ms"],
            max_ms=ol["max_ms"], passed=not ol["errors"],
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
