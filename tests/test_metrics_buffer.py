"""server/metrics.py's CallBuffer: buffered increments and observations, once flushed, equal
the same updates made directly on Prometheus metrics (bucket edges included), from several
threads at once; and the module's doctests."""

from __future__ import annotations

import doctest
import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from server import metrics
from server.metrics import LATENCY_BUCKETS, CallBuffer, Metrics


def test_doctests():
    assert doctest.testmod(metrics).failed == 0


def _samples(registry: CollectorRegistry) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in registry.collect() for s in fam.samples
            if not s.name.endswith("_created")}


def test_flushed_buffer_equals_direct_updates():
    rng = np.random.default_rng(7)
    # every bucket edge exactly (le is inclusive), values between, and past the last bucket
    values = list(LATENCY_BUCKETS) + rng.uniform(0, 2.0, 2000).tolist()
    direct, buffered = CollectorRegistry(), CollectorRegistry()
    made = {}
    for name, reg in (("direct", direct), ("buffered", buffered)):
        made[name] = (
            Counter("calls", "", ["code"], registry=reg),
            Histogram("seconds", "", ["method"], buckets=LATENCY_BUCKETS, registry=reg),
        )
    buf = CallBuffer()
    for i, v in enumerate(values):
        code = "OK" if i % 3 else "NOT_FOUND"
        made["direct"][0].labels(code=code).inc()
        made["direct"][1].labels(method="Check").observe(v)
        if i % 2:  # a call's end: both under one lock
            buf.inc_observe(made["buffered"][0].labels(code=code), made["buffered"][1].labels(method="Check"), v)
        else:
            buf.inc(made["buffered"][0].labels(code=code))
            buf.observe(made["buffered"][1].labels(method="Check"), v)
    assert _samples(direct) != _samples(buffered)  # nothing reaches Prometheus before a flush
    buf.flush()
    assert _samples(direct) == _samples(buffered)
    buf.flush()  # a second flush adds nothing
    assert _samples(direct) == _samples(buffered)


def test_inc_each_adds_a_vector_as_incs_would():
    direct, buffered = CollectorRegistry(), CollectorRegistry()
    counters = {name: Counter("decisions", "", ["outcome"], registry=reg) for name, reg in (("direct", direct), ("buffered", buffered))}
    outcomes = ("ALLOW", "DENY", "UNKNOWN")
    children = tuple(counters["buffered"].labels(outcome=o) for o in outcomes)
    buf = CallBuffer()
    batches = [np.array(v, np.int64) for v in ([5, 0, 2], [1, 3, 0], [0, 0, 0])]
    for counts in batches:
        for o, n in zip(outcomes, counts.tolist()):
            if n:
                counters["direct"].labels(outcome=o).inc(n)
        buf.inc_each(children, counts)
        counts[:] = 99  # the caller may reuse its array: what was added stays added
    buf.flush()
    assert _samples(direct) == _samples(buffered)
    assert buffered.get_sample_value("decisions_total", {"outcome": "ALLOW"}) == 6
    with pytest.raises(ValueError, match="3 amounts for 2 counters"):
        buf.inc_each(children[:2], np.ones(3, np.int64))


def test_buffer_loses_nothing_across_threads():
    reg = CollectorRegistry()
    c = Counter("calls", "", registry=reg)
    h = Histogram("seconds", "", buckets=LATENCY_BUCKETS, registry=reg)
    buf = CallBuffer()
    stop = threading.Event()

    def flusher():
        while not stop.is_set():
            buf.flush()

    pair = (c, c)

    def worker():
        for i in range(30_000):
            if i % 3 == 0:
                buf.inc(c)
            elif i % 3 == 1:
                buf.inc_each(pair, np.array([1, 0], np.int64))
            else:
                buf.inc_observe(c, h, 0.003)

    f = threading.Thread(target=flusher)
    f.start()
    workers = [threading.Thread(target=worker) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    f.join()
    buf.flush()
    assert reg.get_sample_value("calls_total") == 120_000
    assert reg.get_sample_value("seconds_count") == 40_000
    assert reg.get_sample_value("seconds_bucket", {"le": "0.005"}) == 40_000


def test_metrics_flush_on_their_own_and_on_stop():
    reg = CollectorRegistry()
    m = Metrics(reg)
    m.calls.inc(m.decisions.labels(scenario="metro_pay_later", outcome="ALLOW"), 5)
    m.start_flushing(interval=0.01)
    try:
        for _ in range(500):
            if reg.get_sample_value("qianjiang_decisions_total", {"scenario": "metro_pay_later", "outcome": "ALLOW"}):
                break
            threading.Event().wait(0.01)
        assert reg.get_sample_value("qianjiang_decisions_total", {"scenario": "metro_pay_later", "outcome": "ALLOW"}) == 5
        m.calls.inc(m.decisions.labels(scenario="metro_pay_later", outcome="ALLOW"))
    finally:
        m.stop_flushing()
    assert reg.get_sample_value("qianjiang_decisions_total", {"scenario": "metro_pay_later", "outcome": "ALLOW"}) == 6
