"""Switching the serving model release while the service answers (the parent's side).

    $ qjscore model stage v2.toml          # validates, calibrates, prints PSI + level migration
    $ qjscore model activate <release>     # ACTIVE <- release; SIGHUP tells the server
    $ qjscore model restore                # the previous release, the same way

On SIGHUP the server's parent process calls :func:`roll_out`:

1. The registry's ACTIVE release is loaded and validated. A spec or calibration that fails
   is rejected and logged; the serving release is untouched (metric
   ``qianjiang_rollouts_total{result="rejected"}``).
2. A new state (its own shared mapping, server/state.py) is filled from the store and scored
   under the new release while the old one serves. Writers keep writing to the old state
   and mark the rows they change (``Control.dirty``).
3. The report — PSI of raw points and of scores, level migration — compares both states
   on the same people and is logged and written next to the release, before the switch.
4. The new generation is announced; every node maps the new state, builds its service on
   it and warms it up (server/app.py ``Node``), and says so (``Control.meta[WARMED]``).
5. Under the writers' lock: the new state takes consents, birthdays and card tokens from
   the old one, re-derives the rows written meanwhile from the store, and the active
   generation flips. Each node switches on its very next call (the interceptor's readiness
   check); a write that raced the flip is retried on the new service
   (``StaleGeneration``), so no acknowledged write is lost and no call fails.

Health stays SERVING throughout: the old release serves until the new one is warm.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from kernel.calibration import CalibrationError
from kernel.rollout import PopulationScores, RolloutReport, compare
from kernel.score import Scorer
from kernel.spec import SpecError
from server.files import write_atomic
from server.models import RegistryError
from server.state import ACTIVE_GENERATION, PREPARED_GENERATION, READY, TRACKING, WARMED, ServingState

log = logging.getLogger("qianjiang.rollout")


class RolloutFailed(RuntimeError):
    pass


def population(state: ServingState) -> PopulationScores:
    n = state.n_citizens
    cols = state.columns
    return PopulationScores(raw=cols.raw[:n].astype(np.float64), score=cols.score[:n].copy(),
                            level=cols.level[:n].copy(), adult=state.adult[:n].copy())


def roll_out(runtime, nodes: int, metrics=None, warm_timeout: float = 60.0) -> RolloutReport | None:
    """Serve the registry's ACTIVE release if it is not the one being served. ``nodes``:
    how many nodes (worker processes, or 1 in-process) must warm the new state up. Returns
    the report of the switch, or None when there was nothing to do or it was rejected."""
    registry = runtime.registry
    rid = registry.active()
    if rid is None or rid == runtime.release:
        registry.record_served(runtime.release, rid, "unchanged")
        return None

    def count(result: str) -> None:
        if metrics is not None:
            metrics.rollouts.labels(result=result).inc()

    try:
        spec, table = runtime.registry.release(rid)
    except (SpecError, CalibrationError, RegistryError, OSError) as exc:
        log.error("rollout of release %s rejected: %s; still serving %s", rid, exc, runtime.release)
        count("rejected")
        registry.record_served(runtime.release, rid, "rejected", str(exc))
        return None
    t0 = time.perf_counter()
    control, old = runtime.control, runtime.state
    new = ServingState.allocate(spec, old.capacity, token_capacity=old.token_capacity, audit_key=old.audit_key,
                                lock=control.lock, by_path=True)
    new.consent_purposes = old.consent_purposes
    scorer = Scorer(spec, table)
    store = runtime.open_store()
    try:
        with control.lock:
            control.dirty[:] = 0
            control.meta[TRACKING] = 1
        filled = 0
        try:
            # One kernel thread: a rollout is not urgent, the workers serving meanwhile are.
            new.fill(store, scorer, runtime.scenarios, old.as_of_day, n_threads=1, mark_ready=False)
            filled = new.n_citizens
            report = compare(population(old), population(new), runtime.spec, spec, runtime.release or "", rid)
            log.info("rollout %s -> %s, before the switch:\n%s", runtime.release, rid, report.format())
            try:
                write_atomic(runtime.registry.path(rid) / f"switch-{int(time.time())}.json",
                             json.dumps(report.to_dict(), indent=1).encode())
            except OSError as exc:
                log.warning("could not save the rollout report: %s", exc)

            generation = control.generation + 1
            control.announce(generation, new.path, rid)
            deadline = time.monotonic() + warm_timeout
            while control.meta[WARMED] < nodes:
                if time.monotonic() > deadline:
                    raise RolloutFailed(f"{int(control.meta[WARMED])} of {nodes} nodes warmed the new state up in {warm_timeout:.0f} s")
                time.sleep(0.01)

            with control.lock:
                t_lock = time.perf_counter()
                new.adopt(old)
                rows = np.flatnonzero(control.dirty[: new.n_citizens])
                rows = np.union1d(rows, np.arange(filled, new.n_citizens))
                bound = scorer.bind(new.features, new.adult, new.columns)
                for row in rows.tolist():
                    new.rederive(row, store, runtime.scenarios, bound)
                new.meta[READY] = 1
                control.meta[TRACKING] = 0
                control.meta[ACTIVE_GENERATION] = generation
                held = time.perf_counter() - t_lock
        except BaseException:
            with control.lock:
                control.meta[TRACKING] = 0
                control.meta[PREPARED_GENERATION] = control.meta[ACTIVE_GENERATION]  # nodes drop what they built
            raise
    except RolloutFailed as exc:
        new.release_fd()
        log.error("rollout of release %s failed: %s; still serving %s", rid, exc, runtime.release)
        count("failed")
        registry.record_served(runtime.release, rid, "failed", str(exc))
        return None
    finally:
        store.close()
    new.release_fd()
    previous = runtime.release
    runtime.serve_release(spec, table, rid, new)
    count("switched")
    registry.record_served(rid, rid, "switched")
    log.info("now serving release %s (was %s): %d rows written meanwhile re-derived; lock held %.1f ms; %.1f s in all",
             rid, previous, len(rows), held * 1000, time.perf_counter() - t0)
    return report
