"""The compiled card-token index and eligibility rule (server/token_index.pyx) against a
plain-Python statement of the rule (the precedence of docs/product.md §4), one token at a time and
in a batch; and the module's doctests."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from server import token_index
from server.token_index import Checker, TokenIndex, TokenIndexFull, check_tokens, pack_gate


def test_doctests():
    assert doctest.testmod(token_index).failed == 0


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("min_score, pay_later, bit", [(581, False, 0), (600, True, 0), (550, True, 3)])
# sizes around the kernel's groups of 16, and one past the size that releases the GIL
@pytest.mark.parametrize("n", [83, 96, 500, 20_000])
def test_checker_follows_the_rule(seed, min_score, pay_later, bit, n):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    index = TokenIndex.allocate(n)
    index.insert_many(tokens[: n - 50], np.arange(n - 50))  # the last 50 are unknown cards
    adult = (rng.random(n) < 0.9).astype(np.uint8)
    consent = (rng.random(n) < 0.8).astype(np.uint8)
    score = rng.integers(400, 900, n).astype(np.int16)
    flags = (rng.random(n) < 0.05).astype(np.uint8)
    defaults = rng.integers(0, 16, n).astype(np.uint32)
    subject = rng.integers(1, 2**63, n, dtype=np.uint64)
    packed = tokens.tobytes()
    rows = {tokens[i].tobytes(): i for i in range(n - 50)}

    def rule(token: bytes) -> tuple[int, int]:
        row = rows.get(token)
        if row is None:
            return 5, 0  # UNKNOWN_CARD, no person
        if not consent[row]:
            o = 6  # NOT_AUTHORISED: before the age (nothing about a person without consent)
        elif not adult[row]:
            o = 7  # UNDER_18
        elif pay_later and flags[row] & 1:
            o = 3  # DENY_HARD_RULE
        elif pay_later and (int(defaults[row]) >> bit) & 1:
            o = 4  # DENY_UNPAID_DEFAULT
        else:
            o = 1 if score[row] >= min_score else 2  # ALLOW / DENY_BELOW_THRESHOLD
        return o, int(subject[row])

    want = [rule(tokens[i].tobytes()) for i in range(n)]
    checker = Checker(index, pack_gate(adult, consent, score, flags, defaults), subject)
    counts = np.full(8, -1, np.int64)  # overwritten, not added to
    outcomes, subjects, allowed = checker.check(packed, min_score, pay_later, bit, counts)
    assert list(zip(outcomes.tolist(), subjects.tolist())) == want
    assert allowed == sum(o == 1 for o, _ in want)
    assert counts.tolist() == [sum(o == v for o, _ in want) for v in range(8)]
    assert [checker.check_one(tokens[i].tobytes(), min_score, pay_later, bit) for i in range(n)] == want
    again = check_tokens(index, packed, adult, consent, score, flags, defaults, subject, min_score, pay_later, bit)
    assert again[0].tolist() == outcomes.tolist() and again[2] == allowed
    assert {o for o, _ in want} >= {1, 5}  # both allowed and unknown cards occur


def test_an_empty_batch_counts_nothing():
    index = TokenIndex.allocate(4)
    checker = Checker(index, np.zeros(1, np.uint64), np.zeros(1, np.uint64))
    counts = np.full(8, 7, np.int64)
    outcomes, subjects, allowed = checker.check(b"", 581, False, 0, counts)
    assert (len(outcomes), len(subjects), allowed, counts.tolist()) == (0, 0, 0, [0] * 8)


def test_checker_refuses_bad_input():
    index = TokenIndex.allocate(4)
    one = np.ones(2, np.uint8)
    with pytest.raises(ValueError, match="one length"):
        Checker(index, np.zeros(3, np.uint64), np.zeros(2, np.uint64))
    with pytest.raises(ValueError, match="one length"):
        pack_gate(one, one, np.ones(3, np.int16), one, np.zeros(2, np.uint32))
    with pytest.raises(ValueError, match="out: expected 2"):
        pack_gate(one, one, np.ones(2, np.int16), one, np.zeros(2, np.uint32), out=np.zeros(3, np.uint64))
    checker = Checker(index, pack_gate(one, one, np.ones(2, np.int16), one, np.zeros(2, np.uint32)), np.zeros(2, np.uint64))
    with pytest.raises(ValueError, match="16 bytes"):
        checker.check_one(b"short", 581, False, 0)
    with pytest.raises(ValueError, match="whole number"):
        checker.check(b"x" * 17, 581, False, 0)
    with pytest.raises(ValueError, match="counts: expected 8"):
        checker.check(b"x" * 16, 581, False, 0, np.zeros(7, np.int64))
    with pytest.raises(ValueError, match="default_bit"):
        checker.check_one(b"x" * 16, 581, True, 40)


@pytest.mark.parametrize("cap", [16, 37, 1000, 4099])
def test_any_capacity_holds_its_load_limit_and_probes_wrap_round(cap):
    """Capacities are not powers of two (a city of 13 million tokens needs 18.6 million
    slots, not 33.5 million): every token up to the limit is found, the last slot's probe
    wraps to the first, and one more token is refused."""
    idx = TokenIndex(np.zeros((cap, 2), np.uint64), np.zeros(1, np.int64))
    idx.clear()
    rng = np.random.default_rng(cap)
    limit = cap * 7 // 10
    tokens = rng.integers(0, 256, (limit, 16), dtype=np.uint8)
    assert idx.insert_many(tokens, np.arange(limit)) == limit
    assert [idx.get(bytes(t)) for t in tokens] == list(range(limit))
    assert idx.lookup_batch(tokens.tobytes()).tolist() == list(range(limit))
    assert idx.get(bytes(16)) == -1
    with pytest.raises(TokenIndexFull):
        idx.insert(bytes(range(16)), 1)


def test_capacity_for_is_the_load_limit_not_the_next_power_of_two():
    for n in (1, 7, 100, 12_499_999, 13_125_000):
        cap = TokenIndex.capacity_for(n)
        assert cap * 7 // 10 >= n and cap % 16 == 0 and cap <= max(16, n * 10 // 7 + 17)
