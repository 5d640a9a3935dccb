# Design of the scoring kernel
# ----------------------------
# Pure C, `noexcept nogil`: `score_block` scores up to BLOCK (32) citizens in one fused pass
# (docs/product.md §3, steps 2-6). The block's features are transposed into a
# variables x citizens buffer so that every step below is a loop over citizens with the
# same coefficients, which the C compiler vectorises:
#     points per variable (base + monotone ramps, kernel/spec.py::CompiledSpec), the five
#     dimension sub-scores, weighted dimension points, raw = their left-to-right sum, the
#     hard-rule flag, points lost per variable, the top 4 reasons (four argmax passes);
#     then per citizen: the percentile through the calibration table (O(1): one multiply
#     and a truncation, `percentile`), Φ⁻¹ (AS 241, `ndtri`), round half up, clamp, cap,
#     level.
# Loops: `score_rows` runs the blocks with `prange` (static schedule, `n_threads`), the GIL
#     released; `RowScorer.rescore` runs one block of one row of the serving state in place,
#     with pointers bound once, so re-scoring a citizen costs well under a microsecond.
# Python: `Scorer` turns a validated ModelSpec and CalibrationTable (kernel/spec.py,
#     kernel/calibration.py) into the flat C `Model` struct (kernel/score.pxd); its `def`
#     methods check shapes and dtypes once, allocate outputs when the caller gave none, and
#     raise on bad rows.
#
# Features are validated inside the pass (finite and >= 0) while they are transposed: a
# separate `isfinite` pass would read the whole matrix a second time. A bad row is marked
# FLAG_INVALID with no score and the wrapper raises naming the first one, so a wrong score is
# never returned. Every floating-point operation follows kernel/reference.py in order, and
# the build turns off FMA contraction (-ffp-contract=off), so both agree to the last bit.

from cython.parallel cimport prange
from libc.math cimport NAN, floor, log, sqrt
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy

import numpy as np

from kernel import columns as _columns
from kernel.columns import N_DIMENSIONS, ScoreColumns

# The C flags and sizes in score.pxd must be the Python ones (checked at import).
assert (FLAG_HARD_RULE, FLAG_NO_SCORE, FLAG_INVALID, N_REASONS) == (
    _columns.FLAG_HARD_RULE, _columns.FLAG_NO_SCORE, _columns.FLAG_INVALID, _columns.MAX_REASONS
), "kernel/score.pxd and kernel/columns.py disagree on flags or sizes"

# --- formulas -------------------------------------------------------------------------

cdef inline double horner8(const double* c, double r) noexcept nogil:
    # c[0] is the highest power, as in kernel/normal.py::_horner
    cdef double acc = c[0] * r + c[1]
    cdef int k
    for k in range(2, 7):
        acc = acc * r + c[k]
    return acc * r + c[7]


cdef double AS241_A[8]
cdef double AS241_B[8]
cdef double AS241_C[8]
cdef double AS241_D[8]
cdef double AS241_E[8]
cdef double AS241_F[8]


def _load_coefficients():
    from kernel import normal
    for k in range(8):
        AS241_A[k] = normal.A[k]
        AS241_B[k] = normal.B[k]
        AS241_C[k] = normal.C[k]
        AS241_D[k] = normal.D[k]
        AS241_E[k] = normal.E[k]
        AS241_F[k] = normal.F[k]


_load_coefficients()


cdef inline double ndtri(double p) noexcept nogil:
    """Φ⁻¹(p), Wichura AS 241, for p strictly inside (0, 1)."""
    cdef double q = p - 0.5
    cdef double r, val
    if (q if q >= 0.0 else -q) <= 0.425:
        r = 0.180625 - q * q
        return q * horner8(AS241_A, r) / horner8(AS241_B, r)
    r = p if q < 0.0 else 1.0 - p
    r = sqrt(-log(r))
    if r <= 5.0:
        r = r - 1.6
        val = horner8(AS241_C, r) / horner8(AS241_D, r)
    else:
        r = r - 5.0
        val = horner8(AS241_E, r) / horner8(AS241_F, r)
    return -val if q < 0.0 else val


cdef inline bint is_invalid(feature_t x) noexcept nogil:
    """x is NaN, infinite or negative (-0.0 is fine), judged on its IEEE-754 bits: with the
    sign bit set or the exponent all ones, the top bits reach the all-ones exponent."""
    cdef uint64_t b64
    cdef uint32_t b32
    if feature_t is float:
        memcpy(&b32, &x, sizeof(float))
        return ((b32 >> 23) >= 0xFF) & (b32 != 0x80000000U)
    else:
        memcpy(&b64, &x, sizeof(double))
        return ((b64 >> 52) >= 0x7FF) & (b64 != 0x8000000000000000ULL)


cdef inline double percentile(const Model* m, double raw) noexcept nogil:
    """Mid-rank percentile interpolated in its histogram bin (kernel/calibration.py)."""
    cdef double t = (raw - m.raw_min) * m.inv_width
    if t < 0.0:
        t = 0.0
    if t > m.n_bins:
        t = m.n_bins
    cdef int b = <int>t
    if b > m.n_bins - 1:
        b = m.n_bins - 1
    cdef double frac = t - b
    if frac < 0.0:
        frac = 0.0
    if frac > 1.0:
        frac = 1.0
    cdef double p = (m.cum_below[b] + frac * m.bin_counts[b]) * m.inv_total
    if p < m.p_min:
        p = m.p_min
    if p > m.p_max:
        p = m.p_max
    return p


cdef inline int level_of(const Model* m, double score) noexcept nogil:
    cdef int k, level = -1
    for k in range(m.n_levels):
        level += score >= m.level_min[k]
    return level


# --- one block of citizens -----------------------------------------------------------

cdef Py_ssize_t score_block(
    const Model* m,
    const feature_t* features,      # IN  (n, n_vars) row-major
    const unsigned char* adult,     # IN  (n,)
    Py_ssize_t n,                   # 1 <= n <= BLOCK
    double* dimension_points,       # OUT (n, n_dims)
    double* raw_out,                # OUT (n,)
    double* percentile_out,         # OUT (n,)
    short* score_out,               # OUT (n,)
    signed char* level_out,         # OUT (n,)
    short* reasons,                 # OUT (n, N_REASONS)
    unsigned char* flags_out,       # OUT (n,)
) noexcept nogil:
    """Score n citizens; returns how many had an invalid feature (they get no score)."""
    cdef double buf[MAX_VARS * BLOCK]   # features, then points lost, variable-major
    cdef double sub[MAX_DIMS * BLOCK]
    cdef double acc[BLOCK]
    cdef double top[BLOCK]
    cdef double top_var[BLOCK]  # a variable index, as double so the argmax pass vectorises
    cdef unsigned char ok[BLOCK]
    cdef unsigned char hard[BLOCK]
    cdef Py_ssize_t i, n_invalid = 0
    cdef int v, k, d, nv = m.n_vars, nd = m.n_dims
    cdef double c, t, tv, r, y0, xk, ik, dk, best, lw, s, p, vd
    cdef feature_t f
    cdef bint gt, bad
    cdef double* col
    cdef const double* tx
    cdef const double* tw
    cdef const double* td

    # transpose the block to variable-major and validate each feature on its bits: the build
    # lets the compiler assume finite maths (so the clamps below vectorise), so NaN and
    # infinity cannot be caught by float comparisons here.
    for i in range(n):
        bad = 0
        for v in range(nv):
            f = features[i * nv + v]
            bad |= is_invalid(f)
            buf[v * BLOCK + i] = <double>f
        ok[i] = not bad
        hard[i] = 0
    for k in range(m.n_hard):
        col = buf + m.hard_vars[k] * BLOCK
        for i in range(n):
            c = col[i]
            hard[i] |= c > 0.0
    for d in range(nd):
        for i in range(n):
            sub[d * BLOCK + i] = 0.0

    # points per variable -> dimension sub-scores; the column then holds points lost
    for v in range(nv):
        col = buf + v * BLOCK
        y0 = m.y0[v]
        for i in range(n):
            acc[i] = y0
        tx = m.term_x + v * MAX_TERMS
        tw = m.term_inv_width + v * MAX_TERMS
        td = m.term_delta + v * MAX_TERMS
        if m.is_step[v]:
            for k in range(m.n_terms[v]):
                xk = tx[k]
                dk = td[k]
                for i in range(n):
                    c = col[i]
                    r = 1.0 if c >= xk else 0.0
                    acc[i] = acc[i] + dk * r
        else:
            for k in range(m.n_terms[v]):
                xk = tx[k]
                ik = tw[k]
                dk = td[k]
                for i in range(n):
                    r = (col[i] - xk) * ik
                    r = r if r > 0.0 else 0.0
                    r = r if r < 1.0 else 1.0
                    acc[i] = acc[i] + dk * r
        d = m.var_dim[v]
        best = m.best[v]
        lw = m.loss_weight[v]
        for i in range(n):
            sub[d * BLOCK + i] = sub[d * BLOCK + i] + acc[i]
            col[i] = (best - acc[i]) * lw

    # weighted dimension points and raw, summed left to right
    for i in range(n):
        s = 0.0
        for d in range(nd):
            p = sub[d * BLOCK + i] * m.weights[d]
            dimension_points[i * nd + d] = p
            s = p if d == 0 else s + p
        raw_out[i] = s

    # reasons: N_REASONS argmax passes over points lost; strict '>' keeps the lower index
    # on ties (as np.argmax), and a start at 0 admits only a strictly positive loss
    for k in range(N_REASONS):
        for i in range(n):
            top[i] = 0.0
            top_var[i] = -1.0
        for v in range(nv):
            col = buf + v * BLOCK
            vd = v
            for i in range(n):
                c = col[i]
                t = top[i]
                tv = top_var[i]
                gt = c > t
                top[i] = c if gt else t
                top_var[i] = vd if gt else tv
        for i in range(n):
            reasons[i * N_REASONS + k] = <short>top_var[i]
            if top_var[i] >= 0.0:
                buf[<int>top_var[i] * BLOCK + i] = -1.0  # taken: below any candidate

    # per citizen: percentile, Φ⁻¹, round half up, clamp, cap, level
    for i in range(n):
        if not ok[i] or not adult[i]:
            n_invalid += not ok[i]
            for d in range(nd):
                dimension_points[i * nd + d] = 0.0
            raw_out[i] = NAN
            percentile_out[i] = NAN
            score_out[i] = -1
            level_out[i] = -1
            for k in range(N_REASONS):
                reasons[i * N_REASONS + k] = -1
            flags_out[i] = FLAG_NO_SCORE if ok[i] else FLAG_INVALID
            continue
        flags_out[i] = FLAG_HARD_RULE if hard[i] else 0
        if not m.calibrated:
            percentile_out[i] = NAN
            score_out[i] = -1
            level_out[i] = -1
            continue
        p = percentile(m, raw_out[i])
        percentile_out[i] = p
        s = floor(m.mu + m.sigma * ndtri(p) + 0.5)
        if s < m.scale_min:
            s = m.scale_min
        if s > m.scale_max:
            s = m.scale_max
        if hard[i] and s > m.cap:
            s = m.cap
        score_out[i] = <short>s
        level_out[i] = <signed char>level_of(m, s)
    return n_invalid


# --- batch loop -----------------------------------------------------------------------

cdef struct Out:
    # Pointers to the first row of each output column (kernel/columns.py::ScoreColumns), in
    # one of its two layouts: DTYPES (compact == 0: dims, pct, reasons) or COMPACT_DTYPES
    # (compact == 1: dims32, pct32, reasons8). raw, score, level and flags are the same in both.
    bint compact
    double* dims
    double* raw
    double* pct
    short* score
    signed char* level
    short* reasons
    unsigned char* flags
    float* dims32
    float* pct32
    signed char* reasons8


cdef Out out_pointers(out) except *:
    """Pointers into a checked ScoreColumns; valid while ``out``'s arrays live."""
    cdef double[::1] raw = out.raw
    cdef short[::1] score = out.score
    cdef signed char[::1] level = out.level
    cdef unsigned char[::1] flags = out.flags
    cdef double[:, ::1] dims
    cdef double[::1] pct
    cdef short[:, ::1] reasons
    cdef float[:, ::1] dims32
    cdef float[::1] pct32
    cdef signed char[:, ::1] reasons8
    cdef Out o
    o.dims, o.pct, o.reasons, o.dims32, o.pct32, o.reasons8 = NULL, NULL, NULL, NULL, NULL, NULL
    o.compact = out.compact
    if o.compact:
        dims32, pct32, reasons8 = out.dimension_points, out.percentile, out.reasons
        o.dims32, o.pct32, o.reasons8 = &dims32[0, 0], &pct32[0], &reasons8[0, 0]
    else:
        dims, pct, reasons = out.dimension_points, out.percentile, out.reasons
        o.dims, o.pct, o.reasons = &dims[0, 0], &pct[0], &reasons[0, 0]
    o.raw, o.score, o.level, o.flags = &raw[0], &score[0], &level[0], &flags[0]
    return o


cdef inline Py_ssize_t score_at(const Model* m, const feature_t* features, const unsigned char* adult,
                                Py_ssize_t first, Py_ssize_t n, const Out* o) noexcept nogil:
    """score_block for rows first..first+n-1 of whole-population arrays. The compact layout:
    the block is scored exactly as for the wide one, into buffers of its own, and only the
    display-only results (dimension points, percentile, reasons) are narrowed on the way out;
    raw, score, level and flags go straight to the columns."""
    cdef double dims[MAX_DIMS * BLOCK]
    cdef double pct[BLOCK]
    cdef short reasons[N_REASONS * BLOCK]
    cdef Py_ssize_t i, n_invalid
    cdef int nd = m.n_dims
    if not o.compact:
        return score_block(
            m, features + first * m.n_vars, adult + first, n, o.dims + first * nd, o.raw + first,
            o.pct + first, o.score + first, o.level + first, o.reasons + first * N_REASONS, o.flags + first,
        )
    n_invalid = score_block(
        m, features + first * m.n_vars, adult + first, n, dims, o.raw + first,
        pct, o.score + first, o.level + first, reasons, o.flags + first,
    )
    for i in range(n * nd):
        o.dims32[first * nd + i] = <float>dims[i]
    for i in range(n):
        o.pct32[first + i] = <float>pct[i]
    for i in range(n * N_REASONS):
        o.reasons8[first * N_REASONS + i] = <signed char>reasons[i]
    return n_invalid


cdef Py_ssize_t score_rows(
    const Model* m,
    const feature_t* features,      # IN  (n, n_vars)
    const unsigned char* adult,     # IN  (n,)
    Py_ssize_t n,
    const Out* o,                   # OUT (n rows)
    int n_threads,
) noexcept nogil:
    cdef Py_ssize_t b, n_invalid = 0
    cdef Py_ssize_t n_blocks = (n + BLOCK - 1) // BLOCK
    for b in prange(n_blocks, schedule="static", num_threads=n_threads):
        n_invalid += score_at(m, features, adult, b * BLOCK, min(<Py_ssize_t>BLOCK, n - b * BLOCK), o)
    return n_invalid


# --- Python boundary ------------------------------------------------------------------

cdef class Scorer:
    """A compiled model (and optionally its calibration), ready to score.

        >>> import numpy as np
        >>> from kernel.spec import load_spec
        >>> spec = load_spec()
        >>> scorer = Scorer(spec)                    # uncalibrated: raw points only
        >>> cols = scorer.score(np.zeros((3, len(spec.variables)), np.float32), np.ones(3, np.uint8))
        >>> cols.raw.shape
        (3,)
    """

    cdef Model m
    cdef readonly object spec
    cdef readonly object calibration
    cdef list _keep  # the arrays behind the Model's pointers

    def __cinit__(self, spec, calibration=None):
        c = spec.compiled
        if len(c.weights) > MAX_DIMS or len(c.weights) != N_DIMENSIONS:
            raise ValueError(f"spec: the kernel scores {N_DIMENSIONS} dimensions, got {len(c.weights)}")
        if calibration is not None:
            calibration.check_model(spec)
        self.spec = spec
        self.calibration = calibration
        self._keep = []
        cdef const double[::1] y0 = self._own(c.y0, np.float64)
        cdef const int[::1] n_terms = self._own(c.n_terms, np.int32)
        cdef const unsigned char[::1] is_step = self._own(c.is_step, np.uint8)
        cdef const double[:, ::1] term_x = self._own(c.term_x, np.float64)
        cdef const double[:, ::1] term_inv_width = self._own(c.term_inv_width, np.float64)
        cdef const double[:, ::1] term_delta = self._own(c.term_delta, np.float64)
        cdef const int[::1] var_dim = self._own(c.var_dim, np.int32)
        cdef const double[::1] best = self._own(c.best, np.float64)
        cdef const double[::1] loss_weight = self._own(c.loss_weight, np.float64)
        cdef const unsigned char[::1] hard_rule = self._own(c.hard_rule, np.uint8)
        cdef const double[::1] weights = self._own(c.weights, np.float64)
        cdef const int[::1] hard_vars = self._own(np.append(np.flatnonzero(c.hard_rule), -1), np.int32)
        cdef const int[::1] level_min = self._own(c.level_min, np.int32)
        if len(spec.variables) > MAX_VARS or c.term_x.shape[1] != MAX_TERMS:
            raise ValueError(f"spec: the kernel takes at most {MAX_VARS} variables of {MAX_TERMS} terms")
        self.m.n_vars = len(spec.variables)
        self.m.n_dims = len(c.weights)
        self.m.n_levels = len(c.level_min)
        self.m.y0 = &y0[0]
        self.m.n_terms = &n_terms[0]
        self.m.is_step = &is_step[0]
        self.m.term_x = &term_x[0, 0]
        self.m.term_inv_width = &term_inv_width[0, 0]
        self.m.term_delta = &term_delta[0, 0]
        self.m.var_dim = &var_dim[0]
        self.m.best = &best[0]
        self.m.loss_weight = &loss_weight[0]
        self.m.hard_rule = &hard_rule[0]
        self.m.hard_vars = &hard_vars[0]
        self.m.n_hard = int(np.count_nonzero(c.hard_rule))
        self.m.weights = &weights[0]
        self.m.level_min = &level_min[0]
        self.m.mu = spec.mu
        self.m.sigma = spec.sigma
        self.m.scale_min = spec.scale_min
        self.m.scale_max = spec.scale_max
        self.m.cap = spec.hard_rule_cap
        cdef const double[::1] cum_below
        cdef const double[::1] bin_counts
        self.m.calibrated = calibration is not None
        if calibration is not None:
            cum_below = self._own(calibration.cum_below, np.float64)
            bin_counts = self._own(calibration.bin_counts, np.float64)
            self.m.cum_below = &cum_below[0]
            self.m.bin_counts = &bin_counts[0]
            self.m.n_bins = calibration.n_bins
            self.m.raw_min = calibration.raw_min
            self.m.inv_width = calibration.inv_width
            self.m.inv_total = 1.0 / calibration.total
            self.m.p_min = calibration.p_min
            self.m.p_max = 1.0 - calibration.p_min

    def _own(self, arr, dtype):
        arr = np.ascontiguousarray(arr, dtype=dtype)
        self._keep.append(arr)
        return arr

    @property
    def n_variables(self):
        return self.m.n_vars

    def score(self, features, adult, out=None, int n_threads=1):
        """Score a batch: ``features`` float32 or float64 (n, n_variables), C-contiguous;
        ``adult`` uint8 (n,), 0 for a minor. Returns ``out`` (a ScoreColumns), allocated
        when not given. Raises ValueError naming the first invalid feature."""
        features = self._check_features(features)
        n = features.shape[0]
        adult = _check_vector(adult, "adult", np.uint8, n)
        if out is None:
            out = ScoreColumns.empty(n)
        else:
            out.check(n)
        if n_threads < 1:
            raise ValueError(f"n_threads: must be >= 1, got {n_threads}")
        if n == 0:
            return out
        cdef Py_ssize_t n_invalid, n_rows = n
        cdef const float[:, ::1] f32
        cdef const double[:, ::1] f64
        cdef const unsigned char[::1] adult_v = adult
        cdef Out o = out_pointers(out)
        if features.dtype == np.float32:
            f32 = features
            with nogil:
                n_invalid = score_rows[float](&self.m, &f32[0, 0], &adult_v[0], n_rows, &o, n_threads)
        else:
            f64 = features
            with nogil:
                n_invalid = score_rows[double](&self.m, &f64[0, 0], &adult_v[0], n_rows, &o, n_threads)
        if n_invalid:
            row = int(np.flatnonzero(out.flags & FLAG_INVALID)[0])
            raise ValueError(self._describe_invalid(features, row, n_invalid))
        return out

    def bind(self, features, adult, out):
        """A RowScorer that re-scores single rows of these arrays in place."""
        return RowScorer(self, features, adult, out)

    def _check_features(self, features):
        if not isinstance(features, np.ndarray):
            raise TypeError(f"features: expected a numpy array, got {type(features).__name__}")
        if features.dtype != np.float32 and features.dtype != np.float64:
            raise TypeError(f"features: dtype must be float32 or float64, got {features.dtype}")
        if features.ndim != 2 or features.shape[1] != self.m.n_vars:
            raise ValueError(
                f"features: expected shape (n, {self.m.n_vars}) for model "
                f"{self.spec.model_version}, got {features.shape}"
            )
        if not features.flags.c_contiguous:
            raise ValueError("features: must be C-contiguous (pass np.ascontiguousarray(features))")
        return features

    def _describe_invalid(self, features, row, n_invalid=1):
        bad = ~((features[row] >= 0) & np.isfinite(features[row]))
        col = int(np.flatnonzero(bad)[0])
        return (
            f"features[{row}, {col}] ({self.spec.variables[col].name}): {features[row, col]} "
            f"is not a finite non-negative number ({n_invalid} invalid row(s); nothing scored for them)"
        )


cdef class RowScorer:
    """Re-scores one citizen of the serving state in place: the cheap path run on every new
    record. Pointers into the arrays are taken once here; keep the arrays' shapes fixed
    while bound (rebind after growing them).

        >>> import numpy as np
        >>> from kernel.columns import ScoreColumns
        >>> from kernel.spec import load_spec
        >>> spec = load_spec()
        >>> feats = np.zeros((10, len(spec.variables)), np.float32)
        >>> cols = ScoreColumns.empty(10)
        >>> rows = Scorer(spec).bind(feats, np.ones(10, np.uint8), cols)
        >>> rows.rescore(3)
        -1
    """

    cdef Scorer scorer
    cdef readonly object features, adult, out
    cdef bint is_f32
    cdef const float* f32
    cdef const double* f64
    cdef const unsigned char* adult_p
    cdef Py_ssize_t n
    cdef Out o

    def __cinit__(self, Scorer scorer, features, adult, out):
        features = scorer._check_features(features)
        n = features.shape[0]
        adult = _check_vector(adult, "adult", np.uint8, n)
        out.check(n)
        if n == 0:
            raise ValueError("features: cannot bind an empty population")
        self.scorer, self.features, self.adult, self.out, self.n = scorer, features, adult, out, n
        cdef const float[:, ::1] f32v
        cdef const double[:, ::1] f64v
        self.is_f32 = features.dtype == np.float32
        if self.is_f32:
            f32v = features
            self.f32 = &f32v[0, 0]
        else:
            f64v = features
            self.f64 = &f64v[0, 0]
        cdef const unsigned char[::1] adult_v = adult
        self.adult_p = &adult_v[0]
        self.o = out_pointers(out)

    cpdef int rescore(self, Py_ssize_t row) except -2:
        """Re-score ``row`` from its current features; returns the new score (-1: none)."""
        if row < 0 or row >= self.n:
            raise IndexError(f"row {row} is outside the bound population of {self.n}")
        cdef const Model* m = &self.scorer.m
        cdef Py_ssize_t invalid
        if self.is_f32:
            invalid = score_at(m, self.f32, self.adult_p, row, 1, &self.o)
        else:
            invalid = score_at(m, self.f64, self.adult_p, row, 1, &self.o)
        if invalid:
            raise ValueError(self.scorer._describe_invalid(self.features, row))
        return self.o.score[row]


def normal_quantile(p):
    """Φ⁻¹ of each element of ``p`` (float64, strictly inside (0, 1)) through the kernel's own
    ``ndtri``: the function every score goes through, exposed so tests can hold it to an
    independent implementation (``statistics.NormalDist().inv_cdf``).

        >>> float(normal_quantile(np.array([0.5]))[0])
        0.0
    """
    cdef const double[::1] pv = np.ascontiguousarray(p, dtype=np.float64).ravel()
    if pv.shape[0] and not (0.0 < np.min(pv) and np.max(pv) < 1.0):
        raise ValueError("normal_quantile: every p must lie strictly inside (0, 1)")
    out = np.empty(pv.shape[0], np.float64)
    cdef double[::1] ov = out
    cdef Py_ssize_t i
    with nogil:
        for i in range(pv.shape[0]):
            ov[i] = ndtri(pv[i])
    return out


def _check_vector(arr, name, dtype, n):
    if not isinstance(arr, np.ndarray) or arr.dtype != dtype:
        got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
        raise TypeError(f"{name}: expected a numpy {np.dtype(dtype)} array, got {got}")
    if arr.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {arr.shape}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: must be C-contiguous")
    return arr
