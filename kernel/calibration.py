"""Calibration tables: the frozen map from raw points to percentiles.

    >>> from kernel.spec import load_spec
    >>> spec = load_spec()
    >>> hist = RawHistogram.empty(spec)
    >>> hist.add(np.array([0.0, 1.0, 2.0]))
    >>> table = hist.freeze()
    >>> table.total
    3

The population's raw points go into a fixed histogram over the model's raw range
``[raw_min, raw_max]`` (known from the spec). Counts are integers, so histograms of
partitions add exactly: a distributed re-score builds one per partition and sums them
(:meth:`RawHistogram.merge`), and the frozen table is the same whatever the partitioning.

The percentile of a raw value is its mid-rank, interpolated inside its bin:
``p = (count below the bin + frac * count in the bin) / total``, where ``frac`` is the
value's position in the bin (0.5 for a bin's centre gives the textbook mid-rank). p is then
clipped to ``[0.5/total, 1 - 0.5/total]`` so Φ⁻¹ stays finite. The kernel evaluates exactly
this with one multiply and one truncation per citizen: no search.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernel.spec import ModelSpec

#: Histogram resolution. 16384 bins over the v1 raw range (about 360 raw points) is a bin
#: of 0.02 raw points, finer than any single variable's smallest step.
DEFAULT_BINS = 16384


class CalibrationError(ValueError):
    """A calibration table does not fit the model or its inputs are invalid."""


def bin_position(raw: np.ndarray, raw_min: float, inv_width: float, n_bins: int):
    """Bin index and in-bin fraction of raw values, with exactly the kernel's arithmetic."""
    t = (raw - raw_min) * inv_width
    t = np.clip(t, 0.0, float(n_bins))
    b = np.minimum(t.astype(np.int64), n_bins - 1)
    frac = np.clip(t - b, 0.0, 1.0)
    return b, frac


@dataclass
class RawHistogram:
    """Integer counts of raw points over the model's raw range. Mergeable across partitions."""

    model_version: str
    raw_min: float
    raw_max: float
    counts: np.ndarray  # int64 (n_bins,)

    @classmethod
    def empty(cls, spec: ModelSpec, n_bins: int = DEFAULT_BINS) -> "RawHistogram":
        if n_bins < 2:
            raise CalibrationError(f"n_bins: need at least 2 bins, got {n_bins}")
        c = spec.compiled
        return cls(spec.model_version, c.raw_min, c.raw_max, np.zeros(n_bins, np.int64))

    @property
    def n_bins(self) -> int:
        return len(self.counts)

    @property
    def inv_width(self) -> float:
        return self.n_bins / (self.raw_max - self.raw_min)

    def add(self, raw: np.ndarray) -> None:
        """Count raw points of scored (adult) citizens."""
        raw = np.asarray(raw, dtype=np.float64)
        if raw.ndim != 1:
            raise CalibrationError(f"raw: expected a 1-d array, got shape {raw.shape}")
        if not np.isfinite(raw).all():
            bad = int(np.flatnonzero(~np.isfinite(raw))[0])
            raise CalibrationError(f"raw[{bad}]: not finite ({raw[bad]}); calibrate on scored adults only")
        b, _ = bin_position(raw, self.raw_min, self.inv_width, self.n_bins)
        self.counts += np.bincount(b, minlength=self.n_bins)

    def merge(self, other: "RawHistogram") -> "RawHistogram":
        """Sum of two partitions' histograms (exact: integer counts)."""
        if (other.model_version, other.raw_min, other.raw_max, other.n_bins) != (
            self.model_version, self.raw_min, self.raw_max, self.n_bins,
        ):
            raise CalibrationError(
                f"cannot merge histograms of different models or layouts: "
                f"{self.model_version}/{self.n_bins} bins vs {other.model_version}/{other.n_bins} bins"
            )
        return RawHistogram(self.model_version, self.raw_min, self.raw_max, self.counts + other.counts)

    def freeze(self, created: str | None = None) -> "CalibrationTable":
        total = int(self.counts.sum())
        if total == 0:
            raise CalibrationError("cannot freeze an empty histogram: no scored citizens were added")
        created = created or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        digest = hashlib.sha256(self.model_version.encode() + self.counts.tobytes()).hexdigest()
        return CalibrationTable(
            model_version=self.model_version,
            calibration_version=f"cal-{digest[:12]}",
            created=created,
            raw_min=self.raw_min,
            raw_max=self.raw_max,
            counts=self.counts.copy(),
        )


@dataclass
class CalibrationTable:
    """A frozen, versioned calibration table (what the kernel reads)."""

    model_version: str
    calibration_version: str
    created: str
    raw_min: float
    raw_max: float
    counts: np.ndarray  # int64 (n_bins,)

    def __post_init__(self):
        self.counts = np.ascontiguousarray(self.counts, dtype=np.int64)
        self.counts.setflags(write=False)
        below = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.float64)
        #: counts below each bin, as float64 for the kernel (exact below 2**53)
        self.cum_below = below
        self.bin_counts = self.counts.astype(np.float64)
        for a in (self.cum_below, self.bin_counts):
            a.setflags(write=False)

    @property
    def n_bins(self) -> int:
        return len(self.counts)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def inv_width(self) -> float:
        return self.n_bins / (self.raw_max - self.raw_min)

    @property
    def p_min(self) -> float:
        return 0.5 / self.total

    def check_model(self, spec: ModelSpec) -> None:
        if spec.model_version != self.model_version:
            raise CalibrationError(
                f"calibration {self.calibration_version} was built for model "
                f"{self.model_version}, not {spec.model_version}: recalibrate"
            )

    def percentile(self, raw: np.ndarray) -> np.ndarray:
        """Mid-rank percentile, clipped (the reference of the kernel's lookup)."""
        b, frac = bin_position(np.asarray(raw, np.float64), self.raw_min, self.inv_width, self.n_bins)
        p = (self.cum_below[b] + frac * self.bin_counts[b]) * (1.0 / self.total)
        return np.clip(p, self.p_min, 1.0 - self.p_min)

    # --- persistence ------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        meta = dict(
            model_version=self.model_version,
            calibration_version=self.calibration_version,
            created=self.created,
            raw_min=self.raw_min,
            raw_max=self.raw_max,
        )
        buf = io.BytesIO()
        np.savez(buf, counts=self.counts, meta=np.array(json.dumps(meta)))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, spec: ModelSpec | None = None) -> "CalibrationTable":
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            table = cls(counts=npz["counts"], **meta)
        digest = hashlib.sha256(table.model_version.encode() + table.counts.tobytes()).hexdigest()
        if table.calibration_version != f"cal-{digest[:12]}":
            raise CalibrationError(f"{path}: counts do not match calibration version {table.calibration_version}")
        if spec is not None:
            table.check_model(spec)
        return table


#: The synthetic population a spec's reference calibration is frozen from (its size and seed):
#: ``scripts/gen_reference_calibration.sh`` writes ``<spec>.calibration.npz`` beside the spec.
REFERENCE_CITIZENS, REFERENCE_SEED = 1_000_000, 2018


def reference_path(spec_path: str | Path | None = None) -> Path:
    from kernel.spec import DEFAULT_SPEC_PATH

    spec_path = Path(spec_path) if spec_path is not None else DEFAULT_SPEC_PATH
    return spec_path.with_name(spec_path.stem + ".calibration.npz")


def reference_table(spec: ModelSpec, spec_path: str | Path | None = None) -> CalibrationTable:
    """The model's reference calibration, shipped with its spec: what a server with no
    population to calibrate on (an empty production store) serves until an operator stages
    one frozen from the city (``qjscore model stage``). CalibrationError if the spec has none
    or it was built for another model version."""
    path = reference_path(spec_path)
    if not path.exists():
        raise CalibrationError(
            f"{path}: no reference calibration for model {spec.model_version}, and no adult in the store to calibrate "
            "on: load the population first, or stage a calibration (qjscore model stage SPEC --calibration TABLE)"
        )
    table = CalibrationTable.load(path)
    if table.model_version != spec.model_version:
        raise CalibrationError(
            f"{path}: the reference calibration is for model {table.model_version}, not {spec.model_version}: "
            "regenerate it with scripts/gen_reference_calibration.sh"
        )
    return table
