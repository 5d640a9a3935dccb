"""Calibrate a model on a population and report the resulting score distribution.

    python -m kernel.calibrate --citizens 1000000 --out data/calibration.npz --png data/calibration.png

Scores the population uncalibrated (raw points), builds and freezes the histogram
(kernel/calibration.py), re-scores through the frozen table, and prints the level shares,
the mean and σ of the scores, and the seed's checks (docs/product.md §2). The PNG shows the
share of adults per 5-point score bin, the five level bands with their shares, and the
target normal curve N(μ, σ).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kernel.calibration import CalibrationTable, RawHistogram
from kernel.columns import ScoreColumns
from kernel.score import Scorer
from kernel.spec import ModelSpec, load_spec


def calibrate(spec: ModelSpec, features: np.ndarray, adult: np.ndarray, n_threads: int = 1) -> CalibrationTable:
    """Freeze a calibration table from one in-memory population (adults only)."""
    raw = Scorer(spec).score(features, adult, n_threads=n_threads).raw
    hist = RawHistogram.empty(spec)
    hist.add(raw[adult == 1])
    return hist.freeze()


@dataclass
class CalibrationReport:
    model_version: str
    calibration_version: str
    adults: int
    mean: float
    sigma: float
    level_shares: dict
    share_below_550: float
    share_at_or_above_750: float
    clean_adults: int
    clean_share_600_750: float
    hard_rule_share: float

    def lines(self) -> list[str]:
        out = [
            f"model {self.model_version}, calibration {self.calibration_version}, {self.adults:,} scored adults",
            f"mean {self.mean:.1f}, sigma {self.sigma:.1f}",
        ]
        for code, share in self.level_shares.items():
            out.append(f"  {code:<18} {100 * share:6.2f} %")
        out += [
            f"below 550: {100 * self.share_below_550:.2f} %   750 or above: {100 * self.share_at_or_above_750:.2f} %",
            f"adults with no negative record: {self.clean_adults:,}, of whom {100 * self.clean_share_600_750:.1f} % score 600-749",
            f"capped by a hard rule: {100 * self.hard_rule_share:.2f} %",
        ]
        return out


def report(spec: ModelSpec, table: CalibrationTable, cols: ScoreColumns, features: np.ndarray, adult: np.ndarray) -> CalibrationReport:
    scored = adult == 1
    score = cols.score[scored].astype(np.float64)
    negative = np.array([v.direction == "negative" for v in spec.variables])
    clean = (features[scored][:, negative] == 0).all(axis=1)
    level = cols.level[scored]
    shares = {lv.code: float(np.mean(level == i)) for i, lv in enumerate(spec.levels)}
    in_band = (score >= 600) & (score < 750)
    return CalibrationReport(
        model_version=spec.model_version,
        calibration_version=table.calibration_version,
        adults=int(scored.sum()),
        mean=float(score.mean()),
        sigma=float(score.std()),
        level_shares=shares,
        share_below_550=float(np.mean(score < 550)),
        share_at_or_above_750=float(np.mean(score >= 750)),
        clean_adults=int(clean.sum()),
        clean_share_600_750=float(in_band[clean].mean()) if clean.any() else math.nan,
        hard_rule_share=float(np.mean(cols.flags[scored] & 1 > 0)),
    )


def figure(spec: ModelSpec, scores: np.ndarray, title: str):
    """Share of adults per 5-point bin, the level bands shaded and labelled with their shares,
    and the target N(μ, σ) on the same scale. The band labels sit in headroom above the tallest
    bar and the legend below the axes, so that neither covers the data."""
    from matplotlib.figure import Figure

    lo, hi, width = 400, 900, 5
    scores = np.asarray(scores, np.float64)
    fig = Figure(figsize=(10, 5.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    bounds = [lv.min for lv in spec.levels] + [spec.scale_max + 1]
    colours = ["#f4cccc", "#fce5cd", "#d9ead3", "#cfe2f3", "#d9d2e9"]
    for i, lv in enumerate(spec.levels):
        a, b = max(bounds[i], lo), min(bounds[i + 1], hi)
        if a < b:
            share = 100 * np.mean((scores >= bounds[i]) & (scores < bounds[i + 1]))
            ax.axvspan(a, b, color=colours[i % len(colours)], alpha=0.7, lw=0)
            ax.text((a + b) / 2, 0.98, f"{lv.en}\n{f'≥{lv.min}' if lv.min else f'<{bounds[i + 1]}'}\n{share:.1f} %",
                    ha="center", va="top", transform=ax.get_xaxis_transform(), fontsize=8)
    counts, _, _ = ax.hist(scores, bins=np.arange(lo, hi + 1, width), weights=np.full(len(scores), 100 / len(scores)),
                           color="#3c78d8", alpha=0.85,
                           label=f"adults' scores (mean {scores.mean():.1f}, σ {scores.std():.1f} points)")
    x = np.linspace(lo, hi, 500)
    pdf = np.exp(-0.5 * ((x - spec.mu) / spec.sigma) ** 2) / (spec.sigma * math.sqrt(2 * math.pi))
    ax.plot(x, 100 * width * pdf, color="black", lw=1.5, label=f"target N({spec.mu:g}, {spec.sigma:g}²)")
    ax.set_xlim(lo, hi)
    ax.set_ylim(0, 1.3 * max(counts.max(), 100 * width * pdf.max()))
    ax.set_xlabel("score (points)")
    ax.set_ylabel(f"adults per {width}-point bin (%)")
    ax.set_title(title, fontsize=10)
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    return fig


def plot(spec: ModelSpec, scores: np.ndarray, path: str | Path, title: str) -> Path:
    """Write ``figure`` as a PNG (about 60 KB)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure(spec, scores, title).savefig(path)
    return path


def main(argv=None) -> CalibrationReport:
    from kernel.synthetic import generate_features

    ap = argparse.ArgumentParser(prog="python -m kernel.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--citizens", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=2018)
    ap.add_argument("--spec", default=None, help="model spec file (default: kernel/models/v2.toml)")
    ap.add_argument("--out", default=None, help="save the calibration table here (.npz)")
    ap.add_argument("--png", default=None, help="write the score histogram here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    if args.citizens < 1:
        ap.error("--citizens must be >= 1")
    spec = load_spec(args.spec)
    people, features = generate_features(spec, args.citizens, seed=args.seed)
    adult = people.adult
    table = calibrate(spec, features, adult, n_threads=args.threads)
    cols = Scorer(spec, table).score(features, adult, n_threads=args.threads)
    rep = report(spec, table, cols, features, adult)
    if args.out:
        table.save(args.out)
        print(f"calibration table written to {args.out}", file=sys.stderr)
    if args.png:
        plot(spec, cols.score[adult == 1], args.png, f"Synthetic city of {args.citizens:,} (seed {args.seed}): {rep.model_version}, {rep.calibration_version}")
        print(f"histogram written to {args.png}", file=sys.stderr)
    print(json.dumps(asdict(rep)) if args.json else "\n".join(rep.lines()))
    return rep


if __name__ == "__main__":
    main()
