"""Shared fixtures: the v1 spec, a small calibrated synthetic city."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from kernel.calibrate import calibrate
from kernel.spec import load_spec
from kernel.synthetic import generate_features

settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
