"""The scoring core: model spec, features, the Cython kernel and its numpy reference,
calibration, and the synthetic city.

Layout:
    spec.py          load and validate the TOML model spec (models/v2.toml by default)
    features.py      records -> per-citizen feature matrix (decay by severity tier)
    score.pyx        the compiled hot path (Scorer, RowScorer); score.pxd, score.pyi
    reference.py     plain-numpy reference the kernel is tested against
    normal.py        Φ⁻¹ (AS 241) shared by both
    calibration.py   raw-points histogram -> frozen calibration table
    columns.py       the kernel's output columns (also the serving state)
    synthetic.py     deterministic synthetic city
    calibrate.py     python -m kernel.calibrate: calibration report (level shares, PNG histogram)
    rollout.py       PSI and level migration between two releases
    bench.py         python -m kernel.bench
"""
