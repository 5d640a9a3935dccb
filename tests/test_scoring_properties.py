"""The scoring maths: points add up, monotone in every variable, the hard-rule cap, minors,
and the seed's level table at every boundary."""

from __future__ import annotations

import copy
import tomllib

import numpy as np
import pytest
from hypothesis import given, strategies as st

from kernel.columns import FLAG_HARD_RULE, FLAG_NO_SCORE, ScoreColumns
from kernel.reference import score_reference, variable_points
from kernel.score import Scorer
from kernel.spec import DEFAULT_SPEC_PATH, parse_spec


def test_dimension_points_add_up_to_the_reported_total(spec, city, calibration):
    people, features = city
    cols = Scorer(spec, calibration).score(features, people.adult)
    scored = people.adult == 1
    dims = cols.dimension_points[scored]
    total = dims[:, 0].copy()
    for d in range(1, dims.shape[1]):
        total += dims[:, d]
    np.testing.assert_array_equal(total, cols.raw[scored])  # exactly, same order


def test_points_follow_the_spec_functions(spec):
    """The compiled ramps evaluate the spec's knots and bins (checked against plain Python)."""
    values = np.array([0.0, 0.3, 0.5, 1.0, 1.5, 2.0, 2.7, 3.0, 6.0, 11.0, 12.0, 40.0, 100.0, 1000.0])
    feats = np.repeat(values[:, None], len(spec.variables), axis=1)
    pts = variable_points(spec, feats)
    for j, var in enumerate(spec.variables):
        expected = [var.points(x) for x in values]
        np.testing.assert_allclose(pts[:, j], expected, rtol=1e-12, atol=1e-12, err_msg=var.name)


@given(
    base=st.lists(st.floats(0, 50, allow_nan=False, allow_subnormal=False), min_size=25, max_size=25),
    var=st.integers(0, 24),
    bump=st.floats(1e-6, 500, allow_nan=False),
)
def test_score_is_monotone_in_every_variable(spec, calibration, base, var, bump):
    """A worse record never raises a score; better positive behaviour never lowers it."""
    feats = np.array([base, base], np.float64)
    feats[1, var] += bump
    cols = Scorer(spec, calibration).score(feats, np.ones(2, np.uint8))
    if spec.variables[var].direction == "negative":
        assert cols.score[1] <= cols.score[0]
        assert cols.raw[1] <= cols.raw[0]
    else:
        assert cols.score[1] >= cols.score[0]
        assert cols.raw[1] >= cols.raw[0]


def test_more_negative_records_never_raise_any_citizen(spec, city, calibration):
    people, features = city
    scorer = Scorer(spec, calibration)
    before = scorer.score(features, people.adult)
    for j, var in enumerate(spec.variables):
        if var.direction != "negative":
            continue
        worse = features.copy()
        worse[:, j] += 1.0
        after = scorer.score(worse, people.adult)
        assert (after.score <= before.score).all(), var.name


@pytest.mark.parametrize("name", ["court_listed_dishonest_debtor", "blacklist_entries"])
def test_an_active_hard_rule_record_caps_below_550(spec, city, calibration, name):
    people, features = city
    feats = features.copy()
    best = np.array([max(v.x) * 2 if v.direction == "positive" else 0.0 for v in spec.variables], np.float32)
    feats[:100] = best  # role models on every positive variable
    feats[:50, spec.variable_index(name)] = 1.0
    adult = np.ones(len(feats), np.uint8)
    cols = Scorer(spec, calibration).score(feats, adult)
    assert (cols.score[:50] <= 549).all() and (cols.score[:50] >= 0).all()
    assert (cols.level[:50] == 0).all()
    assert (cols.flags[:50] & FLAG_HARD_RULE).all()
    assert (cols.score[50:100] >= 750).all(), "the same people without the record are outstanding"
    assert spec.variable_index(name) == cols.reasons[0, 0], "the serious record is the first reason"


def test_minors_get_no_score(spec, city, calibration):
    people, features = city
    cols = Scorer(spec, calibration).score(features, people.adult)
    minors = people.age < 18
    assert minors.sum() > 1000
    assert (cols.score[minors] == -1).all() and (cols.level[minors] == -1).all()
    assert np.isnan(cols.percentile[minors]).all() and np.isnan(cols.raw[minors]).all()
    assert (cols.reasons[minors] == -1).all() and (cols.flags[minors] == FLAG_NO_SCORE).all()
    assert (cols.score[~minors] >= 0).all()


def _spec_with(mu: float, sigma: float = 1e-9):
    with open(DEFAULT_SPEC_PATH, "rb") as fh:
        doc = tomllib.load(fh)
    doc = copy.deepcopy(doc)
    doc["model"]["mu"], doc["model"]["sigma"] = mu, sigma
    return parse_spec(doc)


@pytest.mark.parametrize(
    "score, level",
    [(0, "needs_improvement"), (549, "needs_improvement"), (550, "fair"), (599, "fair"), (600, "good"),
     (699, "good"), (700, "excellent"), (749, "excellent"), (750, "outstanding"), (1000, "outstanding")],
)
def test_level_boundaries_follow_the_seed(city, score, level):
    """With σ → 0 every citizen scores exactly μ, so μ walks the level table's edges."""
    from kernel.calibrate import calibrate

    people, features = city
    spec = _spec_with(float(score))
    feats, adult = features[:500], people.adult[:500]
    cal = calibrate(spec, feats, adult)
    for cols in (Scorer(spec, cal).score(feats, adult), score_reference(spec, cal, feats, adult)):
        scored = (adult == 1) & ((cols.flags & FLAG_HARD_RULE) == 0)
        assert (cols.score[scored] == score).all()
        assert {spec.levels[i].code for i in cols.level[scored]} == {level}
    assert spec.level_of(score).code == level


def test_reasons_rank_points_lost_and_carry_texts(spec, calibration):
    feats = np.zeros((1, len(spec.variables)))
    for name in ("residence_years", "social_insurance_months", "identity_verified"):
        feats[0, spec.variable_index(name)] = 100
    feats[0, spec.variable_index("provident_fund_loan_overdue")] = 2  # -42.5 points x 0.25
    feats[0, spec.variable_index("traffic_violations")] = 1  # -6 x 0.3
    cols = Scorer(spec, calibration).score(feats, np.ones(1, np.uint8))
    c = spec.compiled
    pts = variable_points(spec, feats)[0]
    loss = (c.best - pts) * c.loss_weight
    reasons = [r for r in cols.reasons[0] if r >= 0]
    assert len(reasons) == 4
    assert list(loss[reasons]) == sorted(loss[reasons], reverse=True)
    assert loss[reasons[-1]] >= np.delete(loss, reasons).max()
    assert spec.variables[reasons[0]].name == "provident_fund_loan_overdue"  # 42.5 x 0.25 lost
    assert spec.variables[reasons[1]].name == "volunteer_hours"  # 50 x 0.15 lost
    for r in reasons:
        reason = spec.variables[r].reason
        assert reason.code and reason.zh and reason.en and reason.improve_zh and reason.improve_en


def test_a_citizen_with_nothing_to_improve_gets_no_reasons(spec, calibration):
    feats = np.array([[max(v.x) * 2 if v.direction == "positive" else 0.0 for v in spec.variables]])
    cols = Scorer(spec, calibration).score(feats, np.ones(1, np.uint8))
    assert (cols.reasons[0] == -1).all()


def test_outputs_can_be_supplied_by_the_caller(spec, city, calibration):
    people, features = city
    out = ScoreColumns.empty(len(features))
    got = Scorer(spec, calibration).score(features, people.adult, out=out, n_threads=2)
    assert got is out
