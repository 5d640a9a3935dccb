"""`python -m loadtest.scale` at a small N: every figure it promises, from the real steps
(a seed, a cold start, a snapshot start, a restart after SIGKILL, a rollover under load),
and nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

KEYS = {
    "citizens", "records", "seed_s", "store_bytes", "seed_peak_rss_bytes", "cold_start_s", "start_peak_rss_bytes",
    "snapshot_bytes", "state_bytes_per_citizen", "snapshot_start_s", "rss_per_worker_bytes", "kill_restart_s",
    "snapshot_starts", "rollover_s", "rollover_rows", "max_write_ms", "max_write_ms_before", "check_p99_ms",
    "full_rescore_s", "rollover_index_bytes_per_citizen", "max_write_ms_after", "writes",
}


def test_the_scale_benchmark_prints_every_figure_and_cleans_up(tmp_path):
    out = subprocess.run([sys.executable, "-m", "loadtest.scale", "--citizens", "3000", "--dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert KEYS <= r.keys(), KEYS - r.keys()
    assert r["citizens"] == 3000 and r["records"] > 20_000
    assert r["snapshot_starts"] == 2  # the snapshot start, and the restart after SIGKILL
    assert 0 < r["rollover_rows"] < 3000 and r["rollover"]["rederived"] >= 0
    assert r["rollover"]["from_index"] > 0  # the day's changes from the index, not the store
    assert {"before", "during", "after"} <= r["writes"].keys() and r["writes"]["during"]["n"] > 0
    assert 0 < r["rollover_index_bytes_per_citizen"] < 200
    assert r["snapshot_bytes"] > r["state_bytes_per_citizen"] * 3000 > 0
    assert all(r[k] > 0 for k in ("seed_peak_rss_bytes", "start_peak_rss_bytes", "rss_per_worker_bytes"))
    assert list(tmp_path.iterdir()) == []  # the work directory is gone
