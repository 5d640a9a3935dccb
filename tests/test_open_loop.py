"""The HDR histogram (precision, merging), the open-loop runner (against the real server,
and against a stalling server: no coordinated omission) and the closed-loop probe."""

from __future__ import annotations

import doctest
import json
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from loadtest import closed_loop, hdr, open_loop
from loadtest.hdr import Histogram
from loadtest.open_loop import run_open_loop

# --- histogram ----------------------------------------------------------------------------


def test_docstring_example():
    assert doctest.testmod(hdr).failed == 0


def test_buckets_are_within_one_percent_from_1us_to_100s():
    edges = (hdr.LOWER_NS >= 1_000) & (hdr.LOWER_NS <= 100 * 10**9)
    width = (hdr.UPPER_NS - hdr.LOWER_NS)[edges] / hdr.LOWER_NS[edges]
    assert width.max() <= 1 / 128
    assert (hdr.LOWER_NS[1:] == hdr.UPPER_NS[:-1]).all()  # contiguous, no gaps
    assert hdr.bucket_index(np.int64(100 * 10**9)) < hdr.N_BUCKETS - 1  # 100 s is inside the range


def test_percentiles_never_under_report_and_are_within_one_percent():
    rng = np.random.default_rng(7)
    values = 10 ** rng.uniform(-6, 2, 200_000)  # log-uniform, 1 µs .. 100 s
    h = Histogram()
    h.record_many(values)
    assert h.count == values.size and h.max == values.max() and h.min == values.min()
    for q in (0, 1, 25, 50, 90, 99, 99.9, 99.99, 100):
        exact = np.percentile(values, q, method="inverted_cdf")  # the value of rank ceil(q/100 n)
        got = h.percentile(q)
        assert exact <= got <= exact * 1.01, (q, exact, got)
    assert h.percentile(100) == values.max()


def test_record_and_record_many_agree():
    values = np.array([0.0, 1e-9, 2.5e-7, 1e-6, 3.3e-3, 0.2, 7.0, 99.0, -1.0])
    one, many = Histogram(), Histogram()
    for v in values:
        one.record(v)
    many.record_many(values)
    assert (one.counts == many.counts).all() and one.count == many.count == values.size
    assert one.max == many.max == 99.0


def test_beyond_the_range_still_never_under_reports():
    h = Histogram()
    h.record_many([0.001] * 10)
    h.record(500.0)
    assert h.percentile(100) == 500.0 and h.summary()["max_ms"] == 500_000.0


def test_merge_is_exact_and_survives_json():
    rng = np.random.default_rng(3)
    parts = [10 ** rng.uniform(-5, 0, n) for n in (1000, 5000, 123)]
    whole = Histogram()
    whole.record_many(np.concatenate(parts))
    merged = Histogram()
    for part in parts:
        h = Histogram()
        h.record_many(part)
        merged.merge(Histogram.from_dict(json.loads(json.dumps(h.to_dict()))))
    assert (merged.counts == whole.counts).all()
    assert merged.count == whole.count and merged.max == whole.max and merged.min == whole.min
    assert merged.summary() == whole.summary()


def test_empty_nan_and_foreign_layouts():
    h = Histogram()
    assert h.summary() == {"count": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
    assert Histogram.from_dict(h.to_dict()).count == 0
    with pytest.raises(ValueError):
        h.record(float("nan"))
    with pytest.raises(ValueError):
        h.record_many([0.1, float("nan")])
    d = h.to_dict()
    d["layout"] = {**d["layout"], "sub_bits": 5}
    with pytest.raises(ValueError):
        Histogram.from_dict(d)


# --- runner: guards and the sweep's search ------------------------------------------------


@pytest.mark.parametrize("target", ["10.0.0.1:50051", "example.com:443", "0.0.0.0:50051", "127.0.0.1", "unix:/tmp/s"])
def test_only_loopback_targets(target):
    with pytest.raises(ValueError):
        run_open_loop(target, 10, 1)


def test_loopback_targets_accepted():
    for target in ("127.0.0.1:50051", "[::1]:50051", "localhost:50051"):
        open_loop.require_loopback(target)


def test_runs_are_bounded():
    with pytest.raises(ValueError):
        run_open_loop("127.0.0.1:1", 10, open_loop.MAX_SECONDS + 1)
    with pytest.raises(ValueError):
        run_open_loop("127.0.0.1:1", 1e7, 60)


def test_sweep_doubles_then_bisects(monkeypatch):
    rates = []

    def fake(target, rate, seconds, **kw):
        rates.append(rate)
        good = rate <= 3000
        return {"rate": rate, "ok": 100, "p99_ms": 1.0 if good else 50.0, "error_rate": 0.0}

    monkeypatch.setattr(open_loop, "run_open_loop", fake)
    out = open_loop.sweep("127.0.0.1:1", 1000, 5.0, pause_s=0, max_steps=10)
    assert rates[:4] == [1000, 2000, 4000, 3000]
    assert out["best_rate"] == 3000 and out["bracket"][1] - 3000 <= 0.05 * out["bracket"][1]
    assert [s["pass"] for s in out["steps"]][:4] == [True, True, False, True]
    rates.clear()
    out = open_loop.sweep("127.0.0.1:1", 1000, 5.0, pause_s=0, max_steps=3)
    assert len(rates) == 3 and out["best_rate"] == 2000
    rates.clear()
    out = open_loop.sweep("127.0.0.1:1", 100, 0.5, pause_s=0, max_steps=10)  # never passes
    assert rates == [100, 50, 25, 12] and out["best_rate"] is None  # gives up below min_rate


# --- runner against servers ---------------------------------------------------------------


def test_runner_against_the_real_server(served):
    r = run_open_loop(served.target, rate=200, seconds=2, processes=2, data_dir=str(served.data_dir), citizens=3000)
    assert r["sent"] == 400
    assert r["ok"] == r["sent"] and r["errors"] == {} and r["error_rate"] == 0
    assert r["p50_ms"] > 0 and r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert 100 < r["achieved_rps"] < 250
    assert r["runner_cpu_s"] > 0 and r["max_schedule_lag_ms"] >= 0


@pytest.mark.parametrize("mode", ["unary", "batch", "stream"])
def test_closed_loop_probe_against_the_real_server(served, mode):
    r = closed_loop.main(["--target", served.target, "--mode", mode, "--seconds", "1", "--processes", "1",
                          "--concurrency", "4", "--channels", "2", "--batch-size", "50", "--citizens", "3000",
                          "--data-dir", str(served.data_dir)], quiet=True)
    assert r["errors"] == {} and r["requests_per_s"] > 0
    per_request = 50 if mode == "batch" else 1
    assert r["checks_per_s"] == pytest.approx(r["requests_per_s"] * per_request, rel=0.01)
    assert 0 < r["p50_ms"] <= r["p99_ms"]


def test_closed_loop_needs_the_servers_key(served, tmp_path):
    # A directory without the server's card key: every token would be an unknown card. The
    # probe says so before starting anything, and creates no key of its own.
    with pytest.raises(FileNotFoundError, match="no card-token key"):
        closed_loop.main(["--target", served.target, "--seconds", "1", "--data-dir", str(tmp_path)], quiet=True)
    assert not list(tmp_path.iterdir())


def test_closed_loop_reports_a_client_that_died(served, tmp_path):
    # Each client process fails opening its channel (no certificates there). The probe must
    # say so at once, not wait for ever for results that will not come.
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with code 1 before reporting"):
        closed_loop.main(["--target", served.target, "--seconds", "1", "--processes", "2", "--certs", str(tmp_path / "none"),
                          "--data-dir", str(served.data_dir)], quiet=True)
    assert time.monotonic() - t0 < 60


class _Stalling:
    """A one-thread server whose Check sleeps 200 ms on every 50th call: the calls behind it
    queue (one worker), as they would behind a GC pause or a lock."""

    def __init__(self):
        self.calls = 0
        self.lock = threading.Lock()

    def check(self, request: bytes, context) -> bytes:
        with self.lock:
            self.calls += 1
            stall = self.calls % 50 == 0
        if stall:
            time.sleep(0.2)
        return b""  # an empty Decision


@pytest.fixture(scope="module")
def stalling():
    handler = _Stalling()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "qianjiang.v1.EligibilityService", {"Check": grpc.unary_unary_rpc_method_handler(handler.check)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", handler
    server.stop(0)


def test_no_coordinated_omission(stalling, tmp_path):
    target, handler = stalling
    handler.calls = 0
    r = run_open_loop(target, rate=100, seconds=2, processes=1, call="baseline", data_dir=str(tmp_path), warmup=0)
    assert r["sent"] == 200 and r["ok"] == 200 and r["errors"] == {}
    # Stalls hit requests 49, 99, 149 and 199; each of the first three delays the ~19 requests
    # scheduled during it by 190, 180, ... 10 ms. Measured from the intended send time,
    # ~17 % of requests take >= 100 ms; a client timing from the actual send (or one that
    # stopped sending during the stall) would see only the 4 slow calls (2 %) and a p90 of ~1 ms.
    assert r["max_ms"] >= 200
    assert r["p99_ms"] >= 150
    assert r["p90_ms"] >= 50
    assert not list(tmp_path.iterdir())  # the baseline call created no key files


def test_backlog_is_counted_not_hidden(stalling, tmp_path):
    target, handler = stalling
    handler.calls = 0
    r = run_open_loop(target, rate=100, seconds=1, call="baseline", data_dir=str(tmp_path), warmup=0, max_in_flight=1)
    # One call at a time: the requests due during a 200 ms stall are CLIENT_BACKLOG errors.
    assert r["errors"].get("CLIENT_BACKLOG", 0) >= 5
    assert r["ok"] + sum(r["errors"].values()) == r["sent"] == 100
    assert r["max_in_flight_seen"] == 1


def test_report_plots_the_latency_distribution(tmp_path):
    import numpy as np

    from loadtest.hdr import Histogram
    from loadtest.report import percentile_curve, write_report

    h = Histogram()
    h.record_many(np.concatenate([np.full(990, 0.001), np.full(9, 0.004), [0.012]]))
    p, ms = percentile_curve(h)
    assert p[0] == 0.0 and (np.diff(p) > 0).all() and (np.diff(ms) > 0).all()
    assert 11.9 < ms[-1] < 12.2, "the maximum is the last point"
    png, page = write_report({"processes": 2, "open_loop_rps": 1000.0, "p99_ms": 4.0}, h, tmp_path / "report")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = page.read_text()
    assert "data:image/png;base64," in text and "p99_ms" in text
