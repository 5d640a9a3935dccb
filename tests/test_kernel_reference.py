"""The Cython kernel against its numpy reference: identical integer results, dimension
points within 1e-6 relative, for float32 and float64, read-only inputs, 1 and 2 threads; and
its compact output layout (the serving state's) against its wide one."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from kernel.columns import FLAG_INVALID, ScoreColumns
from kernel.reference import score_reference
from kernel.score import Scorer


def assert_same(kernel: ScoreColumns, ref: ScoreColumns):
    np.testing.assert_array_equal(kernel.score, ref.score)
    np.testing.assert_array_equal(kernel.level, ref.level)
    np.testing.assert_array_equal(kernel.reasons, ref.reasons)
    np.testing.assert_array_equal(kernel.flags, ref.flags)
    np.testing.assert_allclose(kernel.dimension_points, ref.dimension_points, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(kernel.raw, ref.raw, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(kernel.percentile, ref.percentile, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("readonly", [False, True])
def test_synthetic_city_matches_reference(spec, city, calibration, dtype, n_threads, readonly):
    people, features = city
    feats = features.astype(dtype)
    adult = people.adult.copy()
    if readonly:
        feats.setflags(write=False)
        adult.setflags(write=False)
    got = Scorer(spec, calibration).score(feats, adult, n_threads=n_threads)
    assert_same(got, score_reference(spec, calibration, feats, adult))
    assert (got.score[adult == 1] >= 0).all()


def test_uncalibrated_scorer_matches_reference(spec, city):
    people, features = city
    assert_same(Scorer(spec).score(features, people.adult), score_reference(spec, None, features, people.adult))


def _adversarial_values(spec, dtype):
    """Every knot and edge, one ulp either side of it (in the input dtype), zero, the
    smallest normal number and huge values."""
    info = np.finfo(dtype)
    vals = {dtype(0), info.tiny, dtype(1e-30), dtype(1e30), info.max}
    for v in spec.variables:
        for x in map(dtype, v.x):
            vals.update({x, np.nextafter(x, dtype(-np.inf)), np.nextafter(x, dtype(np.inf)), x + dtype(0.5)})
    return sorted(float(a) for a in vals if a == 0 or a >= info.tiny)


@st.composite
def batches(draw, spec):
    n = draw(st.integers(1, 80))  # up to two kernel blocks
    n_vars = len(spec.variables)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    elements = st.one_of(
        st.sampled_from(_adversarial_values(spec, dtype)),
        st.floats(0, 500, allow_nan=False, allow_subnormal=False, width=32),
        st.integers(0, 12).map(float),
    )
    feats = draw(hnp.arrays(dtype, (n, n_vars), elements=elements))
    adult = draw(hnp.arrays(np.uint8, (n,), elements=st.integers(0, 1)))
    return feats, adult


@given(data=st.data())
def test_random_and_adversarial_inputs_match_reference(spec, calibration, data):
    feats, adult = data.draw(batches(spec))
    n_threads = data.draw(st.sampled_from([1, 2]))
    got = Scorer(spec, calibration).score(feats, adult, n_threads=n_threads)
    assert_same(got, score_reference(spec, calibration, feats, adult))


def test_rescoring_one_row_in_place_equals_the_batch(spec, city, calibration):
    people, features = city
    scorer = Scorer(spec, calibration)
    batch = scorer.score(features, people.adult)
    feats = features.copy()
    out = ScoreColumns.empty(len(feats))
    out.score[:] = -7
    rows = scorer.bind(feats, people.adult, out)
    for r in range(0, len(feats), 97):
        assert rows.rescore(r) == batch.score[r]
        for name, value in out.row(r).items():
            np.testing.assert_array_equal(value, batch.row(r)[name])
    # a new record: change the features of one citizen and re-score only that row
    r = int(np.flatnonzero((people.adult == 1) & (batch.flags == 0))[0])
    feats[r, spec.variable_index("court_listed_dishonest_debtor")] = 1.0
    assert rows.rescore(r) <= spec.hard_rule_cap
    assert out.score[r + 1] == -7, "only the bound row is written"


def assert_compact_is_the_wide_narrowed(compact: ScoreColumns, wide: ScoreColumns):
    """The serving state's compact layout holds the wide layout's results: score, level,
    flags, raw and reasons to the bit, dimension points and percentile as their float64
    values rounded once to float32."""
    assert compact.compact and not wide.compact
    for name in ("score", "level", "flags"):
        np.testing.assert_array_equal(getattr(compact, name), getattr(wide, name), err_msg=name)
    np.testing.assert_array_equal(compact.raw.view(np.uint64), wide.raw.view(np.uint64))  # NaNs too
    np.testing.assert_array_equal(compact.reasons.astype(np.int16), wide.reasons)
    np.testing.assert_array_equal(compact.dimension_points, wide.dimension_points.astype(np.float32))
    np.testing.assert_array_equal(compact.percentile.view(np.uint32), wide.percentile.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_the_compact_layout_holds_exactly_the_wide_results(spec, calibration, dtype, n_threads):
    """A large synthetic city (200,000 people, every level and reason, minors, hard rules):
    storing compact cannot change a score, a level or a raw value, and one row re-scored in
    place writes what the batch wrote."""
    from kernel.synthetic import generate_features

    people, features = generate_features(spec, 200_000, seed=2024)
    feats = features.astype(dtype)
    scorer = Scorer(spec, calibration)
    wide = scorer.score(feats, people.adult, n_threads=n_threads)
    compact = ScoreColumns.empty(len(feats), compact=True)
    assert scorer.score(feats, people.adult, out=compact, n_threads=n_threads) is compact
    assert_compact_is_the_wide_narrowed(compact, wide)
    assert len(np.unique(wide.level)) == len(spec.levels) + 1 and (wide.flags & 1).any()
    out = ScoreColumns.empty(len(feats), compact=True)
    out.score[:] = -7
    rows = scorer.bind(feats, people.adult, out)
    picked = np.arange(0, len(feats), 613)
    for r in picked:
        rows.rescore(int(r))
    assert_compact_is_the_wide_narrowed(out.take(picked), wide.take(picked))
    assert out.score[1] == -7


def test_a_compact_output_of_the_wrong_shape_is_refused(spec):
    with pytest.raises(ValueError, match=r"out.percentile: expected float32 \(4,\), got float64 \(4,\)"):
        cols = ScoreColumns.empty(4, compact=True)
        cols.percentile = np.empty(4)
        Scorer(spec).score(np.zeros((4, len(spec.variables))), np.ones(4, np.uint8), out=cols)


def test_invalid_row_in_a_batch_is_named_and_gets_no_score(spec, calibration):
    feats = np.zeros((300, len(spec.variables)), np.float32)
    feats[217, 3] = np.nan
    out = ScoreColumns.empty(300)
    with pytest.raises(ValueError, match=r"features\[217, 3\] \(traffic_violations\): nan"):
        Scorer(spec, calibration).score(feats, np.ones(300, np.uint8), out=out, n_threads=2)
    assert out.flags[217] == FLAG_INVALID and out.score[217] == -1
    with pytest.raises(ValueError, match="is not a finite non-negative number"):
        score_reference(spec, calibration, feats, np.ones(300, np.uint8))


# --- Φ⁻¹: the kernel's against an independent implementation ------------------------------


def _open_interval_grid() -> np.ndarray:
    """p over the whole open interval (0, 1): both tails down to the smallest normal double
    (log-spaced), the body (linear), the branch points of AS 241 (|p - 0.5| = 0.425, and
    r = sqrt(-log p) = 5) from both sides, and the doubles next to 0.5 and 1."""
    tiny = np.finfo(np.float64).tiny
    tail = np.logspace(np.log10(tiny), np.log10(0.075), 4000)
    body = np.linspace(0.075, 0.925, 4001)
    edges = []
    for x in (0.075, 0.925, np.exp(-25.0), 1 - np.exp(-25.0), 0.5):
        edges += [np.nextafter(x, 0.0), x, np.nextafter(x, 1.0)]
    p = np.concatenate([tail, body, 1.0 - tail, edges, [np.nextafter(1.0, 0.0), tiny]])
    return np.unique(p[(p > 0) & (p < 1)])


def test_normal_quantile_matches_statistics_inv_cdf():
    """statistics.NormalDist is CPython's own implementation (its coefficients typed
    independently of kernel/normal.py's): the kernel agrees with it to a few ulps everywhere."""
    from statistics import NormalDist

    from kernel.score import normal_quantile

    p = _open_interval_grid()
    got = normal_quantile(p)
    inv_cdf = NormalDist().inv_cdf
    want = np.array([inv_cdf(float(x)) for x in p])
    np.testing.assert_allclose(got, want, rtol=4e-15, atol=1e-15)
    # Non-decreasing, but for one ulp at AS 241's branch points (CPython's inv_cdf steps back
    # by the same ulp at p = 0.075): far below what could move a rounded score.
    assert np.all(np.diff(got) >= -np.spacing(np.abs(got[1:]))), "Φ⁻¹ must never decrease"
    assert got[0] < -37 and got[-1] > 8  # both tails were reached


@given(st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True))
def test_normal_quantile_any_p(p):
    from statistics import NormalDist

    from kernel.score import normal_quantile

    assert normal_quantile(np.array([p]))[0] == pytest.approx(NormalDist().inv_cdf(p), rel=4e-15, abs=1e-15)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_normal_quantile_refuses_the_closed_ends(bad):
    from kernel.score import normal_quantile

    with pytest.raises(ValueError, match="strictly inside"):
        normal_quantile(np.array([0.5, bad]))
