"""Prometheus metrics of the service, with the standard gRPC names.

    >>> from prometheus_client import CollectorRegistry
    >>> m = Metrics(CollectorRegistry())
    >>> m.decisions.labels(scenario="metro_pay_later", outcome="ALLOW").inc()

Tests pass a private CollectorRegistry. In the multi-worker server every process writes its
values to PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode, chosen by that
variable at import) and the parent serves the merged view. No label ever carries a person's
identifier: labels are services, methods, status codes, scenarios, outcomes and versions.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

#: 100 µs to 1 s: a gate check has single-digit milliseconds (design section 7).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = registry if registry is not None else REGISTRY
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

    def observe_store_write(self, operation: str, seconds: float) -> None:
        self.store_write_seconds.labels(operation=operation).observe(seconds)

    def observe_rescore(self, seconds: float) -> None:
        self.rescores.inc()
        self.rescore_seconds.observe(seconds)
