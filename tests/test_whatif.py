"""SimulateScore through the real client against the real server: the what-if score equals,
field for field, the score after the change is really made; the next-level search's actions
really reach the next level; nothing is stored; bad changes are INVALID_ARGUMENT naming
them (server/whatif.py)."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from clients.client import Record, added, repaired, variable_repaired
from kernel.features import Records, record_weights
from kernel.spec import TIER_REPAIR_AFTER_DAYS, load_spec
from qianjiang.v1 import common_pb2
from server.state import iso_of
from conftest import Served

@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """A city served with the default model, which marks its actionable variables."""
    s = Served(tmp_path_factory, n_citizens=2000, seed=7)
    s.spec = load_spec()
    assert any(v.actionable and v.direction == "positive" for v in s.spec.variables)
    assert any(v.actionable and v.direction == "negative" for v in s.spec.variables)
    yield s
    s.stop()


def _rows(sim, n, pick=None):
    st = sim.runtime.state
    count = st.n_citizens
    ok = (st.consent[:count] == 1) & (st.adult[:count] == 1)
    rows = [int(r) for r in np.flatnonzero(ok)]
    return [r for r in rows if pick is None or pick(r)][:n]


def _active(sim, row):
    store = sim.runtime.open_store()
    try:
        return store.active_records(citizen_row=row)
    finally:
        store.close()


def _same(a, b):
    """Two Score messages agree on everything the model computes."""
    assert (a.score, a.level, a.percentile, a.raw_points) == (b.score, b.level, b.percentile, b.raw_points)
    assert [d.points for d in a.dimensions] == [d.points for d in b.dimensions]
    assert [(r.code, r.points_lost) for r in a.reasons] == [(r.code, r.points_lost) for r in b.reasons]
    assert a.hard_rule_applied == b.hard_rule_applied
    assert (a.model_version, a.calibration_version) == (b.model_version, b.calibration_version)


def _today(sim) -> str:
    return iso_of(sim.runtime.state.as_of_day)


def test_no_change_is_the_served_score_and_nothing_is_stored(sim):
    row = _rows(sim, 1)[0]
    cid = sim.citizen(row)
    before = sim.client.get_score(cid)
    position = sim.runtime.state.position
    out = sim.client.simulate(cid)
    _same(out.current, before)
    _same(out.simulated, before)
    assert out.delta == 0 and out.current.disclosure_id and not out.simulated.disclosure_id
    assert sim.runtime.state.position == position  # nothing written
    sim.node.audit.flush()
    (entry,) = [e for e in sim.client.list_checks(cid) if e.decision_id == out.current.disclosure_id]
    assert entry.result == "SCORE_SIMULATED"
    replay = sim.client.replay_decision(out.current.disclosure_id)  # the current score, reproduced
    assert (replay.replayed_result, replay.score, replay.matches) == ("SCORE_SIMULATED", before.score, True)


def test_simulated_repair_equals_the_real_repair(sim):
    """The property, over citizens with a record that counts: simulate its repair, repair it
    through the source's WithdrawRecord, and the score is the simulated one exactly."""
    spec = sim.spec
    day = sim.runtime.state.as_of_day
    rng = np.random.default_rng(5)
    done = 0
    for row in _rows(sim, 400):
        active = _active(sim, row)
        negative = [j for j, v in enumerate(active.variable)
                    if v in spec.variable_names and spec.variables[spec.variable_index(v)].direction == "negative"]
        if not negative:
            continue
        j = int(rng.choice(negative))
        rec = Records.from_arrays([0], [spec.variable_index(active.variable[j])], [active.day[j]], [active.value[j]])
        if record_weights(spec, rec, day)[0] == 0:
            continue
        cid, rid = sim.citizen(row), str(active.record_id[j])
        source = spec.variables[spec.variable_index(active.variable[j])].source
        out = sim.client.simulate(cid, [repaired(rid)])
        sim.client.withdraw_record(rid, repaired=True, source=source)
        _same(out.simulated, sim.client.get_score(cid))
        assert out.delta == out.simulated.score - out.current.score >= 0
        done += 1
        if done == 8:
            break
    assert done >= 4


@pytest.mark.parametrize("changes_of", [
    lambda: [added("volunteer_hours", 20.0)],
    lambda: [added("blood_donations", count=2), added("charity_donations")],
    lambda: [added("traffic_violations")],
    lambda: [added("volunteer_hours", 35.0), added("tax_arrears", date="2026-01-05")],
])
def test_simulated_new_records_equal_the_real_ones(sim, changes_of):
    changes = changes_of()
    row = _rows(sim, 1, pick=lambda r: sim.citizen(r) not in _used)[0]
    cid = sim.citizen(row)
    _used.add(cid)
    out = sim.client.simulate(cid, changes)
    records = []
    for k, c in enumerate(changes):
        a = c.add_record
        for i in range(a.count or 1):
            records.append(Record(record_id=f"wi-{cid}-{k}-{i}", citizen_id=cid, variable=a.variable,
                                  date=a.date or _today(sim), value=a.value))
    assert all(ack.status == 1 for ack in sim.client.ingest(records))
    _same(out.simulated, sim.client.get_score(cid))


_used: set[str] = set()


def test_removing_a_whole_variable_is_repairing_each_of_its_records(sim):
    spec = sim.spec
    for row in _rows(sim, 2000, pick=lambda r: sim.citizen(r) not in _used):
        active = _active(sim, row)
        mine = [j for j, v in enumerate(active.variable) if v == "traffic_violations"]
        if len(mine) >= 2:
            break
    else:
        pytest.skip("no citizen with two traffic violations in this city")
    cid = sim.citizen(row)
    _used.add(cid)
    out = sim.client.simulate(cid, [variable_repaired("traffic_violations")])
    for j in mine:
        sim.client.withdraw_record(str(active.record_id[j]), repaired=True, source=spec.variables[spec.variable_index("traffic_violations")].source)
    _same(out.simulated, sim.client.get_score(cid))


def test_the_next_level_actions_really_reach_it(sim):
    """For citizens below the top level: the search's actions, made for real, give exactly
    the score it promised, at or above the next level's lower bound; and sending its changes
    back to SimulateScore gives the same score."""
    spec = sim.spec
    reached = 0
    for row in _rows(sim, 600, pick=lambda r: sim.citizen(r) not in _used):
        cid = sim.citizen(row)
        out = sim.client.simulate(cid, next_level=True)
        nl = out.next_level
        if out.current.level == common_pb2.OUTSTANDING:
            assert not out.HasField("next_level")
            continue
        assert nl.min_score > out.current.score and nl.candidates_tried > 0
        if not nl.reachable:
            assert not nl.actions
            continue
        _used.add(cid)
        assert 1 <= len(nl.actions) <= 3 and nl.score.score >= nl.min_score and nl.score.level == nl.level
        changes = [c for a in nl.actions for c in a.changes]
        again = sim.client.simulate(cid, changes)
        _same(again.simulated, nl.score)
        records = []
        for k, a in enumerate(nl.actions):
            assert a.improve_en
            if a.repair:
                v = spec.variables[spec.variable_index(a.variable)]
                assert v.actionable and v.direction == "negative"
                sim.client.withdraw_record(a.record_id, repaired=True, source=a.source)
            else:
                add = a.changes[0].add_record
                for i in range(add.count or 1):
                    records.append(Record(record_id=f"nl-{cid}-{k}-{i}", citizen_id=cid, variable=add.variable,
                                          date=_today(sim), value=add.value))
        if records:
            sim.client.ingest(records)
        _same(sim.client.get_score(cid), nl.score)
        reached += 1
        if reached == 6:
            break
    assert reached >= 3


def test_fewer_actions_never_reach_the_next_level(sim):
    """Minimality: with one action fewer (any one left out) the score stays below the
    level the search aimed at."""
    checked = 0
    for row in _rows(sim, 600, pick=lambda r: sim.citizen(r) not in _used):
        cid = sim.citizen(row)
        nl = sim.client.simulate(cid, next_level=True).next_level
        if not nl.reachable or len(nl.actions) < 2:
            continue
        for k in range(len(nl.actions)):
            rest = [c for i, a in enumerate(nl.actions) if i != k for c in a.changes]
            assert sim.client.simulate(cid, rest).simulated.score < nl.min_score
        checked += 1
        if checked == 3:
            break
    if not checked:
        pytest.skip("no citizen in this city needs two actions")


def test_a_serious_record_is_not_a_lever_before_its_least_publicity(sim):
    row = _rows(sim, 1, pick=lambda r: sim.citizen(r) not in _used)[0]
    cid = sim.citizen(row)
    _used.add(cid)
    spec = sim.spec
    source = spec.variables[spec.variable_index("court_listed_dishonest_debtor")].source
    sim.client.ingest([Record(record_id=f"wi-serious-{cid}", citizen_id=cid, variable="court_listed_dishonest_debtor",
                              date=_today(sim), value=1.0, source=source)])
    out = sim.client.simulate(cid, next_level=True)
    assert out.current.hard_rule_applied
    assert all(a.record_id != f"wi-serious-{cid}" for a in out.next_level.actions)
    assert TIER_REPAIR_AFTER_DAYS["serious"] == 365
    # the citizen may still ask what its repair would do: the what-if is exact, not a promise
    lifted = sim.client.simulate(cid, [repaired(f"wi-serious-{cid}")])
    assert not lifted.simulated.hard_rule_applied and lifted.simulated.score > out.current.score


@pytest.mark.parametrize("changes, field", [
    ([added("no_such_variable")], "changes[0].add_record.variable"),
    ([added("volunteer_hours", -1.0)], "changes[0].add_record.value"),
    ([added("volunteer_hours", float("nan"))], "changes[0].add_record.value"),
    ([added("volunteer_hours", 1.0, date="2999-01-01")], "changes[0].add_record.date"),
    ([added("volunteer_hours", 1.0, date="yesterday")], "changes[0].add_record.date"),
    ([added("volunteer_hours", 1.0, count=101)], "changes[0].add_record.count"),
    ([added("volunteer_hours"), repaired("no-such-record")], "changes[1].remove_record"),
    ([repaired("")], "changes[0].remove_record.record_id"),
    ([variable_repaired("honours")], "changes[0].remove_variable"),
    ([added("volunteer_hours")] * 51, "changes"),
])
def test_bad_changes_are_invalid_argument_naming_the_change(sim, changes, field):
    from qianjiang.v1 import score_pb2

    cid = sim.citizen(_rows(sim, 1)[0])
    with pytest.raises(grpc.RpcError) as info:
        sim.client.simulate(cid, changes)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        sim.client.simulate(cid, [score_pb2.SimulatedChange()])
    assert "changes[0]" in info.value.details()


def test_anothers_record_cannot_be_simulated_away(sim):
    a, b = _rows(sim, 40)[:2]
    theirs = _active(sim, b)
    if not len(theirs.record_id):
        pytest.skip("the second citizen has no records")
    with pytest.raises(grpc.RpcError) as info:
        sim.client.simulate(sim.citizen(a), [repaired(str(theirs.record_id[0]))])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_precedence_is_get_scores(sim):
    with pytest.raises(grpc.RpcError) as info:
        sim.client.simulate("c-nobody-here")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    st = sim.runtime.state
    n = st.n_citizens
    minor = int(np.flatnonzero((st.adult[:n] == 0) & (st.consent[:n] == 1))[0])
    with pytest.raises(grpc.RpcError) as info:
        sim.client.simulate(sim.citizen(minor), [added("volunteer_hours")])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "UNDER_18" in str(info.value.trailing_metadata())
    cid = sim.citizen(_rows(sim, 1, pick=lambda r: sim.citizen(r) not in _used)[0])
    _used.add(cid)
    sim.client.revoke_consent(cid)
    with pytest.raises(grpc.RpcError) as info:
        sim.client.simulate(cid, [repaired("anything")])
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # before the change is looked at
    sim.client.grant_consent(cid)


def test_the_command_line_whatif(sim):
    """``qjscore whatif`` against the real server: the same numbers as the client's call,
    the next level's actions listed, and a bad option one clear line."""
    from tests.test_cli import qj, refused

    row = _rows(sim, 1, pick=lambda r: sim.citizen(r) not in _used)[0]
    cid = sim.citizen(row)
    out = qj("whatif", cid, "--add", "volunteer_hours=20", "--next-level", "--json", "--target", sim.target)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    want = sim.client.simulate(cid, [added("volunteer_hours", 20.0)], next_level=True)
    assert got["simulated"]["score"] == want.simulated.score and got.get("delta", 0) == want.delta
    text = qj("whatif", cid, "--add", "volunteer_hours=20", "--next-level", "--target", sim.target)
    assert f"{want.simulated.score}" in text.stdout and "never stored" in text.stdout
    refused(qj("whatif", cid, "--add", "volunteer_hours", "--target", sim.target), "expected VARIABLE=VALUE")
    refused(qj("whatif", cid, "--add", "no_such=1", "--target", sim.target), "changes[0].add_record.variable")
