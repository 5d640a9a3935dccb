"""The policy file (config/policy.toml) is validated when it loads and against the model and
the scenarios it serves: partners never get score or audit reads, an operator exception says
why, and every scenario, method and record type it names exists, each record type granted
only to the source the model spec names."""

from __future__ import annotations

import pytest

from kernel.spec import load_spec
from server.auth import DEFAULT_POLICY_PATH, DISCLOSING, PolicyError, check_policy, load_policy
from server.scenarios import load_scenarios

SHIPPED = DEFAULT_POLICY_PATH.read_text()


def _policy(tmp_path, text: str):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return load_policy(path)


def _sources():
    return {v.name: v.source for v in load_spec().variables}


def test_the_shipped_policy_agrees_with_the_model_and_the_scenarios():
    policy = load_policy()
    check_policy(policy, _sources(), load_scenarios())
    granted = {v for c in policy.callers.values() for v in c.variables}
    assert granted == set(_sources()), "every record type has exactly its source"
    readers = {i for i, c in policy.callers.items() if any(c.may_call(m) for m in DISCLOSING)}
    assert readers == {"citizen_app"}, "only the citizen apps read scores or the audit log"


@pytest.mark.parametrize("grant", ['"ScoreService/BatchGetScores"', '"ScoreService/*"', '"AuditService/ListChecks"',
                                   '"AuditService/*"'])
def test_a_partner_granted_a_score_or_audit_read_is_refused(tmp_path, grant):
    text = SHIPPED.replace('methods = ["EligibilityService/Check", "EligibilityService/ListScenarios"]\nscenarios = ["public_rental_deposit_free"]',
                           f'methods = ["EligibilityService/Check", {grant}]\nscenarios = ["public_rental_deposit_free"]')
    assert text != SHIPPED
    with pytest.raises(PolicyError, match=r"policy.toml: callers.housing_office.methods: .* discloses scores or the audit log"):
        _policy(tmp_path, text)


def test_an_operator_role_is_an_exception_that_says_why(tmp_path):
    base = '[callers.appeals_desk]\nrole = "operator"\nmethods = ["ScoreService/GetScore"]\n'
    with pytest.raises(PolicyError, match=r"callers.appeals_desk.description: an operator role is an exception"):
        _policy(tmp_path, base)
    policy = _policy(tmp_path, base + 'description = "the city credit office handles appeals by phone"\n')
    assert policy.caller("appeals_desk").may_call("ScoreService/GetScore")


@pytest.mark.parametrize("text, message", [
    ('[callers.x]\nmethods = ["EligibilityService/Check"]\n', r"callers.x.role: expected one of .*, got None"),
    ('[callers.x]\nrole = "admin"\nmethods = []\n', r"callers.x.role: expected one of"),
    ('[callers.x]\nrole = "partner"\nmethods = ["EligibilityService/Chek"]\n',
     r"callers.x.methods: 'EligibilityService/Chek' is not a method of the contract"),
    ('[callers.x]\nrole = "partner"\nmethods = ["Nope/*"]\n', r"callers.x.methods: 'Nope/\*' is not a method"),
])
def test_roles_and_methods_are_checked_at_load(tmp_path, text, message):
    with pytest.raises(PolicyError, match=message):
        _policy(tmp_path, text)


def test_a_record_type_granted_to_another_source_is_refused(tmp_path):
    """The attack: the citizen-card company could write blacklist entries, a hard-rule record
    whose source is the public credit platform."""
    text = SHIPPED.replace('variables = ["residence_years", "identity_verified",',
                           'variables = ["blacklist_entries", "residence_years", "identity_verified",')
    assert text != SHIPPED
    with pytest.raises(PolicyError, match=r"callers.citizen_card_company.variables: 'blacklist_entries' comes from "
                                          r"source 'public_credit_platform' in the model spec, not from 'citizen_card_company'"):
        check_policy(_policy(tmp_path, text), _sources(), load_scenarios())


@pytest.mark.parametrize("old, new, message", [
    ('scenarios = ["metro_pay_later"]', 'scenarios = ["moon_pay_later"]', r"callers.metro_gateway.scenarios: 'moon_pay_later' is not a configured scenario"),
    ('variables = ["tax_arrears"]', 'variables = ["tax_arears"]', r"callers.tax_bureau.variables: 'tax_arears' is not a variable of the model"),
])
def test_unknown_scenarios_and_variables_are_refused(tmp_path, old, new, message):
    text = SHIPPED.replace(old, new, 1)
    assert text != SHIPPED
    with pytest.raises(PolicyError, match=message):
        check_policy(_policy(tmp_path, text), _sources(), load_scenarios())


def test_the_server_refuses_to_start_on_a_policy_that_disagrees_with_the_model(tmp_path):
    from server.app import Runtime, ServerConfig

    bad = tmp_path / "policy.toml"
    bad.write_text(SHIPPED.replace('variables = ["volunteer_hours"]', 'variables = ["volunteer_hours", "honours"]'))
    with pytest.raises(PolicyError, match=r"policy.toml: callers.volunteer_platform.variables: 'honours' comes from source 'civil_affairs'"):
        Runtime.prepare(ServerConfig(data_dir=tmp_path / "data", seed_citizens=10, policy_path=bad, metrics_port=0, port=0))


def test_a_record_type_no_caller_may_write_is_refused(tmp_path):
    """The other direction: the spec names a source the policy does not let write it (a record
    type nobody can send, so its citizens could never be corrected or repaired)."""
    text = SHIPPED.replace('variables = ["tax_arrears"]', "variables = []", 1)
    assert text != SHIPPED
    with pytest.raises(PolicyError, match=r"policy.toml: the model's variable 'tax_arrears' comes from source 'tax_bureau', "
                                          r"which the policy does not let write it: add 'tax_arrears' to callers.tax_bureau.variables"):
        check_policy(_policy(tmp_path, text), _sources(), load_scenarios())
    gone = text.replace("[callers.tax_bureau]", "[callers.tax_office]", 1)
    with pytest.raises(PolicyError, match=r"'tax_arrears' comes from source 'tax_bureau'.*there is no \[callers.tax_bureau\]"):
        check_policy(_policy(tmp_path, gone), _sources(), load_scenarios())
