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


# --- the rollover's index (server/ageing.py): nothing read from the store but written rows ---


def test_day_by_day_for_weeks_the_index_alone_gives_a_whole_load_and_reads_nothing(city):
    """Forty days one after another (records decay, expire, windows close, people turn 18),
    then a jump of 200: every step equals a whole load of the store on that day, and none
    reads a record from the store (no citizen was written)."""
    runtime, url = city
    scorer = Scorer(runtime.spec, runtime.calibration())
    day = today()
    state = state_on(runtime, url, day)
    with open_store(url) as store:
        for step in [*range(1, 41), 240]:
            figures = roll_over(state, store, scorer, runtime.scenarios, day + step)
            assert figures["read_rows"] == figures["records_read"] == figures["rederived"] == 0, figures
            if step % 8 == 0 or step == 240:
                want = state_on(runtime, url, day + step)
                assert_same(state, want)
                assert_same_index(state, want)  # pruned day by day to what a whole load keeps
    assert figures["from_index"] > 0


def test_written_future_and_back_in_time_citizens_come_from_the_store(tmp_path):
    """A citizen written since the index was made, one with a record of a variable without a
    window dated in the future (its cell needs their other records of it, which the index
    does not keep) and one with an ageing record dated in the future: the first two are read
    from the store at the rollover, the third comes into effect from the index; and a clock
    set back re-reads everyone. Each time, exactly a whole load."""
    data = tmp_path / "data"
    runtime = Runtime.prepare(ServerConfig(data_dir=data, seed_citizens=400, metrics_port=0, port=0))
    runtime.load()
    url = f"sqlite:///{data / 'qianjiang.db'}"
    spec, scorer, day = runtime.spec, Scorer(runtime.spec, runtime.calibration()), today()
    with open_store(url) as store:
        store.add_records([RecordIn("soon-1", "c00000011", "residence_years", day + 3, 4.0, "citizen_card_company"),
                           RecordIn("soon-2", "c00000012", "charity_donations", day + 2, 1.0, "charity_platform")],
                          "citizen_card_company")
    state = state_on(runtime, url, day)
    assert state.until[11] == 0 and 0 < state.until[12] <= day + 2  # DIRTY, and an event on its day
    with open_store(url) as store:
        store.add_records([RecordIn("now-1", "c00000013", "court_listed_dishonest_debtor", day, 1.0, "court")], "court")
        bound = scorer.bind(state.features, state.adult, state.columns)
        with state.lock:
            state.apply(state.snapshot(store, 13), runtime.scenarios, bound)
        assert state.until[13] == 0
        figures = roll_over(state, store, scorer, runtime.scenarios, day + 1)
        assert figures["read_rows"] == 2 and figures["from_store"] == 2  # rows 11 and 13
        assert_same(state, state_on(runtime, url, day + 1))
        for step in (2, 3, 4):
            roll_over(state, store, scorer, runtime.scenarios, day + step)
            assert_same(state, state_on(runtime, url, day + step))
        assert state.until[11] != 0  # in effect: nothing left for the store to tell
        figures = roll_over(state, store, scorer, runtime.scenarios, day - 5)  # the clock set back
        assert figures["read_rows"] == state.n_citizens
        assert_same(state, state_on(runtime, url, day - 5))


def test_the_index_knows_every_change_day():
    """record_events against record_weights, day by day: before its event day a record's
    weight moves only while it decays linearly (and the index keeps it), on that day it
    moves, and a record the index neither keeps nor sends to the store never moves again."""
    from kernel.features import Records, record_weights
    from kernel.spec import load_spec
    from server.ageing import NEVER, linear_variables, record_events

    spec = load_spec()
    rng = np.random.default_rng(3)
    n, as_of = 20_000, 20_000
    records = Records.from_arrays(np.zeros(n), rng.integers(0, len(spec.variables), n),
                                  as_of + rng.integers(-2000, 60, n), rng.integers(1, 5, n))
    events, keep, needs_store = record_events(spec, records, as_of)
    linear = np.isin(records.variable, linear_variables(spec))
    w0 = record_weights(spec, records, as_of)
    for d in range(as_of + 1, as_of + 1900, 7):
        moved = record_weights(spec, records, d) != w0
        assert not (moved & (d < events) & ~(linear & keep)).any(), d
    dated = np.flatnonzero(events < NEVER)
    assert len(dated) > n // 5  # expiring, and coming into effect
    for i in dated:
        one = Records(records.citizen[i : i + 1], records.variable[i : i + 1], records.day[i : i + 1],
                      records.value[i : i + 1])
        e = int(events[i])
        assert record_weights(spec, one, e)[0] != record_weights(spec, one, e - 1)[0], i
    still = ~keep & ~needs_store
    for d in (as_of + 1, as_of + 400, as_of + 5000):
        assert not ((record_weights(spec, records, d) != w0) & still).any(), d


def test_eighteen_on_the_day_adults_says():
    from server.ageing import adult_day
    from server.state import adults

    births = np.arange(-2000, 2000)  # four years of birthdays, two 29 Februaries among them
    days = adult_day(births)
    for birth, day in zip(births.tolist(), days.tolist()):
        assert adults(np.array([birth]), day)[0] == 1 and adults(np.array([birth]), day - 1)[0] == 0, birth


def assert_same_index(a: ServingState, b: ServingState) -> None:
    for name, array in b.ageing.arrays().items():
        np.testing.assert_array_equal(a.ageing.arrays()[name], array, err_msg=f"ageing.{name}")


def test_a_citizen_written_while_the_rollover_reads_it_is_read_again(city):
    """Written before the rollover (read from the store), then again right after that read,
    on the old day: skipped at publication and read once more on the new day. The end: a
    whole load's state, and the index a whole load builds."""
    runtime, url = city
    scorer, day = Scorer(runtime.spec, runtime.calibration()), today()
    state = state_on(runtime, url, day)
    bound = scorer.bind(state.features, state.adult, state.columns)
    row, reads = 21, []

    def write(store, record_id: str) -> None:
        store.add_records([RecordIn(f"{record_id}-{row}", f"c{row:08d}", "tax_arrears", day, 1.0, "tax_bureau")],
                          "tax_bureau")
        with state.lock:
            state.apply(state.snapshot(store, row), runtime.scenarios, bound)

    class WritingStore:  # the store, but a write lands right after the rollover's first read
        def __init__(self, store):
            self.store = store

        def __getattr__(self, name):
            return getattr(self.store, name)

        def rows_read(self):
            reader, outer = self.store.rows_read(), self

            class Reader:
                def read(self, rows, variables, scenarios):
                    got = reader.read(rows, variables, scenarios)
                    reads.append(rows.tolist())
                    if len(reads) == 1:
                        write(outer.store, "while-reading")
                    return got

                def close(self):
                    reader.close()

                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    reader.close()

            return Reader()

    with open_store(url) as store:
        write(store, "before")
        figures = roll_over(state, WritingStore(store), scorer, runtime.scenarios, day + 1)
    assert reads[0] == [row] and row in reads[1] and figures["rederived"] >= 1, (reads, figures)
    want = state_on(runtime, url, day + 1)
    assert_same(state, want)
    assert_same_index(state, want)

    # A citizen the rollover re-derives from the index (a decaying record), written after
    # the rollover chose its citizens and before it reads theirs: the index lacks the new
    # record, so the row must be skipped and read from the store.
    from server.ageing import linear_variables

    decaying = np.setdiff1d(state.ageing.rows_with(linear_variables(runtime.spec)), [21])
    row, reads = int(decaying[3]), []
    with open_store(url) as store:
        row_before, row = row, 22
        write(store, "dirty-again")  # row 22: DIRTY, so the rollover reads the store first
        row = row_before
        figures = roll_over(state, WritingStore(store), scorer, runtime.scenarios, day + 2)
    assert reads[0] == [22] and len(reads) == 2 and row in reads[1], (reads, figures)  # read again, after
    want = state_on(runtime, url, day + 2)
    assert_same(state, want)
    assert_same_index(state, want)
