"""Consent by purpose: a citizen authorises each use of their score separately.

    >>> purposes = ConsentPurposes(["metro_pay_later", "campus_fitness"], ["citizen_app_view", "unspecified"])
    >>> purposes.bit("campus_fitness"), purposes.bit("citizen_app_view")
    (1, 16)
    >>> blanket, exceptions = 1, purposes.mask(["campus_fitness"])       # everything but the gym
    >>> [bool(effective(blanket, exceptions, purposes.bit(p))) for p in ("metro_pay_later", "campus_fitness")]
    [True, False]

**What can be consented to.** Every scenario (config/scenarios.toml: a decision for a partner
is a use of the score) and every purpose a score may be read for (config/purposes.toml).
A citizen holds:

* the **blanket** authorisation (GrantConsent / RevokeConsent with no purposes: the app's main
  switch): every purpose, no expiry. Granting or revoking it clears every purpose setting,
  so "allow everything" and "stop everything" mean exactly that;
* **purpose settings**, each a grant (with an optional expiry: the last day it holds, in the
  city's calendar) or a revocation, which override the blanket for that purpose alone:
  revoking one purpose leaves the others as they were.

A purpose is authorised when its setting is a grant that has not expired, or, with no
setting (or an expired grant), when the blanket stands.

**In memory** (server/state.py) a row keeps the blanket (``consent``, uint8) and one uint32
of *exceptions* (``consent_except``): the purposes whose answer differs from the blanket's,
bit :meth:`ConsentPurposes.bit` each (scenarios 0-15, read purposes 16-31). The eligibility
check reads the scenarios' effective bits from the row's gate word (server/token_index.pyx);
the store keeps the settings by name (server/store.py ``purpose_consents``) and every change
in the consent history with its position, so an appeal's replay sees the consent for the
decision's own purpose as it stood. A grant that reaches its expiry stops at the city's
midnight: the day rollover re-derives the rows whose grants expired
(:func:`expiring_rows`, server/app.py).
"""

from __future__ import annotations

import numpy as np

#: Bits of a row's exception mask: scenarios from 0, read purposes from READ_SHIFT.
READ_SHIFT = 16
MAX_SCENARIOS = 16
MAX_READ_PURPOSES = 16
#: Longest list of purposes one consent call may name.
MAX_PURPOSES_PER_CALL = MAX_SCENARIOS + MAX_READ_PURPOSES


class ConsentPurposes:
    """The names a citizen can consent to, and their bits (config order)."""

    def __init__(self, scenarios, read_purposes):
        scenarios, read_purposes = list(scenarios), list(read_purposes)
        if len(scenarios) > MAX_SCENARIOS:
            raise ValueError(f"at most {MAX_SCENARIOS} scenarios can be consented to separately, got {len(scenarios)}")
        if len(read_purposes) > MAX_READ_PURPOSES:
            raise ValueError(f"at most {MAX_READ_PURPOSES} read purposes, got {len(read_purposes)}")
        clash = sorted(set(scenarios) & set(read_purposes))
        if clash:
            raise ValueError(f"{clash[0]!r} is both a scenario and a read purpose: consent could not tell them apart")
        self.scenarios, self.read_purposes = tuple(scenarios), tuple(read_purposes)
        self._bits = {name: i for i, name in enumerate(scenarios)}
        self._bits.update({name: READ_SHIFT + i for i, name in enumerate(read_purposes)})

    @property
    def names(self) -> tuple[str, ...]:
        return self.scenarios + self.read_purposes

    @property
    def identity(self) -> str:
        """What the bits mean, for a snapshot's header: a state written under another list
        reads its exception masks differently."""
        return ",".join(self.scenarios) + ";" + ",".join(self.read_purposes)

    def __contains__(self, name: str) -> bool:
        return name in self._bits

    def bit(self, name: str) -> int:
        return self._bits[name]

    def mask(self, names) -> int:
        out = 0
        for name in names:
            out |= 1 << self._bits[name]
        return out

    def exceptions(self, blanket: int, settings, today: int) -> int:
        """One row's exception mask from its purpose settings ``(purpose, granted,
        expires_day or None)`` (:meth:`exceptions_bulk` for one row)."""
        if not settings:
            return 0
        names, granted, expires = zip(*settings)
        return int(self.exceptions_bulk(
            np.array([blanket], np.uint8), np.zeros(len(names), np.int64), names, np.asarray(granted, np.int64),
            np.array([-1 if e is None else e for e in expires], np.int64), today)[0])

    def exceptions_bulk(self, blanket: np.ndarray, rows: np.ndarray, purposes, granted: np.ndarray,
                        expires: np.ndarray, today: int) -> np.ndarray:
        """Every row's exception mask (uint32, len(blanket)) from all purpose settings
        (``rows``, ``purposes`` names, ``granted``, ``expires`` days with -1 for none; names no
        longer configured are ignored): a grant differs from a withheld blanket while it has
        not expired (an expired one leaves the answer to the blanket), a revocation from a
        blanket that stands. numpy over the settings, a Python step per distinct name."""
        out = np.zeros(len(blanket), np.uint32)
        if not len(rows):
            return out
        names = np.asarray(purposes, object)
        bits = np.full(len(rows), -1, np.int64)
        for name in set(names.tolist()):
            if name in self._bits:
                bits[names == name] = self._bits[name]
        live = (expires < 0) | (expires >= today)
        on = blanket[rows] != 0
        differs = (bits >= 0) & np.where(granted != 0, live & ~on, on)
        np.bitwise_or.at(out, rows[differs], (np.uint32(1) << bits[differs].astype(np.uint32)))
        return out


def effective(blanket: int, exceptions: int, bit: int) -> int:
    """1 when the purpose of ``bit`` is authorised."""
    return (1 if blanket else 0) ^ ((int(exceptions) >> bit) & 1)


def scenario_bits(blanket: np.ndarray, exceptions: np.ndarray) -> np.ndarray:
    """The scenarios' effective bits (uint32, bits 0-15) of rows: what the gate word packs."""
    full = np.where(blanket != 0, np.uint32(0xFFFF), np.uint32(0))
    return (full ^ (exceptions.astype(np.uint32) & np.uint32(0xFFFF))).astype(np.uint32)
