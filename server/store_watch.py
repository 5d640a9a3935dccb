"""What a worker does while its store is unreachable (a PostgreSQL restart, a failover, a
server that hangs or a network partition).

    >>> watch = StoreWatch(store, on_change=lambda up: print("store up" if up else "store down"))  # doctest: +SKIP
    >>> watch.check()                 # raises StoreUnavailable at once while the store is down  # doctest: +SKIP
    >>> with watch.turn():            # a write's store calls: refused at once while down,        # doctest: +SKIP
    ...     store.add_records([...])  # a StoreUnavailable inside marks the store down

Reads never need the store (the serving state in memory answers them), so during an outage
every check and score read keeps being served. Writes fail fast with UNAVAILABLE: once the
store is known to be down a write is refused before it waits for a connection, so nothing
is ever acknowledged that the store did not commit.

The store is known down when a write finds it gone, or when the heartbeat says so: a
background thread pings it every ``probe_seconds`` (0.25 s) and a ping that fails, or does
not answer within ``bound`` seconds (the store's own call bound, ``store.timeout``, 3 s for
PostgreSQL: server/store_pg.py), marks it down. A hung server (SIGSTOP, a partition) is
thus down within ``bound + probe_seconds`` even if nobody writes. The first ping that
answers marks it up again and writes resume by themselves. ``on_change(up)`` lets the node
report it: health of ``qianjiang.v1.RecordsService`` goes NOT_SERVING while down (the
reading services stay SERVING) and the gauge ``qianjiang_store_up`` follows.

A worker's writes share one store connection, and a write's position
(``Store.last_position()``) is read after it: :meth:`StoreWatch.turn` gives one write at a
time its turn, waiting at most ``bound`` for the write before it (which is itself bounded by
the store), so a queue of writes behind a hung one ends within the bound too instead of one
bound each.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent import futures

from server.store import Store, StoreUnavailable

log = logging.getLogger("qianjiang.store")

#: The bound of a probe when the store does not say its own (SQLite).
DEFAULT_BOUND = 3.0


class StoreWatch:
    def __init__(self, store: Store, on_change=None, probe_seconds: float = 0.25, bound: float | None = None,
                 heartbeat: bool = True):
        """``heartbeat``: probe all the time (a node's watch); without it the store is
        probed only after a write found it down (a service built without a node)."""
        self.store = store
        self.on_change = on_change or (lambda up: None)
        self.probe_seconds = probe_seconds
        self.bound = float(bound or getattr(store, "timeout", None) or DEFAULT_BOUND)
        self._down_since: float | None = None
        self._lock = threading.Lock()
        self._turn = threading.Lock()
        self._closed = threading.Event()
        self._heartbeat = heartbeat
        if heartbeat:
            threading.Thread(target=self._beat, name="qj-store-heartbeat", daemon=True).start()

    @property
    def up(self) -> bool:
        return self._down_since is None

    def check(self) -> None:
        """Refuse a write at once while the store is known to be down."""
        since = self._down_since
        if since is not None:
            raise StoreUnavailable(
                f"the store has been unreachable for {time.monotonic() - since:.1f} s; nothing was written, retry later"
            )

    @contextlib.contextmanager
    def watching(self):
        try:
            yield
        except StoreUnavailable as exc:
            self.down(exc)
            raise

    @contextlib.contextmanager
    def turn(self):
        """This worker's turn at the store for one write: refused at once while the store
        is down, after at most ``bound`` behind the write before it, or at once if that
        write found the store down meanwhile. A StoreUnavailable inside marks it down."""
        self.check()
        if not self._turn.acquire(timeout=self.bound):
            exc = StoreUnavailable(f"the store has not answered the write before this one within {self.bound:g} s;"
                                   " nothing was written, retry later")
            self.down(exc)
            raise exc
        try:
            self.check()
            with self.watching():
                yield
        finally:
            self._turn.release()

    def down(self, why: BaseException) -> None:
        with self._lock:
            if self._down_since is not None or self._closed.is_set():
                return
            self._down_since = time.monotonic()
        log.error("store unreachable (%s): writes fail fast until it answers again", why)
        self.on_change(False)
        if not self._heartbeat:
            threading.Thread(target=self._probe, name="qj-store-probe", daemon=True).start()

    def _recovered(self) -> None:
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is None:
            return
        log.warning("store reachable again after %.1f s: writes resume", time.monotonic() - since)
        self.on_change(True)

    def _beat(self) -> None:
        # The ping runs on a thread of its own, so a ping that hangs is seen to hang: it
        # counts as down after the bound, and the next probe waits for that same ping
        # rather than piling more onto a store that does not answer.
        pinger = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="qj-store-ping")
        pending: futures.Future | None = None
        try:
            while not self._closed.wait(self.probe_seconds):
                if pending is None or pending.done():
                    pending = pinger.submit(self.store.ping)
                try:
                    pending.result(timeout=self.bound)
                except futures.TimeoutError:
                    self.down(StoreUnavailable(f"a probe had no answer within {self.bound:g} s"))
                except Exception as exc:  # noqa: BLE001 - any failure means: down
                    if not self._closed.is_set():
                        self.down(exc)
                else:
                    self._recovered()
        finally:
            pinger.shutdown(wait=False)

    def _probe(self) -> None:
        while not self._closed.wait(self.probe_seconds):
            try:
                self.store.ping()
            except Exception as exc:  # noqa: BLE001 - any failure means: still down
                log.debug("store still unreachable: %s", exc)
                continue
            self._recovered()
            return

    def close(self) -> None:
        self._closed.set()
