"""Locust (loadtest/locustfile.py) against the real server: the mix runs and no Check fails.

Locust is not part of the main suite's requirements (requirements-loadtest.txt); without it
the test skips. It runs as a subprocess: importing locust here would monkey-patch this
process for gevent, under the in-process server.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_locust_mix_runs_against_the_server_without_check_failures(served, tmp_path):
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed (pip install -r requirements-loadtest.txt)")
    env = dict(os.environ, QJ_DATA_DIR=str(served.data_dir), QJ_CITIZENS="3000")
    cmd = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
        "-u", "5", "-r", "5", "-t", "5s", "--stop-timeout", "5", "--host", served.target,
        "--csv", str(tmp_path / "stats"), "--only-summary",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    log = proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(tmp_path / "stats_stats.csv", newline="") as fh:
        rows = {row["Name"]: row for row in csv.DictReader(fh)}
    assert "Check" in rows, log
    assert int(rows["Check"]["Request Count"]) > 0, log
    assert int(rows["Check"]["Failure Count"]) == 0, log
    with open(tmp_path / "stats_exceptions.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == [], log  # no errors in the locustfile's own code
