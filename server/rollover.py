"""The day rollover: at the city's midnight records age and expire and people turn 18, and
only the citizens for whom that changes anything are re-derived, without stalling writes or
showing a reader a row from two moments.

    >>> changed = roll_over(state, store, scorer, scenarios, today())   # doctest: +SKIP

1. **Find** (no lock): every active record is read in bulk (server/store.py ``bulk_read``,
   numpy arrays, the start-up load's reader) at one store position ``P``. A citizen changes
   on the new day when one of their records has another weight on it than on the day the
   state holds (a linear decay moves, a record expires or leaves its window, a record dated
   in the future comes into effect: kernel/features.py ``record_weights``), or when they
   turn 18 (``adults``). Everyone else's features, and so their score, are bit for bit what
   they were.
2. **Derive** (no lock): those citizens' features, unpaid-default masks and adult flags on
   the new day, from the records read, exactly as a load derives them (the same records in
   the same order per citizen), and their scores through the kernel, into buffers of their
   own. Readers and writers go on meanwhile; a write applies with the old day.
3. **Publish**, a block of ``PUBLISH_ROWS`` rows at a time under the writers' lock (each hold
   well under a millisecond, so no write waits long): first the state's day becomes the new
   one (a write from then on derives its citizen on it), then each block's rows are copied
   in, inside the rows' sequence locks (server/state.py ``writing``/``read_row``): a reader
   sees a row wholly before or wholly after. A row written since ``P`` is skipped: one
   written before the day changed (derived on the old day) is re-derived from the store
   afterwards, on the new day, through the ordinary path; one written after it already was.

During publication, which lasts as long as copying the changed rows (well under a second
for a million), a citizen not yet published still shows yesterday's values under the new
day's date; every other answer is exact.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from kernel.columns import ScoreColumns
from kernel.features import Records, build_features, record_weights
from kernel.score import Scorer
from server.state import AS_OF_DAY, ServingState, adults, default_bits, default_masks
from server.store import RecordBlock, Store, bulk_read

log = logging.getLogger("qianjiang.rollover")

#: Rows published per hold of the writers' lock.
PUBLISH_ROWS = 4096


def roll_over(state: ServingState, store: Store, scorer: Scorer, scenarios, day: int) -> dict:
    """Move ``state`` to ``day`` (module docstring). Returns figures: rows changed, rows
    re-derived through the write path, seconds per phase, the longest lock hold."""
    old = state.as_of_day
    if day == old:
        return {"rows": 0}
    t0 = time.perf_counter()
    spec = state.spec
    variables = [v.name for v in spec.variables]
    bits_of = default_bits(scenarios)
    with bulk_read(store) as reader:
        position, n = reader.position, reader.n_citizens
        blocks = []
        for part in range(reader.parts):
            blocks += list(reader.records(variables, bits_of, part=part))
    recs = RecordBlock.concat(blocks)
    del blocks
    t_read = time.perf_counter()

    records = Records.from_arrays(recs.citizen_row.astype(np.int64), recs.variable, recs.day, recs.value)
    moved = record_weights(spec, records, day) != record_weights(spec, records, old)
    changed = np.zeros(n, bool)
    changed[records.citizen[moved]] = True
    birth = state.birth_day[:n].copy()
    changed |= adults(birth, day) != adults(birth, old)
    rows = np.flatnonzero(changed)

    # the changed citizens' records, with local row numbers, in their stored order
    local = np.full(n, -1, np.int64)
    local[rows] = np.arange(len(rows))
    keep = local[records.citizen] >= 0
    mine = Records.from_arrays(local[records.citizen[keep]], records.variable[keep], records.day[keep],
                               records.value[keep])
    bits = recs.scenario[keep].astype(np.int64)
    del records, recs, keep
    features = build_features(spec, mine, len(rows), day)
    defaults = default_masks(spec, mine, bits, len(rows), day)
    adult = adults(birth[rows], day)
    columns = ScoreColumns.empty(len(rows))
    scorer.score(features, adult, out=columns, n_threads=1)
    t_derive = time.perf_counter()

    with state.lock:
        t_hold = time.perf_counter()
        state.meta[AS_OF_DAY] = day  # writes from now on derive on the new day
        # rows written since the read derived on the old day: re-derived below, on the new one
        later = np.flatnonzero(state.row_position[: state.n_citizens] > position)
        longest = time.perf_counter() - t_hold
    for lo in range(0, len(rows), PUBLISH_ROWS):
        block = slice(lo, lo + PUBLISH_ROWS)
        with state.lock:
            t_hold = time.perf_counter()
            idx = rows[block]
            fresh = state.row_position[idx] <= position  # else written since the read (on either day)
            idx, sel = idx[fresh], np.flatnonzero(fresh) + lo
            with state.writing(idx):
                state.features[idx] = features[sel]
                state.defaults[idx] = defaults[sel]
                state.adult[idx] = adult[sel]
                for name in ScoreColumns.DTYPES:
                    getattr(state.columns, name)[idx] = getattr(columns, name)[sel]
                state.refresh_gate(idx)
                state.computed_at[idx] = time.time()
            longest = max(longest, time.perf_counter() - t_hold)
    if len(later):
        bound = scorer.bind(state.features, state.adult, state.columns)
        for row in later.tolist():
            snap = state.snapshot(store, row)
            with state.lock:
                state.apply(snap, scenarios, bound)
    t_end = time.perf_counter()
    figures = {"rows": int(len(rows)), "rederived": len(later), "read_s": round(t_read - t0, 3),
               "derive_s": round(t_derive - t_read, 3), "publish_s": round(t_end - t_derive, 3),
               "longest_hold_ms": round(longest * 1000, 3), "seconds": round(t_end - t0, 3)}
    log.info("day rollover to %s: %d of %d citizens changed (%s)", day, len(rows), n, figures)
    return figures
