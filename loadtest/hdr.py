"""An HDR-style latency histogram in numpy: fixed log-linear buckets, integer counts.

    >>> h = Histogram()
    >>> h.record(0.002)                                  # seconds
    >>> h.record_many(np.full(99, 0.001))
    >>> h.count, round(h.percentile(50) * 1000, 3), h.summary()["max_ms"]
    (100, 1.004, 2.0)
    >>> other = Histogram.from_dict(h.to_dict())         # e.g. from another process
    >>> h.merge(other).count
    200

Values are kept in integer nanoseconds. Below 256 ns every nanosecond is its own bucket;
above, each power of two ``[2^e, 2^(e+1))`` is cut into 128 equal sub-buckets, so a bucket
is at most 1/128 (0.78 %) of its lower edge wide: from 1 µs to 100 s (and on to ~137 s) a
value is known to better than 0.8 %. That is 3,968 buckets (31 KB of counts), the same
for every histogram, so histograms from several processes merge exactly by adding counts.

``percentile(q)`` answers with the upper edge of the bucket holding the value of rank
``ceil(q/100 · count)`` (capped at the exact maximum, which is never smaller than that
value): it may over-report by < 0.8 %, it never under-reports. Values at or above 2^37 ns
(~137 s) share the last bucket, which answers with the exact maximum.
"""

from __future__ import annotations

import math

import numpy as np

UNIT_S = 1e-9  # a count unit: one nanosecond
SUB_BITS = 7  # 2^7 = 128 sub-buckets per power of two: relative width <= 1/128
_SUB = 1 << SUB_BITS  # 128
_LINEAR = 2 * _SUB  # values 0 .. 255 ns: one bucket per nanosecond
_FIRST_EXP = SUB_BITS + 1  # 8: the first log-linear octave is [256, 512) ns
_LAST_EXP = 36  # the last octave is [2^36, 2^37) ns = [68.7 s, 137.4 s)
N_BUCKETS = _LINEAR + (_LAST_EXP - _FIRST_EXP + 1) * _SUB  # 3968
_MAX_NS = (1 << (_LAST_EXP + 1)) - 1


def _edges() -> tuple[np.ndarray, np.ndarray]:
    """Lower and (exclusive) upper edges of every bucket, in nanoseconds."""
    lower = np.empty(N_BUCKETS, np.int64)
    width = np.empty(N_BUCKETS, np.int64)
    lower[:_LINEAR] = np.arange(_LINEAR)
    width[:_LINEAR] = 1
    k = np.arange(N_BUCKETS - _LINEAR)
    exp = _FIRST_EXP + k // _SUB
    shift = exp - SUB_BITS
    lower[_LINEAR:] = (_SUB + k % _SUB) << shift
    width[_LINEAR:] = np.int64(1) << shift
    return lower, lower + width


LOWER_NS, UPPER_NS = _edges()


def bucket_index(ns: np.ndarray) -> np.ndarray:
    """Bucket of each value (integer nanoseconds >= 0, clipped to the last bucket)."""
    v = np.minimum(np.asarray(ns, np.int64), _MAX_NS)
    # floor(log2 v): exact for integers below 2^53 (frexp gives v = m * 2^e, 0.5 <= m < 1)
    exp = np.frexp(np.maximum(v, 1).astype(np.float64))[1].astype(np.int64) - 1
    shift = np.maximum(exp - SUB_BITS, 0)
    log_linear = _LINEAR + (exp - _FIRST_EXP) * _SUB + ((v >> shift) - _SUB)
    return np.where(v < _LINEAR, v, log_linear)


class Histogram:
    """Latencies in seconds; see the module docstring. Not thread-safe."""

    __slots__ = ("counts", "_count", "_max", "_min")

    def __init__(self) -> None:
        self.counts = np.zeros(N_BUCKETS, np.int64)
        self._count = 0
        self._max = 0.0
        self._min = math.inf

    # --- recording --------------------------------------------------------------------

    def record(self, seconds: float) -> None:
        """Record one latency (negative values count as 0; NaN is refused)."""
        s = float(seconds)
        if s != s:
            raise ValueError("cannot record NaN")
        s = max(s, 0.0)
        ns = min(int(s / UNIT_S), _MAX_NS)
        self.counts[int(bucket_index(np.int64(ns)))] += 1
        self._count += 1
        self._max = max(self._max, s)
        self._min = min(self._min, s)

    def record_many(self, seconds) -> None:
        """Record an array of latencies at once (vectorised)."""
        a = np.asarray(seconds, np.float64).ravel()
        if a.size == 0:
            return
        if np.isnan(a).any():
            raise ValueError("cannot record NaN")
        a = np.maximum(a, 0.0)
        ns = np.minimum(np.floor(a / UNIT_S), _MAX_NS).astype(np.int64)
        self.counts += np.bincount(bucket_index(ns), minlength=N_BUCKETS)
        self._count += int(a.size)
        self._max = max(self._max, float(a.max()))
        self._min = min(self._min, float(a.min()))

    def merge(self, other: "Histogram") -> "Histogram":
        """Add another histogram's counts into this one (exact); returns self."""
        self.counts += other.counts
        self._count += other._count
        self._max = max(self._max, other._max)
        self._min = min(self._min, other._min)
        return self

    # --- reading ----------------------------------------------------------------------

    @property
    def count(self) -> int:
        return self._count

    @property
    def max(self) -> float:
        """The exact largest value recorded, in seconds (0.0 when empty)."""
        return self._max

    @property
    def min(self) -> float:
        """The exact smallest value recorded, in seconds (0.0 when empty)."""
        return self._min if self._count else 0.0

    def percentile(self, q: float) -> float:
        """The value of rank ceil(q/100 · count), in seconds, as its bucket's upper edge
        (never below the true value, at most 0.8 % above it). NaN when empty."""
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile {q} not in [0, 100]")
        if self._count == 0:
            return math.nan
        rank = max(1, math.ceil(round(q / 100.0 * self._count, 9)))
        idx = int(np.searchsorted(np.cumsum(self.counts), rank))
        if idx >= N_BUCKETS - 1:
            return self._max
        return min(float(UPPER_NS[idx]) * UNIT_S, self._max)

    def summary(self) -> dict:
        """count, and p50, p90, p99, p99.9 and max in milliseconds (None when empty)."""
        out: dict = {"count": self._count}
        for name, q in (("p50_ms", 50), ("p90_ms", 90), ("p99_ms", 99), ("p999_ms", 99.9)):
            out[name] = round(self.percentile(q) * 1000, 3) if self._count else None
        out["max_ms"] = round(self._max * 1000, 3) if self._count else None
        return out

    # --- between processes ------------------------------------------------------------

    def to_dict(self) -> dict:
        """A JSON- and pickle-friendly form: the layout, the non-zero buckets, min and max."""
        nz = np.flatnonzero(self.counts)
        return {
            "layout": {"unit_s": UNIT_S, "sub_bits": SUB_BITS, "buckets": N_BUCKETS},
            "index": nz.tolist(),
            "counts": self.counts[nz].tolist(),
            "count": self._count,
            "min": self._min if self._count else None,
            "max": self._max,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Histogram":
        layout = {"unit_s": UNIT_S, "sub_bits": SUB_BITS, "buckets": N_BUCKETS}
        if d.get("layout") != layout:
            raise ValueError(f"histogram layout {d.get('layout')} is not {layout}")
        h = cls()
        h.counts[np.asarray(d["index"], np.int64)] = np.asarray(d["counts"], np.int64)
        h._count = int(h.counts.sum())
        if h._count != d["count"]:
            raise ValueError("histogram counts do not add up to its count")
        h._max = float(d["max"])
        h._min = float(d["min"]) if d["min"] is not None else math.inf
        return h

    def __repr__(self) -> str:
        return f"Histogram(count={self._count}, max={self._max!r})"
