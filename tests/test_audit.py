"""The audit log of disclosures (server/audit.py): real files in tmp_path, no mocks."""

from __future__ import annotations

import os
import textwrap
import threading
import time
from collections import Counter
from datetime import datetime, timezone

import numpy as np
import pytest

from conftest import kill_after_flushes
from server import audit
from server.audit import ENTRY, AuditLog

KEY = b"k" * 32


def test_round_trip_unary_and_batch(tmp_path):
    log = AuditLog(tmp_path, KEY)
    alice, bob = log.subject_of("c00000001"), log.subject_of("c00000002")
    before = datetime.now(timezone.utc)
    log.record(0x1F, "gate-07", "Check", "metro_pay_later", alice, 0, "1+abc")
    time.sleep(0.002)
    subjects = np.array([bob, 0, alice, bob], dtype=np.uint64)  # 0: an unknown card
    results = np.array([0, 5, 2, 1], dtype=np.uint8)
    log.record_batch(0x20, "station-3", "CheckBatch", "library_deposit_free", subjects, results, "1+abc")
    time.sleep(0.002)
    log.record(0x21, "app", "GetScore", "self_view", alice, 9, "1+def")
    log.flush()

    got = log.entries()
    assert [e.decision_id for e in got] == [
        log.ids.id_of(0x1F),
        *(f"{log.ids.id_of(0x20)}-{i}" for i in (0, 2, 3)),  # format 4: the unknown card (1) is only counted
        log.ids.id_of(0x21),
    ]
    assert got[0].decision_id == log.decision_id(0x1F) and got[2].decision_id == log.decision_id(0x20, 2)
    first = got[0]
    assert (first.caller, first.method, first.scenario, first.result, first.model_version, first.subject) == (
        "gate-07", "Check", "metro_pay_later", 0, "1+abc", alice,
    )
    assert before <= first.time <= datetime.now(timezone.utc) and first.time.tzinfo == timezone.utc
    batch = got[1:4]
    assert [e.subject for e in batch] == [bob, alice, bob]
    assert [e.result for e in batch] == [0, 2, 1]
    (header,) = log.batches()
    assert (header.batch_id, header.known, header.unknown, header.caller) == (log.decision_id(0x20), 3, 1, "station-3")
    assert {(e.caller, e.method, e.scenario, e.model_version) for e in batch} == {
        ("station-3", "CheckBatch", "library_deposit_free", "1+abc")
    }
    assert got[4].model_version == "1+def" and got[4].method == "GetScore"

    # Who checked alice: only her entries, newest first; the limit keeps the newest.
    mine = log.checks_of("c00000001")
    assert [e.decision_id for e in mine] == [log.decision_id(0x21), log.decision_id(0x20, 2), log.decision_id(0x1F)]
    assert [e.decision_id for e in log.checks_of("c00000001", limit=2)] == [log.decision_id(0x21), log.decision_id(0x20, 2)]
    assert [e.subject for e in log.checks_of("c00000002")] == [bob, bob]
    # Unknown-card entries (subject 0) belong to nobody.
    assert log.checks_of("c99999999") == []
    for cid in ("c00000001", "c00000002", "c99999999", ""):
        assert all(e.subject != 0 for e in log.checks_of(cid))
    assert log.entries(subject=0) == []  # an unknown card of a batch has no entry (format 4)
    # since_ns filters by time
    cut = int(got[4].time.timestamp() * 1e9) - 1000
    assert [e.decision_id for e in log.entries(since_ns=cut)] == [log.decision_id(0x21)]
    log.close()
    with pytest.raises(RuntimeError):
        log.record(1, "a", "b", "c", alice, 0, "m")


def test_bad_values_are_rejected_at_the_caller(tmp_path):
    log = AuditLog(tmp_path, KEY)
    with pytest.raises(ValueError):
        log.record(-1, "a", "b", "c", 1, 0, "m")
    with pytest.raises(ValueError):
        log.record(1, "a", "b", "c", 1, 256, "m")
    with pytest.raises(ValueError):
        log.record_batch(1, "a", "b", "c", np.array([1, 2], np.uint64), np.array([0], np.uint8), "m")
    with pytest.raises(ValueError):
        log.record_batch(1, "a", "b", "c", np.array([-1]), np.array([0]), "m")
    with pytest.raises(ValueError):
        AuditLog(tmp_path, b"short")
    log.record_batch(1, "a", "b", "c", np.array([3, 4]), np.array([0, 1]), "m")  # other int dtypes convert
    log.close()
    assert [e.subject for e in log.entries()] == [3, 4]


def test_each_entry_keeps_its_strings_past_the_remembered_codes(tmp_path, monkeypatch):
    """The log remembers the codes of a few (caller, method, scenario, model) combinations;
    entries past that many, and repeats of remembered ones, still decode to their own."""
    monkeypatch.setattr(audit, "_STRINGS_CACHED", 2)
    log = AuditLog(tmp_path, KEY)
    combos = [(f"gate-{i % 3}", "Check", f"scenario-{i % 4}", f"1+{i % 2}") for i in range(12)]
    for seq, (caller, method, scenario, model) in enumerate(combos, 1):
        if seq % 2:
            log.record(seq, caller, method, scenario, seq, 1, model)
        else:
            log.record_batch(seq, caller, method, scenario, np.array([seq], np.uint64), np.array([1], np.uint8), model)
    log.close()
    assert [(e.caller, e.method, e.scenario, e.model_version) for e in log.entries()] == combos
    assert len(log._entry_codes) == 2
    with pytest.raises(TypeError, match="caller must be a str"):
        AuditLog(tmp_path, KEY).record(1, 7, "Check", "s", 1, 1, "m")


def _until_accepted(append) -> int:
    """Call ``append`` until the log takes it (a refusal queues nothing); the refusals."""
    refused = 0
    while True:
        try:
            append()
            return refused
        except audit.AuditUnavailable:
            refused += 1
            time.sleep(0.001)


def test_concurrent_appends_each_appear_exactly_once(tmp_path):
    # Small segments and a small pending limit also exercise rollover and back-pressure.
    log = AuditLog(tmp_path, KEY, flush_interval=0.005, max_pending=3_000, segment_bytes=64 << 10).start()
    n_threads, rounds = 6, 60
    errors = []

    def work(t: int):
        try:
            for r in range(rounds):
                seq = t * 1_000_000 + r * 10
                _until_accepted(lambda: log.record(seq, f"caller-{t}", "Check", f"scenario-{r % 7}", seq + 1, r % 256, "m1"))
                n = 1 + (r * 37 % 200)
                subjects = np.arange(n, dtype=np.uint64) + seq
                _until_accepted(lambda: log.record_batch(seq + 1, f"caller-{t}", "CheckBatch", "metro", subjects,
                                                         np.zeros(n, np.uint8), "m1"))
                if r % 20 == 0:
                    log.flush()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.flush()
    assert not errors

    expected = Counter()
    for t in range(n_threads):
        for r in range(rounds):
            seq = t * 1_000_000 + r * 10
            expected[log.decision_id(seq)] += 1
            for i in range(1 + (r * 37 % 200)):
                if seq + i:  # subject 0 (thread 0's first batch): an unknown card, counted not itemized
                    expected[log.decision_id(seq + 1, i)] += 1
    got = Counter(e.decision_id for e in log.entries())
    assert got == expected  # no loss, no duplicates
    assert len(list(tmp_path.glob("audit-*.bin"))) > 1  # rolled over to new segments
    by_id = {e.decision_id: e for e in log.entries()}
    e = by_id[log.decision_id(3 * 1_000_000 + 50)]
    assert (e.caller, e.scenario, e.result, e.subject) == ("caller-3", "scenario-5", 5, 3 * 1_000_000 + 51)
    log.close()


def test_two_writers_share_a_directory(tmp_path):
    a, b = AuditLog(tmp_path, KEY), AuditLog(tmp_path, KEY)  # as two worker processes would
    assert a.writer != b.writer
    s = a.subject_of("c00000007")
    a.record(1, "gate-a", "Check", "metro", s, 0, "m1")
    b.record(1, "gate-b", "Check", "library", s, 1, "m2")
    b.record_batch(2, "gate-b", "CheckBatch", "library", np.array([s, 0], np.uint64), np.array([1, 3], np.uint8), "m2")
    a.flush()
    b.flush()
    assert len(list(tmp_path.glob("audit-*.bin"))) == 2
    reader = AuditLog(tmp_path, KEY)
    ids = {e.decision_id for e in reader.entries()}
    assert ids == {a.decision_id(1), b.decision_id(1), b.decision_id(2, 0)}  # (2, 1): an unknown card, counted
    assert [(x.batch_id, x.known, x.unknown) for x in reader.batches()] == [(b.decision_id(2), 1, 1)]
    assert {(e.caller, e.model_version) for e in reader.checks_of("c00000007")} == {("gate-a", "m1"), ("gate-b", "m2")}
    a.close()
    b.close()


def test_pseudonym_is_keyed_and_ids_never_reach_the_files(tmp_path):
    log = AuditLog(tmp_path, KEY)
    other = AuditLog(tmp_path / "other", b"q" * 32)
    cid = "c00000042"
    assert log.subject_of(cid) == log.subject_of(cid) != other.subject_of(cid)
    assert log.subject_of(cid) != log.subject_of("c00000043") and log.subject_of(cid) != 0
    assert list(log.subjects_of([cid, "c00000043"])) == [log.subject_of(cid), log.subject_of("c00000043")]
    s = log.subject_of(cid)
    log.record(1, "gate", "GetScore", "self_view", s, 0, "m")
    log.record_batch(2, "gate", "CheckBatch", "metro", np.array([s] * 3, np.uint64), np.zeros(3, np.uint8), "m")
    log.close()
    files = list(tmp_path.glob("audit-*"))
    assert files
    for f in files:
        assert cid.encode() not in f.read_bytes()
    assert len(log.checks_of(cid)) == 4
    assert AuditLog(tmp_path, b"q" * 32).checks_of(cid) == []  # the wrong key finds nothing


CHILD = textwrap.dedent(
    """
    import sys, time
    from server.audit import AuditLog
    log = AuditLog(sys.argv[1], b"k" * 32, flush_interval=float(sys.argv[2])).start()
    i = 0
    next_flush = time.monotonic() + 0.15
    while True:
        log.record(i, "gate", "Check", "metro", i + 1, i % 7, "m1")  # subject i + 1: the append order
        i += 1
        time.sleep(0.0003)
        if time.monotonic() >= next_flush:
            log.flush()
            print(i, flush=True)  # acknowledged: entries 0 .. i-1 are durable
            next_flush = time.monotonic() + 0.15
    """
)


def test_sigkill_loses_at_most_the_last_flush_interval(tmp_path):
    interval = 0.05
    acked_count, killed_ns = kill_after_flushes(CHILD, str(tmp_path), str(interval))

    reader = AuditLog(tmp_path, KEY)
    got = reader.entries()
    order = [e.subject - 1 for e in got]
    assert len(order) == len(set(order))  # nothing written twice
    # One appender, commits in append order: the durable entries are exactly a prefix.
    assert sorted(order) == list(range(len(order)))
    assert len(order) >= acked_count  # nothing acknowledged as flushed is lost
    assert len(order) > 300
    # Whatever is missing was appended after the newest durable entry, which is at most one
    # flush interval (plus one write + fsync and scheduling slack) older than the kill.
    newest_ns = int((got[-1].time - datetime(1970, 1, 1, tzinfo=timezone.utc)).total_seconds() * 1e6) * 1000
    assert killed_ns - newest_ns <= (interval + 0.2) * 1e9, ((killed_ns - newest_ns) / 1e6, "ms")

    # Torn writes: a partial trailing entry is ignored, whether garbage or a cut-off entry.
    (segment,) = tmp_path.glob("audit-*.bin")
    size = segment.stat().st_size
    assert size % ENTRY.itemsize == 0
    with open(segment, "ab") as f:
        f.write(b"\x01" * (ENTRY.itemsize // 2))
    assert [e.decision_id for e in reader.entries()] == [e.decision_id for e in got]
    os.truncate(segment, size - 5)
    assert [e.decision_id for e in reader.entries()] == [e.decision_id for e in got[:-1]]
    with open(segment.with_suffix(".dict"), "ab") as f:
        f.write(b'{"kind": "caller", "co')  # a torn dictionary line too
    assert len(reader.entries()) == len(got) - 1


def test_batch_append_is_much_cheaper_than_unary(tmp_path):
    log = AuditLog(tmp_path, KEY, max_pending=10_000_000)
    subjects = np.arange(1, 1001, dtype=np.uint64)
    results = np.zeros(1000, np.uint8)
    log.record(0, "gate", "Check", "metro", 1, 0, "m1")  # warm the dictionary
    unary, batch = [], []
    for rep in range(5):
        t0 = time.perf_counter()
        for i in range(1000):
            log.record(i, "gate", "Check", "metro", i + 1, 0, "m1")
        unary.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        log.record_batch(rep, "gate", "CheckBatch", "metro", subjects, results, "m1")
        batch.append(time.perf_counter() - t0)
    assert min(unary) >= 20 * min(batch), (min(unary), min(batch))
    log.close()
    assert len(log.entries()) == 1 + 5 * 2000


def test_a_full_queue_refuses_at_once_and_accepts_again_after_a_commit(tmp_path):
    # No flusher thread: nothing is written until flush(); the appending thread never writes.
    log = AuditLog(tmp_path, KEY, max_pending=10)
    for i in range(10):
        log.record(i + 1, "gate", "Check", "metro", i + 1, 0, "m1")
    with pytest.raises(audit.AuditUnavailable, match="10 disclosures are waiting"):
        log.record(11, "gate", "Check", "metro", 11, 0, "m1")
    with pytest.raises(audit.AuditUnavailable):
        log.record_batch(12, "gate", "CheckBatch", "metro", np.arange(1, 3, dtype=np.uint64), np.zeros(2, np.uint8), "m1")
    assert AuditLog(tmp_path, KEY).entries() == []  # refused, and still nothing written by appending
    log.flush()
    assert len(AuditLog(tmp_path, KEY).entries()) == 10
    # A batch larger than the bound goes only into an empty queue (else it could never go).
    log.record_batch(100, "gate", "CheckBatch", "metro", np.arange(1, 51, dtype=np.uint64), np.zeros(50, np.uint8), "m1")
    with pytest.raises(audit.AuditUnavailable):
        log.record(101, "gate", "Check", "metro", 1, 0, "m1")
    log.close()
    assert len(AuditLog(tmp_path, KEY).entries()) == 60
