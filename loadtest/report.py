"""Report of a load-test run: the service beside the bare-grpcio baseline, plotted and tabled.

    from loadtest.report import write_report
    write_report(bench_result, service_histogram, "data/bench/report", baseline=baseline_histogram)

The figure's top panel is the usual HDR "percentile distribution" of the open-loop run:
latency against the percentile on a scale that stretches the tail (1 / (1 - p)), so p99,
p99.9 and the maximum are readable next to the median, the service's curve beside the
baseline's at the same rate; the bottom panel gives each closed-loop throughput of the service
as a share of the baseline's. The HTML page embeds the PNG, tables the service's figures
beside the baseline's with their ratio, and lists every figure of the run with its unit. A run
without baseline figures says so rather than showing an empty column.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from loadtest.hdr import LOWER_NS, UPPER_NS, Histogram

#: (the figure with its unit, the service's key, the baseline's key) in loadtest.bench's result
SIDE_BY_SIDE = [
    ("unary Check, closed-loop maximum (checks/s)", "check_unary_rps", "baseline_unary_rps"),
    ("BatchCheck of 1,000 tokens, closed loop (checks/s)", "batch_checks_per_s", "baseline_batch_checks_per_s"),
    ("StreamCheck, closed loop (checks/s)", "stream_checks_per_s", "baseline_stream_checks_per_s"),
    ("open-loop p50 latency (ms)", "p50_ms", "baseline_p50_ms"),
    ("open-loop p99 latency (ms)", "p99_ms", "baseline_p99_ms"),
    ("open-loop p99.9 latency (ms)", "p999_ms", "baseline_p999_ms"),
    ("BatchCheck p99 latency, closed loop (ms)", "batch_p99_ms", "baseline_batch_p99_ms"),
    ("server CPU per unary Check (µs)", "check_unary_cpu_us", "baseline_unary_cpu_us"),
    ("server CPU per BatchCheck call (µs)", "batch_cpu_us", "baseline_batch_cpu_us"),
    ("server CPU per StreamCheck request (µs)", "stream_cpu_us", "baseline_stream_cpu_us"),
]

#: the bottom panel: (label, the service's key, the baseline's key)
THROUGHPUT = [("unary Check", "check_unary_rps", "baseline_unary_rps"),
              ("BatchCheck\n(1,000 tokens)", "batch_checks_per_s", "baseline_batch_checks_per_s"),
              ("StreamCheck", "stream_checks_per_s", "baseline_stream_checks_per_s")]

#: the latency targets drawn across the top panel
TARGETS = {"p99 target, 5 ms": 5.0, "p99.9 target, 15 ms": 15.0}


def unit(key: str) -> str:
    """The unit of one of loadtest.bench's figures, from the naming of its key."""
    for suffix, name in (("_ms", "ms"), ("_us", "µs"), ("_rps", "checks/s"), ("_per_s", "checks/s"),
                         ("_rate", "checks/s"), ("_ratio", "×"), ("_ratio_rounds", "×"), ("_s", "s"),
                         ("_errors", "calls by status"), ("_ok", "calls"), ("processes", "worker processes"),
                         ("cpu_count", "cores")):
        if key.endswith(suffix):
            return name
    return ""


def _number(v, digits: int = 4) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}g}"


def has_baseline(result: dict) -> bool:
    return any(result.get(theirs) is not None for _, _, theirs in SIDE_BY_SIDE)


def percentile_curve(hist: Histogram) -> tuple[np.ndarray, np.ndarray]:
    """(percentile in [0, 1), latency in ms at the upper edge of each non-empty bucket)."""
    nz = np.flatnonzero(hist.counts)
    cum = np.cumsum(hist.counts[nz]) / hist.count
    # the fraction *below* each bucket's upper edge; drop the final 1.0 (infinite on the axis)
    return np.concatenate([[0.0], cum[:-1]]), UPPER_NS[nz] / 1e6


def figure(result: dict, hist: Histogram, baseline: Histogram | None = None):
    """The report's figure (see the module docstring); the legend sits above the axes and each
    ratio inside its bar (beside it when the bar is too short), so that no text covers data."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    bars = [(label, result[ours] / result[theirs]) for label, ours, theirs in THROUGHPUT
            if result.get(ours) is not None and result.get(theirs)]
    fig = Figure(figsize=(10, 7.5 if bars else 5.5), dpi=100, layout="constrained")
    axes = fig.subplots(2, 1, height_ratios=[3, 1.2]) if bars else [fig.add_subplot()]
    ax = axes[0]
    top = 10.0
    for name, h, colour in (("service", hist, "#3c78d8"), ("baseline, bare grpcio", baseline, "#999999")):
        if h is None or h.count == 0:
            continue
        p, ms = percentile_curve(h)
        x = 1.0 / (1.0 - p)
        top = max(top, x.max())
        ax.step(x, ms, where="post", color=colour, lw=1.8,
                label=f"{name}: p50 {_number(1e3 * h.percentile(50), 3)} ms, p99 {_number(1e3 * h.percentile(99), 3)} ms")
    for (name, target), style in zip(TARGETS.items(), ("--", ":")):
        ax.axhline(target, color="#cc0000", lw=1, ls=style, label=name)
    ticks = [(1, "0"), (2, "50"), (10, "90"), (100, "99"), (1000, "99.9"), (10000, "99.99"), (100000, "99.999")]
    ticks = [t for t in ticks if t[0] <= top * 1.5]
    ax.set_xscale("log")
    ax.set_xticks([t[0] for t in ticks], [t[1] for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(bottom=0)
    ax.set_xlabel("percentile (%), the tail stretched")
    ax.set_ylabel("latency from the intended send time (ms)")
    ax.set_title(f"Open-loop Check at {_number(result.get('open_loop_rps') or 0)} checks/s (half the service's "
                 f"closed-loop maximum), {result.get('processes')} worker process(es)", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    fig.legend(loc="outside upper center", ncols=2, fontsize=8, frameon=False)
    if bars:
        bx = axes[1]
        pct = np.array([100 * r for _, r in bars])
        y = np.arange(len(bars))[::-1]
        bx.barh(y, pct, height=0.6, color="#3c78d8")
        bx.axvline(100, color="#999999", lw=1.2, ls="--", zorder=0.5)  # under the bars and their labels
        right = 1.1 * max(100.0, pct.max())
        bx.set_xlim(0, right)
        for yi, v in zip(y, pct):
            inside = v > 0.12 * right
            bx.text(v + (-0.01 if inside else 0.01) * right, yi, f"{v:.0f} %", ha="right" if inside else "left",
                    va="center", color="white" if inside else "black", fontsize=8, fontweight="bold")
        bx.set_yticks(y, [label for label, _ in bars], fontsize=8)
        bx.set_xlabel("service throughput, closed loop (% of the baseline's; dashed: 100 %)")
    return fig


def _table(result: dict) -> str:
    """The service's figures beside the baseline's, or a plain sentence when the run has none."""
    if not has_baseline(result):
        return ("<p><strong>This run has no baseline figures</strong>: the bare-grpcio baseline was not "
                "measured, so there is nothing to show beside the service. The service's figures are below.</p>")
    head = ("<tr><th scope=\"col\">figure (unit)</th><th scope=\"col\">service</th>"
            "<th scope=\"col\">baseline (bare grpcio)</th><th scope=\"col\">service / baseline (×)</th></tr>")
    rows = []
    for label, ours, theirs in SIDE_BY_SIDE:
        a, b = result.get(ours), result.get(theirs)
        if a is None:
            continue
        ratio = _number(a / b, 3) if b else "—"
        rows.append(f"<tr><th scope=\"row\">{html.escape(label)}</th><td>{_number(a)}</td>"
                    f"<td>{_number(b) if b is not None else 'not measured'}</td><td>{ratio}</td></tr>")
    return f"<table class=\"side\">{head}\n" + "\n".join(rows) + "</table>"


def write_report(result: dict, hist: Histogram, stem: str | Path, baseline: Histogram | None = None) -> tuple[Path, Path]:
    """Write <stem>.png and <stem>.html for a run of loadtest.bench; ``hist`` and ``baseline``
    are the open-loop latencies of the service and of the baseline at the same rate."""
    stem = Path(stem)
    png = stem.with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    figure(result, hist, baseline).savefig(png)
    img = base64.b64encode(png.read_bytes()).decode()
    every = "\n".join(f"<tr><td><code>{html.escape(k)}</code></td><td>{html.escape(json.dumps(v))}</td>"
                      f"<td>{html.escape(unit(k))}</td></tr>" for k, v in result.items())
    what = ("The service and the bare-grpcio baseline (loadtest/baseline_server.py) measured in the same run on "
            "loopback, the same way" if has_baseline(result) else "The service measured on loopback")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Qianjiang Score load test</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:2px 12px;border-bottom:1px solid #ddd}}
th{{text-align:left;font-weight:normal}}.side td{{text-align:right}}.side tr:first-child th{{font-weight:bold}}</style>
</head><body>
<h1>Qianjiang Score — load test</h1>
<p>{what} (python -m loadtest.bench). Throughput is closed loop; latency is open loop at the
same rate for both, from the intended send time. Ratios are service / baseline of the two figures shown.</p>
{_table(result)}
<img alt="latency percentile distribution and throughput against the baseline" src="data:image/png;base64,{img}" style="width:100%">
<h2>Every figure of the run</h2>
<table><tr><th>key</th><th>value</th><th>unit</th></tr>
{every}</table>
</body></html>
"""
    out = stem.with_suffix(".html")
    out.write_text(page)
    return png, out


__all__ = ["write_report", "figure", "percentile_curve", "unit", "has_baseline", "LOWER_NS"]
