"""The serving state: per-citizen numpy columns in memory shared by every worker process.

    >>> state = ServingState.allocate(spec, capacity=1000)        # doctest: +SKIP
    >>> state.load(store, calibration, as_of_day)                  # doctest: +SKIP

All columns live in one anonymous shared mapping created before the worker processes fork
(the grpc multiprocessing pattern), so every worker reads the same scores, consents and
card tokens, and a write by one (a revoked consent, a new record's re-score) is seen by all
on their very next request. Readers take no lock; writers serialise on one process-shared
lock, held from the store write until the state is updated, so two workers can never
interleave a citizen's records and scores. Rows are the store's dense citizen rows.
"""

from __future__ import annotations

import datetime as _dt
import mmap
import multiprocessing
import time
from dataclasses import dataclass

import numpy as np

from kernel.columns import ScoreColumns
from kernel.features import Records, build_features, record_weights
from kernel.score import Scorer
from kernel.spec import ModelSpec
from server.keys import subject_of
from server.scenarios import Scenario
from server.store import ActiveRecords, Store
from server.token_index import TokenIndex

EPOCH = _dt.date(1970, 1, 1)

# meta slots
N_CITIZENS, AS_OF_DAY, READY, GENERATION, WORKERS_SERVING = range(5)


def today() -> int:
    """Days since 1970-01-01, the unit of every date in the store."""
    return (_dt.date.today() - EPOCH).days


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


class _SharedArena:
    """numpy arrays carved out of one anonymous MAP_SHARED mapping (inherited by forks)."""

    def __init__(self, layout: dict[str, tuple[np.dtype, tuple[int, ...]]]):
        offsets, size = {}, 0
        for name, (dtype, shape) in layout.items():
            size = (size + 63) // 64 * 64  # cache-line aligned
            offsets[name] = size
            size += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        self.buffer = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_SHARED)
        self.arrays = {
            name: np.frombuffer(self.buffer, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)), offset=offsets[name]).reshape(shape)
            for name, (dtype, shape) in layout.items()
        }


@dataclass
class ServingState:
    """Shared columns for ``capacity`` citizens (rows ``0..n_citizens-1`` are in use)."""

    spec: ModelSpec
    capacity: int
    meta: np.ndarray  # int64: N_CITIZENS, AS_OF_DAY, READY, GENERATION, WORKERS_SERVING
    features: np.ndarray  # float32 (capacity, V)
    adult: np.ndarray  # uint8
    consent: np.ndarray  # uint8: 1 while the citizen's authorisation stands
    birth_day: np.ndarray  # int32
    defaults: np.ndarray  # uint32: bit per pay-later scenario with an unpaid default
    computed_at: np.ndarray  # float64 unix seconds of the last re-score
    subject: np.ndarray  # uint64 pseudonymous subject of the audit log (server/keys.py)
    columns: ScoreColumns
    tokens: TokenIndex
    lock: object  # multiprocessing.Lock: serialises writers across processes
    audit_key: bytes = b""

    def subject_of(self, citizen_id: str) -> int:
        return subject_of(self.audit_key, citizen_id)

    @classmethod
    def allocate(cls, spec: ModelSpec, capacity: int, token_capacity: int | None = None, audit_key: bytes = b"") -> "ServingState":
        n_vars = len(spec.variables)
        tcap = TokenIndex.capacity_for(token_capacity or capacity)
        layout = {
            "meta": (np.int64, (8,)),
            "features": (np.float32, (capacity, n_vars)),
            "adult": (np.uint8, (capacity,)),
            "consent": (np.uint8, (capacity,)),
            "birth_day": (np.int32, (capacity,)),
            "defaults": (np.uint32, (capacity,)),
            "computed_at": (np.float64, (capacity,)),
            "subject": (np.uint64, (capacity,)),
            "token_keys": (np.uint64, (tcap, 2)),
            "token_rows": (np.int32, (tcap,)),
            "token_meta": (np.int64, (1,)),
        }
        for name, (dtype, shape) in ScoreColumns.DTYPES.items():
            layout[f"col_{name}"] = (dtype, (capacity, *shape))
        a = _SharedArena(layout).arrays
        a["token_rows"][:] = -1
        columns = ScoreColumns(**{name: a[f"col_{name}"] for name in ScoreColumns.DTYPES})
        return cls(
            spec=spec, capacity=capacity, meta=a["meta"], features=a["features"], adult=a["adult"],
            consent=a["consent"], birth_day=a["birth_day"], defaults=a["defaults"],
            computed_at=a["computed_at"], subject=a["subject"], columns=columns, audit_key=audit_key,
            tokens=TokenIndex(a["token_keys"], a["token_rows"], a["token_meta"]),
            lock=multiprocessing.get_context("fork").Lock(),
        )

    @property
    def n_citizens(self) -> int:
        return int(self.meta[N_CITIZENS])

    @property
    def as_of_day(self) -> int:
        return int(self.meta[AS_OF_DAY])

    @property
    def ready(self) -> bool:
        return bool(self.meta[READY])

    # --- loading (one process, before or while the workers wait) ----------------------

    def load(self, store: Store, scorer: Scorer, scenarios: dict[str, Scenario], as_of_day: int,
             n_threads: int = 2, mark_ready: bool = True) -> None:
        """Fill every column from the store and score everyone (the start-up path)."""
        citizens = store.citizens()
        n = len(citizens.ids)
        if n > self.capacity:
            raise ValueError(f"{n} citizens do not fit the state's capacity of {self.capacity}")
        with self.lock:
            self.meta[READY] = 0
            self.birth_day[:n] = citizens.birth_day
            self.consent[:n] = citizens.consent
            self.subject[:n] = [subject_of(self.audit_key, cid) for cid in citizens.ids]
            cards = store.cards()
            self.tokens.clear()
            self.tokens.insert_many(cards.tokens, cards.citizen_row)
            self.meta[N_CITIZENS] = n
            self._rescore_all(store.active_records(), scorer, scenarios, as_of_day, n_threads)
            self.meta[READY] = 1 if mark_ready else 0

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
        records, scenario_bits = self.to_records(active, scenarios)
        build_features(self.spec, records, n, as_of_day, out=self.features[:n])
        self.defaults[:n] = self.default_masks(records, scenario_bits, n, as_of_day)
        self.adult[:n] = adults(self.birth_day[:n], as_of_day)
        self.meta[AS_OF_DAY] = as_of_day
        self._score(scorer, n_threads)

    def _score(self, scorer: Scorer, n_threads: int) -> None:
        n = self.n_citizens
        t0 = time.perf_counter()
        scorer.score(self.features[:n], self.adult[:n], out=self.columns.take(slice(0, n)), n_threads=n_threads)
        self.last_batch_seconds = time.perf_counter() - t0
        self.computed_at[:n] = time.time()
        self.meta[GENERATION] += 1

    # --- helpers shared with single-citizen updates ------------------------------------

    def to_records(self, active: ActiveRecords, scenarios: dict[str, Scenario]) -> tuple[Records, np.ndarray]:
        """Store records -> kernel Records (variables the spec does not score are dropped)
        and each record's pay-later default bit (-1: none)."""
        index = {v.name: i for i, v in enumerate(self.spec.variables)}
        var = np.array([index.get(v, -1) for v in active.variable], np.int16)
        bits = np.array(
            [scenarios[s].default_bit if s in scenarios else -1 for s in active.scenario], np.int64
        ) if len(active) else np.zeros(0, np.int64)
        keep = var >= 0
        records = Records.from_arrays(active.citizen_row[keep], var[keep], active.day[keep], active.value[keep])
        return records, bits[keep]

    def default_masks(self, records: Records, bits: np.ndarray, n: int, as_of_day: int) -> np.ndarray:
        """Unpaid-default bit mask per citizen: an alive negative record tagged with a
        pay-later scenario is an unpaid default there until it is repaired or withdrawn."""
        masks = np.zeros(n, np.uint32)
        if not len(records):
            return masks
        negative = np.array([v.direction == "negative" for v in self.spec.variables])
        alive = record_weights(self.spec, records, as_of_day) > 0
        sel = (bits >= 0) & alive & negative[records.variable.astype(np.intp)]
        np.bitwise_or.at(masks, records.citizen[sel], np.uint32(1) << bits[sel].astype(np.uint32))
        return masks
