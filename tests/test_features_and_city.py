"""Records to features (decay, expiry, aggregation) and the synthetic city."""

from __future__ import annotations

import copy
import tomllib

import numpy as np
import pytest

from kernel.columns import FLAG_HARD_RULE
from kernel.features import Records, build_features, future_records
from kernel.score import Scorer
from kernel.spec import DEFAULT_SPEC_PATH, PROTECTED_WORDS, parse_spec
from kernel.synthetic import AS_OF_DAY, generate_city, generate_features


def test_negative_records_decay_and_age_out(spec):
    v = spec.variable_index("provident_fund_loan_overdue")  # general, 365 days, linear
    days = [AS_OF_DAY, AS_OF_DAY - 73, AS_OF_DAY - 364, AS_OF_DAY - 365, AS_OF_DAY - 900]
    recs = Records.from_arrays(range(5), [v] * 5, days, [1] * 5)
    f = build_features(spec, recs, 5, AS_OF_DAY, dtype=np.float64)[:, v]
    np.testing.assert_allclose(f, [1.0, 0.8, 1 / 365, 0.0, 0.0])


def test_serious_records_count_in_full_until_they_expire(spec):
    v = spec.variable_index("court_listed_dishonest_debtor")  # serious, 1095 days, no decay
    recs = Records.from_arrays([0, 1], [v, v], [AS_OF_DAY - 1094, AS_OF_DAY - 1095], [1, 1])
    f = build_features(spec, recs, 2, AS_OF_DAY)[:, v]
    assert list(f) == [1.0, 0.0]


def test_positive_records_sum_inside_their_window_and_max_aggregates(spec):
    hours = spec.variable_index("volunteer_hours")  # sum, 1095-day window
    months = spec.variable_index("social_insurance_months")  # max, no window
    recs = Records.from_arrays(
        [0, 0, 0, 0, 0], [hours, hours, hours, months, months],
        [AS_OF_DAY - 10, AS_OF_DAY - 1000, AS_OF_DAY - 2000, AS_OF_DAY - 4000, AS_OF_DAY], [4, 6, 50, 30, 24],
    )
    f = build_features(spec, recs, 1, AS_OF_DAY)[0]
    assert f[hours] == 10 and f[months] == 30


def test_a_record_dated_after_the_scoring_day_counts_from_its_day_on(spec):
    """A store may hold one (a clock set back, a source in another zone): it must not stop a
    whole-population load, and it must not count before its day."""
    v = spec.variable_index("tax_arrears")
    recs = Records.from_arrays([0, 0], [v, v], [AS_OF_DAY, AS_OF_DAY + 1], [1, 1])
    assert future_records(recs, AS_OF_DAY) == 1
    assert build_features(spec, recs, 1, AS_OF_DAY)[0, v] == 1
    assert build_features(spec, recs, 1, AS_OF_DAY + 1)[0, v] == pytest.approx(1 + (1 - 1 / 365))  # linear decay
    assert future_records(recs, AS_OF_DAY + 1) == 0


def test_bad_records_are_named(spec):
    v = spec.variable_index("tax_arrears")
    with pytest.raises(ValueError, match=r"records\[0\].value: nan"):
        build_features(spec, Records.from_arrays([0], [v], [AS_OF_DAY], [np.nan]), 1, AS_OF_DAY)
    with pytest.raises(ValueError, match=r"records.citizen: indices must lie in \[0, 1\)"):
        build_features(spec, Records.from_arrays([3], [v], [AS_OF_DAY], [1]), 1, AS_OF_DAY)


def test_the_city_is_deterministic_and_both_paths_agree(spec):
    a = generate_city(spec, 3000, seed=5, chunk_size=1000)
    b = generate_city(spec, 3000, seed=5, chunk_size=1000)
    np.testing.assert_array_equal(a.records.citizen, b.records.citizen)
    np.testing.assert_array_equal(a.records.value, b.records.value)
    people, feats = generate_features(spec, 3000, seed=5, chunk_size=1000)
    np.testing.assert_array_equal(people.age, a.people.age)
    np.testing.assert_array_equal(feats, build_features(spec, a.records, 3000, a.as_of_day))
    c = generate_city(spec, 3000, seed=6, chunk_size=1000)
    assert not np.array_equal(c.people.age, a.people.age)


def test_the_city_has_realistic_shapes(spec):
    city = generate_city(spec, 50_000, seed=1)
    p = city.people
    assert 0.12 < np.mean(p.age < 18) < 0.20, "minors"
    adults = p.age >= 18
    assert 0.05 < np.mean(p.commuter[adults]) < 0.2 and 0.3 < np.mean(p.hukou_local[adults]) < 0.7
    assert len(city.records) > 3 * len(p)
    per_person = np.bincount(city.records.citizen, minlength=len(p))
    assert per_person.max() > 5 * per_person.mean(), "skewed counts"
    serious = np.isin(city.records.variable, [spec.variable_index("court_listed_dishonest_debtor")])
    assert 0 < len(np.unique(city.records.citizen[serious])) < 0.02 * adults.sum(), "rare serious records"
    assert (city.records.day <= city.as_of_day).all()
    assert not (np.isin(city.records.citizen, np.flatnonzero(p.age < 18))).any(), "no records for minors"


def test_protected_attributes_never_reach_the_model(spec):
    for var in spec.variables:
        words = set(var.name.split("_")) | set(var.source.split("_"))
        assert not words & PROTECTED_WORDS, var.name


def test_a_new_dishonesty_variable_is_a_spec_change_only(city):
    """The seed: evading military service and bribery records will be added over time."""
    with open(DEFAULT_SPEC_PATH, "rb") as fh:
        doc = copy.deepcopy(tomllib.load(fh))
    doc["variables"].append({
        "name": "military_service_evasion", "dimension": "law_abiding", "source": "military_service_bureau",
        "direction": "negative", "tier": "serious", "aggregate": "count", "lifetime_days": 1095, "decay": "none",
        "hard_rule": True,  # serious dishonesty: the spec refuses a serious record without it
        "points": {"kind": "bins", "edges": [0.5], "points": [0.0, -150.0]},
        "reason": {"code": "LA07", "zh": "有逃避兵役记录", "en": "Evaded military service",
                   "improve_zh": "依法履行兵役义务", "improve_en": "Fulfil military service obligations"},
    })
    spec2 = parse_spec(doc)
    people, features = city
    feats = np.zeros((2, len(spec2.variables)), np.float32)
    feats[1, -1] = 1.0
    cols = Scorer(spec2).score(feats, np.ones(2, np.uint8))
    assert cols.raw[1] < cols.raw[0]
    assert cols.reasons[1, 0] == len(spec2.variables) - 1
    assert cols.flags[1] & FLAG_HARD_RULE and not cols.flags[0] & FLAG_HARD_RULE
    assert cols.score[1] <= spec2.hard_rule_cap
