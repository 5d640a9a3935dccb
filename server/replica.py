"""Serving replicas that follow the store (``qjscore serve --replica``; docs/replicas.md).

Several nodes (each a parent and its workers: server/app.py) serve one city from one
PostgreSQL store. Every node serves from its own memory, started from its snapshot (or a
load) as before, and kept current by the store's change log: the ``changes`` table, one row
per write transaction with a gap-free ``seq``, written in the same transaction as the write.

* **Any node accepts writes** (the store is the one source of truth) and applies its own at
  once, as a single node does (server/service.py ``_apply``).
* **Wake-up.** Each write's first change also queues ``NOTIFY qj_changes, '<seq>'`` in the
  same statement (server/store_pg.py ``_change``): delivered at the commit, only then, to
  every listening session. The :class:`Follower` of each node (one thread in the process
  that loaded the state: the parent with ``--workers N``) LISTENs on a connection of its
  own and, woken, reads what changed **from the table** (``changes_between``: the payload
  is only a hint), so a gap (a notification never seen), a reconnect or a lost notification
  costs nothing but the next read. It also reads the table every ``poll_seconds`` (the
  backstop, and the heartbeat below).
* **Catch-up.** The citizens the changes name are re-derived from the store exactly as a
  snapshot start's replay does (server/snapshot.py ``replay``: records as of the batch's
  last position, consent, cards, a new citizen's row), the reads outside the state's lock
  and each row's apply under it, conditional on freshness (server/state.py ``apply``,
  ``set_consent``), so the follower and the node's own writers may apply in any order. An
  ``add_records`` of several citizens logs no single row: its records' rows come from
  ``rows_of_new_records``. A bulk write (seeding, a bulk consent) names no row, and more
  than ``max_rows`` changed citizens make one-by-one slower than a load: the node then
  **reloads** (its own snapshot plus the changes since, or the whole store), unready and
  NOT_SERVING meanwhile.
* **Bounded staleness.** A node is *current* when the follower last confirmed (a read of
  the table) that it had applied everything the store had, at most ``max_lag_seconds``
  ago. Past that bound every worker's grpc.health.v1 answers NOT_SERVING (for "" and every
  service), so the front (deploy/haproxy.cfg) stops sending it checks, and SERVING again
  once it has caught up. A follower that cannot reach the store at all does not count as
  behind: no write can commit through a store nobody reaches, and reads go on from memory
  as on a single node (docs/operations.md, "Store outage"); a node cut off from a store the
  others still reach is the case this cannot tell apart (docs/replicas.md).

The status the workers read (:class:`ReplicaStatus`) is a few int64 slots in a shared
mapping made before the workers fork.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time

import numpy as np

from server.state import READY

log = logging.getLogger("qianjiang.replica")

#: Citizens re-derived one by one in a catch-up before a reload is faster (server/snapshot.py
#: MAX_REPLAY_ROWS is the same trade-off at a start).
MAX_CATCHUP_ROWS = 20_000

#: Change kinds that name no citizen but that a follower can still follow (the rows of
#: their records are found by ``rows_of_new_records``).
_MULTI_ROW_KINDS = ("add_records",)

# status slots
(APPLIED, KNOWN, CONFIRMED_NS, STORE_DOWN, RELOADING, CATCHUPS, RELOADS, RECONNECTS, NOTIFIED,
 POLLED, GAPS, BROKEN, MAX_LAG_NS, ROWS) = range(14)
_SLOTS = 16


class ReplicaError(ValueError):
    """A configuration that cannot make replicas (the message says why)."""


def check_config(config) -> None:
    """``--replica`` needs a store every node shares: PostgreSQL. ReplicaError otherwise."""
    if not getattr(config, "replica", False):
        return
    url = config.resolved_store_url
    if not url.startswith(("postgresql://", "postgres://", "postgresql+")):
        raise ReplicaError(
            "--replica: replicas follow a PostgreSQL store's change log (LISTEN/NOTIFY); the embedded SQLite "
            "store serves one node only (run one server on it, with --workers N for more cores), so give "
            "--store postgresql://… to every node")
    if not config.replica_max_lag_seconds > 0:
        raise ReplicaError("--replica-max-lag must be a positive number of seconds")


class ReplicaStatus:
    """The follower's position and health, shared by the node's processes (an anonymous
    shared mapping made before the workers fork)."""

    def __init__(self, max_lag_seconds: float):
        self._map = mmap.mmap(-1, _SLOTS * 8, flags=mmap.MAP_SHARED)
        self.slots = np.frombuffer(self._map, np.int64, _SLOTS)
        self.slots[MAX_LAG_NS] = int(max_lag_seconds * 1e9)
        self.slots[CONFIRMED_NS] = time.monotonic_ns()  # the start's load was current

    @property
    def applied(self) -> int:
        return int(self.slots[APPLIED])

    def lag_seconds(self) -> float:
        """Seconds since the follower last confirmed the node current (0 while it is)."""
        return max(time.monotonic_ns() - int(self.slots[CONFIRMED_NS]), 0) / 1e9

    def current(self) -> bool:
        """Within the staleness bound (or the store is unreachable: see the module's
        docstring), and not reloading."""
        s = self.slots
        if s[RELOADING] or s[BROKEN]:
            return False
        if s[STORE_DOWN]:
            return True
        return time.monotonic_ns() - int(s[CONFIRMED_NS]) <= int(s[MAX_LAG_NS])

    def figures(self) -> dict:
        s = self.slots
        return {"applied": int(s[APPLIED]), "known": int(s[KNOWN]), "lag_s": round(self.lag_seconds(), 3),
                "current": self.current(), "catchups": int(s[CATCHUPS]), "reloads": int(s[RELOADS]),
                "reconnects": int(s[RECONNECTS]), "notified": int(s[NOTIFIED]), "polled": int(s[POLLED]),
                "gaps": int(s[GAPS]), "rows": int(s[ROWS]), "store_down": bool(s[STORE_DOWN])}


class Follower:
    """The node's follower: a thread that LISTENs for the store's changes and applies them
    to the serving state (module docstring). ``runtime``: server/app.py Runtime after its
    load; the state it serves may change under it (a model rollout), so each batch looks
    it up again."""

    def __init__(self, runtime, status: ReplicaStatus, poll_seconds: float | None = None,
                 max_rows: int = MAX_CATCHUP_ROWS):
        self.runtime = runtime
        self.status = status
        bound = status.slots[MAX_LAG_NS] / 1e9
        self.poll_seconds = poll_seconds if poll_seconds is not None else max(min(0.25, bound / 4), 0.02)
        self.max_rows = max_rows
        self._stop = threading.Event()
        self._store = None
        self._listen = None
        self._bound = None  # (state, spec, calibration, bound scorer)
        self._thread = threading.Thread(target=self._run, name="qj-follower", daemon=True)
        status.slots[APPLIED] = runtime.state.position
        status.slots[KNOWN] = runtime.state.position

    def start(self) -> "Follower":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        listen = self._listen
        if listen is not None:
            try:
                listen.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
        self._thread.join(5)
        if self._store is not None:
            self._store.close()

    # the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                if self._store is None:
                    self._store = self.runtime.open_store()
                self._connect()
                self.catch_up()  # whatever was missed while not listening
                backoff = 0.1
                self._listen_loop()
            except Exception as exc:  # noqa: BLE001 - the store went away, or a bug: log, retry
                if self._stop.is_set():
                    break
                from server.store import StoreError

                unreachable = isinstance(exc, (StoreError, OSError)) or type(exc).__module__.startswith("psycopg")
                self.status.slots[STORE_DOWN] = 1 if unreachable else 0
                if unreachable:
                    log.warning("follower: the store does not answer (%s); retrying in %.1f s", exc, backoff)
                else:
                    log.exception("follower: catch-up failed; retrying in %.1f s", backoff)
                self._close_listen()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)

    def _connect(self) -> None:
        import psycopg

        from server.store_pg import _KEEPALIVES, CHANGES_CHANNEL

        if self._listen is not None and not self._listen.closed and not self._listen.broken:
            return
        if self._listen is not None:
            self.status.slots[RECONNECTS] += 1
            log.info("follower: listening again (a lost connection); catching up from the change log")
        dsn = self.runtime.config.resolved_store_url
        if dsn.startswith("postgresql+"):
            dsn = "postgresql://" + dsn.split("://", 1)[1]
        self._listen = psycopg.connect(dsn, autocommit=True, connect_timeout=3, application_name="qianjiang-follower",
                                       **_KEEPALIVES)
        self._listen.execute(f"LISTEN {CHANGES_CHANNEL}")

    def _close_listen(self) -> None:
        listen = self._listen
        if listen is not None:
            try:
                listen.close()
            except Exception:  # noqa: BLE001
                pass
            # keep the object: _connect counts the reconnect

    def _listen_loop(self) -> None:
        while not self._stop.is_set():
            woken = False
            for note in self._listen.notifies(timeout=self.poll_seconds, stop_after=1):
                woken = True
                try:
                    seq = int(note.payload)
                except ValueError:
                    seq = 0
                self.status.slots[NOTIFIED] += 1
                if seq > self.status.slots[KNOWN] + 1 and self.status.slots[KNOWN] >= self.status.slots[APPLIED]:
                    self.status.slots[GAPS] += 1  # a notification between never came (or came coalesced)
                if seq > self.status.slots[KNOWN]:
                    self.status.slots[KNOWN] = seq
            if self._listen.broken or self._listen.closed:
                raise ConnectionError("the follower's LISTEN connection was lost")
            if not woken:
                self.status.slots[POLLED] += 1
            if woken and self.status.slots[KNOWN] <= self.status.slots[APPLIED]:
                continue  # an echo of what a catch-up already read
            self.catch_up()

    # catching up --------------------------------------------------------------------------

    def catch_up(self) -> int:
        """Apply every change after the applied position: the change log read in chunks of
        ``max_rows`` entries (each read one bounded statement), each chunk's citizens
        re-derived; a reload instead when the store is more than ``max_rows`` x 10 changes
        ahead. Returns how many citizens were re-derived."""
        total = 0
        while True:
            status = self.status.slots
            if status[KNOWN] - status[APPLIED] > self.max_rows * 10:
                self.reload(f"{int(status[KNOWN] - status[APPLIED]):,} changes behind")
                return total
            began = time.monotonic_ns()
            applied = int(status[APPLIED])
            changes = self._store.changes_between(applied, applied + self.max_rows)
            status[STORE_DOWN] = 0
            if changes:
                total += self._apply_changes(changes)
            if len(changes) < self.max_rows:  # the read saw the end of the log
                status[CONFIRMED_NS] = began  # everything the store had when the read began is applied
                return total
            # a full chunk: how far the log goes (a notification may not have said), for the check above
            status[KNOWN] = max(int(status[KNOWN]), self._store.high_water_mark())

    def _apply_changes(self, changes: list) -> int:
        status, store = self.status.slots, self._store
        last = changes[-1][0]
        if last > status[KNOWN]:
            status[KNOWN] = last
        rows, multi, bulk = set(), [], None
        for seq, kind, row, _at in changes:
            if row is not None:
                rows.add(row)
            elif kind in _MULTI_ROW_KINDS:
                multi.append(seq)
            else:
                bulk = (seq, kind)
        if multi and bulk is None:
            rows.update(store.rows_of_new_records(min(multi), max(multi)))
        if bulk is not None or len(rows) > self.max_rows:
            why = (f"a change at position {bulk[0]} ({bulk[1]}) touched many citizens" if bulk
                   else f"{len(rows):,} citizens changed")
            self.reload(why)
            return len(rows)
        state = self.runtime.state
        for row in sorted(rows):
            self._rederive(state, store, row, last)
        status[APPLIED] = last
        status[CATCHUPS] += 1
        status[ROWS] += len(rows)
        return len(rows)

    def _scorer(self, state):
        rt = self.runtime
        cached = self._bound
        if cached is None or cached[0] is not state or cached[1] is not rt.spec:
            from kernel.score import Scorer

            scorer = Scorer(rt.spec, rt.calibration())
            cached = self._bound = (state, rt.spec, scorer.bind(state.features, state.adult, state.columns))
        return cached[2]

    def _rederive(self, state, store, row: int, position: int) -> None:
        """One citizen as the store holds it at ``position`` (its records) or later (its
        consent, cards and birth day), applied only where fresher than what the row holds."""
        from server.store import NotFound

        try:
            read = state.read_citizen(store, row, position)  # the store's reads, outside the lock
        except NotFound:  # a citizen row whose write rolled back cannot be in the log: skip
            return
        bound = self._scorer(state)
        with state.lock:
            if row >= state.capacity:
                self.status.slots[BROKEN] = 1
                raise RuntimeError(f"citizen row {row} does not fit the serving state's capacity of {state.capacity}: "
                                   "restart this node to grow it")
            state.apply_citizen(read, self.runtime.scenarios, bound)
            control = self.runtime.control
            if control is not None:
                control.mark(row)  # a rollout building a new state re-derives it too

    def reload(self, why: str) -> None:
        """Too far behind, or a bulk change: unready (workers refuse calls, health
        NOT_SERVING), then the node's own snapshot and the changes since, or the whole store."""
        from server.app import _snapshot_header
        from server.city_time import today
        from kernel.score import Scorer

        rt, status = self.runtime, self.status.slots
        status[RELOADING] = 1
        t0 = time.perf_counter()
        log.warning("follower: reloading the serving state: %s", why)
        try:
            state = rt.state
            with state.lock:
                state.meta[READY] = 0
            store = rt.open_store()
            try:
                scorer = Scorer(rt.spec, rt.calibration())
                rt.snapshot_header = _snapshot_header(rt.config, rt.release)
                if not rt._restore_snapshot(store, scorer):
                    state.wipe()
                    state.load(store, scorer, rt.scenarios, today())
                status[APPLIED] = state.position
                status[KNOWN] = max(int(status[KNOWN]), state.position)
            finally:
                store.close()
            self._bound = None
            status[RELOADS] += 1
            status[CONFIRMED_NS] = time.monotonic_ns()
            log.info("follower: reloaded %d citizens in %.1f s (position %d)", state.n_citizens,
                     time.perf_counter() - t0, state.position)
        finally:
            status[RELOADING] = 0


def start(runtime) -> Follower | None:
    """The node's follower, started once its state is loaded (None without ``--replica``)."""
    status = getattr(runtime, "replica", None)
    if status is None:
        return None
    return Follower(runtime, status).start()


def watch_health(node) -> threading.Thread | None:
    """In each serving process: turn grpc.health.v1 NOT_SERVING (for "" and every service)
    while the node is not current, SERVING again once it is (the records and rights services
    only while the store answers writes: server/store_watch.py)."""
    status = getattr(node.runtime, "replica", None)
    if status is None:
        return None
    from grpc_health.v1 import health_pb2

    from server.app import RECORDS_SERVICE, RIGHTS_SERVICE, SERVICE_NAMES

    def run() -> None:
        serving = True
        while not node._watching.wait(0.02):
            now = status.current()
            if now == serving:
                continue
            serving = now
            try:
                if not now:
                    log.warning("replica: NOT_SERVING: %.2f s since the node was last confirmed current "
                                "(bound %.2f s)", status.lag_seconds(), status.slots[MAX_LAG_NS] / 1e9)
                    node.set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
                else:
                    log.info("replica: current again: SERVING")
                    store_up = node.store_watch is None or node.store_watch.up
                    names = ("",) + tuple(n for n in SERVICE_NAMES if store_up or n not in (RECORDS_SERVICE, RIGHTS_SERVICE))
                    node.set_health(health_pb2.HealthCheckResponse.SERVING, names=names)
            except RuntimeError:  # the loop is closed: draining
                return

    thread = threading.Thread(target=run, name="qj-replica-health", daemon=True)
    thread.start()
    return thread
