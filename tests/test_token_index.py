"""The compiled card-token index and eligibility rule (server/token_index.pyx): the bound
Checker gives exactly what check_tokens gives, one token at a time or in a batch, and the
module's doctests hold."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from server import token_index
from server.token_index import Checker, TokenIndex, check_tokens


def test_doctests():
    assert doctest.testmod(token_index).failed == 0


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("min_score, pay_later, bit", [(581, False, 0), (600, True, 0), (550, True, 3)])
def test_checker_equals_check_tokens(seed, min_score, pay_later, bit):
    rng = np.random.default_rng(seed)
    n = 500
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
    want = check_tokens(index, packed, adult, consent, score, flags, defaults, subject, min_score, pay_later, bit)
    checker = Checker(index, adult, consent, score, flags, defaults, subject)
    got = checker.check(packed, min_score, pay_later, bit)
    assert (got[0] == want[0]).all() and (got[1] == want[1]).all() and got[2] == want[2]
    one = [checker.check_one(tokens[i].tobytes(), min_score, pay_later, bit) for i in range(n)]
    assert [o for o, _ in one] == want[0].tolist()
    assert [s for _, s in one] == want[1].tolist()
    assert set(want[0].tolist()) >= {1, 5}  # both allowed and unknown cards occur


def test_checker_refuses_bad_input():
    index = TokenIndex.allocate(4)
    one = np.ones(2, np.uint8)
    with pytest.raises(ValueError, match="one length"):
        Checker(index, one, one, np.ones(3, np.int16), one, np.zeros(2, np.uint32), np.zeros(2, np.uint64))
    checker = Checker(index, one, one, np.ones(2, np.int16), one, np.zeros(2, np.uint32), np.zeros(2, np.uint64))
    with pytest.raises(ValueError, match="16 bytes"):
        checker.check_one(b"short", 581, False, 0)
    with pytest.raises(ValueError, match="whole number"):
        checker.check(b"x" * 17, 581, False, 0)
    with pytest.raises(ValueError, match="default_bit"):
        checker.check_one(b"x" * 16, 581, True, 40)
