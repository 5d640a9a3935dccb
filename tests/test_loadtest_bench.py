"""``python -m loadtest.bench`` end to end, on a small city with one-second measurements: the
JSON line the load-test issue asks for, each figure beside the baseline's, and the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    assert r["open_loop_rps"] > 0 and r["p50_ms"] <= r["p99_ms"] <= r["p999_ms"] <= r["max_ms"]
    assert r["open_loop_errors"] == {} and r["batch_errors"] == {} and r["stream_errors"] == {}
    assert r["overload_rate"] == round(2 * r["check_unary_rps"], 1)
    assert (tmp_path / "report.html").stat().st_size > 0 and (tmp_path / "report.png").stat().st_size > 0
