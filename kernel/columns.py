"""The kernel's outputs: one numpy column per result, one row per citizen.

    >>> cols = ScoreColumns.empty(3)
    >>> cols.score.dtype, cols.reasons.shape
    (dtype('int16'), (3, 4))

The same columns are the serving state: the server keeps one ``ScoreColumns`` for the whole
population, in the compact layout (``ScoreColumns.empty(n, compact=True)``: display-only
results stored narrower, see COMPACT_DTYPES), and the kernel re-scores a row in place when a
record arrives; it writes either layout.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

N_DIMENSIONS = 5
#: At most this many reason codes per citizen (docs/product.md §3.6).
MAX_REASONS = 4

#: ``flags`` bits.
FLAG_HARD_RULE = 1  # an active hard-rule record capped the score
FLAG_NO_SCORE = 2  # not scored: under 18
FLAG_INVALID = 4  # a feature was NaN, infinite or negative: nothing was scored

NO_SCORE = -1  # score and level of a citizen who has none
NO_REASON = -1  # padding in ``reasons``


@dataclass
class ScoreColumns:
    dimension_points: np.ndarray
    """float64 (n, 5): weighted points per dimension; they add up to ``raw``."""
    raw: np.ndarray
    """float64 (n,): the weighted total, dimension_points summed left to right (NaN: no score)."""
    percentile: np.ndarray
    """float64 (n,): mid-rank percentile in the calibration population (NaN: no score)."""
    score: np.ndarray
    """int16 (n,): the 0-1000 score (-1: no score)."""
    level: np.ndarray
    """int8 (n,): index into the spec's levels (-1: no score)."""
    reasons: np.ndarray
    """int16 (n, 4): variable indices, most points lost first (-1: padding)."""
    flags: np.ndarray
    """uint8 (n,): FLAG_* bits."""

    DTYPES = {
        "dimension_points": (np.float64, (N_DIMENSIONS,)),
        "raw": (np.float64, ()),
        "percentile": (np.float64, ()),
        "score": (np.int16, ()),
        "level": (np.int8, ()),
        "reasons": (np.int16, (MAX_REASONS,)),
        "flags": (np.uint8, ()),
    }

    #: The compact layout the serving state keeps (server/state.py): 48 bytes a citizen
    #: instead of 68. The kernel computes exactly as for DTYPES (every step in float64, the
    #: score, level and flags from the float64 raw) and only stores the display-only
    #: results narrower: dimension points and the percentile as float32 (the float64 value
    #: rounded once), reasons as int8 (variable indices < MAX_VARS = 128). ``raw`` stays
    #: float64: calibration tables are frozen from it (kernel/calibration.py bins of 0.02
    #: points, which float32 rounding would cross). So score, level, flags, raw and reasons
    #: are those of DTYPES to the bit (tests/test_kernel_reference.py).
    COMPACT_DTYPES = {
        "dimension_points": (np.float32, (N_DIMENSIONS,)),
        "raw": (np.float64, ()),
        "percentile": (np.float32, ()),
        "score": (np.int16, ()),
        "level": (np.int8, ()),
        "reasons": (np.int8, (MAX_REASONS,)),
        "flags": (np.uint8, ()),
    }

    @classmethod
    def empty(cls, n: int, compact: bool = False) -> "ScoreColumns":
        dtypes = cls.COMPACT_DTYPES if compact else cls.DTYPES
        return cls(**{name: np.empty((n, *shape), dtype) for name, (dtype, shape) in dtypes.items()})

    @property
    def compact(self) -> bool:
        """Whether these columns have the COMPACT_DTYPES layout (told by dimension_points)."""
        return isinstance(self.dimension_points, np.ndarray) and self.dimension_points.dtype == np.float32

    def __len__(self) -> int:
        return len(self.score)

    def check(self, n: int) -> None:
        """Raise if these columns cannot receive ``n`` rows of kernel output (in either
        layout: DTYPES, or COMPACT_DTYPES when dimension_points is float32)."""
        dtypes = self.COMPACT_DTYPES if self.compact else self.DTYPES
        for f in fields(self):
            arr = getattr(self, f.name)
            dtype, shape = dtypes[f.name]
            if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.shape != (n, *shape):
                got = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
                raise ValueError(f"out.{f.name}: expected {np.dtype(dtype)} {(n, *shape)}, got {got}")
            if not arr.flags.c_contiguous or not arr.flags.writeable:
                raise ValueError(f"out.{f.name}: must be C-contiguous and writeable")

    def row(self, i: int) -> dict:
        return {f.name: getattr(self, f.name)[i] for f in fields(self)}

    def take(self, index) -> "ScoreColumns":
        return ScoreColumns(**{f.name: getattr(self, f.name)[index] for f in fields(self)})
