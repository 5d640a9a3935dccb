"""Eligibility scenarios and the decision rules (docs/product.md §4).

    >>> from server.scenarios import load_scenarios
    >>> scenarios = load_scenarios()
    >>> scenarios["campus_fitness"].min_score      # the seed: "above 580"
    581

The rule itself is compiled (server/token_index.pyx: ``check_many``, through the service's
``Checker``): one pass over a station gateway's packed card tokens, lookup and decision
together, reading each citizen's packed gate word; a unary check is the same pass over one
token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from server.config_files import DEFAULT_CONFIG_DIR, read_toml


DEFAULT_SCENARIOS_PATH = DEFAULT_CONFIG_DIR / "scenarios.toml"

#: At most this many pay-later scenarios: each has one bit of the per-citizen default mask.
MAX_PAY_LATER = 16
#: Scenarios a configuration may have: each has its consent bit (server/consent.py).
MAX_SCENARIOS = 16


class Outcome(enum.IntEnum):
    """The distinct answers of a check; values equal the proto's qianjiang.v1.Outcome."""

    ALLOW = 1
    DENY_BELOW_THRESHOLD = 2
    DENY_HARD_RULE = 3
    DENY_UNPAID_DEFAULT = 4
    UNKNOWN_CARD = 5
    NOT_AUTHORISED = 6
    UNDER_18 = 7
    # StreamCheck's answers to a message that is not a question about anyone (Check and
    # BatchCheck raise the matching error instead): never audited, no decision id.
    INVALID_REQUEST = 8
    UNKNOWN_SCENARIO = 9
    SCENARIO_NOT_PERMITTED = 10


#: Outcomes the compiled check decides (values 1-7: one byte each in a batch's answer).
DECIDED = tuple(o for o in Outcome if o <= Outcome.UNDER_18)

#: The decision reason code a partner sees for each outcome (never the score or records).
REASON_CODES = {
    Outcome.ALLOW: (),
    Outcome.DENY_BELOW_THRESHOLD: ("SCORE_BELOW_THRESHOLD",),
    Outcome.DENY_HARD_RULE: ("HARD_RULE",),
    Outcome.DENY_UNPAID_DEFAULT: ("UNPAID_DEFAULT",),
    Outcome.UNKNOWN_CARD: ("UNKNOWN_CARD",),
    Outcome.NOT_AUTHORISED: ("NOT_AUTHORISED",),
    Outcome.UNDER_18: ("UNDER_18",),
    Outcome.INVALID_REQUEST: ("INVALID_REQUEST",),
    Outcome.UNKNOWN_SCENARIO: ("UNKNOWN_SCENARIO",),
    Outcome.SCENARIO_NOT_PERMITTED: ("SCENARIO_NOT_PERMITTED",),
}


#: Audit result codes of score disclosures (a decision's is its Outcome value).
SCORE_VIEWED, SCORE_EXPLAINED, SCORE_SIMULATED = 100, 101, 102

#: Every audit result code -> the name a citizen sees in "who checked me".
RESULT_NAMES = {**{o.value: o.name for o in Outcome}, SCORE_VIEWED: "SCORE_VIEWED", SCORE_EXPLAINED: "SCORE_EXPLAINED",
                SCORE_SIMULATED: "SCORE_SIMULATED"}


class ScenarioConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Scenario:
    name: str
    zh: str
    en: str
    min_score: int
    pay_later: bool
    default_bit: int  # bit in the citizen's unpaid-default mask (pay-later only), else -1
    consent_bit: int = -1  # bit of the citizen's consent for this scenario (server/consent.py); -1: the blanket

    @property
    def rules_version(self) -> str:
        """The rule as decisions carry it, self-describing so that an appeal can re-apply it
        after the configuration has changed: "min581", "min550+pay_later"."""
        return f"min{self.min_score}+pay_later" if self.pay_later else f"min{self.min_score}"

    @property
    def rule(self) -> tuple[int, bool, int]:
        """(min_score, pay_later, default bit) as the compiled check takes them
        (server/token_index.pyx; the bit is ignored unless pay-later)."""
        return self.min_score, self.pay_later, max(self.default_bit, 0)


def parse_rules_version(version: str) -> tuple[int, bool]:
    """(min_score, pay_later) of a :attr:`Scenario.rules_version`.

        >>> parse_rules_version("min550+pay_later")
        (550, True)
    """
    body, plus, flag = version.partition("+")
    if not body.startswith("min") or not body[3:].isdigit() or (plus and flag != "pay_later"):
        raise ValueError(f"{version!r} is not a rules version (e.g. 'min581' or 'min550+pay_later')")
    return int(body[3:]), bool(plus)


def load_scenarios(path: str | Path | None = None) -> dict[str, Scenario]:
    path, doc = read_toml(path, DEFAULT_SCENARIOS_PATH, ScenarioConfigError)
    out, bit = {}, 0
    for name, item in doc.items():
        where = f"{path.name}: {name}"
        if not isinstance(item, dict):
            raise ScenarioConfigError(f"{where}: expected a table")
        extra = set(item) - {"zh", "en", "min_score", "pay_later"}
        if extra:
            raise ScenarioConfigError(f"{where}.{sorted(extra)[0]}: unknown key")
        min_score = item.get("min_score")
        if isinstance(min_score, bool) or not isinstance(min_score, int) or not 0 <= min_score <= 1000:
            raise ScenarioConfigError(f"{where}.min_score: expected an integer in [0, 1000], got {min_score!r}")
        pay_later = item.get("pay_later", False)
        if not isinstance(pay_later, bool):
            raise ScenarioConfigError(f"{where}.pay_later: expected true or false")
        for key in ("zh", "en"):
            if not isinstance(item.get(key), str) or not item[key]:
                raise ScenarioConfigError(f"{where}.{key}: expected a non-empty string")
        default_bit = -1
        if pay_later:
            if bit >= MAX_PAY_LATER:
                raise ScenarioConfigError(f"{where}: at most {MAX_PAY_LATER} pay-later scenarios")
            default_bit, bit = bit, bit + 1
        if len(out) >= MAX_SCENARIOS:
            raise ScenarioConfigError(f"{where}: at most {MAX_SCENARIOS} scenarios (each has its bit of consent "
                                      "in a citizen's gate word)")
        out[name] = Scenario(name, item["zh"], item["en"], min_score, pay_later, default_bit, consent_bit=len(out))
    if not out:
        raise ScenarioConfigError(f"{path}: no scenarios")
    return out
