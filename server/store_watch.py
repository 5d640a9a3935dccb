"""What a worker does while its store is unreachable (a PostgreSQL restart, a failover).

    >>> watch = StoreWatch(store, on_change=lambda up: print("store up" if up else "store down"))  # doctest: +SKIP
    >>> watch.check()                 # raises StoreUnavailable at once while the store is down  # doctest: +SKIP
    >>> with watch.watching():        # a StoreUnavailable inside marks the store down           # doctest: +SKIP
    ...     store.add_records([...])

Reads never need the store (the serving state in memory answers them), so during an outage
every check and score read keeps being served. Writes fail fast with UNAVAILABLE: the first
one that finds the store gone marks it down, and from then on a write is refused before it
takes the writers' lock or waits for a connection, so nothing is ever acknowledged that the
store did not commit. A background thread probes the store every ``probe_seconds``; the
first answer marks it up again and writes resume by themselves. ``on_change(up)`` lets the
node report it: health of ``qianjiang.v1.RecordsService`` goes NOT_SERVING while down (the
reading services stay SERVING) and the gauge ``qianjiang_store_up`` follows.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from server.store import Store, StoreUnavailable

log = logging.getLogger("qianjiang.store")


class StoreWatch:
    def __init__(self, store: Store, on_change=None, probe_seconds: float = 0.5):
        self.store = store
        self.on_change = on_change or (lambda up: None)
        self.probe_seconds = probe_seconds
        self._down_since: float | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()

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

    def down(self, why: BaseException) -> None:
        with self._lock:
            if self._down_since is not None or self._closed.is_set():
                return
            self._down_since = time.monotonic()
        log.error("store unreachable (%s): writes fail fast until it answers again", why)
        self.on_change(False)
        threading.Thread(target=self._probe, name="qj-store-probe", daemon=True).start()

    def _probe(self) -> None:
        while not self._closed.wait(self.probe_seconds):
            try:
                self.store.ping()
            except Exception as exc:  # noqa: BLE001 - any failure means: still down
                log.debug("store still unreachable: %s", exc)
                continue
            down_for = time.monotonic() - (self._down_since or time.monotonic())
            self._down_since = None
            log.warning("store reachable again after %.1f s: writes resume", down_for)
            self.on_change(True)
            return

    def close(self) -> None:
        self._closed.set()
