"""Shared fixtures: the v1 spec, a small calibrated synthetic city."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from kernel.calibrate import calibrate
from kernel.spec import load_spec
from kernel.synthetic import generate_features

# Kernel batches are deliberately large inputs (a block is 64 citizens x 25 variables), and
# shared CI machines are slow: neither is a defect of the tests.
settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("default")


@pytest.fixture(scope="session")
def spec():
    return load_spec()


@pytest.fixture(scope="session")
def city(spec):
    """(people, features float32) of a 20,000-person synthetic city."""
    return generate_features(spec, 20_000, seed=11)


@pytest.fixture(scope="session")
def calibration(spec, city):
    people, features = city
    return calibrate(spec, features, people.adult)


# --- the real server, in-process on port 0 ------------------------------------------------


class Served:
    """A running server and what tests need to reach it."""

    def __init__(self, tmp_path_factory, n_citizens: int = 3000, seed: int = 2018):
        from prometheus_client import CollectorRegistry

        from clients.client import QianjiangClient
        from server.app import Node, Runtime, ServerConfig
        from server.metrics import Metrics

        self.data_dir = tmp_path_factory.mktemp("qj-data")
        self.config = ServerConfig(data_dir=self.data_dir, seed_citizens=n_citizens, seed=seed, metrics_port=0, port=0)
        self.registry = CollectorRegistry()
        self.runtime = Runtime.prepare(self.config)
        self.node = Node(self.runtime, port=0, metrics=Metrics(self.registry)).start()
        self.runtime.load()
        self.service = self.node.attach()
        self.target = f"127.0.0.1:{self.node.port}"
        self.client = QianjiangClient(self.target, timeout=5.0)
        self.seed = seed

    def token(self, row: int) -> bytes:
        return self.runtime.synthetic_card_token(row)

    def citizen(self, row: int) -> str:
        from server.app import citizen_id

        return citizen_id(row)

    def metric(self, name: str, **labels) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def stop(self):
        self.client.close()
        self.node.drain(0)


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """One real server for the session (3,000 synthetic citizens). Tests that change a
    citizen pick their own rows so they do not disturb each other."""
    s = Served(tmp_path_factory)
    yield s
    s.stop()
