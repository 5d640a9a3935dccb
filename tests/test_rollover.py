"""The day rollover (server/rollover.py): only the citizens whose features change are
re-derived, the result is exactly a whole load on the new day, writes during it land, and a
reader never sees a row from two moments."""

from __future__ import annotations

import multiprocessing
import threading

import numpy as np
import pytest

from kernel.score import Scorer
from server.app import Runtime, ServerConfig
from server.city_time import today
from server.rollover import roll_over
from server.state import ServingState
from server.store import RecordIn, open_store

N = 3000
COLUMNS = ("features", "adult", "consent", "birth_day", "defaults", "gate")


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    data = tmp_path_factory.mktemp("rollover")
    runtime = Runtime.prepare(ServerConfig(data_dir=data, seed_citizens=N, metrics_port=0, port=0))
    runtime.load()
    return runtime, f"sqlite:///{data / 'qianjiang.db'}"


def state_on(runtime: Runtime, url: str, day: int) -> ServingState:
    """A whole load of the store on ``day``."""
    state = ServingState.allocate(runtime.spec, runtime.state.capacity, runtime.state.token_capacity,
                                  audit_key=runtime.keys.audit)
    with open_store(url) as store:
        state.load(store, Scorer(runtime.spec, runtime.calibration()), runtime.scenarios, day)
    return state


def assert_same(a: ServingState, b: ServingState) -> None:
    n = a.n_citizens
    assert n == b.n_citizens and a.as_of_day == b.as_of_day
    for name in COLUMNS:
        np.testing.assert_array_equal(getattr(a, name)[:n], getattr(b, name)[:n], err_msg=name)
    for name in a.columns.DTYPES:
        np.testing.assert_array_equal(getattr(a.columns, name)[:n], getattr(b.columns, name)[:n], err_msg=name)


@pytest.mark.parametrize("days", [1, 30, 400])
def test_a_rollover_gives_exactly_a_whole_load_on_the_new_day_and_touches_only_what_changed(city, days):
    runtime, url = city
    day = today()
    state = state_on(runtime, url, day)
    with open_store(url) as store:
        figures = roll_over(state, store, Scorer(runtime.spec, runtime.calibration()), runtime.scenarios, day + days)
    assert_same(state, state_on(runtime, url, day + days))
    assert 0 < figures["rows"] < N  # some citizens change, not everyone (no decaying record, no birthday)
    assert figures["rederived"] == 0


def test_writes_during_a_rollover_land_and_readers_never_see_a_row_from_two_moments(city):
    """The rollover runs in another process, as the server's parent does, while readers here
    hammer the rows it changes (score, level, points) and a writer adds records: each read is
    one moment's row (the level is the score's, the points add up), and the end state is a
    whole load's."""
    runtime, url = city
    spec = runtime.spec
    day = today()
    state = state_on(runtime, url, day)
    cols = state.columns
    scorer = Scorer(spec, runtime.calibration())
    changing = np.flatnonzero(state.features[:N, spec.variable_index("traffic_violations")] > 0)
    bad, reads, stop = [], [0], threading.Event()

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            row = int(rng.choice(changing))
            score, level, dims, raw = state.read_row(row, lambda: (
                int(cols.score[row]), int(cols.level[row]), cols.dimension_points[row].copy(), float(cols.raw[row])))
            reads[0] += 1
            if score >= 0 and (spec.levels.index(spec.level_of(score)) != level
                               or not np.isclose(dims.sum(), raw, atol=1e-6)):
                bad.append((row, score, level, dims.sum(), raw))

    def roll_in_a_child() -> None:
        with open_store(url) as store:
            for days in range(1, 4):  # three rollovers: more publishing for the readers to meet
                roll_over(state, store, scorer, runtime.scenarios, day + days)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    child = multiprocessing.get_context("fork").Process(target=roll_in_a_child)
    written = []
    try:
        with open_store(url) as store:
            child.start()
            bound = scorer.bind(state.features, state.adult, state.columns)
            for i in range(40):
                row = 100 + i
                store.add_records([RecordIn(f"roll-{i}", f"c{row:08d}", "traffic_violations", day, 1.0, "police")], "police")
                snap = state.snapshot(store, row)
                with state.lock:
                    state.apply(snap, runtime.scenarios, bound)
                written.append(row)
            child.join(120)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert child.exitcode == 0 and len(written) == 40 and reads[0] > 1000
    assert not bad, bad[:5]
    assert_same(state, state_on(runtime, url, day + 3))
