"""The offline gates' filters (clients/fuse.pyx) against a plain numpy reference: the same
hashes, slots and fingerprints, every key found, the false-positive rate of the fingerprint
width, and the cascade exact over its universe."""

from __future__ import annotations

import numpy as np
import pytest

from clients.fuse import Cascade, FuseFilter, geometry, token_key, token_keys

M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def murmur64(h: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xFF51AFD7ED558CCD)
        h = h ^ (h >> np.uint64(33))
        h = h * np.uint64(0xC4CEB9FE1A85EC53)
        return h ^ (h >> np.uint64(33))


def reference_contains(params: dict, payload: bytes, k0: np.ndarray, k1: np.ndarray) -> np.ndarray:
    """clients/fuse.pyx's query, in numpy: hash, three slots, packed fingerprints, xor."""
    bits, seed, seglen, scl = params["bits"], np.uint64(params["seed"]), params["seglen"], params["segment_count_length"]
    with np.errstate(over="ignore"):
        h = murmur64(k0.astype(np.uint64) ^ murmur64(k1.astype(np.uint64) + seed))
    hi = np.array([(int(x) * scl) >> 64 for x in h], np.uint64)  # mulhi
    low36 = h & np.uint64((1 << 36) - 1)
    mask = np.uint64(seglen - 1)
    slots = [hi, (hi + np.uint64(seglen)) ^ ((low36 >> np.uint64(18)) & mask),
             (hi + np.uint64(2 * seglen)) ^ (low36 & mask)]
    data = np.frombuffer(payload + bytes(8), np.uint8)
    fpmask = (1 << bits) - 1

    def read(i):
        out = np.empty(len(i), np.uint64)
        for j, slot in enumerate(i.tolist()):
            bit = slot * bits
            word = int.from_bytes(data[bit >> 3: (bit >> 3) + 8].tobytes(), "little")
            out[j] = (word >> (bit & 7)) & fpmask
        return out

    fp = (h ^ (h >> np.uint64(32))) & np.uint64(fpmask)
    return (read(slots[0]) ^ read(slots[1]) ^ read(slots[2])) == fp


def random_keys(rng, n):
    return rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + np.uint64(1), \
        rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)


@pytest.mark.parametrize("n,bits", [(1, 17), (2, 16), (37, 9), (5000, 17), (20000, 8)])
def test_filter_holds_every_key_and_agrees_with_the_reference(n, bits):
    rng = np.random.default_rng(n)
    k0, k1 = random_keys(rng, n)
    f = FuseFilter.build(k0, k1, bits=bits, seed=n)
    assert f.contains_keys(k0, k1).all()
    assert (f.array_length, f.params()["seglen"]) == (geometry(n)[1], geometry(n)[0])
    assert f.nbytes == (f.array_length * bits + 7) // 8
    u0, u1 = random_keys(rng, 3000)
    sample = np.concatenate([k0[:500], u0]), np.concatenate([k1[:500], u1])
    assert (reference_contains(f.params(), f.payload(), *sample) == f.contains_keys(*sample).astype(bool)).all()


def test_false_positive_rate_is_that_of_the_fingerprint_width():
    rng = np.random.default_rng(3)
    k0, k1 = random_keys(rng, 50_000)
    f = FuseFilter.build(k0, k1, bits=8)
    u0, u1 = random_keys(rng, 400_000)
    rate = f.contains_keys(u0, u1).mean()
    assert 0.8 / 256 < rate < 1.2 / 256, rate  # 2**-8, within sampling noise (sd ~ 2 %)
    assert f.nbytes * 8 / 50_000 < 8 * 1.25  # about 1.125 slots a key (more for small sets)


def test_duplicate_keys_are_one_key():
    k0 = np.array([5, 5, 7, 9, 9, 9], np.uint64)
    k1 = np.array([1, 1, 2, 3, 3, 3], np.uint32)
    f = FuseFilter.build(k0, k1, bits=16)
    assert f.contains_keys(k0, k1).all()


def test_payload_and_parameters_must_agree():
    k0, k1 = random_keys(np.random.default_rng(5), 1000)
    f = FuseFilter.build(k0, k1, bits=17)
    with pytest.raises(ValueError, match="payload"):
        FuseFilter.from_parts(f.params(), f.payload()[:-1])
    with pytest.raises(ValueError, match="geometry"):
        FuseFilter.from_parts({**f.params(), "n": 10}, f.payload())
    g = FuseFilter.from_parts(f.params(), f.payload())
    assert g.contains_keys(k0, k1).all()


@pytest.mark.parametrize("share", [0.0, 0.02, 0.5, 0.97, 1.0])
def test_cascade_is_exact_over_its_universe(share):
    rng = np.random.default_rng(int(share * 100))
    k0, k1 = random_keys(rng, 30_000)
    allowed = rng.random(30_000) < share
    # narrow fingerprints force deep cascades: exactness must not depend on luck
    c = Cascade.build(k0, k1, allowed, bits=(6, 4), seed=9)
    assert (c.query_keys(k0, k1).astype(bool) == allowed).all()
    if 0 < share < 1:
        assert len(c.levels) >= 3
    tokens = np.zeros((30_000, 16), np.uint8)
    tokens[:, :8] = k0.view(np.uint8).reshape(-1, 8)
    tokens[:, 12:] = k1.view(np.uint8).reshape(-1, 4)
    tokens[:, 8:12] = rng.integers(0, 256, (30_000, 4))  # bytes 8-11 are not part of the key
    assert (c.query_tokens(tokens.tobytes()).astype(bool) == allowed).all()
    assert [c.allows(tokens[i].tobytes()) for i in range(50)] == allowed[:50].tolist()
    a0, a1 = token_keys(tokens.tobytes())
    assert (a0 == k0).all() and (a1 == k1).all()
    assert token_key(tokens[0].tobytes()) == tokens[0, :8].tobytes() + tokens[0, 12:].tobytes()


def test_cascade_answers_unknown_keys_by_level_parity():
    rng = np.random.default_rng(8)
    k0, k1 = random_keys(rng, 4000)
    allowed = rng.random(4000) < 0.7
    c = Cascade.build(k0, k1, allowed, bits=(5, 5), seed=1)
    u0, u1 = random_keys(rng, 20_000)
    got = c.query_keys(u0, u1)
    expected = np.zeros(len(u0), np.uint8)
    for i in range(len(u0)):  # the first level that misses the key decides, by its parity
        j = 0
        while j < len(c.levels) and c.levels[j].contains_keys(u0[i:i + 1], u1[i:i + 1])[0]:
            j += 1
        expected[i] = j & 1
    assert (got == expected).all()
    assert 0 < got.mean() < 2 / 32  # about the first level's rate, 2**-5


def test_doctests():
    import doctest

    import clients.fuse

    result = doctest.testmod(clients.fuse)
    assert result.failed == 0 and result.attempted >= 5
