"""The store in PostgreSQL (psycopg 3): the same interface and contract as :class:`SQLiteStore`.

Usage (``open_store`` picks this class for ``postgresql://`` and ``postgres://`` URLs)::

    from server.store import RecordIn, open_store
    store = open_store("postgresql://qj@db.internal:5432/qianjiang")  # connects, migrates
    store.upsert_citizen("c-1", birth_day=7000)                        # (0, True)
    store.add_records([RecordIn("r-1", "c-1", "traffic_violations", 19000, 1.0, "police")],
                      sent_by="police")                                # ['accepted']
    store.close()

    qjscore serve --store postgresql://qj@db.internal/qianjiang

The DSN is anything libpq takes: a URI (``?sslmode=verify-full&options=-csearch_path%3Dqj``
picks TLS and a schema) or ``key=value`` pairs; ``postgresql+psycopg://`` (SQLAlchemy's
spelling) works too. Passwords come from the DSN, ``PGPASSWORD`` or ``~/.pgpass`` and never
appear in messages. The role needs to create tables the first time (migrations), then only to
read and write them. A throwaway server for tests: ``scripts/pg_test_server.sh start DIR``.

How the contract of :mod:`server.store` is kept:

* Durability: every write is one explicit transaction, committed before the method returns.
  ``synchronous_commit`` stays at the server's setting unless that is ``off``, which this
  session raises to ``on``: an acknowledged write is on disk (or on the synchronous standby).
* One writer at a time, readers never blocked: every write transaction (migrations too)
  starts by taking one transaction-level advisory lock, ``pg_advisory_xact_lock``, the
  equivalent of SQLite's ``BEGIN IMMEDIATE``, across threads, processes and machines. It
  buys: the change log's ``seq`` as ``MAX + 1``, so without gaps and in commit order (a
  sequence would leave gaps at rollbacks and could commit out of order); dense citizen rows
  as ``MAX + 1`` (the insert also takes ``LOCK TABLE citizens IN SHARE ROW EXCLUSIVE MODE``,
  against writers that bypass this class); identity ids that follow commit order (so
  "insertion order" means what it means in SQLite, and the records a write inserted are
  those above the largest id before it); read-then-write steps (correct a record that is
  still active) with no retry loop; processes starting together on an empty database
  migrating it once; and no lock order to get wrong, so no deadlocks. Unlike a row lock it
  writes nothing, so a call that changes nothing (a resent record, an unchanged citizen or
  card) commits without a WAL flush. Writes run at READ COMMITTED (each
  statement sees what the writer before committed); a writer that waits more than
  ``lock_timeout`` (10 s, like SQLite's ``busy_timeout``) fails with :class:`StoreError`
  (an ordinary write's own bound, below, ends the wait sooner). The lock's key is per
  database: stores in several schemas of one database share it.
* Bounded round trips: a call answers within ``timeout`` (:data:`DEFAULT_TIMEOUT`, 3 s, or
  ``QJ_STORE_TIMEOUT`` seconds) or fails with :class:`StoreUnavailable`, whether the server
  is slow, hung (SIGSTOP) or cut off (a partition). The server enforces what it can
  (``statement_timeout`` and ``idle_in_transaction_session_timeout``, a little under the
  bound, so a live server answers with a clean error first); TCP keepalives (idle 5 s,
  every 2 s, 3 probes) and ``tcp_user_timeout`` (the bound) find a dead peer. None of that
  ends a call to a server that is stopped but whose kernel still acknowledges on its
  behalf (measured: psycopg waits until SIGCONT), so each call also arms a watchdog: past
  the bound it shuts the connection's socket down, the call fails at once, and the next
  call reconnects (``connect_timeout``: the bound, at least libpq's 2 s). A call also waits
  at most the bound for another thread's call on the shared connection. Bulk methods (the
  ``*_bulk`` writes, migrations, and the whole-table reads of a start-up load:
  ``citizens()``, ``cards()``, ``active_records()`` of everyone, ``counts()``) are not
  bounded: they are long by nature and never on a serving path. The DSN's own settings
  (``?connect_timeout=…``, ``options=-c statement_timeout=…``) win over these defaults.
* Reads: each read method is one statement outside any transaction block (one round trip,
  one consistent snapshot; ``counts()`` and ``consent_history()`` are single statements too).
* Migrations: run on open, in one write transaction; DDL is transactional, so a step is all
  or nothing. Version numbers are those of the SQLite schema (same tables, PostgreSQL types).
* Errors: the same :class:`StoreError` subclasses and messages as SQLite. A lost connection,
  a lock timeout or a server shutting down is a :class:`StoreUnavailable` (UNAVAILABLE to
  callers); the next call reconnects. An integrity or data error (a broken constraint, a
  value out of a column's range) is a :class:`StoreRejected`: retrying cannot help.
  Constraint messages never include the offending value (a card token), unlike PostgreSQL's
  DETAIL line.
* Fork: as with SQLite, a store must not be used across ``fork``; the child gets
  :class:`StoreError` and its ``close()`` leaves the parent's connection alone.
* Bulk (seeding) methods stream rows with binary ``COPY``; a record's version 1 is then
  copied with one ``INSERT … SELECT``. ``bulk_load`` (seeding an empty store at scale,
  server/seed.py) is one transaction: the tables locked and truncated, their keys, unique
  constraints, foreign keys and indexes dropped, every row (versions too) sent as binary
  ``COPY … FREEZE`` data built by numpy, then all of them put back as they were.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from itertools import repeat

import numpy as np
import psycopg
from psycopg import errors as pg_errors
from psycopg import sql as pg_sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from server.store import (
    _FIRST_CONTENT, _FIRST_VERSIONS, TOKEN_BYTES, ConsentEvent, Conflict, NotFound, SQLStore, StoreError,
    StoreRejected, StoreUnavailable, _check_sent_by,
)
from server.store import BulkRead, CardTable, CitizenChunk, _check_codes, _head, _record_block  # bulk reads
from server.store import _LOADED_TABLES, BulkLoad, LoadChunk, _digits, _NothingLoaded  # bulk loads

log = logging.getLogger(__name__)

#: Schema migrations: MIGRATIONS[i] takes the schema from version i to version i + 1. Append
#: only; never edit a released step. Version i here is version i of the SQLite schema
#: (server/store.py): the same tables and columns, in PostgreSQL's types.
MIGRATIONS: list[list[str]] = [
    [
        # citizen_row is assigned explicitly: dense 0..n-1 (see upsert_citizen).
        """CREATE TABLE citizens (
            citizen_row BIGINT PRIMARY KEY CHECK (citizen_row >= 0),
            citizen_id TEXT NOT NULL UNIQUE,
            birth_day INTEGER NOT NULL,
            consent SMALLINT NOT NULL DEFAULT 0
        )""",
        """CREATE TABLE consent_history (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            citizen_row BIGINT NOT NULL REFERENCES citizens (citizen_row),
            granted SMALLINT NOT NULL,
            at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX consent_history_by_citizen ON consent_history (citizen_row)",
        """CREATE TABLE cards (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            token BYTEA NOT NULL UNIQUE CHECK (length(token) = 16),
            citizen_row BIGINT NOT NULL REFERENCES citizens (citizen_row)
        )""",
        "CREATE INDEX cards_by_citizen ON cards (citizen_row)",
        # No CHECK on status, as in SQLite: the code checks.
        """CREATE TABLE records (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            record_id TEXT NOT NULL UNIQUE,
            citizen_row BIGINT NOT NULL REFERENCES citizens (citizen_row),
            variable TEXT NOT NULL,
            day INTEGER NOT NULL,
            value DOUBLE PRECISION NOT NULL,
            source TEXT NOT NULL,
            scenario TEXT,
            status TEXT NOT NULL DEFAULT 'active'
        )""",
        "CREATE INDEX records_by_citizen ON records (citizen_row, status)",
        # The high-water mark: one row, bumped by every transaction that changes data.
        "CREATE TABLE changes (id INTEGER PRIMARY KEY CHECK (id = 1), n BIGINT NOT NULL)",
        "INSERT INTO changes (id, n) VALUES (1, 0)",
    ],
    [
        # Version 2, as in SQLite: a record is identified by (source, record_id) and every
        # version of it is kept; the change log replaces the one-row counter.
        "ALTER TABLE changes RENAME TO changes_v1",
        """CREATE TABLE changes (
            seq BIGINT PRIMARY KEY CHECK (seq > 0),
            at DOUBLE PRECISION NOT NULL,
            kind TEXT NOT NULL,
            citizen_row BIGINT
        )""",
        # The mark must not go backwards: the old counter becomes the first entry (time
        # unknown: 0), and everything already stored counts as written at that position.
        "INSERT INTO changes (seq, at, kind) SELECT n, 0, 'before_log' FROM changes_v1 WHERE n > 0",
        "ALTER TABLE consent_history ADD COLUMN position BIGINT",
        "UPDATE consent_history SET position = (SELECT n FROM changes_v1)",
        "ALTER TABLE consent_history ALTER COLUMN position SET NOT NULL",
        # A constant default: no rewrite of the table.
        "ALTER TABLE records ADD COLUMN version INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE records DROP CONSTRAINT records_record_id_key",
        "ALTER TABLE records ADD CONSTRAINT records_source_record_id_key UNIQUE (source, record_id)",
        # Append-only: one row per version of a record (records holds the latest one's number,
        # day, value and status). No foreign key (as in SQLite): its per-row check costs seeding several seconds.
        """CREATE TABLE record_versions (
            record BIGINT NOT NULL,
            version INTEGER NOT NULL CHECK (version >= 1),
            day INTEGER NOT NULL,
            value DOUBLE PRECISION NOT NULL,
            status TEXT NOT NULL,
            received_at DOUBLE PRECISION NOT NULL,
            sent_by TEXT NOT NULL,
            position BIGINT NOT NULL,
            PRIMARY KEY (record, version)
        )""",
        # A stored record becomes version 1 of itself, as it is now (a withdrawal overwrote
        # what it was before): received at an unknown time (0), sent by its source.
        """INSERT INTO record_versions (record, version, day, value, status, received_at, sent_by, position)
           SELECT id, 1, day, value, status, 0, source, (SELECT n FROM changes_v1) FROM records ORDER BY id""",
        "DROP TABLE changes_v1",
    ],
    [
        # The citizens' rights, as in SQLite (server/store.py): disputes and credit-repair
        # applications. No foreign key to records: _PostgresLoad drops and restores the records
        # table's keys, which a reference from here would pin.
        """CREATE TABLE disputes (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            dispute_id TEXT NOT NULL UNIQUE,
            record BIGINT NOT NULL,
            citizen_row BIGINT NOT NULL,
            source TEXT NOT NULL,
            reason TEXT NOT NULL,
            state TEXT NOT NULL,
            filed_by TEXT NOT NULL,
            filed_at DOUBLE PRECISION NOT NULL,
            due_at DOUBLE PRECISION NOT NULL,
            suspended_at DOUBLE PRECISION,
            answered_by TEXT,
            answered_at DOUBLE PRECISION,
            note TEXT,
            position BIGINT NOT NULL
        )""",
        "CREATE UNIQUE INDEX disputes_one_open ON disputes (record) WHERE state IN ('open', 'suspended')",
        "CREATE INDEX disputes_by_citizen ON disputes (citizen_row)",
        "CREATE INDEX disputes_by_source ON disputes (source, state)",
        "CREATE INDEX disputes_due ON disputes (state, due_at)",
        """CREATE TABLE repairs (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            repair_id TEXT NOT NULL UNIQUE,
            record BIGINT NOT NULL,
            citizen_row BIGINT NOT NULL,
            source TEXT NOT NULL,
            tier TEXT NOT NULL,
            statement TEXT NOT NULL,
            state TEXT NOT NULL,
            filed_by TEXT NOT NULL,
            filed_at DOUBLE PRECISION NOT NULL,
            due_at DOUBLE PRECISION NOT NULL,
            escalated_at DOUBLE PRECISION,
            decided_by TEXT,
            decided_at DOUBLE PRECISION,
            decision_reason TEXT,
            position BIGINT NOT NULL
        )""",
        "CREATE UNIQUE INDEX repairs_one_pending ON repairs (record) WHERE state = 'pending'",
        "CREATE INDEX repairs_by_citizen ON repairs (citizen_row)",
        "CREATE INDEX repairs_by_source ON repairs (source, state)",
        "CREATE INDEX repairs_due ON repairs (state, due_at)",
    ],
    [
        # Consent by purpose, as in SQLite (server/store.py, server/consent.py). Adding a
        # column with a constant default rewrites nothing.
        "ALTER TABLE consent_history ADD COLUMN purpose TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE consent_history ADD COLUMN expires_day INTEGER",
        """CREATE TABLE purpose_consents (
            citizen_row BIGINT NOT NULL,
            purpose TEXT NOT NULL,
            granted SMALLINT NOT NULL,
            expires_day INTEGER,
            position BIGINT NOT NULL,
            PRIMARY KEY (citizen_row, purpose)
        )""",
        "CREATE INDEX purpose_consents_expiring ON purpose_consents (expires_day) WHERE expires_day IS NOT NULL",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)

#: The channel every write's NOTIFY goes to (payload: the write's seq), which replicas'
#: followers LISTEN on (server/replica.py).
CHANGES_CHANNEL = "qj_changes"

#: The pg_advisory_xact_lock key that serialises writers ("qjstore" in ASCII).
_WRITERS_LOCK = 0x716A73746F7265

#: How long a writer waits for another (SQLite's busy_timeout is 10 s too). An ordinary
#: write's statement_timeout (the store's bound) ends the wait sooner; this bounds bulk writes.
_LOCK_TIMEOUT = "10s"

#: Seconds within which a store call answers or fails with StoreUnavailable (a gate write is
#: a few small statements: milliseconds when all is well). ``QJ_STORE_TIMEOUT`` overrides it.
DEFAULT_TIMEOUT = 3.0

#: How much of the bound the server's own timeouts leave to the client's watchdog, so a live
#: server's clean error (the connection survives) comes before the watchdog's cut.
_SERVER_MARGIN = 0.5

#: What the server enforces of the bound (each set to the bound less the margin).
_SERVER_TIMEOUTS = ("statement_timeout", "idle_in_transaction_session_timeout")

#: TCP keepalives: a peer gone silent (a partition, a dead host) is found on an idle
#: connection in about idle + interval * count seconds.
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3}


def _default_timeout() -> float:
    given = os.environ.get("QJ_STORE_TIMEOUT")
    if not given:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(given)
    except ValueError:
        raise ValueError(f"QJ_STORE_TIMEOUT={given!r} is not a number of seconds") from None
    if not 0.5 <= seconds <= 600:
        raise ValueError(f"QJ_STORE_TIMEOUT={given!r} must be between 0.5 and 600 seconds")
    return seconds

_NEXT_ROW = "(SELECT COALESCE(MAX(citizen_row), -1) + 1 FROM citizens)"


#: Errors that say "the server or the connection is not available right now" (connection
#: lost, server shutting down, lock timeout, serialization failure): a StoreError, which
#: callers see as UNAVAILABLE and may retry.
_UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError)

#: Errors that say "this write can never succeed" (a broken constraint, a value the column
#: cannot hold): StoreRejected. Anything else from PostgreSQL is a bug.
_REJECTED = (psycopg.IntegrityError, psycopg.DataError)


def _describe(dsn: str) -> str:
    """The DSN for messages: ``postgresql://user@host:port/dbname``, never the password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "postgresql://?"
    user = params.get("user") or ""
    host = params.get("host") or params.get("hostaddr") or ""
    port = params.get("port")
    where = f"{host}:{port}" if port else host
    return f"postgresql://{user + '@' if user else ''}{where}/{params.get('dbname') or ''}"


class PostgresStore(SQLStore):
    """The store in a PostgreSQL database: one connection per object, shared by threads.

    Several processes (and machines) may use the same database, each with its own store;
    open one per process after fork, as with SQLite. ``on_write(operation, seconds)`` is
    called after each committed write. ``timeout``: the bound of a call, in seconds (see
    the module's docstring; default :data:`DEFAULT_TIMEOUT` or ``QJ_STORE_TIMEOUT``).
    """

    PARAM = "%s"

    #: As of a position, each record's version through LATERAL: one backward index probe
    #: per record, a plan that needs no statistics (a table just seeded has none, and the
    #: join SQLite runs can then be planned as a scan and sort of every version).
    _ACTIVE_AS_OF = """
        SELECT r.record_id, r.citizen_row, r.variable, v.day, v.value, r.scenario
        FROM records r CROSS JOIN LATERAL (
            SELECT w.day, w.value, w.status FROM record_versions w
            WHERE w.record = r.id AND w.position <= ? ORDER BY w.version DESC LIMIT 1) v
        WHERE v.status = 'active'"""

    def __init__(self, dsn: str, on_write: Callable[[str, float], None] | None = None,
                 timeout: float | None = None):
        self.timeout = float(_default_timeout() if timeout is None else timeout)
        if not 0.5 <= self.timeout <= 600 or math.isnan(self.timeout):
            raise ValueError(f"timeout must be between 0.5 and 600 seconds, not {timeout!r}")
        if dsn.startswith("postgresql+"):  # postgresql+psycopg://… (SQLAlchemy's spelling)
            dsn = "postgresql://" + dsn.split("://", 1)[1]
        try:
            self._params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError:
            # Not libpq's message: it may quote the string, password and all.
            raise ValueError("not a PostgreSQL connection string (a postgresql:// URI or"
                             " key=value pairs)") from None
        self._dsn = dsn
        self.name = _describe(dsn)
        # Server timeouts the DSN sets itself (options=-c name=…): left as given.
        options = self._params.get("options", "").replace(" ", "")
        self._given = {name for name in _SERVER_TIMEOUTS if f"{name}=" in options}
        self._on_write = on_write
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False
        self._db: psycopg.Connection | None = None
        # The watchdog (_arm, _watch): the deadline of the call in progress, if bounded.
        self._alarm = threading.Condition(threading.Lock())
        self._deadline: float | None = None
        self._cut = False  # the watchdog cut the call in progress
        self._watchdog: threading.Thread | None = None
        self._unbounded = threading.local()
        try:
            with self._lock:
                self._db = self._connect()
            self.migrate()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<PostgresStore {self.name}>"

    # Plumbing ---------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection:
        # A short connect timeout: while the server is away, writes fail fast (server/store_watch.py).
        # libpq takes whole seconds, at least 2.
        defaults = {"connect_timeout": max(2, math.ceil(self.timeout)), "application_name": "qianjiang-store",
                    "tcp_user_timeout": int(self.timeout * 1000), **_KEEPALIVES}
        extra = {k: v for k, v in defaults.items() if k not in self._params}
        try:
            # autocommit: no implicit transactions; every write opens its own (below).
            db = psycopg.connect(self._dsn, autocommit=True, **extra)
        except psycopg.Error as e:
            raise StoreUnavailable(f"cannot connect to the store {self.name}: {e}") from e
        try:
            # One round trip. Settings the DSN gave (options=-c …) are left alone.
            db.execute("; ".join([f"SET lock_timeout = '{_LOCK_TIMEOUT}'"] + [
                f"SET {name} = {self._server_ms()}" for name in _SERVER_TIMEOUTS if name not in self._given]))
            if db.execute("SHOW synchronous_commit").fetchone()[0] == "off":
                # Keep "local", "remote_write", "remote_apply" and "on"; never acknowledge a
                # write that is not yet on disk.
                db.execute("SET synchronous_commit = on")
        except BaseException as e:
            db.close()
            if isinstance(e, _UNAVAILABLE):
                raise StoreUnavailable(f"cannot connect to the store {self.name}: {e}") from e
            raise
        return db

    def _server_ms(self) -> int:
        """The server-side timeouts: the bound less the watchdog's margin."""
        return max(100, int((self.timeout - min(_SERVER_MARGIN, self.timeout / 4)) * 1000))

    # The bound of a call ----------------------------------------------------------------

    def _acquire(self) -> None:
        """Take the connection's lock, waiting at most the bound for another thread's call
        (itself bounded) unless this call is a bulk one."""
        # Before any lock: one inherited through fork may have been held by a thread of the
        # parent (the watchdog) at that instant, and would never be released in the child.
        self._check_process()
        if getattr(self._unbounded, "on", False):
            self._lock.acquire()
        elif not self._lock.acquire(blocking=False):
            if not self._lock.acquire(timeout=self.timeout):
                raise StoreUnavailable(f"store {self.name}: no answer within {self.timeout:g} s"
                                       " (the connection is busy with a call that has not answered)")
            if self._cut and (self._db is None or self._db.broken):
                # Queued behind a call the watchdog cut: fail with it rather than spend a
                # reconnect (libpq's connect_timeout: 2 s at least) on a server that just hung.
                self._lock.release()
                raise StoreUnavailable(f"store {self.name}: no answer within {self.timeout:g} s"
                                       " (the call before this one was cut)")

    @contextmanager
    def _bounded(self) -> Iterator[None]:
        """Arm the watchdog for one call (caller holds the connection's lock): past the
        bound, the connection's socket is shut down, so the call fails at once."""
        if getattr(self._unbounded, "on", False):
            yield
            return
        with self._alarm:
            self._cut = False
            self._deadline = time.monotonic() + self.timeout
            if self._watchdog is None or not self._watchdog.is_alive():
                self._watchdog = threading.Thread(target=self._watch, name="qj-store-watchdog", daemon=True)
                self._watchdog.start()
            self._alarm.notify()
        try:
            yield
        finally:
            with self._alarm:  # after this, no cut can reach the next call
                self._deadline = None

    def _watch(self) -> None:
        with self._alarm:
            while not self._closed and os.getpid() == self._pid:
                deadline = self._deadline
                if deadline is None:
                    self._alarm.wait()
                    continue
                left = deadline - time.monotonic()
                if left > 0:
                    self._alarm.wait(left)
                    continue
                self._deadline = None
                self._cut = True
                db = self._db
                try:
                    if db is not None and not db.closed:
                        # shutdown() acts on the socket itself, which libpq shares with the dup.
                        with socket.socket(fileno=os.dup(db.pgconn.socket)) as sock:
                            sock.shutdown(socket.SHUT_RDWR)
                except (OSError, psycopg.Error) as e:  # already gone: the call fails by itself
                    log.debug("store %s: cutting a call that did not answer: %s", self.name, e)
                log.warning("store %s: no answer within %g s; connection dropped", self.name, self.timeout)

    @contextmanager
    def unbounded(self) -> Iterator[None]:
        """Calls of this thread inside the block have no bound (bulk work: seeding, the
        start-up load). Reads run with the server's statement_timeout lifted."""
        outer = getattr(self._unbounded, "on", False)
        self._unbounded.on = True
        try:
            yield
        finally:
            self._unbounded.on = outer

    # Connections ------------------------------------------------------------------------

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise StoreError(f"store {self.name} was opened in process {self._pid}; "
                             "open a new one after fork")

    def _connection(self) -> psycopg.Connection:
        if self._closed:
            raise StoreError(f"store {self.name} is closed")
        self._check_process()
        if self._db is None or self._db.closed or self._db.broken:
            if self._db is not None:
                self._db.close()
                log.warning("store %s: reconnecting after a lost connection", self.name)
            self._db = None
            self._db = self._connect()
        return self._db

    @staticmethod
    def _rollback(db: psycopg.Connection) -> None:
        if db.closed or db.broken or db.info.transaction_status == TransactionStatus.IDLE:
            return
        try:
            db.execute("ROLLBACK")
        except psycopg.Error:
            pass  # the connection is gone: the server rolls back, the next call reconnects

    def _unavailable(self, e: Exception) -> StoreError:
        if self._cut:
            # Not libpq's "server closed the connection unexpectedly": the watchdog did.
            return StoreUnavailable(f"store {self.name}: no answer within {self.timeout:g} s; the connection"
                                    " was dropped (a write may or may not have been committed)")
        return StoreUnavailable(f"store {self.name}: {e}".rstrip())

    @contextmanager
    def _write(self, operation: str, bulk: bool = False) -> Iterator[psycopg.Connection]:
        """One write transaction, holding the writers' lock: committed when the block ends,
        rolled back if it raises. ``bulk``: not bounded (no watchdog, no server timeouts)."""
        start = time.perf_counter()
        with self.unbounded() if bulk else nullcontext():
            self._acquire()
            try:
                with self._bounded():
                    db = self._connection()
                    committed = False
                    self._begin(operation)
                    try:
                        # One round trip (no parameters: the simple protocol takes every statement).
                        lift = (" SET LOCAL statement_timeout = 0; SET LOCAL idle_in_transaction_session_timeout = 0;"
                                if bulk else "")
                        db.execute(f"BEGIN ISOLATION LEVEL READ COMMITTED;{lift}"
                                   f" SELECT pg_advisory_xact_lock({_WRITERS_LOCK})")
                        yield db
                        db.execute("COMMIT")
                        committed = True
                    except BaseException as e:
                        self._rollback(db)  # also when the lock timed out: BEGIN had succeeded
                        if isinstance(e, _UNAVAILABLE):
                            raise self._unavailable(e) from e
                        if isinstance(e, _REJECTED):
                            # The primary message only: the DETAIL line may quote the value.
                            why = getattr(e.diag, "message_primary", None) or str(e).splitlines()[0]
                            raise StoreRejected(f"{operation}: the store refused the write ({why})") from None
                        raise
                    finally:
                        self._end(committed)
            finally:
                self._lock.release()
        if self._on_write is not None:
            try:
                self._on_write(operation, time.perf_counter() - start)
            except Exception:
                # The write is committed: failing the call now would make the client retry
                # something that succeeded. A broken metrics hook is logged, not fatal.
                log.exception("on_write hook failed for %s", operation)

    @contextmanager
    def _read(self) -> Iterator[psycopg.Connection]:
        """A read: every read method is one statement, which sees one committed state."""
        self._acquire()
        try:
            with self._bounded():
                db = self._connection()
                try:
                    if getattr(self._unbounded, "on", False):
                        db.execute("SET statement_timeout = 0")
                        try:
                            yield db
                        finally:
                            if not db.broken:  # back to the session's own (RESET: the DSN's)
                                db.execute("RESET statement_timeout" if "statement_timeout" in self._given
                                           else f"SET statement_timeout = {self._server_ms()}")
                    else:
                        yield db
                except _UNAVAILABLE as e:
                    raise self._unavailable(e) from e
        finally:
            self._lock.release()

    def _fetch_all(self, query: str, params: tuple) -> list[tuple]:
        # Binary results: no number parsing for the millions of rows of a start-up load.
        with self._read() as db, db.cursor(binary=True) as cur:
            return cur.execute(query, params).fetchall()

    @staticmethod
    def _check_rows(db: psycopg.Connection, rows: np.ndarray) -> None:
        # Rows are dense, so a range check proves every row exists (MAX uses the index).
        n = db.execute(f"SELECT {_NEXT_ROW}").fetchone()[0]
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise NotFound(f"citizen rows must be in 0..{n - 1}; got {rows.min()}..{rows.max()}")

    @staticmethod
    def _copy(db: psycopg.Connection, table: str, columns: Sequence[str], types: Sequence[str],
              rows: Iterator[tuple]) -> None:
        """Binary COPY of ``rows`` into ``table``; the connection's transaction stays open."""
        sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
        with db.cursor() as cur, cur.copy(sql) as copy:
            copy.set_types(list(types))
            for row in rows:
                copy.write_row(row)

    # The change log's notification (followers: server/replica.py) ---------------------

    def _change(self, db, citizen_row: int | None = None):
        """As :meth:`SQLStore._change`, and the write's first change also queues
        ``NOTIFY qj_changes, '<seq>'`` in the same statement (no extra round trip): PostgreSQL
        delivers it at the commit, and only then, to every session that LISTENs (each
        replica's follower), in commit order; a rolled-back write notifies nobody. The
        payload is the new seq only: a follower reads what changed from the table."""
        tx = self._tx
        if tx is None or tx.position is not None:
            return super()._change(db, citizen_row)
        tx.citizen_row, tx.at = citizen_row, time.time()
        tx.position = db.execute(
            "WITH c AS (INSERT INTO changes (seq, at, kind, citizen_row)"
            " SELECT COALESCE(MAX(seq), 0) + 1, %s, %s, %s FROM changes RETURNING seq)"
            " SELECT seq, pg_notify(%s, seq::text) FROM c",
            (tx.at, tx.operation, citizen_row, CHANGES_CHANNEL)).fetchone()[0]
        return tx

    def changes_between(self, after: int, upto: int | None = None) -> list[tuple[int, str, int | None, float]]:
        """The change log after ``after`` (through ``upto``): ``(seq, kind, citizen_row, at)``
        in seq order, one bounded statement (a follower's catch-up)."""
        with self._read() as db:
            if upto is None:
                rows = db.execute("SELECT seq, kind, citizen_row, at FROM changes WHERE seq > %s ORDER BY seq",
                                  (int(after),)).fetchall()
            else:
                rows = db.execute("SELECT seq, kind, citizen_row, at FROM changes WHERE seq > %s AND seq <= %s"
                                  " ORDER BY seq", (int(after), int(upto))).fetchall()
        return [(int(s), k, None if r is None else int(r), float(a)) for s, k, r, a in rows]

    def rows_of_new_records(self, first: int, last: int) -> list[int]:
        """The citizens of the records first stored by the writes at positions ``first`` ..
        ``last`` (an ``add_records`` of several citizens logs no single row). Records are
        inserted under the writers' lock, so their ids follow commit order, as do their
        version 1's positions: the ids between the newest version 1 before ``first`` and the
        newest through ``last`` are exactly those records (two backward probes of
        record_versions' key, then a range of records' key; a few more rows than needed at
        worst, which a follower re-derives harmlessly)."""
        with self._read() as db:
            rows = db.execute(
                "SELECT DISTINCT citizen_row FROM records WHERE id >"
                " (SELECT COALESCE(MAX(record), 0) FROM record_versions WHERE version = 1 AND position < %s)"
                " AND id <= (SELECT COALESCE(MAX(record), 0) FROM record_versions WHERE version = 1"
                " AND position <= %s)", (int(first), int(last))).fetchall()
        return [int(r[0]) for r in rows]

    # Schema -----------------------------------------------------------------------------

    def migrate(self) -> None:
        # Two processes starting on an empty database: the second waits for the writers' lock,
        # then finds the schema current.
        with self._write("migrate", bulk=True) as db:
            if db.execute("SELECT to_regclass('schema_version')").fetchone()[0] is None:
                db.execute("CREATE TABLE schema_version ("
                           "version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
            self._migrate_from(db, MIGRATIONS, self.name)

    # Citizens and consent ---------------------------------------------------------------

    def upsert_citizen(self, citizen_id: str, birth_day: int) -> tuple[int, bool]:
        with self._write("upsert_citizen") as db:
            if (row := self._known_citizen(db, citizen_id, birth_day)) is not None:
                return row, False
            db.execute("LOCK TABLE citizens IN SHARE ROW EXCLUSIVE MODE")
            row = db.execute(
                f"INSERT INTO citizens (citizen_row, citizen_id, birth_day) VALUES ({_NEXT_ROW}, %s, %s)"
                " RETURNING citizen_row", (citizen_id, int(birth_day))).fetchone()[0]
            self._change(db, row)
            return row, True

    def upsert_citizens_bulk(self, ids: Sequence[str], birth_days: np.ndarray) -> None:
        days = np.asarray(birth_days, np.int64)
        if len(ids) != len(days):
            raise ValueError(f"{len(ids)} ids but {len(days)} birth days")
        with self._write("upsert_citizens_bulk", bulk=True) as db:
            db.execute("CREATE TEMPORARY TABLE qj_citizens_in (ord BIGINT NOT NULL,"
                       " citizen_id TEXT NOT NULL, birth_day INTEGER NOT NULL) ON COMMIT DROP")
            self._copy(db, "qj_citizens_in", ("ord", "citizen_id", "birth_day"), ("int8", "text", "int4"),
                       zip(range(len(ids)), ids, days.tolist()))
            db.execute("ANALYZE qj_citizens_in")
            db.execute("LOCK TABLE citizens IN SHARE ROW EXCLUSIVE MODE")
            # As the same upserts one by one would leave it: a new id takes the next row at its
            # first occurrence in the list; the birth day is that of its last occurrence.
            db.execute("""
                CREATE TEMPORARY TABLE qj_citizens_last ON COMMIT DROP AS
                SELECT DISTINCT ON (citizen_id) citizen_id, birth_day, first_ord
                FROM (SELECT citizen_id, birth_day, ord, MIN(ord) OVER (PARTITION BY citizen_id) AS first_ord
                      FROM qj_citizens_in) s
                ORDER BY citizen_id, ord DESC""")
            db.execute("""
                UPDATE citizens c SET birth_day = l.birth_day FROM qj_citizens_last l
                WHERE c.citizen_id = l.citizen_id AND c.birth_day <> l.birth_day""")
            db.execute(f"""
                INSERT INTO citizens (citizen_row, citizen_id, birth_day)
                SELECT {_NEXT_ROW} + ROW_NUMBER() OVER (ORDER BY l.first_ord) - 1, l.citizen_id, l.birth_day
                FROM qj_citizens_last l
                WHERE NOT EXISTS (SELECT 1 FROM citizens c WHERE c.citizen_id = l.citizen_id)""")
            self._change(db)

    def set_consents_bulk(self, rows: np.ndarray, granted: bool) -> None:
        rows = np.asarray(rows, np.int64)
        with self._write("set_consents_bulk", bulk=True) as db:
            self._check_rows(db, rows)
            tx = self._change(db)
            listed = rows.tolist()
            db.execute("UPDATE citizens SET consent = %s WHERE citizen_row = ANY(%s::bigint[])",
                       (int(granted), listed))
            db.execute("DELETE FROM purpose_consents WHERE citizen_row = ANY(%s::bigint[])", (listed,))
            # One event per listed row, in list order (repeats included, as one by one).
            db.execute("INSERT INTO consent_history (citizen_row, granted, at, position)"
                       " SELECT u.r, %s, %s, %s FROM unnest(%s::bigint[]) WITH ORDINALITY AS u (r, i)"
                       " ORDER BY u.i", (int(granted), tx.at, tx.position, listed))

    def consent_history(self, citizen_id: str) -> list[ConsentEvent]:
        with self._read() as db:
            # One statement: the citizen (NotFound) and its events, in one snapshot.
            events = db.execute(
                "SELECT h.granted, h.at, h.position FROM citizens c LEFT JOIN consent_history h USING (citizen_row)"
                " WHERE c.citizen_id = %s ORDER BY h.id", (citizen_id,)).fetchall()
        if not events:
            raise NotFound(f"citizen {citizen_id!r} not found")
        return [ConsentEvent(bool(g), at, position) for g, at, position in events if g is not None]

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
                self._copy(db, "cards", ("token", "citizen_row"), ("bytea", "int8"),
                           zip((t.tobytes() for t in tokens), rows.tolist()))
            except pg_errors.UniqueViolation as e:  # the batch is rolled back
                if e.diag.constraint_name != "cards_token_key":
                    raise  # another constraint: StoreRejected
                # Not str(e): its DETAIL line quotes the token.
                raise Conflict("a card token in the batch is already registered"
                               f" ({e.diag.message_primary})") from None

    # Records ----------------------------------------------------------------------------

    def _citizen_rows(self, db, citizen_ids: Sequence[str]) -> dict[str, int]:
        ids = list(dict.fromkeys(citizen_ids))
        rows = dict(db.execute("SELECT citizen_id, citizen_row FROM citizens"
                               " WHERE citizen_id = ANY(%s::text[])", (ids,)).fetchall()) if ids else {}
        for citizen_id in ids:  # the first unknown one in batch order, as one by one
            if citizen_id not in rows:
                raise NotFound(f"citizen {citizen_id!r} not found")
        return rows

    def _first_contents(self, db, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], tuple]:
        if not keys:
            return {}
        sources, record_ids = zip(*keys)
        found = db.execute(
            f"SELECT r.source, r.record_id, {_FIRST_CONTENT}"
            " FROM unnest(%s::text[], %s::text[]) AS k (source, record_id)"
            " JOIN records r ON r.source = k.source AND r.record_id = k.record_id"
            " JOIN citizens c ON c.citizen_row = r.citizen_row",
            (list(sources), list(record_ids))).fetchall()
        return {(source, record_id): tuple(content) for source, record_id, *content in found}

    def _insert_records(self, db, rows: list[tuple]) -> None:
        # One statement per record, in order, in one round trip (executemany pipelines).
        with db.cursor() as cur:
            cur.executemany(
                "INSERT INTO records (record_id, citizen_row, variable, day, value, source, scenario)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)", rows)

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
                self._copy(
                    db, "records", ("record_id", "citizen_row", "variable", "day", "value", "source"),
                    ("text", "int8", "text", "int4", "float8", "text"),
                    zip(record_ids, rows.tolist(), variable, day.tolist(), value.tolist(), repeat(source)))
            except pg_errors.UniqueViolation as e:  # the batch is rolled back
                if e.diag.constraint_name != "records_source_record_id_key":
                    raise  # another constraint: StoreRejected
                raise Conflict(f"a record_id in the batch is already stored for source {source!r}"
                               f" ({e.diag.message_primary})") from None
            db.execute(self._q(_FIRST_VERSIONS), (tx.at, sent_by, tx.position, after))

    @contextmanager
    def bulk_load(self) -> Iterator[BulkLoad]:
        # One transaction (not bounded: the writers' lock is held throughout), so a crash or
        # an exception rolls everything back, the dropped constraints and indexes included:
        # an interrupted seed leaves the store empty, never half seeded.
        try:
            with self._write("bulk_load", bulk=True) as db:
                load = _PostgresLoad(self, db)
                yield load
                if not (load.citizens or load.cards or load.records):
                    raise _NothingLoaded  # no change: the log's entry goes with the rollback
                load._finish()
        except _NothingLoaded:
            pass

    # Bookkeeping ------------------------------------------------------------------------

    def citizens(self):
        with self.unbounded():  # the whole table: a start-up load's read
            return super().citizens()

    def cards(self):
        with self.unbounded():
            return super().cards()

    def active_records(self, citizen_row: int | None = None, as_of: int | None = None):
        if citizen_row is not None:  # one citizen's: small, bounded
            return super().active_records(citizen_row, as_of)
        with self.unbounded():
            return super().active_records(citizen_row, as_of)

    def bulk_read(self) -> PostgresBulkRead:
        self._check_process()
        if self._closed:
            raise StoreError(f"store {self.name} is closed")
        return PostgresBulkRead(self)

    def counts(self) -> dict[str, int]:
        queries = {
            "citizens": "SELECT COUNT(*) FROM citizens",
            "cards": "SELECT COUNT(*) FROM cards",
            "records": "SELECT COUNT(*) FROM records",
            "active_records": "SELECT COUNT(*) FROM records WHERE status = 'active'",
            "consents_granted": "SELECT COUNT(*) FROM citizens WHERE consent = 1",
        }
        # One statement, so one snapshot and one round trip.
        sql = "SELECT " + ", ".join(f"({q})" for q in queries.values())
        with self.unbounded(), self._read() as db:  # counts whole tables
            values = db.execute(sql).fetchone()
        return dict(zip(queries, values))

    def close(self) -> None:
        if os.getpid() != self._pid:
            # Inherited through fork: the parent's locks may be held forever here, and its
            # connection must not be touched (closing it would end the parent's session).
            self._closed, self._db = True, None
            return
        with self._alarm:
            self._closed = True  # the watchdog thread ends
            self._alarm.notify()
        with self._lock:
            self._closed = True
            if self._db is not None:
                # A store inherited through fork must not touch the parent's connection:
                # closing would end the parent's session. (psycopg does not close it when the
                # object is collected in another process either.)
                if os.getpid() == self._pid:
                    self._db.close()
                self._db = None


# --------------------------------------------------------------------------------------------
# Bulk loads (PostgresStore.bulk_load)

#: The binary COPY format's header (signature, flags, no extension) and trailer.
_COPY_HEADER = b"PGCOPY\n\xff\r\n\0" + bytes(8)
_COPY_TRAILER = b"\xff\xff"

#: FREEZE: the rows are written frozen (the tables were truncated in the load's
#: transaction), so the first reads and the next vacuum do not rewrite every page of them.
_LOAD_COPY = {
    "citizens": "COPY citizens (citizen_row, citizen_id, birth_day, consent) FROM STDIN (FORMAT BINARY, FREEZE)",
    "consent_history": "COPY consent_history (citizen_row, granted, at, position) FROM STDIN (FORMAT BINARY, FREEZE)",
    "cards": "COPY cards (token, citizen_row) FROM STDIN (FORMAT BINARY, FREEZE)",
    # Explicit ids (COPY writes identity columns as given), so each record's version 1 is
    # copied too instead of read back.
    "records": "COPY records (id, record_id, citizen_row, variable, day, value, source)"
               " FROM STDIN (FORMAT BINARY, FREEZE)",
    "record_versions": "COPY record_versions (record, version, day, value, status, received_at, sent_by, position)"
                       " FROM STDIN (FORMAT BINARY, FREEZE)",
}


def _copy_rows(n: int, fields: Sequence[tuple[str, object]]) -> bytes:
    """``n`` tuples of binary COPY data (no header), built by numpy: each field is a numpy
    format (``">i8"``, ``">i4"``, ``">i2"``, ``">f8"``) with an array or a scalar, or
    ``"raw"`` with a uint8 matrix (n, width) or one bytes value for every row."""
    layout: list[tuple] = [("count", ">i2")]
    widths = []
    for j, (fmt, data) in enumerate(fields):
        width = (data.shape[1] if isinstance(data, np.ndarray) else len(data)) if fmt == "raw" else np.dtype(fmt).itemsize
        widths.append(width)
        layout.append((f"len{j}", ">i4"))
        if width:
            layout.append((f"val{j}", (np.uint8, (width,)) if fmt == "raw" else fmt))
    out = np.empty(n, np.dtype(layout))
    out["count"] = len(fields)
    for j, ((fmt, data), width) in enumerate(zip(fields, widths)):
        out[f"len{j}"] = width
        if width:
            out[f"val{j}"] = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
    return out.tobytes()


def _cuts(*keys: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of rows equal in every key."""
    n = len(keys[0])
    if n == 0:
        return []
    change = np.zeros(n - 1, bool)
    for key in keys:
        change |= key[1:] != key[:-1]
    cuts = [0, *(np.flatnonzero(change) + 1).tolist(), n]
    return list(zip(cuts[:-1], cuts[1:]))


class _PostgresLoad(BulkLoad):
    """:meth:`PostgresStore.bulk_load`'s loader, inside the load's transaction: the tables
    locked and truncated (they were empty), their keys, unique constraints, foreign keys and
    indexes dropped, and all put back, as they were, by :meth:`_finish` (one sort per index,
    one join per foreign key, instead of a B-tree insert and a lookup per row)."""

    def __init__(self, store: PostgresStore, db: psycopg.Connection):
        super().__init__()
        self._db = db
        tables = list(_LOADED_TABLES)
        db.execute(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE")
        if db.execute(" UNION ALL ".join(f"(SELECT 1 FROM {t} LIMIT 1)" for t in tables)).fetchone() is not None:
            raise Conflict(f"bulk load: the store {store.name} is not empty (a bulk load seeds an empty store)")
        tx = store._change(db)
        self.position, self.at = tx.position, tx.at
        self._constraints = db.execute(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), contype FROM pg_constraint"
            " WHERE conrelid = ANY(%s::regclass[]) AND contype IN ('p', 'u', 'f')"
            " ORDER BY contype = 'f', conrelid::regclass::text, conname", (tables,)).fetchall()
        self._indexes = db.execute(
            "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index i"
            " WHERE indrelid = ANY(%s::regclass[]) AND NOT EXISTS (SELECT 1 FROM pg_constraint c"
            " WHERE c.conindid = i.indexrelid AND c.contype IN ('p', 'u', 'x')) ORDER BY 1", (tables,)).fetchall()
        for table, name, _, _ in sorted(self._constraints, key=lambda c: c[3] != "f"):  # foreign keys first
            db.execute(pg_sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                pg_sql.SQL(table), pg_sql.Identifier(name)))
        for name, _ in self._indexes:
            db.execute(pg_sql.SQL("DROP INDEX {}").format(pg_sql.SQL(name)))
        db.execute(f"TRUNCATE {', '.join(tables)}")
        db.execute("SET LOCAL maintenance_work_mem = '512MB'")

    def _encode(self, chunk: LoadChunk) -> list[tuple[str, list[bytes]]]:
        c = self._check(chunk)
        copies: list[tuple[str, list[bytes]]] = []
        if c.ids:
            rows = np.arange(c.first_row, c.first_row + len(c.ids), dtype=np.int64)
            encoded = [i.encode() for i in c.ids]
            lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
            copies.append(("citizens", [
                _copy_rows(hi - lo, [(">i8", rows[lo:hi]),
                                     ("raw", np.frombuffer(b"".join(encoded[lo:hi]), np.uint8).reshape(hi - lo, -1)
                                      if lengths[lo] else b""),
                                     (">i4", c.birth_days[lo:hi]), (">i2", c.consent[lo:hi])])
                for lo, hi in _cuts(lengths)]))
            granted = rows[c.consent]
            if len(granted):
                copies.append(("consent_history", [_copy_rows(len(granted), [
                    (">i8", granted), (">i2", 1), (">f8", self.at), (">i8", self.position)])]))
        if len(c.card_rows):
            copies.append(("cards", [_copy_rows(len(c.card_rows), [("raw", c.tokens), (">i8", c.card_rows)])]))
        if len(c.rows):
            prefix = c.id_prefix.encode()
            numbers = c.id_first + np.arange(len(c.rows), dtype=np.int64)
            digits = np.searchsorted(10 ** np.arange(1, 19, dtype=np.int64), numbers, side="right") + 1
            records, versions = [], []
            for lo, hi in c.runs(digits):
                ids = np.arange(c.first_record + lo, c.first_record + hi, dtype=np.int64)
                record_id = np.empty((hi - lo, len(prefix) + int(digits[lo])), np.uint8)
                record_id[:, :len(prefix)] = np.frombuffer(prefix, np.uint8)
                record_id[:, len(prefix):] = _digits(numbers[lo:hi], int(digits[lo]))
                variable = c.variables[c.variable[lo]].encode()
                source = c.sources[c.source[lo]].encode()
                records.append(_copy_rows(hi - lo, [
                    (">i8", ids), ("raw", record_id), (">i8", c.rows[lo:hi]), ("raw", variable),
                    (">i4", c.day[lo:hi]), (">f8", c.value[lo:hi]), ("raw", source)]))
                versions.append(_copy_rows(hi - lo, [
                    (">i8", ids), (">i4", 1), (">i4", c.day[lo:hi]), (">f8", c.value[lo:hi]), ("raw", b"active"),
                    (">f8", self.at), ("raw", source), (">i8", self.position)]))
            copies += [("records", records), ("record_versions", versions)]
        return copies

    def _write(self, encoded: list[tuple[str, list[bytes]]]) -> None:
        for table, parts in encoded:
            with self._db.cursor() as cur, cur.copy(_LOAD_COPY[table]) as copy:
                copy.write(_COPY_HEADER)
                for part in parts:
                    copy.write(part)
                copy.write(_COPY_TRAILER)

    def _finish(self) -> None:
        db = self._db
        for _, definition in self._indexes:
            db.execute(definition)
        for table, name, definition, _ in self._constraints:  # keys first, then foreign keys
            db.execute(pg_sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                pg_sql.SQL(table), pg_sql.Identifier(name), pg_sql.SQL(definition)))
        if self.records:  # ids were given: the identity continues after them
            db.execute("SELECT setval(pg_get_serial_sequence('records', 'id'), %s)", (self.records,))
        db.execute(f"ANALYZE {', '.join(_LOADED_TABLES)}")


# --------------------------------------------------------------------------------------------
# Bulk reads: the start-up load (server/state.py ServingState.fill)

#: The libpq functions server/bulk_read.pyx calls on a psycopg connection.
_LIBPQ_FUNCTIONS = ("PQgetCopyData", "PQfreemem", "PQerrorMessage", "PQgetResult", "PQresultErrorMessage", "PQclear")

#: The current view for a bulk read, in insertion order (``enable_sort`` off: the primary
#: key's index gives the order, never a sort of the whole table). Columns cast to the exact
#: widths server/bulk_read.pyx parses.
_BULK_ACTIVE = ("COPY (SELECT citizen_row::int8, variable::text, day::int4, value::float8, scenario::text"
                " FROM records WHERE status = 'active' AND citizen_row < {n} AND id >= {low} AND id < {high}"
                " ORDER BY id) TO STDOUT (FORMAT BINARY)")
_BULK_CARDS = "COPY (SELECT token, citizen_row::int8 FROM cards ORDER BY id) TO STDOUT (FORMAT BINARY)"
_BULK_CITIZENS = ("COPY (SELECT citizen_row::int8, citizen_id::text, birth_day::int4, consent::int2 FROM citizens"
                  " WHERE citizen_row < {n} ORDER BY citizen_row) TO STDOUT (FORMAT BINARY)")


def _libpq_addresses() -> tuple[int, ...] | None:
    """The addresses of :data:`_LIBPQ_FUNCTIONS` in the libpq psycopg's connections use (the
    one library of that name mapped in this process, whichever psycopg implementation loaded
    it), or None when that cannot be told for sure: the bulk reader then takes rows through
    psycopg, one Python buffer each."""
    global _ADDRESSES
    if _ADDRESSES is not None:
        return _ADDRESSES or None
    found: tuple[int, ...] = ()
    try:
        import ctypes

        with open("/proc/self/maps") as maps:
            paths = {parts[5].strip() for line in maps if len(parts := line.split(None, 5)) == 6
                     and os.path.basename(parts[5].strip()).startswith("libpq")}
        if len(paths) == 1:
            lib = ctypes.CDLL(paths.pop())  # already loaded: the same library, not a second copy
            lib.PQlibVersion.restype = ctypes.c_int
            if lib.PQlibVersion() == psycopg.pq.version():
                found = tuple(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in _LIBPQ_FUNCTIONS)
    except (OSError, AttributeError, ValueError) as e:
        log.debug("libpq not found for the bulk reader: %s", e)
    if not found:
        log.info("bulk reads from PostgreSQL take rows through psycopg (libpq's functions not found): slower")
    _ADDRESSES = found
    return found or None


_ADDRESSES: tuple[int, ...] | None = None


class PostgresBulkRead(BulkRead):
    """:class:`BulkRead` of a PostgreSQL store over connections of its own (the store's
    connection stays free for the serving path; none is bounded by the store's timeout): one
    reads the cards and then the citizens, and :attr:`parts` others stream the records, each
    a range of their ids (:data:`RECORD_PARTS` server processes at once). All read in one
    REPEATABLE READ snapshot (exported by the first, imported by the others), the one
    :attr:`position` is read in: everything read is exactly the store at that position.

    Each table is one ``COPY (SELECT …) TO STDOUT (FORMAT BINARY)`` parsed in C by
    server/bulk_read.pyx straight from libpq's buffers (the variable and scenario names
    become codes there, by a hash table, so the server sends the plain columns: mapping them
    in SQL, with ``array_position`` or a join, cost the server more than it saves). Rows in
    the records' insertion order: ``ORDER BY id`` over the primary key's index, with sorts
    turned off for the transaction so a table without statistics is never sorted whole."""

    #: COPYs reading the records at once, each a range of ids: on this 2-core machine two
    #: server processes read 11.7 M records in 3.0 s where one takes 3.9 s.
    RECORD_PARTS = 2

    def __init__(self, store: PostgresStore, parts: int | None = None):
        self.name = store.name
        self.parts = max(1, int(self.RECORD_PARTS if parts is None else parts))
        self._conns: list[psycopg.Connection] = []
        self._skipped_lock = threading.Lock()
        try:
            first = self._open(store)
            snapshot, self.position, self.n_citizens, low, high = first.execute(
                "SELECT pg_export_snapshot(), (SELECT COALESCE(MAX(seq), 0) FROM changes),"
                " (SELECT COALESCE(MAX(citizen_row), -1) + 1 FROM citizens),"
                " (SELECT COALESCE(MIN(id), 0) FROM records), (SELECT COALESCE(MAX(id), 0) FROM records)").fetchone()
            # Part i: ids edges[i] .. edges[i + 1] - 1 (equal ranges of ids).
            self._edges = [low + (high + 1 - low) * i // self.parts for i in range(self.parts + 1)]
            for _ in range(self.parts):
                self._open(store).execute(pg_sql.SQL("SET TRANSACTION SNAPSHOT {}").format(snapshot))
        except BaseException as e:
            self.close()
            if isinstance(e, psycopg.Error):
                raise StoreUnavailable(f"store {self.name}: bulk read: {e}".rstrip()) from e
            raise

    def _open(self, store: PostgresStore) -> psycopg.Connection:
        db = store._connect()
        self._conns.append(db)
        db.execute("SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0;"
                   " BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET LOCAL enable_sort = off")
        return db

    @contextmanager
    def _copy(self, db: psycopg.Connection, sql: str, kind: int) -> Iterator:
        """One COPY in progress: (server/bulk_read.pyx PGCopyReader, psycopg's Copy). The
        caller fills from the reader (feeding it psycopg's rows when it says "feed": no
        libpq functions found); at the end the rest must be the COPY's trailer, and psycopg
        reads the end of the COPY and its result."""
        from server.bulk_read import BulkReadError, PGCopyReader

        fns = _libpq_addresses()
        try:
            with db.cursor() as cur, cur.copy(sql) as copy:
                reader = PGCopyReader(kind, db.pgconn.pgconn_ptr, *fns) if fns else PGCopyReader(kind)
                yield reader, copy
                while reader.finish() == "feed":
                    reader.feed(self._row(copy))
                if copy.read():
                    raise StoreError(f"store {self.name}: bulk read: data after the COPY's trailer")
        except _UNAVAILABLE as e:
            raise StoreUnavailable(f"store {self.name}: bulk read: {e}".rstrip()) from e
        except psycopg.Error as e:
            raise StoreError(f"store {self.name}: bulk read: {e}".rstrip()) from e
        except BulkReadError as e:
            raise StoreError(f"store {self.name}: bulk read: {e}") from e

    def _row(self, copy) -> bytes:
        data = copy.read()
        if not data:
            raise StoreError(f"store {self.name}: bulk read: the COPY ended before its trailer")
        return data

    def records(self, variables, scenarios, block_rows=1 << 20, part=0):
        from server.bulk_read import NameCodes

        _check_codes(variables, scenarios)
        var_codes = NameCodes({v: i for i, v in enumerate(variables)})
        scen_codes = NameCodes(scenarios)
        sql = _BULK_ACTIVE.format(n=int(self.n_citizens), low=int(self._edges[part]), high=int(self._edges[part + 1]))
        with self._copy(self._conns[1 + part], sql, 0) as (reader, copy):
            while not reader.done:
                block, n = _record_block(block_rows), 0
                while n < block_rows:
                    got, skipped, state = reader.fill_records(
                        var_codes, scen_codes, block.citizen_row[n:], block.variable[n:], block.day[n:],
                        block.value[n:], block.scenario[n:], self.n_citizens)
                    n += got
                    if skipped:
                        with self._skipped_lock:  # parts run in threads of their own
                            self.skipped += skipped
                    if state == "done":
                        break
                    if state == "feed":
                        reader.feed(self._row(copy))
                if n:
                    yield _head(block, n)

    def cards(self, block_rows=1 << 20):
        with self._copy(self._conns[0], _BULK_CARDS, 2) as (reader, copy):
            while not reader.done:
                tokens, rows, n = np.empty((block_rows, TOKEN_BYTES), np.uint8), np.empty(block_rows, np.int64), 0
                while n < block_rows:
                    got, state = reader.fill_cards(tokens[n:], rows[n:])
                    n += got
                    if state == "done":
                        break
                    if state == "feed":
                        reader.feed(self._row(copy))
                if n:
                    yield CardTable(tokens[:n], rows[:n]) if n == block_rows else CardTable(tokens[:n].copy(), rows[:n].copy())

    def citizens(self, chunk_rows):
        with self._copy(self._conns[0], _BULK_CITIZENS.format(n=int(self.n_citizens)), 1) as (reader, copy):
            for lo in range(0, self.n_citizens, chunk_rows):
                size, parts, have = min(chunk_rows, self.n_citizens - lo), [], 0
                while have < size:
                    *part, state = reader.fill_citizens(lo + have, size - have)
                    parts.append(part)
                    have += len(part[2])
                    if have < size:
                        if state != "feed":
                            raise StoreError(f"store {self.name}: bulk read: {size - have} citizens missing"
                                             f" from row {lo + have} on")
                        reader.feed(self._row(copy))
                parts = [p for p in parts if len(p[2])]
                yield CitizenChunk.join(lo, parts)

    def close(self) -> None:
        for db in self._conns:
            try:
                db.close()  # ends the read-only transaction: nothing to commit
            except psycopg.Error:
                pass
        self._conns = []
