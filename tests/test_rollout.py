"""Rollout figures (kernel/rollout.py): PSI, level migration, and the report of two model
versions on the same synthetic city."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kernel.calibrate import calibrate
from kernel.rollout import (
    PSI_MAJOR,
    PSI_STABLE,
    PopulationScores,
    compare,
    level_migration,
    psi,
    psi_reading,
)
from kernel.score import Scorer
from kernel.spec import DEFAULT_SPEC_PATH, load_spec
from kernel.synthetic import generate_features

finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
samples = hnp.arrays(np.float64, st.integers(1, 300), elements=finite)
REFERENCE = np.random.default_rng(3).normal(size=20_000)


# --- PSI ------------------------------------------------------------------------------------------


@given(samples, st.integers(1, 20))
def test_psi_is_zero_for_identical_distributions(x, bins):
    assert psi(x, x, bins) == 0.0
    assert psi(x, np.random.default_rng(0).permutation(x), bins) == 0.0


@given(samples, samples, st.integers(1, 20))
def test_psi_is_never_negative(expected, actual, bins):
    value = psi(expected, actual, bins)
    assert np.isfinite(value) and value >= 0.0


@given(st.floats(0.0, 1.2), st.floats(0.05, 0.5))
def test_psi_grows_with_a_shift(shift, more):
    assert psi(REFERENCE, REFERENCE + shift + more) > psi(REFERENCE, REFERENCE + shift)


def test_psi_reading_of_the_usual_thresholds():
    other = np.random.default_rng(4).normal(size=20_000)
    assert psi(REFERENCE, other) < PSI_STABLE  # two samples of one distribution
    assert psi(REFERENCE, REFERENCE + 1.0) > PSI_MAJOR  # one sigma
    assert [psi_reading(v) for v in (0.0, 0.099, 0.1, 0.25, 0.26)] == [
        "stable", "stable", "some shift", "some shift", "major shift"]


def test_psi_bins_are_quantiles_of_the_expected_side():
    expected = np.arange(1000.0)
    # everything of `actual` in the top decile of `expected`: 9 empty bins and one full one
    value = psi(expected, np.full(100, 950.0))
    eps = 1e-4
    assert value == pytest.approx(9 * (eps - 0.1) * np.log(eps / 0.1) + (1 - 0.1) * np.log(1 / 0.1))
    # discrete values (scores) with ties still work: tied quantiles merge into one bin
    assert psi(np.repeat([600, 650, 700], 100), np.repeat([600, 650, 700], 100)) == 0.0


@pytest.mark.parametrize("bad, message", [
    (([], [1.0]), "expected: empty"),
    (([1.0], [np.nan]), r"actual\[0\]: not finite"),
    (([[1.0]], [1.0]), "expected: expected a 1-d array"),
])
def test_psi_rejects_bad_input_naming_it(bad, message):
    with pytest.raises(ValueError, match=message):
        psi(*bad)
    with pytest.raises(ValueError, match="bins"):
        psi([1.0], [1.0], bins=0)


# --- level migration --------------------------------------------------------------------------------


@given(hnp.arrays(np.int8, st.integers(0, 200), elements=st.integers(0, 4)), st.randoms())
def test_migration_sums_to_n_and_is_diagonal_for_the_same_levels(levels, rnd):
    same = level_migration(levels, levels, 5)
    assert same.shape == (5, 5) and same.sum() == len(levels)
    assert (same == np.diag(np.bincount(levels, minlength=5))).all()
    shuffled = levels.copy()
    rnd.shuffle(shuffled)
    moved = level_migration(levels, shuffled, 5)
    assert moved.sum() == len(levels)
    assert (moved.sum(axis=1) == np.bincount(levels, minlength=5)).all()
    assert (moved.sum(axis=0) == np.bincount(shuffled, minlength=5)).all()


def test_migration_of_different_level_tables_and_bad_levels():
    m = level_migration(np.array([0, 1, 1]), np.array([3, 0, 3]), (2, 4))
    assert m.tolist() == [[0, 0, 0, 1], [1, 0, 0, 1]]
    with pytest.raises(ValueError, match=r"new_levels\[1\]: level -1 is outside"):
        level_migration(np.array([0, 1]), np.array([0, -1]), 5)
    with pytest.raises(ValueError, match="one length"):
        level_migration(np.array([0, 1]), np.array([0]), 5)


# --- two versions on one synthetic city ---------------------------------------------------------------


def variant_spec(tmp_path, old: str, new: str, name: str = "variant.toml"):
    """kernel/models/v1.toml with one piece of text changed."""
    text = DEFAULT_SPEC_PATH.read_text()
    assert text.count(old) == 1, old
    path = tmp_path / name
    path.write_text(text.replace(old, new))
    return load_spec(path)


def scored(spec, people, features) -> PopulationScores:
    cols = Scorer(spec, calibrate(spec, features, people.adult)).score(features, people.adult)
    return PopulationScores(raw=cols.raw, score=cols.score, level=cols.level, adult=people.adult)


@pytest.fixture(scope="module")
def small_city():
    spec = load_spec()
    people, features = generate_features(spec, 5_000, seed=23)
    return spec, people, features, scored(spec, people, features)


def test_the_same_version_reports_no_change(small_city):
    spec, people, _, v1 = small_city
    report = compare(v1, v1, spec, spec, "a", "a")
    assert report.n_adults == int(people.adult.sum())
    assert report.psi_raw == 0.0 and report.psi_score == 0.0
    assert (report.migration == np.diag(np.diag(report.migration))).all()
    assert report.migration.sum() == report.n_adults
    assert report.changed_share == 0.0 and report.n_up == report.n_down == 0
    assert report.mean_score_change == 0.0


def test_report_of_a_changed_weight_on_a_synthetic_city(small_city, tmp_path):
    spec, people, features, v1 = small_city
    v2_spec = variant_spec(tmp_path, "[dimensions.prosocial]\nweight = 0.15", "[dimensions.prosocial]\nweight = 0.45")
    assert v2_spec.model_version != spec.model_version
    v2 = scored(v2_spec, people, features)
    report = compare(v1, v2, spec, v2_spec, "old-id", "new-id")

    adults = people.adult == 1
    assert report.n_adults == int(adults.sum())
    assert report.migration.sum() == report.n_adults
    assert (report.migration.sum(axis=1) == np.bincount(v1.level[adults], minlength=5)).all()
    assert (report.migration.sum(axis=0) == np.bincount(v2.level[adults], minlength=5)).all()
    moved = int((v1.level[adults] != v2.level[adults]).sum())
    assert report.n_up + report.n_down == moved > 0
    assert report.changed_share == pytest.approx(moved / report.n_adults)
    off_diagonal = report.migration.sum() - np.trace(report.migration)
    assert off_diagonal == moved
    # raw points of everyone with prosocial points rise; scores are recalibrated to the same
    # curve, so their distribution barely moves while individuals do
    assert report.psi_raw > PSI_MAJOR
    assert report.psi_score < PSI_STABLE
    delta = v2.score[adults].astype(int) - v1.score[adults].astype(int)
    assert report.mean_score_change == pytest.approx(delta.mean())
    assert report.mean_abs_score_change == pytest.approx(np.abs(delta).mean()) and report.mean_abs_score_change > 0

    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["migration"] == report.migration.tolist()
    assert doc["old_levels"] == [lv.code for lv in spec.levels] and doc["psi_raw_reading"] == "major shift"
    text = report.format()
    for needle in ("old-id", "new-id", "PSI raw", "needs_improvement", "outstanding", "信用良好", f"{report.n_adults:,}"):
        assert needle in text
    assert len(text.splitlines()) == 8 + 1 + len(spec.levels) + 1


def test_compare_needs_the_same_rows(small_city):
    spec, _, _, v1 = small_city
    shorter = PopulationScores(v1.raw[:10], v1.score[:10], v1.level[:10], v1.adult[:10])
    with pytest.raises(ValueError, match="row for row"):
        compare(v1, shorter, spec, spec)
    minors = PopulationScores(v1.raw[:10], v1.score[:10], v1.level[:10], np.zeros(10, np.uint8))
    with pytest.raises(ValueError, match="no adult"):
        compare(minors, minors, spec, spec)
