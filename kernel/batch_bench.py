"""Benchmark of the population batch (kernel/batch.py): one process against Dask, same run.

    python -m kernel.batch_bench --citizens 12500000
    python -m kernel.batch_bench --citizens 50000000 --partitions 200 --dir /big/disk

Writes a synthetic population of N straight into Parquet parts (``generate_s``), runs the
job in one process (:func:`kernel.batch.rescore_local`, the kernel on every core) and on a
``LocalCluster`` of worker processes (:func:`kernel.batch.rescore`, one kernel thread per
task), and prints one JSON line: citizens, partitions, workers, single_process_s, dask_s
(the job, on a cluster already started; ``cluster_start_s`` apart), rows_per_s (Dask),
dask_overhead_ratio (dask_s / single_process_s), calibration_exact (the two frozen tables
have the same counts) and scores_exact (every part's outputs have the same digest), and
``phases`` — where a part's time goes (read, checksum, decode, kernel, write), timed on a
few parts — so the figure says what dominates.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from kernel import batch
from kernel.spec import load_spec
from kernel.synthetic import generate_partitions


def phases(directory: Path, manifest: dict, spec, table, sample: int = 3) -> dict:
    """Seconds per million citizens of each step of a part, timed on ``sample`` parts."""
    import pyarrow.parquet as pq

    t = dict(read=0.0, checksum=0.0, decode_and_check=0.0, kernel=0.0, write=0.0)
    rows = 0
    with tempfile.TemporaryDirectory() as tmp:
        for entry in manifest["parts"][:sample]:
            t0 = time.perf_counter()
            data = (directory / entry["file"]).read_bytes()
            t1 = time.perf_counter()
            hashlib.sha256(data).hexdigest()
            t2 = time.perf_counter()
            part = batch.load_part(directory, entry, spec)  # reads and hashes again: subtracted below
            t3 = time.perf_counter()
            cols = batch._scorer(spec, table).score(part.features, part.adult, n_threads=1)
            t4 = time.perf_counter()
            pq.write_table(batch.scores_table(spec, part.ids, cols, {}), str(Path(tmp) / "x.parquet"))
            t5 = time.perf_counter()
            t["read"] += t1 - t0
            t["checksum"] += t2 - t1
            t["decode_and_check"] += max(0.0, (t3 - t2) - (t2 - t0))
            t["kernel"] += t4 - t3
            t["write"] += t5 - t4
            rows += len(part.adult)
    return {k: round(v * 1e6 / max(rows, 1), 3) for k, v in t.items()}


def run(citizens: int, partitions: int | None, workers: int, directory: Path, seed: int, keep: bool) -> dict:
    from distributed import Client

    spec = load_spec()
    partitions = partitions or max(2 * workers, math.ceil(citizens / 250_000))
    pop, single_out, dask_out = directory / "population", directory / "single", directory / "dask"
    for d in (pop, single_out, dask_out):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    manifest = generate_partitions(spec, citizens, pop, partitions, seed=seed, progress=False)
    generate_s = time.perf_counter() - t0

    cores = os.cpu_count() or 1
    single = batch.rescore_local(pop, single_out, spec, threads=cores)

    t0 = time.perf_counter()
    with batch.local_cluster(workers=workers) as cluster, Client(cluster) as client:
        cluster_start_s = time.perf_counter() - t0
        dask = batch.rescore(pop, dask_out, spec, client=client, threads=1, log=lambda line: None)
    doc = {
        "citizens": citizens, "partitions": partitions, "workers": workers,
        "single_process_s": round(single.seconds, 2), "dask_s": round(dask.seconds, 2),
        "cluster_start_s": round(cluster_start_s, 2),
        "rows_per_s": round(citizens / dask.seconds), "single_rows_per_s": round(citizens / single.seconds),
        "dask_overhead_ratio": round(dask.seconds / single.seconds, 3),
        "calibration_exact": bool(np.array_equal(single.calibration.counts, dask.calibration.counts)
                                  and single.calibration.calibration_version == dask.calibration.calibration_version),
        "scores_exact": single.digests == dask.digests,
        "calibration_version": dask.calibration.calibration_version,
        "generate_s": round(generate_s, 2),
        "population_bytes": sum((pop / p["file"]).stat().st_size for p in manifest["parts"]),
        "scores_bytes": sum((dask_out / p["file"]).stat().st_size for p in dask.manifest["parts"]),
        "phases_s_per_million": phases(pop, manifest, spec, dask.calibration),
    }
    if not keep:
        for d in (pop, single_out, dask_out):
            shutil.rmtree(d, ignore_errors=True)
    return doc


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--citizens", type=int, default=2_000_000)
    ap.add_argument("--partitions", type=int, default=None, help="default: 250,000 citizens a part, at least 2 per worker")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Dask worker processes (default: one per core)")
    ap.add_argument("--seed", type=int, default=2018)
    ap.add_argument("--dir", default=None, help="where the population and scores go (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    args = ap.parse_args(argv)
    if args.citizens < 1:
        ap.error("--citizens must be at least 1")
    if args.dir:
        doc = run(args.citizens, args.partitions, args.workers, Path(args.dir), args.seed, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="qj-batch-") as tmp:
            doc = run(args.citizens, args.partitions, args.workers, Path(tmp), args.seed, args.keep)
    print(json.dumps(doc))
    return doc


if __name__ == "__main__":
    main()
