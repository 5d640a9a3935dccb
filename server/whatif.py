"""The what-if: a citizen's score after hypothetical changes to their own records, and the
smallest set of actionable changes that would take them to the next level.

    >>> base = Candidate()                                         # doctest: +SKIP
    >>> sim = Simulator(spec, scorer, scenarios, as_of_day)       # doctest: +SKIP
    >>> scores = sim.score(active, [base.with_change(Change.add("volunteer_hours", 20.0))], adult=1)  # doctest: +SKIP

**Exact by construction.** The citizen's active records are read from the store at one
position (the snapshot a real write's re-score reads: server/state.py ``snapshot``); each
candidate is a copy of them with records left out (as if repaired) or added (as if they had
arrived today), and its features and score come from the same derivation
(server/state.py ``to_records``, kernel/features.py ``build_features``) on the state's day,
through the same compiled kernel and calibration. So a simulated score equals, bit for bit,
the score the citizen gets once the change is really made (tests/test_whatif.py makes each
change through the real server and compares). Nothing is written anywhere; the caller
(server/service.py ``simulate``) audits only that the citizen's current score was shown.

**The next level** (:meth:`Simulator.next_level`): the levers are what the model spec marks
``actionable`` (kernel/spec.py): a record of an actionable negative variable that still
counts and whose tier's least publicity has passed (the rights service's rule,
config/rights.toml) can be repaired; an actionable positive variable grows by
1..``max_steps`` records of ``step`` (hours, donations). Tenure is never a lever: it
accrues by itself. The search is small and
exhaustive over what it considers: each lever at its full effect alone, then every pair and
every triple of the ``MAX_LEVERS`` most effective levers (scores are monotone in each lever,
so a set that fails at full effect fails at any smaller one); among the smallest sets that
reach the next level's lower bound, each stepped lever is cut to its fewest steps, and the
set with the fewest steps in all (then the highest score) wins. Every candidate is scored in
one kernel call per round; at most ``MAX_CANDIDATES`` candidates a request.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from kernel.columns import ScoreColumns
from kernel.features import Records, build_features, record_weights
from kernel.score import Scorer
from kernel.spec import TIER_REPAIR_AFTER_DAYS, ModelSpec
from server.errors import InvalidArgument
from server.store import ActiveRecords

#: Changes one request may describe.
MAX_CHANGES = 50
#: Levers the combination search considers (the most effective ones alone).
MAX_LEVERS = 12
#: Largest lever set the search tries.
MAX_SET = 3
#: Candidates scored for one request, all rounds together (bounds the CPU one citizen's
#: question may take from the gate's checks on the same worker).
MAX_CANDIDATES = 20_000


@dataclass(frozen=True)
class Change:
    """One hypothetical change to a citizen's records."""

    kind: str  # "remove_record" | "remove_variable" | "add_record"
    variable: str = ""
    record_id: str = ""
    source: str = ""
    value: float = 0.0
    day: int | None = None  # add_record: the record's date (None: the state's day)
    count: int = 1  # add_record: that many identical records

    @classmethod
    def add(cls, variable: str, value: float, day: int | None = None, count: int = 1) -> Change:
        return cls("add_record", variable=variable, value=float(value), day=day, count=count)

    @classmethod
    def remove(cls, record_id: str, source: str = "") -> Change:
        return cls("remove_record", record_id=record_id, source=source)


@dataclass(frozen=True)
class Lever:
    """One actionable change the search may make: repair a record, or add ``steps`` steps."""

    variable: int
    record: int = -1  # index into the citizen's records: a repair
    steps: int = 0  # a positive variable's steps (0: a repair)

    @property
    def is_repair(self) -> bool:
        return self.record >= 0


@dataclass
class Outcome:
    """One candidate's result, as the kernel gave it."""

    features: np.ndarray  # float32 (V,)
    columns: ScoreColumns  # one row


@dataclass
class NextLevel:
    level: int  # the level aimed at (index into spec.levels)
    min_score: int  # its lower bound
    reachable: bool
    levers: list[Lever] = field(default_factory=list)
    changes: list[list[Change]] = field(default_factory=list)  # per lever, what SimulateScore takes
    outcome: Outcome | None = None
    tried: int = 0  # candidates scored


class Simulator:
    """Scores copies of one citizen's records on ``as_of_day`` (see the module docstring)."""

    def __init__(self, spec: ModelSpec, scorer: Scorer, bits_of: dict[str, int], as_of_day: int,
                 compact: bool = True, repair_after: dict[str, int] | None = None):
        """``compact``: the column layout of the serving state (kernel/columns.py), so that a
        simulated score's stored-narrower fields round exactly as the served ones do.
        ``repair_after``: each tier's least publicity in days, as the rights service applies
        it (config/rights.toml; default kernel/spec.py TIER_REPAIR_AFTER_DAYS)."""
        self.spec, self.scorer, self.bits_of, self.day = spec, scorer, bits_of, as_of_day
        self.compact = compact
        self.repair_after = repair_after or TIER_REPAIR_AFTER_DAYS
        self._index = {v.name: i for i, v in enumerate(spec.variables)}

    # --- the citizen's records and a request's changes ---------------------------------

    def base(self, active: ActiveRecords) -> Records:
        """The citizen's records as the kernel's Records (citizen 0), in stored order, with
        each record's identity kept beside them (:attr:`ids`: (source, record_id))."""
        from server.state import to_records

        keep = np.array([name in self._index for name in active.variable], bool)
        records, _ = to_records(self.spec, active, self.bits_of)
        records.citizen[:] = 0
        self.ids = [(self.spec.variables[self._index[v]].source, rid)
                    for v, rid, k in zip(active.variable, active.record_id, keep) if k]
        return records

    def resolve(self, base: Records, changes: list[Change]) -> tuple[np.ndarray, list[tuple[int, float, int]]]:
        """A request's changes as (records kept: bool mask, records added: (variable, value,
        day)); each bad change is an InvalidArgument naming it."""
        if len(changes) > MAX_CHANGES:
            raise InvalidArgument("changes", f"{len(changes)} changes exceed the limit of {MAX_CHANGES}")
        keep = np.ones(len(base), bool)
        added: list[tuple[int, float, int]] = []
        for i, c in enumerate(changes):
            where = f"changes[{i}]"
            if c.kind == "remove_record":
                if not c.record_id:
                    raise InvalidArgument(f"{where}.remove_record.record_id", "must not be empty")
                hits = [j for j, (source, rid) in enumerate(self.ids)
                        if rid == c.record_id and (not c.source or source == c.source)]
                if not hits:
                    raise InvalidArgument(f"{where}.remove_record", f"the citizen has no active record {c.record_id!r}"
                                          + (f" from {c.source!r}" if c.source else ""))
                if len(hits) > 1:
                    raise InvalidArgument(f"{where}.remove_record.source",
                                          f"record id {c.record_id!r} is used by several sources: name the source")
                keep[hits[0]] = False
            elif c.kind == "remove_variable":
                v = self._variable(c.variable, f"{where}.remove_variable")
                mine = base.variable == v
                if not mine.any():
                    raise InvalidArgument(f"{where}.remove_variable", f"the citizen has no active {c.variable!r} record")
                keep &= ~mine
            elif c.kind == "add_record":
                v = self._variable(c.variable, f"{where}.add_record.variable")
                if not math.isfinite(c.value) or c.value < 0:
                    raise InvalidArgument(f"{where}.add_record.value", f"{c.value} is not a finite number of 0 or more")
                day = self.day if c.day is None else c.day
                if day > self.day:
                    raise InvalidArgument(f"{where}.add_record.date", "a what-if is about today's records: the date is after today")
                if not 1 <= c.count <= 100:
                    raise InvalidArgument(f"{where}.add_record.count", f"{c.count} is not between 1 and 100")
                added += [(v, float(c.value), int(day))] * c.count
            else:
                raise InvalidArgument(where, "names no change (remove_record, remove_variable or add_record)")
        return keep, added

    def _variable(self, name: str, where: str) -> int:
        if not name:
            raise InvalidArgument(where, "must name a model variable")
        try:
            return self._index[name]
        except KeyError:
            raise InvalidArgument(where, f"{name!r} is not a variable of model {self.spec.model_version}") from None

    # --- scoring ------------------------------------------------------------------------

    def score(self, base: Records, candidates: list[tuple[np.ndarray, list[tuple[int, float, int]]]],
              adult: int) -> list[Outcome]:
        """Each candidate (records kept, records added) scored: one feature derivation and
        one kernel call for all of them."""
        n = len(candidates)
        parts_c, parts_v, parts_d, parts_x = [], [], [], []
        for i, (keep, added) in enumerate(candidates):
            sel = np.flatnonzero(keep)
            parts_c.append(np.full(len(sel) + len(added), i, np.int64))
            parts_v.append(np.concatenate([base.variable[sel], np.array([a[0] for a in added], np.int16)]))
            parts_d.append(np.concatenate([base.day[sel], np.array([a[2] for a in added], np.int32)]))
            parts_x.append(np.concatenate([base.value[sel], np.array([a[1] for a in added], np.float32)]))
        records = Records.from_arrays(np.concatenate(parts_c) if n else [], np.concatenate(parts_v) if n else [],
                                      np.concatenate(parts_d) if n else [], np.concatenate(parts_x) if n else [])
        features = build_features(self.spec, records, n, self.day)
        columns = ScoreColumns.empty(n, compact=self.compact)
        self.scorer.score(features, np.full(n, adult, np.uint8), out=columns, n_threads=1)
        return [Outcome(features[i].copy(), columns.take(slice(i, i + 1))) for i in range(n)]

    # --- the search ---------------------------------------------------------------------

    def levers(self, base: Records, keep: np.ndarray) -> list[Lever]:
        """Every actionable change open to the citizen now (see the module docstring)."""
        out = []
        alive = record_weights(self.spec, base, self.day) > 0
        for j in np.flatnonzero(keep & alive):
            v = self.spec.variables[int(base.variable[j])]
            if v.direction == "negative" and v.actionable and self.day - int(base.day[j]) >= self.repair_after[v.tier]:
                out.append(Lever(int(base.variable[j]), record=int(j)))
        for i, v in enumerate(self.spec.variables):
            if v.direction == "positive" and v.actionable:
                out.append(Lever(i, steps=v.max_steps))
        return out

    def changes_of(self, lever: Lever) -> list[Change]:
        """What SimulateScore (and the real write) takes for ``lever``."""
        v = self.spec.variables[lever.variable]
        if lever.is_repair:
            source, rid = self.ids[lever.record]
            return [Change.remove(rid, source)]
        if v.aggregate == "count":
            return [Change.add(v.name, 1.0, count=lever.steps)]
        return [Change.add(v.name, v.step * lever.steps)]

    def _candidate(self, keep: np.ndarray, added: list, levers: tuple[Lever, ...]):
        keep = keep.copy()
        added = list(added)
        for lever in levers:
            if lever.is_repair:
                keep[lever.record] = False
            else:
                v = self.spec.variables[lever.variable]
                if v.aggregate == "count":
                    added += [(lever.variable, 1.0, self.day)] * lever.steps
                else:
                    added.append((lever.variable, float(v.step * lever.steps), self.day))
        return keep, added

    def next_level(self, base: Records, keep: np.ndarray, added: list, adult: int, score: int) -> NextLevel | None:
        """The smallest set of actionable changes from (``keep``, ``added``) that reaches the
        level above ``score``; None when ``score`` is in the top level already."""
        mins = [lv.min for lv in self.spec.levels]
        above = [i for i, m in enumerate(mins) if m > score]
        if not above:
            return None
        target = above[0]
        result = NextLevel(level=target, min_score=mins[target], reachable=False)
        levers = self.levers(base, keep)
        budget = [MAX_CANDIDATES]

        def run(sets: list[tuple[Lever, ...]]) -> list[Outcome]:
            sets = sets[: budget[0]]
            budget[0] -= len(sets)
            result.tried += len(sets)
            return self.score(base, [self._candidate(keep, added, s) for s in sets], adult) if sets else []

        alone = zip(levers, run([(lever,) for lever in levers]))
        gaining = [(lever, o) for lever, o in alone if int(o.columns.score[0]) > score]
        gaining.sort(key=lambda g: -int(g[1].columns.score[0]))  # stable: ties keep the levers' order
        ranked = [lever for lever, _ in gaining[:MAX_LEVERS]]
        for size in range(1, MAX_SET + 1):
            sets = list(itertools.combinations(ranked, size))
            outcomes = [o for _, o in gaining[:MAX_LEVERS]] if size == 1 else run(sets)  # alone: scored above
            reaching = [s for s, o in zip(sets, outcomes) if int(o.columns.score[0]) >= result.min_score]
            if not reaching:
                continue
            best = None
            for s in reaching:
                s = self._fewest_steps(s, run, result.min_score)
                outcome = run([s])[0] if budget[0] > 0 else None
                if outcome is None:
                    break
                key = (sum(lv.steps for lv in s), -int(outcome.columns.score[0]))
                if best is None or key < best[0]:
                    best = (key, s, outcome)
            if best is not None:
                _, s, outcome = best
                result.reachable, result.levers, result.outcome = True, list(s), outcome
                result.changes = [self.changes_of(lever) for lever in s]
            return result
        return result

    def _fewest_steps(self, levers: tuple[Lever, ...], run, min_score: int) -> tuple[Lever, ...]:
        """Cut each stepped lever of a reaching set, in turn, to the fewest steps that still
        reach ``min_score`` with the others as they are (monotone: the first that reaches)."""
        levers = list(levers)
        for k, lever in enumerate(levers):
            if lever.is_repair or lever.steps <= 1:
                continue
            trials = [tuple(levers[:k] + [Lever(lever.variable, steps=n)] + levers[k + 1:]) for n in range(1, lever.steps)]
            for n, o in zip(range(1, lever.steps), run(trials)):
                if int(o.columns.score[0]) >= min_score:
                    levers[k] = Lever(lever.variable, steps=n)
                    break
        return tuple(levers)

