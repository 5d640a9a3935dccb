"""The durable store: citizens, consent, card tokens and credit records.

:class:`Store` is the interface the servicers use; :class:`SQLiteStore` is the embedded
default (one file, WAL journal, zero set-up); :class:`server.store_pg.PostgresStore` fills the
same interface in PostgreSQL and passes the same tests (design section 6). Pick one with
:func:`open_store`.

    >>> import tempfile
    >>> from server.store import RecordIn, open_store
    >>> tmp = tempfile.TemporaryDirectory()
    >>> store = open_store(f"sqlite:///{tmp.name}/qj.db")   # creates and migrates the file
    >>> store.upsert_citizen("c-1", birth_day=7000)
    (0, True)
    >>> store.set_consent("c-1", granted=True)
    0
    >>> store.add_records([RecordIn("r-1", "c-1", "traffic_violations", 19000, 1.0, "police", None)])
    [True]
    >>> store.add_records([RecordIn("r-1", "c-1", "traffic_violations", 19000, 1.0, "police", None)])
    [False]
    >>> store.active_records(citizen_row=0).record_id.tolist()
    ['r-1']
    >>> store.close(); tmp.cleanup()

Contract shared by every implementation:

* Every write is committed durably before the method returns: a record is acknowledged only
  after it is committed. A method that raises has written nothing.
* Citizen rows are dense, ``0..n-1`` in creation order, and never change: they index the
  serving arrays (features, scores) directly.
* Days are integers, days since 1970-01-01.
* :meth:`Store.high_water_mark` changes whenever stored data changes (and only then), so a
  snapshot file tagged with it can be checked for staleness.
* Error messages name the problem, and name citizens and records by their ids: callers decide
  what reaches logs (no identifier of a person may, design section 5).
"""

from __future__ import annotations

import abc
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Record statuses. Only "active" records count towards a score.
ACTIVE, WITHDRAWN, REPAIRED = "active", "withdrawn", "repaired"
INACTIVE_STATUSES = (WITHDRAWN, REPAIRED)

TOKEN_BYTES = 16


class StoreError(Exception):
    """Anything the store refuses or cannot do."""


class StoreUnavailable(StoreError):
    """The store cannot be reached (connection refused or lost, server shutting down): the
    operation was not done. The next call tries to reconnect."""


class NotFound(StoreError):
    """An id (citizen, record) that the store does not hold."""


class Conflict(StoreError):
    """The request contradicts what is stored (a token bound elsewhere, a withdrawn record)."""


class WrongState(StoreError):
    """The operation does not apply to the item in its current state (a withdrawn record)."""


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
    """A stored record, with its citizen's row and its status (active/withdrawn/repaired)."""

    record_id: str
    citizen_row: int
    citizen_id: str
    variable: str
    day: int
    value: float
    source: str
    scenario: str | None
    status: str


@dataclass(frozen=True)
class ConsentEvent:
    """One grant or revocation, ``at`` in seconds since the epoch (UTC)."""

    granted: bool
    at: float


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


# --------------------------------------------------------------------------------------------
# The interface


class Store(abc.ABC):
    """Durable storage behind the gRPC servicers. See the module docstring for the contract.

    Usable as a context manager (``with open_store(url) as store: ...``) to close it.
    """

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
    def add_records(self, records: Sequence[RecordIn]) -> list[bool]:
        """Insert a batch in one transaction. Per record: True if inserted, False if its
        record_id is already stored (nothing changes, even if other fields differ). An unknown
        citizen raises :class:`NotFound` and nothing of the batch is written."""

    @abc.abstractmethod
    def add_records_bulk(
        self, citizen_row: np.ndarray, variable: Sequence[str] | np.ndarray, day: np.ndarray,
        value: np.ndarray, source: str, record_ids: Sequence[str],
    ) -> None:
        """Seeding: insert many new records (no scenario) in one transaction."""

    @abc.abstractmethod
    def get_record(self, record_id: str) -> RecordRow:
        """One record, whatever its status. :class:`NotFound` for an unknown id."""

    @abc.abstractmethod
    def correct_record(self, record_id: str, day: int, value: float) -> RecordRow:
        """Change an active record's day and value; :class:`Conflict` if it is not active."""

    @abc.abstractmethod
    def set_record_status(self, record_id: str, status: str) -> RecordRow:
        """Mark a record "withdrawn" or "repaired": it stops counting."""

    @abc.abstractmethod
    def active_records(self, citizen_row: int | None = None) -> ActiveRecords:
        """All active records, or one citizen's."""

    # Bookkeeping ------------------------------------------------------------------------

    @abc.abstractmethod
    def counts(self) -> dict[str, int]:
        """citizens, cards, records, active_records, consents_granted."""

    @abc.abstractmethod
    def high_water_mark(self) -> int:
        """A number that increases with every change to the stored data."""

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
        # No CHECK on status: a later status (e.g. "disputed", design section 5) should not
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
]
SCHEMA_VERSION = len(MIGRATIONS)

# Rows are assigned inside the write transaction, which holds the database's write lock, so
# MAX + 1 cannot race with another writer (thread or process).
_NEXT_ROW = "(SELECT COALESCE(MAX(citizen_row), -1) + 1 FROM citizens)"

#: Page cache for the bulk (seeding) writes, KiB.
_BULK_CACHE_KIB = 256 * 1024

_RECORD_COLUMNS = """r.record_id, r.citizen_row, c.citizen_id, r.variable, r.day, r.value,
    r.source, r.scenario, r.status"""


class SQLStore(Store):
    """What SQLiteStore and PostgresStore (server/store_pg.py) share: the statements that are
    the same in both dialects but for the placeholder. A subclass gives ``PARAM`` and the
    ``_read()``/``_write(operation)`` transactions and ``_bump(db)``."""

    #: The DB-API placeholder of the dialect ("?" for sqlite3, "%s" for psycopg).
    PARAM = "?"

    def _q(self, sql: str) -> str:
        """A statement written with "?" placeholders, in this dialect."""
        return sql if self.PARAM == "?" else sql.replace("?", self.PARAM)

    def ping(self) -> None:
        with self._read() as db:
            db.execute("SELECT 1").fetchone()

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
            self._bump(db)

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
            self._bump(db)
        return row

    def _row_of(self, db, citizen_id: str) -> int:
        found = db.execute(self._q(
            "SELECT citizen_row FROM citizens WHERE citizen_id = ?"), (citizen_id,)).fetchone()
        if found is None:
            raise NotFound(f"citizen {citizen_id!r} not found")
        return found[0]

    def _record(self, db, record_id: str) -> RecordRow:
        found = db.execute(self._q(
            f"SELECT {_RECORD_COLUMNS} FROM records r JOIN citizens c USING (citizen_row)"
            " WHERE r.record_id = ?"), (record_id,)).fetchone()
        if found is None:
            raise NotFound(f"record {record_id!r} not found")
        return RecordRow(*found)

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
            db.execute(self._q("UPDATE citizens SET consent = ? WHERE citizen_row = ?"), (int(granted), row))
            # Every call is an event in the history, even one that repeats the current state.
            db.execute(self._q("INSERT INTO consent_history (citizen_row, granted, at) VALUES (?, ?, ?)"),
                       (row, int(granted), time.time()))
            self._bump(db)
            return row

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
            self._bump(db)
            return row, True

    def cards(self) -> CardTable:
        with self._read() as db:
            rows = db.execute(self._q("SELECT token, citizen_row FROM cards ORDER BY id")).fetchall()
        tokens, owners = zip(*rows) if rows else ((), ())
        return CardTable(
            np.frombuffer(b"".join(tokens), np.uint8).reshape(len(rows), TOKEN_BYTES).copy(),
            np.asarray(owners, np.int64))

    def get_record(self, record_id: str) -> RecordRow:
        with self._read() as db:
            return self._record(db, record_id)

    def correct_record(self, record_id: str, day: int, value: float) -> RecordRow:
        with self._write("correct_record") as db:
            record = self._record(db, record_id)
            if record.status != ACTIVE:
                raise WrongState(f"record {record_id!r} is {record.status}")
            db.execute(self._q("UPDATE records SET day = ?, value = ? WHERE record_id = ?"),
                       (int(day), float(value), record_id))
            self._bump(db)
            return self._record(db, record_id)

    def set_record_status(self, record_id: str, status: str) -> RecordRow:
        if status not in INACTIVE_STATUSES:
            raise ValueError(f"status must be one of {INACTIVE_STATUSES}, not {status!r}")
        with self._write("set_record_status") as db:
            record = self._record(db, record_id)
            if record.status == status:
                return record
            db.execute(self._q("UPDATE records SET status = ? WHERE record_id = ?"), (status, record_id))
            self._bump(db)
            return self._record(db, record_id)


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
        """One write transaction: committed when the block ends, rolled back if it raises."""
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
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            finally:
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

    @staticmethod
    def _bump(db: sqlite3.Connection) -> None:
        db.execute("UPDATE changes SET n = n + 1")

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
            self._bump(db)
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
            self._bump(db)

    def set_consents_bulk(self, rows: np.ndarray, granted: bool) -> None:
        rows = np.asarray(rows, np.int64)
        at = time.time()
        with self._write("set_consents_bulk", bulk=True) as db:
            self._check_rows(db, rows)
            db.executemany("UPDATE citizens SET consent = ? WHERE citizen_row = ?",
                           ((int(granted), r) for r in rows.tolist()))
            db.executemany("INSERT INTO consent_history (citizen_row, granted, at) VALUES (?, ?, ?)",
                           ((r, int(granted), at) for r in rows.tolist()))
            self._bump(db)

    def consent_history(self, citizen_id: str) -> list[ConsentEvent]:
        with self._read() as db:
            row = self._row_of(db, citizen_id)
            events = db.execute("SELECT granted, at FROM consent_history WHERE citizen_row = ?"
                                " ORDER BY id", (row,)).fetchall()
        return [ConsentEvent(bool(g), at) for g, at in events]

    # Card tokens ------------------------------------------------------------------------

    def register_cards_bulk(self, tokens: np.ndarray, rows: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, np.uint8)
        rows = np.asarray(rows, np.int64)
        if tokens.ndim != 2 or tokens.shape[1] != TOKEN_BYTES or len(tokens) != len(rows):
            raise ValueError(f"tokens must have shape (n, {TOKEN_BYTES}) with n = len(rows)")
        with self._write("register_cards_bulk", bulk=True) as db:
            self._check_rows(db, rows)
            try:
                db.executemany("INSERT INTO cards (token, citizen_row) VALUES (?, ?)",
                               zip((t.tobytes() for t in tokens), rows.tolist()))
            except sqlite3.IntegrityError as e:  # UNIQUE(token): the batch is rolled back
                raise Conflict(f"a card token in the batch is already registered ({e})") from e
            self._bump(db)

    # Records ----------------------------------------------------------------------------

    def add_records(self, records: Sequence[RecordIn]) -> list[bool]:
        inserted: list[bool] = []
        with self._write("add_records") as db:
            rows: dict[str, int] = {}
            for r in records:
                if r.citizen_id not in rows:
                    rows[r.citizen_id] = self._row_of(db, r.citizen_id)  # NotFound: rollback
                cur = db.execute(
                    "INSERT INTO records (record_id, citizen_row, variable, day, value, source,"
                    " scenario) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (record_id) DO NOTHING",
                    (r.record_id, rows[r.citizen_id], r.variable, int(r.day), float(r.value),
                     r.source, r.scenario))
                inserted.append(cur.rowcount == 1)
            if any(inserted):
                self._bump(db)
        return inserted

    def add_records_bulk(
        self, citizen_row: np.ndarray, variable: Sequence[str] | np.ndarray, day: np.ndarray,
        value: np.ndarray, source: str, record_ids: Sequence[str],
    ) -> None:
        rows = np.asarray(citizen_row, np.int64)
        day = np.asarray(day, np.int64)
        value = np.asarray(value, np.float64)
        variable = variable.tolist() if isinstance(variable, np.ndarray) else variable
        if not len(rows) == len(variable) == len(day) == len(value) == len(record_ids):
            raise ValueError("add_records_bulk: all columns must have the same length")
        with self._write("add_records_bulk", bulk=True) as db:
            self._check_rows(db, rows)
            try:
                db.executemany(
                    "INSERT INTO records (record_id, citizen_row, variable, day, value, source)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    zip(record_ids, rows.tolist(), variable, day.tolist(), value.tolist(),
                        (source for _ in range(len(rows)))))
            except sqlite3.IntegrityError as e:  # UNIQUE(record_id): the batch is rolled back
                raise Conflict(f"a record_id in the batch is already stored ({e})") from e
            self._bump(db)

    def active_records(self, citizen_row: int | None = None) -> ActiveRecords:
        query = ("SELECT record_id, citizen_row, variable, day, value, scenario FROM records"
                 " WHERE status = 'active'")
        with self._read() as db:
            if citizen_row is None:
                rows = db.execute(query + " ORDER BY id").fetchall()
            else:
                rows = db.execute(query + " AND citizen_row = ? ORDER BY id",
                                  (int(citizen_row),)).fetchall()
        return ActiveRecords.from_rows(rows)

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

    def high_water_mark(self) -> int:
        with self._read() as db:
            return db.execute("SELECT n FROM changes").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                # A store inherited through fork must not touch the parent's connection.
                if os.getpid() == self._pid:
                    self._db.close()
                self._db = None


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
