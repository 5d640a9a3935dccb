"""The citizens' rights over their records: disputes and credit repair
(proto/qianjiang/v1/rights.proto; docs/product.md "Disputes and credit repair").

    >>> rights = Rights(credit_service, shared, load_rights_config())                 # doctest: +SKIP
    >>> d = rights.file_dispute("c00000003", "police", "r-1", "not my car", caller)  # doctest: +SKIP
    >>> rights.answer_dispute(d.row.dispute_id, "confirmed", None, None, "checked", police)  # doctest: +SKIP

A **dispute** (异议): the citizen app files it for its citizen on one of their records, with a
reason. The record keeps counting, marked disputed in the explanation, while its source
answers: *confirm* (it stands), *correct* (a new version with another date and value) or
*withdraw* (a new version that stops counting). The source has ``answer_days`` (20) calendar
days after the day it was filed, China's credit reporting rules; a deadline on a rest day
moves to the next working day (Civil Code art. 203). Left unanswered past it, the deadline
sweep SUSPENDS the record: a new version with status "suspended", which stops counting (every
read counts only "active" records), until the source answers: confirm restores it (a new
version, active again), correct counts the corrected version, withdraw ends it. The answer is
final.

A **credit-repair application** (信用修复): the citizen app applies for its citizen to repair
a negative record, with a statement of the remedy. The tier rules of the credit-repair
measures: a record may be repaired once its tier's minimum publicity period has passed since
its date (minor: at once; general: 3 months; serious: 1 year; ``min_publicity_days``), and
while it still counts (its variable's lifetime in the model spec is the maximum: up to 3
months, 1 year, 3 years). The source decides within ``decision_working_days`` (5) working
days after the day it was filed (weekends skipped, the State Council's public holidays
skipped and its make-up working days counted: :class:`Calendar`, ``config/rights.toml``).
Approved, the record gets a version "repaired" and stops counting. Undecided past the
deadline, the sweep flags the application overdue and escalated (``escalated_at``, an event
the citizen sees); it stays pending for the source, and is never approved by default: a
serious record lifted because an office was slow would defeat the measures.

One procedure at a time per record: no dispute while a repair application waits for its
decision, and no application while a dispute is open (UNDER_REVIEW).

Every step is one store transaction with one change in the log (server/store.py), a change of
the record a new version of it; the citizen is then re-derived from the store through the
service's own path (CreditService ``_writing`` / ``_apply``: at once, on every generation of
a rollout), and the step is an event in the audit log about the citizen (result codes
:data:`RESULT_CODES`, e.g. RECORD_SUSPENDED; method "RightsService/..."), which the citizen
lists with "who checked me". The store's rows keep who did what when; an event the audit log
cannot take after the step committed is logged as an error, never a failed step (its
retry would find it done).

The **clock** of all of this is injectable: ``Rights(now=...)`` in-process, and a server
started with ``--test-clock`` (refused with ``--production``) moves its rights clock forward
with ``RightsService/AdvanceTestClock``, through :class:`RightsShared`, which every worker and
the parent's deadline sweep (:class:`DeadlineSweep`) read. The test clock moves deadlines and
the rights' calendar only; a score's records still age by the real day.

The **marks** the explanation shows (VariableContribution.disputed / .suspended) come from
memory, never the store (score reads are answered while the store is away): per citizen row,
one 64-bit word in memory shared by every worker, a bit per variable with an open dispute
(low half) or a suspended one (high half), by the variable's index in a shared table of up
to 32 names, with the store position it reflects (an older one never overwrites a newer
one). Rebuilt from the store at each start (:meth:`RightsShared.rebuild`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import multiprocessing
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kernel.spec import TIER_REPAIR_AFTER_DAYS
from server.audit import AuditFull, AuditUnavailable
from server.auth import Caller, check_call_deadline
from server.city_time import EPOCH, current_zone, day_in
from server.config_files import DEFAULT_CONFIG_DIR, read_toml
from server.errors import InvalidArgument, PermissionDenied, TestClockOff
from server.scenarios import RESULT_NAMES
from server.service import CreditService, Update, check_id, check_value
from server.state import _SharedArena, iso_of
from server.store import (
    DISPUTE_CONFIRMED, DISPUTE_CORRECTED, DISPUTE_OPEN, DISPUTE_WITHDRAWN, CitizenRecord, DisputeNotFound, DisputeRow,
    NotRepairable, RecordRow, RepairNotFound, RepairRow, RightsMarks,
)

log = logging.getLogger("qianjiang.rights")

DEFAULT_RIGHTS_PATH = DEFAULT_CONFIG_DIR / "rights.toml"

#: Who suspends records and escalates applications: the platform's deadline sweep (the
#: ``sent_by`` of a suspension's record version, the caller of its audit event).
SYSTEM = "qianjiang-rights"

#: Audit result codes of the rights' events (a decision's is its Outcome value, a score
#: disclosure's 100-102: server/scenarios.py), and their names in "who checked me".
DISPUTE_FILED, DISPUTE_CONFIRMED_EVENT, DISPUTE_CORRECTED_EVENT, DISPUTE_WITHDRAWN_EVENT, RECORD_SUSPENDED = range(120, 125)
REPAIR_APPLIED, REPAIR_APPROVED_EVENT, REPAIR_REJECTED_EVENT, REPAIR_OVERDUE, RECORDS_VIEWED = range(125, 130)
RESULT_CODES = {
    DISPUTE_FILED: "DISPUTE_FILED", DISPUTE_CONFIRMED_EVENT: "DISPUTE_CONFIRMED",
    DISPUTE_CORRECTED_EVENT: "DISPUTE_CORRECTED", DISPUTE_WITHDRAWN_EVENT: "DISPUTE_WITHDRAWN",
    RECORD_SUSPENDED: "RECORD_SUSPENDED", REPAIR_APPLIED: "REPAIR_APPLIED", REPAIR_APPROVED_EVENT: "REPAIR_APPROVED",
    REPAIR_REJECTED_EVENT: "REPAIR_REJECTED", REPAIR_OVERDUE: "REPAIR_OVERDUE", RECORDS_VIEWED: "RECORDS_VIEWED",
}
RESULT_NAMES.update(RESULT_CODES)  # the one table "who checked me" names results from

_ANSWER_EVENTS = {DISPUTE_CONFIRMED: DISPUTE_CONFIRMED_EVENT, DISPUTE_CORRECTED: DISPUTE_CORRECTED_EVENT,
                  DISPUTE_WITHDRAWN: DISPUTE_WITHDRAWN_EVENT}

#: The most a test clock moves in one call (past this, a mistake: a unit of days for seconds).
MAX_CLOCK_STEP = 3 * 366 * 86_400
#: What a listing returns at most.
MAX_LIST = 1000
TIERS = tuple(TIER_REPAIR_AFTER_DAYS)  # kernel/spec.py: the tiers and their least publicity


class RightsConfigError(ValueError):
    pass


# --- the calendar --------------------------------------------------------------------------


def weekday(day: int) -> int:
    """0 Monday .. 6 Sunday of a day (days since 1970-01-01, a Thursday)."""
    return (day + 3) % 7


def year_of(day: int) -> int:
    return (EPOCH + _dt.timedelta(days=int(day))).year


@dataclass(frozen=True)
class Calendar:
    """Working days: Monday to Friday, less ``holidays``, plus ``working_weekends`` (the
    make-up working days, 调休上班), for the ``years`` whose State Council notice is
    configured; a day of another year counts weekends only.

        >>> from server.state import day_of
        >>> cal = load_rights_config().calendar
        >>> iso_of(cal.add_working_days(day_of("2026-02-13"), 1))   # Friday before the Spring Festival
        '2026-02-14'
        >>> iso_of(cal.add_working_days(day_of("2026-02-14"), 1))   # a make-up Saturday; then 9 days off
        '2026-02-24'
        >>> iso_of(cal.add_working_days(day_of("2026-12-04"), 5))   # Friday: Mon-Fri of the next week
        '2026-12-11'
    """

    holidays: frozenset[int] = frozenset()
    working_weekends: frozenset[int] = frozenset()
    years: frozenset[int] = frozenset()

    def is_working_day(self, day: int) -> bool:
        if day in self.working_weekends:
            return True
        return day not in self.holidays and weekday(day) < 5

    def covers(self, day: int) -> bool:
        return year_of(day) in self.years

    def add_working_days(self, day: int, n: int) -> int:
        """The ``n``-th working day after ``day`` (``day`` itself not counted)."""
        while n > 0:
            day += 1
            if self.is_working_day(day):
                n -= 1
        return day

    def working_on_or_after(self, day: int) -> int:
        while not self.is_working_day(day):
            day += 1
        return day


@dataclass(frozen=True)
class RightsConfig:
    """config/rights.toml: the deadlines, the texts' bounds, the tier rules, the calendar."""

    answer_days: int = 20
    max_text_chars: int = 500
    decision_working_days: int = 5
    max_statement_chars: int = 1000
    min_publicity_days: dict = field(default_factory=lambda: dict(TIER_REPAIR_AFTER_DAYS))
    calendar: Calendar = Calendar()

    def dispute_due_day(self, filed_day: int) -> int:
        """The last day to answer a dispute filed on ``filed_day``: ``answer_days`` calendar
        days after it, on a rest day the next working day."""
        return self.calendar.working_on_or_after(filed_day + self.answer_days)

    def repair_due_day(self, filed_day: int) -> int:
        """The last day to decide an application filed on ``filed_day``: the
        ``decision_working_days``-th working day after it."""
        return self.calendar.add_working_days(filed_day, self.decision_working_days)


def _days(text, where: str) -> list[int]:
    from server.state import day_of

    if not isinstance(text, str):
        raise RightsConfigError(f"{where}: expected a date string, got {text!r}")
    first, dots, last = text.partition("..")
    try:
        lo = day_of(first)
        hi = day_of(last) if dots else lo
    except ValueError:
        raise RightsConfigError(f"{where}: {text!r} is not YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD") from None
    if hi < lo or hi - lo > 31:
        raise RightsConfigError(f"{where}: {text!r} is not a run of at most 32 days")
    return list(range(lo, hi + 1))


def _positive(doc: dict, key: str, where: str, low: int = 1, high: int = 10_000) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RightsConfigError(f"{where}.{key}: expected a whole number in [{low}, {high}], got {value!r}")
    return value


def load_rights_config(path: str | Path | None = None) -> RightsConfig:
    """Read and check config/rights.toml (or ``path``); RightsConfigError names the key."""
    path, doc = read_toml(path, DEFAULT_RIGHTS_PATH, RightsConfigError)
    name = path.name
    tables = {"disputes": {"answer_days", "max_text_chars"},
              "repairs": {"decision_working_days", "max_statement_chars", "min_publicity_days"}, "calendar": None}
    for key in doc:
        if key not in tables:
            raise RightsConfigError(f"{name}: unknown table {key!r} (disputes, repairs, calendar)")
    for key, allowed in tables.items():
        if allowed is not None and set(doc.get(key, {})) - allowed:
            raise RightsConfigError(f"{name}: [{key}].{sorted(set(doc[key]) - allowed)[0]}: unknown key")
    disputes, repairs = doc.get("disputes", {}), doc.get("repairs", {})
    tiers = repairs.get("min_publicity_days")
    if not isinstance(tiers, dict) or set(tiers) != set(TIERS):
        raise RightsConfigError(f"{name}: [repairs].min_publicity_days: expected minor, general and serious")
    minimum = {t: _positive(tiers, t, f"{name}: [repairs].min_publicity_days", 0, 1095) for t in TIERS}
    holidays, working, years = set(), set(), set()
    for year, notice in doc.get("calendar", {}).items():
        where = f"{name}: [calendar.{year}]"
        if not (year.isdigit() and len(year) == 4) or not isinstance(notice, dict):
            raise RightsConfigError(f"{where}: expected a table per year, e.g. [calendar.2026]")
        if set(notice) - {"notice", "holidays", "working_weekends"}:
            raise RightsConfigError(f"{where}: unknown key {sorted(set(notice) - {'notice', 'holidays', 'working_weekends'})[0]!r}")
        for key, into in (("holidays", holidays), ("working_weekends", working)):
            for text in notice.get(key, []):
                for day in _days(text, f"{where}.{key}"):
                    if year_of(day) != int(year):
                        raise RightsConfigError(f"{where}.{key}: {text!r} is not in {year}")
                    if key == "working_weekends" and weekday(day) < 5:
                        raise RightsConfigError(f"{where}.{key}: {text!r} is not a Saturday or Sunday")
                    into.add(day)
        years.add(int(year))
    return RightsConfig(
        answer_days=_positive(disputes, "answer_days", f"{name}: [disputes]", 1, 365),
        max_text_chars=_positive(disputes, "max_text_chars", f"{name}: [disputes]", 1, 10_000),
        decision_working_days=_positive(repairs, "decision_working_days", f"{name}: [repairs]", 1, 365),
        max_statement_chars=_positive(repairs, "max_statement_chars", f"{name}: [repairs]", 1, 10_000),
        min_publicity_days=minimum,
        calendar=Calendar(frozenset(holidays), frozenset(working), frozenset(years)),
    )


def day_start(day: int) -> float:
    """When the city's ``day`` begins, seconds since the epoch."""
    return _dt.datetime.combine(EPOCH + _dt.timedelta(days=int(day)), _dt.time(0), tzinfo=current_zone()).timestamp()


def city_day(at: float) -> int:
    """The city's day of a moment (seconds since the epoch)."""
    return day_in(current_zone(), _dt.datetime.fromtimestamp(at, _dt.timezone.utc))


# --- what every process shares: the clock and the marks -------------------------------------

#: Variables the marks can name (a bit each, in each half of a row's word).
MARK_NAMES = 32
_NAME_BYTES = 64
_N_NAMES, _TEST_CLOCK = 0, 1


class RightsShared:
    """The rights clock's offset and the per-citizen dispute marks, in memory shared by
    every worker (create it before they fork, like the serving state): ``capacity`` rows."""

    def __init__(self, capacity: int, test_clock: bool = False):
        a = _SharedArena({
            "clock": (np.float64, (1,)), "meta": (np.int64, (2,)), "names": (np.uint8, (MARK_NAMES, _NAME_BYTES)),
            "marks": (np.uint64, (capacity,)), "position": (np.int64, (capacity,)),
        }).arrays
        self._clock, self._meta, self._names = a["clock"], a["meta"], a["names"]
        self.marks, self.position = a["marks"], a["position"]
        self._meta[_TEST_CLOCK] = int(bool(test_clock))
        self.capacity = int(capacity)
        self.lock = multiprocessing.get_context("fork").Lock()
        self._index_of: dict[str, int] = {}  # this process's cache of the (append-only) name table
        self._full_warned = False

    # the clock

    @property
    def test_clock(self) -> bool:
        return bool(self._meta[_TEST_CLOCK])

    @property
    def offset(self) -> float:
        return float(self._clock[0])

    def now(self) -> float:
        """The rights clock: the real one, plus a test clock's offset."""
        return time.time() + float(self._clock[0])

    def advance(self, seconds: float) -> float:
        with self.lock:
            self._clock[0] += float(seconds)
            return float(self._clock[0])

    # the marks

    def _name_list(self) -> list[str]:
        n = int(self._meta[_N_NAMES])
        return [bytes(self._names[k]).rstrip(b"\0").decode() for k in range(n)]

    def _index(self, name: str) -> int:
        k = self._index_of.get(name)
        if k is not None:
            return k
        data = name.encode()
        if len(data) > _NAME_BYTES:
            return -1
        with self.lock:
            names = self._name_list()
            if name in names:
                k = names.index(name)
            elif len(names) >= MARK_NAMES:
                if not self._full_warned:
                    self._full_warned = True
                    log.warning("the explanation's dispute marks name at most %d variables: %r is not marked "
                                "(ListDisputes still shows its disputes)", MARK_NAMES, name)
                return -1
            else:
                k = len(names)
                self._names[k, :len(data)] = np.frombuffer(data, np.uint8)
                self._meta[_N_NAMES] = k + 1
        self._index_of[name] = k
        return k

    def set_marks(self, marks: RightsMarks) -> None:
        """A citizen's open disputes as of a position: kept unless newer ones are."""
        word = 0
        for variable, state in marks.open:
            k = self._index(variable)
            if k >= 0:
                word |= 1 << (k if state == DISPUTE_OPEN else k + 32)
        row = marks.citizen_row
        if not 0 <= row < self.capacity:
            return
        with self.lock:
            if marks.position >= self.position[row]:
                self.marks[row] = word
                self.position[row] = marks.position

    def marked(self, row: int) -> tuple[frozenset[str], frozenset[str]]:
        """(variables with an open dispute, variables with a suspended one) of a row: from
        memory, no lock (one aligned word)."""
        word = int(self.marks[row]) if 0 <= row < self.capacity else 0
        if not word:
            return frozenset(), frozenset()
        names = self._name_list()
        return (frozenset(n for k, n in enumerate(names) if word >> k & 1),
                frozenset(n for k, n in enumerate(names) if word >> (k + 32) & 1))

    def rebuild(self, store) -> int:
        """Every open dispute's marks from the store (a start, before serving). Returns how
        many citizens have one."""
        position, rows = store.open_disputes()
        with self.lock:
            self.marks[:] = 0
            self.position[:] = 0
        by_row: dict[int, list[tuple[str, str]]] = {}
        for row, variable, state in rows:
            by_row.setdefault(row, []).append((variable, state))
        for row, open_ in by_row.items():
            self.set_marks(RightsMarks(row, position, tuple(open_)))
        return len(by_row)


# --- the domain ------------------------------------------------------------------------------


class DisputeView(NamedTuple):
    row: DisputeRow
    now: float  # the rights clock when it was read (overdue)
    event_id: str = ""


class RepairView(NamedTuple):
    row: RepairRow
    now: float
    event_id: str = ""


class RecordItem(NamedTuple):
    """One of a citizen's records, with the rules that apply to it."""

    record: CitizenRecord
    direction: str
    tier: str
    counts_until: int | None  # the last day a negative record counts
    repairable_from: int | None  # the first day a repair may be applied for


class ClockView(NamedTuple):
    now: float
    offset: float
    today: int


#: The answers, as the store names them.
ANSWERS = (DISPUTE_CONFIRMED, DISPUTE_CORRECTED, DISPUTE_WITHDRAWN)


def check_text(text: str, field: str, max_chars: int, required: bool = True) -> str:
    """A citizen's or a source's words: 1-``max_chars`` characters (0 when not required),
    no control characters but newline and tab (PostgreSQL refuses NUL in text)."""
    if required and not text.strip():
        raise InvalidArgument(field, "must not be empty")
    if len(text) > max_chars:
        raise InvalidArgument(field, f"{len(text)} characters exceed the limit of {max_chars}")
    if any(ord(ch) < 32 and ch not in "\n\t" or ch == "\x7f" for ch in text):
        raise InvalidArgument(field, "must not contain control characters")
    return text


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class Rights:
    """The rights' operations on one generation of the service (a rollout makes another):
    what :class:`server.servicers.RightsServicer` calls. ``now``: the rights clock (default:
    the shared one, which a test clock moves)."""

    def __init__(self, credit: CreditService, shared: RightsShared, config: RightsConfig, now=None):
        self.credit = credit
        self.store = credit.store
        self.spec = credit.spec
        self.shared = shared
        self.config = config
        self.now = now or shared.now
        self._warned_years: set[int] = set()

    # who may do what

    def _citizen_app(self, caller: Caller, citizen_id: str, what: str) -> int:
        """The row of the citizen a citizen app's call names, and is bound to (server/end_user.py)."""
        if not (caller.unrestricted or caller.role == "citizen_app"):
            raise PermissionDenied(f"{caller.identity} is not a citizen app: only a citizen's app {what}")
        row = self.credit.row_of(citizen_id)
        caller.check_citizen(citizen_id)
        return row

    @staticmethod
    def _as_source(caller: Caller) -> None:
        if not (caller.unrestricted or caller.role == "source"):
            raise PermissionDenied(f"{caller.identity} is not a data source: only a record's source answers for it")

    def _listing(self, caller: Caller, citizen_id: str, source: str, limit: int) -> tuple[int | None, str | None, int]:
        """(citizen row, source, limit) of a listing: a citizen app lists one citizen's (the
        one its call is bound to), a source its own records', the development mode's caller
        either; None for no restriction."""
        if not 0 <= limit <= MAX_LIST:
            raise InvalidArgument("limit", f"{limit} is outside [0, {MAX_LIST}]")
        row = None
        if caller.unrestricted:
            if not citizen_id and not source:
                raise InvalidArgument("citizen_id", "give a citizen, a source, or both")
        elif caller.role == "citizen_app":
            if not citizen_id:
                raise InvalidArgument("citizen_id", "must not be empty: a citizen app lists one citizen's")
            self.credit.row_of(citizen_id)
            caller.check_citizen(citizen_id)
        elif caller.role == "source":
            source = self.credit._source(caller, source, "source")
        else:
            raise PermissionDenied(f"{caller.identity} is neither a citizen app nor a data source")
        if citizen_id:
            row = self.credit.row_of(citizen_id)
        if source:
            check_id(source, "source")
        return row, source or None, limit or 100

    # the clock and the calendar

    def today(self, at: float | None = None) -> int:
        return city_day(self.now() if at is None else at)

    def _due(self, day: int) -> float:
        if not self.config.calendar.covers(day) and year_of(day) not in self._warned_years:
            self._warned_years.add(year_of(day))
            log.warning("config/rights.toml has no public holidays for %d: its deadlines count weekends only; add "
                        "the State Council's notice for %d", year_of(day), year_of(day))
        return day_start(day + 1)

    # --- reads ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _reading(self):
        self.credit.store_watch.check()
        with self.credit.store_watch.watching():
            yield

    def _disclose(self, caller: Caller, method: str, what: str, row: int) -> str:
        """A listing of a citizen's records, disputes or applications to their app: audited
        before it is answered (refused, as a score view is, when the audit log cannot take it)."""
        check_call_deadline()
        seq, disclosure_id = self.credit.ids.next()
        self.credit.audit.record(seq, caller.audit_name, f"RightsService/{method}", what, int(self.credit.state.subject[row]),
                                 RECORDS_VIEWED, self.credit.score_release.audit, self.credit.state.position,
                                 self.credit.state.as_of_day)
        return disclosure_id

    def citizen_records(self, citizen_id: str, caller: Caller) -> tuple[list[RecordItem], str]:
        row = self._citizen_app(caller, citizen_id, "lists a citizen's records")
        with self._reading():
            records = self.store.citizen_records(row)
        items = []
        for c in records:
            index = self.credit._variables.get(c.record.variable)
            var = self.spec.variables[index] if index is not None else None
            tier, until, repairable = "", None, None
            if var is not None and var.direction == "negative":
                tier = var.tier or ""
                until = c.record.day + var.lifetime_days - 1
                repairable = c.record.day + self.config.min_publicity_days.get(tier, 0)
            items.append(RecordItem(c, var.direction if var is not None else "", tier, until, repairable))
        return items, self._disclose(caller, "ListCitizenRecords", "records", row)

    def list_disputes(self, citizen_id: str, source: str, open_only: bool, limit: int, caller: Caller) -> list[DisputeView]:
        row, source, limit = self._listing(caller, citizen_id, source, limit)
        with self._reading():
            found = self.store.list_disputes(row, source, open_only, limit)
        if row is not None and caller.role == "citizen_app":
            self._disclose(caller, "ListDisputes", "disputes", row)
        now = self.now()
        return [DisputeView(d, now) for d in found]

    def list_repairs(self, citizen_id: str, source: str, pending_only: bool, limit: int, caller: Caller) -> list[RepairView]:
        row, source, limit = self._listing(caller, citizen_id, source, limit)
        with self._reading():
            found = self.store.list_repairs(row, source, pending_only, limit)
        if row is not None and caller.role == "citizen_app":
            self._disclose(caller, "ListRepairs", "repairs", row)
        now = self.now()
        return [RepairView(r, now) for r in found]

    # --- writes ---------------------------------------------------------------------------

    def _event(self, caller: str, method: str, what: str, row: int, result: int, position: int) -> str:
        """The step's event in the audit log, about the citizen: its id. The step has
        committed: an event the log cannot take is logged, not a failed step."""
        seq, event_id = self.credit.ids.next()
        try:
            self.credit.audit.record(seq, caller, method, what, int(self.credit.state.subject[row]), result,
                                     self.credit.score_release.audit, position, self.credit.state.as_of_day)
        except (AuditUnavailable, AuditFull, ValueError) as exc:
            log.error("the audit log did not take the event %s of %s at position %d (the store keeps the step): %s",
                      RESULT_CODES.get(result, result), method, position, exc)
        return event_id

    def _rescore(self, row: int, record: RecordRow | None, position: int, result):
        """Apply a committed step to the serving state: the citizen re-derived from the
        store if their record changed (at once), the state's position advanced either way."""
        c = self.credit
        snapshot = c._snapshot_if_behind(row, record.position) if record is not None else None
        return c._apply(Update(row, result, snapshot=snapshot, position=position))

    def file_dispute(self, citizen_id: str, source: str, record_id: str, reason: str, caller: Caller) -> DisputeView:
        row = self._citizen_app(caller, citizen_id, "files a dispute for its citizen")
        check_id(source, "source")
        check_id(record_id, "record_id")
        check_text(reason, "reason", self.config.max_text_chars)
        at = self.now()
        due_at = self._due(self.config.dispute_due_day(city_day(at)))
        with self.credit._writing():
            dispute, marks = self.store.file_dispute(_new_id("dsp"), source, record_id, citizen_id, reason,
                                                     caller.identity, at, due_at)
        self.shared.set_marks(marks)
        event = self._event(caller.audit_name, "RightsService/FileDispute", f"dispute:{dispute.variable}", row,
                            DISPUTE_FILED, marks.position)
        return self._rescore(row, None, marks.position, DisputeView(dispute, at, event))

    def answer_dispute(self, dispute_id: str, answer: str, day: int | None, value: float | None, note: str,
                       caller: Caller, source: str = "") -> DisputeView:
        self._as_source(caller)
        source = self.credit._source(caller, source, "source")
        check_id(dispute_id, "dispute_id")
        if answer not in ANSWERS:
            raise InvalidArgument("answer", "must be CONFIRM, CORRECT or WITHDRAW")
        check_text(note, "note", self.config.max_text_chars)
        with self._reading():
            try:
                dispute = self.store.get_dispute(dispute_id)
            except DisputeNotFound:
                dispute = None
        if dispute is None or dispute.source != source:  # another source's: not there, to this one
            raise DisputeNotFound(f"no dispute {dispute_id!r} of a record from source {source!r}")
        caller.check_variable(dispute.variable)
        if answer == DISPUTE_CORRECTED:
            if day is None:
                raise InvalidArgument("date", "must not be empty to correct (YYYY-MM-DD)")
            check_value(value, "value")
            if day > self.credit.state.as_of_day:
                raise InvalidArgument("date", "is in the future")
            with self._reading():
                record = self.credit._get_record(source, dispute.record_id)
            if (record.day, record.value) == (day, value):
                raise InvalidArgument("date", "the record has this date and value already: answer CONFIRM to keep it")
        else:
            day = value = None
        at = self.now()
        with self.credit._writing():
            dispute, record, marks = self.store.answer_dispute(dispute_id, source, answer, day, value, note,
                                                               caller.identity, at)
        self.shared.set_marks(marks)
        event = self._event(caller.identity, "RightsService/AnswerDispute", f"dispute:{dispute.variable}",
                            dispute.citizen_row, _ANSWER_EVENTS[answer], marks.position)
        return self._rescore(dispute.citizen_row, record, marks.position, DisputeView(dispute, at, event))

    def _repair_tier(self, record: RecordRow, today: int) -> str:
        """The tier rules: the record's tier, if it may be repaired today; NotRepairable
        saying why not otherwise."""
        index = self.credit._variables.get(record.variable)
        if index is None:
            raise NotRepairable(f"{record.variable!r} is not a variable of model {self.credit.model_version}")
        var = self.spec.variables[index]
        if var.direction != "negative" or not var.tier:
            raise NotRepairable(f"{record.variable} is a positive record: there is nothing to repair")
        age = today - record.day
        if age >= var.lifetime_days:
            raise NotRepairable(f"the record no longer counts (a {var.tier} record of {record.variable} counts "
                                f"{var.lifetime_days} days, until {iso_of(record.day + var.lifetime_days - 1)}): "
                                "there is nothing to repair")
        minimum = self.config.min_publicity_days[var.tier]
        if age < minimum:
            raise NotRepairable(f"a {var.tier} record may be repaired only after its minimum publicity period of "
                                f"{minimum} days: from {iso_of(record.day + minimum)}")
        return var.tier

    def apply_repair(self, citizen_id: str, source: str, record_id: str, statement: str, caller: Caller) -> RepairView:
        row = self._citizen_app(caller, citizen_id, "applies for credit repair for its citizen")
        check_id(source, "source")
        check_id(record_id, "record_id")
        check_text(statement, "statement", self.config.max_statement_chars)
        at = self.now()
        today = city_day(at)
        due_at = self._due(self.config.repair_due_day(today))
        with self.credit._writing():
            repair = self.store.apply_repair(_new_id("rep"), source, record_id, citizen_id, statement, caller.identity,
                                             at, due_at, lambda record: self._repair_tier(record, today))
        event = self._event(caller.audit_name, "RightsService/ApplyRepair", f"repair:{repair.variable}", row,
                            REPAIR_APPLIED, repair.position)
        return self._rescore(row, None, repair.position, RepairView(repair, at, event))

    def decide_repair(self, repair_id: str, approve: bool, reason: str, caller: Caller, source: str = "") -> RepairView:
        self._as_source(caller)
        source = self.credit._source(caller, source, "source")
        check_id(repair_id, "repair_id")
        check_text(reason, "reason", self.config.max_text_chars, required=not approve)
        with self._reading():
            try:
                repair = self.store.get_repair(repair_id)
            except RepairNotFound:
                repair = None
        if repair is None or repair.source != source:
            raise RepairNotFound(f"no credit-repair application {repair_id!r} for a record from source {source!r}")
        caller.check_variable(repair.variable)
        at = self.now()
        with self.credit._writing():
            repair, record = self.store.decide_repair(repair_id, source, approve, reason, caller.identity, at)
        event = self._event(caller.identity, "RightsService/DecideRepair", f"repair:{repair.variable}",
                            repair.citizen_row, REPAIR_APPROVED_EVENT if approve else REPAIR_REJECTED_EVENT,
                            repair.position)
        return self._rescore(repair.citizen_row, record, repair.position, RepairView(repair, at, event))

    def sweep(self, at: float | None = None) -> dict[str, int]:
        """The deadlines at ``at`` (default: now): every open dispute past its deadline
        suspended (its record stops counting, the citizen re-scored), every pending
        application past its deadline escalated. Each is its own step: one that fails
        leaves the others done, and the next sweep finds it again."""
        at = self.now() if at is None else at
        done = {"suspended": 0, "escalated": 0}
        for dispute_id in self.store.due_disputes(at):
            with self.credit._writing():
                got = self.store.suspend_dispute(dispute_id, at, SYSTEM)
            if got is None:  # answered meanwhile
                continue
            dispute, record, marks = got
            self.shared.set_marks(marks)
            self._event(SYSTEM, "RightsService/DeadlineSweep", f"dispute:{dispute.variable}", dispute.citizen_row,
                        RECORD_SUSPENDED, marks.position)
            self._rescore(dispute.citizen_row, record, marks.position, None)
            done["suspended"] += 1
            log.info("dispute %s unanswered past its deadline: record suspended", dispute_id)
        for repair_id in self.store.due_repairs(at):
            with self.credit._writing():
                repair = self.store.escalate_repair(repair_id, at)
            if repair is None:
                continue
            self._event(SYSTEM, "RightsService/DeadlineSweep", f"repair:{repair.variable}", repair.citizen_row,
                        REPAIR_OVERDUE, repair.position)
            self._rescore(repair.citizen_row, None, repair.position, None)
            done["escalated"] += 1
            log.warning("credit-repair application %s undecided past its deadline: escalated", repair_id)
        return done

    def advance_test_clock(self, seconds: int) -> ClockView:
        if not self.shared.test_clock:
            raise TestClockOff()
        if not 1 <= seconds <= MAX_CLOCK_STEP:
            raise InvalidArgument("seconds", f"{seconds} is outside [1, {MAX_CLOCK_STEP}] (forward only)")
        offset = self.shared.advance(seconds)
        now = self.now()
        log.warning("test clock moved forward %d s: the rights clock is %.0f s ahead of the real one", seconds, offset)
        return ClockView(now, offset, city_day(now))

    def reapply(self, update: Update):
        """A step committed under the previous model generation (servicers.py Offload)."""
        return self.credit.reapply(update)


# --- the parent's deadline sweep --------------------------------------------------------------


class DeadlineSweep:
    """Called from the parent's maintenance loop (server/app.py): every ``every`` seconds, a
    cheap look for deadlines past; when there are any, a service of the active generation on
    the parent's own store connection and audit writer runs :meth:`Rights.sweep`. While the
    store fails it backs off (5 s, doubling to a minute), so the loop's other work is not
    held up by connection attempts to a store that is away."""

    #: The first and the longest wait after a failed sweep, seconds.
    BACKOFF = (5.0, 60.0)

    def __init__(self, runtime, every: float = 1.0):
        self.runtime = runtime
        self.every = every
        self._next = 0.0
        self._store = None
        self._audit = None
        self._failing = False
        self._backoff = self.BACKOFF[0]

    def __call__(self) -> dict[str, int] | None:
        if time.monotonic() < self._next:
            return None
        self._next = time.monotonic() + self.every
        rt = self.runtime
        shared = getattr(rt, "rights_shared", None)
        if shared is None or not rt.state.ready:
            return None
        at = shared.now()
        try:
            if self._store is None:
                self._store = rt.open_store()
            if not self._store.due_disputes(at, 1) and not self._store.due_repairs(at, 1):
                done = None
            else:
                done = Rights(self._service(), shared, rt.rights_config).sweep(at)
            self._failing, self._backoff = False, self.BACKOFF[0]
            return done
        except Exception as exc:  # noqa: BLE001 - the store away, a rollout racing: a later round retries
            if not self._failing:
                log.warning("deadline sweep failed (retried with backoff): %s", exc)
            self._failing = True
            self._next = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self.BACKOFF[1])
            self.close_store()
            return None

    def _service(self) -> CreditService:
        from kernel.score import Scorer

        rt = self.runtime
        if self._audit is None and rt.config.audit:
            from server.audit import AuditLog

            self._audit = AuditLog(Path(rt.config.data_dir) / "audit", rt.keys.audit,
                                   flush_interval=rt.config.audit_flush_seconds,
                                   max_pending=rt.config.audit_max_pending).start()
        return CreditService(rt.state, self._store, Scorer(rt.spec, rt.calibration()), rt.scenarios, audit=self._audit,
                             control=rt.control, generation=rt.control.generation, purposes=rt.purposes)

    def close_store(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()

    def close(self) -> None:
        self.close_store()
        if self._audit is not None:
            self._audit.close()
