"""The serving state: per-citizen numpy columns in memory shared by every worker process.

    >>> state = ServingState.allocate(spec, capacity=1000)        # doctest: +SKIP
    >>> state.load(store, calibration, as_of_day)                  # doctest: +SKIP

All columns live in one shared mapping (a memfd) created before the worker processes fork
(the grpc multiprocessing pattern), so every worker reads the same scores, consents and
card tokens, and a write by one (a revoked consent, a new record's re-score) is seen by all
on their very next request. Readers take no lock. Writers write the store and read what a
re-score needs (:meth:`ServingState.snapshot`) without any lock, since a store round trip
can hang; then they take one process-shared lock only to apply it, conditionally on
freshness: each row keeps the store position its records were read at (``row_position``)
and that of its consent (``consent_position``), and an older snapshot is never applied over
a newer one (:meth:`ServingState.apply`). Two workers writing one citizen thus end with the
state reflecting the store, whatever order their applies come in. Rows are the store's
dense citizen rows.

The eligibility checks read a row's rule inputs from one packed word, ``gate`` (adult,
consent, score, flags, defaults: server/token_index.pyx pack_gate), one cache miss instead of
five: every write to those columns ends with :meth:`ServingState.refresh_gate` of its rows.

A model rollout builds a second state for the new release while the first one serves
(server/rollout.py): the :class:`Control` block, also created before the fork and shared by
every generation of state, holds the write lock, which generation is active, and the rows
written since the new state's load began (re-derived before the switch).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import mmap
import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from kernel.columns import ScoreColumns
from kernel.features import Records, build_features, future_records, record_weights
from kernel.score import Scorer
from kernel.spec import ModelSpec
from server.city_time import EPOCH, today  # noqa: F401 - today: the city's day, used with these helpers
from server.keys import subject_of
from server.scenarios import Scenario
from server.store import ActiveRecords, Store
from server.token_index import TokenIndex, pack_gate

log = logging.getLogger("qianjiang.state")


# meta slots. POSITION: the store's change sequence the state reflects (every write up to it
# is applied); a writer sets it before it touches the rows, so a reader that saw a row's new
# values reads a position at least as new (the appeal replay relies on it: server/replay.py).
N_CITIZENS, AS_OF_DAY, READY, GENERATION, POSITION = range(5)


def citizen_key(citizen_id: str) -> bytes:
    """The 16-byte key of a citizen id in the state's citizen index (BLAKE2b-128: ids of
    any length in a fixed-width table; a collision is a 2**-64 event at a billion ids)."""
    return hashlib.blake2b(citizen_id.encode(), digest_size=16, person=b"qj-citizen-row").digest()




def day_of(iso: str) -> int:
    return (_dt.date.fromisoformat(iso) - EPOCH).days


def iso_of(day: int) -> str:
    return (EPOCH + _dt.timedelta(days=int(day))).isoformat()


def adults(birth_day: np.ndarray, as_of_day: int) -> np.ndarray:
    """1 where the person is 18 or older on as_of_day (birthdays counted exactly)."""
    birth = birth_day.astype("datetime64[D]")
    asof = np.datetime64(int(as_of_day), "D")
    by, ay = birth.astype("datetime64[Y]"), asof.astype("datetime64[Y]")
    years = ay.astype(np.int64) - by.astype(np.int64)
    bm = birth.astype("datetime64[M]").astype(np.int64) % 12
    bd = (birth - birth.astype("datetime64[M]").astype("datetime64[D]")).astype(np.int64)
    am = asof.astype("datetime64[M]").astype(np.int64) % 12
    ad = (asof - asof.astype("datetime64[M]").astype("datetime64[D]")).astype(np.int64)
    before_birthday = (am < bm) | ((am == bm) & (ad < bd))
    return ((years - before_birthday) >= 18).astype(np.uint8)


class RowSnapshot(NamedTuple):
    """What a re-score of one citizen needs, read from the store at one position: every
    change up to ``position`` is in ``active``, and none after it."""

    row: int
    position: int
    active: ActiveRecords


class _SharedArena:
    """numpy arrays carved out of one MAP_SHARED mapping of a memfd: inherited by forks, and
    reachable by another process of the same user as ``/proc/<pid>/fd/<fd>`` (:attr:`path`),
    which is how workers forked earlier map a state built later. The memory goes when the
    last process unmaps it: nothing is left behind in /dev/shm after a crash."""

    def __init__(self, layout: dict[str, tuple[np.dtype, tuple[int, ...]]], path: str | None = None,
                 by_path: bool = False):
        offsets, size = {}, 0
        for name, (dtype, shape) in layout.items():
            size = (size + 63) // 64 * 64  # cache-line aligned
            offsets[name] = size
            size += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        size = max(size, 1)
        if path is None:
            fd = os.memfd_create("qianjiang-state", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            self.path = f"/proc/{os.getpid()}/fd/{fd}"
        else:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            if os.fstat(fd).st_size != size:
                os.close(fd)
                raise ValueError(f"{path}: the shared state has another layout than this model's")
            self.path = path
        self.fd = fd
        self.buffer = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        if path is not None or not by_path:  # the mapping is all this process needs
            os.close(fd)
            self.fd = None
        self.arrays = {
            name: np.frombuffer(self.buffer, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)), offset=offsets[name]).reshape(shape)
            for name, (dtype, shape) in layout.items()
        }


# control slots
ACTIVE_GENERATION, PREPARED_GENERATION, WARMED, CONTROL_WORKERS_SERVING, TRACKING = range(5)
RELEASE_BYTES = 512


class Control:
    """What every generation of state shares, created before the workers fork: the writers'
    lock, the active and prepared generations, the prepared state's path and release, how
    many workers have warmed it up, and the rows written while a new state was loading."""

    def __init__(self, capacity: int):
        a = _SharedArena({
            "meta": (np.int64, (8,)),
            "prepared": (np.uint8, (RELEASE_BYTES,)),
            "dirty": (np.uint8, (capacity,)),
        }).arrays
        self.meta, self._prepared, self.dirty = a["meta"], a["prepared"], a["dirty"]
        self.lock = multiprocessing.get_context("fork").Lock()

    @property
    def generation(self) -> int:
        return int(self.meta[ACTIVE_GENERATION])

    def mark(self, row: int) -> None:
        """A writer changed this row (caller holds the lock): a state being built for a
        rollout re-derives it before the switch."""
        if self.meta[TRACKING]:
            self.dirty[row] = 1

    def announce(self, generation: int, path: str, release: str) -> None:
        text = f"{path}\n{release}".encode()
        if len(text) > RELEASE_BYTES:
            raise ValueError("state path and release id too long for the control block")
        self._prepared[:] = 0
        self._prepared[: len(text)] = np.frombuffer(text, np.uint8)
        self.meta[WARMED] = 0
        self.meta[PREPARED_GENERATION] = generation

    def prepared(self) -> tuple[int, str, str]:
        """(generation, state path, release id) of the state prepared for the next switch."""
        generation = int(self.meta[PREPARED_GENERATION])
        path, _, release = bytes(self._prepared).rstrip(b"\0").decode().partition("\n")
        return generation, path, release


@dataclass
class ServingState:
    """Shared columns for ``capacity`` citizens (rows ``0..n_citizens-1`` are in use)."""

    spec: ModelSpec
    capacity: int
    meta: np.ndarray  # int64: N_CITIZENS, AS_OF_DAY, READY, GENERATION (re-scores), POSITION
    features: np.ndarray  # float32 (capacity, V)
    adult: np.ndarray  # uint8
    consent: np.ndarray  # uint8: 1 while the citizen's authorisation stands
    birth_day: np.ndarray  # int32
    defaults: np.ndarray  # uint32: bit per pay-later scenario with an unpaid default
    computed_at: np.ndarray  # float64 unix seconds of the last re-score
    subject: np.ndarray  # uint64 pseudonymous subject of the audit log (server/keys.py)
    gate: np.ndarray  # uint64: adult, consent, score, flags and defaults of a row in one word
    row_position: np.ndarray  # int64: the store position a row's records were read at (apply)
    consent_position: np.ndarray  # int64: the store position of the consent a row holds
    columns: ScoreColumns
    tokens: TokenIndex  # card token -> row
    citizens: TokenIndex  # citizen_key(citizen id) -> row: reads never need the store
    lock: object  # multiprocessing.Lock: serialises writers across processes (Control.lock)
    audit_key: bytes = b""
    path: str = ""  # where another process maps it (_SharedArena.path)
    token_capacity: int = 0
    last_batch_seconds: float = 0.0  # the kernel's last whole-population batch (0: none yet)

    def subject_of(self, citizen_id: str) -> int:
        return subject_of(self.audit_key, citizen_id)

    @staticmethod
    def layout(spec: ModelSpec, capacity: int, token_capacity: int) -> dict:
        n_vars = len(spec.variables)
        tcap = TokenIndex.capacity_for(token_capacity)
        layout = {
            "meta": (np.int64, (8,)),
            "features": (np.float32, (capacity, n_vars)),
            "adult": (np.uint8, (capacity,)),
            "consent": (np.uint8, (capacity,)),
            "birth_day": (np.int32, (capacity,)),
            "defaults": (np.uint32, (capacity,)),
            "computed_at": (np.float64, (capacity,)),
            "subject": (np.uint64, (capacity,)),
            "gate": (np.uint64, (capacity,)),
            "row_position": (np.int64, (capacity,)),
            "consent_position": (np.int64, (capacity,)),
            "token_keys": (np.uint64, (tcap, 2)),
            "token_rows": (np.int32, (tcap,)),
            "token_meta": (np.int64, (1,)),
            "citizen_keys": (np.uint64, (TokenIndex.capacity_for(capacity), 2)),
            "citizen_rows": (np.int32, (TokenIndex.capacity_for(capacity),)),
            "citizen_meta": (np.int64, (1,)),
        }
        for name, (dtype, shape) in ScoreColumns.DTYPES.items():
            layout[f"col_{name}"] = (dtype, (capacity, *shape))
        return layout

    @classmethod
    def allocate(cls, spec: ModelSpec, capacity: int, token_capacity: int | None = None, audit_key: bytes = b"",
                 lock=None, by_path: bool = False) -> ServingState:
        """A new, empty state (``lock``: the writers' lock it shares with other generations).
        ``by_path``: other processes will map it by :attr:`path` (until :meth:`release_fd`);
        otherwise only this process and its later forks see it."""
        layout = cls.layout(spec, capacity, token_capacity or capacity)
        state = cls._on(_SharedArena(layout, by_path=by_path), spec, capacity,
                        token_capacity or capacity, audit_key, lock)
        state.tokens.rows[:] = -1
        state.citizens.rows[:] = -1
        return state

    @classmethod
    def attach(cls, path: str, spec: ModelSpec, capacity: int, token_capacity: int, audit_key: bytes, lock) -> ServingState:
        """Map a state another process built (a rollout's new generation)."""
        return cls._on(_SharedArena(cls.layout(spec, capacity, token_capacity), path), spec, capacity,
                       token_capacity, audit_key, lock)

    @classmethod
    def _on(cls, arena: _SharedArena, spec, capacity, token_capacity, audit_key, lock) -> ServingState:
        a = arena.arrays
        columns = ScoreColumns(**{name: a[f"col_{name}"] for name in ScoreColumns.DTYPES})
        state = cls(
            spec=spec, capacity=capacity, meta=a["meta"], features=a["features"], adult=a["adult"],
            consent=a["consent"], birth_day=a["birth_day"], defaults=a["defaults"],
            computed_at=a["computed_at"], subject=a["subject"], gate=a["gate"], row_position=a["row_position"],
            consent_position=a["consent_position"], columns=columns, audit_key=audit_key,
            tokens=TokenIndex(a["token_keys"], a["token_rows"], a["token_meta"]),
            citizens=TokenIndex(a["citizen_keys"], a["citizen_rows"], a["citizen_meta"]),
            lock=lock if lock is not None else multiprocessing.get_context("fork").Lock(),
            path=arena.path, token_capacity=token_capacity,
        )
        state._arena = arena
        return state

    def wipe(self) -> None:
        """Back to a new, empty state (after a snapshot was read into it and then refused:
        nothing of it may be served, not even the rows a load from the store leaves alone)."""
        np.frombuffer(self._arena.buffer, np.uint8)[:] = 0
        self.tokens.rows[:] = -1
        self.citizens.rows[:] = -1

    def release_fd(self) -> None:
        """Close the creating process's descriptor once every worker has mapped the state
        (the mapping stays; the memory goes with the last mapping)."""
        fd, self._arena.fd = self._arena.fd, None
        if fd is not None:
            os.close(fd)

    @property
    def n_citizens(self) -> int:
        return int(self.meta[N_CITIZENS])

    @property
    def as_of_day(self) -> int:
        return int(self.meta[AS_OF_DAY])

    @property
    def ready(self) -> bool:
        return bool(self.meta[READY])

    @property
    def position(self) -> int:
        return int(self.meta[POSITION])

    def advance(self, position: int) -> None:
        """A write at ``position`` is about to be applied (caller holds the lock). Monotone:
        applies from several workers may come in any order."""
        if position > self.meta[POSITION]:
            self.meta[POSITION] = position

    # --- loading (one process, before or while the workers wait) ----------------------

    def load(self, store: Store, scorer: Scorer, scenarios: dict[str, Scenario], as_of_day: int,
             n_threads: int = 2, mark_ready: bool = True) -> None:
        """Fill every column from the store and score everyone (the start-up path)."""
        with self.lock:
            self.fill(store, scorer, scenarios, as_of_day, n_threads, mark_ready)

    def fill(self, store: Store, scorer: Scorer, scenarios: dict[str, Scenario], as_of_day: int,
             n_threads: int = 2, mark_ready: bool = True) -> None:
        """:meth:`load` without the lock: for a state no other process reads or writes yet."""
        citizens = store.citizens()
        n = len(citizens.ids)
        if n > self.capacity:
            raise ValueError(f"{n} citizens do not fit the state's capacity of {self.capacity}")
        self.meta[READY] = 0
        # First: everything read below is at least this new. Writers may write the store
        # meanwhile (they take the lock only to apply), and apply after this load, each with
        # a snapshot read after its write: newer than this position, so applied.
        position = store.high_water_mark()
        self.meta[POSITION] = position
        self.row_position[:] = 0
        self.consent_position[:] = 0
        self.row_position[:n] = position
        self.consent_position[:n] = position
        self.birth_day[:n] = citizens.birth_day
        self.consent[:n] = citizens.consent
        self.subject[:n] = [subject_of(self.audit_key, cid) for cid in citizens.ids]
        self.citizens.clear()
        if n:
            keys = np.frombuffer(b"".join(citizen_key(c) for c in citizens.ids), np.uint8).reshape(n, 16)
            self.citizens.insert_many(keys, np.arange(n))
        cards = store.cards()
        self.tokens.clear()
        self.tokens.insert_many(cards.tokens, cards.citizen_row)
        self.meta[N_CITIZENS] = n
        self._rescore_all(store.active_records(), scorer, scenarios, as_of_day, n_threads)
        self.meta[READY] = 1 if mark_ready else 0

    def adopt(self, old: ServingState) -> None:
        """Take what does not depend on the model from the serving state (caller holds the
        lock): consents, birthdays, pseudonyms, card tokens, citizen ids and the count. Rows the
        old state gained or re-scored since this one was filled are re-derived separately."""
        n = old.n_citizens
        self.advance(old.position)
        self.consent[:n] = old.consent[:n]
        self.consent_position[:n] = old.consent_position[:n]
        self.birth_day[:n] = old.birth_day[:n]
        self.subject[:n] = old.subject[:n]
        if self.tokens.capacity != old.tokens.capacity:
            raise ValueError("the new state's token index has another capacity than the serving one")
        for mine, theirs in ((self.tokens, old.tokens), (self.citizens, old.citizens)):
            np.copyto(mine.keys, theirs.keys)
            np.copyto(mine.rows, theirs.rows)
            mine.meta[:] = theirs.meta
        self.meta[N_CITIZENS] = n
        self.refresh_gate(slice(0, n))  # the consents are the old state's

    def rederive(self, row: int, store: Store, scenarios: dict[str, Scenario], rows) -> None:
        """Re-derive one citizen's features from the store and re-score the row in place
        (``rows``: the kernel's single-row scorer bound to this state). Caller holds the lock."""
        self.apply(self.snapshot(store, row), scenarios, rows)

    @staticmethod
    def snapshot(store: Store, row: int) -> RowSnapshot:
        """One citizen's active records as of the store's position now (no lock needed: two
        bounded reads). The store's writers commit in position order under its writers'
        lock, so every change up to the high-water mark is committed when it is read, and
        ``as_of`` leaves out whatever commits after: the records are exactly those at
        ``position``."""
        position = store.high_water_mark()
        return RowSnapshot(row, position, store.active_records(citizen_row=row, as_of=position))

    def apply(self, snap: RowSnapshot, scenarios: dict[str, Scenario], rows, birth_day: int | None = None) -> bool:
        """Re-score ``snap.row`` from ``snap`` unless the row already holds a newer one
        (caller holds the lock). Correct whatever order workers apply in: a write's own
        snapshot is read after it committed, so its position covers the write; the row ends
        at the largest position applied, which covers every write whose apply has returned.
        False when the snapshot was older than the row's (nothing changed). ``birth_day``:
        set with the records (a citizen's upsert)."""
        row = snap.row
        if snap.position < self.row_position[row]:
            return False
        self.advance(snap.position)  # first: a reader that sees the new row reads a position as new
        if birth_day is not None:
            self.birth_day[row] = birth_day
        records, bits = to_records(self.spec, snap.active, default_bits(scenarios))
        local = Records(np.zeros(len(records), np.int64), records.variable, records.day, records.value)
        self.features[row] = build_features(self.spec, local, 1, self.as_of_day)[0]
        self.defaults[row] = default_masks(self.spec, local, bits, 1, self.as_of_day)[0]
        self.adult[row] = adults(self.birth_day[row : row + 1], self.as_of_day)[0]
        rows.rescore(row)
        self.refresh_gate(slice(row, row + 1))
        self.computed_at[row] = time.time()
        self.row_position[row] = snap.position
        return True

    def refresh(self, store: Store, scorer: Scorer, scenarios, as_of_day: int, n_threads: int = 2) -> None:
        """Re-derive every feature as of a new day (records age out, people turn 18)."""
        with self.lock:
            self._rescore_all(store.active_records(), scorer, scenarios, as_of_day, n_threads)

    def rescore(self, scorer: Scorer, n_threads: int = 2) -> None:
        """Score everyone again from the features already derived (a new calibration), and
        mark the state ready."""
        with self.lock:
            self._score(scorer, n_threads)
            self.meta[READY] = 1

    def _rescore_all(self, active: ActiveRecords, scorer: Scorer, scenarios, as_of_day: int, n_threads: int) -> None:
        n = self.n_citizens
        records, scenario_bits = to_records(self.spec, active, default_bits(scenarios))
        future = future_records(records, as_of_day)
        if future:
            log.warning("%d stored records are dated after today (%s in the city): they count from their day on; "
                        "check the clocks and time zones of the host and of the sources", future, iso_of(as_of_day))
        build_features(self.spec, records, n, as_of_day, out=self.features[:n])
        self.defaults[:n] = default_masks(self.spec, records, scenario_bits, n, as_of_day)
        self.adult[:n] = adults(self.birth_day[:n], as_of_day)
        self.meta[AS_OF_DAY] = as_of_day
        self._score(scorer, n_threads)

    def _score(self, scorer: Scorer, n_threads: int) -> None:
        n = self.n_citizens
        t0 = time.perf_counter()
        scorer.score(self.features[:n], self.adult[:n], out=self.columns.take(slice(0, n)), n_threads=n_threads)
        self.last_batch_seconds = time.perf_counter() - t0
        self.refresh_gate(slice(0, n))
        self.computed_at[:n] = time.time()
        self.meta[GENERATION] += 1

    def set_consent(self, row: int, granted: bool, position: int | None = None) -> bool:
        """A citizen's consent, in its column and in the gate word the checks read. Caller
        holds the lock. With the store ``position`` of the change, applied only if the row
        holds no newer one (two workers' consent changes may apply in either order); False
        when it was older."""
        if position is not None:
            if position < self.consent_position[row]:
                return False
            self.advance(position)
            self.consent_position[row] = position
        self.consent[row] = 1 if granted else 0
        self.refresh_gate(slice(row, row + 1))
        return True

    def refresh_gate(self, rows: slice) -> None:
        """Re-pack the gate words of ``rows`` after a write to their adult, consent, score,
        flags or defaults: the eligibility checks read those words, not the columns
        (server/token_index.pyx pack_gate; each word is one store, never seen half written)."""
        pack_gate(self.adult[rows], self.consent[rows], self.columns.score[rows], self.columns.flags[rows],
                  self.defaults[rows], out=self.gate[rows])


def default_bits(scenarios: dict[str, Scenario]) -> dict[str, int]:
    """Each scenario's bit in the unpaid-default mask (-1: not pay-later)."""
    return {name: s.default_bit for name, s in scenarios.items()}


def to_records(spec: ModelSpec, active: ActiveRecords, bits_of: dict[str, int]) -> tuple[Records, np.ndarray]:
    """Store records -> kernel Records (variables the spec does not score are dropped) and
    each record's pay-later default bit (``bits_of[scenario]``; -1: none)."""
    index = {v.name: i for i, v in enumerate(spec.variables)}
    var = np.array([index.get(v, -1) for v in active.variable], np.int16)
    bits = np.array(
        [bits_of.get(s, -1) if s is not None else -1 for s in active.scenario], np.int64
    ) if len(active) else np.zeros(0, np.int64)
    keep = var >= 0
    records = Records.from_arrays(active.citizen_row[keep], var[keep], active.day[keep], active.value[keep])
    return records, bits[keep]


def default_masks(spec: ModelSpec, records: Records, bits: np.ndarray, n: int, as_of_day: int) -> np.ndarray:
    """Unpaid-default bit mask per citizen: an alive negative record tagged with a pay-later
    scenario is an unpaid default there until it is repaired or withdrawn."""
    masks = np.zeros(n, np.uint32)
    if not len(records):
        return masks
    negative = np.array([v.direction == "negative" for v in spec.variables])
    alive = record_weights(spec, records, as_of_day) > 0
    sel = (bits >= 0) & alive & negative[records.variable.astype(np.intp)]
    np.bitwise_or.at(masks, records.citizen[sel], np.uint32(1) << bits[sel].astype(np.uint32))
    return masks
