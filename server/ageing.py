"""When each citizen's features next change, and the records that change them: the day
rollover's index (server/rollover.py), so that a rollover reads no record from the store.

A citizen's features, unpaid-default mask and adulthood on a day ``D`` depend on ``D`` only
through their records' weights (kernel/features.py ``record_weights``) and their 18th
birthday. From one day to the next a record's weight changes

* **every day** while a record of a linearly decaying negative variable is alive
  (``0 <= age < lifetime``: its weight falls by ``1 / lifetime`` a day), and
* **once**, on the day a record dated in the future comes into effect and on the day a
  record leaves its lifetime or window (``day + lifetime``),

and never otherwise. Only records of the *ageing* variables (a lifetime, or a window) ever
leave; a record of a variable without a window (residence years, say) counts from its day on
for good.

:class:`Ageing` (the loading process's own, not in the shared mapping: the workers never need
it) holds every record of an ageing variable that is alive or not yet in effect on the
state's day, in the store's order per citizen: about 8 a citizen in the synthetic city (the
other third of the records have expired, or never age). A feature cell's value is the sum (or
maximum) of its records' contributions in the store's order; records no longer alive
contribute 0.0, which leaves a sum of non-negative terms unchanged to the bit. So a citizen's
ageing cells, default mask (only negative records, all ageing, make defaults), adulthood and
``until`` on any later day are derived from the index exactly as a whole load derives them
from the store, and every other cell stays what it is.

``until`` (a column of the serving state, server/state.py): per citizen, the first day after
the state's day on which a *once* change happens to one of their records or they turn 18
(uint16 days since 1970; :data:`NEVER` for none), or :data:`DIRTY` (0): the index does not
know this citizen's records. Every write re-derives its citizen and sets ``DIRTY``
(``ServingState.apply``), and so does a record of a variable without a window dated in the
future (its cell needs the citizen's other records of it, which the index does not keep):
such a citizen is read from the store at the next rollover, which makes its entries and its
``until`` true again. The index is built by every whole load (``ServingState.fill``) and
written in the snapshot beside the state (server/snapshot.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from kernel.features import Records, variable_tables
from kernel.spec import ModelSpec

#: ``until`` of a citizen with no change ahead (and the cap of a day that far out: 2149).
NEVER = np.iinfo(np.uint16).max
#: ``until`` of a citizen whose records the index does not know (written since it was made).
DIRTY = 0


def ageing_variables(spec: ModelSpec) -> np.ndarray:
    """Indices of the variables whose records age out (a lifetime, or a window)."""
    negative, life, _, _ = variable_tables(spec)
    return np.flatnonzero(life > 0)


def linear_variables(spec: ModelSpec) -> np.ndarray:
    """Indices of the variables whose records decay linearly (weight changes every day)."""
    negative, life, linear, _ = variable_tables(spec)
    return np.flatnonzero(negative & linear & (life > 0))


def record_events(spec: ModelSpec, records: Records, as_of_day: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each record on ``as_of_day``: the first later day on which it comes into effect
    or leaves its lifetime or window (int64, :data:`NEVER` for none); whether the index
    keeps it (an ageing variable's, alive or not in effect yet); whether its citizen needs
    the store instead (a record of a variable without a window dated in the future, or one
    the index cannot date). Exactly record_weights' rules, in whole days."""
    negative, life, _, _ = variable_tables(spec)
    var = records.variable.astype(np.intp)
    day = records.day.astype(np.int64)
    life_v = life[var]
    no_window = ~negative[var] & (life_v == 0)
    ageing = life_v > 0
    span = np.ceil(life_v).astype(np.int64)  # age < life  <=>  age < ceil(life), for whole days
    future = day > as_of_day
    alive = ~future & ageing & (as_of_day - day < span)
    events = np.full(len(day), NEVER, np.int64)
    starts = future & (ageing | no_window)
    events[starts] = day[starts]
    events[alive] = day[alive] + span[alive]
    keep = ageing & (future | alive)
    undated = keep & ((day < 0) | (day >= NEVER))
    needs_store = (future & no_window) | undated
    return np.minimum(events, NEVER), keep & ~undated, needs_store


def adult_day(birth_day: np.ndarray) -> np.ndarray:
    """The day (days since 1970) a person born on ``birth_day`` turns 18, as
    server/state.py ``adults`` counts it (someone born on 29 February on 1 March of a year
    without one)."""
    birth = np.asarray(birth_day, np.int64).astype("datetime64[D]")
    month = birth.astype("datetime64[M]")
    day_of_month = (birth - month.astype("datetime64[D]")).astype(np.int64)
    return ((month + 18 * 12).astype("datetime64[D]") + day_of_month).astype(np.int64)


def until_of(spec: ModelSpec, records: Records, n: int, as_of_day: int, birth_day: np.ndarray,
             adult: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``until`` of ``n`` citizens (records.citizen: 0..n-1) on ``as_of_day`` (uint16, module
    docstring), and which records the index keeps (:func:`record_events`)."""
    events, keep, needs_store = record_events(spec, records, as_of_day)
    until = np.full(n, NEVER, np.int64)
    if len(events):
        np.minimum.at(until, records.citizen, events)
    minors = np.flatnonzero(np.asarray(adult) == 0)
    if len(minors):
        until[minors] = np.minimum(until[minors], adult_day(birth_day[minors]))
    until = np.clip(until, as_of_day + 1, NEVER)
    until[records.citizen[needs_store]] = DIRTY
    return until.astype(np.uint16), keep


@dataclass
class Ageing:
    """The ageing records of the whole population (module docstring), sorted by citizen
    row, in the store's order within a citizen: 12 bytes each."""

    row: np.ndarray  # int32
    variable: np.ndarray  # int8: the variable's index in the spec (at most 128)
    day: np.ndarray  # uint16: days since 1970
    value: np.ndarray  # float32
    bit: np.ndarray  # int8: the pay-later scenario's default bit (-1: none)

    DTYPES = {"row": np.int32, "variable": np.int8, "day": np.uint16, "value": np.float32, "bit": np.int8}

    @classmethod
    def empty(cls) -> Ageing:
        return cls(*(np.empty(0, dtype) for dtype in cls.DTYPES.values()))

    @classmethod
    def of(cls, rows: np.ndarray, records: Records, bits: np.ndarray, keep: np.ndarray) -> Ageing:
        """The records ``keep`` selects (``rows``: each record's citizen row; ``bits``: each
        one's default bit), sorted stably by row: each citizen's in the order given."""
        rows = np.asarray(rows)[keep]
        order = np.argsort(rows, kind="stable")
        return cls(rows[order].astype(np.int32), records.variable[keep][order].astype(np.int8),
                   records.day[keep][order].astype(np.uint16), records.value[keep][order].astype(np.float32),
                   np.asarray(bits)[keep][order].astype(np.int8))

    @classmethod
    def concat(cls, parts: list[Ageing]) -> Ageing:
        """Parts of disjoint citizens, each sorted: one index sorted by row. Parts in row
        order (a load's chunks) are joined a column at a time, each part's column freed as
        it is copied (memory: the index and one column more, not twice the index); others
        are merged."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        if any(a.row[-1] >= b.row[0] for a, b in zip(parts, parts[1:])):
            whole = parts[0]
            for part in parts[1:]:
                whole = whole._merge(part)
            return whole
        columns = {}
        for f in fields(cls):
            columns[f.name] = np.concatenate([getattr(p, f.name) for p in parts])
            for p in parts:
                setattr(p, f.name, None)
        parts.clear()
        return cls(**columns)

    def _merge(self, other: Ageing) -> Ageing:
        """Both sorted, of disjoint citizens: one sorted index, in one pass (no sort)."""
        if not len(other):
            return self
        if not len(self) or self.row[-1] < other.row[0]:
            return Ageing(*(np.concatenate([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)))
        at = np.searchsorted(self.row, other.row, "left") + np.arange(len(other))  # places in the merged index
        mine = np.ones(len(self) + len(other), bool)
        mine[at] = False
        out = []
        for f in fields(self):
            merged = np.empty(len(mine), getattr(self, f.name).dtype)
            merged[mine] = getattr(self, f.name)
            merged[at] = getattr(other, f.name)
            out.append(merged)
        return Ageing(*out)

    def __len__(self) -> int:
        return len(self.row)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))

    def rows_with(self, variables: np.ndarray) -> np.ndarray:
        """The citizens with a record of one of ``variables`` (ascending, int64)."""
        pick = np.isin(self.variable, np.asarray(variables, np.int8))
        return np.unique(self.row[pick]).astype(np.int64)

    def records_of(self, rows: np.ndarray) -> tuple[Records, np.ndarray]:
        """The records of citizen ``rows`` (ascending), with ``citizen`` the index in
        ``rows`` (0..len(rows)-1), in the index's order; and their default bits."""
        rows = np.asarray(rows, np.int64)
        lo = np.searchsorted(self.row, rows, "left")
        hi = np.searchsorted(self.row, rows, "right")
        counts = hi - lo
        total = int(counts.sum())
        local = np.repeat(np.arange(len(rows)), counts)
        # positions lo[i] .. hi[i] - 1 of every citizen, back to back
        idx = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(lo, counts)
        records = Records(local.astype(np.int64), self.variable[idx].astype(np.int16), self.day[idx].astype(np.int32),
                          self.value[idx])
        return records, self.bit[idx].astype(np.int64)

    def replace(self, rows: np.ndarray, new: Ageing, prune: tuple[ModelSpec, int] | None = None) -> Ageing:
        """This index with the records of citizen ``rows`` (ascending) replaced by ``new``'s
        (which holds only citizens of ``rows``); with ``prune`` (spec, day), without the
        records that left their lifetime or window by that day (they count 0 from then on).
        In place, a column at a time (beside the index, memory for one column more and the
        merged one, not a second index)."""
        rows = np.asarray(rows, np.int64)
        keep = np.ones(len(self.row), bool)
        if len(rows) and len(self.row):
            for lo in range(0, len(self.row), 1 << 24):  # bounded temporaries
                part = slice(lo, lo + (1 << 24))
                at = np.minimum(np.searchsorted(rows, self.row[part]), len(rows) - 1)
                keep[part] &= rows[at] != self.row[part]
        if prune is not None and len(self.row):
            spec, day = prune
            _, life, _, _ = variable_tables(spec)
            span = np.ceil(life).astype(np.int32)
            for lo in range(0, len(self.row), 1 << 24):
                part = slice(lo, lo + (1 << 24))
                keep[part] &= (self.day[part].astype(np.int32) + span[self.variable[part].astype(np.intp)]) > day
        if keep.all() and not len(new):
            return self
        kept_rows = self.row[keep]
        at = np.searchsorted(kept_rows, new.row, "left") + np.arange(len(new))  # new's places in the result
        del kept_rows
        mine = np.ones(int(keep.sum()) + len(new), bool)
        mine[at] = False
        for f in sorted(fields(self), key=lambda f: f.name == "row"):  # the row column last
            merged = np.empty(len(mine), getattr(self, f.name).dtype)
            merged[mine] = getattr(self, f.name)[keep]
            merged[at] = getattr(new, f.name)
            setattr(self, f.name, merged)  # the old column goes now
        return self

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
