"""The fairness audit of a model release on the synthetic city (docs/product.md §9).

    $ qjscore fairness --citizens 400000 --seed 11 --out data/fairness     # the default model
    $ qjscore fairness --model kernel/models/v1.toml --out data/fairness-v1

The synthetic city (kernel/synthetic.py) carries protected attributes for auditing only —
sex, ethnicity (Han / minority), hukou type (local / non-local), age band (18–24, 25–34,
35–59, 60+), district, and "lives outside, works in the city" (commuter) — while its latent
behaviour traits are independent of all of them by construction. So any difference between
groups in what the model gives them is made by the model, not by behaviour. For each
protected attribute and each of its groups, :func:`audit` reports:

* the level distribution and the mean score of the group's adults;
* each scenario's approval rate, decided by the server's own compiled rule
  (server/token_index.pyx, the rule of every Check, BatchCheck and StreamCheck, with the
  thresholds of config/scenarios.toml): what a partner would answer, for a consenting adult
  with no unpaid default;
* the **four-fifths ratio** of each attribute × scenario: the lowest group's approval rate
  over the highest group's (fairlearn's ``demographic_parity_ratio``; the rule of thumb of
  the US Uniform Guidelines, 29 CFR 1607.4(D): below 0.8 is evidence of adverse impact).
  fairlearn's MetricFrame is given one row per group × outcome weighted by its count, which
  is exactly the row-level call (tests/test_fairness.py checks both against an independent
  computation): row by row it costs minutes on a city;
* the **proxy check**: how well each model variable alone tells each protected group from
  the rest. The measure is the AUC of a one-variable classifier: the variable's points (what
  the model sees of it) ranking members of a group above or below non-members; we report
  ``max(AUC, 1 − AUC)`` (the direction does not matter), the largest over the attribute's
  groups. 0.5 means the variable says nothing about the attribute and 1.0 that it gives it
  away. Unlike mutual information it reads on a fixed scale whatever the group sizes, and
  for a monotone points function every one-variable classifier that thresholds it has this
  same ROC curve. A variable at or above :data:`PROXY_AUC_FLAG` is flagged: on its own it
  separates a group better than chance by a margin (AUC 0.6 is conventionally where "poor"
  discrimination starts), so it may stand in for the attribute. A flag is a question for the
  model's authors, not a failure by itself: the four-fifths ratios say whether it matters.

:class:`FairnessReport` writes ``fairness.json``, ``fairness.png`` (matplotlib) and a
self-contained ``fairness.html`` (the PNG embedded, then the tables). ``qjscore model
stage`` stores the report with the release, and ``qjscore model activate`` refuses a release
with a ratio below :data:`FOUR_FIFTHS` unless given a reason (server/models.py).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kernel.calibration import CalibrationTable
from kernel.spec import ModelSpec

#: A four-fifths ratio below this is a failure (the four-fifths rule).
FOUR_FIFTHS = 0.8
#: A model variable whose one-variable AUC for a protected group reaches this is flagged.
PROXY_AUC_FLAG = 0.6
#: The synthetic city of the audit by default: the one the fairness issue was measured on.
AUDIT_CITIZENS, AUDIT_SEED = 400_000, 11
#: Files a report writes into its directory.
JSON_FILE, PNG_FILE, HTML_FILE = "fairness.json", "fairness.png", "fairness.html"


# --- the measures ---------------------------------------------------------------------------------


def approvals(score: np.ndarray, flags: np.ndarray, scenarios: dict) -> dict[str, np.ndarray]:
    """Each scenario's decision for every scored adult (bool: ALLOW), by the server's compiled
    rule (server/token_index.pyx ``check_many``, through ``check_tokens``) on a token index of
    these people: every one consenting, adult, with no unpaid default. ``score`` int16 and
    ``flags`` uint8 are the kernel's columns (kernel/columns.py)."""
    from server.scenarios import Outcome
    from server.token_index import TokenIndex, check_tokens

    n = len(score)
    if n == 0:
        return {name: np.zeros(0, bool) for name in scenarios}
    rows = np.arange(n, dtype=np.int64)
    tokens = np.zeros((n, 16), np.uint8)
    tokens[:, :8] = rows.astype("<u8").view(np.uint8).reshape(n, 8)
    tokens[:, 8:] = 0xA5  # any constant: the row makes every token unique
    index = TokenIndex.allocate(n)
    index.insert_many(tokens, rows.astype(np.int32))
    ones = np.ones(n, np.uint8)
    columns = (ones, ones, np.ascontiguousarray(score, np.int16), np.ascontiguousarray(flags, np.uint8),
               np.zeros(n, np.uint32), np.zeros(n, np.uint64))
    packed = tokens.reshape(-1)
    out = {}
    for name, scenario in scenarios.items():
        outcomes, _, _ = check_tokens(index, packed, *columns, *scenario.rule)
        out[name] = outcomes == Outcome.ALLOW
    return out


def group_rates(approved: np.ndarray, group: np.ndarray, n_groups: int) -> tuple[np.ndarray, float]:
    """(approval rate of each group, four-fifths ratio) with fairlearn: its MetricFrame of
    ``selection_rate`` and its ``demographic_parity_ratio`` (min over max of the groups'
    rates), given one row per (group, outcome) weighted by its count, which is the same as
    the row-level call. A group with no member has rate NaN and takes no part in the ratio."""
    from fairlearn.metrics import MetricFrame, demographic_parity_ratio, selection_rate

    approved = np.asarray(approved, bool)
    group = np.asarray(group)
    counts = np.bincount(group * 2 + approved, minlength=2 * n_groups).reshape(n_groups, 2)
    g, outcome = np.nonzero(counts)
    weight = counts[g, outcome].astype(np.float64)
    y = outcome.astype(np.int8)
    frame = MetricFrame(metrics=selection_rate, y_true=y, y_pred=y, sensitive_features=g,
                        sample_params={"sample_weight": weight})
    rates = np.full(n_groups, np.nan)
    for k, rate in frame.by_group.items():
        rates[int(k)] = float(rate)
    ratio = float(demographic_parity_ratio(y, y, sensitive_features=g, sample_weight=weight))
    return rates, ratio


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of x, ties sharing their average rank."""
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    return ((upper - counts + 1 + upper) / 2.0)[inverse]


def one_variable_auc(values: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """AUC of ``values`` as a score telling each group from the rest (Mann–Whitney U over
    n_g · n_rest; ties count one half): float (n_groups,), NaN for a group that is empty or
    everyone."""
    ranks = _average_ranks(np.asarray(values, np.float64))
    n = len(ranks)
    members = np.bincount(group, minlength=n_groups).astype(np.float64)
    rank_sum = np.bincount(group, weights=ranks, minlength=n_groups)
    rest = n - members
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - members * (members + 1) / 2.0) / (members * rest)
    auc[(members == 0) | (rest == 0)] = np.nan
    return auc


# --- the report -----------------------------------------------------------------------------------


@dataclass
class FairnessReport:
    """What :func:`audit` found; every per-group list follows ``groups[attribute]``."""

    model_version: str
    calibration_version: str
    citizens: int  # people in the synthetic city
    seed: int
    adults: int  # scored adults (the audit's population)
    levels: list[str]  # level codes, lowest first
    scenarios: dict[str, int]  # scenario -> its threshold (min_score)
    groups: dict[str, list[str]]  # attribute -> group labels
    counts: dict[str, list[int]]
    mean_score: dict[str, list[float]]
    level_shares: dict[str, list[list[float]]]  # attribute -> group -> share per level
    approval: dict[str, dict[str, list[float]]]  # attribute -> scenario -> rate per group
    ratio: dict[str, dict[str, float]]  # attribute -> scenario -> four-fifths ratio
    proxy: dict[str, dict[str, dict]]  # variable -> attribute -> {"auc", "group", "flagged"}
    threshold: float = FOUR_FIFTHS
    proxy_threshold: float = PROXY_AUC_FLAG
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))

    @property
    def min_ratio(self) -> float:
        return min(r for by in self.ratio.values() for r in by.values())

    def failures(self) -> list[tuple[str, str, float]]:
        """(attribute, scenario, ratio) below the threshold, worst first."""
        bad = [(a, s, r) for a, by in self.ratio.items() for s, r in by.items() if r < self.threshold]
        return sorted(bad, key=lambda t: t[2])

    @property
    def passed(self) -> bool:
        return not self.failures()

    def flagged_proxies(self) -> list[tuple[str, str, str, float]]:
        """(variable, attribute, group, AUC) at or above the proxy threshold, strongest first."""
        out = [(v, a, p["group"], p["auc"]) for v, by in self.proxy.items() for a, p in by.items() if p["flagged"]]
        return sorted(out, key=lambda t: -t[3])

    def summary(self) -> dict:
        """What a release keeps in its release.json and the history reads."""
        return {"model_version": self.model_version, "calibration_version": self.calibration_version,
                "citizens": self.citizens, "seed": self.seed, "threshold": self.threshold,
                "min_ratio": self.min_ratio, "passed": self.passed,
                "failures": [{"attribute": a, "scenario": s, "ratio": r} for a, s, r in self.failures()],
                "flagged_proxies": [{"variable": v, "attribute": a, "group": g, "auc": x}
                                    for v, a, g, x in self.flagged_proxies()]}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> "FairnessReport":
        return cls(**doc)

    # --- text ------------------------------------------------------------------------------

    def ratio_table(self) -> list[list[str]]:
        """Rows of the four-fifths table: a header, then one row per attribute × scenario."""
        rows = [["attribute", "scenario", "approval rates by group", "ratio"]]
        for attr, labels in self.groups.items():
            for scen in self.scenarios:
                rates = ", ".join(f"{lab} {100 * r:.0f} %" for lab, r in zip(labels, self.approval[attr][scen]))
                r = self.ratio[attr][scen]
                rows.append([attr, scen, rates, f"{r:.2f}" + ("  < 0.8" if r < self.threshold else "")])
        return rows

    def format(self) -> str:
        fails = self.failures()
        lines = [
            f"fairness  model {self.model_version}, calibration {self.calibration_version}",
            f"city      synthetic, {self.citizens:,} people (seed {self.seed}), {self.adults:,} scored adults",
            f"four-fifths ratios: lowest {self.min_ratio:.3f}; "
            + (f"{len(fails)} attribute x scenario pairs below {self.threshold}" if fails else f"all >= {self.threshold}"),
        ]
        for a, s, r in fails[:12]:
            lines.append(f"  FAIL {a} x {s}: {r:.3f}")
        lines += ["", "mean score by group"]
        for attr, labels in self.groups.items():
            lines.append(f"  {attr:<10} " + ", ".join(f"{lab} {m:.1f}" for lab, m in zip(labels, self.mean_score[attr])))
        lines += ["", "lowest four-fifths ratio per scenario"]
        for scen, mn in self.scenarios.items():
            attr = min(self.ratio, key=lambda a: self.ratio[a][scen])
            lines.append(f"  {scen:<28} (>= {mn})  {self.ratio[attr][scen]:.3f}  {attr}")
        flagged = self.flagged_proxies()
        lines += ["", f"proxy check (one-variable AUC >= {self.proxy_threshold}): "
                  + (f"{len(flagged)} flagged" if flagged else "none flagged")]
        for v, a, g, x in flagged:
            lines.append(f"  {v:<28} {a} ({g}): {x:.3f}")
        return "\n".join(lines)

    # --- files -----------------------------------------------------------------------------

    def figure(self):
        """Two panels: the four-fifths ratios (attribute × scenario, red below the threshold),
        and each group's mean score."""
        from matplotlib.colors import LinearSegmentedColormap
        from matplotlib.figure import Figure

        attrs, scens = list(self.groups), list(self.scenarios)
        grid = np.array([[self.ratio[a][s] for s in scens] for a in attrs])
        fig = Figure(figsize=(13, 9.5), dpi=100, layout="constrained")
        top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, 1.1])
        ax = top.add_subplot()
        cmap = LinearSegmentedColormap.from_list("ff", ["#cc0000", "#f4cccc", "#ffffff", "#d9ead3", "#38761d"])
        ax.imshow(grid, cmap=cmap, vmin=0.6, vmax=1.0, aspect="auto")
        for i in range(len(attrs)):
            for j in range(len(scens)):
                r = grid[i, j]
                ax.text(j, i, f"{r:.2f}", ha="center", va="center", fontsize=8,
                        fontweight="bold" if r < self.threshold else "normal", color="black")
        ax.set_xticks(range(len(scens)), [f"{s}\n≥{self.scenarios[s]}" for s in scens], rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(len(attrs)), attrs, fontsize=9)
        ax.set_title(f"Four-fifths ratio (lowest group's approval ÷ highest's; < {self.threshold} fails): "
                     f"model {self.model_version}, lowest {self.min_ratio:.2f}", fontsize=10)
        axes = bottom.subplots(1, len(attrs), sharex=True)
        all_means = [m for v in self.mean_score.values() for m in v if np.isfinite(m)]
        lo, hi = min(all_means + [640]) - 5, max(all_means + [680]) + 5
        for axis, attr in zip(np.atleast_1d(axes), attrs):
            labels, means = self.groups[attr], self.mean_score[attr]
            axis.barh(range(len(labels)), means, color="#3c78d8")
            axis.set_yticks(range(len(labels)), labels, fontsize=7)
            axis.invert_yaxis()
            axis.set_xlim(lo, hi)
            axis.set_title(attr, fontsize=9)
            axis.tick_params(axis="x", labelsize=7)
            for k, m in enumerate(means):
                axis.text(m, k, f" {m:.0f}", va="center", fontsize=7)
        bottom.suptitle(f"Mean score by group (synthetic city of {self.citizens:,}, seed {self.seed})", fontsize=10)
        return fig

    def png(self) -> bytes:
        buf = io.BytesIO()
        self.figure().savefig(buf, format="png")
        return buf.getvalue()

    def html(self, png: bytes | None = None) -> str:
        """A self-contained page: the PNG embedded, then every table."""
        png = self.png() if png is None else png
        e = html.escape

        def table(header: list[str], rows: list[list[str]], bad: set[tuple[int, int]] = frozenset()) -> str:
            head = "".join(f"<th>{e(h)}</th>" for h in header)
            body = "".join(
                "<tr>" + "".join(f"<td{' class=bad' if (i, j) in bad else ''}>{e(c)}</td>" for j, c in enumerate(r)) + "</tr>"
                for i, r in enumerate(rows))
            return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

        scens = list(self.scenarios)
        status = ("PASS: every four-fifths ratio is at least " if self.passed else "FAIL: ratios below ") + f"{self.threshold}"
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>Fairness report: model {e(self.model_version)}</title>",
            "<style>body{font-family:sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #bbb;padding:3px 7px;font-size:13px;text-align:right}th{background:#eee}"
            "td:first-child,th:first-child{text-align:left}.bad{background:#f4cccc;font-weight:bold}"
            ".pass{color:#38761d}.fail{color:#cc0000}</style></head><body>",
            f"<h1>Fairness report: model {e(self.model_version)}</h1>",
            f"<p>Calibration {e(self.calibration_version)}; synthetic city of {self.citizens:,} people (seed {self.seed}), "
            f"{self.adults:,} scored adults; made {e(self.created)}. Protected attributes are held in the synthetic data "
            "for auditing only and are never model inputs; the behaviour traits are independent of them by construction.</p>",
            f"<p class='{'pass' if self.passed else 'fail'}'><b>{e(status)}</b> (lowest {self.min_ratio:.3f}).</p>",
            f"<img alt='four-fifths ratios and mean scores' src='data:image/png;base64,{base64.b64encode(png).decode()}' "
            "style='max-width:100%'>",
            "<h2>Four-fifths ratio: attribute × scenario</h2>",
        ]
        rows, bad = [], set()
        for i, attr in enumerate(self.groups):
            rows.append([attr] + [f"{self.ratio[attr][s]:.3f}" for s in scens])
            bad |= {(i, j + 1) for j, s in enumerate(scens) if self.ratio[attr][s] < self.threshold}
        parts.append(table(["attribute"] + [f"{s} (≥{self.scenarios[s]})" for s in scens], rows, bad))
        for attr, labels in self.groups.items():
            parts.append(f"<h2>{e(attr)}</h2>")
            header = ["group", "adults", "mean score"] + [f"% {lv}" for lv in self.levels] + [f"% {s}" for s in scens]
            rows = []
            for k, lab in enumerate(labels):
                rows.append([lab, f"{self.counts[attr][k]:,}", f"{self.mean_score[attr][k]:.1f}"]
                            + [f"{100 * x:.1f}" for x in self.level_shares[attr][k]]
                            + [f"{100 * self.approval[attr][s][k]:.1f}" for s in scens])
            rows.append(["four-fifths ratio", "", "", *[""] * len(self.levels)] + [f"{self.ratio[attr][s]:.3f}" for s in scens])
            bad = {(len(labels), 3 + len(self.levels) + j) for j, s in enumerate(scens) if self.ratio[attr][s] < self.threshold}
            parts.append(table(header, rows, bad))
        parts.append(f"<h2>Proxy check: one-variable AUC (flagged at ≥ {self.proxy_threshold})</h2>")
        parts.append("<p>How well each model variable's points alone tell a protected group from the rest: "
                     "max(AUC, 1 − AUC), the largest over the attribute's groups (the group in brackets). "
                     "0.5: says nothing; 1.0: gives the attribute away.</p>")
        attrs = list(self.groups)
        rows, bad = [], set()
        for i, (var, by) in enumerate(self.proxy.items()):
            rows.append([var] + [f"{by[a]['auc']:.3f} ({by[a]['group']})" for a in attrs])
            bad |= {(i, j + 1) for j, a in enumerate(attrs) if by[a]["flagged"]}
        parts.append(table(["variable"] + attrs, rows, bad))
        parts.append("</body></html>")
        return "\n".join(parts)

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """fairness.json, fairness.png and fairness.html into ``out_dir`` (made if missing)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        png = self.png()
        paths = {"json": out / JSON_FILE, "png": out / PNG_FILE, "html": out / HTML_FILE}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False))
        paths["png"].write_bytes(png)
        paths["html"].write_text(self.html(png))
        return paths

    def files(self) -> dict[str, bytes]:
        """The same three files as bytes (for a release directory written whole)."""
        png = self.png()
        return {JSON_FILE: json.dumps(self.to_dict(), indent=1, ensure_ascii=False).encode(), PNG_FILE: png,
                HTML_FILE: self.html(png).encode()}


# --- the audit ------------------------------------------------------------------------------------


def audit(spec: ModelSpec, calibration: CalibrationTable, people, features: np.ndarray, scenarios: dict,
          citizens: int | None = None, seed: int = AUDIT_SEED, n_threads: int = 2) -> FairnessReport:
    """Score ``people`` (kernel/synthetic.py ``People``) from ``features`` under ``spec`` and
    ``calibration`` with the compiled kernel, decide every scenario with the server's rule,
    and measure every protected attribute (see the module docstring)."""
    from kernel.score import Scorer
    from kernel.synthetic import PROTECTED, protected_attributes

    calibration.check_model(spec)
    cols = Scorer(spec, calibration).score(features, people.adult, n_threads=n_threads)
    scored = (people.adult == 1) & (cols.score >= 0)
    score, flags, level = cols.score[scored], cols.flags[scored], cols.level[scored].astype(np.int64)
    decided = approvals(score, flags, scenarios)
    attrs = {name: codes[scored].astype(np.int64) for name, codes in protected_attributes(people).items()}
    n_levels = len(spec.levels)

    groups, counts, means, shares, approval, ratio = {}, {}, {}, {}, {}, {}
    for attr, labels in PROTECTED.items():
        g, k = attrs[attr], len(labels)
        n_g = np.bincount(g, minlength=k)
        groups[attr], counts[attr] = list(labels), n_g.tolist()
        with np.errstate(invalid="ignore", divide="ignore"):
            means[attr] = (np.bincount(g, weights=score.astype(np.float64), minlength=k) / n_g).tolist()
            by_level = np.bincount(g * n_levels + level, minlength=k * n_levels).reshape(k, n_levels)
            shares[attr] = (by_level / n_g[:, None]).tolist()
        approval[attr], ratio[attr] = {}, {}
        for name, ok in decided.items():
            rates, r = group_rates(ok, g, k)
            approval[attr][name], ratio[attr][name] = rates.tolist(), r

    from kernel.reference import variable_points

    points = variable_points(spec, features[scored])
    proxy = {}
    for v, var in enumerate(spec.variables):
        proxy[var.name] = {}
        for attr, labels in PROTECTED.items():
            auc = one_variable_auc(points[:, v], attrs[attr], len(labels))
            sep = np.where(np.isnan(auc), 0.5, np.maximum(auc, 1.0 - auc))
            best = int(np.argmax(sep))
            proxy[var.name][attr] = {"auc": float(sep[best]), "group": labels[best],
                                     "flagged": bool(sep[best] >= PROXY_AUC_FLAG)}
    return FairnessReport(
        model_version=spec.model_version, calibration_version=calibration.calibration_version,
        citizens=int(len(people) if citizens is None else citizens), seed=int(seed), adults=int(scored.sum()),
        levels=[lv.code for lv in spec.levels], scenarios={n: s.min_score for n, s in scenarios.items()},
        groups=groups, counts=counts, mean_score=means, level_shares=shares, approval=approval, ratio=ratio,
        proxy=proxy,
    )


def audit_city(spec: ModelSpec, calibration: CalibrationTable | None, scenarios: dict | None = None,
               citizens: int = AUDIT_CITIZENS, seed: int = AUDIT_SEED, n_threads: int = 2) -> FairnessReport:
    """:func:`audit` on a freshly generated synthetic city of ``citizens`` (``seed``). With no
    calibration, one is frozen from this city's adults (what a first start would do)."""
    from kernel.calibrate import calibrate
    from kernel.synthetic import generate_features
    from server.scenarios import load_scenarios

    scenarios = load_scenarios() if scenarios is None else scenarios
    people, features = generate_features(spec, citizens, seed=seed)
    if calibration is None:
        calibration = calibrate(spec, features, people.adult, n_threads=n_threads)
    return audit(spec, calibration, people, features, scenarios, citizens, seed, n_threads)


def load_report(path: str | Path) -> FairnessReport:
    """A report written by :meth:`FairnessReport.write` (its fairness.json, or the directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / JSON_FILE
    return FairnessReport.from_dict(json.loads(path.read_text()))
