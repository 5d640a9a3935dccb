"""Prometheus metrics of the service, with the standard gRPC names.

    >>> from prometheus_client import CollectorRegistry
    >>> m = Metrics(CollectorRegistry())
    >>> m.decisions.labels(scenario="metro_pay_later", outcome="ALLOW").inc()

The per-call metrics (calls started and handled, their latency, decisions) go through a
:class:`CallBuffer` and reach Prometheus when it is flushed, a few times a second: a direct
update takes a lock and writes a memory-mapped file in multiprocess mode, 1-3 µs each and
five of them a call, which was a quarter of a gate check's own Python.

Tests pass a private CollectorRegistry. In the multi-worker server every process writes its
values to PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode, chosen by that
variable at import) and the parent serves the merged view. No label ever carries a person's
identifier: labels are services, methods, status codes, scenarios, outcomes and versions.
"""

from __future__ import annotations

import threading
from bisect import bisect_left

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

#: 100 µs to 1 s: a gate check has single-digit milliseconds (docs/product.md §7).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class CallBuffer:
    """Counter increments and histogram observations, added up in plain Python and handed
    to their Prometheus metrics by :meth:`flush`. Thread-safe; what a scrape sees lags by
    at most one flush interval (Metrics.start_flushing).

        >>> from prometheus_client import CollectorRegistry
        >>> c = Counter("calls", "", registry=CollectorRegistry())
        >>> buf = CallBuffer(); buf.inc(c); buf.inc(c, 2)
        >>> c._value.get(), buf.flush(), c._value.get()
        (0.0, None, 3.0)
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict = {}  # a counter (child) -> increment
        self._vectors: dict = {}  # a tuple of counters (children) -> int64 increments, one each
        self._observed: dict = {}  # a histogram (child) -> [sum, per-bucket counts]

    def inc(self, counter, amount: float = 1) -> None:
        with self._lock:
            self._inc(counter, amount)

    def inc_each(self, counters: tuple, amounts: np.ndarray) -> None:
        """``inc(counters[i], amounts[i])`` for every i, as one numpy add: a batch's decisions
        by outcome."""
        if len(amounts) != len(counters):
            raise ValueError(f"{len(amounts)} amounts for {len(counters)} counters")
        with self._lock:
            pending = self._vectors.get(counters)
            if pending is None:
                self._vectors[counters] = np.array(amounts, dtype=np.int64)
            else:
                pending += amounts

    def observe(self, histogram, value: float) -> None:
        with self._lock:
            self._observe(histogram, value)

    def inc_observe(self, counter, histogram, value: float) -> None:
        """``inc(counter)`` and ``observe(histogram, value)`` under one lock: a call's end
        (its status code and its latency)."""
        with self._lock:
            self._inc(counter, 1)
            self._observe(histogram, value)

    def _inc(self, counter, amount: float) -> None:
        counts = self._counts
        counts[counter] = counts.get(counter, 0) + amount

    def _observe(self, histogram, value: float) -> None:
        pending = self._observed.get(histogram)
        if pending is None:
            pending = self._observed[histogram] = [0.0, [0] * len(_bounds(histogram))]
        pending[0] += value
        pending[1][bisect_left(histogram._upper_bounds, value)] += 1  # the bucket observe() picks

    def flush(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
            vectors, self._vectors = self._vectors, {}
            observed, self._observed = self._observed, {}
        for counter, amount in counts.items():
            counter.inc(amount)
        for counters, amounts in vectors.items():
            for counter, amount in zip(counters, amounts.tolist(), strict=True):
                if amount:
                    counter.inc(amount)
        for histogram, (total, buckets) in observed.items():
            histogram._sum.inc(total)
            for bucket, n in zip(histogram._buckets, buckets):
                if n:
                    bucket.inc(n)


def _bounds(histogram) -> list[float]:
    """The upper bounds of a histogram child, checking that it has the parts flush() adds to
    (prometheus_client's own layout: one value per bucket, not cumulative, and the sum)."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    if bounds is None or buckets is None or len(buckets) != len(bounds) or not hasattr(histogram, "_sum"):
        raise TypeError("this prometheus_client's Histogram has no _upper_bounds/_buckets/_sum to buffer into")
    return bounds


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = registry if registry is not None else REGISTRY
        self.calls = CallBuffer()
        self._flusher: threading.Thread | None = None
        self._stop_flushing = threading.Event()
        rpc = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter("grpc_server_started", "RPCs started on the server.", rpc, registry=r)
        self.handled = Counter("grpc_server_handled", "RPCs completed on the server, by status code.", rpc + ["grpc_code"], registry=r)
        self.handling = Histogram(
            "grpc_server_handling_seconds", "Time to handle an RPC, to the last response.", rpc,
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.decisions = Counter("qianjiang_decisions", "Eligibility decisions by scenario and outcome.", ["scenario", "outcome"], registry=r)
        self.rescores = Counter("qianjiang_rescores", "Single-citizen re-scores after a record or consent change.", registry=r)
        self.rescore_seconds = Histogram(
            "qianjiang_rescore_seconds", "Time to re-derive one citizen's features and re-score them.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.kernel_batch_seconds = Histogram(
            "qianjiang_kernel_batch_seconds", "Time of a whole-population kernel pass.",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r,
        )
        self.rollover_seconds = Histogram(
            "qianjiang_rollover_seconds", "Time of a day rollover (find, derive and publish the citizens that change).",
            buckets=(0.1, 1, 5, 15, 30, 60, 120, 300, 600), registry=r,
        )
        self.store_write_seconds = Histogram(
            "qianjiang_store_write_seconds", "Time of a committed store write, by operation.", ["operation"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.model_info = Gauge(
            "qianjiang_model_info", "The model and calibration versions being served (value 1).",
            ["model_version", "calibration_version"], registry=r, multiprocess_mode="max",
        )
        self.rollouts = Counter(
            "qianjiang_rollouts", "Model rollouts by result: switched, rejected (invalid release), failed.",
            ["result"], registry=r,
        )
        self.store_up = Gauge(
            "qianjiang_store_up", "1 while the store answers; 0 while writes fail fast (server/store_watch.py).",
            registry=r, multiprocess_mode="min",
        )
        self.citizens = Gauge("qianjiang_citizens", "Citizens in the serving state.", registry=r, multiprocess_mode="max")
        # the offline gates' lists (server/gate_snapshot.py), set by the parent's publisher
        self.gate_sequence = Gauge("qianjiang_gate_sequence", "The latest offline-gate list sequence published.",
                                   ["scenario"], registry=r, multiprocess_mode="max")
        self.gate_snapshot_bytes = Gauge("qianjiang_gate_snapshot_bytes", "Bytes of the latest offline-gate snapshot.",
                                         ["scenario"], registry=r, multiprocess_mode="max")
        self.gate_delta_changes = Counter("qianjiang_gate_delta_changes", "Cards removed or added by offline-gate deltas.",
                                          ["scenario", "change"], registry=r)
        self.gate_publish_seconds = Histogram(
            "qianjiang_gate_publish_seconds", "Time to derive and publish one scenario's delta (and snapshot when due).",
            buckets=(0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r,
        )

    def flush(self) -> None:
        """Hand the buffered per-call figures to Prometheus now."""
        self.calls.flush()

    def start_flushing(self, interval: float = 0.25) -> None:
        """Flush every ``interval`` seconds from a thread of this process (call it in the
        process that serves: a forked worker starts its own)."""
        if self._flusher is None:
            def run():
                while not self._stop_flushing.wait(interval):
                    self.flush()

            self._flusher = threading.Thread(target=run, name="qj-metrics", daemon=True)
            self._flusher.start()

    def stop_flushing(self) -> None:
        self._stop_flushing.set()
        if self._flusher is not None:
            self._flusher.join()
            self._flusher = None
        self._stop_flushing.clear()
        self.flush()

    def observe_store_write(self, operation: str, seconds: float) -> None:
        self.store_write_seconds.labels(operation=operation).observe(seconds)

    def observe_rescore(self, seconds: float) -> None:
        self.rescores.inc()
        self.rescore_seconds.observe(seconds)
