"""The domain operations of the service: what the servicers call. No protobuf here.

    >>> service = CreditService(state, store, scorer, scenarios)      # doctest: +SKIP
    >>> service.check("campus_fitness", card_token).outcome           # doctest: +SKIP
    <Outcome.ALLOW: 1>

One CreditService per worker process: it binds the kernel's single-row re-scorer to the
shared state, keeps its own store connection and a citizen-id cache. Reads take no lock;
every write goes store first (durable), then state, under the state's process-shared lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from kernel.columns import FLAG_HARD_RULE, NO_REASON
from kernel.reference import variable_points
from kernel.score import Scorer
from server.auth import Caller
from server.errors import CapacityExhausted, InvalidArgument, NoScore, NotAuthorised, UnknownCitizen, UnknownScenario
from server.scenarios import REASON_CODES, Outcome, Scenario
from server.token_index import Checker
from server.state import N_CITIZENS, Control, ServingState, citizen_key
from server.store import RecordIn, RecordRow, Store
from server.store_watch import StoreWatch

#: Limits (documented in proto/): bigger requests are INVALID_ARGUMENT, not slow answers.
MAX_BATCH_SCORES = 1_000
MAX_BATCH_TOKENS = 100_000
TOKEN_BYTES = 16
#: Largest record value accepted. Values are counts, hours, months: features are float32 sums
#: of them, and a bigger value (or enough of them) would overflow to inf and fail the re-score
#: of the citizen after the record was stored.
MAX_RECORD_VALUE = 1e9

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


def check_id(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if not _ID.fullmatch(value):
        raise InvalidArgument(field, "must be 1-64 characters of letters, digits, '_', '.', ':' or '-'")
    return value


def check_token(token: bytes, field: str = "card_token") -> bytes:
    if len(token) != TOKEN_BYTES:
        raise InvalidArgument(field, f"expected {TOKEN_BYTES} bytes, got {len(token)}")
    return token


@dataclass(frozen=True)
class ScoreView:
    citizen_id: str
    score: int
    level: int  # index into spec.levels
    percentile: float
    raw_points: float
    dimension_points: tuple[float, ...]
    reasons: tuple[tuple[int, float], ...]  # (variable index, weighted points lost)
    hard_rule_applied: bool
    model_version: str
    calibration_version: str
    computed_at: float
    disclosure_id: str = ""


@dataclass(frozen=True)
class Contribution:
    variable: int
    feature: float
    points: float


class DecisionView(NamedTuple):
    """One check's answer. A NamedTuple: one is built for every gate scan, and it costs half
    of a frozen dataclass's construction."""

    outcome: Outcome
    reason_codes: tuple[str, ...]
    decision_id: str
    model_version: str
    scenario: str


@dataclass(frozen=True)
class BatchDecision:
    outcomes: bytes
    batch_id: str
    model_version: str
    scenario: str
    allowed: int


#: Outcome members by value, and the one the check looks at: an index and a global on the
#: per-check path instead of Enum's call and attribute machinery (about 1 µs a check).
_OUTCOME = {o.value: o for o in Outcome}
_DENY_HARD_RULE = Outcome.DENY_HARD_RULE

#: Audit result codes of score disclosures (decisions use their Outcome value, 1-7).
SCORE_VIEWED, SCORE_EXPLAINED = 100, 101


class DecisionIds:
    """Unique decision ids without coordination: a per-process prefix (the audit writer's,
    so the audit log can rebuild every id) and a counter."""

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix or f"{secrets.token_hex(4)}{os.getpid():x}"
        self._counter = itertools.count(1)

    def next(self) -> tuple[int, str]:
        seq = next(self._counter)
        return seq, f"d-{self.prefix}-{seq:x}"


class _NoAudit:
    """Stands in when the audit log is off (benchmarks of its cost, unit tests)."""

    writer_prefix = None

    def record(self, *args) -> None:
        pass

    def record_batch(self, *args) -> None:
        pass


class StaleGeneration(Exception):
    """A write reached a service whose model generation is no longer the active one (a
    rollout switched meanwhile): nothing was written; retry on the current service."""


class CreditService:
    def __init__(
        self, state: ServingState, store: Store, scorer: Scorer, scenarios: dict[str, Scenario],
        on_rescore=None, on_decisions=None, on_decision=None, audit=None,
        control: Control | None = None, generation: int = 0, ids: DecisionIds | None = None,
        store_watch: StoreWatch | None = None,
    ):
        """``on_rescore(seconds)``, ``on_decisions(scenario, counts)`` (counts: how many
        decisions had each outcome value, 8 entries) and
        ``on_decision(scenario, outcome)`` feed metrics. With a rollout's ``control`` block,
        the service serves model ``generation``; a new generation's service shares the old
        one's decision ``ids`` (ids stay unique). ``store_watch`` fails writes fast while
        the store is unreachable (server/store_watch.py)."""
        self.state = state
        self.control = control
        self.generation = generation
        self.store = store
        self.scorer = scorer
        self.spec = scorer.spec
        self.scenarios = scenarios
        self.model_version = self.spec.model_version
        self.calibration_version = scorer.calibration.calibration_version
        self.rows = scorer.bind(state.features, state.adult, state.columns)
        self.audit = audit if audit is not None else _NoAudit()
        self.ids = ids if ids is not None else DecisionIds(self.audit.writer_prefix)
        self.store_watch = store_watch if store_watch is not None else StoreWatch(store)
        self._variables = {v.name: i for i, v in enumerate(self.spec.variables)}
        self._on_rescore = on_rescore or (lambda seconds: None)
        self._on_decisions = on_decisions or (lambda scenario, counts: None)
        self._on_decision = on_decision or (lambda scenario, outcome: None)
        c = self.spec.compiled
        self._best, self._loss_weight = c.best, c.loss_weight
        self._checker = Checker(state.tokens, state.gate, state.subject)

    # --- lookups ----------------------------------------------------------------------

    def row_of(self, citizen_id: str) -> int:
        """The citizen's row, from the shared in-memory index (never the store)."""
        check_id(citizen_id, "citizen_id")
        row = self.state.citizens.get(citizen_key(citizen_id))
        if row < 0 or row >= self.state.n_citizens:
            raise UnknownCitizen()
        return row

    def scenario(self, name: str) -> Scenario:
        if not name:
            raise InvalidArgument("scenario", "must not be empty")
        try:
            return self.scenarios[name]
        except KeyError:
            raise UnknownScenario(name) from None

    # --- scores -----------------------------------------------------------------------

    def get_score(self, citizen_id: str, caller: Caller, purpose: str = "", method: str = "ScoreService/GetScore") -> ScoreView:
        purpose = check_purpose(purpose)
        row = self.row_of(citizen_id)
        return self._disclose(self._view(citizen_id, row), row, caller, purpose, method, SCORE_VIEWED)

    def _disclose(self, view: ScoreView, row: int, caller: Caller, purpose: str, method: str, result: int) -> ScoreView:
        seq, disclosure_id = self.ids.next()
        self.audit.record(seq, caller.identity, method, purpose, int(self.state.subject[row]), result, self.model_version)
        return dataclasses.replace(view, disclosure_id=disclosure_id)

    def _view(self, citizen_id: str, row: int) -> ScoreView:
        s = self.state
        if not s.consent[row]:
            raise NotAuthorised()
        if not s.adult[row]:
            raise NoScore()
        cols = s.columns
        pts = self._row_points(row)
        reasons = tuple(
            (int(v), float((self._best[v] - pts[v]) * self._loss_weight[v]))
            for v in cols.reasons[row] if v != NO_REASON
        )
        return ScoreView(
            citizen_id=citizen_id,
            score=int(cols.score[row]),
            level=int(cols.level[row]),
            percentile=float(cols.percentile[row]),
            raw_points=float(cols.raw[row]),
            dimension_points=tuple(float(x) for x in cols.dimension_points[row]),
            reasons=reasons,
            hard_rule_applied=bool(cols.flags[row] & FLAG_HARD_RULE),
            model_version=self.model_version,
            calibration_version=self.calibration_version,
            computed_at=float(s.computed_at[row]),
        )

    def _row_points(self, row: int) -> np.ndarray:
        """Unweighted points of each variable (the reference maths, for one citizen)."""
        return variable_points(self.spec, self.state.features[row : row + 1])[0]

    def explain(self, citizen_id: str, caller: Caller, purpose: str = "") -> tuple[ScoreView, list[Contribution]]:
        purpose = check_purpose(purpose)
        row = self.row_of(citizen_id)
        view = self._disclose(self._view(citizen_id, row), row, caller, purpose, "ScoreService/ExplainScore", SCORE_EXPLAINED)
        pts = self._row_points(row)
        feats = self.state.features[row]
        return view, [Contribution(v, float(feats[v]), float(pts[v])) for v in range(len(pts))]

    def batch_scores(self, citizen_ids: list[str], caller: Caller, purpose: str = "") -> list[tuple[str, ScoreView | None]]:
        if len(citizen_ids) > MAX_BATCH_SCORES:
            raise InvalidArgument("citizen_ids", f"{len(citizen_ids)} ids exceed the limit of {MAX_BATCH_SCORES}")
        out = []
        for i, cid in enumerate(citizen_ids):
            check_id(cid, f"citizen_ids[{i}]")
            try:
                out.append(("OK", self.get_score(cid, caller, purpose, "ScoreService/BatchGetScores")))
            except UnknownCitizen:
                out.append(("NOT_FOUND", None))
            except NotAuthorised:
                out.append(("NOT_AUTHORISED", None))
            except NoScore:
                out.append(("UNDER_18", None))
        return out

    # --- eligibility ------------------------------------------------------------------

    def _check_tokens(self, scenario: Scenario, tokens: bytes, counts: np.ndarray | None = None):
        """The compiled lookup and rule (server/token_index.pyx): (outcomes, subjects, allowed);
        ``counts`` (int64, 8) receives the number of each outcome."""
        return self._checker.check(tokens, *scenario.rule, counts)

    def check(self, scenario_name: str, token: bytes, caller: Caller, method: str = "EligibilityService/Check") -> DecisionView:
        caller.check_scenario(scenario_name)
        scenario = self.scenario(scenario_name)
        check_token(token)
        value, subject = self._checker.check_one(token, *scenario.rule)
        outcome = _OUTCOME[value]
        self._on_decision(scenario.name, outcome)
        codes = REASON_CODES[outcome]
        if outcome is _DENY_HARD_RULE:
            codes = tuple(f"HARD_RULE:{self.spec.variables[v].reason.code}" for v in self._hard_rules(self.state.tokens.get(token)))
        seq, decision_id = self.ids.next()
        self.audit.record(seq, caller.identity, method, scenario.name, subject, value, self.model_version)
        return DecisionView(outcome, codes, decision_id, self.model_version, scenario.name)

    def _hard_rules(self, row: int) -> list[int]:
        c = self.spec.compiled
        return [v for v in np.flatnonzero(c.hard_rule) if self.state.features[row, v] > 0]

    def check_batch(self, scenario_name: str, tokens: bytes, caller: Caller) -> BatchDecision:
        caller.check_scenario(scenario_name)
        scenario = self.scenario(scenario_name)
        if len(tokens) % TOKEN_BYTES:
            raise InvalidArgument("card_tokens", f"{len(tokens)} bytes is not a whole number of {TOKEN_BYTES}-byte tokens")
        n = len(tokens) // TOKEN_BYTES
        if n > MAX_BATCH_TOKENS:
            raise InvalidArgument("card_tokens", f"{n} tokens exceed the limit of {MAX_BATCH_TOKENS}")
        counts = np.empty(8, np.int64)
        outcomes, subjects, allowed = self._check_tokens(scenario, tokens, counts)
        self._on_decisions(scenario.name, counts)
        seq, batch_id = self.ids.next()
        self.audit.record_batch(seq, caller.identity, "EligibilityService/BatchCheck", scenario.name, subjects, outcomes, self.model_version)
        return BatchDecision(outcomes.tobytes(), batch_id, self.model_version, scenario.name, allowed)

    # --- writes: store first, then state, under the shared lock ------------------------

    def ingest(self, record: RecordIn, caller: Caller) -> bool:
        """Store one record durably and re-score its citizen. False: a duplicate id. The
        record's source is the authenticated caller."""
        if record.variable in self._variables:
            caller.check_variable(record.variable)
        if not caller.unrestricted:
            record = dataclasses.replace(record, source=caller.identity)
        self._check_record(record)
        row = self.row_of(record.citizen_id)
        with self._writing():
            (inserted,) = self.store.add_records([record])
            if inserted:
                self._rescore(row)
        return inserted

    def _check_record(self, r: RecordIn) -> None:
        check_id(r.record_id, "record.record_id")
        check_id(r.citizen_id, "record.citizen_id")
        if r.variable not in self._variables:
            raise InvalidArgument("record.variable", f"{r.variable!r} is not a variable of model {self.model_version}")
        check_value(r.value, "record.value")
        if r.day > self.state.as_of_day:
            raise InvalidArgument("record.date", "is in the future")
        if r.scenario is not None:
            sc = self.scenarios.get(r.scenario)
            if sc is None:
                raise InvalidArgument("record.scenario", f"{r.scenario!r} is not a configured scenario")
            if not sc.pay_later:
                raise InvalidArgument("record.scenario", f"{r.scenario!r} is not a pay-later scenario")
            if self.spec.variables[self._variables[r.variable]].direction != "negative":
                raise InvalidArgument("record.scenario", "only a negative record can be an unpaid default")

    def correct_record(self, record_id: str, day: int, value: float, caller: Caller) -> RecordRow:
        check_id(record_id, "record_id")
        check_value(value, "value")
        caller.check_variable(self._get_record(record_id).variable)
        if day > self.state.as_of_day:
            raise InvalidArgument("date", "is in the future")
        with self._writing():
            row = self.store.correct_record(record_id, day, value)
            self._rescore(row.citizen_row)
        return row

    def withdraw_record(self, record_id: str, status: str, caller: Caller) -> RecordRow:
        check_id(record_id, "record_id")
        caller.check_variable(self._get_record(record_id).variable)
        with self._writing():
            row = self.store.set_record_status(record_id, status)
            self._rescore(row.citizen_row)
        return row

    def set_consent(self, citizen_id: str, granted: bool) -> None:
        row = self.row_of(citizen_id)
        with self._writing():
            self.store.set_consent(citizen_id, granted)
            self.state.set_consent(row, granted)

    def upsert_citizen(self, citizen_id: str, birth_day: int) -> bool:
        check_id(citizen_id, "citizen_id")
        if birth_day > self.state.as_of_day:
            raise InvalidArgument("birth_date", "is in the future")
        s = self.state
        with self._writing():
            n = s.n_citizens
            key = citizen_key(citizen_id)
            if s.citizens.get(key) < 0 and n >= s.capacity:
                raise CapacityExhausted(f"the serving state holds {s.capacity} citizens; restart to grow it")
            row, created = self.store.upsert_citizen(citizen_id, birth_day)
            s.citizens.insert(key, row)
            s.birth_day[row] = birth_day
            s.subject[row] = self.audit_subject(citizen_id)
            if created:
                s.set_consent(row, False)
                s.meta[N_CITIZENS] = max(n, row + 1)
            self._rescore(row)
        return created

    def audit_subject(self, citizen_id: str) -> int:
        return self.state.subject_of(citizen_id)

    def checks_of(self, citizen_id: str, limit: int = 100):
        """Who checked this citizen: the audit entries about them, newest first."""
        self.row_of(citizen_id)
        if not 0 <= limit <= 1000:
            raise InvalidArgument("limit", f"{limit} is outside [0, 1000]")
        if isinstance(self.audit, _NoAudit):
            return []
        return self.audit.checks_of(citizen_id, limit or 100)

    def register_card(self, citizen_id: str, token: bytes) -> bool:
        check_token(token)
        self.row_of(citizen_id)
        with self._writing():
            row, created = self.store.register_card(token, citizen_id)
            self.state.tokens.insert(token, row)
        return created

    @contextlib.contextmanager
    def _writing(self):
        """The writers' lock, on the active generation only: a write that finds a rollout
        has switched meanwhile writes nothing and raises StaleGeneration (retried on the new
        service), so no acknowledged write lands in a state nobody reads any more. While the
        store is unreachable a write fails at once (UNAVAILABLE), before taking the lock."""
        self.store_watch.check()
        with self.state.lock:
            if self.control is not None and self.control.generation != self.generation:
                raise StaleGeneration()
            with self.store_watch.watching():
                yield

    def _get_record(self, record_id: str) -> RecordRow:
        self.store_watch.check()
        with self.store_watch.watching():
            return self.store.get_record(record_id)

    def _rescore(self, row: int) -> None:
        """Re-derive one citizen's features from the store and re-score the row in place.
        Caller holds the state lock."""
        t0 = time.perf_counter()
        self.state.rederive(row, self.store, self.scenarios, self.rows)
        if self.control is not None:
            self.control.mark(row)
        self._on_rescore(time.perf_counter() - t0)


def check_value(value: float, field: str) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(field, f"{value} is not a finite number")
    if value < 0:
        raise InvalidArgument(field, f"{value} is negative")
    if value > MAX_RECORD_VALUE:
        raise InvalidArgument(field, f"{value:g} is above the largest accepted value ({MAX_RECORD_VALUE:g})")
    return value


def check_purpose(purpose: str) -> str:
    """The purpose of a score read, as audited: empty is "unspecified"; otherwise a short
    name like an id (free text would let one caller fill the audit log's dictionary)."""
    return check_id(purpose, "purpose") if purpose else "unspecified"
