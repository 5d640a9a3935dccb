"""The durable store: citizens, consent, card tokens and credit records, with the history of
every record and a log of every change.

:class:`Store` is the interface the servicers use; :class:`SQLiteStore` is the embedded
default (one file, WAL journal, zero set-up); :class:`server.store_pg.PostgresStore` fills the
same interface in PostgreSQL and passes the same tests (docs/product.md §6). Pick one with
:func:`open_store`.

    >>> import tempfile
    >>> from server.store import RecordIn, open_store
    >>> tmp = tempfile.TemporaryDirectory()
    >>> store = open_store(f"sqlite:///{tmp.name}/qj.db")   # creates and migrates the file
    >>> store.upsert_citizen("c-1", birth_day=7000)
    (0, True)
    >>> store.set_consent("c-1", granted=True)
    0
    >>> r1 = RecordIn("r-1", "c-1", "traffic_violations", 19000, 1.0, "police")
    >>> store.add_records([r1], sent_by="police")
    ['accepted']
    >>> store.add_records([r1], sent_by="police")              # a resend: nothing changes
    ['duplicate']
    >>> store.add_records([RecordIn("r-1", "c-1", "court_listed_dishonest_debtor", 19000, 1.0, "court")],
    ...                   sent_by="court")                      # another source's r-1
    ['accepted']
    >>> store.correct_record("police", "r-1", day=19001, value=2.0, sent_by="police").version
    2
    >>> [(v.version, v.value, v.status) for v in store.record_history("police", "r-1")]
    [(1, 1.0, 'active'), (2, 2.0, 'active')]
    >>> at = store.last_position()                              # the seq of that correction
    >>> store.set_record_status("court", "r-1", "withdrawn", sent_by="court").status
    'withdrawn'
    >>> store.active_records(citizen_row=0).value.tolist(), store.high_water_mark() == at + 1
    ([2.0], True)
    >>> store.active_records(citizen_row=0, as_of=at).variable.tolist()   # as it stood then
    ['traffic_violations', 'court_listed_dishonest_debtor']
    >>> store.close(); tmp.cleanup()

Contract shared by every implementation:

* Every write is committed durably before the method returns: a record is acknowledged only
  after it is committed. A method that raises has written nothing.
* Citizen rows are dense, ``0..n-1`` in creation order, and never change: they index the
  serving arrays (features, scores) directly.
* Days are integers, days since 1970-01-01; times (``at``, ``received_at``) are seconds since
  the epoch, the server's clock.
* A record is identified by ``(source, record_id)``: two sources may use the same id. A
  resend with the content first stored is a duplicate; with other content it is a
  :class:`RecordConflict`. An id another source used is, to a caller, an id not there.
* Nothing is overwritten: a correction or a withdrawal adds a version of the record
  (:meth:`Store.record_history`); consent grants and revocations are kept too.
* The change log: every write transaction that changes data appends one entry
  ``(seq, at, kind, citizen_row)`` (kind: the write's operation name; citizen_row: the one
  citizen it touched, NULL for several or all), ``seq`` 1, 2, 3 … without gaps, in commit
  order. A version of a record and a consent event carry the ``seq`` (their *position*) of
  the write that made them, so the data as it stood at any position can be read back
  (``active_records(as_of=)``, ``consent_at``). :meth:`Store.high_water_mark` is the last
  ``seq``: it changes whenever stored data changes (and only then), so a snapshot file tagged
  with it can be checked for staleness.
* A write the database refuses for good (a broken constraint, a value it cannot hold) raises
  :class:`StoreRejected`, never :class:`StoreUnavailable` (which callers retry).
* Error messages name the problem, and name citizens and records by their ids: callers decide
  what reaches logs (no identifier of a person may, docs/product.md §5).

Layout (schema version 2). ``record_versions`` is the truth: append-only, one row per version
of a record, keyed ``(record, version)``, each with its day, value, status, ``received_at``,
``sent_by`` and ``position``. ``records`` holds each record's identity and fixed fields
(source, record_id, citizen, variable, scenario) and, updated in the same transaction as each
new version, its current version number, day, value and status: what the current view needs,
so the start-up load (``active_records()``, the whole city) stays one scan of one table, as
fast as before history was kept. When, by whom and where are read from the version row only
(they are the same for every record one write makes, so a seeding write adds no per-record
columns for them). The versions table is read for a record's history, its current version's
details and ``as_of`` reads, which are rare. Seeding writes the version rows with one
``INSERT … SELECT`` from the records just inserted.

The citizens' rights (server/rights.py) keep ``disputes`` and ``repairs``: a row per dispute
or credit-repair application, updated in place as it is answered, suspended, decided or
escalated, each step one transaction with its change in the log; what a step does to the
record is a version of it (a record "suspended" by an unanswered dispute counts no more than
a withdrawn one: only "active" counts). One open dispute and one pending application per
record, kept by partial unique indexes too.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, fields
from itertools import repeat
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Record statuses. Only "active" records count towards a score.
ACTIVE, WITHDRAWN, REPAIRED = "active", "withdrawn", "repaired"
INACTIVE_STATUSES = (WITHDRAWN, REPAIRED)
#: A record whose dispute its source left unanswered past the deadline (server/rights.py): it
#: stops counting until the source answers (never set by :meth:`Store.set_record_status`).
SUSPENDED = "suspended"

#: States of a dispute (server/rights.py): open ones (the record still counts; suspended: past
#: the deadline unanswered, the record suspended), then the source's answer.
DISPUTE_OPEN, DISPUTE_SUSPENDED = "open", "suspended"
DISPUTE_CONFIRMED, DISPUTE_CORRECTED, DISPUTE_WITHDRAWN = "confirmed", "corrected", "withdrawn"
OPEN_DISPUTE_STATES = (DISPUTE_OPEN, DISPUTE_SUSPENDED)
#: States of a credit-repair application.
REPAIR_PENDING, REPAIR_APPROVED, REPAIR_REJECTED = "pending", "approved", "rejected"

#: What :meth:`Store.add_records` says of each record.
ACCEPTED, DUPLICATE = "accepted", "duplicate"

#: What a resend is compared on, in this order (the first that differs is named).
RECORD_CONTENT = ("citizen_id", "variable", "day", "value", "scenario")

TOKEN_BYTES = 16

_INT32 = 2**31


class StoreError(Exception):
    """Anything the store refuses or cannot do."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (connection refused or lost, server shutting down): the
    operation was not done. The next call tries to reconnect."""


class NotFound(StoreError):
    """An id (citizen, record) that the store does not hold."""


class Conflict(StoreError):
    """The request contradicts what is stored (a token bound elsewhere, a withdrawn record)."""


class RecordConflict(Conflict):
    """A record resent with other content than it was first stored with. ``field`` is the
    first of :data:`RECORD_CONTENT` that differs."""

    def __init__(self, source: str, record_id: str, field: str):
        super().__init__(f"record {record_id!r} from source {source!r} is already stored"
                         f" with another {field}")
        self.source, self.record_id, self.field = source, record_id, field

    def __reduce__(self):
        return type(self), (self.source, self.record_id, self.field)


class WrongState(StoreError):
    """The operation does not apply to the item in its current state (a withdrawn record)."""


class DisputeNotFound(NotFound):
    """No dispute of that id on the caller's records (another source's is "not found" too)."""


class RepairNotFound(NotFound):
    """No credit-repair application of that id on the caller's records."""


class DisputeOpen(Conflict):
    """The record has an open dispute already: one at a time per record."""


class RepairPending(Conflict):
    """The record has a credit-repair application waiting for its decision already."""


class UnderReview(WrongState):
    """The record is under the other procedure (a dispute while a repair application waits
    for its decision, or the reverse): one procedure at a time per record."""


class AlreadyClosed(WrongState):
    """The dispute was answered, or the application decided, already: an answer is final."""


class NotRepairable(WrongState):
    """The record cannot be repaired (yet): a positive record, one that no longer counts, or
    one inside its tier's minimum publicity period (server/rights.py)."""


class StoreRejected(StoreError):
    """The store refused the write for a reason that will not go away on a retry (a broken
    constraint, data it cannot hold): nothing was written, and resending it fails again."""


# --------------------------------------------------------------------------------------------
# Values crossing the interface


@dataclass(frozen=True)
class RecordIn:
    """A record as a data source sends it (``day``: days since 1970-01-01)."""

    record_id: str
    citizen_id: str
    variable: str
    day: int
    value: float
    source: str
    scenario: str | None = None


@dataclass(frozen=True)
class RecordRow:
    """A stored record as it is now: its citizen's row, its current version's day, value and
    status (active/withdrawn/repaired), and when, by whom and at which position that version
    was written."""

    record_id: str
    citizen_row: int
    citizen_id: str
    variable: str
    day: int
    value: float
    source: str
    scenario: str | None
    status: str
    version: int
    received_at: float
    sent_by: str
    position: int


@dataclass(frozen=True)
class RecordVersion:
    """One version of a record, as written: version 1 is the record as first received.
    ``received_at`` is 0 for records stored before versions were kept (schema version 1)."""

    version: int
    day: int
    value: float
    status: str
    received_at: float
    sent_by: str
    position: int


@dataclass(frozen=True)
class ConsentEvent:
    """One grant or revocation, ``at`` in seconds since the epoch (UTC), written at change
    log ``position``."""

    granted: bool
    at: float
    position: int


@dataclass(frozen=True)
class DisputeRow:
    """A citizen's dispute of one record (server/rights.py), with the record as it is now.
    Times are the rights clock's, seconds since the epoch; ``position`` is the change log
    position of the latest write to the dispute."""

    dispute_id: str
    citizen_row: int
    citizen_id: str
    source: str
    record_id: str
    variable: str
    reason: str
    state: str  # OPEN_DISPUTE_STATES, or the answer: confirmed, corrected, withdrawn
    filed_by: str
    filed_at: float
    due_at: float
    suspended_at: float | None
    answered_by: str | None
    answered_at: float | None
    note: str | None
    position: int
    record_status: str
    record_version: int


@dataclass(frozen=True)
class RepairRow:
    """A credit-repair application for one record (server/rights.py), with the record as it
    is now. ``escalated_at``: when the decision's deadline passed undecided."""

    repair_id: str
    citizen_row: int
    citizen_id: str
    source: str
    record_id: str
    variable: str
    tier: str
    statement: str
    state: str  # pending, approved, rejected
    filed_by: str
    filed_at: float
    due_at: float
    escalated_at: float | None
    decided_by: str | None
    decided_at: float | None
    decision_reason: str | None
    position: int
    record_status: str
    record_version: int


@dataclass(frozen=True)
class RightsMarks:
    """A citizen's open disputes as they stood right after the write at ``position``: the
    variable and the state (open or suspended) of each, for the marks the explanation shows."""

    citizen_row: int
    position: int
    open: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class CitizenRecord:
    """One of a citizen's records as it is now, with the dispute or repair application open
    on it ("" for none)."""

    record: RecordRow
    open_dispute: str
    pending_repair: str


@dataclass(frozen=True, eq=False)
class ActiveRecords:
    """Active records as columns, in insertion order; all arrays have the same length.

    ``variable`` holds model variable *names* (object array of str), not kernel indices: the
    index of a variable depends on the model spec, which the store does not know. Map them
    with the spec (``spec.variable_index(name)``) when building :class:`kernel.features.Records`.
    """

    record_id: np.ndarray  # object: str
    citizen_row: np.ndarray  # int64
    variable: np.ndarray  # object: str, the variable's name
    day: np.ndarray  # int32: days since 1970-01-01
    value: np.ndarray  # float32
    scenario: np.ndarray  # object: str or None

    @classmethod
    def from_rows(cls, rows: Sequence[tuple]) -> ActiveRecords:
        """From ``(record_id, citizen_row, variable, day, value, scenario)`` tuples."""
        cols = list(zip(*rows)) if rows else [()] * 6
        return cls(
            record_id=_objects(cols[0]),
            citizen_row=np.asarray(cols[1], np.int64),
            variable=_objects(cols[2]),
            day=np.asarray(cols[3], np.int32),
            value=np.asarray(cols[4], np.float32),
            scenario=_objects(cols[5]),
        )

    def __len__(self) -> int:
        return len(self.citizen_row)

    def for_citizen(self, citizen_row: int) -> ActiveRecords:
        """The subset belonging to one citizen (use ``Store.active_records(row)`` to query)."""
        keep = self.citizen_row == citizen_row
        return ActiveRecords(**{f.name: getattr(self, f.name)[keep] for f in fields(self)})


@dataclass(frozen=True, eq=False)
class CitizenTable:
    """All citizens; position ``i`` is the citizen whose row is ``i``."""

    ids: list[str]
    birth_day: np.ndarray  # int32: days since 1970-01-01
    consent: np.ndarray  # uint8: 1 when scoring is currently authorised, else 0

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, eq=False)
class CardTable:
    """All card tokens in registration order, with the row of the citizen each is bound to."""

    tokens: np.ndarray  # uint8, shape (n, 16)
    citizen_row: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.citizen_row)


def _objects(values: Sequence) -> np.ndarray:
    # np.asarray would turn a column of str into a fixed-width unicode array (and a column of
    # None into float NaN); an object array keeps the Python values as they are.
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _check_token(token: bytes) -> bytes:
    if not isinstance(token, (bytes, bytearray, memoryview)) or len(token) != TOKEN_BYTES:
        raise ValueError(f"card token must be exactly {TOKEN_BYTES} bytes")
    return bytes(token)


def _token_hint(token: bytes) -> str:
    # Enough to find the token in the partner's own logs, not enough to use it.
    return token.hex()[:8] + "…"


def _check_sent_by(sent_by: str) -> str:
    if not isinstance(sent_by, str) or not sent_by:
        raise ValueError(f"sent_by must be the sender's identity, a non-empty string; got {sent_by!r}")
    return sent_by


def _check_day(day: int, what: str) -> int:
    # Days are int32 everywhere else (PostgreSQL's column, ActiveRecords.day): refuse here,
    # the same way on both stores, what one of them would store and the other refuse.
    day = int(day)
    if not -_INT32 <= day < _INT32:
        raise ValueError(f"{what}: day {day} is out of range")
    return day


def _check_value(value: float, what: str) -> float:
    # SQLite stores NaN as NULL, PostgreSQL as NaN: refuse non-finite values on both.
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what}: value {value} is not a finite number")
    return value


def _check_position(as_of: int) -> int:
    if isinstance(as_of, bool) or not isinstance(as_of, (int, np.integer)) or as_of < 0:
        raise ValueError(f"as_of must be a change log position, an integer >= 0; got {as_of!r}")
    return int(as_of)


def _content(r: RecordIn) -> tuple:
    """What a resend is compared on (:data:`RECORD_CONTENT`), normalised as stored."""
    what = f"record {r.record_id!r}"
    return (r.citizen_id, r.variable, _check_day(r.day, what), _check_value(r.value, what), r.scenario)


def _classify(records: Sequence[RecordIn], stored: dict[tuple[str, str], tuple]) -> tuple[list[str], list[int]]:
    """add_records' verdicts: per record "accepted" or "duplicate", and the indexes of the
    accepted ones. ``stored`` maps each (source, record_id) already stored to its first
    content; a repeat inside the batch counts as stored by its first occurrence."""
    verdicts: list[str] = []
    new: list[int] = []
    firsts = dict(stored)
    for i, r in enumerate(records):
        key, content = (r.source, r.record_id), _content(r)
        first = firsts.get(key)
        if first is None:
            firsts[key] = content
            verdicts.append(ACCEPTED)
            new.append(i)
            continue
        for name, was, now in zip(RECORD_CONTENT, first, content):
            if was != now:
                raise RecordConflict(r.source, r.record_id, name)
        verdicts.append(DUPLICATE)
    return verdicts, new


@dataclass
class _Transaction:
    """The write transaction in progress: its operation and, once it has changed something,
    its change log entry."""

    operation: str
    position: int | None = None
    at: float = 0.0
    citizen_row: int | None = None


# --------------------------------------------------------------------------------------------
# The interface


class Store(abc.ABC):
    """Durable storage behind the gRPC servicers. See the module docstring for the contract.

    Usable as a context manager (``with open_store(url) as store: ...``) to close it.
    """

    #: Where the store is, for messages and logs (never a password).
    name: str = "store"

    @abc.abstractmethod
    def migrate(self) -> None:
        """Create or upgrade the schema (version in table ``schema_version``). Idempotent;
        implementations run it when they open."""

    # Citizens and consent ---------------------------------------------------------------

    @abc.abstractmethod
    def upsert_citizen(self, citizen_id: str, birth_day: int) -> tuple[int, bool]:
        """Create the citizen or update its birth day. Returns ``(row, created)``."""

    @abc.abstractmethod
    def upsert_citizens_bulk(self, ids: Sequence[str], birth_days: np.ndarray) -> None:
        """Seeding: upsert many citizens in one transaction; new ones get rows in list order."""

    @abc.abstractmethod
    def citizen_row(self, citizen_id: str) -> int:
        """The citizen's row. :class:`NotFound` for an unknown id."""

    @abc.abstractmethod
    def citizens(self) -> CitizenTable:
        """All citizens in row order, with their current consent (0 when never granted)."""

    @abc.abstractmethod
    def set_consent(self, citizen_id: str, granted: bool) -> int:
        """Grant or revoke; appended to the consent history too. Returns the citizen's row."""

    @abc.abstractmethod
    def set_consents_bulk(self, rows: np.ndarray, granted: bool) -> None:
        """Seeding: grant or revoke for many citizen rows in one transaction."""

    @abc.abstractmethod
    def consent_history(self, citizen_id: str) -> list[ConsentEvent]:
        """Every grant and revocation of one citizen, oldest first."""

    @abc.abstractmethod
    def consent_at(self, citizen_row: int, as_of: int, purpose: str | None = None, day: int | None = None) -> bool:
        """Whether scoring the citizen was authorised right after the write at position
        ``as_of`` (False before any grant, or before the citizen existed): the blanket
        authorisation, or with ``purpose`` that purpose's (its setting, a grant counted only
        up to its expiry on ``day``; server/consent.py). :class:`NotFound` for a row the store
        does not hold."""

    @abc.abstractmethod
    def set_purpose_consent(self, citizen_id: str, purposes: Sequence[str], granted: bool,
                            expires_day: int | None = None) -> int:
        """Grant (until ``expires_day`` inclusive, or with no end) or revoke each of
        ``purposes`` alone, in one write; the others keep their settings. Returns the row."""

    @abc.abstractmethod
    def purpose_consents(self, citizen_row: int | None = None) -> list[tuple[int, str, int, int | None]]:
        """The purpose settings ``(citizen_row, purpose, granted, expires_day)`` of one
        citizen, or of everyone, by row and purpose."""

    @abc.abstractmethod
    def consent_rows_expiring(self, first_day: int, last_day: int) -> list[int]:
        """The citizens with a purpose grant whose last day lies in [first_day, last_day]."""

    # Card tokens ------------------------------------------------------------------------

    @abc.abstractmethod
    def register_card(self, token: bytes, citizen_id: str) -> tuple[int, bool]:
        """Bind a 16-byte token to a citizen. Returns ``(citizen_row, created)``; created is
        False when it was already bound to this citizen, :class:`Conflict` when to another."""

    @abc.abstractmethod
    def register_cards_bulk(self, tokens: np.ndarray, rows: np.ndarray) -> None:
        """Seeding: bind ``tokens`` (uint8, shape (n, 16)), all new, to citizen ``rows``."""

    @abc.abstractmethod
    def cards(self) -> CardTable:
        """All card tokens, in registration order."""

    # Records ----------------------------------------------------------------------------

    @abc.abstractmethod
    def add_records(self, records: Sequence[RecordIn], sent_by: str) -> list[str]:
        """Insert a batch in one transaction, sent by the caller identity ``sent_by``.

        Per record "accepted" (stored as version 1) or "duplicate": its (source, record_id)
        is stored already with the same content (:data:`RECORD_CONTENT`) as its version 1, so
        nothing changes. With other content, :class:`RecordConflict`. That, or an unknown
        citizen (:class:`NotFound`), and nothing of the batch is written."""

    @abc.abstractmethod
    def add_records_bulk(
        self, citizen_row: np.ndarray, variable: Sequence[str] | np.ndarray, day: np.ndarray,
        value: np.ndarray, source: str, record_ids: Sequence[str], sent_by: str | None = None,
    ) -> None:
        """Seeding: insert many new records of one source (no scenario) in one transaction,
        one change in the log; ``sent_by`` defaults to the source. :class:`Conflict` if an
        id is stored already or repeated."""

    @abc.abstractmethod
    def bulk_load(self) -> AbstractContextManager[BulkLoad]:
        """Seeding at scale (server/seed.py): a :class:`BulkLoad` into an EMPTY store
        (:class:`Conflict` otherwise), written in one transaction with one change in the
        log, committed when the ``with`` block ends, all rolled back if it raises (or the
        process dies): the store is then as empty as before. Secondary indexes are built
        at the end. ``last_position()`` and ``high_water_mark()`` are the load's position
        after it (unchanged if nothing was added). The load holds the store (and the
        writers' lock) until the block ends: make no other call on it meanwhile."""

    @abc.abstractmethod
    def get_record(self, source: str, record_id: str) -> RecordRow:
        """One record as it is now, whatever its status. :class:`NotFound` when the source
        has no record of that id (the same whether or not another source has one)."""

    @abc.abstractmethod
    def correct_record(self, source: str, record_id: str, day: int, value: float, sent_by: str) -> RecordRow:
        """Add a version with another day and value to an active record (:class:`WrongState`
        if it is not active). The same day and value again change nothing."""

    @abc.abstractmethod
    def set_record_status(self, source: str, record_id: str, status: str, sent_by: str) -> RecordRow:
        """Add a version marking the record "withdrawn" or "repaired": it stops counting.
        The status it has already changes nothing."""

    @abc.abstractmethod
    def record_history(self, source: str, record_id: str) -> list[RecordVersion]:
        """Every version of one record, oldest first. :class:`NotFound` as get_record."""

    @abc.abstractmethod
    def active_records(self, citizen_row: int | None = None, as_of: int | None = None) -> ActiveRecords:
        """All active records, or one citizen's, in insertion order. ``as_of``: as they stood
        right after the write at that position (each record's latest version written at or
        before it, if active), with the day and value of that version."""

    def bulk_read(self) -> BulkRead:
        """The whole population for a start-up load, in bounded blocks of numpy arrays
        (:class:`BulkRead`; close it, or use it as a context manager). This default reads
        :meth:`citizens`, :meth:`cards` and :meth:`active_records` whole: implementations
        stream instead (the load's memory stays bounded)."""
        return StoreBulkRead(self)

    def rows_read(self) -> RowsRead:
        """Chosen citizens' active records, all as of one store position (:class:`RowsRead`:
        the day rollover's reads; close it, or use it as a context manager). This default
        reads each citizen's with :meth:`active_records` ``as_of`` that position."""
        return StoreRowsRead(self)

    # Bookkeeping ------------------------------------------------------------------------

    @abc.abstractmethod
    def counts(self) -> dict[str, int]:
        """citizens, cards, records, active_records, consents_granted."""

    @abc.abstractmethod
    def high_water_mark(self) -> int:
        """The position (seq) of the last change in the log; 0 for none."""

    @abc.abstractmethod
    def population_bounds(self) -> tuple[int, int]:
        """``(citizens, cards)``: the citizens (rows are dense) and an upper bound on the cards,
        from the keys' maxima: what sizing the serving state needs, without counting a
        city's rows."""

    @abc.abstractmethod
    def changes_since(self, position: int) -> list[tuple[int, str, int | None]]:
        """The change log after ``position``: ``(seq, kind, citizen_row)`` in seq order
        (citizen_row None for a write that touched several citizens or all)."""

    @abc.abstractmethod
    def first_change_at(self) -> float | None:
        """When this store's first change was written (which store a snapshot came from);
        None for a store without changes."""

    @abc.abstractmethod
    def citizen_by_row(self, citizen_row: int) -> tuple[str, int, bool]:
        """``(citizen_id, birth_day, consent)`` of a row; :class:`NotFound` if none."""

    @abc.abstractmethod
    def cards_of_row(self, citizen_row: int) -> list[bytes]:
        """The card tokens bound to a citizen row, in registration order."""

    @abc.abstractmethod
    def last_position(self) -> int:
        """The position of the latest committed write made through this object (0 for
        none): read it right after a write, under the caller's own lock, to know where that
        write stands in the log."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection. Idempotent."""

    def ping(self) -> None:
        """Raise StoreUnavailable (or another StoreError) unless the store answers now."""
        self.counts()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Bulk loads: seeding an empty store at scale (server/seed.py)


@dataclass(frozen=True, eq=False)
class LoadChunk:
    """One slice of a bulk load (:meth:`Store.bulk_load`), written in the order given.

    Citizens: ``citizen_ids`` are new; they take the next rows (``0, 1, …`` over the whole
    load), in list order, with their ``birth_days`` and ``consent`` (True: scoring
    authorised, one grant in the consent history at the load's position; None: nobody).
    Cards: ``card_tokens`` (uint8, shape (k, 16)) bound to ``card_rows``. Records: one per
    entry of ``record_rows``, of variable ``variables[record_variables[i]]``, from (and sent
    by) source ``sources[record_sources[i]]``, with ``record_days`` and ``record_values``, no
    scenario; record ``i``'s id is ``f"{record_id_prefix}{record_id_first + i}"``. Rows may
    name any citizen loaded so far, this chunk's own included. Records of one variable and
    source that follow each other are written as one run: keep them together."""

    citizen_ids: Sequence[str] = ()
    birth_days: np.ndarray | Sequence[int] = ()
    consent: np.ndarray | None = None
    card_tokens: np.ndarray | None = None
    card_rows: np.ndarray | Sequence[int] = ()
    record_rows: np.ndarray | Sequence[int] = ()
    record_variables: np.ndarray | Sequence[int] = ()
    record_days: np.ndarray | Sequence[int] = ()
    record_values: np.ndarray | Sequence[float] = ()
    record_sources: np.ndarray | Sequence[int] = ()
    variables: Sequence[str] = ()
    sources: Sequence[str] = ()
    record_id_prefix: str = ""
    record_id_first: int = 0


@dataclass(frozen=True, eq=False)
class _Checked:
    """A LoadChunk validated, as arrays, with the rows and internal record ids it takes."""

    first_row: int  # the row of its first citizen
    ids: list[str]
    birth_days: np.ndarray  # int64
    consent: np.ndarray  # bool
    tokens: np.ndarray  # uint8 (k, 16)
    card_rows: np.ndarray  # int64
    first_record: int  # the internal id (records.id) of its first record
    rows: np.ndarray  # int64
    variable: np.ndarray  # intp: codes into variables
    day: np.ndarray  # int64
    value: np.ndarray  # float64
    source: np.ndarray  # intp: codes into sources
    variables: list[str]
    sources: list[str]
    id_prefix: str
    id_first: int

    def runs(self, *more: np.ndarray) -> list[tuple[int, int]]:
        """``(start, stop)`` of each run of records with the same variable and source (and
        the same value in each of ``more``)."""
        n = len(self.rows)
        if n == 0:
            return []
        change = (self.variable[1:] != self.variable[:-1]) | (self.source[1:] != self.source[:-1])
        for key in more:
            change |= key[1:] != key[:-1]
        cuts = [0, *(np.flatnonzero(change) + 1).tolist(), n]
        return list(zip(cuts[:-1], cuts[1:]))


class BulkLoad(abc.ABC):
    """An open bulk load (:meth:`Store.bulk_load`): add :class:`LoadChunk` s, one at a time
    (:meth:`add`) or pipelined (:meth:`add_all`). Everything is written in the load's one
    transaction, at its one change log position (:attr:`position`, time :attr:`at`).

    Each chunk is first *encoded* (validated, then turned into what the store takes in bulk:
    statements with packed parameters for SQLite, binary ``COPY`` data for PostgreSQL), then
    *written*. Encoding touches no connection, so :meth:`add_all` encodes (and produces) the
    next chunk on a helper thread while this one writes the last: the database's work and
    Python's overlap on two cores."""

    position: int = 0
    at: float = 0.0

    def __init__(self) -> None:
        self.citizens = self.cards = self.records = 0  # encoded so far
        self._encode_lock = threading.Lock()

    def add(self, chunk: LoadChunk) -> None:
        self._write(self._encode(chunk))

    def add_all(self, chunks: Iterable[LoadChunk], written: Callable[[LoadChunk], None] | None = None) -> None:
        """Write every chunk of ``chunks`` (an iterable, consumed on a helper thread, so a
        generator may produce them lazily there), calling ``written(chunk)`` after each.
        At most two chunks wait encoded. An exception from ``chunks``, encoding or writing
        ends the load's writing here (and, raised out of the ``with``, rolls it all back)."""
        handoff: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()
        done = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    handoff.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for chunk in chunks:
                    if stop.is_set() or not put((chunk, self._encode(chunk))):
                        return
                put(done)
            except BaseException as e:  # handed to the writer, which raises it
                put(e)

        helper = threading.Thread(target=produce, name="qj-bulk-load", daemon=True)
        helper.start()
        try:
            while True:
                item = handoff.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                chunk, encoded = item
                self._write(encoded)
                del encoded, item
                if written is not None:
                    written(chunk)
        finally:
            stop.set()
            helper.join()

    def _check(self, chunk: LoadChunk) -> _Checked:
        """Validate a chunk and give it its rows and record ids (chunks are numbered in the
        order they are encoded, which is the order they are written)."""
        ids = list(chunk.citizen_ids)
        if not all(isinstance(i, str) for i in ids):
            raise ValueError("bulk load: citizen ids must be strings")
        birth = np.asarray(chunk.birth_days, np.int64).reshape(-1)
        consent = (np.zeros(len(ids), bool) if chunk.consent is None
                   else np.asarray(chunk.consent).astype(bool).reshape(-1))
        if not len(birth) == len(consent) == len(ids):
            raise ValueError("bulk load: citizen_ids, birth_days and consent must have the same length")
        _check_int32(birth, "birth days")
        tokens = (np.empty((0, TOKEN_BYTES), np.uint8) if chunk.card_tokens is None
                  else np.ascontiguousarray(chunk.card_tokens, np.uint8))
        card_rows = np.asarray(chunk.card_rows, np.int64).reshape(-1)
        if tokens.ndim != 2 or tokens.shape[1] != TOKEN_BYTES or len(tokens) != len(card_rows):
            raise ValueError(f"bulk load: card tokens must have shape (n, {TOKEN_BYTES}) with n = len(card_rows)")
        rows = np.asarray(chunk.record_rows, np.int64).reshape(-1)
        variable = np.asarray(chunk.record_variables, np.intp).reshape(-1)
        day = np.asarray(chunk.record_days, np.int64).reshape(-1)
        value = np.asarray(chunk.record_values, np.float64).reshape(-1)
        source = np.asarray(chunk.record_sources, np.intp).reshape(-1)
        if not len(rows) == len(variable) == len(day) == len(value) == len(source):
            raise ValueError("bulk load: all record columns must have the same length")
        variables, sources = [str(v) for v in chunk.variables], [str(s) for s in chunk.sources]
        for codes, names, what in ((variable, variables, "variable"), (source, sources, "source")):
            if len(codes) and (codes.min() < 0 or codes.max() >= len(names)):
                raise ValueError(f"bulk load: a record's {what} code is not an index into the {len(names)} names given")
        if any(not s for s in sources):
            raise ValueError("bulk load: a source (the records' sender) must be a non-empty string")
        _check_int32(day, "record days")
        if not np.isfinite(value).all():
            raise ValueError("bulk load: every record value must be a finite number")
        if len(rows) and (not isinstance(chunk.record_id_first, (int, np.integer)) or chunk.record_id_first < 0):
            raise ValueError("bulk load: record_id_first must be an integer >= 0")
        with self._encode_lock:
            first_row, first_record = self.citizens, self.records + 1
            n = first_row + len(ids)
            # Rows are dense: a range check proves every row exists (the per-row foreign key
            # checks are off, or the constraints dropped, for the load).
            for r, what in ((card_rows, "card"), (rows, "record")):
                if len(r) and (r.min() < 0 or r.max() >= n):
                    raise NotFound(f"bulk load: {what} citizen rows must be in 0..{n - 1}; got {r.min()}..{r.max()}")
            if n > _INT32:
                raise ValueError("bulk load: at most 2**31 citizens")
            self.citizens, self.cards, self.records = n, self.cards + len(card_rows), self.records + len(rows)
        return _Checked(first_row, ids, birth, consent, tokens, card_rows, first_record, rows, variable, day, value,
                        source, variables, sources, chunk.record_id_prefix, int(chunk.record_id_first))

    @abc.abstractmethod
    def _encode(self, chunk: LoadChunk) -> object:
        """The chunk validated and in the store's bulk form (no connection is used)."""

    @abc.abstractmethod
    def _write(self, encoded: object) -> None:
        """Write one encoded chunk in the load's transaction."""


def _check_int32(values: np.ndarray, what: str) -> None:
    if len(values) and not (-_INT32 <= values.min() and values.max() < _INT32):
        raise ValueError(f"bulk load: {what} must be in int32 range; got {values.min()}..{values.max()}")


def _digits(values: np.ndarray, width: int) -> np.ndarray:
    """Non-negative integers as zero-padded decimal ASCII: uint8, shape (n, width)."""
    v = np.asarray(values).astype(np.uint64)
    out = np.empty((len(v), width), np.uint8)
    ten = np.uint64(10)
    for k in range(width - 1, -1, -1):
        out[:, k] = v % ten
        v //= ten
    out += 48
    return out


def _json_ints(values: np.ndarray) -> str:
    """A JSON array of non-negative integers, built without a Python object per number:
    fixed width, leading zeros turned into spaces (JSON numbers have none; spaces are
    whitespace between tokens)."""
    v = np.asarray(values, np.int64)
    if not len(v):
        return "[]"
    width = len(str(int(v.max())))
    text = np.empty((len(v), width + 1), np.uint8)
    text[:, :width] = _digits(v, width)
    lengths = np.searchsorted(10 ** np.arange(1, width, dtype=np.int64), v, side="right") + 1
    text[:, :width][np.arange(width) < (width - lengths)[:, None]] = 32
    text[:, width] = 44  # ","
    return "[" + text.tobytes()[:-1].decode("ascii") + "]"


def _dyadic(values: np.ndarray) -> tuple[np.ndarray, int] | None:
    """``(ints, k)`` with ``ints * 2.0**-k == values`` exactly (as SQLite computes an integer
    times a real), ``|ints| < 2**62``; None when the values do not allow it (-0.0, or
    magnitudes too far apart). Every float32 value and most float64 ones do."""
    zero = values == 0
    if np.signbit(values[zero]).any():
        return None
    nonzero = values[~zero]
    if not len(nonzero):
        return np.zeros(len(values), np.int64), 0
    mantissa, exponent = np.frexp(nonzero)  # nonzero = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    bits = np.abs(mantissa * 2.0**53).astype(np.int64)  # exact: a 53-bit integer
    low = np.log2((bits & -bits).astype(np.float64)).astype(np.int64)  # its trailing zero bits
    k = max(0, int((53 - exponent - low).max()))
    if k > 1000:
        return None
    scaled = np.ldexp(values, k)
    if np.abs(scaled).max() >= 2.0**62:
        return None
    ints = scaled.astype(np.int64)
    if not np.array_equal(ints.astype(np.float64) * 2.0**-k, values):
        return None
    return ints, k


class _NothingLoaded(Exception):
    """A bulk load that added nothing: rolled back, so the log gets no change."""


# --------------------------------------------------------------------------------------------
# SQLite

#: Schema migrations: MIGRATIONS[i] takes the schema from version i to version i + 1. Append
#: only; never edit a released step (databases in the field have already run it).
MIGRATIONS: list[list[str]] = [
    [
        # citizen_row is the rowid: dense 0..n-1, assigned explicitly (see _NEXT_ROW).
        """CREATE TABLE citizens (
            citizen_row INTEGER PRIMARY KEY,
            citizen_id TEXT NOT NULL UNIQUE,
            birth_day INTEGER NOT NULL,
            consent INTEGER NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE consent_history (
            id INTEGER PRIMARY KEY,
            citizen_row INTEGER NOT NULL REFERENCES citizens (citizen_row),
            granted INTEGER NOT NULL,
            at REAL NOT NULL
        )""",
        "CREATE INDEX consent_history_by_citizen ON consent_history (citizen_row)",
        """CREATE TABLE cards (
            id INTEGER PRIMARY KEY,
            token BLOB NOT NULL UNIQUE CHECK (length(token) = 16),
            citizen_row INTEGER NOT NULL REFERENCES citizens (citizen_row)
        )""",
        "CREATE INDEX cards_by_citizen ON cards (citizen_row)",
        # No CHECK on status: a later status (e.g. "disputed", docs/product.md §5) should not
        # need a table rebuild, which is what changing a CHECK costs in SQLite. The code checks.
        """CREATE TABLE records (
            id INTEGER PRIMARY KEY,
            record_id TEXT NOT NULL UNIQUE,
            citizen_row INTEGER NOT NULL REFERENCES citizens (citizen_row),
            variable TEXT NOT NULL,
            day INTEGER NOT NULL,
            value REAL NOT NULL,
            source TEXT NOT NULL,
            scenario TEXT,
            status TEXT NOT NULL DEFAULT 'active'
        )""",
        "CREATE INDEX records_by_citizen ON records (citizen_row, status)",
        # The high-water mark: one row, bumped by every transaction that changes data.
        "CREATE TABLE changes (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL)",
        "INSERT INTO changes (id, n) VALUES (1, 0)",
    ],
    [
        # Version 2: a record is identified by (source, record_id) and every version of it is
        # kept; the change log replaces the one-row counter.
        "ALTER TABLE changes RENAME TO changes_v1",
        """CREATE TABLE changes (
            seq INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            citizen_row INTEGER
        )""",
        # The mark must not go backwards: the old counter becomes the first entry, standing
        # for every change made before the log was kept (time unknown: 0), and everything
        # already stored counts as written at that position.
        "INSERT INTO changes (seq, at, kind) SELECT n, 0, 'before_log' FROM changes_v1 WHERE n > 0",
        # (SQLite adds a NOT NULL column only with a default; every insert gives the position.)
        "ALTER TABLE consent_history ADD COLUMN position INTEGER NOT NULL DEFAULT 0",
        "UPDATE consent_history SET position = (SELECT n FROM changes_v1)",
        # SQLite cannot drop the UNIQUE (record_id) of version 1: the table is rebuilt, its
        # columns in the same order as PostgreSQL's after its ALTER TABLEs.
        """CREATE TABLE records_v2 (
            id INTEGER PRIMARY KEY,
            record_id TEXT NOT NULL,
            citizen_row INTEGER NOT NULL REFERENCES citizens (citizen_row),
            variable TEXT NOT NULL,
            day INTEGER NOT NULL,
            value REAL NOT NULL,
            source TEXT NOT NULL,
            scenario TEXT,
            status TEXT NOT NULL DEFAULT 'active',
            version INTEGER NOT NULL DEFAULT 1,
            UNIQUE (source, record_id)
        )""",
        """INSERT INTO records_v2 (id, record_id, citizen_row, variable, day, value, source, scenario, status)
           SELECT id, record_id, citizen_row, variable, day, value, source, scenario, status
           FROM records ORDER BY id""",
        "DROP TABLE records",
        "ALTER TABLE records_v2 RENAME TO records",
        "CREATE INDEX records_by_citizen ON records (citizen_row, status)",
        # Append-only: one row per version of a record (records holds the latest one's number,
        # day, value and status). WITHOUT ROWID: the versions of a record sit together, in
        # the key's order. No foreign key on ``record``: versions are only ever written with
        # their records row, in the same transaction, and records are never deleted, while
        # PostgreSQL's per-row check would make seeding a million records seconds slower.
        """CREATE TABLE record_versions (
            record INTEGER NOT NULL,
            version INTEGER NOT NULL CHECK (version >= 1),
            day INTEGER NOT NULL,
            value REAL NOT NULL,
            status TEXT NOT NULL,
            received_at REAL NOT NULL,
            sent_by TEXT NOT NULL,
            position INTEGER NOT NULL,
            PRIMARY KEY (record, version)
        ) WITHOUT ROWID""",
        # A stored record becomes version 1 of itself, as it is now (a withdrawal overwrote
        # what it was before): received at an unknown time (0), sent by its source.
        """INSERT INTO record_versions (record, version, day, value, status, received_at, sent_by, position)
           SELECT id, 1, day, value, status, 0, source, (SELECT n FROM changes_v1) FROM records ORDER BY id""",
        "DROP TABLE changes_v1",
    ],
    [
        # The citizens' rights (server/rights.py): a citizen's dispute of a record, which the
        # record's source answers before a deadline, and a credit-repair application, which it
        # decides. Times are the rights clock's, seconds since the epoch; ``position`` is the
        # change log position of the latest write to the row. ``record`` is records.id: no
        # foreign key (as record_versions: records are never deleted, and PostgreSQL's bulk
        # load drops and restores the records table's keys, which a reference would pin).
        """CREATE TABLE disputes (
            id INTEGER PRIMARY KEY,
            dispute_id TEXT NOT NULL UNIQUE,
            record INTEGER NOT NULL,
            citizen_row INTEGER NOT NULL,
            source TEXT NOT NULL,
            reason TEXT NOT NULL,
            state TEXT NOT NULL,
            filed_by TEXT NOT NULL,
            filed_at REAL NOT NULL,
            due_at REAL NOT NULL,
            suspended_at REAL,
            answered_by TEXT,
            answered_at REAL,
            note TEXT,
            position INTEGER NOT NULL
        )""",
        # One open dispute per record, whatever the code does.
        "CREATE UNIQUE INDEX disputes_one_open ON disputes (record) WHERE state IN ('open', 'suspended')",
        "CREATE INDEX disputes_by_citizen ON disputes (citizen_row)",
        "CREATE INDEX disputes_by_source ON disputes (source, state)",
        "CREATE INDEX disputes_due ON disputes (state, due_at)",
        """CREATE TABLE repairs (
            id INTEGER PRIMARY KEY,
            repair_id TEXT NOT NULL UNIQUE,
            record INTEGER NOT NULL,
            citizen_row INTEGER NOT NULL,
            source TEXT NOT NULL,
            tier TEXT NOT NULL,
            statement TEXT NOT NULL,
            state TEXT NOT NULL,
            filed_by TEXT NOT NULL,
            filed_at REAL NOT NULL,
            due_at REAL NOT NULL,
            escalated_at REAL,
            decided_by TEXT,
            decided_at REAL,
            decision_reason TEXT,
            position INTEGER NOT NULL
        )""",
        "CREATE UNIQUE INDEX repairs_one_pending ON repairs (record) WHERE state = 'pending'",
        "CREATE INDEX repairs_by_citizen ON repairs (citizen_row)",
        "CREATE INDEX repairs_by_source ON repairs (source, state)",
        "CREATE INDEX repairs_due ON repairs (state, due_at)",
    ],
    [
        # Consent by purpose (server/consent.py): a citizen's setting per scenario or read
        # purpose (a grant, with an expiry day or none, or a revocation) overrides the blanket
        # authorisation (citizens.consent) for that purpose; the blanket's own grant or
        # revocation clears them. The history keeps each change with its purpose ('' for the
        # blanket) and expiry, so a replay sees the consent of a decision's own purpose.
        "ALTER TABLE consent_history ADD COLUMN purpose TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE consent_history ADD COLUMN expires_day INTEGER",
        """CREATE TABLE purpose_consents (
            citizen_row INTEGER NOT NULL,
            purpose TEXT NOT NULL,
            granted INTEGER NOT NULL,
            expires_day INTEGER,
            position INTEGER NOT NULL,
            PRIMARY KEY (citizen_row, purpose)
        )""",
        "CREATE INDEX purpose_consents_expiring ON purpose_consents (expires_day) WHERE expires_day IS NOT NULL",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)

# Rows are assigned inside the write transaction, which holds the database's write lock, so
# MAX + 1 cannot race with another writer (thread or process).
_NEXT_ROW = "(SELECT COALESCE(MAX(citizen_row), -1) + 1 FROM citizens)"

#: Page cache for the bulk (seeding) writes, KiB.
_BULK_CACHE_KIB = 256 * 1024

#: A record as it is now: its current row, and when, by whom and where its version was written.
_RECORD = """
    SELECT r.id, r.record_id, r.citizen_row, c.citizen_id, r.variable, r.day, r.value, r.source,
           r.scenario, r.status, r.version, v.received_at, v.sent_by, v.position
    FROM records r JOIN citizens c USING (citizen_row)
    JOIN record_versions v ON v.record = r.id AND v.version = r.version
    WHERE r.source = ? AND r.record_id = ?"""

#: Version 1 of each record a write just inserted (those with an id above the last
#: parameter), in one statement: seeding stays one bulk insert per table. When, by whom and
#: where are the same for the whole write.
_FIRST_VERSIONS = """
    INSERT INTO record_versions (record, version, day, value, status, received_at, sent_by, position)
    SELECT id, 1, day, value, status, ?, ?, ? FROM records WHERE id > ?"""

#: The current view: one scan of records, no history (the start-up load).
_ACTIVE_NOW = ("SELECT r.record_id, r.citizen_row, r.variable, r.day, r.value, r.scenario"
               " FROM records r WHERE r.status = 'active'")

#: The content of a record's version 1 (RECORD_CONTENT), for ``records r`` joined to its
#: citizen ``c``. Scalar subqueries: index lookups in the versions' key whatever the
#: planner's statistics say (PostgreSQL has none for a table just seeded).
_FIRST_CONTENT = """c.citizen_id, r.variable,
    (SELECT v.day FROM record_versions v WHERE v.record = r.id AND v.version = 1),
    (SELECT v.value FROM record_versions v WHERE v.record = r.id AND v.version = 1),
    r.scenario"""

#: As of a position: each record's latest version written at or before it. Versions of a
#: record are written in position order, so the highest such version number is that one.
_ACTIVE_AS_OF = """
    SELECT r.record_id, r.citizen_row, r.variable, v.day, v.value, r.scenario
    FROM records r JOIN record_versions v ON v.record = r.id
    WHERE v.version = (SELECT MAX(w.version) FROM record_versions w
                       WHERE w.record = r.id AND w.position <= ?)
      AND v.status = 'active'"""


#: A dispute with its record and citizen (DisputeRow's fields, in order).
_DISPUTE_SELECT = """
    SELECT d.dispute_id, d.citizen_row, c.citizen_id, d.source, r.record_id, r.variable, d.reason, d.state,
           d.filed_by, d.filed_at, d.due_at, d.suspended_at, d.answered_by, d.answered_at, d.note, d.position,
           r.status, r.version
    FROM disputes d JOIN records r ON r.id = d.record JOIN citizens c ON c.citizen_row = d.citizen_row"""

#: A credit-repair application with its record and citizen (RepairRow's fields, in order).
_REPAIR_SELECT = """
    SELECT p.repair_id, p.citizen_row, c.citizen_id, p.source, r.record_id, r.variable, p.tier, p.statement,
           p.state, p.filed_by, p.filed_at, p.due_at, p.escalated_at, p.decided_by, p.decided_at,
           p.decision_reason, p.position, r.status, r.version
    FROM repairs p JOIN records r ON r.id = p.record JOIN citizens c ON c.citizen_row = p.citizen_row"""

#: A citizen's records as they are now (_RECORD's columns), with the open dispute and the
#: pending repair application of each.
_CITIZEN_RECORDS = """
    SELECT r.id, r.record_id, r.citizen_row, c.citizen_id, r.variable, r.day, r.value, r.source,
           r.scenario, r.status, r.version, v.received_at, v.sent_by, v.position,
           (SELECT d.dispute_id FROM disputes d WHERE d.record = r.id AND d.state IN ('open', 'suspended')),
           (SELECT p.repair_id FROM repairs p WHERE p.record = r.id AND p.state = 'pending')
    FROM records r JOIN citizens c USING (citizen_row)
    JOIN record_versions v ON v.record = r.id AND v.version = r.version
    WHERE r.citizen_row = ? ORDER BY r.id LIMIT ?"""


def _rights_filter(alias: str, citizen_row: int | None, source: str | None) -> tuple[list[str], list]:
    where, params = [], []
    if citizen_row is not None:
        where.append(f"{alias}.citizen_row = ?")
        params.append(int(citizen_row))
    if source is not None:
        where.append(f"{alias}.source = ?")
        params.append(source)
    return where, params


def _no_record(source: str, record_id: str) -> str:
    # One message whether the id is unknown or another source's: a source must not learn
    # which ids other sources use.
    return f"no record {record_id!r} from source {source!r}"


class SQLStore(Store):
    """What SQLiteStore and PostgresStore (server/store_pg.py) share: the statements that are
    the same in both dialects but for the placeholder. A subclass gives ``PARAM``, the
    ``_read()``/``_write(operation)`` transactions (calling ``_begin`` and ``_end`` around a
    write) and the few steps that differ (``_citizen_rows``, ``_first_contents``,
    ``_insert_records``, ``_fetch_all``)."""

    #: The DB-API placeholder of the dialect ("?" for sqlite3, "%s" for psycopg).
    PARAM = "?"

    #: ``active_records(as_of=)``'s statement, to which the citizen filter can be appended.
    _ACTIVE_AS_OF = _ACTIVE_AS_OF

    #: The write transaction in progress (the subclass's lock serialises writes).
    _tx: _Transaction | None = None
    _last_position = 0

    def _q(self, sql: str) -> str:
        """A statement written with "?" placeholders, in this dialect."""
        return sql if self.PARAM == "?" else sql.replace("?", self.PARAM)

    def ping(self) -> None:
        with self._read() as db:
            db.execute("SELECT 1").fetchone()

    # Transactions and the change log -----------------------------------------------------

    def _begin(self, operation: str) -> None:
        self._tx = _Transaction(operation)

    def _end(self, committed: bool) -> None:
        tx, self._tx = self._tx, None
        if committed and tx is not None and tx.position is not None:
            self._last_position = tx.position

    def _change(self, db, citizen_row: int | None = None) -> _Transaction:
        """The write in progress (inside its transaction), with its position and time: its
        change log entry is appended at its first change and shared by the rest, and what it
        writes carries that position and time. ``citizen_row``: the one citizen it changes;
        None for several or all."""
        tx = self._tx
        if tx is None:
            raise RuntimeError("a change outside a write transaction")
        if tx.position is None:
            # seq is MAX + 1: the writers' lock (SQLite's write lock, PostgreSQL's advisory
            # lock) is held, so it cannot race, and seqs have no gaps, unlike a sequence's.
            tx.citizen_row, tx.at = citizen_row, time.time()
            tx.position = db.execute(self._q(
                "INSERT INTO changes (seq, at, kind, citizen_row)"
                " SELECT COALESCE(MAX(seq), 0) + 1, ?, ?, ? FROM changes RETURNING seq"),
                (tx.at, tx.operation, citizen_row)).fetchone()[0]
        elif tx.citizen_row is not None and tx.citizen_row != citizen_row:
            tx.citizen_row = None
            db.execute(self._q("UPDATE changes SET citizen_row = NULL WHERE seq = ?"), (tx.position,))
        return tx

    def high_water_mark(self) -> int:
        with self._read() as db:
            return db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]

    def population_bounds(self) -> tuple[int, int]:
        with self._read() as db:
            citizens = db.execute("SELECT COALESCE(MAX(citizen_row) + 1, 0) FROM citizens").fetchone()[0]
            cards = db.execute("SELECT COALESCE(MAX(id), 0) FROM cards").fetchone()[0]
        return int(citizens), int(cards)

    def changes_since(self, position: int) -> list[tuple[int, str, int | None]]:
        position = _check_position(position)
        with self._read() as db:
            return [tuple(r) for r in db.execute(self._q(
                "SELECT seq, kind, citizen_row FROM changes WHERE seq > ? ORDER BY seq"), (position,)).fetchall()]

    def first_change_at(self) -> float | None:
        with self._read() as db:
            row = db.execute("SELECT at FROM changes ORDER BY seq LIMIT 1").fetchone()
        return None if row is None else float(row[0])

    def citizen_by_row(self, citizen_row: int) -> tuple[str, int, bool]:
        with self._read() as db:
            row = db.execute(self._q("SELECT citizen_id, birth_day, consent FROM citizens WHERE citizen_row = ?"),
                             (int(citizen_row),)).fetchone()
        if row is None:
            raise NotFound(f"no citizen at row {citizen_row}")
        return row[0], int(row[1]), bool(row[2])

    def cards_of_row(self, citizen_row: int) -> list[bytes]:
        with self._read() as db:
            return [bytes(r[0]) for r in db.execute(self._q(
                "SELECT token FROM cards WHERE citizen_row = ? ORDER BY id"), (int(citizen_row),)).fetchall()]

    def last_position(self) -> int:
        return self._last_position

    def _migrate_from(self, db, migrations: list[list[str]], where: str) -> None:
        """Apply the dialect's ``migrations`` the schema_version table has not recorded yet
        (inside the caller's write transaction)."""
        current = db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
        if current > len(migrations):
            raise StoreError(f"{where} has schema version {current}, newer than this "
                             f"code's {len(migrations)}: upgrade the server")
        for version in range(current + 1, len(migrations) + 1):
            for statement in migrations[version - 1]:
                db.execute(statement)
            db.execute(self._q("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)"), (version, time.time()))
        if current < len(migrations):
            self._change(db)

    # Citizens and consent ---------------------------------------------------------------

    def _known_citizen(self, db, citizen_id: str, birth_day: int) -> int | None:
        """upsert_citizen's first half: the row of an id already stored (its birth day set
        to ``birth_day``), or None for a new id (inside the caller's write transaction)."""
        found = db.execute(self._q("SELECT citizen_row, birth_day FROM citizens WHERE citizen_id = ?"),
                           (citizen_id,)).fetchone()
        if found is None:
            return None
        row, stored_day = found
        if stored_day != birth_day:
            db.execute(self._q("UPDATE citizens SET birth_day = ? WHERE citizen_row = ?"), (int(birth_day), row))
            self._change(db, row)
        return row

    def _row_of(self, db, citizen_id: str) -> int:
        found = db.execute(self._q(
            "SELECT citizen_row FROM citizens WHERE citizen_id = ?"), (citizen_id,)).fetchone()
        if found is None:
            raise NotFound(f"citizen {citizen_id!r} not found")
        return found[0]

    def citizen_row(self, citizen_id: str) -> int:
        with self._read() as db:
            return self._row_of(db, citizen_id)

    def citizens(self) -> CitizenTable:
        with self._read() as db:
            rows = db.execute(self._q(
                "SELECT citizen_id, birth_day, consent FROM citizens ORDER BY citizen_row")).fetchall()
        ids, birth, consent = zip(*rows) if rows else ((), (), ())
        return CitizenTable(list(ids), np.asarray(birth, np.int32), np.asarray(consent, np.uint8))

    def set_consent(self, citizen_id: str, granted: bool) -> int:
        with self._write("set_consent") as db:
            row = self._row_of(db, citizen_id)
            tx = self._change(db, row)
            db.execute(self._q("UPDATE citizens SET consent = ? WHERE citizen_row = ?"), (int(granted), row))
            # the blanket's grant or revocation clears the purpose settings (server/consent.py)
            db.execute(self._q("DELETE FROM purpose_consents WHERE citizen_row = ?"), (row,))
            # Every call is an event in the history, even one that repeats the current state.
            db.execute(self._q("INSERT INTO consent_history (citizen_row, granted, at, position)"
                               " VALUES (?, ?, ?, ?)"), (row, int(granted), tx.at, tx.position))
            return row

    def set_purpose_consent(self, citizen_id: str, purposes: Sequence[str], granted: bool,
                            expires_day: int | None = None) -> int:
        if not purposes:
            raise ValueError("set_purpose_consent: name at least one purpose (set_consent is the blanket)")
        with self._write("set_purpose_consent") as db:
            row = self._row_of(db, citizen_id)
            tx = self._change(db, row)
            for purpose in purposes:
                db.execute(self._q("DELETE FROM purpose_consents WHERE citizen_row = ? AND purpose = ?"), (row, purpose))
                db.execute(self._q("INSERT INTO purpose_consents (citizen_row, purpose, granted, expires_day, position)"
                                   " VALUES (?, ?, ?, ?, ?)"), (row, purpose, int(granted), expires_day, tx.position))
                db.execute(self._q("INSERT INTO consent_history (citizen_row, granted, at, position, purpose, expires_day)"
                                   " VALUES (?, ?, ?, ?, ?, ?)"),
                           (row, int(granted), tx.at, tx.position, purpose, expires_day))
            return row

    def purpose_consents(self, citizen_row: int | None = None) -> list[tuple[int, str, int, int | None]]:
        where, args = ("WHERE citizen_row = ? ", (int(citizen_row),)) if citizen_row is not None else ("", ())
        with self._read() as db:
            rows = db.execute(self._q("SELECT citizen_row, purpose, granted, expires_day FROM purpose_consents "
                                      f"{where}ORDER BY citizen_row, purpose"), args).fetchall()
        return [(int(r), str(p), int(g), None if e is None else int(e)) for r, p, g, e in rows]

    def consent_rows_expiring(self, first_day: int, last_day: int) -> list[int]:
        with self._read() as db:
            rows = db.execute(self._q("SELECT DISTINCT citizen_row FROM purpose_consents WHERE granted = 1"
                                      " AND expires_day >= ? AND expires_day <= ? ORDER BY citizen_row"),
                              (int(first_day), int(last_day))).fetchall()
        return [int(r) for (r,) in rows]

    def consent_at(self, citizen_row: int, as_of: int, purpose: str | None = None, day: int | None = None) -> bool:
        as_of = _check_position(as_of)
        with self._read() as db:
            # One statement (PostgreSQL reads are single statements): the citizen, and its
            # blanket and purpose events at or before the position, in the order written.
            found = db.execute(self._q(
                "SELECT h.purpose, h.granted, h.expires_day FROM citizens c LEFT JOIN consent_history h"
                " ON h.citizen_row = c.citizen_row AND h.position <= ? AND h.purpose IN ('', ?)"
                " WHERE c.citizen_row = ? ORDER BY h.id"), (as_of, purpose or "", int(citizen_row))).fetchall()
        if not found:
            raise NotFound(f"citizen row {citizen_row} not found")
        blanket, setting = False, None
        for name, granted, expires in found:
            if name is None:
                continue  # no event at all
            if name == "":
                blanket, setting = bool(granted), None  # the blanket clears the settings
            else:
                setting = (bool(granted), expires)
        if setting is None:
            return blanket
        granted, expires = setting
        if granted and expires is not None and day is not None and expires < day:
            return blanket  # an expired grant: the blanket answers
        return granted

    # Card tokens ------------------------------------------------------------------------

    def register_card(self, token: bytes, citizen_id: str) -> tuple[int, bool]:
        token = _check_token(token)
        with self._write("register_card") as db:
            row = self._row_of(db, citizen_id)
            bound = db.execute(self._q("SELECT citizen_row FROM cards WHERE token = ?"), (token,)).fetchone()
            if bound is not None:
                if bound[0] != row:
                    raise Conflict(f"card token {_token_hint(token)} is bound to another citizen")
                return row, False
            db.execute(self._q("INSERT INTO cards (token, citizen_row) VALUES (?, ?)"), (token, row))
            self._change(db, row)
            return row, True

    def cards(self) -> CardTable:
        with self._read() as db:
            rows = db.execute(self._q("SELECT token, citizen_row FROM cards ORDER BY id")).fetchall()
        tokens, owners = zip(*rows) if rows else ((), ())
        return CardTable(
            np.frombuffer(b"".join(tokens), np.uint8).reshape(len(rows), TOKEN_BYTES).copy(),
            np.asarray(owners, np.int64))

    # Records ----------------------------------------------------------------------------

    def _citizen_rows(self, db, citizen_ids: Sequence[str]) -> dict[str, int]:
        """The rows of the ids; :class:`NotFound` for the first unknown one in list order."""
        raise NotImplementedError

    def _first_contents(self, db, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], tuple]:
        """For each (source, record_id) stored, the content of its version 1, as
        :data:`RECORD_CONTENT`."""
        raise NotImplementedError

    def _insert_records(self, db, rows: list[tuple]) -> None:
        """Insert ``(record_id, citizen_row, variable, day, value, source, scenario)`` rows
        into records (as version 1), in order."""
        raise NotImplementedError

    def _fetch_all(self, query: str, params: tuple) -> list[tuple]:
        """All rows of one read statement."""
        raise NotImplementedError

    def _last_record_id(self, db) -> int:
        return db.execute("SELECT COALESCE(MAX(id), 0) FROM records").fetchone()[0]

    def _record(self, db, source: str, record_id: str) -> tuple[int, RecordRow]:
        """The record's internal id and its current version."""
        found = db.execute(self._q(_RECORD), (source, record_id)).fetchone()
        if found is None:
            raise NotFound(_no_record(source, record_id))
        return found[0], RecordRow(*found[1:])

    def add_records(self, records: Sequence[RecordIn], sent_by: str) -> list[str]:
        sent_by = _check_sent_by(sent_by)
        records = list(records)
        with self._write("add_records") as db:
            rows = self._citizen_rows(db, [r.citizen_id for r in records])  # NotFound: rollback
            # Stored records are found first, so a batch of resends writes nothing at all.
            # No other writer can add one in between: we hold the writers' lock.
            stored = self._first_contents(db, list(dict.fromkeys((r.source, r.record_id) for r in records)))
            verdicts, new = _classify(records, stored)  # RecordConflict: rollback
            if new:
                citizens = {rows[records[i].citizen_id] for i in new}
                tx = self._change(db, citizens.pop() if len(citizens) == 1 else None)
                after = self._last_record_id(db)
                self._insert_records(db, [
                    (r.record_id, rows[r.citizen_id], r.variable, int(r.day), float(r.value), r.source,
                     r.scenario) for r in (records[i] for i in new)])
                db.execute(self._q(_FIRST_VERSIONS), (tx.at, sent_by, tx.position, after))
        return verdicts

    @staticmethod
    def _bulk_columns(citizen_row, variable, day, value, record_ids) -> tuple:
        rows = np.asarray(citizen_row, np.int64)
        day = np.asarray(day, np.int64)
        value = np.asarray(value, np.float64)
        variable = variable.tolist() if isinstance(variable, np.ndarray) else variable
        if not len(rows) == len(variable) == len(day) == len(value) == len(record_ids):
            raise ValueError("add_records_bulk: all columns must have the same length")
        if len(day) and not (-_INT32 <= day.min() and day.max() < _INT32):
            raise ValueError(f"add_records_bulk: days must be in int32 range; got {day.min()}..{day.max()}")
        if not np.isfinite(value).all():
            raise ValueError("add_records_bulk: every value must be a finite number")
        return rows, variable, day, value

    def get_record(self, source: str, record_id: str) -> RecordRow:
        with self._read() as db:
            return self._record(db, source, record_id)[1]

    def correct_record(self, source: str, record_id: str, day: int, value: float, sent_by: str) -> RecordRow:
        sent_by = _check_sent_by(sent_by)
        what = f"record {record_id!r}"
        day, value = _check_day(day, what), _check_value(value, what)
        with self._write("correct_record") as db:
            key, record = self._record(db, source, record_id)
            if record.status != ACTIVE:
                raise WrongState(f"record {record_id!r} from source {source!r} is {record.status}")
            if (record.day, record.value) == (day, value):
                return record  # nothing to change: no version, no change in the log
            return self._new_version(db, key, record, day, value, ACTIVE, sent_by)

    def set_record_status(self, source: str, record_id: str, status: str, sent_by: str) -> RecordRow:
        if status not in INACTIVE_STATUSES:
            raise ValueError(f"status must be one of {INACTIVE_STATUSES}, not {status!r}")
        sent_by = _check_sent_by(sent_by)
        with self._write("set_record_status") as db:
            key, record = self._record(db, source, record_id)
            if record.status == status:
                return record
            return self._new_version(db, key, record, record.day, record.value, status, sent_by)

    def _new_version(self, db, key: int, record: RecordRow, day: int, value: float, status: str,
                     sent_by: str) -> RecordRow:
        """Append the next version of a record and make it the current one (inside the
        caller's write transaction)."""
        tx = self._change(db, record.citizen_row)
        new = dataclasses.replace(record, day=day, value=value, status=status, version=record.version + 1,
                                  received_at=tx.at, sent_by=sent_by, position=tx.position)
        db.execute(self._q("INSERT INTO record_versions (record, version, day, value, status, received_at,"
                           " sent_by, position) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
                   (key, new.version, new.day, new.value, new.status, new.received_at, new.sent_by, new.position))
        db.execute(self._q("UPDATE records SET version = ?, day = ?, value = ?, status = ? WHERE id = ?"),
                   (new.version, new.day, new.value, new.status, key))
        return new

    def record_history(self, source: str, record_id: str) -> list[RecordVersion]:
        with self._read() as db:
            rows = db.execute(self._q(
                # The record's id first: an index lookup in the versions' key, whatever the
                # planner's statistics say.
                "SELECT v.version, v.day, v.value, v.status, v.received_at, v.sent_by, v.position"
                " FROM record_versions v"
                " WHERE v.record = (SELECT r.id FROM records r WHERE r.source = ? AND r.record_id = ?)"
                " ORDER BY v.version"), (source, record_id)).fetchall()
        if not rows:  # every stored record has a version 1
            raise NotFound(_no_record(source, record_id))
        return [RecordVersion(*row) for row in rows]

    def active_records(self, citizen_row: int | None = None, as_of: int | None = None) -> ActiveRecords:
        if as_of is None:
            query, params = _ACTIVE_NOW, ()
        else:
            query, params = self._ACTIVE_AS_OF, (_check_position(as_of),)
        if citizen_row is not None:
            query, params = query + " AND r.citizen_row = ?", (*params, int(citizen_row))
        return ActiveRecords.from_rows(self._fetch_all(self._q(query + " ORDER BY r.id"), params))

    # Citizens' rights: disputes and credit repair (server/rights.py) ---------------------------
    #
    # Each write is one transaction with one change in the log (its citizen's row), like a
    # record's correction; a change of the record itself (suspended, restored, corrected,
    # withdrawn, repaired) is a new version of it, sent by the caller that caused it. Times
    # (``at``, ``due_at``) come from the rights clock of the caller (server/rights.py), not the
    # store's. Reads are one statement each.

    def _rights_marks(self, db, citizen_row: int, position: int) -> RightsMarks:
        rows = db.execute(self._q(
            "SELECT r.variable, d.state FROM disputes d JOIN records r ON r.id = d.record"
            " WHERE d.citizen_row = ? AND d.state IN ('open', 'suspended') ORDER BY d.id"), (int(citizen_row),)).fetchall()
        return RightsMarks(int(citizen_row), int(position), tuple((v, st) for v, st in rows))

    def _owned_record(self, db, source: str, record_id: str, citizen_id: str) -> tuple[int, RecordRow]:
        key, record = self._record(db, source, record_id)
        if record.citizen_id != citizen_id:
            # another citizen's record is, to this one, a record not there (one message)
            raise NotFound(_no_record(source, record_id))
        return key, record

    def _procedures(self, db, key: int) -> tuple[str | None, str | None]:
        """The open dispute and the pending repair application of a record (internal id)."""
        dispute = db.execute(self._q(
            "SELECT dispute_id FROM disputes WHERE record = ? AND state IN ('open', 'suspended')"), (key,)).fetchone()
        repair = db.execute(self._q(
            "SELECT repair_id FROM repairs WHERE record = ? AND state = 'pending'"), (key,)).fetchone()
        return (dispute[0] if dispute else None), (repair[0] if repair else None)

    def _one_dispute(self, db, dispute_id: str) -> DisputeRow:
        found = db.execute(self._q(_DISPUTE_SELECT + " WHERE d.dispute_id = ?"), (dispute_id,)).fetchone()
        if found is None:
            raise DisputeNotFound(f"no dispute {dispute_id!r}")
        return DisputeRow(*found)

    def _one_repair(self, db, repair_id: str) -> RepairRow:
        found = db.execute(self._q(_REPAIR_SELECT + " WHERE p.repair_id = ?"), (repair_id,)).fetchone()
        if found is None:
            raise RepairNotFound(f"no credit-repair application {repair_id!r}")
        return RepairRow(*found)

    def file_dispute(self, dispute_id: str, source: str, record_id: str, citizen_id: str, reason: str,
                     filed_by: str, at: float, due_at: float) -> tuple[DisputeRow, RightsMarks]:
        """A citizen disputes one of their records: an open dispute, due by ``due_at``.
        NotFound for a record the source does not have or that is another citizen's;
        WrongState for a withdrawn or repaired one; DisputeOpen when it has an open dispute
        already; UnderReview while a repair application of it waits for its decision."""
        filed_by = _check_sent_by(filed_by)
        with self._write("file_dispute") as db:
            key, record = self._owned_record(db, source, record_id, citizen_id)
            if record.status in INACTIVE_STATUSES:
                raise WrongState(f"record {record_id!r} from source {source!r} is {record.status}: it no longer counts,"
                                 " there is nothing to dispute")
            dispute, repair = self._procedures(db, key)
            if dispute is not None:
                raise DisputeOpen(f"record {record_id!r} from source {source!r} has an open dispute already ({dispute})")
            if repair is not None:
                raise UnderReview(f"record {record_id!r} from source {source!r} has a credit-repair application waiting"
                                  f" for its decision ({repair}): one procedure at a time")
            tx = self._change(db, record.citizen_row)
            db.execute(self._q(
                "INSERT INTO disputes (dispute_id, record, citizen_row, source, reason, state, filed_by, filed_at, due_at,"
                " position) VALUES (?, ?, ?, ?, ?, 'open', ?, ?, ?, ?)"),
                (dispute_id, key, record.citizen_row, source, reason, filed_by, float(at), float(due_at), tx.position))
            return self._one_dispute(db, dispute_id), self._rights_marks(db, record.citizen_row, tx.position)

    def answer_dispute(self, dispute_id: str, source: str, answer: str, day: int | None, value: float | None,
                       note: str, answered_by: str, at: float) -> tuple[DisputeRow, RecordRow, RightsMarks]:
        """The source's answer, final: ``answer`` "confirmed" (a suspended record counts
        again), "corrected" (a new version with ``day`` and ``value``, counting) or
        "withdrawn" (a new version that stops counting). DisputeNotFound for a dispute of
        another source's record; AlreadyClosed for one answered already. Returns the
        dispute, the record as it is now and the citizen's marks."""
        answered_by = _check_sent_by(answered_by)
        if answer not in (DISPUTE_CONFIRMED, DISPUTE_CORRECTED, DISPUTE_WITHDRAWN):
            raise ValueError(f"answer must be confirmed, corrected or withdrawn, not {answer!r}")
        if answer == DISPUTE_CORRECTED:
            what = f"dispute {dispute_id!r}"
            day, value = _check_day(day, what), _check_value(value, what)
        with self._write("answer_dispute") as db:
            found = db.execute(self._q(
                "SELECT d.record, d.state, r.record_id FROM disputes d JOIN records r ON r.id = d.record"
                " WHERE d.dispute_id = ? AND d.source = ?"), (dispute_id, source)).fetchone()
            if found is None:
                raise DisputeNotFound(f"no dispute {dispute_id!r} of a record from source {source!r}")
            key, state, record_id = found
            if state not in OPEN_DISPUTE_STATES:
                raise AlreadyClosed(f"dispute {dispute_id!r} was answered already ({state}): an answer is final")
            _, record = self._record(db, source, record_id)
            tx = self._change(db, record.citizen_row)
            if answer == DISPUTE_CONFIRMED:
                if record.status == SUSPENDED:
                    record = self._new_version(db, key, record, record.day, record.value, ACTIVE, answered_by)
            elif answer == DISPUTE_CORRECTED:
                if record.status not in (ACTIVE, SUSPENDED):
                    raise WrongState(f"record {record_id!r} from source {source!r} is {record.status}: it cannot be"
                                     " corrected (answer confirm or withdraw)")
                if (record.day, record.value, record.status) != (day, value, ACTIVE):
                    record = self._new_version(db, key, record, day, value, ACTIVE, answered_by)
            elif record.status != WITHDRAWN:
                record = self._new_version(db, key, record, record.day, record.value, WITHDRAWN, answered_by)
            db.execute(self._q(
                "UPDATE disputes SET state = ?, answered_by = ?, answered_at = ?, note = ?, position = ?"
                " WHERE dispute_id = ?"), (answer, answered_by, float(at), note, tx.position, dispute_id))
            return self._one_dispute(db, dispute_id), record, self._rights_marks(db, record.citizen_row, tx.position)

    def suspend_dispute(self, dispute_id: str, at: float, sent_by: str
                        ) -> tuple[DisputeRow, RecordRow, RightsMarks] | None:
        """A dispute still open at ``at``, past its deadline: the dispute is "suspended" and
        its record, if active, gets a new version "suspended" (it stops counting) sent by
        ``sent_by``. None when there is nothing to do (answered meanwhile, or not due)."""
        sent_by = _check_sent_by(sent_by)
        with self._write("suspend_dispute") as db:
            found = db.execute(self._q(
                "SELECT d.record, d.source, r.record_id FROM disputes d JOIN records r ON r.id = d.record"
                " WHERE d.dispute_id = ? AND d.state = 'open' AND d.due_at <= ?"), (dispute_id, float(at))).fetchone()
            if found is None:
                return None
            key, source, record_id = found
            _, record = self._record(db, source, record_id)
            tx = self._change(db, record.citizen_row)
            if record.status == ACTIVE:
                record = self._new_version(db, key, record, record.day, record.value, SUSPENDED, sent_by)
            db.execute(self._q("UPDATE disputes SET state = 'suspended', suspended_at = ?, position = ? WHERE dispute_id = ?"),
                       (float(at), tx.position, dispute_id))
            return self._one_dispute(db, dispute_id), record, self._rights_marks(db, record.citizen_row, tx.position)

    def due_disputes(self, at: float, limit: int = 1000) -> list[str]:
        """Open disputes whose deadline is at or before ``at``, the earliest first."""
        with self._read() as db:
            return [r[0] for r in db.execute(self._q(
                "SELECT dispute_id FROM disputes WHERE state = 'open' AND due_at <= ? ORDER BY due_at, id LIMIT ?"),
                (float(at), int(limit))).fetchall()]

    def get_dispute(self, dispute_id: str) -> DisputeRow:
        with self._read() as db:
            return self._one_dispute(db, dispute_id)

    def list_disputes(self, citizen_row: int | None = None, source: str | None = None, open_only: bool = False,
                      limit: int = 100) -> list[DisputeRow]:
        """Disputes of a citizen, or of a source's records (or both), newest first."""
        where, params = _rights_filter("d", citizen_row, source)
        if open_only:
            where.append("d.state IN ('open', 'suspended')")
        query = _DISPUTE_SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY d.id DESC LIMIT ?"
        with self._read() as db:
            return [DisputeRow(*r) for r in db.execute(self._q(query), (*params, int(limit))).fetchall()]

    def open_disputes(self) -> tuple[int, list[tuple[int, str, str]]]:
        """``(position, [(citizen_row, variable, state), ...])``: every open dispute, at least
        as new as the position (the start-up's marks, server/rights.py)."""
        position = self.high_water_mark()
        with self._read() as db:
            rows = db.execute("SELECT d.citizen_row, r.variable, d.state FROM disputes d JOIN records r ON r.id = d.record"
                              " WHERE d.state IN ('open', 'suspended') ORDER BY d.citizen_row, d.id").fetchall()
        return position, [(int(c), v, st) for c, v, st in rows]

    def apply_repair(self, repair_id: str, source: str, record_id: str, citizen_id: str, statement: str,
                     filed_by: str, at: float, due_at: float, check: Callable[[RecordRow], str]) -> RepairRow:
        """A citizen applies to repair one of their active records; ``check(record)`` (the
        tier rules, server/rights.py) gives the record's tier or raises, inside the write.
        NotFound, WrongState as file_dispute; RepairPending when an application waits for its
        decision already; UnderReview while the record has an open dispute."""
        filed_by = _check_sent_by(filed_by)
        with self._write("apply_repair") as db:
            key, record = self._owned_record(db, source, record_id, citizen_id)
            dispute, repair = self._procedures(db, key)
            if repair is not None:
                raise RepairPending(f"record {record_id!r} from source {source!r} has a credit-repair application"
                                    f" waiting for its decision already ({repair})")
            if dispute is not None:
                raise UnderReview(f"record {record_id!r} from source {source!r} has an open dispute ({dispute}):"
                                  " one procedure at a time")
            if record.status != ACTIVE:
                raise WrongState(f"record {record_id!r} from source {source!r} is {record.status}: it no longer counts,"
                                 " there is nothing to repair")
            tier = check(record)
            tx = self._change(db, record.citizen_row)
            db.execute(self._q(
                "INSERT INTO repairs (repair_id, record, citizen_row, source, tier, statement, state, filed_by, filed_at,"
                " due_at, position) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?)"),
                (repair_id, key, record.citizen_row, source, tier, statement, filed_by, float(at), float(due_at),
                 tx.position))
            return self._one_repair(db, repair_id)

    def decide_repair(self, repair_id: str, source: str, approve: bool, reason: str, decided_by: str,
                      at: float) -> tuple[RepairRow, RecordRow]:
        """The source's decision, final: approved (an active record gets a new version
        "repaired": it stops counting) or rejected. RepairNotFound for another source's
        application; AlreadyClosed for one decided already."""
        decided_by = _check_sent_by(decided_by)
        with self._write("decide_repair") as db:
            found = db.execute(self._q(
                "SELECT p.record, p.state, r.record_id FROM repairs p JOIN records r ON r.id = p.record"
                " WHERE p.repair_id = ? AND p.source = ?"), (repair_id, source)).fetchone()
            if found is None:
                raise RepairNotFound(f"no credit-repair application {repair_id!r} for a record from source {source!r}")
            key, state, record_id = found
            if state != REPAIR_PENDING:
                raise AlreadyClosed(f"credit-repair application {repair_id!r} was decided already ({state}):"
                                    " a decision is final")
            _, record = self._record(db, source, record_id)
            tx = self._change(db, record.citizen_row)
            if approve and record.status == ACTIVE:
                record = self._new_version(db, key, record, record.day, record.value, REPAIRED, decided_by)
            db.execute(self._q(
                "UPDATE repairs SET state = ?, decided_by = ?, decided_at = ?, decision_reason = ?, position = ?"
                " WHERE repair_id = ?"),
                (REPAIR_APPROVED if approve else REPAIR_REJECTED, decided_by, float(at), reason, tx.position, repair_id))
            return self._one_repair(db, repair_id), record

    def escalate_repair(self, repair_id: str, at: float) -> RepairRow | None:
        """An application still pending at ``at``, past its deadline, not escalated yet: its
        ``escalated_at`` is set (it stays pending: never decided by default). None otherwise."""
        with self._write("escalate_repair") as db:
            found = db.execute(self._q(
                "SELECT citizen_row FROM repairs WHERE repair_id = ? AND state = 'pending' AND due_at <= ?"
                " AND escalated_at IS NULL"), (repair_id, float(at))).fetchone()
            if found is None:
                return None
            tx = self._change(db, int(found[0]))
            db.execute(self._q("UPDATE repairs SET escalated_at = ?, position = ? WHERE repair_id = ?"),
                       (float(at), tx.position, repair_id))
            return self._one_repair(db, repair_id)

    def due_repairs(self, at: float, limit: int = 1000) -> list[str]:
        """Pending applications past their deadline at ``at`` and not escalated yet."""
        with self._read() as db:
            return [r[0] for r in db.execute(self._q(
                "SELECT repair_id FROM repairs WHERE state = 'pending' AND due_at <= ? AND escalated_at IS NULL"
                " ORDER BY due_at, id LIMIT ?"), (float(at), int(limit))).fetchall()]

    def get_repair(self, repair_id: str) -> RepairRow:
        with self._read() as db:
            return self._one_repair(db, repair_id)

    def list_repairs(self, citizen_row: int | None = None, source: str | None = None, pending_only: bool = False,
                     limit: int = 100) -> list[RepairRow]:
        """Applications of a citizen, or for a source's records (or both), newest first."""
        where, params = _rights_filter("p", citizen_row, source)
        if pending_only:
            where.append("p.state = 'pending'")
        query = _REPAIR_SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY p.id DESC LIMIT ?"
        with self._read() as db:
            return [RepairRow(*r) for r in db.execute(self._q(query), (*params, int(limit))).fetchall()]

    def citizen_records(self, citizen_row: int, limit: int = 1000) -> list[CitizenRecord]:
        """A citizen's records as they are now (any status), in insertion order, each with
        the id of its open dispute and of its pending repair application ("" for none)."""
        with self._read() as db:
            rows = db.execute(self._q(_CITIZEN_RECORDS), (int(citizen_row), int(limit))).fetchall()
        return [CitizenRecord(RecordRow(*r[1:14]), r[14] or "", r[15] or "") for r in rows]


#: The bulk load's statements (server/store.py _SQLiteLoad). Each chunk's rows come in as a
#: few large parameters (a JSON array walked by json_each, which also numbers the rows, and
#: fixed-width decimal fields cut from a blob), so a chunk is a few statements, each one call
#: into SQLite that runs without Python (and without the GIL) for millions of rows.
_LOAD_CITIZENS = """
    INSERT INTO citizens (citizen_row, citizen_id, birth_day, consent)
    SELECT ?1 + j.key, j.value, CAST(substr(?2, j.key * 11 + 1, 10) AS INTEGER) - 2147483648,
           CAST(substr(?2, j.key * 11 + 11, 1) AS INTEGER)
    FROM json_each(?3) j"""
_LOAD_CONSENTS = """
    INSERT INTO consent_history (citizen_row, granted, at, position)
    SELECT citizen_row, 1, ?, ? FROM citizens WHERE citizen_row >= ? AND consent = 1 ORDER BY citizen_row"""
_LOAD_CARDS = """
    INSERT INTO cards (token, citizen_row) SELECT substr(?1, j.key * 16 + 1, 16), j.value FROM json_each(?2) j"""
# A run of records of one variable and source: the citizen row and the day packed in one
# integer of the JSON array (row << 32 | day + 2**31); the value a constant of the run, or an
# exact dyadic fraction (an integer of 19 digits, offset by 2**62, times 2**-k).
_LOAD_RECORDS = """
    INSERT INTO records (id, record_id, citizen_row, variable, day, value, source)
    SELECT ?1 + j.key, ?2 || (?3 + j.key), j.value >> 32, ?4, (j.value & 4294967295) - 2147483648, {value}, ?5
    FROM json_each(?6) j"""
_LOAD_VALUE_CONSTANT = "?7"
_LOAD_VALUE_DYADIC = "(CAST(substr(?7, j.key * 19 + 1, 19) AS INTEGER) - 4611686018427387904) * ?8"
_LOAD_RECORD_ROWS = ("INSERT INTO records (id, record_id, citizen_row, variable, day, value, source)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?)")
#: Version 1 of the records just loaded (ids from the last parameter on), read back from the
#: pages just written.
_LOAD_VERSIONS = """
    INSERT INTO record_versions (record, version, day, value, status, received_at, sent_by, position)
    SELECT id, 1, day, value, status, ?, source, ? FROM records WHERE id >= ?"""

#: The tables a bulk load fills (and needs empty).
_LOADED_TABLES = ("citizens", "consent_history", "cards", "records", "record_versions")

#: A row in any of them (None: the store is empty).
_LOAD_ANY_ROW = " UNION ALL ".join(f"SELECT 1 FROM (SELECT 1 FROM {t} LIMIT 1)" for t in _LOADED_TABLES)

#: Page cache for a bulk load, KiB: the autoindex of card tokens (random keys) stays in it.
_LOAD_CACHE_KIB = 1024 * 1024

#: The page size of a file seeded by a bulk load (SQLite's default is 4096). Measured on a
#: million people: a load 15-20 % faster (shallower B-trees, fewer splits), the same size.
_LOAD_PAGE_SIZE = 16384


class _SQLiteLoad(BulkLoad):
    """:meth:`SQLiteStore.bulk_load`'s loader, inside the load's transaction."""

    def __init__(self, store: SQLiteStore, db: sqlite3.Connection):
        super().__init__()
        self._db = db
        if db.execute(_LOAD_ANY_ROW).fetchone() is not None:
            raise Conflict(f"bulk load: the store {store.path} is not empty (a bulk load seeds an empty store)")
        tx = store._change(db)
        self.position, self.at = tx.position, tx.at
        # The secondary indexes are built after the load (one sort each, not a B-tree insert
        # per row). The UNIQUE constraints' own indexes stay: SQLite cannot drop them, and
        # measured, building them after saves nothing (their keys arrive nearly in order).
        self._indexes = db.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL AND tbl_name IN"
            f" ({', '.join('?' * len(_LOADED_TABLES))}) ORDER BY name", _LOADED_TABLES).fetchall()
        for name, _ in self._indexes:
            db.execute(f'DROP INDEX "{name}"')

    def _encode(self, chunk: LoadChunk) -> list[tuple]:
        c = self._check(chunk)
        steps: list[tuple] = []
        if c.ids:
            fields = np.empty((len(c.ids), 11), np.uint8)
            fields[:, :10] = _digits(c.birth_days + _INT32, 10)
            fields[:, 10] = 48 + c.consent
            steps.append(("execute", _LOAD_CITIZENS, (c.first_row, fields.tobytes(), json.dumps(c.ids))))
            if c.consent.any():
                steps.append(("execute", _LOAD_CONSENTS, (self.at, self.position, c.first_row)))
        if len(c.card_rows):
            steps.append(("execute", _LOAD_CARDS, (c.tokens.tobytes(), _json_ints(c.card_rows))))
        for lo, hi in c.runs():  # rows < 2**31 (_check): row and day pack into 63 bits
            variable, source = c.variables[c.variable[lo]], c.sources[c.source[lo]]
            value = c.value[lo:hi]
            head = (c.first_record + lo, c.id_prefix, c.id_first + lo, variable, source)
            if (value == value[0]).all() and not np.signbit(value[0]):
                sql, tail = _LOAD_RECORDS.format(value=_LOAD_VALUE_CONSTANT), (float(value[0]),)
            elif (dyadic := _dyadic(value)) is not None:
                ints, k = dyadic
                sql = _LOAD_RECORDS.format(value=_LOAD_VALUE_DYADIC)
                tail = (_digits(ints + 2**62, 19).tobytes(), 2.0**-k)
            else:  # not expressible in the packed form (rarely): one bound row per record
                ids = range(c.first_record + lo, c.first_record + hi)
                steps.append(("executemany", _LOAD_RECORD_ROWS, list(zip(
                    ids, (f"{c.id_prefix}{c.id_first + i}" for i in range(lo, hi)), c.rows[lo:hi].tolist(),
                    repeat(variable), c.day[lo:hi].tolist(), value.tolist(), repeat(source)))))
                continue
            packed = (c.rows[lo:hi] << 32) | (c.day[lo:hi] + _INT32)
            steps.append(("execute", sql, (*head, _json_ints(packed), *tail)))
        if len(c.rows):
            steps.append(("execute", _LOAD_VERSIONS, (self.at, self.position, c.first_record)))
        return steps

    def _write(self, encoded: list[tuple]) -> None:
        for how, sql, params in encoded:
            getattr(self._db, how)(sql, params)

    def _finish(self) -> None:
        for _, sql in self._indexes:
            self._db.execute(sql)


def _private(path: Path, create: bool = False) -> None:
    """Make ``path`` readable by its owner only (0600): the store holds every citizen's id,
    birth date, consents and records. SQLite creates the -wal and -shm files with the
    database file's mode, so a database created 0600 keeps them private too; ``create``
    makes an empty one with that mode. A file of another user is left as it is."""
    if create:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return
        except FileExistsError:
            pass
    try:
        if path.stat().st_mode & 0o777 != 0o600:
            path.chmod(0o600)
    except (FileNotFoundError, PermissionError):
        pass


class SQLiteStore(SQLStore):
    """The store in one SQLite file (WAL journal), safe to share between threads.

    Several processes may open the same file (each server worker opens its own store after
    fork; never carry an open store across a fork, which SQLite forbids and this class
    refuses). SQLite's file locks serialise writers; ``busy_timeout`` makes a writer wait for
    another instead of failing. ``on_write(operation, seconds)`` is called after each
    committed write, e.g. to feed a latency histogram.
    """

    def __init__(self, path: str | Path, on_write: Callable[[str, float], None] | None = None):
        self.path = Path(path)
        self.name = f"sqlite:///{self.path}"  # for messages, as PostgresStore.name
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _private(self.path, create=True)  # before SQLite makes -wal and -shm with its mode
        self._on_write = on_write
        self._lock = threading.Lock()
        self._pid = os.getpid()
        # isolation_level=None: no implicit transactions; every write opens its own with
        # BEGIN IMMEDIATE (below). check_same_thread=False: the lock serialises use instead.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout = 10000")  # first, so the next pragmas wait too
            db.execute("PRAGMA journal_mode = WAL")  # readers never block the writer
            # FULL: the WAL is fsynced at every commit, so an acknowledged write survives a
            # power cut, not just a crash of the process (NORMAL would only promise the latter).
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
            self._default_cache_size = db.execute("PRAGMA cache_size").fetchone()[0]
        except BaseException:
            db.close()
            raise
        for suffix in ("-wal", "-shm"):  # left readable by an older version
            _private(self.path.with_name(self.path.name + suffix))
        self._db: sqlite3.Connection | None = db
        try:
            self.migrate()
        except BaseException:
            self.close()
            raise

    # Plumbing ---------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"store {self.path} is closed")
        if os.getpid() != self._pid:
            raise StoreError(f"store {self.path} was opened in process {self._pid}; "
                             "open a new one after fork")
        return self._db

    @contextmanager
    def _write(self, operation: str, bulk: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block ends, rolled back if it raises.
        A constraint the database enforces (or a value it cannot hold) is StoreRejected."""
        start = time.perf_counter()
        with self._lock:
            db = self._connection()
            if bulk:
                # Inserting a million rows into random places of the unique indexes thrashes
                # the default 2 MB page cache; a large one for the duration makes seeding
                # about a third faster, without every worker keeping that much memory.
                db.execute(f"PRAGMA cache_size = {-_BULK_CACHE_KIB}")
            # IMMEDIATE takes the write lock now (waiting up to busy_timeout). A deferred
            # transaction would take it at its first write and could then fail with
            # SQLITE_BUSY at once, because its read snapshot may be stale.
            db.execute("BEGIN IMMEDIATE")
            committed = False
            self._begin(operation)
            try:
                yield db
                db.execute("COMMIT")
                committed = True
            except BaseException as e:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if isinstance(e, (sqlite3.IntegrityError, sqlite3.DataError)):
                    raise StoreRejected(f"{operation}: the store refused the write ({e})") from e
                raise
            finally:
                self._end(committed)
                if bulk:
                    db.execute(f"PRAGMA cache_size = {self._default_cache_size}")
                    db.execute("PRAGMA shrink_memory")
        if self._on_write is not None:
            try:
                self._on_write(operation, time.perf_counter() - start)
            except Exception:
                # The write is committed: failing the call now would make the client retry
                # something that succeeded. A broken metrics hook is logged, not fatal.
                log.exception("on_write hook failed for %s", operation)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent read: every query in the block sees the same committed state."""
        with self._lock:
            db = self._connection()
            db.execute("BEGIN")
            try:
                yield db
            finally:
                db.execute("COMMIT")

    def _fetch_all(self, query: str, params: tuple) -> list[tuple]:
        with self._read() as db:
            return db.execute(query, params).fetchall()

    @staticmethod
    def _check_rows(db: sqlite3.Connection, rows: np.ndarray) -> None:
        # Rows are dense, so a range check proves every row exists.
        n = db.execute("SELECT COUNT(*) FROM citizens").fetchone()[0]
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise NotFound(f"citizen rows must be in 0..{n - 1}; got {rows.min()}..{rows.max()}")

    # Schema -----------------------------------------------------------------------------

    def migrate(self) -> None:
        with self._write("migrate") as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                       "version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
            self._migrate_from(db, MIGRATIONS, str(self.path))

    # Citizens and consent ---------------------------------------------------------------

    def upsert_citizen(self, citizen_id: str, birth_day: int) -> tuple[int, bool]:
        with self._write("upsert_citizen") as db:
            row = self._known_citizen(db, citizen_id, birth_day)
            if row is not None:
                return row, False
            row = db.execute(f"SELECT {_NEXT_ROW}").fetchone()[0]
            db.execute("INSERT INTO citizens (citizen_row, citizen_id, birth_day) VALUES (?, ?, ?)",
                       (row, citizen_id, int(birth_day)))
            self._change(db, row)
            return row, True

    def upsert_citizens_bulk(self, ids: Sequence[str], birth_days: np.ndarray) -> None:
        days = np.asarray(birth_days, np.int64)
        if len(ids) != len(days):
            raise ValueError(f"{len(ids)} ids but {len(days)} birth days")
        with self._write("upsert_citizens_bulk", bulk=True) as db:
            # The row is computed per statement, so ids already stored (or repeated in the
            # list) take no row and new rows stay dense.
            db.executemany(
                f"INSERT INTO citizens (citizen_row, citizen_id, birth_day) VALUES ({_NEXT_ROW}, ?, ?)"
                " ON CONFLICT (citizen_id) DO UPDATE SET birth_day = excluded.birth_day",
                zip(ids, days.tolist()))
            self._change(db)

    def set_consents_bulk(self, rows: np.ndarray, granted: bool) -> None:
        rows = np.asarray(rows, np.int64)
        with self._write("set_consents_bulk", bulk=True) as db:
            self._check_rows(db, rows)
            tx = self._change(db)
            db.executemany("UPDATE citizens SET consent = ? WHERE citizen_row = ?",
                           ((int(granted), r) for r in rows.tolist()))
            db.executemany("DELETE FROM purpose_consents WHERE citizen_row = ?", ((r,) for r in rows.tolist()))
            db.executemany("INSERT INTO consent_history (citizen_row, granted, at, position) VALUES (?, ?, ?, ?)",
                           ((r, int(granted), tx.at, tx.position) for r in rows.tolist()))

    def consent_history(self, citizen_id: str) -> list[ConsentEvent]:
        with self._read() as db:
            row = self._row_of(db, citizen_id)
            events = db.execute("SELECT granted, at, position FROM consent_history WHERE citizen_row = ?"
                                " ORDER BY id", (row,)).fetchall()
        return [ConsentEvent(bool(g), at, position) for g, at, position in events]

    # Card tokens ------------------------------------------------------------------------

    def register_cards_bulk(self, tokens: np.ndarray, rows: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, np.uint8)
        rows = np.asarray(rows, np.int64)
        if tokens.ndim != 2 or tokens.shape[1] != TOKEN_BYTES or len(tokens) != len(rows):
            raise ValueError(f"tokens must have shape (n, {TOKEN_BYTES}) with n = len(rows)")
        with self._write("register_cards_bulk", bulk=True) as db:
            self._check_rows(db, rows)
            self._change(db)
            try:
                db.executemany("INSERT INTO cards (token, citizen_row) VALUES (?, ?)",
                               zip((t.tobytes() for t in tokens), rows.tolist()))
            except sqlite3.IntegrityError as e:  # the batch is rolled back
                if "UNIQUE constraint failed: cards.token" not in str(e):
                    raise  # another constraint: StoreRejected
                raise Conflict(f"a card token in the batch is already registered ({e})") from e

    # Records ----------------------------------------------------------------------------

    def _citizen_rows(self, db, citizen_ids: Sequence[str]) -> dict[str, int]:
        rows: dict[str, int] = {}
        for citizen_id in citizen_ids:
            if citizen_id not in rows:
                rows[citizen_id] = self._row_of(db, citizen_id)
        return rows

    def _first_contents(self, db, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], tuple]:
        query = (f"SELECT {_FIRST_CONTENT} FROM records r JOIN citizens c USING (citizen_row)"
                 " WHERE r.source = ? AND r.record_id = ?")
        found = ((key, db.execute(query, key).fetchone()) for key in keys)
        return {key: tuple(content) for key, content in found if content is not None}

    def _insert_records(self, db, rows: list[tuple]) -> None:
        db.executemany("INSERT INTO records (record_id, citizen_row, variable, day, value, source, scenario)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def add_records_bulk(
        self, citizen_row: np.ndarray, variable: Sequence[str] | np.ndarray, day: np.ndarray,
        value: np.ndarray, source: str, record_ids: Sequence[str], sent_by: str | None = None,
    ) -> None:
        rows, variable, day, value = self._bulk_columns(citizen_row, variable, day, value, record_ids)
        sent_by = _check_sent_by(source if sent_by is None else sent_by)
        with self._write("add_records_bulk", bulk=True) as db:
            self._check_rows(db, rows)
            tx, after = self._change(db), self._last_record_id(db)
            try:
                db.executemany(
                    "INSERT INTO records (record_id, citizen_row, variable, day, value, source)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    zip(record_ids, rows.tolist(), variable, day.tolist(), value.tolist(), repeat(source)))
            except sqlite3.IntegrityError as e:  # the batch is rolled back
                if "UNIQUE constraint failed: records.source, records.record_id" not in str(e):
                    raise  # another constraint: StoreRejected
                raise Conflict(f"a record_id in the batch is already stored for source {source!r}") from e
            db.execute(_FIRST_VERSIONS, (tx.at, sent_by, tx.position, after))

    @contextmanager
    def bulk_load(self) -> Iterator[BulkLoad]:
        # Seeding an EMPTY store, so what is safe here would not be for ordinary writes:
        # nothing in it has been acknowledged to anyone, and the load is one transaction, so
        # a crash (or an exception) leaves the store as empty as it was, never half seeded.
        # * journal_mode DELETE for the load: a rollback journal keeps only the pages that
        #   existed before (a few: the schema), while the WAL would hold every new page once
        #   more (twice the writes, and its size again on disk). A crash leaves a hot
        #   journal, rolled back by the next open (SQLiteStore's connect), back to empty.
        #   Leaving WAL needs this to be the file's only connection; if another is open the
        #   load stays in WAL, slower but as safe.
        # * 16 KiB pages (_LOAD_PAGE_SIZE): the page size of an empty file is changed by a
        #   VACUUM of nothing, in a moment; SQLite reads and writes any page size the same way.
        # * synchronous stays FULL: with a rollback journal it costs only the commit's fsync
        #   (new pages are not journaled, so the spills of the cache need no journal sync).
        # * foreign_keys OFF: _check proves every citizen row exists (rows are dense), which
        #   saves a lookup per row (measured: half the time of inserting a record).
        # * a 1 GiB page cache and two sorter threads (the indexes built at the end).
        start = time.perf_counter()
        with self._lock:
            db = self._connection()
            db.execute("PRAGMA busy_timeout = 0")  # another connection: do not wait to leave WAL
            try:
                journal = db.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
            except sqlite3.OperationalError:
                journal = "wal"
            db.execute("PRAGMA busy_timeout = 10000")
            if journal != "delete":
                log.info("bulk load into %s: other connections are open, so it runs in WAL mode", self.path)
            elif (db.execute("PRAGMA page_size").fetchone()[0] < _LOAD_PAGE_SIZE
                  and db.execute(_LOAD_ANY_ROW).fetchone() is None):
                try:
                    db.execute(f"PRAGMA page_size = {_LOAD_PAGE_SIZE}")
                    db.execute("VACUUM")
                except sqlite3.OperationalError as e:  # a reader came in: keep the page size
                    log.info("bulk load into %s: page size left as it is (%s)", self.path, e)
            db.execute("PRAGMA foreign_keys = OFF")
            db.execute(f"PRAGMA cache_size = {-_LOAD_CACHE_KIB}")
            db.execute("PRAGMA threads = 2")
            committed = False
            try:
                db.execute("BEGIN IMMEDIATE")
                self._begin("bulk_load")
                try:
                    load = _SQLiteLoad(self, db)
                    yield load
                    if load.citizens or load.cards or load.records:
                        load._finish()
                        db.execute("COMMIT")
                        committed = True
                    else:  # nothing loaded: no change (the log's entry goes with the rollback)
                        db.execute("ROLLBACK")
                except BaseException as e:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    if isinstance(e, (sqlite3.IntegrityError, sqlite3.DataError)):
                        raise StoreRejected(f"bulk_load: the store refused the write ({e})") from e
                    raise
                finally:
                    self._end(committed)
            finally:
                db.execute("PRAGMA threads = 0")
                db.execute(f"PRAGMA cache_size = {self._default_cache_size}")
                db.execute("PRAGMA foreign_keys = ON")
                try:
                    db.execute("PRAGMA journal_mode = WAL")
                except sqlite3.OperationalError as e:  # the next open sets it again
                    log.warning("bulk load into %s: could not return to WAL mode yet (%s)", self.path, e)
                db.execute("PRAGMA shrink_memory")
        if committed and self._on_write is not None:
            try:
                self._on_write("bulk_load", time.perf_counter() - start)
            except Exception:
                log.exception("on_write hook failed for bulk_load")

    # Bookkeeping ------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        queries = {
            "citizens": "SELECT COUNT(*) FROM citizens",
            "cards": "SELECT COUNT(*) FROM cards",
            "records": "SELECT COUNT(*) FROM records",
            "active_records": "SELECT COUNT(*) FROM records WHERE status = 'active'",
            "consents_granted": "SELECT COUNT(*) FROM citizens WHERE consent = 1",
        }
        with self._read() as db:
            return {name: db.execute(sql).fetchone()[0] for name, sql in queries.items()}

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                # A store inherited through fork must not touch the parent's connection.
                if os.getpid() == self._pid:
                    self._db.close()
                self._db = None

    def bulk_read(self) -> BulkRead:
        with self._lock:
            self._connection()  # not closed, not inherited through fork
        return SQLiteBulkRead(self.path)

    def rows_read(self) -> RowsRead:
        with self._lock:
            self._connection()  # not closed, not inherited through fork
        return SQLiteRowsRead(self.path)


# --------------------------------------------------------------------------------------------
# Bulk reads: the start-up load (server/state.py ServingState.fill)


@dataclass(frozen=True, eq=False)
class RecordBlock:
    """A block of active records as integer codes (:meth:`BulkRead.records`), in insertion
    order; all arrays have the same length."""

    citizen_row: np.ndarray  # int32
    variable: np.ndarray  # int16: the index of the record's variable in the names asked for
    day: np.ndarray  # int32: days since 1970-01-01
    value: np.ndarray  # float32
    scenario: np.ndarray  # int8: the code asked for of the record's scenario; -1: none or not listed

    def __len__(self) -> int:
        return len(self.citizen_row)

    def take(self, index) -> RecordBlock:
        return RecordBlock(*(getattr(self, f.name)[index] for f in fields(self)))

    @staticmethod
    def concat(blocks: Sequence[RecordBlock]) -> RecordBlock:
        if len(blocks) == 1:
            return blocks[0]
        if not blocks:
            return _record_block(0)
        return RecordBlock(*(np.concatenate([getattr(b, f.name) for b in blocks]) for f in fields(RecordBlock)))


def _record_block(n: int) -> RecordBlock:
    return RecordBlock(np.empty(n, np.int32), np.empty(n, np.int16), np.empty(n, np.int32), np.empty(n, np.float32),
                       np.empty(n, np.int8))


def _head(block: RecordBlock, n: int) -> RecordBlock:
    """The first ``n`` rows of a block just filled: the block itself when full, else a copy
    (the rest of its buffers is freed)."""
    if n == len(block):
        return block
    return RecordBlock(*(getattr(block, f.name)[:n].copy() for f in fields(RecordBlock)))


@dataclass(frozen=True, eq=False)
class CitizenChunk:
    """Citizens ``first_row .. first_row + len - 1`` (:meth:`BulkRead.citizens`); their ids
    as one buffer, not a Python object each."""

    first_row: int
    ids: np.ndarray  # uint8: the citizen ids' UTF-8 bytes, back to back
    id_offsets: np.ndarray  # int64 (len + 1): id i is ids[id_offsets[i]:id_offsets[i + 1]]
    birth_day: np.ndarray  # int32
    consent: np.ndarray  # uint8

    def __len__(self) -> int:
        return len(self.id_offsets) - 1

    def id_list(self) -> list[str]:
        """The ids as str (a Python object each: for tests and small tables)."""
        data, off = self.ids.tobytes(), self.id_offsets.tolist()
        return [data[off[i]:off[i + 1]].decode() for i in range(len(self))]

    @classmethod
    def of(cls, first_row: int, ids: Sequence[str], birth_day: np.ndarray, consent: np.ndarray) -> CitizenChunk:
        encoded = [i.encode() for i in ids]
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(first_row, np.frombuffer(b"".join(encoded), np.uint8), offsets, birth_day, consent)

    @staticmethod
    def join(first_row: int, parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> CitizenChunk:
        """One chunk of consecutive parts ``(ids, offsets, birth_day, consent)``."""
        if len(parts) == 1:
            return CitizenChunk(first_row, *parts[0])
        offsets, base = [np.zeros(1, np.int64)], 0
        for ids, off, _, _ in parts:
            offsets.append(off[1:] + base)
            base += len(ids)
        return CitizenChunk(first_row, np.concatenate([p[0] for p in parts]), np.concatenate(offsets),
                            np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts]))


def _check_codes(variables: Sequence[str], scenarios: dict[str, int]) -> None:
    if len(variables) > 2**15 - 1:
        raise ValueError("at most 32767 variables")
    for name, code in scenarios.items():
        if not -1 <= int(code) <= 127:
            raise ValueError(f"scenario {name!r}: code {code} is not in -1..127")


class BulkRead(abc.ABC):
    """What a whole-population load reads, as numpy arrays in bounded blocks: never a
    Python object per record, and never a whole table in memory at once.

    :attr:`position` is the store's change position the records are read at: every change
    up to it is in them. The citizens and cards are at least that new. :attr:`n_citizens`:
    the citizens (rows ``0 .. n_citizens - 1``) :meth:`citizens` gives; records of any other
    row are left out. :meth:`records` may run in one thread while another runs
    :meth:`cards` and then :meth:`citizens` (they read over separate connections). Close it
    (or use it as a context manager) to end its read transactions."""

    position: int = 0
    n_citizens: int = 0
    #: Records left out so far (a variable not asked for, a row out of range).
    skipped: int = 0
    #: How many parts :meth:`records` reads in: each may run in a thread of its own, at once.
    parts: int = 1

    @abc.abstractmethod
    def records(self, variables: Sequence[str], scenarios: dict[str, int], block_rows: int = 1 << 20,
                part: int = 0) -> Iterator[RecordBlock]:
        """Every active record of citizens ``0 .. n_citizens - 1`` in insertion order (a
        citizen's records in the order :meth:`Store.active_records` gives them), at most
        ``block_rows`` a block; with :attr:`parts` > 1, those of part ``part`` (parts 0, 1,
        … one after the other are every record, in that order). ``variable`` is the index of
        its name in ``variables`` (a record of a variable not listed is left out, counted in
        :attr:`skipped`); ``scenario`` the code ``scenarios`` maps its scenario to (-1..127;
        -1 when it has none or one not listed)."""

    @abc.abstractmethod
    def cards(self, block_rows: int = 1 << 20) -> Iterator[CardTable]:
        """Every card token in registration order, at most ``block_rows`` a block."""

    @abc.abstractmethod
    def citizens(self, chunk_rows: int) -> Iterator[CitizenChunk]:
        """Citizens ``0 .. n_citizens - 1`` in row order, ``chunk_rows`` a chunk (the last
        may be smaller)."""

    def close(self) -> None:
        """End the read transactions and close the connections. Idempotent."""

    def __enter__(self) -> BulkRead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StoreBulkRead(BulkRead):
    """A :class:`BulkRead` over any object with the store's read methods
    (``high_water_mark``, ``citizens``, ``cards``, ``active_records``; e.g.
    server/models.py's StoreSnapshot): each table whole, so not bounded in memory. Names
    become codes through a dict in C (``map``), not a Python loop per record."""

    def __init__(self, store):
        self._store = store
        self.position = store.high_water_mark()  # first: what is read below is at least this new
        self._table = store.citizens()
        self.n_citizens = len(self._table.ids)

    def records(self, variables, scenarios, block_rows=1 << 20, part=0):
        _check_codes(variables, scenarios)
        active = self._store.active_records()
        variable = name_codes(active.variable, {v: i for i, v in enumerate(variables)}, np.int16)
        keep = (variable >= 0) & (active.citizen_row >= 0) & (active.citizen_row < self.n_citizens)
        self.skipped += int(len(keep) - np.count_nonzero(keep))
        block = RecordBlock(active.citizen_row[keep].astype(np.int32), variable[keep], active.day[keep].astype(np.int32),
                            active.value[keep].astype(np.float32),
                            name_codes(active.scenario[keep], dict(scenarios), np.int8))
        for lo in range(0, len(block), block_rows):
            yield block.take(slice(lo, lo + block_rows))

    def cards(self, block_rows=1 << 20):
        yield self._store.cards()

    def citizens(self, chunk_rows):
        t = self._table
        for lo in range(0, self.n_citizens, chunk_rows):
            hi = min(lo + chunk_rows, self.n_citizens)
            yield CitizenChunk.of(lo, t.ids[lo:hi], t.birth_day[lo:hi], t.consent[lo:hi])


def name_codes(names: np.ndarray, codes: dict, dtype=np.int32, missing: int = -1) -> np.ndarray:
    """``codes[name]`` for each of an object array of names (``missing`` for any other, None
    included), by a C-level map over the dict: no Python bytecode per name."""
    return np.fromiter(map(codes.get, names, repeat(missing)), dtype, count=len(names))


def bulk_read(store) -> BulkRead:
    """``store.bulk_read()``, or a :class:`StoreBulkRead` for an object with the store's
    read methods but no bulk reader of its own."""
    opener = getattr(store, "bulk_read", None)
    return opener() if opener is not None else StoreBulkRead(store)


#: The current view for the bulk reader, a range of ids, in insertion (rowid) order: a scan
#: of the table, never of an index (NOT INDEXED), so one sequential pass over the file.
_BULK_ACTIVE = ("SELECT citizen_row, variable, day, value, scenario FROM records NOT INDEXED"
                " WHERE id >= ?1 AND id < ?2 AND status = 'active'")


class SQLiteBulkRead(BulkRead):
    """:class:`BulkRead` of an SQLite store file over read-only connections of its own
    (server/bulk_read.pyx, the same SQLite library as Python's sqlite3 module): :attr:`parts`
    read the records, each a range of ids (scanning in threads of their own, the scan is
    what a load of SQLite spends most on), and one the cards and citizens. Each holds one
    read transaction from open to close, so each sees one committed state: the first part's
    is that of :attr:`position` (read first, in it), every other one at least as new,
    opened in turn (a record is in exactly one part: records are never deleted, and new
    ones take higher ids); the citizens' count is read in the last, so a record's citizen is
    always there."""

    #: Connections scanning the records at once.
    RECORD_PARTS = 2

    def __init__(self, path: str | Path, parts: int | None = None):
        from server.bulk_read import SQLiteReader

        self.path = str(path)
        self.parts = max(1, int(self.RECORD_PARTS if parts is None else parts))
        self._records_dbs: list = []
        self._tables_db = None
        self._skipped_lock = threading.Lock()
        try:
            for part in range(self.parts):
                # No mmap: measured no faster for one scan here, and mapped pages of the file
                # would count in the process's resident set (up to SQLite's 2 GB cap).
                db = SQLiteReader(self.path)
                self._records_dbs.append(db)
                db.execute("BEGIN")
                if part == 0:
                    self.position = db.scalar("SELECT COALESCE(MAX(seq), 0) FROM changes")
                    low = db.scalar("SELECT COALESCE(MIN(id), 0) FROM records")
                    high = db.scalar("SELECT COALESCE(MAX(id), 0) FROM records") + 1
                    # Part i: ids edges[i] .. edges[i + 1] - 1; the last one open-ended.
                    self._edges = [low + (high - low) * i // self.parts for i in range(self.parts)] + [2**63 - 1]
                else:
                    db.scalar("SELECT COUNT(*) FROM changes WHERE seq = 0")  # its snapshot: now
            self._tables_db = SQLiteReader(self.path)
            self._tables_db.execute("BEGIN")
            self.n_citizens = self._tables_db.scalar("SELECT COALESCE(MAX(citizen_row), -1) + 1 FROM citizens")
        except BaseException:
            self.close()
            raise

    def records(self, variables, scenarios, block_rows=1 << 20, part=0):
        from server.bulk_read import NameCodes

        _check_codes(variables, scenarios)
        var_codes = NameCodes({v: i for i, v in enumerate(variables)})
        scen_codes = NameCodes(scenarios)
        query = self._records_dbs[part].query(_BULK_ACTIVE, (self._edges[part], self._edges[part + 1]))
        try:
            while not query.done:
                block = _record_block(block_rows)
                n, skipped = query.fill_records(var_codes, scen_codes, block.citizen_row, block.variable, block.day,
                                                block.value, block.scenario, self.n_citizens)
                if skipped:
                    with self._skipped_lock:  # parts run in threads of their own
                        self.skipped += skipped
                if n:
                    yield _head(block, n)
        finally:
            query.close()

    def cards(self, block_rows=1 << 20):
        query = self._tables_db.query("SELECT token, citizen_row FROM cards ORDER BY id")
        try:
            while not query.done:
                tokens, rows = np.empty((block_rows, TOKEN_BYTES), np.uint8), np.empty(block_rows, np.int64)
                n = query.fill_cards(tokens, rows)
                if n:
                    yield CardTable(tokens[:n], rows[:n])
        finally:
            query.close()

    def citizens(self, chunk_rows):
        query = self._tables_db.query("SELECT citizen_row, citizen_id, birth_day, consent FROM citizens"
                                      " WHERE citizen_row < ?1 ORDER BY citizen_row", (self.n_citizens,))
        try:
            for lo in range(0, self.n_citizens, chunk_rows):
                yield CitizenChunk(lo, *query.fill_citizens(lo, min(chunk_rows, self.n_citizens - lo)))
        finally:
            query.close()

    def close(self) -> None:
        for db in (*self._records_dbs, self._tables_db):
            if db is not None:
                try:
                    db.execute("COMMIT")
                except Exception:
                    pass  # no transaction open (it failed before): closing ends it anyway
                db.close()
        self._records_dbs, self._tables_db = [], None


class RowsRead(abc.ABC):
    """Chosen citizens' active records as numpy arrays: the day rollover reads the few
    citizens whose features change that day (server/rollover.py) this way instead of the
    whole store. Each :meth:`read` is a read transaction of its own, kept short (a long one
    would hold back the WAL's checkpoints, which a writer then pays for in one commit: 4.7 s
    at 12.5 M). Close it (or use it as a context manager) to end its connection."""

    @abc.abstractmethod
    def read(self, rows: np.ndarray, variables: Sequence[str], scenarios: dict[str, int]) -> tuple[int, RecordBlock]:
        """The active records of citizen ``rows`` (ascending), all as of one store position
        (every change up to it, none after): ``(position, records)``, the records as
        :meth:`BulkRead.records` gives them (each citizen's in the order
        :meth:`Store.active_records` gives them, citizens in ``rows``' order)."""

    def close(self) -> None:
        """Close the connection. Idempotent."""

    def __enter__(self) -> RowsRead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StoreRowsRead(RowsRead):
    """:class:`RowsRead` through any store's ``active_records(citizen_row=, as_of=)``, a
    citizen at a time (a query each: for stores without a reader of their own)."""

    def __init__(self, store):
        self._store = store

    def read(self, rows, variables, scenarios):
        _check_codes(variables, scenarios)
        codes = {v: i for i, v in enumerate(variables)}
        position = self._store.high_water_mark()
        blocks = []
        for row in np.asarray(rows, np.int64).tolist():
            active = self._store.active_records(citizen_row=row, as_of=position)
            variable = name_codes(active.variable, codes, np.int16)
            keep = variable >= 0
            blocks.append(RecordBlock(np.full(int(keep.sum()), row, np.int32), variable[keep],
                                      active.day[keep].astype(np.int32), active.value[keep].astype(np.float32),
                                      name_codes(active.scenario[keep], dict(scenarios), np.int8)))
        return position, RecordBlock.concat(blocks)


#: One citizen's active records in insertion order, through the citizen index (its
#: (citizen_row, status) entries are in rowid order: no sort).
_ROW_ACTIVE = ("SELECT citizen_row, variable, day, value, scenario FROM records INDEXED BY records_by_citizen"
               " WHERE citizen_row = ?1 AND status = 'active' ORDER BY id")


class SQLiteRowsRead(RowsRead):
    """:class:`RowsRead` of an SQLite store file over a read-only connection of its own
    (server/bulk_read.pyx): each read a transaction of its own, a prepared statement stepped
    for one citizen after another in C without the GIL."""

    def __init__(self, path: str | Path):
        from server.bulk_read import SQLiteReader

        self.path = str(path)
        self._db = SQLiteReader(self.path)

    def read(self, rows, variables, scenarios, block_rows=1 << 16):
        from server.bulk_read import NameCodes

        _check_codes(variables, scenarios)
        rows = np.ascontiguousarray(rows, np.int64)
        var_codes, scen_codes = NameCodes({v: i for i, v in enumerate(variables)}), NameCodes(scenarios)
        if self._db is None:
            raise StoreError(f"{self.path}: the rows reader is closed")
        self._db.execute("BEGIN")
        try:
            position = self._db.scalar("SELECT COALESCE(MAX(seq), 0) FROM changes")  # the transaction's snapshot
            query = self._db.query(_ROW_ACTIVE)
            blocks, k = [], 0
            try:
                while k < len(rows):
                    block = _record_block(block_rows)
                    k, n, _ = query.fill_records_of_rows(var_codes, scen_codes, rows, k, block.citizen_row,
                                                         block.variable, block.day, block.value, block.scenario)
                    if n:
                        blocks.append(_head(block, n))
            finally:
                query.close()
        finally:
            self._db.execute("COMMIT")
        return position, RecordBlock.concat(blocks)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def rows_read(store) -> RowsRead:
    """``store.rows_read()``, or a :class:`StoreRowsRead` for an object with the store's read
    methods but no reader of its own."""
    opener = getattr(store, "rows_read", None)
    return opener() if opener is not None else StoreRowsRead(store)


# --------------------------------------------------------------------------------------------


def open_store(url: str | Path, on_write: Callable[[str, float], None] | None = None) -> Store:
    """The store a URL names.

    * ``sqlite:///data/qj.db`` (relative) or ``sqlite:////var/lib/qj.db`` (absolute: four
      slashes, the SQLAlchemy convention), or a plain path: :class:`SQLiteStore`;
    * ``postgresql://user@host:port/dbname`` (any libpq URI; ``postgres://`` and
      ``postgresql+psycopg://`` too): :class:`server.store_pg.PostgresStore`.
    """
    url = str(url)
    if url.startswith(("postgresql://", "postgres://", "postgresql+")):
        from server.store_pg import PostgresStore  # imports psycopg: only when asked for

        return PostgresStore(url, on_write=on_write)
    if url.startswith("sqlite:///"):
        return SQLiteStore(url.removeprefix("sqlite:///"), on_write=on_write)
    if "://" in url:
        raise ValueError(f"unsupported store URL scheme: {url.split('://', 1)[0]!r}")
    return SQLiteStore(url, on_write=on_write)
