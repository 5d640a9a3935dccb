"""Export the store's population for the batch job (kernel/batch.py): ``qjscore export``.

    qjscore export --out /secure/pop-2026-12-07 --partitions 64 [--spec kernel/models/v3.toml] [--as-of 2026-12-01]

Every citizen's features as of one day are derived exactly as the service derives them at
start (:meth:`server.state.ServingState.load`: the store read in bulk at one position), so a
batch score is the score the service would serve that day, and written as Parquet parts by
:class:`kernel.batch.PopulationWriter`. ``--spec`` derives them for another model (a release
to calibrate before staging it). The export reads the store like ``model stage`` does and
never writes it; the files are personal data (see kernel/batch.py).
"""

from __future__ import annotations

import logging

import numpy as np

from kernel.batch import PopulationWriter
from kernel.score import Scorer
from kernel.spec import ModelSpec
from server.city_time import today
from server.scenarios import Scenario
from server.state import ServingState

log = logging.getLogger("qianjiang.export")

#: Citizens handed to the writer at a time.
EXPORT_CHUNK = 1_000_000


def export_population(store, spec: ModelSpec, out, partitions: int, scenarios: dict[str, Scenario],
                      as_of_day: int | None = None, n_threads: int = 2, overwrite: bool = False) -> dict:
    """Write the store's population to ``out``; returns the manifest (its ``source`` names
    the store position the read was taken at)."""
    day = today() if as_of_day is None else int(as_of_day)
    citizens, cards = store.population_bounds()  # counted from two keys' maxima, as a start does
    # room for the citizens and cards written while the load reads (a live store)
    state = ServingState.allocate(spec, citizens + 1024, token_capacity=max(citizens, cards) + 1024)
    # the server's own start-up load: the store read in bulk, at one position
    state.load(store, Scorer(spec), scenarios, day, n_threads=n_threads, mark_ready=False)
    n = state.n_citizens
    ids = store.citizens().ids[:n]  # rows are dense and never reused: a citizen added since is left out
    source = {"kind": "store", "store": getattr(store, "name", type(store).__name__), "position": state.position}
    with PopulationWriter(out, spec, partitions, day, source, overwrite=overwrite) as writer:
        for lo in range(0, n, EXPORT_CHUNK):
            hi = min(n, lo + EXPORT_CHUNK)
            writer.add(ids[lo:hi], np.asarray(state.adult[lo:hi], np.uint8), state.features[lo:hi])
    log.info("exported %d citizens as of day %d into %d parts at %s", n, day, partitions, out)
    return writer.manifest
