"""The domain operations of the service: what the servicers call. No protobuf here.

    >>> service = CreditService(state, store, scorer, scenarios)      # doctest: +SKIP
    >>> service.check("campus_fitness", card_token).outcome           # doctest: +SKIP
    <Outcome.ALLOW: 1>

One CreditService per worker process: it binds the kernel's single-row re-scorer to the
shared state, keeps its own store connection and a citizen-id cache. Reads take no lock and
never touch the store. A write goes store first (durable), then reads what the re-score
needs (:meth:`ServingState.snapshot`), both without the state's lock, since a store round
trip can hang (it is bounded: server/store_pg.py); only then does it take the
process-shared lock, to apply what it read if that is fresher than what the row holds
(server/state.py). A write is acknowledged only once applied; one that fails after its
commit answers UNAVAILABLE, and its retry (a resend is a DUPLICATE, a correction or a
consent that is already so changes nothing) re-derives the citizen all the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from kernel.columns import FLAG_HARD_RULE, NO_REASON
from kernel.reference import variable_points
from kernel.score import Scorer
from server.auth import INSECURE_CALLER, Caller, check_call_deadline
from server.consent import MAX_PURPOSES_PER_CALL, ConsentPurposes
from server.decision_ids import DecisionIds
from server.errors import (
    BatchQuota, CapacityExhausted, InvalidArgument, NoScore, NotAuthorised, NothingToReplay, PermissionDenied, UnknownCitizen,
    UnknownDecision, UnknownScenario,
)
from server.purposes import UNSPECIFIED, load_purposes
from server.quotas import TokenBuckets
from server.replay import replay
from server.scenarios import REASON_CODES, SCORE_EXPLAINED, SCORE_SIMULATED, SCORE_VIEWED, Outcome, Scenario
from server.token_index import Checker
from server.state import N_CITIZENS, Control, RowSnapshot, ServingState, citizen_key
from server.store import ACCEPTED, RecordIn, RecordRow, RecordVersion, Store
from server.store_watch import StoreWatch
from server.whatif import Change, NextLevel, Outcome as SimOutcome, Simulator

#: Limits (documented in proto/): bigger requests are INVALID_ARGUMENT, not slow answers.
MAX_BATCH_SCORES = 1_000
MAX_BATCH_TOKENS = 100_000
TOKEN_BYTES = 16
#: Largest record value accepted. Values are counts, hours, months: features are float32 sums
#: of them, and a bigger value (or enough of them) would overflow to inf and fail the re-score
#: of the citizen after the record was stored.
MAX_RECORD_VALUE = 1e9
#: Longest a purpose grant may run before it must be given again (5 years).
MAX_CONSENT_DAYS = 5 * 366

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


class Release(NamedTuple):
    """What made a decision or a score, besides the records: the model, its calibration and
    the scenario's rule ("-" for a score). ``audit`` is the three as the audit log keeps them."""

    model_version: str
    calibration_version: str
    rules_version: str
    audit: str

    @classmethod
    def of(cls, model_version: str, calibration_version: str, rules_version: str = "-") -> Release:
        return cls(model_version, calibration_version, rules_version,
                   f"{model_version} {calibration_version} {rules_version}")


class _Row(NamedTuple):
    """One citizen's row of the serving state, read as of one moment (CreditService._read)."""

    consent: bool
    adult: bool
    score: int
    level: int
    percentile: float
    raw: float
    reasons: tuple
    flags: int
    computed_at: float
    features: np.ndarray
    position: int
    as_of_day: int


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
    records_position: int = 0
    as_of_day: int = 0
    disclosure_id: str = ""


@dataclass(frozen=True)
class RecordAck:
    """What a data source is told about one ingested record."""

    status: str  # server.store.ACCEPTED or DUPLICATE
    source: str
    version: int
    position: int


@dataclass(frozen=True)
class Contribution:
    """One variable's part in a score, in the kernel's own arithmetic: the dimension's points
    are the sum of its variables' ``weighted_points``; a reason's points lost is its
    variable's ``points_lost``."""

    variable: int
    feature: float
    points: float  # unweighted
    weight: float  # the variable's dimension's weight
    weighted_points: float  # weight * points
    points_lost: float  # weight * (best - points), as the reasons are ranked


class DecisionView(NamedTuple):
    """One check's answer. A NamedTuple: one is built for every gate scan, and it costs half
    of a frozen dataclass's construction."""

    outcome: Outcome
    reason_codes: tuple[str, ...]
    decision_id: str
    release: Release
    scenario: str
    records_position: int
    as_of_day: int
    detail: str = ""


@dataclass(frozen=True)
class BatchDecision:
    outcomes: bytes
    batch_id: str
    release: Release
    scenario: str
    allowed: int
    records_position: int
    as_of_day: int


#: Outcome members by value, and the one the check looks at: an index and a global on the
#: per-check path instead of Enum's call and attribute machinery (about 1 µs a check).
_OUTCOME = {o.value: o for o in Outcome}
_DENY_HARD_RULE = Outcome.DENY_HARD_RULE

#: How much of a caller's scenario name a StreamCheck refusal echoes back.
_ECHO_CHARS = 64


@dataclass(frozen=True)
class SimulationView:
    """A what-if (server/whatif.py): the citizen's score now and after ``changes``, both
    derived the same way from the store's records at one position; never stored."""

    current: ScoreView
    simulated: ScoreView
    next_level: NextLevel | None
    next_view: ScoreView | None  # the score the next-level changes reach


@dataclass(frozen=True)
class ConsentView:
    """A citizen's consent (server/consent.py): the blanket, the exception mask the state
    holds, and per purpose ``(name, authorised now, setting)`` with setting ``(granted,
    expires_day or None)`` or None (the blanket answers)."""

    blanket: bool
    exceptions: int
    purposes: tuple


class _NoAudit:
    """Stands in when the audit log is off (benchmarks of its cost, unit tests)."""

    ids = None

    def record(self, *args) -> None:
        pass

    def record_batch(self, *args) -> None:
        pass


class StaleGeneration(Exception):
    """A write reached a service whose model generation is no longer the active one (a
    rollout switched meanwhile). Without ``update``, nothing was written: retry on the
    current service. With it, the store write was committed before the switch and applied
    to no state yet: apply ``update`` on the current service (:meth:`CreditService.reapply`),
    which answers what the write would have."""

    def __init__(self, update: Update | None = None):
        super().__init__()
        self.update = update


@dataclass
class Update:
    """What one write changes in the serving state, read from the store outside the state's
    lock; :meth:`CreditService.reapply` applies it to any generation's state (it holds no
    model-specific value: records are re-derived with the applying state's spec).
    ``result`` is the write's answer."""

    row: int
    result: object = None
    snapshot: RowSnapshot | None = None  # the row's records, re-scored if fresher
    birth_day: int | None = None  # set with the snapshot
    consent: tuple[bool, int, int] | None = None  # (blanket granted, position of the change, exceptions)
    citizen_key: bytes | None = None  # a citizen to index (upsert)
    subject: int = 0
    created: bool = False
    token: bytes | None = None  # a card to index
    position: int = 0  # the write's own position (advances the state)


class CreditService:
    def __init__(
        self, state: ServingState, store: Store, scorer: Scorer, scenarios: dict[str, Scenario],
        on_rescore=None, on_decisions=None, on_decision=None, audit=None,
        control: Control | None = None, generation: int = 0, ids: DecisionIds | None = None,
        store_watch: StoreWatch | None = None, releases=None, purposes=None,
        batch_quota: TokenBuckets | None = None, repair_after: dict[str, int] | None = None,
    ):
        """``on_rescore(seconds)``, ``on_decisions(scenario, counts)`` (counts: how many
        decisions had each outcome value, 8 entries) and
        ``on_decision(scenario, outcome)`` feed metrics. With a rollout's ``control`` block,
        the service serves model ``generation``; a new generation's service shares the old
        one's decision ``ids`` (ids stay unique). ``store_watch`` fails writes fast while
        the store is unreachable (server/store_watch.py). ``releases(model_version,
        calibration_version)`` gives the (spec, calibration) of another release, for replaying
        a decision an earlier release made (server/replay.py). ``purposes``: the names a score
        read may give (config/purposes.toml by default). ``batch_quota``: card tokens a second
        each caller identity may send in batch checks (None: no limit; the development mode
        has one identity)."""
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
        # the audit log's ids (it finds a past decision by its id); without it, any key will do
        self.ids = ids or self.audit.ids or DecisionIds(secrets.token_bytes(16))
        self.releases = releases
        purposes = list(purposes if purposes is not None else load_purposes())
        self.purposes = frozenset(purposes)
        # which bit of a citizen's consent each scenario and read purpose is (server/consent.py)
        self.consent_purposes = state.consent_purposes or ConsentPurposes(list(scenarios), purposes)
        self.batch_quota = batch_quota
        self.repair_after = repair_after  # each tier's least publicity before a repair (config/rights.toml)
        self.score_release = Release.of(self.model_version, self.calibration_version)
        self._release = {name: Release.of(self.model_version, self.calibration_version, sc.rules_version)
                         for name, sc in scenarios.items()}
        self.store_watch = store_watch if store_watch is not None else StoreWatch(store, heartbeat=False)
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
        purpose = check_purpose(purpose, self.purposes)
        row = self.row_of(citizen_id)
        caller.check_citizen(citizen_id)
        return self._disclose(self._view(citizen_id, row, self._read(row, purpose)), row, caller, purpose, method,
                              SCORE_VIEWED)

    def _disclose(self, view: ScoreView, row: int, caller: Caller, purpose: str, method: str, result: int) -> ScoreView:
        check_call_deadline()  # an answer nobody waits for any more is no disclosure
        seq, disclosure_id = self.ids.next()
        self.audit.record(seq, caller.audit_name, method, purpose, int(self.state.subject[row]), result,
                          self.score_release.audit, view.records_position, view.as_of_day)
        return dataclasses.replace(view, disclosure_id=disclosure_id)

    def _read(self, row: int, purpose: str) -> _Row:
        """The row's columns as of one moment (server/state.py read_row), with its consent
        for ``purpose`` (server/consent.py), and then the state's position: a write sets it
        before it touches a row (server/state.py POSITION)."""
        s, cols = self.state, self.state.columns
        bit = self.consent_purposes.bit(purpose)
        values = s.read_row(row, lambda: (
            s.reads_allowed(row, bit), bool(s.adult[row]), int(cols.score[row]), int(cols.level[row]),
            float(cols.percentile[row]), float(cols.raw[row]),
            tuple(int(v) for v in cols.reasons[row]), int(cols.flags[row]), float(s.computed_at[row]),
            s.features[row].copy(),
        ))
        return _Row(*values, s.position, s.as_of_day)

    def _view(self, citizen_id: str, row: int, r: _Row) -> ScoreView:
        # the one precedence of every API (proto/qianjiang/v1/eligibility.proto)
        if not r.consent:
            raise NotAuthorised()
        if not r.adult:
            raise NoScore()
        pts = self._points(r.features)
        reasons = tuple(
            (v, float((self._best[v] - pts[v]) * self._loss_weight[v])) for v in r.reasons if v != NO_REASON
        )
        return ScoreView(
            citizen_id=citizen_id, score=r.score, level=r.level, percentile=r.percentile, raw_points=r.raw,
            dimension_points=self._dimension_points(pts), reasons=reasons, hard_rule_applied=bool(r.flags & FLAG_HARD_RULE),
            model_version=self.model_version, calibration_version=self.calibration_version, computed_at=r.computed_at,
            records_position=r.position, as_of_day=r.as_of_day,
        )

    def _dimension_points(self, pts: np.ndarray) -> tuple[float, ...]:
        """Each dimension's points from its variables' in float64, in spec order: exactly what
        ExplainScore's weighted points add up to (the state keeps them float32, for display:
        kernel/columns.py COMPACT_DTYPES)."""
        c = self.spec.compiled
        sums = np.bincount(c.var_dim, weights=pts * self._loss_weight, minlength=len(self.spec.dimensions))
        return tuple(float(x) for x in sums)

    def _points(self, features: np.ndarray) -> np.ndarray:
        """Unweighted points of each variable (the reference maths, for one citizen)."""
        return variable_points(self.spec, features[None, :])[0]

    def explain(self, citizen_id: str, caller: Caller, purpose: str = "") -> tuple[ScoreView, list[Contribution]]:
        purpose = check_purpose(purpose, self.purposes)
        row = self.row_of(citizen_id)
        caller.check_citizen(citizen_id)
        r = self._read(row, purpose)
        view = self._disclose(self._view(citizen_id, row, r), row, caller, purpose, "ScoreService/ExplainScore", SCORE_EXPLAINED)
        feats = r.features
        pts = self._points(feats)
        w = self._loss_weight
        return view, [
            Contribution(v, float(feats[v]), float(pts[v]), float(w[v]), float(pts[v] * w[v]),
                         float((self._best[v] - pts[v]) * w[v]))
            for v in range(len(pts))
        ]

    def simulate(self, citizen_id: str, changes: list[Change], caller: Caller, purpose: str = "",
                 next_level: bool = False) -> SimulationView:
        """The citizen's score if ``changes`` were made to their records, and (``next_level``)
        the smallest set of actionable changes to the next level: exact, never stored
        (server/whatif.py). The precedence is GetScore's; what is audited is that the
        citizen's current score was shown (SCORE_SIMULATED), never a simulated one."""
        purpose = check_purpose(purpose, self.purposes)
        row = self.row_of(citizen_id)
        caller.check_citizen(citizen_id)
        now = self._read(row, purpose)
        self._view(citizen_id, row, now)  # NOT_AUTHORISED / UNDER_18 before any store read
        snap = self._snapshot(row)
        sim = Simulator(self.spec, self.scorer, {n: sc.default_bit for n, sc in self.scenarios.items()}, now.as_of_day,
                        compact=self.state.columns.compact, repair_after=self.repair_after)
        base = sim.base(snap.active)
        keep, added = sim.resolve(base, changes)
        current, simulated = sim.score(base, [(np.ones(len(base), bool), []), (keep, added)], adult=1)
        found = sim.next_level(base, keep, added, 1, int(simulated.columns.score[0])) if next_level else None
        check_call_deadline()

        def view(o: SimOutcome) -> ScoreView:
            c = o.columns
            return self._view(citizen_id, row, _Row(
                True, True, int(c.score[0]), int(c.level[0]), float(c.percentile[0]), float(c.raw[0]),
                tuple(int(v) for v in c.reasons[0]), int(c.flags[0]),
                now.computed_at, o.features, snap.position, now.as_of_day))

        shown = self._disclose(view(current), row, caller, purpose, "ScoreService/SimulateScore", SCORE_SIMULATED)
        return SimulationView(shown, view(simulated), found,
                              view(found.outcome) if found is not None and found.outcome is not None else None)

    def batch_scores(self, citizen_ids: list[str], caller: Caller, purpose: str = "") -> list[tuple[str, ScoreView | None]]:
        if len(citizen_ids) > MAX_BATCH_SCORES:
            raise InvalidArgument("citizen_ids", f"{len(citizen_ids)} ids exceed the limit of {MAX_BATCH_SCORES}")
        for i, cid in enumerate(citizen_ids):  # all before any disclosure: none is audited for a refused batch
            check_id(cid, f"citizen_ids[{i}]")
            caller.check_citizen(cid)  # a citizen app's batch can hold only its own citizen
        purpose = check_purpose(purpose, self.purposes)
        views = []  # every answer first, then the disclosures: all of them, or (deadline) none
        for cid in citizen_ids:
            try:
                row = self.row_of(cid)
                views.append(("OK", (self._view(cid, row, self._read(row, purpose)), row)))
            except UnknownCitizen:
                views.append(("NOT_FOUND", None))
            except NotAuthorised:
                views.append(("NOT_AUTHORISED", None))
            except NoScore:
                views.append(("UNDER_18", None))
        check_call_deadline()
        return [
            (status, None if found is None else self._disclose(found[0], found[1], caller, purpose,
                                                               "ScoreService/BatchGetScores", SCORE_VIEWED))
            for status, found in views
        ]

    # --- eligibility ------------------------------------------------------------------

    def _check_tokens(self, scenario: Scenario, tokens: bytes, counts: np.ndarray | None = None):
        """The compiled lookup and rule (server/token_index.pyx): (outcomes, subjects, allowed);
        ``counts`` (int64, 8) receives the number of each outcome."""
        return self._checker.check(tokens, *scenario.rule, counts, consent_bit=scenario.consent_bit)

    def check(self, scenario_name: str, token: bytes, caller: Caller, method: str = "EligibilityService/Check") -> DecisionView:
        # the request first (proto/qianjiang/v1/eligibility.proto): the scenario exists (the
        # names are public: ListScenarios), the caller may decide it, the token is well formed
        scenario = self.scenario(scenario_name)
        caller.check_scenario(scenario_name)
        check_token(token)
        state = self.state
        value, subject = self._checker.check_one(token, *scenario.rule, scenario.consent_bit)
        position = state.position  # after the row was read (server/state.py POSITION)
        outcome = _OUTCOME[value]
        self._on_decision(scenario.name, outcome)
        codes = REASON_CODES[outcome]
        if outcome is _DENY_HARD_RULE:
            codes = tuple(f"HARD_RULE:{self.spec.variables[v].reason.code}" for v in self._hard_rules(state.tokens.get(token)))
        release = self._release[scenario.name]
        day = state.as_of_day
        check_call_deadline()
        seq, decision_id = self.ids.next()
        self.audit.record(seq, caller.identity, method, scenario.name, subject, value, release.audit, position, day)
        return DecisionView(outcome, codes, decision_id, release, scenario.name, position, day)

    def check_in_stream(self, scenario_name: str, token: bytes, caller: Caller) -> DecisionView:
        """One message of a gateway's stream: a check, or — for a message that asks nothing
        answerable (a scenario the caller may not decide or that does not exist, a malformed
        token) — a refusal outcome for that message alone, so one bad scan never ends the
        stream. Refusals disclose nothing and are not audited. Precedence as in check()."""
        try:
            return self.check(scenario_name, token, caller, "EligibilityService/StreamCheck")
        except PermissionDenied as exc:
            return self._refusal(Outcome.SCENARIO_NOT_PERMITTED, scenario_name, exc)
        except UnknownScenario as exc:
            return self._refusal(Outcome.UNKNOWN_SCENARIO, scenario_name, exc)
        except InvalidArgument as exc:
            return self._refusal(Outcome.INVALID_REQUEST, scenario_name, exc)

    def _refusal(self, outcome: Outcome, scenario_name: str, exc: Exception) -> DecisionView:
        release = self._release.get(scenario_name) or self.score_release
        return DecisionView(outcome, REASON_CODES[outcome], "", release, scenario_name[:_ECHO_CHARS], 0, 0, str(exc))

    def _hard_rules(self, row: int) -> list[int]:
        c = self.spec.compiled
        return [v for v in np.flatnonzero(c.hard_rule) if self.state.features[row, v] > 0]

    def check_batch(self, scenario_name: str, tokens: bytes, caller: Caller) -> BatchDecision:
        scenario = self.scenario(scenario_name)
        caller.check_scenario(scenario_name)
        if len(tokens) % TOKEN_BYTES:
            raise InvalidArgument("card_tokens", f"{len(tokens)} bytes is not a whole number of {TOKEN_BYTES}-byte tokens")
        n = len(tokens) // TOKEN_BYTES
        if n > MAX_BATCH_TOKENS:
            raise InvalidArgument("card_tokens", f"{n} tokens exceed the limit of {MAX_BATCH_TOKENS}")
        # every token is a disclosure written to the audit log: a caller's volume is bounded
        if self.batch_quota is not None and not caller.unrestricted and not self.batch_quota.take(caller.identity, n):
            raise BatchQuota(int(self.batch_quota.rate))
        counts = np.empty(8, np.int64)
        outcomes, subjects, allowed = self._check_tokens(scenario, tokens, counts)
        position, day = self.state.position, self.state.as_of_day
        self._on_decisions(scenario.name, counts)
        release = self._release[scenario.name]
        check_call_deadline()
        seq, batch_id = self.ids.next()
        self.audit.record_batch(seq, caller.identity, "EligibilityService/BatchCheck", scenario.name, subjects, outcomes,
                                release.audit, position, day)
        return BatchDecision(outcomes.tobytes(), batch_id, release, scenario.name, allowed, position, day)

    # --- writes: store first, then state, under the shared lock ------------------------

    def ingest(self, record: RecordIn, caller: Caller) -> RecordAck:
        """Store one record durably and re-score its citizen. A record is identified by
        (source, record_id); the source is the authenticated caller's own namespace. The
        same record again is a DUPLICATE; the same id with other content is a RecordConflict
        (ALREADY_EXISTS naming the field): never a silent drop."""
        record = dataclasses.replace(record, source=self._source(caller, record.source, "record.source"))
        if record.variable in self._variables:
            caller.check_variable(record.variable)
        self._check_record(record)
        row = self.row_of(record.citizen_id)
        with self._writing():
            (status,) = self.store.add_records([record], sent_by=caller.identity)
            position = self.store.last_position()
        if status != ACCEPTED:  # a resend: stored already
            stored = self._get_record(record.source, record.record_id)
            return self._apply(Update(row, RecordAck(status, stored.source, stored.version, stored.position),
                                      snapshot=self._snapshot_if_behind(row, stored.position)))
        return self._apply(Update(row, RecordAck(status, record.source, 1, position), snapshot=self._snapshot(row),
                                  position=position))

    def _source(self, caller: Caller, given: str, field: str) -> str:
        """The namespace of the records a caller writes or reads: its own identity (a data
        source names only itself). The development mode's unrestricted caller names any."""
        if caller.unrestricted:
            return check_id(given, field) if given else "unspecified"
        if given and given != caller.identity:
            raise PermissionDenied(f"{caller.identity} writes only as source {caller.identity!r}, not {given[:_ECHO_CHARS]!r}")
        return caller.identity

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

    def correct_record(self, record_id: str, day: int, value: float, caller: Caller, source: str = "") -> RecordRow:
        """A new version of one of the caller's records, with another day and value."""
        check_id(record_id, "record_id")
        check_value(value, "value")
        source = self._source(caller, source, "source")
        # looked up in the caller's own namespace only: another source's id is "not found"
        caller.check_variable(self._get_record(source, record_id).variable)
        if day > self.state.as_of_day:
            raise InvalidArgument("date", "is in the future")
        with self._writing():
            row = self.store.correct_record(source, record_id, day, value, sent_by=caller.identity)
        return self._apply(Update(row.citizen_row, row, snapshot=self._snapshot_if_behind(row.citizen_row, row.position)))

    def withdraw_record(self, record_id: str, status: str, caller: Caller, source: str = "") -> RecordRow:
        """A new version of one of the caller's records that stops counting (withdrawn by the
        source, or repaired)."""
        check_id(record_id, "record_id")
        source = self._source(caller, source, "source")
        caller.check_variable(self._get_record(source, record_id).variable)
        with self._writing():
            row = self.store.set_record_status(source, record_id, status, sent_by=caller.identity)
        return self._apply(Update(row.citizen_row, row, snapshot=self._snapshot_if_behind(row.citizen_row, row.position)))

    def record_history(self, record_id: str, caller: Caller, source: str = "") -> tuple[RecordRow, list[RecordVersion]]:
        """Every version of one of the caller's records, oldest first: (the record now, versions)."""
        check_id(record_id, "record_id")
        source = self._source(caller, source, "source")
        record = self._get_record(source, record_id)
        caller.check_variable(record.variable)
        self.store_watch.check()
        with self.store_watch.watching():
            return record, self.store.record_history(source, record_id)

    def set_consent(self, citizen_id: str, granted: bool, caller: Caller = INSECURE_CALLER, purposes=(),
                    expires_day: int | None = None) -> ConsentView:
        """Grant or revoke the blanket authorisation (no ``purposes``), or each of
        ``purposes`` alone, a grant until ``expires_day`` (inclusive) or revocation
        (server/consent.py). Returns the citizen's consent as it then stands."""
        row = self.row_of(citizen_id)
        caller.check_citizen(citizen_id)
        purposes = self._consent_purposes_of(purposes)
        if expires_day is not None:
            if not granted:
                raise InvalidArgument("expires", "a revocation does not expire")
            if not purposes:
                raise InvalidArgument("expires", "only a grant of named purposes expires (the blanket stands until revoked)")
            if expires_day < self.state.as_of_day:
                raise InvalidArgument("expires", "is before today: the grant would never hold")
            if expires_day > self.state.as_of_day + MAX_CONSENT_DAYS:
                raise InvalidArgument("expires", f"is more than {MAX_CONSENT_DAYS} days ahead; grant it again later")
        with self._writing():
            if purposes:  # every call is a change: it has a position
                self.store.set_purpose_consent(citizen_id, purposes, granted, expires_day)
            else:
                self.store.set_consent(citizen_id, granted)
            position = self.store.last_position()
        view = self.consent_of(row)
        self._apply(Update(row, consent=(view.blanket, position, view.exceptions), position=position))
        return view

    def get_consent(self, citizen_id: str, caller: Caller = INSECURE_CALLER) -> ConsentView:
        row = self.row_of(citizen_id)
        caller.check_citizen(citizen_id)
        return self.consent_of(row)

    def consent_of(self, row: int) -> ConsentView:
        """A citizen's consent as the store holds it now: the blanket, each purpose's
        setting and answer (read after the write: its own change, or a newer one)."""
        self.store_watch.check()
        with self.store_watch.watching():
            _, _, blanket = self.store.citizen_by_row(row)
            settings = {p: (bool(g), e) for _, p, g, e in self.store.purpose_consents(row)}
        blanket = bool(blanket)
        cp = self.consent_purposes
        exceptions = cp.exceptions(blanket, [(p, g, e) for p, (g, e) in settings.items()], self.state.as_of_day)
        return ConsentView(blanket, exceptions, tuple(
            (name, bool(blanket ^ ((exceptions >> cp.bit(name)) & 1)), settings.get(name)) for name in cp.names))

    def _consent_purposes_of(self, purposes) -> tuple[str, ...]:
        purposes = tuple(purposes)
        if len(purposes) > MAX_PURPOSES_PER_CALL:
            raise InvalidArgument("purposes", f"{len(purposes)} purposes exceed the limit of {MAX_PURPOSES_PER_CALL}")
        for i, name in enumerate(purposes):
            if name == UNSPECIFIED or name not in self.consent_purposes:
                shown = name if len(name) <= 64 else name[:64] + "..."
                raise InvalidArgument(f"purposes[{i}]", f"{shown!r} is neither a scenario nor a read purpose one can "
                                      f"consent to (one of {', '.join(n for n in self.consent_purposes.names if n != UNSPECIFIED)})")
        return tuple(dict.fromkeys(purposes))  # each once, in the order given

    def upsert_citizen(self, citizen_id: str, birth_day: int) -> bool:
        check_id(citizen_id, "citizen_id")
        if birth_day > self.state.as_of_day:
            raise InvalidArgument("birth_date", "is in the future")
        s = self.state
        key = citizen_key(citizen_id)
        if s.citizens.get(key) < 0 and s.n_citizens >= s.capacity:
            raise CapacityExhausted(f"the serving state holds {s.capacity} citizens; restart to grow it")
        subject = self.audit_subject(citizen_id)
        with self._writing():
            row, created = self.store.upsert_citizen(citizen_id, birth_day)
            position = self.store.last_position()
        # A new citizen starts without consent, as stored; its position is the upsert's.
        return self._apply(Update(row, created, snapshot=self._snapshot(row), birth_day=birth_day,
                                  consent=(False, position, 0) if created else None, citizen_key=key,
                                  subject=subject, created=created, position=position if created else 0))

    def audit_subject(self, citizen_id: str) -> int:
        return self.state.subject_of(citizen_id)

    def checks_of(self, citizen_id: str, limit: int = 100, caller: Caller = INSECURE_CALLER):
        """Who checked this citizen: the audit entries about them, newest first."""
        self.row_of(citizen_id)
        caller.check_citizen(citizen_id)
        if not 0 <= limit <= 1000:
            raise InvalidArgument("limit", f"{limit} is outside [0, 1000]")
        if isinstance(self.audit, _NoAudit):
            return []
        return self.audit.checks_of(citizen_id, limit or 100)

    def replay(self, decision_id: str, caller: Caller):
        """An appeal: the audited disclosure ``decision_id`` and its recomputation from the
        record and consent history (server/replay.py): (AuditEntry, Replayed, the spec that
        made it). The replay is itself a disclosure to the caller, and audited as one."""
        if not decision_id:
            raise InvalidArgument("decision_id", "must not be empty")
        if isinstance(self.audit, _NoAudit):
            raise NothingToReplay("the audit log is off: there is no decision to replay")
        try:
            entry = self.audit.find(decision_id)
        except ValueError:
            raise UnknownDecision() from None
        if entry is None:
            raise UnknownDecision()
        if caller.citizen is not None and entry.subject != self.state.subject_of(caller.citizen):
            raise PermissionDenied(f"{caller.identity}'s call is bound to a citizen the decision is not about")
        if entry.subject == 0:
            raise NothingToReplay("the decision was about an unknown card: it concerns nobody")
        if entry.method.startswith("RightsService/"):  # server/rights.py: a step of a dispute or a repair
            raise NothingToReplay("a dispute's or a credit repair's event, not a decision: RightsService lists it")
        rows = np.flatnonzero(self.state.subject[: self.state.n_citizens] == np.uint64(entry.subject))
        if not len(rows):
            raise NothingToReplay("the decision's citizen is no longer held")
        row = int(rows[0])
        spec, calibration = self._release_of(entry.model_version, entry.calibration_version)
        self.store_watch.check()
        with self.store_watch.watching():
            replayed = replay(entry, row, int(self.state.birth_day[row]), self.store, spec, calibration)
        seq, _ = self.ids.next()
        self.audit.record(seq, caller.audit_name, "AuditService/ReplayDecision", entry.scenario, entry.subject,
                          replayed.result, " ".join((entry.model_version or "-", entry.calibration_version or "-", entry.rules_version or "-")),
                          replayed.position, entry.as_of_day)
        return entry, replayed, spec

    def _release_of(self, model_version: str, calibration_version: str):
        if (model_version, calibration_version) == (self.model_version, self.calibration_version):
            return self.spec, self.scorer.calibration
        try:
            if self.releases is not None:
                return self.releases(model_version, calibration_version)
        except (KeyError, ValueError, OSError):
            pass
        raise NothingToReplay(f"release {model_version}~{calibration_version} is not in the model registry")

    def register_card(self, citizen_id: str, token: bytes) -> bool:
        check_token(token)
        self.row_of(citizen_id)
        with self._writing():
            row, created = self.store.register_card(token, citizen_id)
            position = self.store.last_position() if created else 0
        # A card's binding never changes once stored: indexing it again is harmless.
        return self._apply(Update(row, created, token=token, position=position))

    @contextlib.contextmanager
    def _writing(self):
        """The store part of a write, without the state's lock: on the active generation only
        (a write that finds a rollout has switched writes nothing and raises StaleGeneration,
        retried on the new service); refused at once while the store is unreachable
        (UNAVAILABLE); one write of this worker at a time, waiting at most the store's bound
        for the one before (server/store_watch.py ``turn``)."""
        self._not_stale()
        with self.store_watch.turn():
            yield

    def _not_stale(self, update: Update | None = None) -> None:
        if self.control is not None and self.control.generation != self.generation:
            raise StaleGeneration(update)

    def _snapshot(self, row: int) -> RowSnapshot:
        """What re-scoring ``row`` needs, read after the write committed (no lock held)."""
        self.store_watch.check()
        with self.store_watch.watching():
            return self.state.snapshot(self.store, row)

    def _snapshot_if_behind(self, row: int, position: int) -> RowSnapshot | None:
        """A snapshot of ``row`` unless the state already reflects the record's version at
        ``position``: a write that changed nothing (a resend, a correction to the same
        values) re-scores nothing, but its retry after a write that committed and then
        failed to apply (UNAVAILABLE) repairs the row."""
        return self._snapshot(row) if position > self.state.row_position[row] else None

    def _apply(self, update: Update):
        """Apply a committed write to the state, under the state's lock (no store round trip
        in it): only what is fresher than what the state holds (server/state.py apply). If a
        rollout switched since the write, StaleGeneration carries ``update`` to the new
        service, so the write lands in the state that serves (the switch re-derived only rows
        marked before it, and this one may not be). Returns ``update.result``."""
        s = self.state
        t0 = time.perf_counter()
        with s.lock:
            self._not_stale(update)
            row = update.row
            if update.citizen_key is not None:
                if row >= s.capacity:
                    raise CapacityExhausted(f"the serving state holds {s.capacity} citizens; restart to grow it")
                s.citizens.insert(update.citizen_key, row)
                s.subject[row] = update.subject
                if update.created:
                    s.meta[N_CITIZENS] = max(s.n_citizens, row + 1)
            if update.position:
                s.advance(update.position)
            if update.token is not None:
                s.tokens.insert(update.token, row)
            if update.consent is not None:
                s.set_consent(row, *update.consent)
            rescored = update.snapshot is not None and s.apply(update.snapshot, self.scenarios, self.rows,
                                                               update.birth_day)
            if self.control is not None:
                self.control.mark(row)
        if rescored:
            self._on_rescore(time.perf_counter() - t0)
        return update.result

    def _rescore(self, row: int) -> None:
        """Re-derive one citizen from the store now: a snapshot, then the conditional apply."""
        self._apply(Update(row, snapshot=self._snapshot(row)))

    def reapply(self, update: Update):
        """A write committed under the previous generation, applied to this one's state
        (servicers.py Offload, on StaleGeneration with an update). The snapshot holds raw
        records, derived with this state's spec; if the switch re-derived the row from a newer
        one meanwhile, the freshness check keeps that."""
        return self._apply(update)

    def _get_record(self, source: str, record_id: str) -> RecordRow:
        self.store_watch.check()
        with self.store_watch.watching():
            return self.store.get_record(source, record_id)


def check_value(value: float, field: str) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(field, f"{value} is not a finite number")
    if value < 0:
        raise InvalidArgument(field, f"{value} is negative")
    if value > MAX_RECORD_VALUE:
        raise InvalidArgument(field, f"{value:g} is above the largest accepted value ({MAX_RECORD_VALUE:g})")
    return value


def check_purpose(purpose: str, purposes) -> str:
    """The purpose of a score read, as audited: empty is "unspecified"; otherwise one of the
    configured ``purposes`` (free text would let one caller fill the audit log's dictionary,
    and tell a citizen nothing)."""
    if not purpose:
        return UNSPECIFIED
    if purpose not in purposes:
        shown = purpose if len(purpose) <= 64 else purpose[:64] + "..."
        raise InvalidArgument("purpose", f"{shown!r} is not a configured purpose (one of {', '.join(sorted(purposes))})")
    return purpose
