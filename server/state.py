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

Memory (measured at 12.5 M: 252 bytes a citizen, the 5 % spare rows and both indexes in):
the score columns in the kernel's compact layout (kernel/columns.py COMPACT_DTYPES: float32
dimension points and percentile, int8 reasons, float64 raw), ``computed_at`` in whole
seconds (uint32), ``row_seq`` uint16, the token and citizen indexes in 16-byte slots
(server/token_index.pyx). ``until`` (uint16) tells the day rollover when a row next changes,
with ``state.ageing`` (the loading process's own index of ageing records, not in the mapping:
server/ageing.py); every write sets its row's ``until`` to DIRTY, so the rollover reads it
from the store again.

A model rollout builds a second state for the new release while the first one serves
(server/rollout.py): the :class:`Control` block, also created before the fork and shared by
every generation of state, holds the write lock, which generation is active, and the rows
written since the new state's load began (re-derived before the switch).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import mmap
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from kernel.columns import ScoreColumns
from kernel.features import Records, build_features, future_records, record_weights
from kernel.score import Scorer
from kernel.spec import ModelSpec
from server.ageing import DIRTY, Ageing, until_of
from server.city_time import EPOCH, today  # noqa: F401 - today: the city's day, used with these helpers
from server.keys import subject_of
from server.scenarios import Scenario
from server.bulk_read import citizen_hashes as _citizen_hashes
from server.bulk_read import split_block
from server.store import ActiveRecords, BulkRead, RecordBlock, Store, bulk_read, name_codes
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


class CitizenRead(NamedTuple):
    """Everything re-deriving one citizen reads from the store, read without the lock
    (:meth:`ServingState.read_citizen`), applied under it (:meth:`ServingState.apply_citizen`):
    a snapshot start's replay of the change log and a replica's follower."""

    snap: RowSnapshot
    citizen_id: str
    birth_day: int
    blanket: bool
    exceptions: int  # the purposes whose consent differs from the blanket (server/consent.py)
    cards: list


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
    consent: np.ndarray  # uint8: 1 while the citizen's blanket authorisation stands
    consent_except: np.ndarray  # uint32: purposes whose consent differs from the blanket (server/consent.py)
    birth_day: np.ndarray  # int32
    defaults: np.ndarray  # uint32: bit per pay-later scenario with an unpaid default
    computed_at: np.ndarray  # uint32 unix seconds of the last re-score
    subject: np.ndarray  # uint64 pseudonymous subject of the audit log (server/keys.py)
    gate: np.ndarray  # uint64: adult, consent, score, flags and defaults of a row in one word
    row_position: np.ndarray  # int64: the store position a row's records were read at (apply)
    row_seq: np.ndarray  # uint16: the row's sequence lock (odd while a writer is in the row: read_row)
    consent_position: np.ndarray  # int64: the store position of the consent a row holds
    until: np.ndarray  # uint16: the next day the row's features may change but by decay; 0: written since (server/ageing.py)
    columns: ScoreColumns  # the compact layout (kernel/columns.py COMPACT_DTYPES)
    tokens: TokenIndex  # card token -> row
    citizens: TokenIndex  # citizen_key(citizen id) -> row: reads never need the store
    lock: object  # multiprocessing.Lock: serialises writers across processes (Control.lock)
    audit_key: bytes = b""
    path: str = ""  # where another process maps it (_SharedArena.path)
    token_capacity: int = 0
    last_batch_seconds: float = 0.0  # the kernel's last whole-population batch (0: none yet)
    # The ageing records for the day rollover (server/ageing.py): the loading process's own,
    # not in the shared mapping (the workers never need it); None until a load builds it.
    ageing: Ageing | None = None
    consent_purposes: object = None  # server/consent.py ConsentPurposes: reads purpose settings (None: blanket only)

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
            "consent_except": (np.uint32, (capacity,)),
            "birth_day": (np.int32, (capacity,)),
            "defaults": (np.uint32, (capacity,)),
            "computed_at": (np.uint32, (capacity,)),
            "subject": (np.uint64, (capacity,)),
            "gate": (np.uint64, (capacity,)),
            "row_position": (np.int64, (capacity,)),
            "row_seq": (np.uint16, (capacity,)),
            "consent_position": (np.int64, (capacity,)),
            "until": (np.uint16, (capacity,)),
            "token_slots": (np.uint64, (tcap, 2)),  # server/token_index.pyx: 16 bytes a slot
            "token_meta": (np.int64, (1,)),
            "citizen_slots": (np.uint64, (TokenIndex.capacity_for(capacity), 2)),
            "citizen_meta": (np.int64, (1,)),
        }
        for name, (dtype, shape) in ScoreColumns.COMPACT_DTYPES.items():
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
            consent=a["consent"], consent_except=a["consent_except"], birth_day=a["birth_day"], defaults=a["defaults"],
            computed_at=a["computed_at"], subject=a["subject"], gate=a["gate"], row_position=a["row_position"],
            row_seq=a["row_seq"], until=a["until"],
            consent_position=a["consent_position"], columns=columns, audit_key=audit_key,
            tokens=TokenIndex(a["token_slots"], a["token_meta"]),
            citizens=TokenIndex(a["citizen_slots"], a["citizen_meta"]),
            lock=lock if lock is not None else multiprocessing.get_context("fork").Lock(),
            path=arena.path, token_capacity=token_capacity,
        )
        state._arena = arena
        return state

    def read_row(self, row: int, read):
        """``read()``, which reads columns of ``row``, as of one moment: retried while a
        writer was in the row meanwhile (a sequence lock per row: writers, who hold the
        writers' lock, make the row's sequence odd before they write and even after, in
        :meth:`writing`; x86's ordering keeps stores and loads in program order across
        processes). Readers never wait for the writers' lock; a writer is in a row for
        microseconds."""
        seq = self.row_seq
        for _ in range(1000):
            before = int(seq[row])
            if not before & 1:
                value = read()
                if int(seq[row]) == before:
                    return value
            os.sched_yield()
        with self.lock:  # no writer is in the row while we hold the writers' lock, whatever its sequence says
            return read()

    @contextlib.contextmanager
    def writing(self, rows):
        """Around a writer's changes of ``rows`` (an int, a slice or an index array; caller
        holds the writers' lock), so that :meth:`read_row` never returns a mix."""
        self.row_seq[rows] += 1
        try:
            yield
        finally:
            self.row_seq[rows] += 1

    def wipe(self) -> None:
        """Back to a new, empty state (after a snapshot was read into it and then refused:
        nothing of it may be served, not even the rows a load from the store leaves alone)."""
        np.frombuffer(self._arena.buffer, np.uint8)[:] = 0
        self.tokens.rows[:] = -1
        self.citizens.rows[:] = -1
        self.ageing = None

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
             n_threads: int = 2, mark_ready: bool = True, chunk_citizens: int | None = None) -> None:
        """:meth:`load` without the lock: for a state no other process reads or writes yet.

        The store is read in bulk (:meth:`Store.bulk_read`: numpy arrays, no Python object
        per record or citizen) in streams at once: threads read every active record (a part
        of them each, :attr:`BulkRead.parts`) into buckets of ``chunk_citizens`` citizens
        (:data:`LOAD_CHUNK_CITIZENS`; the reads run in C, without the GIL) while this one
        reads the cards into the token index and the citizens, a chunk at a time, into their
        columns, pseudonyms and the citizen index (:func:`citizen_hashes`). Then, chunk by
        chunk, the records become features, unpaid-default masks and scores, exactly as
        :meth:`apply` derives one citizen: the same records, in the same order per citizen,
        so the same sums to the last bit. Beyond the state, memory holds the records read
        (15 bytes each) and one chunk's temporaries. :attr:`last_load`: where the time went."""
        chunk = max(1, int(chunk_citizens or LOAD_CHUNK_CITIZENS))
        t0 = time.perf_counter()
        with bulk_read(store) as reader:
            n = reader.n_citizens
            if n > self.capacity:
                raise ValueError(f"{n} citizens do not fit the state's capacity of {self.capacity}")
            self.meta[READY] = 0
            # Everything read is at least this new (the records exactly this): writers may
            # write the store meanwhile (they take the lock only to apply), and apply after
            # this load, each with a snapshot read after its write: newer, so applied.
            position = reader.position
            self.meta[POSITION] = position
            self.row_position[:] = 0
            self.consent_position[:] = 0
            self.row_position[:n] = position
            self.consent_position[:n] = position
            buckets = _RecordBuckets(reader, [v.name for v in self.spec.variables], default_bits(scenarios), n, chunk)
            hash_s = 0.0
            try:
                self.tokens.clear()
                for cards in reader.cards():
                    self.tokens.insert_many(cards.tokens, cards.citizen_row)
                self.citizens.clear()
                for part in reader.citizens(chunk):
                    lo, hi = part.first_row, part.first_row + len(part)
                    self.birth_day[lo:hi] = part.birth_day
                    self.consent[lo:hi] = part.consent
                    t = time.perf_counter()
                    keys, subjects = citizen_hashes(self.audit_key, part.ids, part.id_offsets)
                    hash_s += time.perf_counter() - t
                    self.subject[lo:hi] = subjects
                    self.citizens.insert_many(keys, np.arange(lo, hi))
                self.load_consent_settings(store, n, as_of_day)
            except BaseException:
                buckets.stop()
                raise
            citizens_s = time.perf_counter() - t0
            buckets.join()  # raises what the reading thread raised
            skipped = reader.skipped
        read_s = time.perf_counter() - t0  # the store's read transactions end here
        self.meta[N_CITIZENS] = n
        features_s, kernel_s = self._derive_buckets(buckets, scorer, as_of_day, n_threads)
        self.meta[READY] = 1 if mark_ready else 0
        self.last_load = {"citizens": n, "records": buckets.records, "skipped_records": skipped,
                          "load_s": time.perf_counter() - t0, "read_s": read_s, "hash_s": hash_s,
                          "citizens_read_s": citizens_s, "records_read_s": buckets.finished - t0,
                          "features_s": features_s, "kernel_s": kernel_s}
        log.info("loaded %d citizens and %d records in %.1f s (read %.1f s, of which hashing ids %.1f s; features %.1f s;"
                 " kernel %.1f s)", n, buckets.records, self.last_load["load_s"], read_s, hash_s, features_s, kernel_s)

    def _derive_buckets(self, buckets: _RecordBuckets, scorer: Scorer, as_of_day: int,
                        n_threads: int) -> tuple[float, float]:
        """Features, default masks, adulthood and scores of every chunk of citizens from its
        bucket of records (each freed once used). Returns (features seconds, kernel seconds)."""
        self.meta[AS_OF_DAY] = as_of_day
        future, features_s, kernel_s = 0, 0.0, 0.0
        ageing = []
        for j, (lo, hi) in enumerate(buckets.chunks()):
            t = time.perf_counter()
            block = buckets.take(j)
            records = Records(block.citizen_row.astype(np.int64) - lo, block.variable, block.day, block.value)
            future += future_records(records, as_of_day)
            ageing.append(self._derive(lo, hi, records, block.scenario, as_of_day))
            del block, records
            _trim_heap()  # the bucket's many small arrays: back to the system, or the index adds on top
            t1 = time.perf_counter()
            scorer.score(self.features[lo:hi], self.adult[lo:hi], out=self.columns.take(slice(lo, hi)),
                         n_threads=n_threads)
            t2 = time.perf_counter()
            self.refresh_gate(slice(lo, hi))
            self.computed_at[lo:hi] = _now()
            features_s += t1 - t
            kernel_s += t2 - t1
        if future:
            log.warning("%d stored records are dated after today (%s in the city): they count from their day on; "
                        "check the clocks and time zones of the host and of the sources", future, iso_of(as_of_day))
        self.last_batch_seconds = kernel_s
        self.ageing = Ageing.concat(ageing)
        self.meta[GENERATION] += 1
        return features_s, kernel_s

    def _derive(self, lo: int, hi: int, records: Records, bits: np.ndarray, as_of_day: int) -> Ageing:
        """Rows ``lo .. hi - 1``'s features, default masks, adulthood and ``until`` on
        ``as_of_day`` from their records (``records.citizen``: the row less ``lo``; ``bits``:
        each record's pay-later default bit, -1 none). Returns their ageing records
        (server/ageing.py)."""
        m = hi - lo
        build_features(self.spec, records, m, as_of_day, out=self.features[lo:hi])
        self.defaults[lo:hi] = default_masks(self.spec, records, bits, m, as_of_day)
        self.adult[lo:hi] = adults(self.birth_day[lo:hi], as_of_day)
        until, keep = until_of(self.spec, records, m, as_of_day, self.birth_day[lo:hi], self.adult[lo:hi])
        self.until[lo:hi] = until
        return Ageing.of(records.citizen + lo, records, bits, keep)

    def adopt(self, old: ServingState) -> None:
        """Take what does not depend on the model from the serving state (caller holds the
        lock): consents, birthdays, pseudonyms, card tokens, citizen ids and the count. Rows the
        old state gained or re-scored since this one was filled are re-derived separately."""
        n = old.n_citizens
        self.advance(old.position)
        self.consent[:n] = old.consent[:n]
        self.consent_except[:n] = old.consent_except[:n]
        self.consent_position[:n] = old.consent_position[:n]
        self.birth_day[:n] = old.birth_day[:n]
        self.subject[:n] = old.subject[:n]
        if self.tokens.capacity != old.tokens.capacity:
            raise ValueError("the new state's token index has another capacity than the serving one")
        for mine, theirs in ((self.tokens, old.tokens), (self.citizens, old.citizens)):
            np.copyto(mine.slots, theirs.slots)
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
        records, bits = to_records(self.spec, snap.active, default_bits(scenarios))
        local = Records(np.zeros(len(records), np.int64), records.variable, records.day, records.value)
        features = build_features(self.spec, local, 1, self.as_of_day)[0]
        defaults = default_masks(self.spec, local, bits, 1, self.as_of_day)[0]
        with self.writing(row):
            if birth_day is not None:
                self.birth_day[row] = birth_day
            self.features[row] = features
            self.defaults[row] = defaults
            self.adult[row] = adults(self.birth_day[row : row + 1], self.as_of_day)[0]
            rows.rescore(row)
            self.refresh_gate(slice(row, row + 1))
            self.computed_at[row] = _now()
            self.row_position[row] = snap.position
            # read again at the next day rollover: the rollover's index of ageing records (the
            # loading process's, server/ageing.py) may not hold this row's any more
            self.until[row] = DIRTY
        return True

    def rescore(self, scorer: Scorer, n_threads: int = 2) -> None:
        """Score everyone again from the features already derived (a new calibration), and
        mark the state ready."""
        with self.lock:
            self._score(scorer, n_threads)
            self.meta[READY] = 1

    def _score(self, scorer: Scorer, n_threads: int) -> None:
        n = self.n_citizens
        t0 = time.perf_counter()
        scorer.score(self.features[:n], self.adult[:n], out=self.columns.take(slice(0, n)), n_threads=n_threads)
        self.last_batch_seconds = time.perf_counter() - t0
        self.refresh_gate(slice(0, n))
        self.computed_at[:n] = _now()
        self.meta[GENERATION] += 1

    def set_consent(self, row: int, granted: bool, position: int | None = None, exceptions: int = 0) -> bool:
        """A citizen's consent, the blanket and the purposes whose answer differs from it
        (server/consent.py), in their columns and in the gate word the checks read. Caller
        holds the lock. With the store ``position`` of the change, applied only if the row
        holds no newer one (two workers' consent changes may apply in either order); False
        when it was older."""
        if position is not None:
            if position < self.consent_position[row]:
                return False
            self.advance(position)
            self.consent_position[row] = position
        with self.writing(row):
            self.consent[row] = 1 if granted else 0
            self.consent_except[row] = exceptions
            self.refresh_gate(slice(row, row + 1))
        return True

    def read_citizen(self, store: Store, row: int, position: int | None = None) -> CitizenRead:
        """One citizen as the store holds it (no lock needed): the records as of
        ``position`` (default: the store's position now, :meth:`snapshot`), then, at least
        as new, the citizen, the consent with its purpose settings, and the cards.
        NotFound when the store has no such row."""
        snap = self.snapshot(store, row) if position is None else RowSnapshot(
            row, position, store.active_records(citizen_row=row, as_of=position))
        citizen_id, birth_day, blanket = store.citizen_by_row(row)
        settings = [(p, g, e) for _, p, g, e in store.purpose_consents(row)] if self.consent_purposes else []
        return CitizenRead(snap, citizen_id, birth_day, bool(blanket), self._exceptions(bool(blanket), settings),
                           store.cards_of_row(row))

    def apply_citizen(self, read: CitizenRead, scenarios: dict[str, Scenario], rows) -> None:
        """Apply a :meth:`read_citizen` to its row (caller holds the lock): the citizen index,
        pseudonym and count (a citizen added since gets its row), the cards, the consent, and
        the records re-scored, each only where fresher than what the row holds."""
        row = read.snap.row
        self.citizens.insert(citizen_key(read.citizen_id), row)
        self.subject[row] = self.subject_of(read.citizen_id)
        self.meta[N_CITIZENS] = max(self.n_citizens, row + 1)
        for token in read.cards:
            self.tokens.insert(token, row)
        self.set_consent(row, read.blanket, read.snap.position, read.exceptions)
        self.apply(read.snap, scenarios, rows, read.birth_day)

    def consent_of(self, store: Store, row: int) -> tuple[bool, int]:
        """A row's (blanket, exceptions) from the store now (no lock needed)."""
        _, _, blanket = store.citizen_by_row(row)
        settings = [(p, g, e) for _, p, g, e in store.purpose_consents(row)] if self.consent_purposes else []
        return bool(blanket), self._exceptions(bool(blanket), settings)

    def _exceptions(self, blanket: bool, settings) -> int:
        if not self.consent_purposes or not settings:
            return 0
        return self.consent_purposes.exceptions(blanket, settings, self.as_of_day)

    def load_consent_settings(self, store: Store, n: int, day: int | None = None) -> int:
        """Every row's exception mask from the store's purpose settings on ``day`` (default:
        the state's; a load, where few rows have any). Returns how many rows have one."""
        self.consent_except[:n] = 0
        if not self.consent_purposes:
            return 0
        settings = store.purpose_consents()
        if not settings:
            return 0
        rows, purposes, granted, expires = zip(*settings)
        rows = np.asarray(rows, np.int64)
        keep = rows < n
        masks = self.consent_purposes.exceptions_bulk(
            self.consent[:n], rows[keep], np.asarray(purposes, object)[keep], np.asarray(granted, np.int64)[keep],
            np.asarray([-1 if e is None else e for e in expires], np.int64)[keep],
            self.as_of_day if day is None else day)
        self.consent_except[:n] = masks
        return int(np.count_nonzero(masks))

    def reads_allowed(self, row: int, bit: int) -> bool:
        """Whether the purpose of consent ``bit`` is authorised for ``row`` now."""
        return bool((int(self.consent[row]) != 0) ^ ((int(self.consent_except[row]) >> bit) & 1))

    def refresh_gate(self, rows) -> None:
        """Re-pack the gate words of ``rows`` (a slice, or an index array) after a write to
        their adult, consent, score, flags or defaults: the eligibility checks read those
        words, not the columns (server/token_index.pyx pack_gate; each word is one store,
        never seen half written)."""
        words = pack_gate(self.adult[rows], self.consent[rows], self.columns.score[rows], self.columns.flags[rows],
                          self.defaults[rows], out=self.gate[rows] if isinstance(rows, slice) else None,
                          consent_except=self.consent_except[rows])
        if not isinstance(rows, slice):  # an index array selects a copy: write the words back
            self.gate[rows] = words


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc malloc_trim; nothing elsewhere):
    a load's record buckets are many arrays below malloc's mmap threshold, whose memory
    freeing alone leaves in the process."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _now() -> int:
    """Now, in the whole unix seconds ``computed_at`` holds."""
    return int(time.time())


def default_bits(scenarios: dict[str, Scenario]) -> dict[str, int]:
    """Each scenario's bit in the unpaid-default mask (-1: not pay-later)."""
    return {name: s.default_bit for name, s in scenarios.items()}


def to_records(spec: ModelSpec, active: ActiveRecords, bits_of: dict[str, int]) -> tuple[Records, np.ndarray]:
    """Store records -> kernel Records (variables the spec does not score are dropped) and
    each record's pay-later default bit (``bits_of[scenario]``; -1: none). Names become
    indices by a C-level map over a dict (server.store.name_codes), not a Python loop."""
    index = {v.name: i for i, v in enumerate(spec.variables)}
    var = name_codes(active.variable, index, np.int16)
    bits = name_codes(active.scenario, bits_of, np.int64)
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
    # Weights only for the few records that could be a default (weights are per record).
    sel = np.flatnonzero((bits >= 0) & negative[records.variable.astype(np.intp)])
    if not len(sel):
        return masks
    candidates = Records(records.citizen[sel], records.variable[sel], records.day[sel], records.value[sel])
    sel = sel[record_weights(spec, candidates, as_of_day) > 0]
    np.bitwise_or.at(masks, records.citizen[sel], np.uint32(1) << bits[sel].astype(np.uint32))
    return masks


# --- the whole-population load (ServingState.fill) ---------------------------------------

#: Citizens per chunk of a whole-population load: one chunk's records become features at a
#: time, with temporaries of about 100 bytes per record of the chunk (some 12 a citizen).
LOAD_CHUNK_CITIZENS = 1 << 17

#: Records per block read from the store (15 bytes each).
LOAD_BLOCK_RECORDS = 1 << 20

#: citizen_key's BLAKE2b personalisation.
_CITIZEN_KEY_PERSON = b"qj-citizen-row"


def citizen_hashes(audit_key: bytes, ids: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The citizen-index keys (uint8 (n, 16): :func:`citizen_key`) and audit subjects
    (uint64: server.keys.subject_of) of the UTF-8 citizen ids ``ids[offsets[i]:offsets[i + 1]]``:
    the values those functions give one id at a time, computed in C without the GIL
    (server/bulk_read.pyx; SHA-256 on the CPU's SHA extensions where it has them): about
    0.35 us a citizen here, where the two hashes in Python took 1.2 us and more."""
    return _citizen_hashes(audit_key, np.ascontiguousarray(ids, np.uint8), np.ascontiguousarray(offsets, np.int64),
                           _CITIZEN_KEY_PERSON)


class _RecordBuckets:
    """Every active record of a :class:`BulkRead`, read into buckets of ``chunk`` citizens
    (rows ``j * chunk ..``) by a thread of its own per part of the read
    (:attr:`BulkRead.parts`); a bucket keeps the records in the order read (the parts' in
    part order), so each citizen's in the store's order. Reading runs in C without the GIL,
    beside the caller's work on citizens and cards."""

    def __init__(self, reader: BulkRead, variables: list[str], bits: dict[str, int], n: int, chunk: int,
                 block_rows: int = LOAD_BLOCK_RECORDS):
        self.n, self.chunk = n, chunk
        self.k = -(-n // chunk)
        parts = max(1, int(getattr(reader, "parts", 1)))
        # pieces[part][j]: part's blocks of bucket j; counts[part]: its records.
        self.pieces: list[list[list[RecordBlock]]] = [[[] for _ in range(self.k)] for _ in range(parts)]
        self._counts = [0] * parts
        self.finished = 0.0  # perf_counter when the last part was read
        self._errors: list[BaseException] = []
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(reader, variables, bits, block_rows, part),
                                          name=f"qj-load-records-{part}", daemon=True) for part in range(parts)]
        for thread in self._threads:
            thread.start()

    @property
    def records(self) -> int:
        return sum(self._counts)

    def _run(self, reader: BulkRead, variables: list[str], bits: dict[str, int], block_rows: int, part: int) -> None:
        pieces = self.pieces[part]
        blocks = reader.records(variables, bits, block_rows, part)
        try:
            for block in blocks:
                if self._stopping.is_set():
                    return
                self._counts[part] += len(block)
                if self.k == 1:
                    pieces[0].append(block)
                    continue
                # One C pass without the GIL (not a numpy call per bucket and column: each
                # would hand the GIL back to the thread reading citizens for up to 5 ms).
                *columns, bounds = split_block(block.citizen_row, block.variable, block.day, block.value,
                                               block.scenario, self.chunk, self.k)
                del block
                ordered = RecordBlock(*columns)
                bounds = bounds.tolist()
                for j in range(self.k):
                    if bounds[j + 1] > bounds[j]:
                        pieces[j].append(ordered.take(slice(bounds[j], bounds[j + 1])))
        except BaseException as e:  # re-raised by join()
            self._errors.append(e)
            self._stopping.set()
        finally:
            blocks.close()
            self.finished = max(self.finished, time.perf_counter())

    def stop(self) -> None:
        """The load failed elsewhere: stop after the blocks in hand."""
        self._stopping.set()
        for thread in self._threads:
            thread.join()

    def join(self) -> None:
        for thread in self._threads:
            thread.join()
        if self._errors:
            raise self._errors[0]

    def chunks(self) -> list[tuple[int, int]]:
        return [(lo, min(lo + self.chunk, self.n)) for lo in range(0, self.n, self.chunk)]

    def take(self, j: int) -> RecordBlock:
        """Bucket ``j``'s records in one block; the bucket is emptied."""
        pieces = []
        for part in self.pieces:
            pieces += part[j]
            part[j] = []
        return RecordBlock.concat(pieces)
