"""The fairness audit (kernel/fairness.py, `qjscore fairness`), the release gate it feeds
(`qjscore model stage` / `model activate --reason`), the synthetic city's protected
attributes, and thin files: a new adult with no record is not denied everything."""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from kernel.calibration import reference_table
from kernel.fairness import (
    FOUR_FIFTHS, PROXY_AUC_FLAG, approvals, audit, audit_city, group_rates, load_report, one_variable_auc,
)
from kernel.score import Scorer
from kernel.spec import DEFAULT_SPEC_PATH, V1_SPEC_PATH, load_spec
from kernel.synthetic import AUDIT_AGE_BANDS, PROTECTED, age_band, generate_city, generate_features, protected_attributes
from server.scenarios import load_scenarios

#: A smaller city than the command's default (400,000) keeps the tests quick; its groups
#: still hold thousands of adults (the smallest, ethnic minorities, about 700).
CITY, SEED = 40_000, 11


@pytest.fixture(scope="module")
def scenarios():
    return load_scenarios()


@pytest.fixture(scope="module")
def reports(scenarios):
    """The audits of version 1 and version 2, each with its shipped reference calibration."""
    out = {}
    for path in (V1_SPEC_PATH, DEFAULT_SPEC_PATH):
        spec = load_spec(path)
        out[spec.version] = audit_city(spec, reference_table(spec, path), scenarios, CITY, SEED)
    return out


# --- the synthetic city's protected attributes ---------------------------------------------------


def test_protected_attributes_are_audit_only_and_leave_the_city_unchanged():
    spec = load_spec()
    city = generate_city(spec, 5_000, seed=3, chunk_size=1_500)
    people, features = generate_features(spec, 5_000, seed=3, chunk_size=1_500)
    attrs = protected_attributes(city.people)
    assert list(attrs) == list(PROTECTED) == ["sex", "ethnicity", "hukou", "age_band", "district", "commuter"]
    for name, codes in attrs.items():
        assert np.array_equal(codes, protected_attributes(people)[name]), name  # both paths draw the same people
        adult = city.people.age >= 18
        assert set(np.unique(codes[adult])) <= set(range(len(PROTECTED[name]))), name
    band = attrs["age_band"]
    for k, (_, lo, hi) in enumerate(AUDIT_AGE_BANDS):
        ages = city.people.age[band == k]
        assert ages.min() >= lo and (hi is None or ages.max() <= hi)
    assert (band[city.people.age < 18] == -1).all()
    assert age_band(np.array([18, 24, 25, 34, 35, 59, 60])).tolist() == [0, 0, 1, 1, 2, 2, 3]
    # never a model input: no variable of either model is named after one
    for path in (V1_SPEC_PATH, DEFAULT_SPEC_PATH):
        names = " ".join(load_spec(path).variable_names)
        for word in ("sex", "ethnic", "hukou", "district", "commuter", "age"):
            assert word not in names


def test_behaviour_is_independent_of_the_protected_attributes_by_construction():
    """Groups that differ only in a protected attribute behave alike: the counts of negative
    records and the volunteering hours of women and men, Han and minorities, local and
    non-local hukou have the same means (within sampling error)."""
    spec = load_spec()
    people, features = generate_features(spec, 200_000, seed=SEED)
    adult = people.adult == 1
    attrs = protected_attributes(people)
    negative = np.array([v.direction == "negative" for v in spec.variables])
    behaviour = {"negative records": features[:, negative].sum(axis=1),
                 "volunteer hours": features[:, spec.variable_index("volunteer_hours")]}
    for attr in ("sex", "ethnicity", "hukou", "district"):
        g = attrs[attr][adult]
        for what, x in behaviour.items():
            x = x[adult].astype(np.float64)
            means = [x[g == k].mean() for k in range(len(PROTECTED[attr]))]
            sems = [x[g == k].std() / np.sqrt((g == k).sum()) for k in range(len(PROTECTED[attr]))]
            assert max(means) - min(means) < 5 * max(sems) + 1e-9, (attr, what, means)


# --- the measures against independent computations ----------------------------------------------


def test_four_fifths_ratios_match_an_independent_computation():
    """fairlearn on counts (kernel/fairness.py) = plain numpy on rows = fairlearn on rows."""
    from fairlearn.metrics import MetricFrame, demographic_parity_ratio, selection_rate

    rng = np.random.default_rng(5)
    for n_groups, n in ((2, 3_000), (4, 5_000), (10, 8_000)):
        group = rng.integers(0, n_groups, n)
        p = rng.uniform(0.2, 0.9, n_groups)[group]
        approved = rng.random(n) < p
        rates, ratio = group_rates(approved, group, n_groups)
        expected = np.array([approved[group == k].mean() for k in range(n_groups)])
        np.testing.assert_allclose(rates, expected, rtol=1e-12)
        assert ratio == pytest.approx(expected.min() / expected.max(), rel=1e-12)
        frame = MetricFrame(metrics=selection_rate, y_true=approved, y_pred=approved, sensitive_features=group)
        np.testing.assert_allclose(frame.by_group.sort_index().to_numpy(), expected, rtol=1e-12)
        assert demographic_parity_ratio(approved, approved, sensitive_features=group) == pytest.approx(ratio, rel=1e-12)
    # a group nobody approves: ratio 0; a group with nobody in it: NaN, and it takes no part
    rates, ratio = group_rates(np.array([True, False, False]), np.array([0, 1, 1]), 3)
    assert rates[:2].tolist() == [1.0, 0.0] and np.isnan(rates[2]) and ratio == 0.0


def test_one_variable_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(9)
    n = 4_000
    group = rng.integers(0, 4, n)
    values = np.round(rng.normal(group * 0.3, 1.0), 1)  # ties on purpose
    auc = one_variable_auc(values, group, 5)
    for k in range(4):
        assert auc[k] == pytest.approx(roc_auc_score(group == k, values), abs=1e-12)
    assert np.isnan(auc[4])  # an empty group
    assert one_variable_auc(np.zeros(10), np.arange(10) % 2, 2).tolist() == [0.5, 0.5]


def test_approvals_are_the_servers_rule(scenarios):
    """Each scenario's decision is the compiled Check's: ALLOW at or above the threshold,
    and a hard-rule record denies the pay-later scenarios whatever the score."""
    rng = np.random.default_rng(2)
    score = rng.integers(450, 800, 20_000).astype(np.int16)
    flags = (rng.random(20_000) < 0.05).astype(np.uint8)  # FLAG_HARD_RULE
    got = approvals(score, flags, scenarios)
    assert list(got) == list(scenarios)
    for name, s in scenarios.items():
        expected = (score >= s.min_score) & ~(s.pay_later & (flags == 1))
        assert np.array_equal(got[name], expected), name


# --- the synthetic city: version 1 fails, version 2 passes -------------------------------------------


def test_version_1_fails_the_four_fifths_rule_as_the_issue_measured(reports):
    v1 = reports[1]
    assert not v1.passed
    failing = {(a, s) for a, s, _ in v1.failures()}
    assert ("age_band", "public_rental_deposit_free") in failing
    young, _, middle, old = v1.approval["age_band"]["public_rental_deposit_free"]
    assert young < 0.5 * middle and old < 0.5 * middle  # about 33 % and 30 % against 73 %
    assert v1.ratio["age_band"]["public_rental_deposit_free"] < 0.5
    # the tenure variables are flagged proxies of age and of commuting
    flagged = {(v, a) for v, a, _, _ in v1.flagged_proxies()}
    assert {("social_insurance_months", "age_band"), ("residence_years", "commuter")} <= flagged
    # the ratio is min over max of the rates the report shows
    for attr, by in v1.approval.items():
        for scen, rates in by.items():
            assert v1.ratio[attr][scen] == pytest.approx(min(rates) / max(rates))


def test_version_2_passes_every_group_and_scenario(reports):
    v2 = reports[2]
    assert v2.passed and v2.min_ratio >= FOUR_FIFTHS, v2.failures()
    assert set(v2.ratio) == set(PROTECTED) and all(set(by) == set(v2.scenarios) for by in v2.ratio.values())
    means = [m for by in v2.mean_score.values() for m in by]
    assert max(means) - min(means) < 10  # no group's mean is more than a few points off
    assert not any(v == "residence_years" for v, *_ in v2.flagged_proxies())
    for attr, shares in v2.level_shares.items():
        for k, row in enumerate(shares):
            assert sum(row) == pytest.approx(1.0) and v2.counts[attr][k] > 0


def test_version_2_keeps_the_seed_bands_and_meaningful_reasons():
    """On the reference population: mean about 660, 1-4 % below 550, 2-8 % at 750 or above;
    and the reasons name behaviours (no tenure variable is any adult's first reason)."""
    spec = load_spec(DEFAULT_SPEC_PATH)
    people, features = generate_features(spec, 200_000, seed=2018)
    cols = Scorer(spec, reference_table(spec)).score(features, people.adult, n_threads=2)
    score = cols.score[people.adult == 1]
    assert 650 <= score.mean() <= 670
    assert 0.01 <= (score < 550).mean() <= 0.04 and 0.02 <= (score >= 750).mean() <= 0.08
    first = cols.reasons[people.adult == 1][:, 0]
    codes = {spec.variables[i].reason.code for i in np.unique(first[first >= 0])}
    assert "PS01" in codes and not codes & {"ID01", "CC05"}  # residence, credit-history length


# --- thin files: a brand-new adult ---------------------------------------------------------------


def test_a_new_adult_with_no_record_clears_the_lowest_thresholds(scenarios):
    lowest = min(s.min_score for s in scenarios.values())
    got = {}
    for path in (V1_SPEC_PATH, DEFAULT_SPEC_PATH):
        spec = load_spec(path)
        nobody = np.zeros((1, len(spec.variables)), np.float32)
        got[spec.version] = int(Scorer(spec, reference_table(spec, path)).score(nobody, np.ones(1, np.uint8)).score[0])
    assert got[1] < lowest <= got[2] < 600  # v1: below every threshold; v2: "fair" (信用一般)


def test_a_new_adult_through_the_real_server_is_not_denied_everything(served, scenarios):
    from qianjiang.v1 import eligibility_pb2
    from server.state import iso_of, today

    now = dt.date.fromisoformat(iso_of(today()))
    birth = dt.date(now.year - 18, now.month, min(now.day, 28)) - dt.timedelta(days=30)
    qj, card = served.client, bytes.fromhex("7e" * 16)
    qj.upsert_citizen("newcomer-1", birth.isoformat())
    qj.register_card("newcomer-1", card)
    qj.grant_consent("newcomer-1")
    score = qj.get_score("newcomer-1")
    assert score.score >= min(s.min_score for s in scenarios.values())
    outcomes = {name: qj.check(name, card).outcome for name in scenarios}
    allowed = {name for name, o in outcomes.items() if o == eligibility_pb2.ALLOW}
    assert allowed == {name for name, s in scenarios.items() if score.score >= s.min_score}
    assert allowed and {name for name, s in scenarios.items() if s.min_score == 550} <= allowed
    assert set(outcomes.values()) <= {eligibility_pb2.ALLOW, eligibility_pb2.DENY_BELOW_THRESHOLD}


# --- the report's files and the command -------------------------------------------------------------


def test_the_report_writes_a_png_an_html_page_and_json(reports, tmp_path):
    v1 = reports[1]
    paths = v1.write(tmp_path / "out")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths["html"].read_text()
    assert "data:image/png;base64," in page and "public_rental_deposit_free" in page and "Proxy check" in page
    assert page.count("<table>") == 2 + len(PROTECTED) and "FAIL" in page
    again = load_report(tmp_path / "out")
    assert again.to_dict() == json.loads(json.dumps(v1.to_dict())) and again.min_ratio == v1.min_ratio
    assert "age_band x public_rental_deposit_free" in v1.format()


def _qjscore(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "clients.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_fairness_command(tmp_path):
    out = _qjscore("fairness", "--model", str(V1_SPEC_PATH), "--citizens", str(CITY), "--out", str(tmp_path / "v1"))
    assert out.returncode == 1, out.stderr
    assert "FAIL age_band x public_rental_deposit_free" in out.stdout and "reference calibration" in out.stdout
    assert (tmp_path / "v1" / "fairness.png").exists() and (tmp_path / "v1" / "fairness.html").exists()
    out = _qjscore("fairness", "--citizens", str(CITY), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["model_version"] == load_spec().model_version and min(
        r for by in doc["ratio"].values() for r in by.values()) >= FOUR_FIFTHS
    assert doc["proxy_threshold"] == PROXY_AUC_FLAG and doc["citizens"] == CITY and doc["seed"] == SEED


# --- releases gated by the audit, through the real command ------------------------------------------


@pytest.fixture
def data_dir(tmp_path):
    from server.app import seed_store
    from server.keys import load_keys
    from server.store import open_store

    d = tmp_path / "data"
    d.mkdir()
    store = open_store(f"sqlite:///{d}/qianjiang.db")
    try:
        seed_store(store, load_spec(), 1500, 5, load_keys(d))
    finally:
        store.close()
    return d


def test_stage_stores_the_audit_and_activate_needs_a_reason_to_fail_it(data_dir):
    from server.models import ModelRegistry

    d = ["--data-dir", str(data_dir), "--fairness-citizens", str(CITY)]
    out = _qjscore("model", "stage", str(V1_SPEC_PATH), *d, "--json")
    assert out.returncode == 0, out.stderr
    staged = json.loads(out.stdout)
    v1 = staged["release_id"]
    assert staged["fairness"]["passed"] is False and staged["fairness"]["min_ratio"] < FOUR_FIFTHS
    registry = ModelRegistry(data_dir)
    for name in ("fairness.json", "fairness.png", "fairness.html"):
        assert (registry.path(v1) / name).exists(), name
    assert registry.info(v1)["fairness"] == staged["fairness"]
    assert registry.fairness(v1).ratio["age_band"]["public_rental_deposit_free"] < 0.5

    out = _qjscore("model", "activate", v1, *d)
    assert out.returncode == 2 and "fails the four-fifths rule" in out.stderr, out.stderr
    assert "age_band x public_rental_deposit_free" in out.stderr and "--reason" in out.stderr
    assert registry.active() is None and registry.history() == []

    why = "v1 reinstated while the rental thresholds are reviewed (ticket 17)"
    out = _qjscore("model", "activate", v1, *d, "--reason", why)
    assert out.returncode == 0 and f"activated {v1}" in out.stdout, out.stderr
    (entry,) = registry.history()
    assert (entry["action"], entry["active"], entry["reason"]) == ("activate", v1, why)
    assert entry["by"] == (os.environ.get("SUDO_USER") or getpass.getuser())
    assert entry["fairness"]["passed"] is False and entry["fairness"]["min_ratio"] == staged["fairness"]["min_ratio"]

    # the default model passes: no reason needed, and the stage says so
    out = _qjscore("model", "stage", str(DEFAULT_SPEC_PATH), *d)
    assert out.returncode == 0 and "all >= 0.8" in out.stdout and "PSI raw" in out.stdout, out.stderr
    v2 = next(r for r in registry.releases() if r != v1)
    out = _qjscore("model", "activate", v2, *d)
    assert out.returncode == 0 and f"activated {v2}" in out.stdout, out.stderr
    last = registry.history(1)[0]
    assert (last["active"], last["previous"], last["reason"], last["fairness"]["passed"]) == (v2, v1, None, True)
    # restoring is the way back, never gated
    out = _qjscore("model", "restore", "--data-dir", str(data_dir))
    assert out.returncode == 0 and registry.active() == v1, out.stderr
    assert registry.history(1)[0]["action"] == "restore"


def test_a_release_without_an_audit_is_audited_when_activated(data_dir, tmp_path):
    from server.models import FairnessGateError, ModelRegistry, score_population
    from server.store import open_store

    registry = ModelRegistry(data_dir, audit_citizens=CITY)
    spec = load_spec(V1_SPEC_PATH)
    store = open_store(f"sqlite:///{data_dir}/qianjiang.db")
    try:
        table = score_population(store, spec).calibration
    finally:
        store.close()
    other = ModelRegistry(tmp_path / "elsewhere")
    rid = other.bootstrap(spec, table, V1_SPEC_PATH)  # registered at a first start: no audit
    assert other.fairness(rid) is None
    registry.bootstrap(load_spec(), reference_table(load_spec()))
    import shutil

    shutil.copytree(other.path(rid), registry.path(rid))
    with pytest.raises(FairnessGateError, match="fails the four-fifths rule"):
        registry.activate(rid)
    assert registry.fairness(rid) is not None and not registry.fairness(rid).passed  # kept with the release
    assert registry.info(rid)["fairness"]["passed"] is False
    assert registry.activate(rid, reason="audited at activation") is not None
    assert registry.active() == rid and registry.history(1)[0]["reason"] == "audited at activation"
