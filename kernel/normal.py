"""Φ⁻¹, the inverse standard normal CDF, vectorised in numpy.

    >>> import numpy as np
    >>> float(ndtri(np.array([0.5]))[0])
    0.0

Wichura's algorithm AS 241 (PPND16, Applied Statistics 37(3), 1988), accurate to about
1e-16. The kernel (``kernel/score.pyx``) evaluates the very same polynomials in the same
order, so the reference and the kernel agree to the last bit and round to the same integer
score; scipy's ``ndtri`` is not used for that reason (and to keep scipy out of the
dependencies).
"""

from __future__ import annotations

import numpy as np

# Coefficients of AS 241, highest power first (Horner order used by both implementations).
A = (2509.0809287301226727, 33430.575583588128105, 67265.770927008700853, 45921.953931549871457,
     13731.693765509461125, 1971.5909503065514427, 133.14166789178437745, 3.387132872796366608)
B = (5226.495278852545925, 28729.085735721942674, 39307.89580009271061, 21213.794301586595867,
     5394.1960214247511077, 687.1870074920579083, 42.313330701600911252, 1.0)
C = (7.7454501427834140764e-4, 0.0227238449892691845833, 0.24178072517745061177,
     1.27045825245236838258, 3.64784832476320460504, 5.7694972214606914055,
     4.6303378461565452959, 1.42343711074968357734)
D = (1.05075007164441684324e-9, 5.475938084995344946e-4, 0.0151986665636164571966,
     0.14810397642748007459, 0.68976733498510000455, 1.6763848301838038494,
     2.05319162663775882187, 1.0)
E = (2.01033439929228813265e-7, 2.71155556874348757815e-5, 0.0012426609473880784386,
     0.026532189526576123093, 0.29656057182850489123, 1.7848265399172913358,
     5.4637849111641143699, 6.6579046435011037772)
F = (2.04426310338993978564e-15, 1.4215117583164458887e-7, 1.8463183175100546818e-5,
     7.868691311456132591e-4, 0.0148753612908506148525, 0.13692988092273580531,
     0.59983220655588793769, 1.0)


def _horner(coeffs, r):
    acc = coeffs[0] * r + coeffs[1]
    for c in coeffs[2:-1]:
        acc = acc * r + c
    return acc * r + coeffs[-1]


def ndtri(p: np.ndarray) -> np.ndarray:
    """Φ⁻¹(p) for p strictly inside (0, 1), float64."""
    p = np.asarray(p, dtype=np.float64)
    q = p - 0.5
    out = np.empty_like(p)
    central = np.abs(q) <= 0.425
    if central.any():
        qc = q[central]
        r = 0.180625 - qc * qc
        out[central] = qc * _horner(A, r) / _horner(B, r)
    tail = ~central
    if tail.any():
        qt, pt = q[tail], p[tail]
        r = np.where(qt < 0.0, pt, 1.0 - pt)
        r = np.sqrt(-np.log(r))
        near = r <= 5.0
        val = np.empty_like(r)
        rn = r[near] - 1.6
        val[near] = _horner(C, rn) / _horner(D, rn)
        rf = r[~near] - 5.0
        val[~near] = _horner(E, rf) / _horner(F, rf)
        out[tail] = np.where(qt < 0.0, -val, val)
    return out
