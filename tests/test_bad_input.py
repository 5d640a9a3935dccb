"""Bad input gets a clear error naming the problem, never a wrong score."""

from __future__ import annotations

import copy
import tomllib
import warnings

import numpy as np
import pytest

from kernel.calibration import CalibrationError, RawHistogram
from kernel.columns import ScoreColumns
from kernel.score import Scorer
from kernel.spec import DEFAULT_SPEC_PATH, SpecError, load_spec, parse_spec


@pytest.fixture
def doc():
    with open(DEFAULT_SPEC_PATH, "rb") as fh:
        return copy.deepcopy(tomllib.load(fh))


@pytest.fixture(scope="module")
def scorer():
    spec = load_spec()
    return Scorer(spec)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -1.0, -1e-30])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_or_negative_features_are_named(scorer, bad, dtype):
    feats = np.zeros((70, scorer.n_variables), dtype)
    feats[65, 20] = bad
    with pytest.raises(ValueError, match=r"features\[65, 20\] \(credit_history_months\)"):
        scorer.score(feats, np.ones(70, np.uint8))


def test_negative_zero_is_a_valid_zero(scorer):
    feats = np.zeros((2, scorer.n_variables))
    feats[1] = -0.0
    cols = scorer.score(feats, np.ones(2, np.uint8))
    assert cols.raw[0] == cols.raw[1]


def test_single_row_rescore_rejects_bad_features(scorer):
    feats = np.zeros((3, scorer.n_variables), np.float32)
    rows = scorer.bind(feats, np.ones(3, np.uint8), ScoreColumns.empty(3))
    feats[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"features\[1, 0\] \(residence_years\): nan"):
        rows.rescore(1)
    with pytest.raises(IndexError, match="row 3 is outside"):
        rows.rescore(3)


@pytest.mark.parametrize(
    "feats, exc, message",
    [
        (np.zeros((4, 24)), ValueError, r"features: expected shape \(n, 25\)"),
        (np.zeros(25), ValueError, r"features: expected shape \(n, 25\)"),
        (np.zeros((4, 25), np.int64), TypeError, "features: dtype must be float32 or float64, got int64"),
        (np.zeros((4, 25), np.float16), TypeError, "got float16"),
        (np.zeros((25, 4)).T, ValueError, "must be C-contiguous"),
        ([[0.0] * 25] * 4, TypeError, "features: expected a numpy array, got list"),
    ],
)
def test_wrong_shapes_and_dtypes(scorer, feats, exc, message):
    with pytest.raises(exc, match=message):
        scorer.score(feats, np.ones(4, np.uint8))


def test_wrong_adult_mask_and_outputs(scorer):
    feats = np.zeros((4, 25))
    with pytest.raises(TypeError, match="adult: expected a numpy uint8 array, got bool"):
        scorer.score(feats, np.ones(4, bool))
    with pytest.raises(ValueError, match=r"adult: expected shape \(4,\)"):
        scorer.score(feats, np.ones(5, np.uint8))
    with pytest.raises(ValueError, match=r"out.dimension_points: expected float64 \(4, 5\), got float64 \(3, 5\)"):
        scorer.score(feats, np.ones(4, np.uint8), out=ScoreColumns.empty(3))
    with pytest.raises(ValueError, match="n_threads: must be >= 1"):
        scorer.score(feats, np.ones(4, np.uint8), n_threads=0)


def test_calibration_rejects_another_model_and_non_finite_raw(doc):
    spec = load_spec()
    doc["dimensions"]["prosocial"]["weight"] = 0.2
    other = parse_spec(doc)
    hist = RawHistogram.empty(other)
    hist.add(np.zeros(10))
    with pytest.raises(CalibrationError, match=f"was built for model .* not {spec.version}\\+"):  # the default model's
        Scorer(spec, hist.freeze())
    with pytest.raises(CalibrationError, match=r"raw\[1\]: not finite"):
        RawHistogram.empty(spec).add(np.array([0.0, np.nan]))
    with pytest.raises(CalibrationError, match="empty histogram"):
        RawHistogram.empty(spec).freeze()


# --- the model spec ---------------------------------------------------------------------


def _var(doc, name):
    return next(v for v in doc["variables"] if v["name"] == name)


SPEC_CASES = [
    ("unknown dimension", lambda d: _var(d, "honours").update(dimension="wealth"),
     r"variables.honours.dimension: unknown dimension 'wealth'"),
    ("unknown dimension table", lambda d: d["dimensions"].update(wealth={"weight": 0.1, "zh": "x", "en": "x"}),
     r"dimensions.wealth: unknown dimension"),
    ("non-monotone knots", lambda d: _var(d, "volunteer_hours")["points"].update(y=[0.0, 12.0, 30.0, 25.0, 50.0]),
     r"variables.volunteer_hours.points: non-monotone points for a positive variable \(index 3"),
    ("negative variable gaining points", lambda d: _var(d, "tax_arrears")["points"].update(y=[0.0, -20.0, 5.0]),
     r"variables.tax_arrears.points: non-monotone points for a negative variable"),
    ("unsorted knots", lambda d: _var(d, "honours")["points"].update(edges=[2.0, 1.0]),
     r"variables.honours.points: knots/edges must be strictly increasing"),
    ("protected attribute name", lambda d: d["variables"].append({**_var(d, "honours"), "name": "hukou_type"}),
     r"variables.hukou_type.name: 'hukou_type' uses a protected attribute \(hukou\)"),
    ("protected attribute source", lambda d: _var(d, "honours").update(source="health_records"),
     r"variables.honours.source: 'health_records' uses a protected attribute \(health\)"),
    ("protected record type", lambda d: _var(d, "honours").update(record_type="ethnicity"),
     r"variables.honours.record_type: 'ethnicity' uses a protected attribute"),
    ("overlapping levels", lambda d: d["levels"][2].update(min=540),
     r"levels\[2\].min: level bands overlap or are out of order"),
    ("levels not from zero", lambda d: d["levels"][0].update(min=100),
     r"levels\[0\].min: the first level must start at scale_min"),
    ("minor record kept a year", lambda d: _var(d, "traffic_violations").update(lifetime_days=365),
     r"variables.traffic_violations.lifetime_days: 365 days is outside the minor tier's credit-repair bounds \[1, 90\]"),
    ("serious record kept 5 years", lambda d: _var(d, "criminal_convictions").update(lifetime_days=1825),
     r"variables.criminal_convictions.lifetime_days: 1825 days is outside the serious tier"),
    ("hard rule on a general record", lambda d: _var(d, "tax_arrears").update(hard_rule=True),
     r"variables.tax_arrears.hard_rule: only serious-tier records"),
    ("serious record without the hard rule", lambda d: _var(d, "criminal_convictions").update(hard_rule=False),
     r"variables.criminal_convictions.hard_rule: a serious-tier record must carry the hard rule"),
    ("zero weight", lambda d: d["dimensions"]["identity"].update(weight=0.0),
     r"dimensions.identity.weight: must be > 0"),
    ("unknown key", lambda d: _var(d, "honours").update(weigth=3),
     r"variables.honours.weigth: unknown key"),
    ("duplicate reason code", lambda d: _var(d, "honours")["reason"].update(code="PS01"),
     r"variables.honours.reason.code: duplicate reason code 'PS01'"),
    ("missing mu", lambda d: d["model"].pop("mu"), r"model.mu: missing"),
    ("sigma not a number", lambda d: d["model"].update(sigma="fifty"), r"model.sigma: expected a finite number"),
    ("cap in fair band", lambda d: d["model"].update(hard_rule_cap=560), r"model.hard_rule_cap: 560 must lie below"),
    ("bins count", lambda d: _var(d, "honours")["points"].update(points=[0.0, 60.0]),
     r"variables.honours.points.points: 2 edges need 3 points, got 2"),
    ("actionable not a bool", lambda d: _var(d, "honours").update(actionable="yes"),
     r"variables.honours.actionable: expected true or false"),
    ("actionable without a step", lambda d: _var(d, "honours").update(actionable=True, max_steps=5),
     r"variables.honours.step: missing"),
    ("step of zero", lambda d: _var(d, "volunteer_hours").update(actionable=True, step=0.0, max_steps=5),
     r"variables.volunteer_hours.step: an actionable positive variable needs a step above 0"),
    ("counted step of two", lambda d: _var(d, "blood_donations").update(actionable=True, step=2.0, max_steps=3),
     r"variables.blood_donations.step: a counted variable grows one record at a time"),
    ("too many steps", lambda d: _var(d, "volunteer_hours").update(actionable=True, step=10.0, max_steps=500),
     r"variables.volunteer_hours.max_steps"),
    ("a step on a repairable record", lambda d: _var(d, "tax_arrears").update(actionable=True, step=1.0),
     r"variables.tax_arrears.step: negative variables are repaired, not stepped"),
    ("a step without actionable", lambda d: _var(d, "honours").update(step=1.0),
     r"variables.honours.step: only actionable variables have one"),
]


@pytest.mark.parametrize("case, mutate, message", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_invalid_spec_is_rejected_naming_the_key(doc, case, mutate, message):
    mutate(doc)
    with pytest.raises(SpecError, match=message):
        parse_spec(doc)


def test_points_that_overflow_a_float_are_an_error_not_a_warning(doc):
    """Two variables of one dimension at 1e308 points each: their sum is infinite. The spec
    is refused naming the problem, and numpy's overflow warning is not printed on the way."""
    _var(doc, "volunteer_hours")["points"].update(y=[0.0, 12.0, 30.0, 42.0, 1e308])
    _var(doc, "honours")["points"].update(points=[0.0, 25.0, 1e308])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SpecError, match=r"variables: the weighted points overflow a float \(raw points range from .* to inf\)"):
            parse_spec(doc)


def test_spec_that_is_not_toml(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[model\nname = 1")
    with pytest.raises(SpecError, match="broken.toml: not valid TOML"):
        load_spec(path)


def test_content_hash_is_part_of_the_model_version(doc):
    a = parse_spec(doc)
    _var(doc, "honours")["reason"]["en"] = "No honours"
    b = parse_spec(doc)
    assert a.version == b.version == 2  # the default model (kernel/models/v2.toml)
    assert a.model_version != b.model_version
    assert a.model_version.startswith("2+") and len(a.model_version) == 14
