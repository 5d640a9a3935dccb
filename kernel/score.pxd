# Shared declarations of the scoring kernel (kernel/score.pyx).

cdef enum:
    MAX_DIMS = 8      # room in the per-block sub-score buffer; the model has 5
    MAX_VARS = 128    # spec.MAX_VARIABLES
    MAX_TERMS = 8     # spec.MAX_KNOTS
    BLOCK = 64        # citizens scored together: per-block buffers are MAX_VARS x BLOCK doubles
    N_REASONS = 4     # reason codes per citizen (design section 3.6)
    FLAG_HARD_RULE = 1
    FLAG_NO_SCORE = 2
    FLAG_INVALID = 4

ctypedef fused feature_t:
    float
    double

# A compiled model: flat arrays of kernel/spec.py::CompiledSpec and the calibration table.
# Pointers are owned by the Scorer that fills the struct.
cdef struct Model:
    int n_vars
    int n_dims
    int n_levels
    const double* y0              # (V,) points below the first knot/edge
    const int* n_terms            # (V,)
    const unsigned char* is_step  # (V,) 1: bins (step ramps), 0: knots (linear ramps)
    const double* term_x          # (V, MAX_TERMS)
    const double* term_inv_width  # (V, MAX_TERMS)
    const double* term_delta      # (V, MAX_TERMS)
    const int* var_dim            # (V,) dimension of each variable
    const double* best            # (V,) best attainable points
    const double* loss_weight     # (V,) the variable's dimension weight
    const unsigned char* hard_rule  # (V,)
    const int* hard_vars          # (n_hard,) indices of the hard-rule variables
    int n_hard
    const double* weights         # (n_dims,)
    const int* level_min          # (n_levels,) inclusive lower bounds
    bint calibrated
    int n_bins
    double raw_min
    double inv_width
    double inv_total
    double p_min
    double p_max
    const double* cum_below       # (n_bins,) citizens below each bin
    const double* bin_counts      # (n_bins,)
    double mu
    double sigma
    double scale_min
    double scale_max
    double cap
