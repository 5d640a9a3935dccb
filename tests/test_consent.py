"""Consent by purpose (server/consent.py): each scenario and read purpose granted or revoked
alone, grants with an expiry, the blanket authorisation clearing them; the store's history
answers an appeal's replay for the decision's own purpose; through the real client against a
real server, on SQLite and PostgreSQL for the store."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from conftest import Served, with_citizens
from server.consent import ConsentPurposes, effective
from server.state import iso_of

SCENARIOS = ["metro_pay_later", "campus_fitness", "library_deposit_free"]
READS = ["citizen_app_view", "appeal_review", "unspecified"]


# --- the rule ---------------------------------------------------------------------------------


def test_the_exceptions_rule_row_by_row_and_in_bulk():
    cp = ConsentPurposes(SCENARIOS, READS)
    today = 20_000
    cases = [  # blanket, settings, authorised purposes
        (1, [], set(SCENARIOS + READS)),
        (1, [("metro_pay_later", 0, None)], set(SCENARIOS + READS) - {"metro_pay_later"}),
        (0, [("metro_pay_later", 1, today)], {"metro_pay_later"}),  # its last day: still holds
        (0, [("metro_pay_later", 1, today - 1)], set()),  # expired: the blanket (none) answers
        (1, [("metro_pay_later", 1, today - 1)], set(SCENARIOS + READS)),  # expired, the blanket stands
        (0, [("campus_fitness", 1, None), ("citizen_app_view", 1, None), ("gone_scenario", 1, None)],
         {"campus_fitness", "citizen_app_view"}),
    ]
    blanket = np.array([c[0] for c in cases], np.uint8)
    rows, names, granted, expires = [], [], [], []
    for row, (b, settings, want) in enumerate(cases):
        mask = cp.exceptions(b, settings, today)
        assert {n for n in cp.names if effective(b, mask, cp.bit(n))} == want, (b, settings)
        for name, g, e in settings:
            rows.append(row), names.append(name), granted.append(g), expires.append(-1 if e is None else e)
    bulk = cp.exceptions_bulk(blanket, np.array(rows), names, np.array(granted), np.array(expires), today)
    assert [int(m) for m in bulk] == [cp.exceptions(c[0], c[1], today) for c in cases]
    with pytest.raises(ValueError, match="both a scenario and a read purpose"):
        ConsentPurposes(["x"], ["x"])
    with pytest.raises(ValueError, match="at most 16 scenarios"):
        ConsentPurposes([f"s{i}" for i in range(17)], [])


# --- the store ----------------------------------------------------------------------------


def test_the_store_keeps_purpose_settings_and_their_history(store):
    with_citizens(store, 2)
    store.set_consent("c-0", True)
    p_blanket = store.last_position()
    store.set_purpose_consent("c-0", ["metro_pay_later"], False)
    p_revoked = store.last_position()
    store.set_purpose_consent("c-0", ["campus_fitness", "citizen_app_view"], True, 20_010)
    assert store.purpose_consents(0) == [(0, "campus_fitness", 1, 20_010), (0, "citizen_app_view", 1, 20_010),
                                        (0, "metro_pay_later", 0, None)]
    assert store.consent_at(0, p_revoked, "campus_fitness", 20_000)  # the blanket
    assert not store.consent_at(0, p_revoked, "metro_pay_later", 20_000)
    assert store.consent_at(0, p_blanket, "metro_pay_later", 20_000)  # before the revocation
    assert store.consent_at(0, p_revoked)  # the blanket itself stands
    assert store.consent_rows_expiring(20_010, 20_010) == [0] and store.consent_rows_expiring(20_011, 20_020) == []
    # the blanket's revocation clears every setting, and its grant too
    store.set_consent("c-0", False)
    p_off = store.last_position()
    assert store.purpose_consents(0) == []
    assert not store.consent_at(0, p_off, "campus_fitness", 20_000)
    assert store.consent_at(0, p_revoked, "campus_fitness", 20_000)  # history: as it stood then
    # without the blanket, a grant holds to its last day, then not
    store.set_purpose_consent("c-1", ["library_deposit_free"], True, 20_005)
    p = store.last_position()
    assert store.consent_at(1, p, "library_deposit_free", 20_005)
    assert not store.consent_at(1, p, "library_deposit_free", 20_006)
    assert not store.consent_at(1, p, "metro_pay_later", 20_000)
    assert store.purpose_consents() == [(1, "library_deposit_free", 1, 20_005)]


# --- the service ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    s = Served(tmp_path_factory, n_citizens=600, seed=23)
    yield s
    s.stop()


def _people(city, n):
    st = city.runtime.state
    m = st.n_citizens
    ok = np.flatnonzero((st.consent[:m] == 1) & (st.adult[:m] == 1) & (st.columns.flags[:m] == 0)
                        & (st.defaults[:m] == 0) & (st.columns.score[:m] >= 600))
    taken = _people.taken
    rows = [int(r) for r in ok if int(r) not in taken][:n]
    taken.update(rows)
    return rows


_people.taken = set()


def _code(fn, *args, **kw):
    with pytest.raises(grpc.RpcError) as err:
        fn(*args, **kw)
    return err.value.code(), err.value.details(), str(err.value.trailing_metadata())


def test_revoking_one_scenario_leaves_the_others(city):
    (row,) = _people(city, 1)
    cid, card = city.citizen(row), city.token(row)
    c = city.client
    assert c.check("metro_pay_later", card).outcome == 1
    state = c.revoke_consent(cid, ["metro_pay_later"])
    by = {p.purpose: p for p in state.purposes}
    assert state.granted and not by["metro_pay_later"].authorised and by["metro_pay_later"].setting == "revoked"
    assert by["campus_fitness"].authorised and by["campus_fitness"].setting == ""
    assert c.check("metro_pay_later", card).outcome == 6  # NOT_AUTHORISED
    assert c.check("campus_fitness", card).outcome == 1
    assert c.check_batch("metro_pay_later", card * 2).outcome(1) == 6
    assert c.get_score(cid, purpose="citizen_app_view").score > 0
    assert c.get_consent(cid) == state
    c.grant_consent(cid, ["metro_pay_later"])
    assert c.check("metro_pay_later", card).outcome == 1


def test_a_read_purpose_is_consented_to_like_a_scenario(city):
    (row,) = _people(city, 1)
    cid = city.citizen(row)
    c = city.client
    c.revoke_consent(cid, ["citizen_app_view"])
    code, _, details = _code(c.get_score, cid, purpose="citizen_app_view")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "NOT_AUTHORISED" in details
    assert c.get_score(cid, purpose="appeal_review").score > 0
    assert c.check("campus_fitness", city.token(row)).outcome == 1


def test_only_what_was_granted_without_the_blanket_and_grants_expire(tmp_path_factory):
    """A citizen who withdrew everything and then allowed only the metro, until a day: the
    metro says yes, everything else NOT_AUTHORISED; at the city's midnight after that day,
    the metro too."""
    own = Served(tmp_path_factory, n_citizens=300, seed=29)
    try:
        st = own.runtime.state
        row = int(np.flatnonzero((st.consent[:300] == 1) & (st.adult[:300] == 1) & (st.columns.flags[:300] == 0)
                                 & (st.defaults[:300] == 0) & (st.columns.score[:300] >= 600))[0])
        cid, card, c = own.citizen(row), own.token(row), own.client
        today = st.as_of_day
        c.revoke_consent(cid)
        state = c.grant_consent(cid, ["metro_pay_later"], expires=iso_of(today))
        by = {p.purpose: p for p in state.purposes}
        assert not state.granted and by["metro_pay_later"].expires == iso_of(today)
        assert c.check("metro_pay_later", card).outcome == 1
        assert c.check("campus_fitness", card).outcome == 6
        assert _code(c.get_score, cid, purpose="citizen_app_view")[0] == grpc.StatusCode.FAILED_PRECONDITION
        before = c.check("metro_pay_later", card)
        assert own.runtime.refresh_if_new_day(day=today + 1)  # the city's next midnight
        assert c.check("metro_pay_later", card).outcome == 6
        assert not {p.purpose: p for p in c.get_consent(cid).purposes}["metro_pay_later"].authorised
        # an appeal of the decision made while the grant held still finds it held
        own.node.audit.flush()
        replay = c.replay_decision(before.decision_id)
        assert replay.matches and replay.replayed_result == "ALLOW"
    finally:
        own.stop()


def test_an_appeal_replays_the_consent_of_the_decisions_own_purpose(city):
    (row,) = _people(city, 1)
    cid, card, c = city.citizen(row), city.token(row), city.client
    c.revoke_consent(cid, ["metro_pay_later"])
    refused = c.check("metro_pay_later", card)
    allowed = c.check("campus_fitness", card)
    c.revoke_consent(cid)  # and then everything: the replays still see the past
    city.node.audit.flush()
    assert (c.replay_decision(refused.decision_id).replayed_result, c.replay_decision(refused.decision_id).matches) == (
        "NOT_AUTHORISED", True)
    assert c.replay_decision(allowed.decision_id).matches
    c.grant_consent(cid)


def test_a_restart_reads_the_settings_back(city):
    (row,) = _people(city, 1)
    c = city.client
    c.revoke_consent(city.citizen(row), ["library_deposit_free", "appeal_review"])
    st = city.runtime.state
    n = st.n_citizens
    held = st.consent_except[:n].copy()
    assert held[row] != 0
    store = city.runtime.open_store()
    try:
        st.consent_except[:n] = 0
        assert st.load_consent_settings(store, n) >= 1
    finally:
        store.close()
    assert (st.consent_except[:n] == held).all()


@pytest.mark.parametrize("call, field", [
    (lambda c, cid: c.grant_consent(cid, ["no_such_purpose"]), "purposes[0]"),
    (lambda c, cid: c.grant_consent(cid, ["metro_pay_later", "unspecified"]), "purposes[1]"),
    (lambda c, cid: c.revoke_consent(cid, [""]), "purposes[0]"),
    (lambda c, cid: c.grant_consent(cid, ["metro_pay_later"], expires="2020-01-01"), "expires"),
    (lambda c, cid: c.grant_consent(cid, ["metro_pay_later"], expires="2099-01-01"), "expires"),
    (lambda c, cid: c.grant_consent(cid, [], expires="2027-06-30"), "expires"),
    (lambda c, cid: c.grant_consent(cid, ["metro_pay_later"], expires="30 June"), "expires"),
    (lambda c, cid: c.grant_consent(cid, ["metro_pay_later"] * 40), "purposes"),
])
def test_bad_consent_requests_name_the_field(city, call, field):
    from qianjiang.v1 import records_pb2

    (row,) = _people(city, 1)
    cid = city.citizen(row)
    code, details, _ = _code(call, city.client, cid)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(f"{field}:"), details
    code, details, _ = _code(lambda: city.client.records.RevokeConsent(
        records_pb2.ConsentRequest(citizen_id=cid, purposes=["metro_pay_later"], expires="2027-01-01"), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "does not expire" in details
    assert city.client.get_consent(cid).granted  # nothing changed


def test_the_command_line_consent(city):
    from tests.test_cli import qj, refused

    (row,) = _people(city, 1)
    cid = city.citizen(row)
    out = qj("consent", "revoke", cid, "--purpose", "metro_pay_later", "--target", city.target)
    assert out.returncode == 0, out.stderr
    shown = qj("consent", "show", cid, "--target", city.target).stdout
    line = next(l for l in shown.splitlines() if l.startswith("metro_pay_later"))
    assert "no" in line and "revoked" in line
    refused(qj("consent", "revoke", cid, "--until", "2027-01-01", "--target", city.target), "only a grant expires")
    refused(qj("consent", "grant", cid, "--purpose", "nope", "--target", city.target), "purposes[0]")
