"""The reports a person reads: the calibration figure, the load report (figure and page) and
the kernel benchmark's figures. Text must keep off the data and off other text, every number
must carry its unit, the baseline must stand beside the service, and the kernel's floor must
move at least the bytes the kernel moves, timed in the same interleaved rounds."""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from kernel import bench
from kernel.calibrate import figure as calibration_figure
from kernel.columns import ScoreColumns
from kernel.score import Scorer
from loadtest.hdr import Histogram
from loadtest.report import SIDE_BY_SIDE, unit, write_report
from loadtest.report import figure as load_figure

#: one line of ``python -m loadtest.bench --citizens 3000 --seconds 1 --rounds 2`` on loopback
RESULT = {
    "processes": 2, "metrics": True, "audit_log": True, "event_loop": "uvloop",
    "baseline_unary_rps": 3985.0, "check_unary_rps": 3327.5, "unary_ratio": 0.839, "unary_ratio_rounds": [0.894, 0.784],
    "check_unary_closed_p50_ms": 4.7095, "check_unary_closed_p99_ms": 7.9445, "check_unary_cpu_us": 326.1,
    "baseline_unary_cpu_us": 257.6, "unary_cpu_ratio": 0.79, "unary_client_cpu_us": 201.4, "open_loop_rps": 1657.2,
    "p50_ms": 0.881, "p90_ms": 2.327, "p99_ms": 29.491, "p999_ms": 34.603, "max_ms": 34.929, "open_loop_errors": {},
    "open_loop_runner_cpu_s": 3.048, "open_loop_max_schedule_lag_ms": 3.517, "baseline_p50_ms": 0.631,
    "baseline_p99_ms": 4.178, "baseline_p999_ms": 10.224, "batch_checks_per_s": 2841000.0,
    "baseline_batch_checks_per_s": 4178000.0, "batch_ratio": 0.68, "batch_ratio_rounds": [0.684, 0.676],
    "batch_p99_ms": 20.5535, "baseline_batch_p99_ms": 17.303, "stream_checks_per_s": 9792.0,
    "baseline_stream_checks_per_s": 11648.0, "stream_ratio": 0.84, "batch_cpu_us": 489.7, "baseline_batch_cpu_us": 270.9,
    "batch_cpu_ratio": 0.553, "batch_client_cpu_us": 213.3, "stream_cpu_us": 115.4, "baseline_stream_cpu_us": 82.4,
    "stream_cpu_ratio": 0.713, "batch_errors": {}, "stream_errors": {}, "overload_rate": 6655.0, "overload_ok": 4261,
    "overload_errors": {"CANCELLED": 15704}, "overload_p99_ms": 513.802, "overload_error_p99_ms": 369.099,
    "overload_runner_cpu_s": 2.26, "overload_max_schedule_lag_ms": 81.396, "recovery_errors": {},
    "recovery_p99_ms": 7.209, "cpu_count": 2,
}
UNITLESS = {"metrics", "audit_log", "event_loop"}
BASELINE_KEYS = {k for k in RESULT if k.startswith("baseline_")}


def _latencies(seed: int, median_s: float, tail_s: float) -> Histogram:
    """An open-loop-like run: a lognormal body and a flat tail of 5 %."""
    rng = np.random.default_rng(seed)
    h = Histogram()
    h.record_many(rng.lognormal(np.log(median_s), 0.6, 9500))
    h.record_many(rng.uniform(median_s, tail_s, 500))
    return h


# --- geometry of a drawn figure --------------------------------------------------------------


def _drawn(fig):
    FigureCanvasAgg(fig).draw()
    return fig.canvas.get_renderer()


def _box(artist, renderer):
    return artist.get_window_extent(renderer)


def _line_points(line) -> np.ndarray:
    """Display coordinates along a drawn line, its segments sampled every few pixels (and the
    corners of a step line put back), so that text lying across a segment is caught."""
    xy = line.get_transform().transform(line.get_xydata())
    if line.get_drawstyle() == "steps-post" and len(xy) > 1:
        corners = np.column_stack([xy[1:, 0], xy[:-1, 1]])
        xy = np.insert(xy, np.arange(1, len(xy)), corners, axis=0)
    out = [xy[:1]]
    for a, b in zip(xy[:-1], xy[1:]):
        k = int(np.hypot(*(b - a)) // 3) + 2
        out.append(a + np.linspace(0, 1, k)[1:, None] * (b - a))
    return np.concatenate(out)


def _visible_points(ax, renderer) -> np.ndarray:
    """Points of the axes' lines, less those hidden under a bar drawn above the line."""
    bars = _bars(ax)
    out = []
    for line in ax.get_lines():
        xy = _line_points(line)
        for bar in bars:
            if bar.get_zorder() > line.get_zorder():
                b = _box(bar, renderer)
                xy = xy[~((xy[:, 0] >= b.x0) & (xy[:, 0] <= b.x1) & (xy[:, 1] >= b.y0) & (xy[:, 1] <= b.y1))]
        out.append(xy)
    return np.concatenate(out)


def _hits(box, points: np.ndarray) -> int:
    inside = (points[:, 0] > box.x0) & (points[:, 0] < box.x1) & (points[:, 1] > box.y0) & (points[:, 1] < box.y1)
    return int(inside.sum())


def _overlap(a, b) -> bool:
    """Two display boxes share area (touching edges do not count)."""
    return a.x0 < b.x1 - 0.5 and b.x0 < a.x1 - 0.5 and a.y0 < b.y1 - 0.5 and b.y0 < a.y1 - 0.5


def _visible_ticklabels(axis, renderer):
    return [(t.get_text(), _box(t, renderer)) for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]


def _assert_no_text_overlaps(named_boxes):
    for (na, a), (nb, b) in itertools.combinations(named_boxes, 2):
        assert not _overlap(a, b), f"{na!r} overlaps {nb!r}"


def _assert_ticklabels_apart(ax, renderer):
    for axis in (ax.xaxis, ax.yaxis):
        labels = _visible_ticklabels(axis, renderer)
        assert labels, "an axis without labelled ticks"
        _assert_no_text_overlaps(labels)


def _bars(ax):
    return [p for c in ax.containers for p in c.patches if p.get_height() and p.get_width()]


# --- the calibration figure ------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibration_fig(spec, city, calibration):
    people, features = city
    scores = Scorer(spec, calibration).score(features, people.adult).score[people.adult == 1]
    fig = calibration_figure(spec, scores, "Synthetic city of 20,000 (seed 11)")
    return fig, _drawn(fig), scores


def test_calibration_labels_keep_off_the_bars_and_the_curve(calibration_fig):
    fig, renderer, scores = calibration_fig
    (ax,) = fig.axes
    bars = [_box(p, renderer) for p in _bars(ax)]
    curve = np.concatenate([_line_points(line) for line in ax.get_lines()])
    assert len(bars) > 50 and len(curve) > 100
    assert len(ax.texts) == 5, "one label a level band"
    for text in ax.texts:
        box = _box(text, renderer)
        assert not any(_overlap(box, b) for b in bars), f"band label {text.get_text()!r} covers a bar"
        assert _hits(box, curve) == 0, f"band label {text.get_text()!r} covers the target curve"
    (legend,) = fig.legends
    legend_box = _box(legend, renderer)
    assert not _overlap(legend_box, _box(ax, renderer)), "the legend is on the plot area"
    assert _hits(legend_box, curve) == 0 and not any(_overlap(legend_box, b) for b in bars)


def test_calibration_text_does_not_collide(calibration_fig):
    fig, renderer, _ = calibration_fig
    (ax,) = fig.axes
    _assert_ticklabels_apart(ax, renderer)
    texts = [(t.get_text(), _box(t, renderer)) for t in ax.texts]
    texts += [("title", _box(ax.title, renderer)), ("x label", _box(ax.xaxis.label, renderer)),
              ("y label", _box(ax.yaxis.label, renderer)), ("legend", _box(fig.legends[0], renderer))]
    _assert_no_text_overlaps(texts)
    ticks = _visible_ticklabels(ax.xaxis, renderer) + _visible_ticklabels(ax.yaxis, renderer)
    for name, box in texts:
        for tick, tbox in ticks:
            assert not _overlap(box, tbox), f"{name!r} overlaps the tick label {tick!r}"


def test_calibration_axes_carry_units_and_the_bands_their_shares(calibration_fig):
    fig, _, scores = calibration_fig
    (ax,) = fig.axes
    assert ax.get_xlabel().endswith("(points)") and ax.get_ylabel().endswith("(%)")
    # the bars are shares of adults in %: they add up to the share inside the plotted range
    heights = sum(p.get_height() for p in _bars(ax))
    assert heights == pytest.approx(100 * np.mean((scores >= 400) & (scores <= 900)), abs=0.01)
    shares = [float(re.search(r"([\d.]+) %$", t.get_text()).group(1)) for t in ax.texts]
    assert sum(shares) == pytest.approx(100, abs=0.3)


# --- the load report ---------------------------------------------------------------------------


def _with_throughput(unary: float, batch: float, stream: float) -> dict:
    """RESULT with the service's closed-loop throughputs set to these shares of the baseline's."""
    return RESULT | {"check_unary_rps": unary * RESULT["baseline_unary_rps"],
                     "batch_checks_per_s": batch * RESULT["baseline_batch_checks_per_s"],
                     "stream_checks_per_s": stream * RESULT["baseline_stream_checks_per_s"]}


@pytest.mark.parametrize("result", [RESULT, _with_throughput(1.06, 0.01, 0.999)], ids=["bench-run", "extreme-ratios"])
def test_load_figure_keeps_text_off_the_data(result):
    fig = load_figure(result, _latencies(1, 0.0009, 0.035), baseline=_latencies(2, 0.0006, 0.010))
    renderer = _drawn(fig)
    lat, thr = fig.axes
    curves = [line for line in lat.get_lines() if line.get_drawstyle() == "steps-post"]
    assert len(curves) == 2, "the service's curve and the baseline's"
    points = np.concatenate([_visible_points(ax, renderer) for ax in fig.axes])
    bars = _bars(thr)
    assert len(bars) == 3
    (legend,) = fig.legends
    legend_box = _box(legend, renderer)
    for ax in fig.axes:
        assert not _overlap(legend_box, _box(ax, renderer)), "the legend is on a plot area"
    assert _hits(legend_box, points) == 0
    assert len(thr.texts) == 3, "one ratio a bar"
    bar_boxes = [_box(b, renderer) for b in bars]
    plot_area = _box(thr, renderer)
    for text in thr.texts:
        box = _box(text, renderer)
        name = text.get_text()
        assert _hits(box, points) == 0, f"ratio {name!r} lies across a line"
        (own,) = [b for b in bar_boxes if b.y0 <= box.y0 and box.y1 <= b.y1]  # level with one bar only
        inside = own.x0 <= box.x0 and box.x1 <= own.x1
        assert inside or not _overlap(box, own), f"ratio {name!r} straddles its bar's end"
        assert not any(_overlap(box, b) for b in bar_boxes if b is not own), f"ratio {name!r} covers another bar"
        assert plot_area.x0 <= box.x0 and box.x1 <= plot_area.x1, f"ratio {name!r} leaves the plot"
    named = [("legend", legend_box)]
    for i, ax in enumerate(fig.axes):
        _assert_ticklabels_apart(ax, renderer)
        named += [(f"x label {i}", _box(ax.xaxis.label, renderer)), (f"y label {i}", _box(ax.yaxis.label, renderer))]
    named += [("title", _box(lat.title, renderer))] + [(t.get_text(), _box(t, renderer)) for t in thr.texts]
    _assert_no_text_overlaps(named)


def test_load_figure_axes_carry_units():
    fig = load_figure(RESULT, _latencies(1, 0.0009, 0.035), baseline=_latencies(2, 0.0006, 0.010))
    lat, thr = fig.axes
    assert lat.get_ylabel().endswith("(ms)") and "(%)" in lat.get_xlabel()
    assert "% of the baseline" in thr.get_xlabel()
    assert "checks/s" in lat.get_title()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("service") for t in legend) and any(t.startswith("baseline") for t in legend)
    assert all("ms" in t for t in legend)


class _Tables(HTMLParser):
    """The rows of every table of a page: lists of (tag, text) cells."""

    def __init__(self):
        super().__init__()
        self.tables, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = [tag, ""]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(tuple(self._cell))
            self._cell = None


def _tables(page) -> list:
    parser = _Tables()
    parser.feed(page.read_text())
    return parser.tables


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def test_report_sets_the_baseline_beside_the_service(tmp_path):
    png, page = write_report(RESULT, _latencies(1, 0.0009, 0.035), tmp_path / "report",
                             baseline=_latencies(2, 0.0006, 0.010))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "data:image/png;base64," in page.read_text()
    side, every = _tables(page)
    assert [text for _, text in side[0]] == ["figure (unit)", "service", "baseline (bare grpcio)", "service / baseline (×)"]
    assert len(side) - 1 == len(SIDE_BY_SIDE)
    for (label, ours, theirs), row in zip(SIDE_BY_SIDE, side[1:]):
        (tag, head), *cells = row
        assert tag == "th" and head == label
        assert re.search(r"\((checks/s|ms|µs)\)$", head), f"no unit in {head!r}"
        service, baseline, ratio = (_number(text) for _, text in cells)
        assert service == pytest.approx(RESULT[ours], rel=5e-4) and baseline == pytest.approx(RESULT[theirs], rel=5e-4)
        assert ratio == pytest.approx(RESULT[ours] / RESULT[theirs], rel=5e-3)
    # every figure of the run is listed, each with its unit
    listed = {row[0][1]: row[2][1] for row in every[1:]}
    assert listed.keys() == RESULT.keys()
    assert all(listed[k] for k in RESULT if k not in UNITLESS), [k for k in RESULT if not listed[k] and k not in UNITLESS]


def test_every_bench_figure_has_a_unit():
    assert {k: unit(k) for k in RESULT if not unit(k)}.keys() == UNITLESS
    assert (unit("p99_ms"), unit("check_unary_rps"), unit("batch_checks_per_s"), unit("batch_cpu_us")) == \
        ("ms", "checks/s", "checks/s", "µs")


def test_a_run_without_baseline_says_so(tmp_path):
    result = {k: v for k, v in RESULT.items() if k not in BASELINE_KEYS}
    png, page = write_report(result, _latencies(1, 0.0009, 0.035), tmp_path / "report")
    text = page.read_text()
    assert "no baseline figures" in text and "baseline (bare grpcio)</th>" not in text
    assert "measured in the same run" not in text
    assert len(_tables(page)) == 1, "only the list of every figure"
    fig = load_figure(result, _latencies(1, 0.0009, 0.035))
    (ax,) = fig.axes
    assert [line.get_label().split(":")[0] for line in ax.get_lines() if line.get_drawstyle() == "steps-post"] == ["service"]


# --- the kernel benchmark ----------------------------------------------------------------------


def test_rounds_interleave_the_figures():
    calls = []
    times = bench.interleaved(3, {name: (lambda name=name: calls.append(name)) for name in ("kernel", "reference", "floor")})
    assert calls == ["kernel", "reference", "floor"] * 3
    assert {name: len(ts) for name, ts in times.items()} == {"kernel": 3, "reference": 3, "floor": 3}


class _Pool(ThreadPoolExecutor):
    """A thread pool that keeps the work items of every ``map``, and the threads that ran them."""

    def __init__(self, n_threads):
        super().__init__(n_threads)
        self.blocks, self.threads = [], set()

    def map(self, fn, *iterables, **kw):
        items = list(iterables[0])
        self.blocks.append(items)

        def run(item):
            self.threads.add(threading.get_ident())
            time.sleep(0.01)  # hold this thread, so the other block goes to the other one
            return fn(item)

        return super().map(run, items, **kw)


def test_floor_reads_and_writes_what_the_kernel_does_in_two_halves(spec, monkeypatch):
    n = 10_001
    features = np.ones((n, len(spec.variables)), np.float32)
    adult = np.ones(n, np.uint8)
    sinks, allocate = [], ScoreColumns.empty

    def empty(rows):
        cols = allocate(rows)
        for name in ScoreColumns.DTYPES:
            getattr(cols, name).fill(7)
        sinks.append(cols)
        return cols

    monkeypatch.setattr(bench.ScoreColumns, "empty", empty)
    with _Pool(2) as pool:
        floor, read, written = bench.memory_floor(pool, 2, features, adult)
        floor()
    (halves,) = pool.blocks
    assert len(halves) == 2 and halves[0].start == 0 and halves[0].stop == halves[1].start and halves[1].stop == n
    assert len(pool.threads) == 2
    (sink,) = sinks
    assert all((getattr(sink, name) == 0).all() for name in ScoreColumns.DTYPES), "the floor did not write every column"
    assert read == features.nbytes + adult.nbytes
    assert written == sum(getattr(sink, name).nbytes for name in ScoreColumns.DTYPES)


def test_kernel_bench_reports_interleaved_rounds_and_an_honest_floor(spec, capsys, monkeypatch):
    n, rounds = 20_000, 3
    pools = []
    monkeypatch.setattr(bench, "ThreadPoolExecutor", lambda n_threads: pools.append(_Pool(n_threads)) or pools[-1])
    r = bench.main(["--citizens", str(n), "--rounds", str(rounds), "--single-calls", "2000"])
    (pool,) = pools
    assert len(pool.blocks) == 1 + rounds, "one untimed call, then one a round"
    assert all(len(blocks) == 2 for blocks in pool.blocks) and len(pool.threads) == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == r
    assert r["round_order"] == ["kernel_1t", "kernel_2t", "reference", "floor"] and r["rounds"] == rounds
    for name in r["round_order"]:
        ts = r["rounds_s"][name]
        assert len(ts) == rounds and all(t > 0 for t in ts)
        assert r[f"{name}_median_s"] == pytest.approx(np.median(ts), abs=2e-5)
        assert r[f"{name}_min_s"] == pytest.approx(min(ts), abs=2e-5)
    # the floor moves at least the kernel's bytes: features and adult flags in, the columns out
    row_out = sum(np.dtype(dtype).itemsize * int(np.prod(shape)) for dtype, shape in ScoreColumns.DTYPES.values())
    kernel_in = n * (len(spec.variables) * np.dtype(r["dtype"]).itemsize + np.dtype(np.uint8).itemsize)
    assert r["floor_read_bytes"] >= kernel_in and r["floor_written_bytes"] >= n * row_out
    assert (r["kernel_read_bytes"], r["kernel_written_bytes"]) == (kernel_in, n * row_out)
    assert r["floor_threads"] == 2
    med = {name: np.median(r["rounds_s"][name]) for name in r["round_order"]}
    assert r["kernel_2t_over_floor"] == pytest.approx(med["kernel_2t"] / med["floor"], rel=0.05)
    assert r["reference_over_kernel_1t"] == pytest.approx(med["reference"] / med["kernel_1t"], rel=0.05)
    assert r["reference_over_kernel_1t"] > 1 and r["matches_reference"]
    assert not {"memory_floor_s", "cython_2t_s", "numpy_reference_s"} & r.keys(), "figures without their unit or rounds"

