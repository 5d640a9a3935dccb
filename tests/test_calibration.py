"""Calibration tables: mergeable histograms, mid-rank percentiles, persistence, and the
distribution the seed asks for."""

from __future__ import annotations

import numpy as np
import pytest

from kernel.calibrate import calibrate, plot, report
from kernel.calibration import CalibrationError, CalibrationTable, RawHistogram
from kernel.score import Scorer
from kernel.synthetic import generate_features


def test_partition_histograms_add_up_to_the_whole(spec, city):
    people, features = city
    raw = Scorer(spec).score(features, people.adult).raw[people.adult == 1]
    whole = RawHistogram.empty(spec)
    whole.add(raw)
    parts = [RawHistogram.empty(spec) for _ in range(3)]
    for part, chunk in zip(parts, np.array_split(raw, 3)):
        part.add(chunk)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert merged.freeze().calibration_version == whole.freeze().calibration_version


def test_merge_refuses_another_layout(spec):
    with pytest.raises(CalibrationError, match="cannot merge"):
        RawHistogram.empty(spec).merge(RawHistogram.empty(spec, n_bins=128))


def test_percentile_is_the_mid_rank_and_monotone(spec):
    hist = RawHistogram.empty(spec, n_bins=64)
    width = (hist.raw_max - hist.raw_min) / 64
    centres = hist.raw_min + width * (np.arange(64) + 0.5)
    hist.add(np.repeat(centres[10], 30))
    hist.add(np.repeat(centres[20], 10))
    table = hist.freeze()
    p = table.percentile(np.array([centres[10], centres[20], hist.raw_min, hist.raw_max]))
    np.testing.assert_allclose(p[:2], [15 / 40, 35 / 40])  # (below + half the bin) / total
    assert p[2] == table.p_min and p[3] == 1 - table.p_min  # clipped away from 0 and 1
    grid = np.linspace(hist.raw_min - 5, hist.raw_max + 5, 10_001)
    assert (np.diff(table.percentile(grid)) >= 0).all()


def test_save_and_load_keep_the_versions(spec, calibration, tmp_path):
    path = calibration.save(tmp_path / "cal.npz")
    loaded = CalibrationTable.load(path, spec)
    assert loaded.calibration_version == calibration.calibration_version
    assert loaded.model_version == spec.model_version
    np.testing.assert_array_equal(loaded.counts, calibration.counts)


def test_a_tampered_table_is_refused(spec, calibration, tmp_path):
    path = tmp_path / "cal.npz"
    counts = calibration.counts.copy()
    counts[100] += 1
    CalibrationTable(
        calibration.model_version, calibration.calibration_version, calibration.created,
        calibration.raw_min, calibration.raw_max, counts,
    ).save(path)
    with pytest.raises(CalibrationError, match="counts do not match calibration version"):
        CalibrationTable.load(path, spec)


@pytest.mark.slow
def test_a_calibrated_city_meets_the_seed_bands(spec, tmp_path):
    """The must-show figures on a 200,000-person city (the 1,000,000 run is
    `python -m kernel.calibrate`): mean 640-680, 1-4 % below 550, 2-8 % at 750 or above,
    600-749 holding at least 70 % of adults with no negative record."""
    people, features = generate_features(spec, 200_000, seed=2018)
    table = calibrate(spec, features, people.adult)
    cols = Scorer(spec, table).score(features, people.adult, n_threads=2)
    rep = report(spec, table, cols, features, people.adult)
    assert 640 <= rep.mean <= 680
    assert 0.01 <= rep.share_below_550 <= 0.04
    assert 0.02 <= rep.share_at_or_above_750 <= 0.08
    assert rep.clean_share_600_750 >= 0.70
    assert 0 < rep.hard_rule_share < 0.01
    png = plot(spec, cols.score[people.adult == 1], tmp_path / "scores.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
