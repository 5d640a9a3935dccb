"""The model specification: load, validate and compile a TOML model spec.

    >>> from kernel.spec import load_spec
    >>> spec = load_spec()                      # kernel/models/v2.toml, the default model
    >>> spec.model_version                      # doctest: +ELLIPSIS
    '2+...'
    >>> spec.level_of(550).code
    'fair'

Validation happens once, here, so the kernel never sees a malformed model: every problem
raises :class:`SpecError` with the dotted path of the offending key. The compiled form
(:class:`CompiledSpec`) is a set of flat numpy arrays, the only thing the kernel reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: The default model: what a first start serves and every command scores with unless told
#: otherwise. Version 2 (docs/product.md §9) replaced version 1 (models/v1.toml), which failed
#: the four-fifths rule; existing data directories keep serving their active release.
DEFAULT_SPEC_PATH = Path(__file__).with_name("models") / "v2.toml"
#: Version 1: the model of data directories from before the registry (server/models.py adopt_legacy).
V1_SPEC_PATH = Path(__file__).with_name("models") / "v1.toml"

#: The five dimensions of the seed, in the order every score reports them.
DIMENSIONS = ("identity", "law_abiding", "social_credit", "commercial_credit", "prosocial")

#: Lifetime bounds in days per severity tier, from China's credit-repair rules
#: (minor up to 3 months, general up to 1 year, serious 1 to 3 years).
TIER_LIFETIME_DAYS = {"minor": (1, 90), "general": (1, 365), "serious": (365, 1095)}

#: The least publicity, in days since the record's date, before a record of each tier may be
#: repaired (the credit-repair measures: minor records at any time, general ones after 3
#: months, serious ones after 1 year).
TIER_REPAIR_AFTER_DAYS = {"minor": 0, "general": 90, "serious": 365}

#: Most steps a what-if search tries on one actionable variable (server/whatif.py).
MAX_ACTION_STEPS = 20

#: Attributes that must never be model inputs (docs/product.md §2, "non-discriminating").
#: A variable whose name, source or record type contains one of these words is rejected.
PROTECTED_WORDS = frozenset(
    {
        "sex", "gender", "ethnicity", "ethnic", "nationality", "race", "religion",
        "religious", "hukou", "health", "disability", "disease", "medical_condition",
        "biometric", "biometrics", "face", "fingerprint", "iris", "dna", "genetic",
    }
)

#: Longest points function the kernel accepts (knots or bin edges per variable).
MAX_KNOTS = 8
#: Most variables a model may have (the kernel's per-block buffers are sized for this).
MAX_VARIABLES = 128
#: Scores are int16 columns with -1 for "no score" (kernel/columns.py): the scale must fit.
MAX_SCALE = 32_767
#: Levels are int8 indices into the level table.
MAX_LEVELS = 127
#: Days (lifetimes, windows) are int32 like every date in the store.
MAX_DAYS = 2**31 - 1


class SpecError(ValueError):
    """A model spec is invalid. The message starts with the dotted path of the bad key."""


@dataclass(frozen=True)
class Level:
    code: str
    min: int
    zh: str
    en: str


@dataclass(frozen=True)
class Dimension:
    name: str
    weight: float
    zh: str
    en: str


@dataclass(frozen=True)
class Reason:
    code: str
    zh: str
    en: str
    improve_zh: str
    improve_en: str


@dataclass(frozen=True)
class Variable:
    name: str
    dimension: str
    source: str
    direction: str  # "positive" | "negative"
    aggregate: str  # "count" | "sum" | "max"
    kind: str  # "knots" | "bins"
    x: tuple[float, ...]  # knot x or bin edges
    y: tuple[float, ...]  # knot y or bin points (len(x) + 1 for bins)
    reason: Reason
    tier: str | None = None
    lifetime_days: int = 0
    decay: str = "none"
    window_days: int = 0
    hard_rule: bool = False
    # What a citizen can do about it (the what-if, server/whatif.py). A negative variable
    # that is ``actionable`` can be repaired once the remedy is made (arrears paid, a
    # judgment fulfilled) and its tier's least publicity has passed; a positive one grows by
    # records of ``step`` (hours, donations) a citizen can realistically add, at most
    # ``max_steps`` of them. Tenure (years lived, months paid) is not actionable: it accrues.
    actionable: bool = False
    step: float = 0.0
    max_steps: int = 0

    @property
    def best_points(self) -> float:
        """The most points this variable can give: the baseline for "points lost"."""
        return max(self.y)

    def points(self, value: float) -> float:
        """Points for one feature value (plain Python; the kernel has the fast path)."""
        if self.kind == "bins":
            return self.y[sum(1 for e in self.x if value >= e)]
        if value <= self.x[0]:
            return self.y[0]
        for (x0, y0), (x1, y1) in zip(zip(self.x, self.y), zip(self.x[1:], self.y[1:])):
            if value < x1:
                return y0 + (value - x0) * (y1 - y0) / (x1 - x0)
        return self.y[-1]


@dataclass(frozen=True)
class CompiledSpec:
    """The spec as flat arrays, in the layout the kernel reads.

    Every points function is written as a base plus a sum of ramps, so it evaluates with no
    search and no table lookup (and vectorises across citizens)::

        points(v) = y0 + sum_k delta[k] * ramp_k(v)
        knots:  ramp_k(v) = clamp((v - x[k]) * inv_width[k], 0, 1)   (segment k: x[k]..x[k+1])
        bins:   ramp_k(v) = 1 if v >= x[k] else 0                    (x = the bin edges)

    Each ramp is monotone in v and every delta has the variable's direction's sign, so the
    floating-point sum is monotone too: rounding can never let a worse record gain points.
    """

    y0: np.ndarray  # float64 (V,) points below the first knot or edge
    n_terms: np.ndarray  # int32 (V,)
    is_step: np.ndarray  # uint8 (V,) 1 for bins
    term_x: np.ndarray  # float64 (V, MAX_KNOTS), padded with 0
    term_inv_width: np.ndarray  # float64 (V, MAX_KNOTS)
    term_delta: np.ndarray  # float64 (V, MAX_KNOTS)
    var_dim: np.ndarray  # int32 (V,)
    best: np.ndarray  # float64 (V,) best attainable points
    loss_weight: np.ndarray  # float64 (V,) the variable's dimension weight
    hard_rule: np.ndarray  # uint8 (V,)
    weights: np.ndarray  # float64 (D,)
    level_min: np.ndarray  # int32 (L,)
    raw_min: float
    raw_max: float


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: int
    mu: float
    sigma: float
    scale_min: int
    scale_max: int
    hard_rule_cap: int
    levels: tuple[Level, ...]
    dimensions: tuple[Dimension, ...]
    variables: tuple[Variable, ...]
    content_hash: str
    compiled: CompiledSpec = field(repr=False, compare=False)

    @property
    def model_version(self) -> str:
        """``<version>+<first 12 hex of the content hash>``: two specs that differ in any
        value never share a model version."""
        return f"{self.version}+{self.content_hash[:12]}"

    @property
    def variable_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variables)

    def variable_index(self, name: str) -> int:
        for i, v in enumerate(self.variables):
            if v.name == name:
                return i
        raise KeyError(f"no variable named {name!r} in model {self.model_version}")

    def level_of(self, score: int) -> Level:
        """The seed's level for a score (lower bounds inclusive)."""
        chosen = self.levels[0]
        for level in self.levels:
            if score >= level.min:
                chosen = level
        return chosen


def load_spec(path: str | Path | None = None) -> ModelSpec:
    """Read and validate a spec file (default: :data:`DEFAULT_SPEC_PATH`, model version 2)."""
    path = Path(path) if path is not None else DEFAULT_SPEC_PATH
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from exc
    except ValueError as exc:  # not UTF-8, or an integer of more than 4,300 digits
        raise SpecError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise SpecError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None
    return parse_spec(doc)


def parse_spec(doc: dict) -> ModelSpec:
    """Validate a parsed TOML document and build the :class:`ModelSpec`."""
    if not isinstance(doc, dict):
        raise SpecError("spec: expected a table at the top level")
    model = _table(doc, "model", "model")
    name = _str(model, "name", "model.name")
    version = _int(model, "version", "model.version", lo=1)
    mu = _float(model, "mu", "model.mu")
    sigma = _float(model, "sigma", "model.sigma")
    if sigma <= 0:
        raise SpecError(f"model.sigma: must be > 0, got {sigma}")
    scale_min = _int(model, "scale_min", "model.scale_min", lo=0, hi=MAX_SCALE)
    scale_max = _int(model, "scale_max", "model.scale_max", lo=0, hi=MAX_SCALE)
    if scale_max <= scale_min:
        raise SpecError(f"model.scale_max: must be above scale_min ({scale_min}), got {scale_max}")
    if not scale_min <= mu <= scale_max:
        raise SpecError(f"model.mu: {mu} is outside the scale [{scale_min}, {scale_max}]")
    cap = _int(model, "hard_rule_cap", "model.hard_rule_cap")
    _no_extra(model, "model", {"name", "version", "mu", "sigma", "scale_min", "scale_max", "hard_rule_cap"})

    levels = _parse_levels(doc, scale_min, scale_max)
    if not scale_min <= cap < levels[1].min:
        raise SpecError(
            f"model.hard_rule_cap: {cap} must lie below the second level's lower bound "
            f"({levels[1].min}) so a hard-rule record always lands in the lowest level"
        )
    dimensions = _parse_dimensions(doc)
    variables = _parse_variables(doc)
    _no_extra(doc, "spec", {"model", "levels", "dimensions", "variables"})

    canonical = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    content_hash = hashlib.sha256(canonical.encode()).hexdigest()
    compiled = _compile(dimensions, variables, levels)
    if not (math.isfinite(compiled.raw_min) and math.isfinite(compiled.raw_max)):
        raise SpecError(
            f"variables: the weighted points overflow a float (raw points range from {compiled.raw_min} "
            f"to {compiled.raw_max}); use smaller points or weights"
        )
    return ModelSpec(
        name=name, version=version, mu=mu, sigma=sigma, scale_min=scale_min,
        scale_max=scale_max, hard_rule_cap=cap, levels=levels, dimensions=dimensions,
        variables=variables, content_hash=content_hash, compiled=compiled,
    )


# --- sections -------------------------------------------------------------------------


def _parse_levels(doc: dict, scale_min: int, scale_max: int) -> tuple[Level, ...]:
    raw = doc.get("levels")
    if not isinstance(raw, list) or len(raw) < 2:
        raise SpecError("levels: expected at least two [[levels]] tables")
    if len(raw) > MAX_LEVELS:
        raise SpecError(f"levels: at most {MAX_LEVELS} levels, got {len(raw)}")
    levels = []
    for i, item in enumerate(raw):
        where = f"levels[{i}]"
        if not isinstance(item, dict):
            raise SpecError(f"{where}: expected a table")
        levels.append(
            Level(
                code=_str(item, "code", f"{where}.code"),
                min=_int(item, "min", f"{where}.min"),
                zh=_str(item, "zh", f"{where}.zh"),
                en=_str(item, "en", f"{where}.en"),
            )
        )
        _no_extra(item, where, {"code", "min", "zh", "en"})
    if levels[0].min != scale_min:
        raise SpecError(f"levels[0].min: the first level must start at scale_min ({scale_min}), got {levels[0].min}")
    for i in range(1, len(levels)):
        if levels[i].min <= levels[i - 1].min:
            raise SpecError(
                f"levels[{i}].min: level bands overlap or are out of order "
                f"({levels[i].code} starts at {levels[i].min}, not above {levels[i - 1].code} at {levels[i - 1].min})"
            )
        if levels[i].min > scale_max:
            raise SpecError(f"levels[{i}].min: {levels[i].min} is above scale_max ({scale_max})")
    codes = [lv.code for lv in levels]
    if len(set(codes)) != len(codes):
        raise SpecError(f"levels: duplicate level code in {codes}")
    return tuple(levels)


def _parse_dimensions(doc: dict) -> tuple[Dimension, ...]:
    table = _table(doc, "dimensions", "dimensions")
    for key in table:
        if key not in DIMENSIONS:
            raise SpecError(f"dimensions.{key}: unknown dimension (known: {', '.join(DIMENSIONS)})")
    dims = []
    for name in DIMENSIONS:
        where = f"dimensions.{name}"
        item = _table(table, name, where)
        weight = _float(item, "weight", f"{where}.weight")
        if weight <= 0:
            raise SpecError(f"{where}.weight: must be > 0 so the score stays monotone, got {weight}")
        dims.append(Dimension(name, weight, _str(item, "zh", f"{where}.zh"), _str(item, "en", f"{where}.en")))
        _no_extra(item, where, {"weight", "zh", "en"})
    return tuple(dims)


_VARIABLE_KEYS = {
    "name", "dimension", "source", "direction", "aggregate", "tier", "lifetime_days",
    "decay", "window_days", "hard_rule", "points", "reason", "record_type",
    "actionable", "step", "max_steps",
}


def _parse_variables(doc: dict) -> tuple[Variable, ...]:
    raw = doc.get("variables")
    if not isinstance(raw, list) or not raw:
        raise SpecError("variables: expected at least one [[variables]] table")
    if len(raw) > MAX_VARIABLES:
        raise SpecError(f"variables: at most {MAX_VARIABLES} variables, got {len(raw)}")
    seen_names: set[str] = set()
    seen_codes: set[str] = set()
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise SpecError(f"variables[{i}]: expected a table")
        name = _str(item, "name", f"variables[{i}].name")
        where = f"variables.{name}"
        if not name.isidentifier() or name.lower() != name:
            raise SpecError(f"{where}.name: must be a lower-case identifier, got {name!r}")
        if name in seen_names:
            raise SpecError(f"{where}.name: duplicate variable name")
        seen_names.add(name)
        _no_extra(item, where, _VARIABLE_KEYS)

        for key in ("name", "source", "record_type"):
            if key in item:
                _reject_protected(_str(item, key, f"{where}.{key}"), f"{where}.{key}")

        dimension = _str(item, "dimension", f"{where}.dimension")
        if dimension not in DIMENSIONS:
            raise SpecError(f"{where}.dimension: unknown dimension {dimension!r} (known: {', '.join(DIMENSIONS)})")
        direction = _choice(item, "direction", where, ("positive", "negative"))
        aggregate = _choice(item, "aggregate", where, ("count", "sum", "max"))
        hard_rule = item.get("hard_rule", False)
        if not isinstance(hard_rule, bool):
            raise SpecError(f"{where}.hard_rule: expected true or false")

        tier, lifetime, decay, window = None, 0, "none", 0
        if direction == "negative":
            tier = _choice(item, "tier", where, tuple(TIER_LIFETIME_DAYS))
            lifetime = _int(item, "lifetime_days", f"{where}.lifetime_days")
            lo, hi = TIER_LIFETIME_DAYS[tier]
            if not lo <= lifetime <= hi:
                raise SpecError(
                    f"{where}.lifetime_days: {lifetime} days is outside the {tier} tier's "
                    f"credit-repair bounds [{lo}, {hi}]"
                )
            decay = _choice(item, "decay", where, ("linear", "none"))
            if "window_days" in item:
                raise SpecError(f"{where}.window_days: only positive variables have a window; negative ones use lifetime_days")
            # Serious records (court-listed dishonest debtors, crimes, blacklists) cap the score
            # and deny pay-later: the tier and the rule go together, stated in the spec both
            # ways so a reader of one variable sees what it does.
            if hard_rule and tier != "serious":
                raise SpecError(f"{where}.hard_rule: only serious-tier records may carry a hard rule")
            if tier == "serious" and not hard_rule:
                raise SpecError(
                    f"{where}.hard_rule: a serious-tier record must carry the hard rule (hard_rule = true); "
                    "a record that should only lower points belongs in the general tier"
                )
        else:
            for key in ("tier", "lifetime_days", "decay"):
                if key in item:
                    raise SpecError(f"{where}.{key}: only negative variables have {key}")
            if hard_rule:
                raise SpecError(f"{where}.hard_rule: only negative variables may carry a hard rule")
            window = _int(item, "window_days", f"{where}.window_days", lo=0, hi=MAX_DAYS)

        actionable = item.get("actionable", False)
        if not isinstance(actionable, bool):
            raise SpecError(f"{where}.actionable: expected true or false")
        step, max_steps = 0.0, 0
        if direction == "positive" and actionable:
            step = _float(item, "step", f"{where}.step")
            if not step > 0:
                raise SpecError(f"{where}.step: an actionable positive variable needs a step above 0, got {_show(step)}")
            if aggregate == "count" and step != 1:
                raise SpecError(f"{where}.step: a counted variable grows one record at a time (step = 1), got {_show(step)}")
            max_steps = _int(item, "max_steps", f"{where}.max_steps", lo=1, hi=MAX_ACTION_STEPS)
        else:
            for key in ("step", "max_steps"):
                if key in item:
                    which = "negative variables are repaired, not stepped" if direction == "negative" else "only actionable variables have one"
                    raise SpecError(f"{where}.{key}: {which}")

        kind, x, y = _parse_points(item, where, direction)
        reason_t = _table(item, "reason", f"{where}.reason")
        reason = Reason(*(_str(reason_t, k, f"{where}.reason.{k}") for k in ("code", "zh", "en", "improve_zh", "improve_en")))
        _no_extra(reason_t, f"{where}.reason", {"code", "zh", "en", "improve_zh", "improve_en"})
        if reason.code in seen_codes:
            raise SpecError(f"{where}.reason.code: duplicate reason code {reason.code!r}")
        seen_codes.add(reason.code)
        out.append(
            Variable(
                name=name, dimension=dimension, source=_str(item, "source", f"{where}.source"),
                direction=direction, aggregate=aggregate, kind=kind, x=x, y=y, reason=reason,
                tier=tier, lifetime_days=lifetime, decay=decay, window_days=window,
                hard_rule=hard_rule, actionable=actionable, step=step, max_steps=max_steps,
            )
        )
    return tuple(out)


def _parse_points(item: dict, where: str, direction: str):
    pts = _table(item, "points", f"{where}.points")
    where = f"{where}.points"
    kind = _choice(pts, "kind", where, ("knots", "bins"))
    if kind == "knots":
        _no_extra(pts, where, {"kind", "x", "y"})
        x = _floats(pts, "x", f"{where}.x")
        y = _floats(pts, "y", f"{where}.y")
        if len(x) != len(y):
            raise SpecError(f"{where}.y: {len(y)} values for {len(x)} knots")
        if len(x) < 2:
            raise SpecError(f"{where}.x: a piecewise-linear function needs at least 2 knots")
        breakpoints, values = x, y
    else:
        _no_extra(pts, where, {"kind", "edges", "points"})
        x = _floats(pts, "edges", f"{where}.edges")
        y = _floats(pts, "points", f"{where}.points")
        if len(y) != len(x) + 1:
            raise SpecError(f"{where}.points: {len(x)} edges need {len(x) + 1} points, got {len(y)}")
        if not x:
            raise SpecError(f"{where}.edges: at least one edge is needed")
        breakpoints, values = x, y
    if len(breakpoints) > MAX_KNOTS:
        raise SpecError(f"{where}: at most {MAX_KNOTS} knots or edges, got {len(breakpoints)}")
    for i in range(1, len(breakpoints)):
        if not breakpoints[i] > breakpoints[i - 1]:
            raise SpecError(f"{where}: knots/edges must be strictly increasing (index {i}: {breakpoints[i]} after {breakpoints[i - 1]})")
        width = breakpoints[i] - breakpoints[i - 1]
        # The kernel evaluates a knot segment through 1 / width: both must be finite.
        if kind == "knots" and not (math.isfinite(width) and math.isfinite(1.0 / width) and 1.0 / width > 0):
            raise SpecError(f"{where}.x: knots {breakpoints[i - 1]} and {breakpoints[i]} are too close or too far apart (width {width})")
    for i in range(1, len(values)):
        step = values[i] - values[i - 1]
        if not math.isfinite(step):
            raise SpecError(f"{where}: points {values[i - 1]} and {values[i]} differ by more than a float can hold (index {i})")
        if (direction == "positive" and step < 0) or (direction == "negative" and step > 0):
            raise SpecError(
                f"{where}: non-monotone points for a {direction} variable "
                f"(index {i}: {values[i]} after {values[i - 1]})"
            )
    return kind, tuple(x), tuple(y)


# --- compile --------------------------------------------------------------------------


def _compile(dimensions, variables, levels) -> CompiledSpec:
    n_vars, k = len(variables), MAX_KNOTS
    y0 = np.array([v.y[0] for v in variables])
    n_terms = np.zeros(n_vars, np.int32)
    is_step = np.array([v.kind == "bins" for v in variables], np.uint8)
    tx, tinv, tdelta = np.zeros((n_vars, k)), np.zeros((n_vars, k)), np.zeros((n_vars, k))
    for i, var in enumerate(variables):
        if var.kind == "bins":
            n = len(var.x)
            tx[i, :n] = var.x
            tdelta[i, :n] = np.diff(var.y)
        else:
            n = len(var.x) - 1
            tx[i, :n] = var.x[:-1]
            tinv[i, :n] = 1.0 / np.diff(var.x)
            tdelta[i, :n] = np.diff(var.y)
        n_terms[i] = n
    weights = np.array([d.weight for d in dimensions])
    dim_index = {d.name: i for i, d in enumerate(dimensions)}
    var_dim = np.array([dim_index[v.dimension] for v in variables], np.int32)
    mins = np.array([min(v.y) for v in variables])
    maxs = np.array([max(v.y) for v in variables])
    with np.errstate(over="ignore"):  # an infinite range is the caller's SpecError, not a warning
        raw_min = float(sum(weights[d] * mins[var_dim == d].sum() for d in range(len(dimensions))))
        raw_max = float(sum(weights[d] * maxs[var_dim == d].sum() for d in range(len(dimensions))))
    arrays = dict(
        y0=y0, n_terms=n_terms, is_step=is_step, term_x=tx, term_inv_width=tinv,
        term_delta=tdelta, var_dim=var_dim, best=maxs, loss_weight=weights[var_dim],
        hard_rule=np.array([v.hard_rule for v in variables], np.uint8), weights=weights,
        level_min=np.array([lv.min for lv in levels], np.int32),
    )
    for a in arrays.values():
        a.setflags(write=False)
    return CompiledSpec(**arrays, raw_min=raw_min, raw_max=raw_max)


# --- small typed getters: each names the key it is about ------------------------------


def _reject_protected(value: str, where: str) -> None:
    words = set(value.lower().replace("-", "_").split("_"))
    hit = sorted(words & PROTECTED_WORDS) or sorted(
        w for w in PROTECTED_WORDS if "_" in w and w in value.lower()
    )
    if hit:
        raise SpecError(
            f"{where}: {value!r} uses a protected attribute ({', '.join(hit)}); protected "
            "attributes are kept for fairness audits only and are never model inputs"
        )


def _no_extra(table: dict, where: str, allowed: set[str]) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise SpecError(f"{where}.{extra[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _table(parent: dict, key: str, where: str) -> dict:
    value = parent.get(key)
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected a table" if value is not None else f"{where}: missing")
    return value


def _str(parent: dict, key: str, where: str) -> str:
    value = parent.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{where}: expected a non-empty string" if value is not None else f"{where}: missing")
    return value


def _int(parent: dict, key: str, where: str, lo: int | None = None, hi: int | None = None) -> int:
    value = parent.get(key)
    if value is None:
        raise SpecError(f"{where}: missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where}: expected an integer, got {_show(value)}")
    if not -(2**63) <= value < 2**63:
        raise SpecError(f"{where}: expected a 64-bit integer, got {_show(value)}")
    if lo is not None and value < lo:
        raise SpecError(f"{where}: must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise SpecError(f"{where}: must be <= {hi}, got {value}")
    return value


def _show(value) -> str:
    """A short repr for a message: no 5,000-digit integers, no megabyte of list."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _finite(value) -> float | None:
    """``value`` as a finite float, or None (not a number, a bool, NaN, infinite, or an
    integer too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def _float(parent: dict, key: str, where: str) -> float:
    value = parent.get(key)
    if value is None:
        raise SpecError(f"{where}: missing")
    number = _finite(value)
    if number is None:
        raise SpecError(f"{where}: expected a finite number, got {_show(value)}")
    return number


def _floats(parent: dict, key: str, where: str) -> list[float]:
    value = parent.get(key)
    if not isinstance(value, list):
        raise SpecError(f"{where}: expected a list of numbers" if value is not None else f"{where}: missing")
    out = []
    for i, v in enumerate(value):
        number = _finite(v)
        if number is None:
            raise SpecError(f"{where}[{i}]: expected a finite number, got {_show(v)}")
        out.append(number)
    return out


def _choice(parent: dict, key: str, where: str, allowed: tuple[str, ...]) -> str:
    value = _str(parent, key, f"{where}.{key}")
    if value not in allowed:
        raise SpecError(f"{where}.{key}: {value!r} is not one of {', '.join(allowed)}")
    return value
