"""The plain-numpy reference of the scoring kernel.

    >>> import numpy as np
    >>> from kernel.spec import load_spec
    >>> spec = load_spec()
    >>> feats = np.zeros((2, len(spec.variables)))
    >>> cols = score_reference(spec, None, feats, np.array([1, 0], np.uint8))
    >>> int(cols.score[1])                      # a minor gets no score
    -1

Written for clarity, vectorised over citizens (a Python loop runs over the model's variables,
never over citizens), and doing every floating-point operation in the kernel's order, so the
kernel (``kernel/score.pyx``) must match it: the same integer scores, levels and reason
codes, and dimension points to the last bit. It is also the honest baseline of
``python -m kernel.bench``.
"""

from __future__ import annotations

import numpy as np

from kernel.calibration import CalibrationTable
from kernel.columns import (
    FLAG_HARD_RULE, FLAG_INVALID, FLAG_NO_SCORE, MAX_REASONS, NO_REASON, NO_SCORE, ScoreColumns,
)
from kernel.normal import ndtri
from kernel.spec import ModelSpec


def variable_points(spec: ModelSpec, features: np.ndarray) -> np.ndarray:
    """Points of every variable for every citizen, float64 (n, V): base plus ramps
    (kernel/spec.py::CompiledSpec), terms added in order."""
    c = spec.compiled
    feats = np.asarray(features, dtype=np.float64)
    points = np.empty(feats.shape, np.float64)
    for v in range(feats.shape[1]):
        f = feats[:, v]
        p = np.full(len(f), c.y0[v])
        for k in range(c.n_terms[v]):
            if c.is_step[v]:
                ramp = np.where(f >= c.term_x[v, k], 1.0, 0.0)
            else:
                ramp = np.minimum(np.maximum((f - c.term_x[v, k]) * c.term_inv_width[v, k], 0.0), 1.0)
            p += c.term_delta[v, k] * ramp
        points[:, v] = p
    return points


def score_reference(
    spec: ModelSpec,
    calibration: CalibrationTable | None,
    features: np.ndarray,
    adult: np.ndarray,
) -> ScoreColumns:
    """Score a batch of citizens. Raises ValueError on a NaN, infinite or negative feature."""
    c = spec.compiled
    features = np.asarray(features)
    n, n_vars = features.shape
    feats = features.astype(np.float64)
    bad = ~((feats >= 0.0) & (feats < np.inf))
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise ValueError(f"features[{row}, {col}] ({spec.variables[col].name}): {feats[row, col]} is not a finite non-negative number")
    adult = np.asarray(adult).astype(bool)
    out = ScoreColumns.empty(n)

    # 1. points per variable, 2. dimension sub-scores (summed in variable order)
    points = variable_points(spec, feats)
    sub = np.zeros((n, len(c.weights)))
    for v in range(n_vars):
        sub[:, c.var_dim[v]] += points[:, v]

    # 3. weighted dimension points and their left-to-right sum
    dims = sub * c.weights[None, :]
    raw = dims[:, 0].copy()
    for d in range(1, dims.shape[1]):
        raw += dims[:, d]
    out.dimension_points[:] = np.where(adult[:, None], dims, 0.0)
    out.raw[:] = np.where(adult, raw, np.nan)

    # 6. reasons: the top 4 variables by weighted points lost, ties to the lower index
    loss = (c.best[None, :] - points) * c.loss_weight[None, :]
    rows = np.arange(n)
    out.reasons[:] = NO_REASON
    for k in range(MAX_REASONS):
        idx = np.argmax(loss, axis=1)
        val = loss[rows, idx]
        out.reasons[:, k] = np.where((val > 0.0) & adult, idx, NO_REASON)
        loss[rows, idx] = -np.inf

    # 5. hard rule: an active serious record with a hard rule
    hard = ((feats > 0.0) & c.hard_rule.astype(bool)[None, :]).any(axis=1)

    # 4. percentile mapping, Φ⁻¹, round half up, clamp; then the cap and the level
    if calibration is None:
        out.percentile[:] = np.nan
        out.score[:] = NO_SCORE
        out.level[:] = NO_SCORE
    else:
        p = calibration.percentile(raw)
        s = spec.mu + spec.sigma * ndtri(p)
        score = np.floor(s + 0.5)
        score = np.minimum(np.maximum(score, spec.scale_min), spec.scale_max)
        score = np.where(hard, np.minimum(score, spec.hard_rule_cap), score).astype(np.int16)
        level = (score[:, None] >= c.level_min[None, :]).sum(axis=1) - 1
        out.percentile[:] = np.where(adult, p, np.nan)
        out.score[:] = np.where(adult, score, NO_SCORE)
        out.level[:] = np.where(adult, level, NO_SCORE)
    out.flags[:] = np.where(adult, np.where(hard, FLAG_HARD_RULE, 0), FLAG_NO_SCORE)
    return out


__all__ = ["score_reference", "variable_points", "FLAG_INVALID"]
