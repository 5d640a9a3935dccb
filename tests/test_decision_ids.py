"""Decision ids (server/decision_ids.py): unguessable, revealing neither volume nor worker."""

from __future__ import annotations

import re
import secrets
import threading
import time

import pytest

from server.decision_ids import SEQ_LIMIT, DecisionIds, ids_key

KEY = b"i" * 16


def test_ids_round_trip_and_look_unrelated():
    ids = DecisionIds(KEY, writer=7)
    made = [ids.next() for _ in range(1000)]
    assert [seq for seq, _ in made] == list(range(1, 1001))
    for seq, decision_id in made:
        assert re.fullmatch(r"d-[0-9a-f]{32}", decision_id)
        assert ids.parse(decision_id) == (7, seq, None)
        assert ids.id_of(seq) == decision_id
        assert ids.parse(ids.id_of(seq, 41)) == (7, seq, 41) and ids.id_of(seq, 41) == f"{decision_id}-41"
    # Consecutive ids of one worker share no visible structure: no common prefix or suffix
    # beyond chance, so neither the worker nor the count shows.
    hexes = [d[2:] for _, d in made]
    assert len({h[:4] for h in hexes}) > 900 and len({h[-4:] for h in hexes}) > 900
    other = DecisionIds(KEY, writer=8)
    assert other.next()[1] != made[0][1]  # same seq, another writer: unrelated id
    assert ids.encode(8, 1) == other.id_of(1)
    assert ids.encode_many([7, 8], [5, 1]) == [ids.id_of(5), other.id_of(1)]


def test_random_writer_and_the_audit_key_derivation():
    a, b = DecisionIds(KEY), DecisionIds(KEY)
    assert a.writer != b.writer and 0 <= a.writer < 1 << 64
    assert ids_key(b"k" * 32) == ids_key(b"k" * 32) != ids_key(b"q" * 32) and len(ids_key(b"k" * 32)) == 16
    assert ids_key(b"k" * 32) != (b"k" * 32)[:16]  # derived, not the audit key itself
    DecisionIds(secrets.token_bytes(16)).next()  # without the audit log (--no-audit)


@pytest.mark.parametrize("bad, message", [
    ("d-1234", "not a decision id"),
    ("x-" + "0" * 32, "not a decision id"),
    ("d-" + "A" * 32, "not a decision id"),  # upper case is not what we make
    ("d-" + "0" * 32 + "-01", "not a decision id"),
    ("d-" + "0" * 32 + "-", "not a decision id"),
    ("", "not a decision id"),
])
def test_malformed_ids_are_refused_clearly(bad, message):
    with pytest.raises(ValueError, match=message):
        DecisionIds(KEY).parse(bad)
    with pytest.raises(ValueError, match="is a string"):
        DecisionIds(KEY).parse(None)


def test_an_id_of_another_key_does_not_parse():
    seq, decision_id = DecisionIds(b"j" * 16, writer=3).next()
    mine = DecisionIds(KEY)
    refused = 0
    for _ in range(200):  # 2**-16 chance each that a foreign id decrypts to a small seq
        _, decision_id = DecisionIds(secrets.token_bytes(16)).next()
        try:
            mine.parse(decision_id)
        except ValueError as e:
            assert "not made with this key" in str(e)
            refused += 1
    assert refused >= 198


def test_bad_keys_and_writers_are_refused():
    with pytest.raises(ValueError, match="16 bytes"):
        DecisionIds(b"short")
    with pytest.raises(ValueError, match="16 bytes"):
        DecisionIds(b"k" * 32)
    with pytest.raises(ValueError, match="64 bits"):
        DecisionIds(KEY, writer=1 << 64)
    ids = DecisionIds(KEY)
    ids._counter = iter([SEQ_LIMIT])
    with pytest.raises(OverflowError):
        ids.next()


def test_next_is_unique_across_threads_and_costs_microseconds():
    ids = DecisionIds(KEY)
    got: list[list[str]] = [[] for _ in range(4)]

    def work(out):
        for _ in range(5000):
            out.append(ids.next()[1])

    threads = [threading.Thread(target=work, args=(out,)) for out in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [d for out in got for d in out]
    assert len(set(everything)) == 20000
    assert sorted(ids.parse(d)[1] for d in everything) == list(range(1, 20001))
    n = 50_000
    t0 = time.perf_counter()
    for _ in range(n):
        ids.next()
    per_call_us = (time.perf_counter() - t0) / n * 1e6
    print(f"DecisionIds.next(): {per_call_us:.2f} us")
    assert per_call_us < 10, per_call_us  # ~1.5 us measured; a check builds one per gate scan
