"""Appeals: recompute a past decision or score disclosure exactly as it was made.

    >>> replayed = replay(entry, row, birth_day, store, spec, calibration)   # doctest: +SKIP
    >>> replayed.result == entry.result                                      # doctest: +SKIP
    True

Every disclosure is audited with what reproduces it (server/audit.py): the model release and
calibration, the scenario's rule (``Scenario.rules_version``), the store's change position
the serving state reflected, and the day records were aged to. The store keeps every version
of every record and every consent change with its position (server/store.py), so the record
set and the consent as they stood at that position come back exactly, and the same kernel
scores them with the same release. Nothing here touches the serving state.

The position a check reads is taken after the citizen's row (server/state.py POSITION): a
write sets it before it touches any row, so the answer was computed from the records at the
position or — when that very write was being applied to this citizen as the check ran —
just before it. The replay tries the position, then the one before it; both are exact states
of the store, and the replay says which one reproduced the answer.

What is not versioned, and so taken as it is now: the citizen's birth date (changed only by
the citizen-card company, for a data error) and card registrations (a decision about an
unknown card concerns nobody and has nothing to replay).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernel.calibration import CalibrationTable
from kernel.columns import FLAG_HARD_RULE, NO_REASON
from kernel.features import Records, build_features
from kernel.score import Scorer
from kernel.spec import ModelSpec
from server.scenarios import SCORE_EXPLAINED, SCORE_SIMULATED, SCORE_VIEWED, Outcome, parse_rules_version
from server.state import adults, default_masks, to_records
from server.store import Store

@dataclass(frozen=True)
class Replayed:
    """The recomputation: the answer (an Outcome value, or the score disclosure's own code when
    a score would be shown), the score behind it, and the position that reproduced it."""

    result: int
    score: int
    level: int  # index into spec.levels; -1: no score (not authorised, under 18)
    hard_rule_applied: bool
    reason_codes: tuple[str, ...]
    position: int


def replay(entry, row: int, birth_day: int, store: Store, spec: ModelSpec, calibration: CalibrationTable) -> Replayed:
    """Recompute audit ``entry`` (server/audit.py AuditEntry) for the citizen in ``row``."""
    first = _at(entry, entry.position, row, birth_day, store, spec, calibration)
    if first.result == entry.result or entry.position <= 0:
        return first
    second = _at(entry, entry.position - 1, row, birth_day, store, spec, calibration)
    return second if second.result == entry.result else first


def _at(entry, position: int, row: int, birth_day: int, store: Store, spec: ModelSpec,
        calibration: CalibrationTable) -> Replayed:
    day = entry.as_of_day
    active = store.active_records(citizen_row=row, as_of=position)
    is_score = entry.result in (SCORE_VIEWED, SCORE_EXPLAINED, SCORE_SIMULATED)
    if is_score:
        min_score, pay_later = 0, False
    else:
        min_score, pay_later = parse_rules_version(entry.rules_version)
    records, bits = to_records(spec, active, {entry.scenario: 0} if pay_later else {})
    local = Records(np.zeros(len(records), np.int64), records.variable, records.day, records.value)
    features = build_features(spec, local, 1, day)
    adult = adults(np.array([birth_day], np.int32), day)
    cols = Scorer(spec, calibration).score(features, adult)
    flags = int(cols.flags[0])
    hard_rule = bool(flags & FLAG_HARD_RULE)
    score, level = int(cols.score[0]), int(cols.level[0])
    reasons = tuple(spec.variables[v].reason.code for v in cols.reasons[0] if v != NO_REASON)

    # the one precedence of every API (proto/qianjiang/v1/eligibility.proto)
    # the consent for the entry's own purpose (a scenario, or a read's purpose: server/consent.py)
    if not store.consent_at(row, position, entry.scenario or None, day):
        result = Outcome.NOT_AUTHORISED
    elif not adult[0]:
        result = Outcome.UNDER_18
    elif is_score:
        result = entry.result
    elif pay_later and hard_rule:
        result = Outcome.DENY_HARD_RULE
    elif pay_later and default_masks(spec, local, bits, 1, day)[0]:
        result = Outcome.DENY_UNPAID_DEFAULT
    elif score >= min_score:
        result = Outcome.ALLOW
    else:
        result = Outcome.DENY_BELOW_THRESHOLD
    if result in (Outcome.NOT_AUTHORISED, Outcome.UNDER_18):
        score, level, hard_rule, reasons = 0, -1, False, ()
    return Replayed(int(result), score, level, hard_rule, reasons, position)
