"""Report of a load-test run: the latency distribution plotted, and the figures beside it.

    from loadtest.report import write_report
    write_report(bench_result, open_loop_histogram, "data/bench/report")   # .png and .html

The plot is the usual HDR "percentile distribution": latency against the percentile on a
scale that stretches the tail (1 / (1 - p)), so p99, p99.9 and the maximum are readable next
to the median. The HTML page embeds the PNG and lists every figure of the run.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from loadtest.hdr import LOWER_NS, UPPER_NS, Histogram


def percentile_curve(hist: Histogram) -> tuple[np.ndarray, np.ndarray]:
    """(percentile in [0, 1), latency in ms at the upper edge of each non-empty bucket)."""
    nz = np.flatnonzero(hist.counts)
    cum = np.cumsum(hist.counts[nz]) / hist.count
    # the fraction *below* each bucket's upper edge; drop the final 1.0 (infinite on the axis)
    return np.concatenate([[0.0], cum[:-1]]), UPPER_NS[nz] / 1e6


def plot(hist: Histogram, path: Path, title: str, marks: dict[str, float] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, ms = percentile_curve(hist)
    x = 1.0 / (1.0 - p)
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    ax.step(x, ms, where="post", color="#3c78d8", lw=1.8, label="latency from the intended send time")
    for name, target in (marks or {}).items():
        ax.axhline(target, color="#cc0000", lw=1, ls="--")
        ax.text(1.05, target, f" {name}", color="#cc0000", va="bottom", fontsize=8)
    ticks = [(1, "0%"), (2, "50%"), (10, "90%"), (100, "99%"), (1000, "99.9%"), (10000, "99.99%")]
    ticks = [t for t in ticks if t[0] <= max(x.max(), 10) * 1.5]
    ax.set_xscale("log")
    ax.set_xticks([t[0] for t in ticks], [t[1] for t in ticks])
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(result: dict, hist: Histogram, stem: str | Path) -> tuple[Path, Path]:
    """Write <stem>.png and <stem>.html for a run of loadtest.bench."""
    stem = Path(stem)
    rate = result.get("open_loop_rps")
    png = plot(hist, stem.with_suffix(".png"),
               f"Open-loop Check at {rate}/s (half the closed-loop maximum), {result.get('processes')} worker(s)",
               marks={"5 ms (p99 target)": 5.0, "15 ms (p99.9 target)": 15.0})
    img = base64.b64encode(png.read_bytes()).decode()
    rows = "\n".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(json.dumps(v))}</td></tr>" for k, v in result.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Qianjiang Score load test</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td{{padding:2px 12px;border-bottom:1px solid #ddd}}</style>
</head><body>
<h1>Qianjiang Score — load test</h1>
<p>Service and bare-grpcio baseline measured in the same run on loopback (python -m loadtest.bench).</p>
<img alt="latency percentile distribution" src="data:image/png;base64,{img}" style="width:100%">
<table>{rows}</table>
</body></html>
"""
    out = stem.with_suffix(".html")
    out.write_text(page)
    return png, out


__all__ = ["write_report", "plot", "percentile_curve", "LOWER_NS"]
