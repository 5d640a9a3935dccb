"""Kernel benchmark: ``python -m kernel.bench --citizens 2000000``.

Scores a synthetic city with the Cython kernel on 1 and 2 threads, with the numpy
reference, and times one ``sum()`` over the very same feature array (the memory-read floor),
all in one run so the ratios are fair on a shared, noisy machine. Each figure is the best
of several repeats. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from kernel.calibration import RawHistogram
from kernel.columns import ScoreColumns
from kernel.reference import score_reference
from kernel.score import Scorer
from kernel.spec import load_spec
from kernel.synthetic import generate_features


def best_of(repeats: int, fn) -> float:
    return best_interleaved(repeats, fn)[0]


def best_interleaved(repeats: int, *fns) -> list[float]:
    """Best time of each function, run in turn in every round, so that a slow spell on
    this shared machine hits all of them alike instead of one."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


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
    ap.add_argument("--repeats", type=int, default=7, help="repeats of each kernel figure (best is kept)")
    ap.add_argument("--reference-repeats", type=int, default=2)
    ap.add_argument("--single-calls", type=int, default=200_000)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--seed", type=int, default=2018)
    ap.add_argument("--spec", default=None, help="model spec file (default: kernel/models/v1.toml)")
    args = ap.parse_args(argv)
    if args.citizens < 1:
        ap.error("--citizens must be >= 1")

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

    log("timing ...")
    floor_s, c1, c2 = best_interleaved(
        args.repeats,
        lambda: features.sum(),
        lambda: scorer.score(features, adult, out=out, n_threads=1),
        lambda: scorer.score(features, adult, out=out, n_threads=2),
    )
    ref_holder = {}
    numpy_s = best_of(args.reference_repeats, lambda: ref_holder.update(r=score_reference(spec, calibration, features, adult)))
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
    batch_s = _batch_check_seconds(out, adult, args.seed, args.repeats)

    result = {
        "citizens": args.citizens,
        "variables": len(spec.variables),
        "dtype": args.dtype,
        "model_version": spec.model_version,
        "cython_1t_s": round(c1, 5),
        "cython_2t_s": round(c2, 5),
        "numpy_reference_s": round(numpy_s, 5),
        "memory_floor_s": round(floor_s, 5),
        "speedup_vs_numpy": round(numpy_s / c1, 2),
        "thread_scaling": round(c1 / c2, 3),
        "floor_ratio": round(c2 / floor_s, 2),
        "single_citizen_us": round(single_s / len(rows) * 1e6, 3),
        # server/token_index.pyx Checker: one station batch of 1,000 random cards of this city
        "batch_check_1000_us": round(batch_s * 1e6, 2),
        "batch_checks_per_s_1t": round(1000 / batch_s),
        "ns_per_citizen_1t": round(c1 / args.citizens * 1e9, 1),
        "matches_reference": matches,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
