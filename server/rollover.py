"""The day rollover: at the city's midnight records age and expire and people turn 18, and
only the citizens for whom that changes anything are re-derived, without stalling writes or
showing a reader a row from two moments.

    >>> figures = roll_over(state, store, scorer, scenarios, today())   # doctest: +SKIP

**What it reads.** Nothing from the store but the citizens written since the last rollover.
Which citizens change on the new day ``D``, and the records that change them, the loading
process keeps in memory (server/ageing.py): ``until`` per citizen (a column of the state:
the next day one of their records comes into effect or leaves its lifetime or window, or
they turn 18; ``DIRTY`` once written) and the index of ageing records (``state.ageing``:
every record of a variable with a lifetime or window that is alive or not yet in effect,
about 8 a citizen, 12 bytes each). Measured at 12.5 M before this design: reading the
changed citizens from the store was no way out. The store keeps a citizen's records on
about a dozen 16 KB pages (records are grouped by variable, ~150 citizens a page), so
the 1.1 % of the city with a change on a day touch 80-90 % of the records' pages, in random
reads: 160,000 citizens took 75-450 s and wrote p99 243 ms (21 ms without), worse than the
whole scan (81 s, which also held one read transaction the whole time, so the WAL's
checkpoints waited and a writer's commit then paid for all of them: 1.3 s, and 4.7 s once).

1. **Written citizens** (``until == DIRTY``: written since the index knew them; a handful
   per second of writes): read from the store (server/store.py ``rows_read``: the citizen
   index, ``READ_ROWS`` citizens per read transaction, each short, at the lowest
   best-effort I/O priority, at most ``rows_per_second`` when asked), derived whole on
   ``D`` exactly as a whole load derives them (the same records in the same order per
   citizen), their index entries replaced. Past ``SCAN_SHARE`` of the city (no index yet, or
   the clock set back: ``until`` only looks forward) one scan of the store reads everyone.
2. **Switch**: the state's day becomes ``D`` (a write from then on derives on ``D``).
3. **Publish** those, ``PUBLISH_ROWS`` rows per hold of the writers' lock with a pause as
   long as the hold after each (a writer blocked on the lock gets it at the next release:
   without the pause this loop took it again first), each row inside its sequence lock
   (server/state.py ``writing`` / ``read_row``: a reader sees a row wholly before or wholly
   after). A row written since its read is skipped.
4. **From the index**, in chunks of ``DERIVE_ROWS``: every other citizen with a change on
   ``D`` (``until <= D``) or a linearly decaying record (28 % of the city: their weights
   move every day) gets the cells of the ageing variables, the default mask, adulthood and
   ``until`` re-derived from their indexed records, exactly a whole load's (server/ageing.py
   says why), the rest of the row kept, is re-scored and published as in 3. A row written
   since it was read from the state is skipped.
5. **Catch up**: the citizens written meanwhile (``DIRTY`` again, or skipped) are read and
   published as in 1 and 3, on ``D``: a write after the switch derives on ``D`` already, so
   one round is all.

Until its block is published a citizen shows yesterday's values under the new day's date;
every other answer is exact, and equal to a whole load's on ``D`` (tests/test_rollover.py:
after 1, 30 and 400 days, day by day for weeks, with writes, future records and a clock set
back, and with readers hammering the rows).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from kernel.columns import ScoreColumns
from kernel.features import Records, build_features
from kernel.score import Scorer
from server.ageing import DIRTY, Ageing, ageing_variables, linear_variables, until_of
from server.state import AS_OF_DAY, ServingState, _now, _RecordBuckets, adults, default_bits, default_masks
from server.store import RecordBlock, Store, bulk_read, rows_read

log = logging.getLogger("qianjiang.rollover")

#: Rows published per hold of the writers' lock: about a millisecond each at 12.5 M (rows
#: scattered over the city: a cache miss for each column of each). 2,048 held it up to 17 ms,
#: and 57 ms when the holder lost its core meanwhile (two cores, four busy threads).
PUBLISH_ROWS = 512
#: Citizens derived at a time (memory stays bounded whatever the city).
DERIVE_ROWS = 1 << 17
#: Citizens read from the store per slice (a rate limit is applied between slices).
READ_ROWS = 1024
#: Past this share of the city to read, one scan of the store is faster than the index.
SCAN_SHARE = 0.15


class _Holds:
    """The writers' lock, taken block by block, timed, with a pause after each hold as long
    as the hold (at least ``pause``): a writer blocked on it meanwhile gets it first."""

    def __init__(self, lock, pause: float = 0.0005):
        self.lock, self.pause, self.count, self.longest = lock, pause, 0, {}

    def hold(self, work, what: str) -> None:
        with self.lock:
            t = time.perf_counter()
            work()
            held = time.perf_counter() - t
        self.longest[what] = max(self.longest.get(what, 0.0), held)
        self.count += 1
        time.sleep(max(held, self.pause))


def _idle_io(on: bool) -> None:
    """This thread's I/O priority: the lowest of the best-effort class (``on``) or back to
    the default. Best effort (Linux; a scheduler without priorities ignores it). Not the idle
    class: under the writers' own reads it was served so rarely that 294 citizens took 17 s."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        value = (2 << 13 | 7) if on else 0  # IOPRIO_CLASS_BE, level 7; or none: the process's default
        libc.syscall(251, 1, 0, value)  # SYS_ioprio_set (x86-64), IOPRIO_WHO_PROCESS, this thread
    except Exception:  # noqa: BLE001 - not Linux x86-64: plain priority
        pass


class _Derived:
    """Re-derived rows ready to publish: absolute ``rows`` (ascending) and their values;
    ``positions``: the store position each row's records were read at (None: decay only)."""

    def __init__(self, rows, features, defaults, adult, until, columns, positions=None):
        self.rows, self.features, self.defaults, self.adult, self.until = rows, features, defaults, adult, until
        self.columns, self.positions = columns, positions


def _derive(state: ServingState, scorer: Scorer, rows: np.ndarray, records: Records, bits: np.ndarray,
            day: int, positions: np.ndarray) -> tuple[_Derived, Ageing]:
    """Citizen ``rows`` (ascending) whole on ``day`` from all their records
    (``records.citizen``: the index in ``rows``), as a whole load derives them."""
    spec, m = state.spec, len(rows)
    features = build_features(spec, records, m, day)
    defaults = default_masks(spec, records, bits, m, day)
    birth = state.birth_day[rows]
    adult = adults(birth, day)
    until, keep = until_of(spec, records, m, day, birth, adult)
    columns = scorer.score(features, adult, out=ScoreColumns.empty(m, compact=True), n_threads=1)
    derived = _Derived(rows, features, defaults, adult, until, columns, positions)
    return derived, Ageing.of(rows[records.citizen], records, bits, keep)


def _derive_from_index(state: ServingState, scorer: Scorer, rows: np.ndarray, day: int,
                       cells: np.ndarray) -> tuple[_Derived, np.ndarray, np.ndarray]:
    """Citizen ``rows`` (ascending, none DIRTY) on ``day`` from the ageing index: their
    ageing ``cells`` (variable indices), default masks, adulthood and ``until`` exactly as a
    whole load derives them (server/ageing.py), the rest of their features as they are.
    Returns the rows' values, and their row positions and ``until`` as read first (a write
    since changes both)."""
    spec, m = state.spec, len(rows)
    seen, seen_until = state.row_position[rows].copy(), state.until[rows].copy()  # first
    features = state.features[rows].copy()
    records, bits = state.ageing.records_of(rows)
    features[:, cells] = build_features(spec, records, m, day)[:, cells]
    defaults = default_masks(spec, records, bits, m, day)
    birth = state.birth_day[rows]
    adult = adults(birth, day)
    until, _ = until_of(spec, records, m, day, birth, adult)
    columns = scorer.score(features, adult, out=ScoreColumns.empty(m, compact=True), n_threads=1)
    return _Derived(rows, features, defaults, adult, until, columns), seen, seen_until


def _publish(state: ServingState, holds: _Holds, d: _Derived, fresh, what: str) -> tuple[int, np.ndarray]:
    """Copy ``d`` in, PUBLISH_ROWS rows per hold; ``fresh(idx, sel)``: which rows of a
    block may be written (under the lock). Returns (rows written, rows skipped)."""
    written, skipped = 0, []
    whole = d.defaults is not None

    def block(lo: int) -> None:
        nonlocal written
        sel = np.arange(lo, min(lo + PUBLISH_ROWS, len(d.rows)))
        idx = d.rows[sel]
        ok = fresh(idx, sel)
        skipped.append(idx[~ok])
        idx, sel = idx[ok], sel[ok]
        with state.writing(idx):
            state.features[idx] = d.features[sel]
            if whole:
                state.defaults[idx] = d.defaults[sel]
                state.adult[idx] = d.adult[sel]
                state.until[idx] = d.until[sel]
            for name in ScoreColumns.DTYPES:
                getattr(state.columns, name)[idx] = getattr(d.columns, name)[sel]
            state.refresh_gate(idx)
            state.computed_at[idx] = _now()
        written += len(idx)

    for lo in range(0, len(d.rows), PUBLISH_ROWS):
        holds.hold(lambda lo=lo: block(lo), what)
    return written, np.concatenate(skipped) if skipped else np.empty(0, np.int64)


def _read(state: ServingState, store: Store, scorer: Scorer, rows: np.ndarray, day: int, variables, bits_of,
          rows_per_second: float | None, figures: dict) -> tuple[list[_Derived], list[Ageing]]:
    """Read citizen ``rows`` (ascending) from the store and derive them on ``day``: through
    the citizen index, READ_ROWS citizens per read transaction (each at its own position),
    at most ``rows_per_second``, at the lowest best-effort I/O priority; or past SCAN_SHARE
    of the city by one scan of the whole store."""
    derived, parts = [], []
    n = state.n_citizens
    if len(rows) > SCAN_SHARE * max(n, 1):
        with bulk_read(store) as bulk:
            mask = np.zeros(max(bulk.n_citizens, n, int(rows[-1]) + 1), bool)
            mask[rows] = True
            buckets = _RecordBuckets(bulk, variables, bits_of, bulk.n_citizens, DERIVE_ROWS)
            buckets.join()
            position = bulk.position
        for j, (lo, hi) in enumerate(buckets.chunks()):
            block = buckets.take(j)
            keep = mask[block.citizen_row]
            chunk = np.flatnonzero(mask[lo:hi]) + lo
            if len(chunk):
                local = np.searchsorted(chunk, block.citizen_row[keep])
                recs = Records(local.astype(np.int64), block.variable[keep], block.day[keep], block.value[keep])
                figures["records_read"] += len(recs)
                d, part = _derive(state, scorer, chunk, recs, block.scenario[keep].astype(np.int64), day,
                                  np.full(len(chunk), position, np.int64))
                derived.append(d)
                parts.append(part)
        return derived, parts
    t0, done = time.perf_counter(), 0
    with rows_read(store) as reader:
        for k in range(0, len(rows), DERIVE_ROWS):
            chunk = rows[k : k + DERIVE_ROWS]
            positions = np.empty(len(chunk), np.int64)
            blocks = []
            _idle_io(True)
            try:
                for a in range(0, len(chunk), READ_ROWS):
                    position, block = reader.read(chunk[a : a + READ_ROWS], variables, bits_of)
                    positions[a : a + READ_ROWS] = position
                    blocks.append(block)
                    done += len(chunk[a : a + READ_ROWS])
                    if rows_per_second:
                        ahead = done / rows_per_second - (time.perf_counter() - t0)
                        if ahead > 0:
                            time.sleep(ahead)
            finally:
                _idle_io(False)
            recs = RecordBlock.concat(blocks)
            local = np.searchsorted(chunk, recs.citizen_row)
            figures["records_read"] += len(recs)
            d, part = _derive(state, scorer, chunk, Records(local.astype(np.int64), recs.variable, recs.day, recs.value),
                              recs.scenario.astype(np.int64), day, positions)
            derived.append(d)
            parts.append(part)
    return derived, parts


def _reread(state: ServingState, store: Store, scorer: Scorer, holds: _Holds, rows: np.ndarray, day: int,
            variables, bits_of, rows_per_second, figures: dict, what: str,
            switch=None) -> tuple[np.ndarray, np.ndarray, list[Ageing]]:
    """Re-derive citizen ``rows`` from the store on ``day`` and publish them (after
    ``switch``, if given, under the lock). Returns the rows skipped (written since their
    read), those published DIRTY still (a record the index cannot hold: read at every
    rollover) and their new index entries (for the caller to put in the index)."""
    derived, parts = _read(state, store, scorer, rows, day, variables, bits_of, rows_per_second, figures)
    if switch is not None:
        figures["read_s"] = round(time.perf_counter() - figures["t0"], 3)
    if switch is not None:
        holds.hold(switch, "switch")
    skipped, still = [], []
    for d in derived:
        written, missed = _publish(state, holds, d, lambda idx, sel, d=d: state.row_position[idx] <= d.positions[sel],
                                   what)
        figures["rows"] += written
        figures["from_store"] += written
        skipped.append(missed)
        still.append(np.setdiff1d(d.rows[d.until == DIRTY], missed))
    empty = np.empty(0, np.int64)
    return np.concatenate(skipped) if skipped else empty, np.concatenate(still) if still else empty, parts


def roll_over(state: ServingState, store: Store, scorer: Scorer, scenarios, day: int,
              rows_per_second: float | None = None) -> dict:
    """Move ``state`` to ``day`` (module docstring). ``rows_per_second``: at most this many
    citizens read from the store a second (None: as fast as the store answers). Returns figures: rows re-derived (from the store, from the
    index), rows read again afterwards (written on the old day meanwhile), seconds per
    phase, the longest hold of the writers' lock."""
    old = state.as_of_day
    if day == old:
        return {"rows": 0}
    t0 = time.perf_counter()
    spec = state.spec
    variables = [v.name for v in spec.variables]
    bits_of = default_bits(scenarios)
    holds = _Holds(state.lock)
    figures = {"rows": 0, "from_store": 0, "from_index": 0, "records_read": 0, "t0": t0}
    n = state.n_citizens
    # Without the index (never built), or back in time (a clock set back: ``until`` looks
    # forward only), every citizen is read from the store again.
    everyone = state.ageing is None or day < old
    if everyone:
        state.ageing = Ageing.empty()
        dirty, by_index = np.arange(n), np.empty(0, np.int64)
    else:
        until = state.until[:n]
        dirty = np.flatnonzero(until == DIRTY)
        events = np.flatnonzero((until != DIRTY) & (until <= day))
        decaying = state.ageing.rows_with(linear_variables(spec))
        by_index = np.setdiff1d(np.union1d(events, decaying[decaying < n]), dirty)

    def switch() -> None:
        state.meta[AS_OF_DAY] = day  # writes from now on derive on the new day

    # 1-3. the citizens written since the index knew them: read, derive, switch the day, publish
    skipped, still, parts = _reread(state, store, scorer, holds, dirty, day, variables, bits_of, rows_per_second,
                                    figures, "publish", switch)
    t_published = time.perf_counter()
    read = [dirty]
    try:
        # 4. every other citizen whose features change: from the index (no store read). Their
        # entries stay as they are: a record that left its lifetime counts 0 on any later
        # day, and the index drops it at the end (its new entries would be a second copy
        # of most of the index, memory the page cache would give up while writers need it).
        cells = ageing_variables(spec)
        for k in range(0, len(by_index), DERIVE_ROWS):
            rows = by_index[k : k + DERIVE_ROWS]
            d, seen, seen_until = _derive_from_index(state, scorer, rows, day, cells)
            # a row written since the rollover began (DIRTY when read) or since it was read
            # (its position and ``until`` moved) is skipped: the index lacks its new records
            written = _publish(state, holds, d, lambda idx, sel, seen=seen, seen_until=seen_until: (
                state.row_position[idx] == seen[sel]) & (state.until[idx] == seen_until[sel])
                & (seen_until[sel] != DIRTY), "index")[0]
            figures["rows"] += written
            figures["from_index"] += written
            del d
        t_indexed = time.perf_counter()

        # 5. written on the old day meanwhile (DIRTY), or since their read: read again, on the
        # new day. A write from now on derives on the new day, so one round catches every one.
        later = np.union1d(np.setdiff1d(np.flatnonzero(state.until[: state.n_citizens] == DIRTY), still), skipped)
        new = Ageing.concat(parts)
        if len(later):
            again = _reread(state, store, scorer, holds, later, day, variables, bits_of, None, figures, "catch_up")[2]
            read.append(later)
            new = new.replace(later, Ageing.concat(again))  # a row read twice: its second read's
    except BaseException:
        # the rows read from the store were published with their new ``until`` before their
        # entries are in the index: DIRTY again, the next rollover reads them again
        rows = np.concatenate(read)
        with state.lock:
            state.until[rows] = DIRTY
        raise
    # the entries of the rows read from the store, and every record gone for good out
    rows = np.unique(np.concatenate(read))
    state.ageing = state.ageing.replace(rows, new, prune=(spec, day))
    del parts, new
    t_end = time.perf_counter()
    del figures["t0"]
    figures.update({
        "read_rows": int(len(dirty)), "index_rows": int(len(by_index)), "rederived": int(len(later)),
        "read_publish_s": round(t_published - t0, 3), "index_s": round(t_indexed - t_published, 3),
        "catch_up_s": round(t_end - t_indexed, 3),
        "longest_hold_ms": round(1000 * max(holds.longest.values(), default=0.0), 3),
        "longest_hold_ms_by": {k: round(1000 * v, 3) for k, v in holds.longest.items()},
        "lock_holds": holds.count, "ageing_records": len(state.ageing), "ageing_bytes": state.ageing.nbytes,
        "seconds": round(t_end - t0, 3),
    })
    log.info("day rollover to %s: %d of %d citizens re-derived (%s)", day, figures["rows"], n, figures)
    return figures
