"""From a citizen's records to the feature matrix the kernel scores (docs/product.md §3.1).

    >>> import numpy as np
    >>> from kernel.spec import load_spec
    >>> spec = load_spec()
    >>> v = spec.variable_index("traffic_violations")          # minor tier, 90 days, linear
    >>> recs = Records.from_arrays(citizen=[0, 0], variable=[v, v], day=[100, 55], value=[1, 1])
    >>> float(build_features(spec, recs, n_citizens=1, as_of_day=100)[0, v])   # 1 + (1 - 45/90)
    1.5

Each record is weighted by its age in days, ``age = as_of_day - day``:

* negative variables: a record counts while ``age < lifetime_days``; with ``decay = "linear"``
  its weight falls from 1 at age 0 to 0 at the end of its lifetime, with ``"none"`` it counts
  in full until then (the tier's credit-repair lifetime, checked in kernel/spec.py);
* positive variables: a record counts in full while ``age < window_days`` (0: always).

Records that were repaired or withdrawn are not passed in: the store filters them. Weighted
values are then combined per citizen by the variable's ``aggregate`` (count, sum or max).
Everything is vectorised over records; no Python loop per record or citizen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernel.spec import ModelSpec


@dataclass
class Records:
    """Columnar records: one row per record, all arrays the same length."""

    citizen: np.ndarray  # int64: row of the citizen in the population
    variable: np.ndarray  # int16: index of the model variable the record feeds
    day: np.ndarray  # int32: event date, days since 1970-01-01
    value: np.ndarray  # float32: amount (hours, months, ...); 1 for a plain event

    @classmethod
    def from_arrays(cls, citizen, variable, day, value) -> "Records":
        return cls(
            np.asarray(citizen, np.int64), np.asarray(variable, np.int16),
            np.asarray(day, np.int32), np.asarray(value, np.float32),
        )

    @classmethod
    def empty(cls) -> "Records":
        return cls.from_arrays([], [], [], [])

    def __len__(self) -> int:
        return len(self.citizen)

    @staticmethod
    def concat(parts: list["Records"]) -> "Records":
        if not parts:
            return Records.empty()
        return Records(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("citizen", "variable", "day", "value")))


def variable_tables(spec: ModelSpec):
    """Per-variable arrays the record weighting needs."""
    negative = np.array([v.direction == "negative" for v in spec.variables])
    lifetime = np.array([v.lifetime_days if v.direction == "negative" else v.window_days for v in spec.variables], np.float64)
    linear = np.array([v.decay == "linear" for v in spec.variables])
    aggregate = np.array([("count", "sum", "max").index(v.aggregate) for v in spec.variables], np.int8)
    return negative, lifetime, linear, aggregate


def record_weights(spec: ModelSpec, records: Records, as_of_day: int) -> np.ndarray:
    """Weight in [0, 1] of each record on ``as_of_day`` (0: expired, outside the window, or
    not in effect yet). A record dated after ``as_of_day`` counts from its day on: a store may
    hold one (a host clock set back, a source in another zone) and it must never stop a
    whole-population load (:func:`future_records` counts them for the log)."""
    negative, lifetime, linear, _ = variable_tables(spec)
    var = records.variable.astype(np.intp)
    age = (as_of_day - records.day.astype(np.int64)).astype(np.float64)
    life = lifetime[var]
    no_window = ~negative[var] & (life == 0)
    alive = (no_window | (age < life)) & (age >= 0)
    w = np.where(alive, 1.0, 0.0)
    lin = alive & linear[var] & negative[var]
    w[lin] = 1.0 - age[lin] / life[lin]
    return w


def future_records(records: Records, as_of_day: int) -> int:
    """How many records are dated after ``as_of_day`` (they do not count yet)."""
    return int(np.count_nonzero(records.day > as_of_day)) if len(records) else 0


def build_features(
    spec: ModelSpec, records: Records, n_citizens: int, as_of_day: int, dtype=np.float32,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The (n_citizens, n_variables) feature matrix on ``as_of_day``."""
    n_vars = len(spec.variables)
    if len(records) and (records.citizen.min() < 0 or records.citizen.max() >= n_citizens):
        raise ValueError(f"records.citizen: indices must lie in [0, {n_citizens})")
    if len(records) and (records.variable.min() < 0 or records.variable.max() >= n_vars):
        raise ValueError(f"records.variable: indices must lie in [0, {n_vars})")
    if len(records) and not np.isfinite(records.value).all():
        i = int(np.flatnonzero(~np.isfinite(records.value))[0])
        raise ValueError(f"records[{i}].value: {records.value[i]} is not a finite number")
    if len(records) and (records.value < 0).any():
        i = int(np.flatnonzero(records.value < 0)[0])
        raise ValueError(f"records[{i}].value: {records.value[i]} is negative")
    _, _, _, aggregate = variable_tables(spec)
    w = record_weights(spec, records, as_of_day)
    var = records.variable.astype(np.intp)
    agg = aggregate[var]
    contrib = np.where(agg == 0, w, w * records.value.astype(np.float64))
    cell = records.citizen * n_vars + var
    flat = np.zeros(n_citizens * n_vars, np.float64)
    summed = agg != 2
    flat += np.bincount(cell[summed], weights=contrib[summed], minlength=n_citizens * n_vars)
    if (~summed).any():
        np.maximum.at(flat, cell[~summed], contrib[~summed])
    if out is None:
        return flat.reshape(n_citizens, n_vars).astype(dtype)
    out[...] = flat.reshape(n_citizens, n_vars)
    return out
