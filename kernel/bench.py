"""Kernel benchmark: ``python -m kernel.bench --citizens 2000000``.

Scores a synthetic city with the Cython kernel on 1 and 2 threads and with the numpy
reference, and times the memory floor, in interleaved rounds (kernel 1 thread, kernel 2
threads, reference, floor; then again, ``--rounds`` times), so that a slow spell of this
shared machine hits every figure alike; each is reported as the median and the minimum of its
rounds. The floor is what no 2-thread kernel can beat: the same 2 threads reading every byte
the kernel reads (the features and the adult flags) and writing every byte it writes (its
output columns), with numpy calls that release the GIL and do next to nothing with the bytes.

Figures carry their unit in their name (``_s``, ``_us``, ``_ns``, ``_bytes``, ``_gb_per_s``)
and ratios read ``a_over_b``. A table goes to stderr; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kernel.calibration import RawHistogram
from kernel.columns import ScoreColumns
from kernel.reference import score_reference
from kernel.score import Scorer
from kernel.spec import load_spec
from kernel.synthetic import generate_features

#: the kernel's parallel figure and the floor use this many threads
THREADS = 2

#: what each timed figure is, in round order
LABELS = {
    "kernel_1t": "kernel, 1 thread",
    "kernel_2t": f"kernel, {THREADS} threads",
    "reference": "numpy reference",
    "floor": f"memory floor, {THREADS} threads",
}


def interleaved(rounds: int, fns: dict) -> dict[str, list[float]]:
    """Seconds of every function in every round, the functions run in turn within a round,
    so that a slow spell of this shared machine hits all of them alike instead of one."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def best_of(repeats: int, fn) -> float:
    return min(interleaved(repeats, {"fn": fn})["fn"])


def memory_floor(pool: ThreadPoolExecutor, n_threads: int, features: np.ndarray, adult: np.ndarray):
    """(floor, bytes read, bytes written): ``floor()`` reads the features and the adult flags
    and writes zeros over columns of the kernel's output sizes, in ``n_threads`` contiguous
    row blocks, one a thread of ``pool``; the byte counts are those of the blocks it touches."""
    n = len(adult)
    cols = ScoreColumns.empty(n)
    sink = [getattr(cols, name) for name in ScoreColumns.DTYPES]
    bounds = np.linspace(0, n, n_threads + 1).astype(int)
    blocks = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def block(rows: slice) -> None:
        features[rows].max(initial=0)
        adult[rows].max(initial=0)
        for col in sink:
            col[rows] = 0

    def floor() -> None:
        list(pool.map(block, blocks))

    read = sum(features[rows].nbytes + adult[rows].nbytes for rows in blocks)
    written = sum(col[rows].nbytes for col in sink for rows in blocks)
    return floor, read, written


def _batch_check_seconds(out: ScoreColumns, adult: np.ndarray, seed: int, repeats: int) -> float:
    """Seconds of one Checker.check of 1,000 random known cards over the whole city (64
    distinct batches in turn, so the lookups are as cold as a city's cards make them)."""
    from server.token_index import Checker, TokenIndex, pack_gate

    n = len(adult)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    index = TokenIndex.allocate(n)
    index.insert_many(tokens, np.arange(n, dtype=np.int32))
    consent = (rng.random(n) < 0.85).astype(np.uint8)
    gate = pack_gate(adult, consent, out.score, out.flags, np.zeros(n, np.uint32))
    checker = Checker(index, gate, rng.integers(1, 2**63, n, dtype=np.uint64))
    batches = [tokens[rng.integers(0, n, 1000)].tobytes() for _ in range(64)]

    def run():
        for b in batches:
            checker.check(b, 600, True, 0)

    return best_of(repeats, run) / len(batches)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m kernel.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--citizens", type=int, default=2_000_000)
    ap.add_argument("--rounds", type=int, default=7,
                    help="interleaved rounds of kernel, reference and floor (median and minimum are kept)")
    ap.add_argument("--single-calls", type=int, default=200_000)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--seed", type=int, default=2018)
    ap.add_argument("--spec", default=None, help="model spec file (default: kernel/models/v2.toml)")
    args = ap.parse_args(argv)
    if args.citizens < 1:
        ap.error("--citizens must be >= 1")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")

    spec = load_spec(args.spec)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"generating {args.citizens:,} citizens ({args.dtype}) ...")
    people, features = generate_features(spec, args.citizens, seed=args.seed, dtype=np.dtype(args.dtype))
    adult = people.adult
    del people

    log("calibrating ...")
    raw = Scorer(spec).score(features, adult).raw
    hist = RawHistogram.empty(spec)
    hist.add(raw[adult == 1])
    calibration = hist.freeze()
    scorer = Scorer(spec, calibration)
    out = ScoreColumns.empty(args.citizens)

    log(f"timing: {args.rounds} interleaved rounds ...")
    ref_holder = {}
    with ThreadPoolExecutor(THREADS) as pool:
        floor, floor_read, floor_written = memory_floor(pool, THREADS, features, adult)
        # one untimed call of each writer, so first-touch page faults are in no round
        scorer.score(features, adult, out=out, n_threads=THREADS)
        floor()
        times = interleaved(args.rounds, {
            "kernel_1t": lambda: scorer.score(features, adult, out=out, n_threads=1),
            "kernel_2t": lambda: scorer.score(features, adult, out=out, n_threads=THREADS),
            "reference": lambda: ref_holder.update(r=score_reference(spec, calibration, features, adult)),
            "floor": floor,
        })
    ref = ref_holder["r"]
    matches = bool(
        np.array_equal(out.score, ref.score) and np.array_equal(out.level, ref.level)
        and np.array_equal(out.reasons, ref.reasons) and np.array_equal(out.flags, ref.flags)
    )

    bound = scorer.bind(features, adult, out)
    rows = np.random.default_rng(args.seed).integers(0, args.citizens, args.single_calls).tolist()
    rescore = bound.rescore

    def single():
        for r in rows:
            rescore(r)

    single_s = best_of(3, single)

    log("batch eligibility checks ...")
    batch_s = _batch_check_seconds(out, adult, args.seed, args.rounds)

    med = {name: float(np.median(ts)) for name, ts in times.items()}
    low = {name: min(ts) for name, ts in times.items()}
    kernel_in = features.nbytes + adult.nbytes
    kernel_out = sum(getattr(out, name).nbytes for name in ScoreColumns.DTYPES)
    result = {
        "citizens": args.citizens,
        "variables": len(spec.variables),
        "dtype": args.dtype,
        "model_version": spec.model_version,
        "rounds": args.rounds,
        "round_order": list(times),
        **{f"{name}_median_s": round(med[name], 5) for name in times},
        **{f"{name}_min_s": round(low[name], 5) for name in times},
        "rounds_s": {name: [round(t, 5) for t in ts] for name, ts in times.items()},
        "kernel_read_bytes": kernel_in,
        "kernel_written_bytes": kernel_out,
        "floor_threads": THREADS,
        "floor_read_bytes": floor_read,
        "floor_written_bytes": floor_written,
        "floor_gb_per_s": round((floor_read + floor_written) / med["floor"] / 1e9, 2),
        # ratios of the medians
        "kernel_2t_over_floor": round(med["kernel_2t"] / med["floor"], 2),
        "reference_over_kernel_1t": round(med["reference"] / med["kernel_1t"], 2),
        "reference_over_kernel_2t": round(med["reference"] / med["kernel_2t"], 2),
        "kernel_1t_over_kernel_2t": round(med["kernel_1t"] / med["kernel_2t"], 3),
        "single_citizen_us": round(single_s / len(rows) * 1e6, 3),
        # server/token_index.pyx Checker: one station batch of 1,000 random cards of this city
        "batch_check_1000_us": round(batch_s * 1e6, 2),
        "batch_checks_per_s_1t": round(1000 / batch_s),
        "ns_per_citizen_1t": round(med["kernel_1t"] / args.citizens * 1e9, 1),
        "matches_reference": matches,
        "cpu_count": os.cpu_count(),
    }
    log(f"\n{args.citizens:,} citizens, {args.rounds} interleaved rounds")
    log(f"  {'figure':<48} {'median (ms)':>11} {'min (ms)':>10}")
    for name, label in LABELS.items():
        log(f"  {label:<48} {1e3 * med[name]:11.2f} {1e3 * low[name]:10.2f}")
    log(f"  floor moves {floor_read / 1e6:,.1f} MB read + {floor_written / 1e6:,.1f} MB written "
        f"({result['floor_gb_per_s']} GB/s); the kernel reads {kernel_in / 1e6:,.1f} MB, writes {kernel_out / 1e6:,.1f} MB")
    log(f"  kernel 2t / floor {result['kernel_2t_over_floor']}x, reference / kernel 1t {result['reference_over_kernel_1t']}x, "
        f"reference / kernel 2t {result['reference_over_kernel_2t']}x, kernel 1t / 2t {result['kernel_1t_over_kernel_2t']}x")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
