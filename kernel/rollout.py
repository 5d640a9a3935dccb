"""Comparing two model releases on the same population, before switching from one to the other.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> old = rng.normal(0.0, 1.0, 10_000)
    >>> psi(old, old)
    0.0
    >>> psi(old, old + 1.0) > PSI_MAJOR             # a shift of one sigma is a major shift
    True
    >>> level_migration(np.array([0, 1, 1]), np.array([0, 1, 2]), 3).tolist()
    [[1, 0, 0], [0, 1, 1], [0, 0, 0]]

:func:`compare` turns the raw points, scores and levels of the same adults under the currently
serving release and a candidate (:class:`PopulationScores`, e.g. from
``server.models.score_population``) into a :class:`RolloutReport`: the population stability
index of raw points and of scores, the level migration matrix, and how many people move up
or down a level.

The population stability index (PSI) compares a distribution ``actual`` with a reference
``expected`` over ``bins`` bins whose edges are the quantiles of ``expected`` (deciles by
default, so each bin holds about a tenth of the reference)::

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)

where ``e_i`` and ``a_i`` are the shares of ``expected`` and ``actual`` in bin i (a share of
0 is raised to ``EPSILON`` so the logarithm stays finite). Every term is >= 0, so PSI >= 0,
and it is exactly 0 when both distributions fill the bins alike. The usual reading:
below 0.1 stable, 0.1 to 0.25 some shift (look at it), above 0.25 a major shift.

Pure numpy; the kernel's types only name the levels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from kernel.spec import ModelSpec

if TYPE_CHECKING:
    from kernel.calibration import CalibrationTable

#: Share given to an empty bin in :func:`psi` (a common choice: 0.01 %).
EPSILON = 1e-4
#: Below this PSI a distribution is read as stable.
PSI_STABLE = 0.1
#: Above this PSI a distribution has shifted a lot.
PSI_MAJOR = 0.25


def _finite_vector(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d array, got shape {arr.shape}")
    if len(arr) == 0:
        raise ValueError(f"{name}: empty; PSI needs at least one value on each side")
    bad = np.flatnonzero(~np.isfinite(arr))
    if len(bad):
        raise ValueError(f"{name}[{int(bad[0])}]: not finite ({arr[bad[0]]}); compare scored citizens only")
    return arr


def psi(expected, actual, bins: int = 10) -> float:
    """Population stability index of ``actual`` against ``expected`` (the formula is in the
    module docstring). Bin edges are the quantiles of ``expected``; tied quantiles (discrete
    values such as scores) merge into one bin, and the outer bins are open-ended so every
    value of ``actual`` lands somewhere."""
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins: expected an integer >= 1, got {bins!r}")
    e = _finite_vector(expected, "expected")
    a = _finite_vector(actual, "actual")
    edges = np.unique(np.quantile(e, np.linspace(0.0, 1.0, int(bins) + 1)[1:-1]))
    n_bins = len(edges) + 1
    e_share = np.bincount(np.searchsorted(edges, e, side="right"), minlength=n_bins) / len(e)
    a_share = np.bincount(np.searchsorted(edges, a, side="right"), minlength=n_bins) / len(a)
    e_share = np.maximum(e_share, EPSILON)
    a_share = np.maximum(a_share, EPSILON)
    return float(np.sum((a_share - e_share) * np.log(a_share / e_share)))


def psi_reading(value: float) -> str:
    """The usual reading of a PSI: "stable", "some shift" or "major shift"."""
    if value < PSI_STABLE:
        return "stable"
    return "some shift" if value <= PSI_MAJOR else "major shift"


def level_migration(old_levels, new_levels, n_levels: int | tuple[int, int]) -> np.ndarray:
    """Counts of people by (old level, new level): int64 matrix, rows the old level index,
    columns the new one. ``n_levels`` is the number of levels of both versions, or
    ``(n_old, n_new)`` when their level tables differ. The matrix sums to the number of
    people; it is diagonal when nobody changes level."""
    n_old, n_new = (n_levels, n_levels) if np.isscalar(n_levels) else tuple(n_levels)
    old = np.asarray(old_levels)
    new = np.asarray(new_levels)
    if old.ndim != 1 or new.ndim != 1 or len(old) != len(new):
        raise ValueError(f"old_levels and new_levels: expected two 1-d arrays of one length, got shapes {old.shape} and {new.shape}")
    for arr, name, n in ((old, "old_levels", n_old), (new, "new_levels", n_new)):
        if len(arr) and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name}: expected integer level indices, got dtype {arr.dtype}")
        bad = np.flatnonzero((arr < 0) | (arr >= n))
        if len(bad):
            raise ValueError(f"{name}[{int(bad[0])}]: level {int(arr[bad[0]])} is outside [0, {n}); leave out people with no score")
    flat = old.astype(np.int64) * n_new + new.astype(np.int64)
    return np.bincount(flat, minlength=n_old * n_new).reshape(n_old, n_new)


@dataclass(frozen=True)
class PopulationScores:
    """One release's results for a whole population, in the store's row order."""

    raw: np.ndarray  # float64 (n,) raw points (NaN: no score)
    score: np.ndarray  # int16 (n,) (-1: no score)
    level: np.ndarray  # int8 (n,) index into the spec's levels (-1: no score)
    adult: np.ndarray  # uint8 (n,)
    calibration: CalibrationTable | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        n = len(self.raw)
        for name in ("score", "level", "adult"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name}: {len(getattr(self, name))} rows, but raw has {n}")

    def __len__(self) -> int:
        return len(self.raw)

    @property
    def scored(self) -> np.ndarray:
        """bool (n,): adults with a score."""
        return (self.adult == 1) & (self.score >= 0)


@dataclass
class RolloutReport:
    """What switching from ``old_release`` to ``new_release`` does to the same adults."""

    old_release: str
    new_release: str
    n_adults: int  # adults scored under both releases
    psi_raw: float  # raw points, bins = deciles of the old release's raw points
    psi_score: float  # 0-1000 scores, the same way
    migration: np.ndarray  # int64 (old levels, new levels)
    old_levels: tuple[tuple[str, str], ...]  # (code, zh) of the old spec's levels
    new_levels: tuple[tuple[str, str], ...]
    changed_share: float  # share of the adults whose level changes
    n_up: int  # adults whose level rises
    n_down: int
    mean_score_change: float  # mean of new score - old score
    mean_abs_score_change: float
    bins: int = 10

    @property
    def psi_raw_reading(self) -> str:
        return psi_reading(self.psi_raw)

    @property
    def psi_score_reading(self) -> str:
        return psi_reading(self.psi_score)

    def to_dict(self) -> dict:
        return {
            "old_release": self.old_release,
            "new_release": self.new_release,
            "n_adults": self.n_adults,
            "psi_raw": self.psi_raw,
            "psi_raw_reading": self.psi_raw_reading,
            "psi_score": self.psi_score,
            "psi_score_reading": self.psi_score_reading,
            "bins": self.bins,
            "old_levels": [code for code, _ in self.old_levels],
            "new_levels": [code for code, _ in self.new_levels],
            "migration": self.migration.tolist(),
            "changed_share": self.changed_share,
            "n_up": self.n_up,
            "n_down": self.n_down,
            "mean_score_change": self.mean_score_change,
            "mean_abs_score_change": self.mean_abs_score_change,
        }

    def format(self) -> str:
        """A text report: the figures, then the migration matrix (rows: old level)."""
        lines = [
            f"rollout   {self.old_release}  ->  {self.new_release}",
            f"adults    {self.n_adults:,} scored under both",
            f"PSI raw   {self.psi_raw:.4f}  ({self.psi_raw_reading}; < {PSI_STABLE} stable, > {PSI_MAJOR} major shift)",
            f"PSI score {self.psi_score:.4f}  ({self.psi_score_reading})",
            f"levels    {100 * self.changed_share:.2f} % change level: {self.n_up:,} up, {self.n_down:,} down",
            f"score     mean change {self.mean_score_change:+.2f}, mean |change| {self.mean_abs_score_change:.2f}",
            "",
            "level migration (rows: old level, columns: new level)",
        ]
        header = ["old \\ new"] + [code for code, _ in self.new_levels] + ["total"]
        rows = [header]
        for i, (code, zh) in enumerate(self.old_levels):
            counts = self.migration[i]
            rows.append([f"{code} {zh}"] + [f"{int(c):,}" for c in counts] + [f"{int(counts.sum()):,}"])
        cols = self.migration.sum(axis=0)
        rows.append(["total"] + [f"{int(c):,}" for c in cols] + [f"{int(cols.sum()):,}"])
        widths = [max(_width(r[k]) for r in rows) for k in range(len(header))]
        for r in rows:
            cells = [r[0] + " " * (widths[0] - _width(r[0]))]
            cells += [" " * (w - _width(c)) + c for c, w in zip(r[1:], widths[1:])]
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines)


def _width(text: str) -> int:
    """Display width (CJK characters count double), for aligned columns."""
    return sum(2 if ord(ch) > 0x2E80 else 1 for ch in text)


def _levels(spec: ModelSpec) -> tuple[tuple[str, str], ...]:
    return tuple((lv.code, lv.zh) for lv in spec.levels)


def compare(old: PopulationScores, new: PopulationScores, old_spec: ModelSpec, new_spec: ModelSpec,
            old_release: str = "", new_release: str = "", bins: int = 10) -> RolloutReport:
    """The report of switching from ``old`` to ``new``: both are the results of the same
    people, row for row (the same store read, the same as-of day). Only adults scored under
    both releases are compared. "Up" and "down" compare level indices (levels are ordered
    by their lower bound in every spec)."""
    if len(old) != len(new):
        raise ValueError(f"old and new: {len(old)} and {len(new)} rows; compare the same population, row for row")
    both = old.scored & new.scored
    n = int(both.sum())
    if n == 0:
        raise ValueError("no adult is scored under both releases: nothing to compare")
    o_lv = old.level[both].astype(np.int64)
    n_lv = new.level[both].astype(np.int64)
    migration = level_migration(o_lv, n_lv, (len(old_spec.levels), len(new_spec.levels)))
    old_levels, new_levels = _levels(old_spec), _levels(new_spec)
    if [c for c, _ in old_levels] == [c for c, _ in new_levels]:
        changed = o_lv != n_lv
    else:  # different level tables: a level "changes" when its code does
        o_codes = np.array([c for c, _ in old_levels], dtype=object)[o_lv]
        n_codes = np.array([c for c, _ in new_levels], dtype=object)[n_lv]
        changed = o_codes != n_codes
    delta = new.score[both].astype(np.int64) - old.score[both].astype(np.int64)
    return RolloutReport(
        old_release=old_release,
        new_release=new_release,
        n_adults=n,
        psi_raw=psi(old.raw[both], new.raw[both], bins),
        psi_score=psi(old.score[both], new.score[both], bins),
        migration=migration,
        old_levels=old_levels,
        new_levels=new_levels,
        changed_share=float(changed.mean()),
        n_up=int((n_lv > o_lv).sum()),
        n_down=int((n_lv < o_lv).sum()),
        mean_score_change=float(delta.mean()),
        mean_abs_score_change=float(np.abs(delta).mean()),
        bins=bins,
    )

